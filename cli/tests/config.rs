//! `petstore config check`: validates the shipped configuration without starting anything,
//! with exit codes and the refused key named.

use std::process::{Command, Output};

fn check(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_petstore"));
    command
        .args([
            "--config-dir",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../config"),
            "config",
            "check",
        ])
        .args(args)
        .env_remove("PETSTORE_ENV")
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env_remove("KAFKA_BROKERS");
    for (name, _) in std::env::vars() {
        if name.starts_with("PETSTORE__") {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().copied());
    command.output().expect("the binary runs")
}

#[test]
fn config_check_validates_each_environment_and_redacts_secrets() {
    let local = check(&[], &[]);
    let stdout = String::from_utf8_lossy(&local.stdout);
    assert!(
        local.status.success(),
        "{}",
        String::from_utf8_lossy(&local.stderr)
    );
    assert!(stdout.contains("environment local is valid"), "{stdout}");
    assert!(stdout.contains("REDACTED"), "the secret is shown redacted");
    assert!(
        !stdout.contains("local-development-secret"),
        "no secret in the output"
    );
    assert!(
        !stdout.contains("$argon2"),
        "no password hash in the output"
    );

    let misspelt = check(&["--env", "prod"], &[]);
    assert_eq!(misspelt.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&misspelt.stderr);
    assert!(
        stderr.contains("PETSTORE_ENV") && stderr.contains("prod.yaml"),
        "{stderr}"
    );

    let no_secret = check(&["--env", "production"], &[]);
    assert_eq!(no_secret.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&no_secret.stderr).contains("security.jwt.secret"));

    let secret = "a-production-secret-of-at-least-32-bytes";
    let production = check(
        &[],
        &[
            ("PETSTORE_ENV", "production"),
            ("PETSTORE__SECURITY__JWT__SECRET", secret),
        ],
    );
    assert!(
        production.status.success(),
        "{}",
        String::from_utf8_lossy(&production.stderr)
    );
    assert!(!String::from_utf8_lossy(&production.stdout).contains(secret));

    let out_of_range = check(&[], &[("PETSTORE__PROVIDERS__DELIVERY__FAILURE_RATE", "2")]);
    assert_eq!(out_of_range.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out_of_range.stderr).contains("providers.delivery.failure_rate")
    );
}
