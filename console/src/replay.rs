//! Replaying a projection from the console, with `petstore replay`'s machinery
//! ([`petstore_read_models::rebuild`]): a dry run first, which reads the whole log and counts;
//! then the rebuild, confirmed by typing the projection's name. One replay at a time per
//! process, in the background; its progress is live on the replay page (Server-Sent
//! Events), and each start is an operator action.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use askama::Template;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::Event;
use axum::response::Response;
use axum::Form;
use chrono::Utc;
use petstore_event_store::operator::{ActionKind, OperatorActed};
use petstore_event_store::stream;
use petstore_read_models::rebuild;
use petstore_web::Problem;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use crate::actions::{may_write, record, see};
use crate::session::Session;
use crate::{html, ConsoleState, Frame};

/// The projections the console replays.
pub const PROJECTIONS: [&str; 1] = ["read_models"];

/// Events a replay reads at a time (as `petstore replay`'s default).
const BATCH: u32 = 1000;

/// How often the live page hears of the progress.
const EVERY: Duration = Duration::from_millis(500);

/// This process's replay, under way or the last one.
#[derive(Clone, Default)]
pub struct Replays(Arc<Mutex<Option<Arc<Job>>>>);

/// One replay.
pub struct Job {
    projection: &'static str,
    dry_run: bool,
    by: String,
    started_at: String,
    total: u64,
    done: AtomicU64,
    outcome: Mutex<Option<Result<rebuild::ReplayReport, String>>>,
}

impl Job {
    fn outcome(&self) -> Option<Result<rebuild::ReplayReport, String>> {
        self.outcome
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn finished(&self) -> bool {
        self.outcome().is_some()
    }
}

impl Replays {
    fn current(&self) -> Option<Arc<Job>> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The replay as the page shows it.
struct Shown {
    projection: &'static str,
    mode: &'static str,
    by: String,
    started_at: String,
    done: u64,
    total: u64,
    percent: u64,
    running: bool,
    outcome: String,
    failed: bool,
}

fn shown(job: &Job) -> Shown {
    let done = job.done.load(Ordering::Relaxed);
    let outcome = job.outcome();
    Shown {
        projection: job.projection,
        mode: if job.dry_run { "dry run" } else { "replay" },
        by: job.by.clone(),
        started_at: job.started_at.clone(),
        done,
        total: job.total,
        percent: (done * 100)
            .checked_div(job.total.max(1))
            .unwrap_or(0)
            .min(100),
        running: outcome.is_none(),
        failed: matches!(outcome, Some(Err(_))),
        outcome: match outcome {
            None => String::new(),
            Some(Ok(report)) => format!(
                "{} events read, {} applied in {:.2} s{}",
                report.events,
                report.applied,
                report.elapsed.as_secs_f64(),
                if job.dry_run {
                    " (dry run: nothing written)"
                } else {
                    ": the rebuilt views are in place"
                }
            ),
            Some(Err(error)) => error,
        },
    }
}

#[derive(Template)]
#[template(path = "replay.html")]
struct ReplayPage {
    frame: Frame,
    job: Option<Shown>,
    projections: Vec<(&'static str, bool)>,
    writable: bool,
}

#[derive(Template)]
#[template(path = "replay_progress.html")]
struct Progress {
    job: Shown,
}

/// `GET /petstore-domain/console/replay`.
pub(crate) async fn page(State(state): State<ConsoleState>, session: Session) -> Response {
    let job = state.replays.current();
    let projections = PROJECTIONS
        .into_iter()
        .map(|projection| (projection, dry_run_done(job.as_deref(), projection)))
        .collect();
    html(&ReplayPage {
        frame: session.frame("Replay a projection"),
        job: job.as_deref().map(shown),
        projections,
        writable: !state.settings.read_only,
    })
}

/// Whether `job` is a finished, successful dry run of `projection`: what a replay needs.
fn dry_run_done(job: Option<&Job>, projection: &str) -> bool {
    job.is_some_and(|job| {
        job.dry_run && job.projection == projection && matches!(job.outcome(), Some(Ok(_)))
    })
}

/// The replay form.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Start {
    csrf: String,
    projection: String,
    mode: String,
    #[serde(default)]
    confirm: Option<String>,
}

/// `POST /petstore-domain/console/replay`: a dry run (`mode=dry_run`), or, after one, the
/// replay (`mode=replay`, `confirm` the projection's name).
pub(crate) async fn start(
    State(state): State<ConsoleState>,
    session: Session,
    headers: HeaderMap,
    Form(form): Form<Start>,
) -> Result<Response, Problem> {
    may_write(&state, &headers, &form.csrf)?;
    let Some(projection) = PROJECTIONS
        .into_iter()
        .find(|projection| *projection == form.projection)
    else {
        return Err(Problem::validation(format!(
            "projection: {:?} is not one the console replays ({})",
            form.projection,
            PROJECTIONS.join(", ")
        )));
    };
    let dry_run = match form.mode.as_str() {
        "dry_run" => true,
        "replay" => false,
        other => {
            return Err(Problem::validation(format!(
                "mode: {other:?} is not dry_run or replay"
            )))
        }
    };
    let total = stream::head_position(&state.database)
        .await
        .map_err(|error| Problem::from_failure(&error))?
        .global_position
        .max(0) as u64;
    let job = {
        let mut current = state
            .replays
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if current.as_ref().is_some_and(|job| !job.finished()) {
            return Err(Problem::conflict(
                "a replay is under way in this process: wait for it to finish",
            ));
        }
        if !dry_run {
            if !dry_run_done(current.as_deref(), projection) {
                return Err(Problem::conflict(format!(
                    "run a dry run of {projection} first: it says what the replay will read"
                )));
            }
            if form.confirm.as_deref().map(str::trim) != Some(projection) {
                return Err(Problem::validation(format!(
                    "type the projection's name, {projection}, to confirm the replay"
                )));
            }
        }
        let job = Arc::new(Job {
            projection,
            dry_run,
            by: session.subject().to_owned(),
            started_at: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            total,
            done: AtomicU64::new(0),
            outcome: Mutex::new(None),
        });
        *current = Some(Arc::clone(&job));
        job
    };
    record(
        &state,
        session.subject(),
        OperatorActed {
            action: ActionKind::ReplayStarted,
            target: format!("projection {projection}"),
            order_id: None,
            parameters: json!({"projection": projection, "dry_run": dry_run}),
            before: json!({"head": total}),
            after: json!({"started": true}),
        },
    )
    .await?;
    let database = state.database.clone();
    // The rebuild reports its progress through a callback that is not `Send`: it runs on a
    // blocking thread of its own, driven by this runtime.
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let progress = Arc::clone(&job);
        let result = runtime
            .block_on(rebuild::rebuild_read_models(
                &database,
                BATCH,
                dry_run,
                &mut |done| progress.done.store(done, Ordering::Relaxed),
            ))
            .map_err(|error| error.to_string());
        if let Err(error) = &result {
            tracing::warn!(%error, projection, dry_run, "a replay from the console failed");
        }
        *job.outcome.lock().unwrap_or_else(PoisonError::into_inner) = Some(result);
    });
    Ok(see("/petstore-domain/console/replay"))
}

/// `GET /petstore-domain/console/replay/live`: the replay's progress, every half second
/// while it runs, then `done`.
pub(crate) async fn live(
    State(state): State<ConsoleState>,
    session: Session,
) -> Result<Response, Problem> {
    let Some(job) = state.replays.current() else {
        return Err(Problem::not_found("no replay has run in this process"));
    };
    let slot = state.streams.acquire_or_refuse(session.subject())?;
    let (sender, receiver) = mpsc::channel(2);
    let mut pacing = crate::live::Pacing::new(&state);
    tokio::spawn(async move {
        let _slot = slot;
        loop {
            let finished = job.finished();
            let Ok(html) = (Progress { job: shown(&job) }).render() else {
                return;
            };
            let event = Event::default().event("progress").data(html);
            if !crate::live::deliver(&sender, event).await {
                return;
            }
            if finished {
                crate::live::deliver(&sender, Event::default().event("done").data("finished"))
                    .await;
                return;
            }
            if !pacing.wait(EVERY, &sender).await {
                return;
            }
        }
    });
    Ok(crate::live::respond(receiver))
}
