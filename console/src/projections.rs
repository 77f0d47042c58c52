//! Projections and runners: where each subscriber of the stream stands (the read models,
//! Redis's views, the Kafka relay, the saga and each saga partition): its checkpoint, the
//! head, how far behind it is in events and seconds, when it last moved, whether it lags or
//! stalled, and who holds it (a projection's fencing token, a partition's runner and lease).

use askama::Template;
use axum::extract::State;
use axum::response::Response;
use chrono::{DateTime, Utc};
use petstore_event_store::database;
use petstore_event_store::leases;
use petstore_event_store::stream::{self, LAGGING_AFTER_SECONDS};
use petstore_read_models::ReadModels;
use petstore_web::Problem;

use crate::session::Session;
use crate::{html, ConsoleState, Frame};

/// A subscriber that has not moved for this long while events wait is stalled.
const STALLED_AFTER_SECONDS: i64 = 60;

struct SubscriberRow {
    name: String,
    position: i64,
    behind: i64,
    behind_seconds: String,
    moved: String,
    state: &'static str,
    holder: String,
}

struct PartitionRow {
    partition: u32,
    owner: String,
    epoch: i64,
    lease: String,
}

#[derive(Template)]
#[template(path = "projections.html")]
struct ProjectionsPage {
    frame: Frame,
    head: i64,
    subscribers: Vec<SubscriberRow>,
    partitions: Vec<PartitionRow>,
}

/// `GET /petstore-domain/console/projections`.
pub(crate) async fn page(
    State(state): State<ConsoleState>,
    session: Session,
) -> Result<Response, Problem> {
    let database = &state.database;
    let failed = |error: &(dyn std::error::Error + 'static)| Problem::from_failure(error);
    let head = stream::head_position(database)
        .await
        .map_err(|error| failed(&error))?;
    let tokens = database::fence_tokens(database)
        .await
        .map_err(|error| failed(&error))?;
    let now = Utc::now();
    let mut checkpoints = stream::checkpoints(database)
        .await
        .map_err(|error| failed(&error))?;
    // The embedded store's read models live in this process's memory, their place in its
    // snapshot rather than in a checkpoint: as they stand now.
    if let ReadModels::Memory(_) = &state.read_models {
        let position = state
            .read_models
            .position()
            .await
            .map_err(|error| failed(&error))?;
        checkpoints.push(stream::Checkpoint {
            name: "read_models (in this process)".to_owned(),
            position,
            updated_at: now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        });
        checkpoints.sort_by(|a, b| a.name.cmp(&b.name));
    }
    let mut subscribers = Vec::new();
    for checkpoint in checkpoints {
        let lag = stream::lag(database, checkpoint.position)
            .await
            .map_err(|error| failed(&error))?;
        let idle = DateTime::parse_from_rfc3339(&checkpoint.updated_at)
            .map(|moved| (now - moved.with_timezone(&Utc)).num_seconds())
            .unwrap_or(0);
        let state = if lag.events == 0 {
            "caught up"
        } else if idle >= STALLED_AFTER_SECONDS {
            "stalled"
        } else if lag.seconds >= LAGGING_AFTER_SECONDS {
            "lagging"
        } else {
            "following"
        };
        let holder = tokens
            .get(&format!("projection:{}", checkpoint.name))
            .map(|token| format!("fencing token {token}"))
            .unwrap_or_default();
        subscribers.push(SubscriberRow {
            position: checkpoint.position.global_position,
            behind: lag.events,
            behind_seconds: format!("{:.1}", lag.seconds),
            moved: checkpoint.updated_at,
            name: checkpoint.name,
            state,
            holder,
        });
    }
    let partitions = leases::states(database)
        .await
        .map_err(|error| failed(&error))?
        .into_iter()
        .map(|lease| PartitionRow {
            partition: lease.partition,
            owner: match (&lease.owner, lease.free) {
                (Some(owner), false) => owner.clone(),
                (Some(owner), true) => format!("none (last {owner})"),
                (None, _) => "none".to_owned(),
            },
            epoch: lease.epoch,
            lease: match lease.free {
                true => "free".to_owned(),
                false => format!("{:.1} s left", lease.expires_in.as_secs_f64()),
            },
        })
        .collect();
    Ok(html(&ProjectionsPage {
        frame: session.frame("Projections and runners"),
        head: head.global_position,
        subscribers,
        partitions,
    }))
}
