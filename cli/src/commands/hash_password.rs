//! `petstore hash-password`: read a password on standard input and print its Argon2id hash,
//! for the `security.users` list of a config file.

use std::io::Write;

use anyhow::Context;

/// Reads the password and prints its hash.
pub fn run() -> anyhow::Result<()> {
    let mut password = String::new();
    std::io::stdin()
        .read_line(&mut password)
        .context("reading the password from standard input")?;
    let password = password.trim_end_matches(['\n', '\r']);
    anyhow::ensure!(!password.is_empty(), "the password is empty");
    let hash = petstore_security::auth::login::hash_password(password)
        .map_err(|error| anyhow::anyhow!("hashing failed: {error}"))?;
    writeln!(std::io::stdout().lock(), "{hash}")?;
    Ok(())
}
