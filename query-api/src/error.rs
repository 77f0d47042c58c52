//! How the query routes answer what fails below them.

use petstore_event_store::stream::StreamError;
use petstore_read_models::ReadModelError;
use petstore_web::Problem;

/// What a query route meets below it that is not the client's doing.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The read models could not be read.
    #[error(transparent)]
    ReadModels(#[from] ReadModelError),
    /// The event store could not be read (audit trails, orders not projected yet).
    #[error(transparent)]
    Stream(#[from] StreamError),
}

impl From<QueryError> for Problem {
    /// 503 when a database is unreachable, else 500; the cause is logged, not shown.
    fn from(error: QueryError) -> Self {
        Problem::from_failure(&error)
    }
}

/// A failure below the API, as the client is told it.
pub(crate) fn failed(error: impl Into<QueryError>) -> Problem {
    error.into().into()
}
