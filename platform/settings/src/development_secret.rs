//! The `local` environment's token secret when none is configured: generated once per data
//! folder and kept there (`{storage.data_dir}/jwt-secret`).
//!
//! Generated rather than a public constant: a secret that ships with the code would let
//! anyone who reads it sign an admin token for any local service reachable on a network.
//! Kept in the data folder, so tokens outlive a restart and processes sharing the folder
//! (split roles on one machine) accept each other's tokens.

use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use secrecy::SecretString;

use super::{Settings, SettingsError, MIN_SECRET_BYTES};

/// Where the secret of `data_dir` is kept.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("jwt-secret")
}

impl Settings {
    /// In `local` with no `security.jwt.secret`: the secret kept in the data folder, made
    /// (32 random bytes, hex) and written there (owner-only) at the first start. Returns the
    /// file when its secret was used; elsewhere, or with a secret configured, does nothing.
    pub fn ensure_development_secret(&mut self) -> Result<Option<PathBuf>, SettingsError> {
        if !self.environment.is_local() || self.security.jwt.secret.is_some() {
            return Ok(None);
        }
        let file = path(&self.storage.data_dir);
        let refused = |reason: String| SettingsError::invalid("security.jwt.secret", reason);
        std::fs::create_dir_all(&self.storage.data_dir).map_err(|error| {
            refused(format!(
                "no secret is configured and none can be kept in {}: {error}",
                self.storage.data_dir.display()
            ))
        })?;
        let secret = match create(&file) {
            Ok(secret) => secret,
            // Made by an earlier start, or by a process starting beside this one.
            Err(error) if error.kind() == ErrorKind::AlreadyExists => read(&file)?,
            Err(error) => {
                return Err(refused(format!(
                    "no secret is configured and {} cannot be written: {error}",
                    file.display()
                )))
            }
        };
        self.security.jwt.secret = Some(SecretString::from(secret));
        Ok(Some(file))
    }
}

/// Writes a new secret to `file`, which must not exist yet.
fn create(file: &Path) -> std::io::Result<String> {
    let mut bytes = [0_u8; 32];
    getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
    let secret: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    // Written to a temporary name first and linked in place, so a process starting beside
    // this one never reads a half-written secret.
    let partial = file.with_extension(format!("partial-{}", std::process::id()));
    let mut handle = options.open(&partial)?;
    handle.write_all(secret.as_bytes())?;
    handle.sync_all()?;
    let linked = std::fs::hard_link(&partial, file);
    let _ = std::fs::remove_file(&partial);
    linked.map(|()| secret)
}

/// Reads the secret an earlier start kept in `file`.
fn read(file: &Path) -> Result<String, SettingsError> {
    let secret = std::fs::read_to_string(file).map_err(|error| {
        SettingsError::invalid(
            "security.jwt.secret",
            format!("{} cannot be read: {error}", file.display()),
        )
    })?;
    let secret = secret.trim().to_owned();
    if secret.len() < MIN_SECRET_BYTES {
        return Err(SettingsError::invalid(
            "security.jwt.secret",
            format!(
                "{} holds no usable secret (under {MIN_SECRET_BYTES} bytes): delete it to have \
                 a new one made (tokens signed with the old one stop working)",
                file.display()
            ),
        ));
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::Environment;

    #[test]
    fn the_local_secret_is_made_once_per_data_folder() {
        let folder = tempfile::tempdir().expect("a temporary folder");
        let mut settings = Settings::default();
        settings.storage.data_dir = folder.path().join("data");
        let mut again = settings.clone();
        let file = settings
            .ensure_development_secret()
            .expect("made")
            .expect("used");
        assert_eq!(file, folder.path().join("data/jwt-secret"));
        again.ensure_development_secret().expect("read");
        let secret = |settings: &Settings| {
            use secrecy::ExposeSecret;
            settings
                .security
                .jwt
                .secret
                .as_ref()
                .map(|secret| secret.expose_secret().to_owned())
                .expect("a secret")
        };
        assert_eq!(secret(&settings), secret(&again), "kept and read back");
        assert_eq!(secret(&settings).len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).expect("kept").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "readable by its owner only");
        }
        let mut production = Settings {
            environment: Environment("production".to_owned()),
            ..Settings::default()
        };
        production.storage.data_dir = folder.path().join("other");
        assert_eq!(
            production.ensure_development_secret().expect("nothing"),
            None
        );
        std::fs::write(&file, "short").expect("damaged");
        let error = again_with(folder.path()).expect_err("a damaged file is refused");
        assert!(error.to_string().contains("jwt-secret"), "{error}");

        fn again_with(folder: &Path) -> Result<Option<PathBuf>, SettingsError> {
            let mut settings = Settings::default();
            settings.storage.data_dir = folder.join("data");
            settings.ensure_development_secret()
        }
    }
}
