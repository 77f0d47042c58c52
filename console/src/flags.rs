//! The feature flags and the circuit breakers: turning a flag on or off (the form carries
//! the settings' version it was rendered at, so a toggle made on a stale page is refused
//! with who changed them since), and forcing this process's breakers.

use askama::Template;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Form;
use petstore_event_store::metadata::EventMetadata;
use petstore_event_store::operator::{ActionKind, OperatorActed};
use petstore_live_settings::LiveSettingsError;
use petstore_resilience::Mode;
use petstore_settings::{Flag, FlagSetting};
use petstore_web::{Path, Problem, Query, RequestContext};
use serde::Deserialize;
use serde_json::json;

use crate::actions::{may_write, record, see};
use crate::session::Session;
use crate::{html, ConsoleState, Frame};

/// What was just done.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Done {
    #[serde(default)]
    done: Option<String>,
}

struct FlagRow {
    key: &'static str,
    setting: String,
    on: bool,
}

struct BreakerRow {
    name: &'static str,
    state: String,
    mode: &'static str,
    calls: usize,
    failures: usize,
    retry_after: String,
    in_flight: usize,
}

#[derive(Template)]
#[template(path = "flags.html")]
struct FlagsPage {
    frame: Frame,
    version: u64,
    updated: String,
    flags: Vec<FlagRow>,
    breakers: Vec<BreakerRow>,
    modes: [&'static str; 3],
    writable: bool,
    notice: Option<String>,
    conflict: Option<String>,
}

fn setting_text(setting: FlagSetting) -> String {
    match setting {
        FlagSetting::On => "on".to_owned(),
        FlagSetting::Off => "off".to_owned(),
        FlagSetting::Rollout { percentage } => format!("on for {percentage}% of subjects"),
    }
}

async fn render(
    state: &ConsoleState,
    session: &Session,
    notice: Option<String>,
    conflict: Option<String>,
) -> Response {
    let snapshot = state.live.current();
    let flags = Flag::ALL
        .into_iter()
        .map(|flag| {
            let setting = snapshot.settings.feature_flags.get(flag);
            FlagRow {
                key: flag.key(),
                on: setting != FlagSetting::Off,
                setting: setting_text(setting),
            }
        })
        .collect();
    let mut breakers = Vec::new();
    for policy in state.policies.all() {
        let status = policy.status().await;
        breakers.push(BreakerRow {
            name: policy.name(),
            state: status.state.clone(),
            mode: status.mode.as_str(),
            calls: status.calls,
            failures: status.failures,
            retry_after: status
                .retry_after_ms
                .map(|millis| format!("{:.1} s", millis as f64 / 1000.0))
                .unwrap_or_default(),
            in_flight: status.in_flight,
        });
    }
    let updated = match (&snapshot.updated_by, &snapshot.updated_at) {
        (Some(by), Some(at)) => format!("by {by} at {at}"),
        _ => "never changed since the files".to_owned(),
    };
    html(&FlagsPage {
        frame: session.frame("Flags and breakers"),
        version: snapshot.version,
        updated,
        flags,
        breakers,
        modes: ["automatic", "forced_open", "forced_closed"],
        writable: !state.settings.read_only,
        notice,
        conflict,
    })
}

/// `GET /petstore-domain/console/flags`.
pub(crate) async fn page(
    State(state): State<ConsoleState>,
    session: Session,
    Query(done): Query<Done>,
) -> Response {
    let notice = match done.done.as_deref() {
        Some("flag") => Some("The flag was changed in every process.".to_owned()),
        Some("breaker") => Some("The breaker was set in this process.".to_owned()),
        _ => None,
    };
    render(&state, &session, notice, None).await
}

/// The toggle form.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Toggle {
    csrf: String,
    on: bool,
    version: u64,
}

/// `POST /petstore-domain/console/flags/{flag}`: on or off for everyone, at the version
/// the page showed (412 and who changed it since, when it moved on).
pub(crate) async fn toggle(
    State(state): State<ConsoleState>,
    session: Session,
    headers: HeaderMap,
    Path(key): Path<String>,
    Form(form): Form<Toggle>,
) -> Result<Response, Problem> {
    may_write(&state, &headers, &form.csrf)?;
    let Some(flag) = Flag::ALL.into_iter().find(|flag| flag.key() == key) else {
        return Err(Problem::not_found(format!("there is no flag {key:?}")));
    };
    let before = state.live.current().settings.feature_flags.get(flag);
    let patch = json!({"feature_flags": {flag.key(): form.on}});
    let metadata = EventMetadata::new(RequestContext::correlation_id(), session.subject());
    let changed = state
        .live
        .change(
            patch.clone(),
            Some(form.version),
            Some("set in the console".to_owned()),
            &metadata,
        )
        .await
        .map_err(|error| Problem::internal(&error))?;
    match changed {
        Ok(snapshot) => {
            record(
                &state,
                session.subject(),
                OperatorActed {
                    action: ActionKind::FlagSet,
                    target: format!("flag {}", flag.key()),
                    order_id: None,
                    parameters: json!({"on": form.on, "version": form.version}),
                    before: serde_json::to_value(before).unwrap_or_default(),
                    after: serde_json::to_value(snapshot.settings.feature_flags.get(flag))
                        .unwrap_or_default(),
                },
            )
            .await?;
            Ok(see("/petstore-domain/console/flags?done=flag"))
        }
        Err(LiveSettingsError::StaleVersion { .. }) => {
            let now = state.live.current();
            let conflict = format!(
                "Nothing changed: the settings moved on since this page was shown (version {} \
                 then, {} now, changed by {} at {}). Here they are as they stand; toggle again \
                 if you still mean to.",
                form.version,
                now.version,
                now.updated_by.as_deref().unwrap_or("someone"),
                now.updated_at.as_deref().unwrap_or("an unknown time"),
            );
            let mut page = render(&state, &session, None, Some(conflict)).await;
            *page.status_mut() = StatusCode::PRECONDITION_FAILED;
            Ok(page)
        }
        Err(error @ LiveSettingsError::Invalid(_)) => Err(Problem::validation(error.to_string())),
    }
}

/// The breaker form.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Force {
    csrf: String,
    mode: Mode,
}

/// `POST /petstore-domain/console/breakers/{dependency}`: force this process's breaker open
/// or closed, or back to automatic.
pub(crate) async fn force(
    State(state): State<ConsoleState>,
    session: Session,
    headers: HeaderMap,
    Path(dependency): Path<String>,
    Form(form): Form<Force>,
) -> Result<Response, Problem> {
    may_write(&state, &headers, &form.csrf)?;
    let Some(policy) = state.policies.get(&dependency) else {
        return Err(Problem::not_found(format!(
            "there is no circuit breaker {dependency:?}"
        )));
    };
    let before = policy.status().await;
    policy.set_mode(form.mode).await;
    let after = policy.status().await;
    record(
        &state,
        session.subject(),
        OperatorActed {
            action: ActionKind::BreakerForced,
            target: format!("breaker {dependency}"),
            order_id: None,
            parameters: json!({"mode": form.mode.as_str()}),
            before: json!({"mode": before.mode.as_str(), "state": before.state}),
            after: json!({"mode": after.mode.as_str(), "state": after.state}),
        },
    )
    .await?;
    Ok(see("/petstore-domain/console/flags?done=breaker"))
}
