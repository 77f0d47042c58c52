//! The layering the map in docs/ARCHITECTURE.md promises, checked on the workspace's own
//! manifests: HTTP stays at the edge, so no crate below it names axum (or the HTTP middleware
//! crates) as a dependency.

use std::process::Command;

use serde_json::Value;

/// Crates below the HTTP edge. Each crate split out of `platform/` that serves no HTTP joins
/// this list (issue 27).
const BELOW_THE_EDGE: [&str; 6] = [
    "petstore-domain",
    "petstore-settings",
    "petstore-telemetry",
    "petstore-event-store",
    "petstore-saga",
    "petstore-security",
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
    for name in BELOW_THE_EDGE {
        let package = packages
            .iter()
            .find(|package| package["name"] == name)
            .unwrap_or_else(|| panic!("{name} is a workspace member"));
        let http: Vec<&str> = package["dependencies"]
            .as_array()
            .expect("dependencies")
            .iter()
            .filter(|dependency| dependency["kind"].is_null())
            .filter_map(|dependency| dependency["name"].as_str())
            .filter(|dependency| HTTP_CRATES.contains(dependency))
            .collect();
        assert!(http.is_empty(), "{name} depends on {http:?}");
    }
}
