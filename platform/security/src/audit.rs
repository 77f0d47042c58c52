//! The security audit trail: every login, token rejection, refusal, rate-limit trip, admin
//! action and key-set rotation, stored durably (the event store's database) with who, from
//! where, on which route, and the request's correlation and trace ids. Never a token or a
//! password: callers pass a reason, not a credential.
//!
//! Writes and the query that reads them live here together; the admin route and
//! `petstore audit --security` call [`SecurityAudit::query`].

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use sqlx::Row;

use petstore_event_store::database::{self, Database};
use petstore_event_store::with_pool;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SecurityEventKind {
    /// A password login, successful or not.
    Login,
    /// A bearer token was refused (the detail says why).
    TokenRejected,
    /// An authenticated caller was refused (403).
    Forbidden,
    /// A caller exceeded a rate limit (recorded once per key and window, not per request).
    RateLimited,
    /// An admin called an `/admin/*` route.
    AdminAction,
    /// An identity provider's key set was fetched (or the fetch failed).
    KeySetRotation,
}

impl SecurityEventKind {
    /// Every kind.
    pub const ALL: [Self; 6] = [
        Self::Login,
        Self::TokenRejected,
        Self::Forbidden,
        Self::RateLimited,
        Self::AdminAction,
        Self::KeySetRotation,
    ];

    /// Reads a kind as stored (`login`, `token_rejected`, ...).
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == text)
    }

    /// The kind as stored and filtered on.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Login => "login",
            Self::TokenRejected => "token_rejected",
            Self::Forbidden => "forbidden",
            Self::RateLimited => "rate_limited",
            Self::AdminAction => "admin_action",
            Self::KeySetRotation => "key_set_rotation",
        }
    }
}

/// How it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SecurityOutcome {
    /// Allowed or done.
    Success,
    /// Refused or failed.
    Failure,
}

impl SecurityOutcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failure => "failure",
        }
    }
}

/// One security event, as recorded.
#[derive(Debug, Clone)]
pub struct SecurityEvent {
    /// What happened.
    pub kind: SecurityEventKind,
    /// How it ended.
    pub outcome: SecurityOutcome,
    /// Who (the token's subject, or the username tried at a login).
    pub subject: Option<String>,
    /// From where.
    pub client_ip: Option<IpAddr>,
    /// The request's method.
    pub method: Option<String>,
    /// The request's route template (never the raw path: ids stay out).
    pub route: Option<String>,
    /// What, in words: a reason, never a credential.
    pub detail: String,
    /// The correlation id of the request it happened in, if any.
    pub correlation_id: Option<String>,
    /// The trace id of the request it happened in, if any.
    pub trace_id: Option<String>,
}

impl SecurityEvent {
    /// The event as it happened in the request of `correlation_id` and `trace_id`.
    pub fn during(mut self, correlation_id: Option<String>, trace_id: Option<String>) -> Self {
        self.correlation_id = correlation_id;
        self.trace_id = trace_id;
        self
    }

    /// An event of `kind` that ended with `outcome`, described by `detail`.
    pub fn new(
        kind: SecurityEventKind,
        outcome: SecurityOutcome,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            outcome,
            subject: None,
            client_ip: None,
            method: None,
            route: None,
            detail: detail.into(),
            correlation_id: None,
            trace_id: None,
        }
    }
}

/// One stored security event.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SecurityAuditEntry {
    /// Its id: increasing in recording order.
    pub id: i64,
    /// When (RFC 3339, UTC).
    pub at: String,
    /// `login`, `token_rejected`, `forbidden`, `rate_limited`, `admin_action` or
    /// `key_set_rotation`.
    pub kind: String,
    /// `success` or `failure`.
    pub outcome: String,
    /// Who.
    pub subject: Option<String>,
    /// From where.
    pub client_ip: Option<String>,
    /// The request's method.
    pub method: Option<String>,
    /// The request's route template.
    pub route: Option<String>,
    /// The request's correlation id.
    pub correlation_id: Option<String>,
    /// The request's trace id.
    pub trace_id: Option<String>,
    /// What, in words.
    pub detail: String,
}

/// Which entries to read: newest first, filtered, a page at a time.
#[derive(Debug, Clone, Default)]
pub struct SecurityAuditFilter {
    /// Only this subject's.
    pub subject: Option<String>,
    /// Only this kind.
    pub kind: Option<SecurityEventKind>,
    /// Only at or after this time (ms since the epoch).
    pub since_ms: Option<i64>,
    /// Only before this time (ms since the epoch).
    pub until_ms: Option<i64>,
    /// Only entries older than this id (the previous page's `next`).
    pub before_id: Option<i64>,
    /// Most entries.
    pub limit: u32,
}

/// Records and reads the security audit trail.
#[derive(Debug, Clone)]
pub struct SecurityAudit {
    database: Database,
}

impl SecurityAudit {
    /// The trail in `database` (the `security_audit` table of the migrations).
    pub fn new(database: Database) -> Self {
        Self { database }
    }

    /// Stores `event` with the correlation and trace ids it carries, and logs it. A failed
    /// write is logged as an error; the caller's answer does not change.
    pub async fn record(&self, event: SecurityEvent) {
        let correlation_id = event.correlation_id;
        let trace_id = event.trace_id;
        let client_ip = event.client_ip.map(|ip| ip.to_string());
        tracing::info!(
            target: "petstore::security",
            kind = event.kind.as_str(),
            outcome = event.outcome.as_str(),
            subject = event.subject.as_deref().unwrap_or_default(),
            client_ip = client_ip.as_deref().unwrap_or_default(),
            route = event.route.as_deref().unwrap_or_default(),
            detail = %event.detail,
            "security event"
        );
        let at_ms = chrono::Utc::now().timestamp_millis();
        // Both engines take `$n` placeholders.
        const INSERT: &str = "INSERT INTO security_audit (at_ms, kind, outcome, subject, \
             client_ip, method, route, correlation_id, trace_id, detail) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";
        let result = with_pool!(&self.database, |pool| {
            let pool = pool.clone();
            database::to_completion(async move {
                sqlx::query(INSERT)
                    .bind(at_ms)
                    .bind(event.kind.as_str())
                    .bind(event.outcome.as_str())
                    .bind(event.subject)
                    .bind(client_ip)
                    .bind(event.method)
                    .bind(event.route)
                    .bind(correlation_id)
                    .bind(trace_id)
                    .bind(event.detail)
                    .execute(&pool)
                    .await
                    .map(|_| ())
            })
            .await
        });
        if let Err(error) = result {
            tracing::error!(target: "petstore::security", %error, "a security event could not be stored");
        }
    }

    /// The entries `filter` selects, newest first.
    pub async fn query(
        &self,
        filter: &SecurityAuditFilter,
    ) -> Result<Vec<SecurityAuditEntry>, sqlx::Error> {
        // Both engines take `$n` placeholders and these casts (which tell Postgres the types
        // of parameters that may be NULL).
        const SELECT: &str = "SELECT id, at_ms, kind, outcome, subject, client_ip, method, \
             route, correlation_id, trace_id, detail FROM security_audit WHERE \
             (CAST($1 AS text) IS NULL OR subject = $1) AND (CAST($2 AS text) IS NULL OR kind = $2) \
             AND (CAST($3 AS bigint) IS NULL OR at_ms >= $3) \
             AND (CAST($4 AS bigint) IS NULL OR at_ms < $4) \
             AND (CAST($5 AS bigint) IS NULL OR id < $5) ORDER BY id DESC LIMIT $6";
        let kind = filter.kind.map(SecurityEventKind::as_str);
        let limit = i64::from(filter.limit.max(1));
        let rows: Vec<Row10> = with_pool!(&self.database, |pool| {
            sqlx::query(SELECT)
                .bind(filter.subject.as_deref())
                .bind(kind)
                .bind(filter.since_ms)
                .bind(filter.until_ms)
                .bind(filter.before_id)
                .bind(limit)
                .fetch_all(pool)
                .await?
                .iter()
                .map(Row10::from_row)
                .collect::<Result<_, _>>()?
        });
        Ok(rows.into_iter().map(Row10::into_entry).collect())
    }
}

struct Row10 {
    id: i64,
    at_ms: i64,
    text: [Option<String>; 9],
}

impl Row10 {
    /// Reads a row of either engine: `id`, `at_ms`, then nine text columns.
    fn from_row<R>(row: &R) -> Result<Self, sqlx::Error>
    where
        R: Row,
        usize: sqlx::ColumnIndex<R>,
        i64: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
        Option<String>: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    {
        let mut text: [Option<String>; 9] = Default::default();
        for (index, slot) in text.iter_mut().enumerate() {
            *slot = row.try_get(index + 2)?;
        }
        Ok(Self {
            id: row.try_get(0)?,
            at_ms: row.try_get(1)?,
            text,
        })
    }

    fn into_entry(self) -> SecurityAuditEntry {
        let [kind, outcome, subject, client_ip, method, route, correlation_id, trace_id, detail] =
            self.text;
        SecurityAuditEntry {
            id: self.id,
            at: chrono::DateTime::from_timestamp_millis(self.at_ms)
                .unwrap_or_default()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            kind: kind.unwrap_or_default(),
            outcome: outcome.unwrap_or_default(),
            subject,
            client_ip,
            method,
            route,
            correlation_id,
            trace_id,
            detail: detail.unwrap_or_default(),
        }
    }
}
