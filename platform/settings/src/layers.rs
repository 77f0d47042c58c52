//! Where settings come from: the config folder, the layers in order (compiled defaults,
//! `base.yaml`, the environment's file or the built-in local layer, the variables), and which
//! layer set each key.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Yaml};
use figment::Figment;

use super::provenance::{self, KeySource};
use super::{development_secret, Environment, ResilienceSettings, Settings, SettingsError};

impl Settings {
    /// Reads the layers from `config_dir` (none: compiled defaults and the built-in `local`
    /// layer only) and the process environment, for the environment `PETSTORE_ENV` names
    /// (`local` when unset).
    pub fn load(config_dir: Option<&Path>) -> Result<Self, SettingsError> {
        Self::load_for(config_dir, None)
    }

    /// As [`Self::load`], for `environment` when given (over `PETSTORE_ENV`). A named
    /// environment must have its file, `{config_dir}/{environment}.yaml`: a misspelt name
    /// never starts on compiled defaults. Only the unnamed default, `local`, may lack one.
    pub fn load_for(
        config_dir: Option<&Path>,
        environment: Option<&str>,
    ) -> Result<Self, SettingsError> {
        let (figment, environment) = Self::layers(config_dir, environment)?;
        let mut settings: Self = figment
            .extract()
            .map_err(|error| SettingsError::Read(Box::new(error)))?;
        settings.environment = Environment(environment);
        settings.config_dir = config_dir.map(Path::to_owned);
        settings.validate()?;
        Ok(settings)
    }

    /// Every layer, in order, for `environment` (over `PETSTORE_ENV`, default `local`): the
    /// figment that [`Self::load_for`] extracts, and the environment's name.
    fn layers(
        config_dir: Option<&Path>,
        environment: Option<&str>,
    ) -> Result<(Figment, String), SettingsError> {
        let named = environment
            .map(str::to_owned)
            .or_else(|| std::env::var("PETSTORE_ENV").ok());
        let environment = named.clone().unwrap_or_else(|| "local".to_owned());
        let well_formed = !environment.is_empty()
            && environment
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !well_formed {
            return Err(SettingsError::invalid(
                "PETSTORE_ENV",
                format!("{environment:?} is not an environment name (a-z, 0-9, -)"),
            ));
        }
        // `local` has its built-in layer; any other named environment needs its file.
        if named.is_some() && environment != "local" {
            let Some(dir) = config_dir else {
                return Err(SettingsError::invalid(
                    "PETSTORE_ENV",
                    format!(
                        "environment {environment:?} needs its file {environment}.yaml, and no \
                         configuration folder is in use (./config does not exist here): pass \
                         --config-dir or set PETSTORE_CONFIG_DIR"
                    ),
                ));
            };
            let file = dir.join(format!("{environment}.yaml"));
            if !file.is_file() {
                return Err(SettingsError::invalid(
                    "PETSTORE_ENV",
                    format!(
                        "unknown environment {environment:?}: {} does not exist (environments there: {})",
                        file.display(),
                        Self::environments(dir).join(", ")
                    ),
                ));
            }
        }
        let figment = Self::figment(config_dir, &environment)
            .merge(Env::prefixed("PETSTORE__").split("__"))
            .merge(
                Env::raw()
                    .only(&["DATABASE_URL", "KAFKA_BROKERS", "REDIS_URL"])
                    .map(|key| {
                        // `only` matches case-insensitively and keeps the name as written.
                        match key.as_str().to_ascii_lowercase().as_str() {
                            "database_url" => "database.url".into(),
                            "kafka_brokers" => "kafka.brokers".into(),
                            _ => "redis.url".into(),
                        }
                    }),
            );
        Ok((figment, environment))
    }

    /// The environment read for, and each key of its effective settings (secrets redacted)
    /// with the layer it came from, in key order: what `petstore config check` prints.
    pub fn provenance(
        config_dir: Option<&Path>,
        environment: Option<&str>,
    ) -> Result<(Environment, Vec<KeySource>), SettingsError> {
        let settings = Self::load_for(config_dir, environment)?;
        let (figment, _) = Self::layers(config_dir, environment)?;
        let tree = serde_json::to_value(&settings)
            .map_err(|error| SettingsError::invalid("settings", error.to_string()))?;
        let mut keys = Vec::new();
        provenance::collect(&figment, "", &tree, &mut keys);
        if let Some(key) = keys
            .iter_mut()
            .find(|key| key.key == "security.jwt.secret" && key.value.is_null())
        {
            if settings.environment.is_local() {
                key.layer = format!(
                    "generated at the first start, kept in {}",
                    development_secret::path(&settings.storage.data_dir).display()
                );
            }
        }
        Ok((settings.environment, keys))
    }

    /// The environments `config_dir` has a file for.
    pub fn environments(config_dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(config_dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let name = entry
                    .file_name()
                    .to_str()?
                    .strip_suffix(".yaml")?
                    .to_owned();
                (name != "base").then_some(name)
            })
            .collect();
        names.sort();
        names
    }

    /// The file layers only: compiled defaults, `{config_dir}/base.yaml`, then
    /// `{config_dir}/{environment}.yaml`; for `local` without that file, the built-in local
    /// layer (the demo users, text logs), so the unnamed default runs anywhere.
    pub fn figment(config_dir: Option<&Path>, environment: &str) -> Figment {
        // Each dependency's policy has defaults of its own: layered under the files, so a
        // file or variable naming one key of `resilience.redis` keeps Redis's defaults for
        // the rest (a struct default would bring the providers').
        let mut figment = Figment::new().merge(Serialized::default(
            "resilience",
            ResilienceSettings::default(),
        ));
        // Exact paths: a relative folder is not looked for in the parent folders.
        let file = match config_dir {
            Some(dir) => {
                figment = figment.merge(Yaml::file_exact(dir.join("base.yaml")));
                Some(dir.join(format!("{environment}.yaml"))).filter(|file| file.is_file())
            }
            None => None,
        };
        match file {
            Some(file) => figment.merge(Yaml::file_exact(file)),
            None if environment == "local" => figment.merge(provenance::BuiltInLocal),
            None => figment,
        }
    }
}

/// Where the configuration files are read from: `explicit` (`--config-dir`,
/// `PETSTORE_CONFIG_DIR`), which must be a folder, else `./config` when it is one, else none
/// (compiled defaults and, for `local`, the built-in local layer).
pub fn config_dir(explicit: Option<PathBuf>) -> Result<Option<PathBuf>, SettingsError> {
    match explicit {
        Some(dir) if dir.is_dir() => Ok(Some(dir)),
        Some(dir) => Err(SettingsError::invalid(
            "--config-dir",
            format!("{} is not a folder", dir.display()),
        )),
        None => {
            let default = PathBuf::from("config");
            Ok(default.is_dir().then_some(default))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DependencyPolicy, FlagSetting};

    #[test]
    fn defaults_need_no_file() {
        let settings: Settings = Settings::figment(None, "local")
            .extract()
            .expect("defaults are complete");
        assert_eq!(settings.http.listen.port(), 8080);
        assert!(settings.database.url.is_none());
    }

    #[test]
    #[expect(
        clippy::result_large_err,
        reason = "figment::Jail's closures return figment::Error"
    )]
    fn a_policy_key_given_alone_keeps_its_dependencys_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "base.yaml",
                "security:\n  jwt:\n    secret: a-secret-of-thirty-two-bytes-or-more\n\
                 resilience:\n  redis:\n    max_attempts: 2\n",
            )?;
            jail.set_env("PETSTORE__RESILIENCE__OIDC__BREAKER__OPEN_MS", "1000");
            let settings = Settings::load(Some(jail.directory())).expect("valid");
            let redis = &settings.resilience.redis;
            assert_eq!(redis.max_attempts, 2);
            assert_eq!(
                DependencyPolicy {
                    max_attempts: 2,
                    ..DependencyPolicy::redis()
                },
                *redis,
                "the rest is Redis's defaults, not the providers'"
            );
            assert_eq!(settings.resilience.oidc.breaker.open_ms, 1_000);
            assert_eq!(settings.resilience.oidc.breaker.minimum_calls, 3);
            assert_eq!(settings.resilience.kafka, DependencyPolicy::kafka());
            jail.set_env("PETSTORE__RESILIENCE__KAFKA__ATTEMPT_TIMEOUT_MS", "5000");
            let message = match Settings::load(Some(jail.directory())) {
                Ok(_) => panic!("an attempt shorter than the producer's delivery is refused"),
                Err(error) => error.to_string(),
            };
            assert!(
                message.contains("resilience.kafka.attempt_timeout_ms")
                    && message.contains("kafka.message_timeout_ms"),
                "{message}"
            );
            Ok(())
        });
    }

    #[test]
    #[expect(
        clippy::result_large_err,
        reason = "figment::Jail's closures return figment::Error"
    )]
    fn an_unknown_or_fileless_environment_and_out_of_range_values_are_refused_by_name() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "base.yaml",
                "security:\n  jwt:\n    secret: a-secret-of-thirty-two-bytes-or-more\n",
            )?;
            jail.create_file("production.yaml", "log:\n  format: json\n")?;
            let error = |result: Result<Settings, SettingsError>| match result {
                Ok(_) => panic!("refused expected"),
                Err(error) => error.to_string(),
            };
            let message = error(Settings::load_for(Some(jail.directory()), Some("prod")));
            assert!(
                message.contains("PETSTORE_ENV") && message.contains("prod.yaml"),
                "{message}"
            );
            assert!(
                message.contains("production"),
                "names what exists: {message}"
            );
            assert!(
                error(Settings::load_for(Some(jail.directory()), Some("../etc")))
                    .contains("PETSTORE_ENV")
            );
            jail.set_env("PETSTORE_ENV", "staging");
            assert!(error(Settings::load(Some(jail.directory()))).contains("staging.yaml"));
            jail.set_env("PETSTORE_ENV", "production");
            let settings = Settings::load(Some(jail.directory())).expect("production has its file");
            assert_eq!(settings.environment.to_string(), "production");
            for (variable, value, key) in [
                (
                    "PETSTORE__PROVIDERS__PAYMENT__FAILURE_RATE",
                    "1.5",
                    "providers.payment.failure_rate",
                ),
                ("PETSTORE__KAFKA__PARTITIONS", "0", "kafka.partitions"),
                (
                    "PETSTORE__SAGA__PAYMENT_TIMEOUT_MS",
                    "0",
                    "saga.payment_timeout_ms",
                ),
                ("PETSTORE__LOG__FILTER", "info,[", "log.filter"),
                ("PETSTORE__SAGA__RUNNER_ID", "node 1", "saga.runner_id"),
                (
                    "PETSTORE__PROVIDERS__PAYMENT__URL",
                    "ftp://127.0.0.1/",
                    "providers.payment.url",
                ),
                (
                    "PETSTORE__PROVIDERS__DELIVERY__URL",
                    "not a url",
                    "providers.delivery.url",
                ),
            ] {
                jail.set_env(variable, value);
                let message = error(Settings::load(Some(jail.directory())));
                assert!(message.contains(key), "{variable}={value}: {message}");
                jail.clear_env();
                jail.set_env("PETSTORE_ENV", "production");
            }
            Ok(())
        });
    }

    #[test]
    fn every_shipped_config_file_is_valid() {
        let config_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config");
        for environment in ["local", "staging", "production"] {
            let settings: Settings = Settings::figment(Some(&config_dir), environment)
                .extract()
                .unwrap_or_else(|error| panic!("config/{environment}.yaml: {error}"));
            assert_eq!(settings.http.listen.port(), 8080);
        }
    }

    #[test]
    #[expect(
        clippy::result_large_err,
        reason = "figment::Jail's closures return figment::Error"
    )]
    fn the_conventional_variables_and_prefixed_ones_override_the_files() {
        use secrecy::ExposeSecret;
        figment::Jail::expect_with(|jail| {
            jail.create_file("base.yaml", "http:\n  listen: 127.0.0.1:9000\n")?;
            jail.set_env("DATABASE_URL", "postgres://db.invalid/petstore");
            jail.set_env("KAFKA_BROKERS", "127.0.0.1:19092");
            jail.set_env("REDIS_URL", "redis://127.0.0.1:16379/0");
            jail.set_env("PETSTORE__HTTP__LISTEN", "127.0.0.1:9001");
            jail.set_env("PETSTORE__FEATURE_FLAGS__EXPRESS_ORDER_PROCESSING", "false");
            jail.set_env(
                "PETSTORE__FEATURE_FLAGS__PET_PERSONALIZATION__ROLLOUT_PERCENTAGE",
                "25",
            );
            jail.set_env(
                "PETSTORE__SECURITY__JWT__SECRET",
                "a-secret-of-thirty-two-bytes-or-more",
            );
            let settings = Settings::load(Some(jail.directory())).expect("valid");
            assert_eq!(
                settings
                    .database
                    .url
                    .as_ref()
                    .map(|url| url.expose_secret().to_owned()),
                Some("postgres://db.invalid/petstore".to_owned())
            );
            assert_eq!(settings.kafka.brokers.as_deref(), Some("127.0.0.1:19092"));
            assert_eq!(
                settings
                    .redis
                    .url
                    .as_ref()
                    .map(|url| url.expose_secret().to_owned()),
                Some("redis://127.0.0.1:16379/0".to_owned())
            );
            assert_eq!(settings.http.listen.port(), 9001);
            assert_eq!(
                settings.feature_flags.express_order_processing,
                FlagSetting::Off
            );
            assert_eq!(
                settings.feature_flags.pet_personalization,
                FlagSetting::Rollout { percentage: 25.0 }
            );
            Ok(())
        });
    }

    #[test]
    #[expect(
        clippy::result_large_err,
        reason = "figment::Jail's closures return figment::Error"
    )]
    fn each_key_names_the_layer_it_came_from() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("base.yaml", "http:\n  body_limit_bytes: 1000\n")?;
            jail.set_env("PETSTORE__HTTP__LISTEN", "127.0.0.1:9001");
            jail.set_env("REDIS_URL", "redis://127.0.0.1:16379/0");
            let (_, keys) = Settings::provenance(Some(jail.directory()), None).expect("valid");
            let layer = |key: &str| {
                keys.iter()
                    .find(|entry| entry.key == key)
                    .unwrap_or_else(|| panic!("{key} is listed"))
                    .layer
                    .clone()
            };
            assert!(layer("http.body_limit_bytes").ends_with("base.yaml"));
            assert_eq!(
                layer("http.listen"),
                "environment variable PETSTORE__HTTP__LISTEN"
            );
            assert_eq!(layer("redis.url"), "environment variable REDIS_URL");
            assert_eq!(layer("kafka.topic_prefix"), "compiled default");
            // No local.yaml in the folder: the built-in local layer has the demo users.
            assert!(layer("security.users").starts_with("built-in local"));
            assert!(layer("security.jwt.secret").contains("jwt-secret"));
            assert!(layer("security.rate_limits.routes") == "compiled default");
            let users = keys
                .iter()
                .find(|entry| entry.key == "security.users")
                .expect("users");
            assert_eq!(users.value[0]["password_hash"], "[REDACTED]");
            let redis = keys
                .iter()
                .find(|entry| entry.key == "redis.url")
                .expect("url");
            assert_eq!(redis.value, "[REDACTED]");
            Ok(())
        });
    }

    #[test]
    fn without_a_folder_local_runs_on_built_in_settings_and_a_named_one_is_refused() {
        let settings = Settings::load_for(None, Some("local")).expect("local needs no file");
        assert_eq!(settings.security.users.len(), 2, "the demo users");
        assert!(settings.security.jwt.secret.is_none(), "made at start-up");
        let error = Settings::load_for(None, Some("staging"))
            .expect_err("staging needs its file")
            .to_string();
        assert!(
            error.contains("staging") && error.contains("PETSTORE_CONFIG_DIR"),
            "{error}"
        );
    }
}
