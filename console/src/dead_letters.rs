//! The dead letters: how many wait, by consumer; each with its error, attempts and when it
//! failed (its event's payload only with `console.show_payloads`); retrying or skipping one
//! or many at once.

use askama::Template;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use chrono::{TimeZone, Utc};
use petstore_event_store::dead_letters::{self, ActError, DeadLetter, DeadLetterStatus};
use petstore_event_store::operator::{ActionKind, OperatorActed};
use petstore_event_store::stream;
use petstore_web::{Problem, Query};
use serde::Deserialize;
use serde_json::json;

use crate::actions::{may_write, record, see};
use crate::session::Session;
use crate::{html, ConsoleState, Frame};

/// Dead letters a page shows at most.
const SHOWN: i64 = 200;

/// Which dead letters, and what was just done.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    done: Option<String>,
    #[serde(default)]
    count: Option<u32>,
    #[serde(default)]
    refused: Option<u32>,
}

/// A dead letter as the page shows it.
struct Row {
    id: i64,
    consumer: String,
    event: String,
    order_id: Option<String>,
    error: String,
    attempts: i64,
    status: &'static str,
    open: bool,
    failed_at: String,
    resolved_at: String,
    payload: Option<String>,
}

#[derive(Template)]
#[template(path = "dead_letters.html")]
struct DeadLettersPage {
    frame: Frame,
    statuses: Vec<(&'static str, bool)>,
    counts: Vec<(String, i64)>,
    rows: Vec<Row>,
    writable: bool,
    show_payloads: bool,
    notice: Option<String>,
}

fn time(millis: i64) -> String {
    Utc.timestamp_millis_opt(millis)
        .single()
        .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// `GET /petstore-domain/console/dead-letters`: the open ones unless `status` says
/// otherwise (`pending`, `retrying`, `resolved`, `skipped`, `all`).
pub(crate) async fn page(
    State(state): State<ConsoleState>,
    session: Session,
    Query(query): Query<ListQuery>,
) -> Result<Response, Problem> {
    let chosen = query.status.as_deref().unwrap_or("open");
    let wanted: Vec<Option<DeadLetterStatus>> = match chosen {
        "open" => vec![
            Some(DeadLetterStatus::Pending),
            Some(DeadLetterStatus::Retrying),
        ],
        "all" => vec![None],
        other => match DeadLetterStatus::parse(other) {
            Some(status) => vec![Some(status)],
            None => {
                return Err(Problem::validation(format!(
                    "status: {other:?} is not open, all, pending, retrying, resolved or skipped"
                )))
            }
        },
    };
    let mut letters: Vec<DeadLetter> = Vec::new();
    for status in wanted {
        letters.extend(
            dead_letters::list(&state.database, status, SHOWN)
                .await
                .map_err(|error| Problem::from_failure(&error))?,
        );
    }
    letters.sort_unstable_by_key(|letter| std::cmp::Reverse(letter.id));
    letters.truncate(SHOWN as usize);
    let mut rows = Vec::with_capacity(letters.len());
    for letter in letters {
        let payload = match state.settings.show_payloads {
            true => payload_of(&state, &letter).await?,
            false => None,
        };
        rows.push(Row {
            id: letter.id,
            consumer: letter.consumer.clone(),
            event: format!(
                "{} {} of {} {} (#{}, position {})",
                letter.event_type,
                letter.event_version,
                letter.aggregate_type,
                letter.aggregate_id,
                letter.sequence,
                letter.position.global_position
            ),
            order_id: letter.order_id.map(|order| order.to_string()),
            error: letter.error.clone(),
            attempts: letter.attempts,
            status: letter.status.as_str(),
            open: !letter.status.is_settled(),
            failed_at: time(letter.failed_at_ms),
            resolved_at: letter.resolved_at_ms.map(time).unwrap_or_default(),
            payload,
        });
    }
    let counts = dead_letters::open_counts(&state.database)
        .await
        .map_err(|error| Problem::from_failure(&error))?
        .into_iter()
        .collect();
    let statuses = ["open", "pending", "retrying", "resolved", "skipped", "all"]
        .into_iter()
        .map(|status| (status, status == chosen))
        .collect();
    let notice = match (query.done.as_deref(), query.count, query.refused) {
        (Some(done @ ("retry" | "skip")), Some(count), refused) => Some(format!(
            "{count} dead letter{} {}{}.",
            if count == 1 { "" } else { "s" },
            if done == "retry" {
                "asked to be handled again"
            } else {
                "skipped"
            },
            match refused {
                Some(refused) if refused > 0 => {
                    format!("; {refused} refused (unknown, or resolved or skipped already)")
                }
                _ => String::new(),
            }
        )),
        _ => None,
    };
    Ok(html(&DeadLettersPage {
        frame: session.frame("Dead letters"),
        statuses,
        counts,
        rows,
        writable: !state.settings.read_only,
        show_payloads: state.settings.show_payloads,
        notice,
    }))
}

/// The stored event a dead letter set aside, as JSON text.
async fn payload_of(state: &ConsoleState, letter: &DeadLetter) -> Result<Option<String>, Problem> {
    let events = stream::aggregate_events_newest_first(
        &state.database,
        &letter.aggregate_type,
        &letter.aggregate_id,
        letter.sequence..letter.sequence + 1,
        1,
    )
    .await
    .map_err(|error| Problem::from_failure(&error))?;
    Ok(events
        .first()
        .map(|event| event.payload.raw().get().to_owned()))
}

/// `POST /petstore-domain/console/dead-letters`: `action` (`retry` or `skip`) on every `id`
/// of the form; each one done is recorded as an operator action.
pub(crate) async fn act(
    State(state): State<ConsoleState>,
    session: Session,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(&body)
        .map_err(|error| Problem::bad_request(format!("the form cannot be read: {error}")))?;
    let field = |name: &str| {
        fields
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    };
    may_write(&state, &headers, field("csrf").unwrap_or_default())?;
    let (to, kind, done) = match field("action") {
        Some("retry") => (
            DeadLetterStatus::Retrying,
            ActionKind::DeadLetterRetried,
            "retry",
        ),
        Some("skip") => (
            DeadLetterStatus::Skipped,
            ActionKind::DeadLetterSkipped,
            "skip",
        ),
        _ => return Err(Problem::validation("action must be retry or skip")),
    };
    let mut ids = Vec::new();
    for (key, value) in &fields {
        match key.as_str() {
            "id" => ids.push(value.parse::<i64>().map_err(|_| {
                Problem::validation(format!("id: {value:?} is not a dead letter's number"))
            })?),
            "csrf" | "action" => {}
            other => return Err(Problem::validation(format!("unknown field {other:?}"))),
        }
    }
    if ids.is_empty() {
        return Err(Problem::validation("choose at least one dead letter"));
    }
    let (mut count, mut refused) = (0, 0);
    for id in ids {
        let before = dead_letters::get(&state.database, id)
            .await
            .map_err(|error| Problem::from_failure(&error))?;
        match dead_letters::act(&state.database, id, to).await {
            Ok(after) => {
                count += 1;
                record(
                    &state,
                    session.subject(),
                    OperatorActed {
                        action: kind,
                        target: format!("dead letter {id}"),
                        order_id: after.order_id,
                        parameters: json!({"id": id}),
                        before: json!({"status": before.map(|letter| letter.status.as_str())}),
                        after: json!({"status": after.status.as_str()}),
                    },
                )
                .await?;
            }
            Err(ActError::NotFound(_) | ActError::NotOpen(_)) => refused += 1,
            Err(ActError::Database(error)) => return Err(Problem::from_failure(&error)),
        }
    }
    Ok(see(&format!(
        "/petstore-domain/console/dead-letters?done={done}&count={count}&refused={refused}"
    )))
}
