//! The layering the map in docs/ARCHITECTURE.md promises, checked on the workspace's own
//! manifests: HTTP stays at the edge, so no crate below it names axum (or the HTTP middleware
//! crates) as a dependency, directly or through another crate of the workspace.

use std::process::Command;

use serde_json::Value;

/// Crates below the HTTP edge: everything but the APIs, the security guard, `petstore-web`
/// and the binary.
const BELOW_THE_EDGE: [&str; 11] = [
    "petstore-domain",
    "petstore-settings",
    "petstore-telemetry",
    "petstore-event-store",
    "petstore-resilience",
    "petstore-live-settings",
    "petstore-kafka",
    "petstore-redis",
    "petstore-read-models",
    "petstore-saga",
    "petstore-projector",
];

/// What serving HTTP would bring in.
const HTTP_CRATES: [&str; 3] = ["axum", "tower-http", "tower_governor"];

#[test]
fn no_crate_below_the_edge_depends_on_axum() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let packages = metadata["packages"].as_array().expect("packages");
    let dependencies = |name: &str| -> Vec<String> {
        let package = packages
            .iter()
            .find(|package| package["name"] == name)
            .unwrap_or_else(|| panic!("{name} is a workspace member"));
        package["dependencies"]
            .as_array()
            .expect("dependencies")
            .iter()
            .filter(|dependency| dependency["kind"].is_null())
            .filter_map(|dependency| dependency["name"].as_str())
            .map(str::to_owned)
            .collect()
    };
    for name in BELOW_THE_EDGE {
        // Every crate it builds with, following the workspace's own crates.
        let mut path = vec![name.to_owned()];
        let mut seen = std::collections::BTreeSet::new();
        let mut http = Vec::new();
        while let Some(current) = path.pop() {
            if !seen.insert(current.clone()) {
                continue;
            }
            for dependency in dependencies(&current) {
                if HTTP_CRATES.contains(&dependency.as_str()) {
                    http.push(format!("{dependency} (through {current})"));
                } else if dependency.starts_with("petstore-") {
                    path.push(dependency);
                }
            }
        }
        assert!(http.is_empty(), "{name} depends on {http:?}");
    }
}
