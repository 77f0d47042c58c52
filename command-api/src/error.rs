//! How the command routes answer what they cannot accept: their own problems, the domain's
//! refusals, and failures of the event store.

use axum::response::{IntoResponse, Response};
use cqrs_es::AggregateError;
use petstore_domain::DomainError;
use petstore_event_store::stream::StreamError;
use petstore_web::Problem;

/// Why a command was not accepted.
#[derive(Debug)]
pub enum CommandError {
    /// The route's own answer (a malformed request, a state it does not accept).
    Problem(Problem),
    /// The domain refused the command.
    Domain(DomainError),
    /// The event store failed, or concurrent writers kept winning.
    Store(AggregateError<DomainError>),
    /// Reading the stream failed.
    Stream(StreamError),
}

impl From<Problem> for CommandError {
    fn from(problem: Problem) -> Self {
        Self::Problem(problem)
    }
}

impl From<DomainError> for CommandError {
    fn from(error: DomainError) -> Self {
        Self::Domain(error)
    }
}

impl From<AggregateError<DomainError>> for CommandError {
    fn from(error: AggregateError<DomainError>) -> Self {
        match error {
            AggregateError::UserError(error) => Self::Domain(error),
            other => Self::Store(other),
        }
    }
}

impl From<StreamError> for CommandError {
    fn from(error: StreamError) -> Self {
        Self::Stream(error)
    }
}

impl From<CommandError> for Problem {
    fn from(error: CommandError) -> Self {
        match error {
            CommandError::Problem(problem) => problem,
            CommandError::Domain(error) => refusal(error),
            CommandError::Store(error) => store_failure(error),
            CommandError::Stream(error) => Problem::from_failure(&error),
        }
    }
}

impl IntoResponse for CommandError {
    fn into_response(self) -> Response {
        Problem::from(self).into_response()
    }
}

/// A business refusal: 422 for what the request got wrong, 404 for what does not exist, 409
/// for what the current state does not allow.
fn refusal(error: DomainError) -> Problem {
    use DomainError as E;
    let detail = error.to_string();
    match error {
        E::Validation { .. } | E::IdempotencyKeyReused(_) | E::AmountMismatch { .. } => {
            Problem::validation(detail)
        }
        E::PetNotFound(_) | E::OrderNotFound(_) => Problem::not_found(detail),
        E::PetAlreadyExists(_)
        | E::PetUnavailable { .. }
        | E::PetAlreadySold(_)
        | E::PetNotReservedForOrder { .. }
        | E::InvalidOrderTransition { .. }
        | E::InvalidTransition { .. } => Problem::conflict(detail),
    }
}

/// The event store's failure: 409 after losing every retry to concurrent writers, 503 when
/// it is unreachable, else 500 (logged, not shown).
fn store_failure(error: AggregateError<DomainError>) -> Problem {
    use AggregateError as E;
    match error {
        E::UserError(error) => refusal(error),
        E::AggregateConflict => Problem::conflict(
            "the resource kept changing under concurrent requests; retry the request",
        ),
        E::DatabaseConnectionError(cause) => {
            tracing::error!(error = %cause, "event store unreachable");
            Problem::unavailable("the event store is unreachable; retry shortly")
        }
        E::DeserializationError(cause) => Problem::internal(&cause),
        // postgres-es reports some connection failures (a dropped connection, a server
        // shutting down) as unexpected: look at the cause.
        E::UnexpectedError(cause) => {
            Problem::from_failure(cause.as_ref() as &(dyn std::error::Error + 'static))
        }
    }
}
