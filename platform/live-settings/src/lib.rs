//! Live settings: the part of the configuration that may change while the service runs
//! ([`LiveSettings`]), kept as events of one aggregate (`LiveSettings`/`live`) in the event
//! store, so a change is durable, audited (who, what, old and new value, when, why) and
//! reaches every process sharing the store.
//!
//! Each process folds the aggregate into a [`LiveSnapshot`] it publishes on a watch channel;
//! every consumer (rate limits, the log filter, the simulated providers, the saga, the flag
//! checks) reads the latest snapshot when it decides. A process learns of other processes'
//! changes by asking the store for a newer version every `live_settings.poll_interval_ms`
//! (250 ms by default: every instance converges on the same version well within a second),
//! and of its own at once.
//!
//! The version is the aggregate's sequence number: 0 before any change (the settings are
//! then the configuration files as this process read them). A change is made through
//! [`Live::change`] (the admin API, with an optional expected version for `If-Match`) or by
//! editing the live keys of a configuration file: the folder is watched (editors save by
//! rename), and the keys that differ from the file as last recorded are applied as a change
//! by `file`. A file edited while the service was down is recorded the same way at start-up.
//!
//! # Layout
//! - [`LiveConfiguration`]: the aggregate; [`LiveCommand`], [`LiveEvent`].
//! - [`Live`]: the process's view, its refresh loop and the file watch.
//! - `apply`: keeping the rate limits and the log filter in step with the versions.
//!
//! Owns the live settings and their history; must not know HTTP (the admin routes are
//! `petstore-admin-api`'s, and a request records the flags it was served with itself).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, AggregateError, DomainEvent};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use petstore_event_store::metadata::MissingMetadata;
use petstore_event_store::store::{EventMetadata, EventStore};
use petstore_event_store::stream::{self, RecordedEvent};
use petstore_resilience::Policies;
use petstore_settings::{
    Flag, LiveReloadSettings, LiveSettings, SettingChange, Settings, SettingsError,
};
use petstore_telemetry::metrics::{FlagLabels, Metrics};
use petstore_telemetry::CorrelationId;

mod apply;

/// The aggregate type of the live settings.
pub const AGGREGATE_TYPE: &str = "LiveSettings";

/// The id of the one live-settings aggregate.
pub const AGGREGATE_ID: &str = "live";

/// The subject recorded for changes read from a configuration file.
pub const FILE_SUBJECT: &str = "file";

/// Who made a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ChangeSource {
    /// `PUT /petstore-domain/admin/config`.
    Api,
    /// An edit of a configuration file.
    File,
}

/// A change of the live settings, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveSettingsChanged {
    /// Where it came from.
    pub source: ChangeSource,
    /// Why, when the author said (`X-Change-Reason`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What changed, key by key.
    pub changes: Vec<SettingChange>,
    /// Every live setting after the change.
    pub settings: LiveSettings,
    /// The live keys of the configuration files as last recorded (a later file edit is the
    /// difference to these).
    pub file: LiveSettings,
}

/// Events of the live settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LiveEvent {
    /// The settings changed.
    LiveSettingsChanged(LiveSettingsChanged),
}

impl DomainEvent for LiveEvent {
    fn event_type(&self) -> String {
        "LiveSettingsChanged".to_owned()
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

/// Commands of the live settings.
#[derive(Debug, Clone)]
pub enum LiveCommand {
    /// Merge `patch` (a partial settings document) into the settings.
    Change {
        /// The partial document.
        patch: Value,
        /// This process's file settings: what version 0 is.
        defaults: Box<LiveSettings>,
        /// Refuse unless the settings are at this version (`If-Match`).
        expected_version: Option<u64>,
        /// Why.
        reason: Option<String>,
    },
    /// The configuration files now read `file`; this process read `previous` before.
    ApplyFile {
        /// The live keys as this process read them before.
        previous: Box<LiveSettings>,
        /// The live keys as the files read now.
        file: Box<LiveSettings>,
    },
}

/// A change was refused.
#[derive(Debug, thiserror::Error)]
pub enum LiveSettingsError {
    /// A key is unknown or a value refused: 422, nothing changed.
    #[error(transparent)]
    Invalid(#[from] SettingsError),
    /// `If-Match` named another version: 412, nothing changed.
    #[error("the settings are at version {current}, not {expected}")]
    StaleVersion {
        /// The version the caller expected.
        expected: u64,
        /// The version in force.
        current: u64,
    },
}

/// The live settings, folded from their events.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LiveConfiguration {
    version: u64,
    settings: Option<LiveSettings>,
    file: Option<LiveSettings>,
}

impl LiveConfiguration {
    fn decide(&self, command: LiveCommand) -> Result<Option<LiveEvent>, LiveSettingsError> {
        let changed = match command {
            LiveCommand::Change {
                patch,
                defaults,
                expected_version,
                reason,
            } => {
                if let Some(expected) = expected_version.filter(|v| *v != self.version) {
                    return Err(LiveSettingsError::StaleVersion {
                        expected,
                        current: self.version,
                    });
                }
                let current = self.settings.clone().unwrap_or_else(|| (*defaults).clone());
                let next = current.patched(&patch)?;
                let changes = current.changes_to(&next);
                if changes.is_empty() {
                    return Ok(None);
                }
                LiveSettingsChanged {
                    source: ChangeSource::Api,
                    reason,
                    changes,
                    settings: next,
                    file: self.file.clone().unwrap_or(*defaults),
                }
            }
            LiveCommand::ApplyFile { previous, file } => {
                let (previous, file) = (*previous, *file);
                let recorded = self.file.clone().unwrap_or_else(|| previous.clone());
                let edits = recorded.changes_to(&file);
                if edits.is_empty() {
                    return Ok(None);
                }
                let current = self.settings.clone().unwrap_or(previous);
                let next = current.with_changes(&edits)?;
                let before = current.to_value();
                let changes = edits
                    .into_iter()
                    .map(|edit| SettingChange {
                        old: value_at(&before, &edit.key),
                        ..edit
                    })
                    .collect();
                LiveSettingsChanged {
                    source: ChangeSource::File,
                    reason: Some("configuration file edited".to_owned()),
                    changes,
                    settings: next,
                    file,
                }
            }
        };
        Ok(Some(LiveEvent::LiveSettingsChanged(changed)))
    }
}

/// The value at a dotted key of a settings document (`null` when absent).
fn value_at(document: &Value, key: &str) -> Value {
    let mut slot = document;
    let mut rest = key;
    while !rest.is_empty() {
        let Value::Object(map) = slot else {
            return Value::Null;
        };
        // The longest prefix that is a key: route keys may hold dots.
        let Some((name, next)) = map
            .keys()
            .filter(|name| {
                rest == name.as_str()
                    || rest
                        .strip_prefix(name.as_str())
                        .is_some_and(|tail| tail.starts_with('.'))
            })
            .max_by_key(|name| name.len())
            .and_then(|name| Some((name, map.get(name)?)))
        else {
            return Value::Null;
        };
        rest = rest[name.len()..].trim_start_matches('.');
        slot = next;
    }
    slot.clone()
}

impl Aggregate for LiveConfiguration {
    const TYPE: &'static str = AGGREGATE_TYPE;
    type Command = LiveCommand;
    type Event = LiveEvent;
    type Error = LiveSettingsError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        if let Some(event) = self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        let LiveEvent::LiveSettingsChanged(changed) = event;
        self.version += 1;
        self.settings = Some(changed.settings);
        self.file = Some(changed.file);
    }
}

/// The live settings in force in this process.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LiveSnapshot {
    /// 0 before any change; then the number of changes.
    pub version: u64,
    /// The settings.
    pub settings: LiveSettings,
    /// When the version was made (RFC 3339); absent for version 0.
    pub updated_at: Option<String>,
    /// Who made it; absent for version 0.
    pub updated_by: Option<String>,
}

impl LiveSnapshot {
    /// Whether `flag` is on for `subject` (a rollout buckets by it).
    pub fn flag(&self, flag: Flag, subject: &str) -> bool {
        self.settings
            .feature_flags
            .get(flag)
            .is_on_for(flag, subject)
    }
}

/// One entry of the change history.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HistoryEntry {
    /// The version the change made.
    pub version: u64,
    /// When (RFC 3339).
    pub changed_at: String,
    /// Who: a user's subject, or `file`.
    pub changed_by: String,
    /// `api` or `file`.
    pub source: ChangeSource,
    /// Why, when given.
    pub reason: Option<String>,
    /// The request's correlation id.
    pub correlation_id: String,
    /// What changed.
    pub changes: Vec<SettingChange>,
}

/// Reading the live settings from the store failed.
#[derive(Debug, thiserror::Error)]
pub enum LiveReadError {
    /// The stream could not be read.
    #[error(transparent)]
    Stream(#[from] stream::StreamError),
    /// A stored change cannot be decoded.
    #[error("live settings version {version} cannot be decoded: {source}")]
    Decode {
        /// The version.
        version: i64,
        /// Why.
        source: serde_json::Error,
    },
    /// The event store refused or failed an append.
    #[error("recording the live settings failed: {0}")]
    Store(String),
    /// A stored change lacks who made it or when.
    #[error("live settings version {version}: {source}")]
    Metadata {
        /// The version.
        version: i64,
        /// What it lacks.
        source: MissingMetadata,
    },
}

/// Who made the change `event` stored, when, and in which request.
fn made_by(event: &RecordedEvent) -> Result<(&str, &str, &str), LiveReadError> {
    let missing = |source| LiveReadError::Metadata {
        version: event.sequence,
        source,
    };
    let metadata = &event.metadata;
    Ok((
        metadata.timestamp().map_err(missing)?,
        metadata.subject().map_err(missing)?,
        metadata.correlation_id().map_err(missing)?,
    ))
}

/// This process's live settings: the latest version, kept current.
#[derive(Clone)]
pub struct Live {
    inner: Arc<Inner>,
}

struct Inner {
    store: EventStore,
    metrics: Metrics,
    /// The live keys of the configuration files as this process last read them.
    defaults: Mutex<LiveSettings>,
    current: watch::Sender<Arc<LiveSnapshot>>,
    /// What [`Live::apply_to`] keeps in step with the versions.
    applied: Mutex<Option<apply::Applied>>,
    reload: LiveReloadSettings,
    config: Option<(PathBuf, String)>,
}

impl Live {
    /// The live settings of `settings`' process over `store`: records an edit of the files
    /// made while no process ran, then loads the latest version.
    pub async fn start(
        store: EventStore,
        settings: &Settings,
        metrics: Metrics,
    ) -> Result<Self, LiveReadError> {
        let defaults = LiveSettings::of(settings);
        let live = Self {
            inner: Arc::new(Inner {
                store,
                metrics,
                defaults: Mutex::new(defaults.clone()),
                current: watch::Sender::new(Arc::new(LiveSnapshot {
                    version: 0,
                    settings: defaults.clone(),
                    updated_at: None,
                    updated_by: None,
                })),
                applied: Mutex::new(None),
                reload: settings.live_settings.clone(),
                config: settings
                    .config_dir
                    .clone()
                    .map(|dir| (dir, settings.environment.to_string())),
            }),
        };
        live.apply_file(defaults.clone(), defaults).await?;
        live.refresh().await?;
        Ok(live)
    }

    /// The settings in force now.
    pub fn current(&self) -> Arc<LiveSnapshot> {
        self.inner.current.borrow().clone()
    }

    /// Decides whether `flag` is on for `subject` with the settings in force, and counts it
    /// in `petstore_feature_flag_evaluations_total{flag, variant}`. A request served with it
    /// says so in its `X-Feature-Flags` header: the API records it
    /// (`RequestContext::served_flag`).
    pub fn flag(&self, flag: Flag, subject: &str) -> bool {
        let on = self.current().flag(flag, subject);
        self.inner
            .metrics
            .feature_flag_evaluations
            .get_or_create(&FlagLabels {
                flag: flag.key(),
                variant: if on { "on" } else { "off" },
            })
            .inc();
        on
    }

    /// The policies of this process's dependencies, each following its
    /// `resilience.{dependency}` live setting at each call.
    pub fn policies(&self, metrics: &Metrics) -> Policies {
        let live = self.clone();
        Policies::following(
            move |pick| pick(&live.current().settings.resilience).clone(),
            metrics,
        )
    }

    /// Follows every new version.
    pub fn subscribe(&self) -> watch::Receiver<Arc<LiveSnapshot>> {
        self.inner.current.subscribe()
    }

    fn defaults(&self) -> LiveSettings {
        match self.inner.defaults.lock() {
            Ok(defaults) => defaults.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Applies `patch` on behalf of `subject` and returns the settings in force after it
    /// (unchanged, same version, when the patch changes nothing).
    pub async fn change(
        &self,
        patch: Value,
        expected_version: Option<u64>,
        reason: Option<String>,
        metadata: &EventMetadata,
    ) -> Result<Result<Arc<LiveSnapshot>, LiveSettingsError>, LiveReadError> {
        let command = LiveCommand::Change {
            patch,
            defaults: Box::new(self.defaults()),
            expected_version,
            reason,
        };
        match self
            .inner
            .store
            .execute::<LiveConfiguration>(AGGREGATE_ID, command, &(), metadata)
            .await
        {
            Ok(_) => {}
            Err(AggregateError::UserError(refused)) => return Ok(Err(refused)),
            Err(error) => return Err(LiveReadError::Store(error.to_string())),
        }
        self.refresh().await?;
        Ok(Ok(self.current()))
    }

    async fn apply_file(
        &self,
        previous: LiveSettings,
        file: LiveSettings,
    ) -> Result<(), LiveReadError> {
        let metadata = EventMetadata::new(CorrelationId::generate(), FILE_SUBJECT);
        match self
            .inner
            .store
            .execute::<LiveConfiguration>(
                AGGREGATE_ID,
                LiveCommand::ApplyFile {
                    previous: Box::new(previous),
                    file: Box::new(file),
                },
                &(),
                &metadata,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(AggregateError::UserError(refused)) => {
                // The file was valid on its own; the merge with API changes is not.
                tracing::error!(error = %refused, "the edited configuration cannot be applied over the live changes");
                Ok(())
            }
            Err(error) => Err(LiveReadError::Store(error.to_string())),
        }
    }

    /// Loads the newest version if the store has one this process has not seen.
    pub async fn refresh(&self) -> Result<(), LiveReadError> {
        let known = self.inner.current.borrow().version;
        let newest = stream::aggregate_events_newest_first(
            self.inner.store.database(),
            AGGREGATE_TYPE,
            AGGREGATE_ID,
            i64::try_from(known).unwrap_or(i64::MAX).saturating_add(1)..i64::MAX,
            1,
        )
        .await?;
        let Some(event) = newest.into_iter().next() else {
            return Ok(());
        };
        let version = u64::try_from(event.sequence).unwrap_or(0);
        let changed = decode(&event)?;
        let (at, by, _) = made_by(&event)?;
        let snapshot = Arc::new(LiveSnapshot {
            version,
            settings: changed.settings,
            updated_at: Some(at.to_owned()),
            updated_by: Some(by.to_owned()),
        });
        self.inner.store.set_settings_version(version);
        self.inner
            .metrics
            .live_settings_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        // Another refresh may have published a newer one meanwhile.
        let published = self.inner.current.send_if_modified(|current| {
            if current.version < version {
                *current = snapshot.clone();
                true
            } else {
                false
            }
        });
        if published {
            self.apply(&snapshot);
        }
        tracing::info!(version, "live settings applied");
        Ok(())
    }

    /// The changes, newest first: at most `limit`, older than version `before` when given.
    pub async fn history(
        &self,
        limit: u32,
        before: Option<u64>,
    ) -> Result<Vec<HistoryEntry>, LiveReadError> {
        let below = before.map_or(i64::MAX, |before| i64::try_from(before).unwrap_or(i64::MAX));
        let events = stream::aggregate_events_newest_first(
            self.inner.store.database(),
            AGGREGATE_TYPE,
            AGGREGATE_ID,
            1..below,
            i64::from(limit.max(1)),
        )
        .await?;
        events
            .iter()
            .map(|event| {
                let changed = decode(event)?;
                let (at, by, correlation_id) = made_by(event)?;
                Ok(HistoryEntry {
                    version: u64::try_from(event.sequence).unwrap_or(0),
                    changed_at: at.to_owned(),
                    changed_by: by.to_owned(),
                    correlation_id: correlation_id.to_owned(),
                    source: changed.source,
                    reason: changed.reason,
                    changes: changed.changes,
                })
            })
            .collect()
    }

    /// Keeps this process current until `shutdown`: asks the store for a newer version every
    /// poll interval, and applies edits of the configuration files.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let poll = Duration::from_millis(self.inner.reload.poll_interval_ms.max(1));
        let (edited, mut edits) = mpsc::channel::<()>(1);
        // Dropping the watcher stops it: it lives as long as this loop.
        let _watcher = match (&self.inner.config, self.inner.reload.watch_files) {
            (Some((dir, environment)), true) => match watch_folder(dir, environment, edited) {
                Ok(watcher) => Some(watcher),
                Err(error) => {
                    tracing::error!(%error, dir = %dir.display(), "cannot watch the configuration folder; file edits need a restart");
                    None
                }
            },
            _ => None,
        };
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(poll) => {}
                Some(()) = edits.recv() => {
                    // Editors write in several steps: let them finish.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    while edits.try_recv().is_ok() {}
                    if let Err(error) = self.reload_files().await {
                        tracing::error!(%error, "applying the edited configuration failed");
                    }
                }
            }
            if let Err(error) = self.refresh().await {
                tracing::warn!(%error, "reading the live settings failed; retrying");
            }
        }
    }

    /// Reads the configuration files again and records what changed in their live keys.
    pub async fn reload_files(&self) -> Result<(), LiveReadError> {
        let Some((dir, environment)) = &self.inner.config else {
            return Ok(());
        };
        let named = dir
            .join(format!("{environment}.yaml"))
            .is_file()
            .then_some(environment.as_str());
        let settings = match Settings::load_for(Some(dir), named) {
            Ok(settings) => settings,
            Err(error) => {
                tracing::error!(%error, "the edited configuration is refused; the settings in force stay");
                return Ok(());
            }
        };
        let file = LiveSettings::of(&settings);
        let previous = self.defaults();
        if file == previous {
            tracing::info!("configuration file edited; no live key changed (other keys apply at the next start)");
            return Ok(());
        }
        self.apply_file(previous, file.clone()).await?;
        match self.inner.defaults.lock() {
            Ok(mut defaults) => *defaults = file,
            Err(poisoned) => *poisoned.into_inner() = file,
        }
        self.refresh().await
    }
}

fn decode(event: &RecordedEvent) -> Result<LiveSettingsChanged, LiveReadError> {
    serde_json::from_str::<LiveEvent>(event.payload.raw().get())
        .map(|LiveEvent::LiveSettingsChanged(changed)| changed)
        .map_err(|source| LiveReadError::Decode {
            version: event.sequence,
            source,
        })
}

/// Watches `dir` (not the files: editors save by writing a new file and renaming it over the
/// old one) and signals `edited` when `base.yaml` or `{environment}.yaml` changes.
fn watch_folder(
    dir: &Path,
    environment: &str,
    edited: mpsc::Sender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let names = [
        std::ffi::OsString::from("base.yaml"),
        std::ffi::OsString::from(format!("{environment}.yaml")),
    ];
    let mut watcher = notify::recommended_watcher(move |result: notify::Result<notify::Event>| {
        let Ok(event) = result else { return };
        if event.kind.is_access() {
            return;
        }
        let ours = event.paths.iter().any(|path| {
            path.file_name()
                .is_some_and(|name| names.iter().any(|wanted| wanted == name))
        });
        if ours {
            // Full means a reload is already due.
            let _ = edited.try_send(());
        }
    })?;
    watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_file_edit_changes_only_the_edited_keys_over_api_changes() {
        let defaults = LiveSettings::default();
        let mut configuration = LiveConfiguration::default();
        let apply = |configuration: &mut LiveConfiguration, command| {
            if let Some(event) = configuration.decide(command).expect("accepted") {
                configuration.apply(event);
            }
        };
        apply(
            &mut configuration,
            LiveCommand::Change {
                patch: json!({"feature_flags": {"pet_personalization": true}}),
                defaults: Box::new(defaults.clone()),
                expected_version: Some(0),
                reason: None,
            },
        );
        let mut edited = defaults.clone();
        edited.security.rate_limits.default_per_minute = 7;
        apply(
            &mut configuration,
            LiveCommand::ApplyFile {
                previous: Box::new(defaults.clone()),
                file: Box::new(edited.clone()),
            },
        );
        let settings = configuration.settings.clone().expect("changed");
        assert_eq!(configuration.version, 2);
        assert_eq!(settings.security.rate_limits.default_per_minute, 7);
        assert_eq!(
            settings.feature_flags.pet_personalization,
            petstore_settings::FlagSetting::On,
            "the API's change stays"
        );
        // The same file read again (another instance, a restart) records nothing.
        assert!(configuration
            .decide(LiveCommand::ApplyFile {
                previous: Box::new(edited.clone()),
                file: Box::new(edited),
            })
            .expect("accepted")
            .is_none());
        assert!(matches!(
            configuration.decide(LiveCommand::Change {
                patch: json!({"feature_flags": {"premium_filters": false}}),
                defaults: Box::new(defaults),
                expected_version: Some(1),
                reason: None,
            }),
            Err(LiveSettingsError::StaleVersion {
                expected: 1,
                current: 2
            })
        ));
    }

    #[test]
    fn values_are_found_by_dotted_key_even_when_a_route_holds_dots() {
        let document = json!({"security": {"rate_limits": {"routes": {"GET /v1.2/x": 5}}}});
        assert_eq!(
            value_at(&document, "security.rate_limits.routes.GET /v1.2/x"),
            json!(5)
        );
        assert_eq!(value_at(&document, "security.nothing"), Value::Null);
    }
}
