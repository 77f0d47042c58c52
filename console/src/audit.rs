//! What operators did through the console, newest first.

use askama::Template;
use axum::extract::State;
use axum::response::Response;
use petstore_event_store::operator;
use petstore_web::{Problem, Query};
use serde::Deserialize;

use crate::session::Session;
use crate::{html, ConsoleState, Frame};

/// Actions a page shows.
const PAGE: i64 = 50;

/// Which page.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditQuery {
    #[serde(default)]
    before: Option<i64>,
}

struct Row {
    sequence: i64,
    at: String,
    subject: String,
    action: &'static str,
    target: String,
    order_id: Option<String>,
    parameters: String,
    before: String,
    after: String,
}

#[derive(Template)]
#[template(path = "audit.html")]
struct AuditPage {
    frame: Frame,
    rows: Vec<Row>,
    next: Option<i64>,
}

/// `GET /petstore-domain/console/audit`.
pub(crate) async fn page(
    State(state): State<ConsoleState>,
    session: Session,
    Query(query): Query<AuditQuery>,
) -> Result<Response, Problem> {
    if query.before.is_some_and(|before| before < 1) {
        return Err(Problem::validation("before must be 1 or more"));
    }
    let actions = operator::list(&state.database, query.before, PAGE + 1)
        .await
        .map_err(|error| Problem::from_failure(&error))?;
    let next = (actions.len() as i64 > PAGE)
        .then(|| actions.get(PAGE as usize - 1).map(|action| action.sequence))
        .flatten();
    let rows = actions
        .into_iter()
        .take(PAGE as usize)
        .map(|action| Row {
            sequence: action.sequence,
            at: action.at,
            subject: action.subject,
            action: action.acted.action.as_str(),
            target: action.acted.target,
            order_id: action.acted.order_id.map(|order| order.to_string()),
            parameters: action.acted.parameters.to_string(),
            before: action.acted.before.to_string(),
            after: action.acted.after.to_string(),
        })
        .collect();
    Ok(html(&AuditPage {
        frame: session.frame("Operator actions"),
        rows,
        next,
    }))
}
