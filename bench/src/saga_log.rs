//! A log of whole sagas: one real order run through the service to completion, its events
//! (the pet's `PetAdded` to `OrderCompleted`) then cloned into the events table, each clone
//! with a pet (`startup-pet-NNNNNNN`), an order and every other UUID of its own, the same
//! event types, payloads and metadata otherwise. On either engine.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use petstore_cli::{Application, Role};
use petstore_event_store::database::Database;
use petstore_event_store::stream;
use petstore_security::auth::TokenVerifier;
use petstore_settings::{RoleName, Settings};
use serde_json::Value;
use sqlx::{QueryBuilder, Sqlite};

/// The demo catalog's pet the template order buys.
pub const TEMPLATE_PET: &str = "golden-retriever-001";
/// Rows per INSERT statement on SQLite (seven parameters each; SQLite allows 32,766).
const SQLITE_ROWS_PER_STATEMENT: usize = 1_000;
/// Rows per transaction of the bulk load.
const ROWS_PER_TRANSACTION: usize = 50_000;

/// One row of the events table, as stored (payload and metadata as JSON text).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Row {
    /// The aggregate type.
    pub aggregate_type: String,
    /// The aggregate id.
    pub aggregate_id: String,
    /// The event's number within its aggregate.
    pub sequence: i64,
    /// The event type.
    pub event_type: String,
    /// The event's schema version.
    pub event_version: String,
    /// The payload.
    pub payload: String,
    /// The metadata.
    pub metadata: String,
}

/// The events of one real order and the ids in them that every clone replaces.
#[derive(Debug)]
pub struct Template {
    /// Its events, in stream order.
    pub rows: Vec<Row>,
    order_id: String,
    uuids: Vec<String>,
}

/// A bearer token for `settings`, when they require one.
pub fn token(settings: &Settings) -> anyhow::Result<Option<String>> {
    if !settings.security.authentication_required {
        return Ok(None);
    }
    Ok(Some(
        TokenVerifier::new(&settings.security.jwt, Vec::new())?
            .issue("bench-admin", RoleName::Admin)
            .context("a token")?
            .0,
    ))
}

fn authorized(request: reqwest::RequestBuilder, token: Option<&str>) -> reqwest::RequestBuilder {
    match token {
        Some(token) => request.bearer_auth(token),
        None => request,
    }
}

/// Waits until the service at `base` answers `/health/ready` with 200.
pub async fn until_ready(
    client: &reqwest::Client,
    base: &str,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(response) = client
            .get(format!("{base}/petstore-domain/health/ready"))
            .send()
            .await
        {
            if response.status() == 200 {
                return Ok(());
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the service was not ready in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// An order's status, `None` while it has no view.
pub async fn order_status(
    client: &reqwest::Client,
    base: &str,
    token: Option<&str>,
    order_id: &str,
) -> anyhow::Result<Option<String>> {
    let response = authorized(
        client.get(format!("{base}/petstore-domain/orders/{order_id}/status")),
        token,
    )
    .send()
    .await?;
    if response.status() == 404 {
        return Ok(None);
    }
    let view: Value = response.error_for_status()?.json().await?;
    Ok(view["status"].as_str().map(str::to_owned))
}

impl Template {
    /// Runs one order for the demo catalog's golden retriever to completion in a service of
    /// every role on `settings` (its database empty, the demo catalog seeded) and takes its
    /// events, with the pet's `PetAdded`.
    pub async fn record(settings: &Settings) -> anyhow::Result<Self> {
        let database = Database::connect(&settings.database, &settings.storage).await?;
        let application = Application::build(settings.clone(), &Role::all()).await?;
        let base = format!("http://127.0.0.1:{}", application.port());
        let shutdown = application.shutdown_handle();
        let server = tokio::spawn(application.run_until_stopped());
        let client = reqwest::Client::new();
        until_ready(&client, &base, Duration::from_secs(60)).await?;
        let before = stream::head_position(&database).await?;
        let token = token(settings)?;
        let accepted: Value = authorized(
            client.post(format!("{base}/petstore-domain/orders")),
            token.as_deref(),
        )
        .json(&serde_json::json!({"customer_id": "saga-log", "pet_id": TEMPLATE_PET}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
        let order_id = accepted["order_id"]
            .as_str()
            .context("an order id")?
            .to_owned();
        let deadline = Instant::now() + Duration::from_secs(60);
        while order_status(&client, &base, token.as_deref(), &order_id)
            .await?
            .as_deref()
            != Some("completed")
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the template order never completed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        shutdown.trigger();
        server.await??;
        let rows: Vec<Row> = match &database {
            Database::Postgres(pool) => {
                sqlx::query_as(
                    "SELECT aggregate_type, aggregate_id, sequence, event_type, event_version,
                            payload::text AS payload, metadata::text AS metadata
                       FROM events
                      WHERE (transaction_id, global_position) > ($1::text::xid8, $2)
                         OR (aggregate_id = $3 AND sequence = 1)
                      ORDER BY events.transaction_id, events.global_position",
                )
                .bind(before.transaction_id.to_string())
                .bind(before.global_position)
                .bind(TEMPLATE_PET)
                .fetch_all(pool)
                .await?
            }
            Database::Sqlite(pool) => {
                sqlx::query_as(
                    "SELECT aggregate_type, aggregate_id, sequence, event_type, event_version,
                            payload, metadata
                       FROM events
                      WHERE global_position > $1 OR (aggregate_id = $2 AND sequence = 1)
                      ORDER BY global_position",
                )
                .bind(before.global_position)
                .bind(TEMPLATE_PET)
                .fetch_all(pool)
                .await?
            }
        };
        database.close().await;
        let mut uuids = Vec::new();
        for row in &rows {
            for text in [&row.payload, &row.metadata] {
                collect_uuids(&serde_json::from_str(text)?, &mut uuids);
            }
            collect_uuids(&Value::String(row.aggregate_id.clone()), &mut uuids);
        }
        anyhow::ensure!(
            uuids.contains(&order_id),
            "the template's events do not hold its order id"
        );
        Ok(Self {
            rows,
            order_id,
            uuids,
        })
    }

    /// Its event types, in order.
    pub fn event_types(&self) -> String {
        self.rows
            .iter()
            .map(|row| row.event_type.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Clone `index`: its rows and its order id.
    fn instance(&self, index: usize) -> (Vec<Row>, String) {
        let mut replacements = vec![(TEMPLATE_PET.to_owned(), format!("startup-pet-{index:07}"))];
        replacements.extend(
            self.uuids
                .iter()
                .map(|uuid| (uuid.clone(), uuid::Uuid::new_v4().to_string())),
        );
        let replace = |text: &str| {
            replacements
                .iter()
                .fold(text.to_owned(), |text, (old, new)| text.replace(old, new))
        };
        let rows = self
            .rows
            .iter()
            .map(|row| Row {
                aggregate_id: replace(&row.aggregate_id),
                payload: replace(&row.payload),
                metadata: replace(&row.metadata),
                ..row.clone()
            })
            .collect();
        (rows, replace(&self.order_id))
    }

    /// Appends clones `from..to` to the events table of `database`; the ids of the first and
    /// the last order.
    pub async fn append(
        &self,
        database: &Database,
        from: usize,
        to: usize,
    ) -> anyhow::Result<(String, String)> {
        let per_transaction = (ROWS_PER_TRANSACTION / self.rows.len()).max(1);
        let mut orders = Vec::new();
        let mut index = from;
        while index < to {
            let end = (index + per_transaction).min(to);
            let mut rows = Vec::with_capacity((end - index) * self.rows.len());
            for clone in index..end {
                let (clone_rows, order_id) = self.instance(clone);
                rows.extend(clone_rows);
                if clone == from || clone + 1 == to {
                    orders.push(order_id);
                }
            }
            match database {
                Database::Postgres(pool) => insert_postgres(pool, &rows).await?,
                Database::Sqlite(pool) => insert_sqlite(pool, &rows).await?,
            }
            index = end;
        }
        let first = orders.first().context("at least one clone")?.clone();
        let last = orders.last().context("at least one clone")?.clone();
        Ok((first, last))
    }
}

async fn insert_postgres(pool: &sqlx::PgPool, rows: &[Row]) -> anyhow::Result<()> {
    let column = |field: fn(&Row) -> &String| rows.iter().map(field).collect::<Vec<_>>();
    let sequences: Vec<i64> = rows.iter().map(|row| row.sequence).collect();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         SELECT t.aggregate_type, t.aggregate_id, t.sequence, t.event_type, t.event_version,
                t.payload::jsonb, t.metadata::jsonb
           FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[])
             AS t(aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)",
    )
    .bind(column(|row| &row.aggregate_type))
    .bind(column(|row| &row.aggregate_id))
    .bind(&sequences)
    .bind(column(|row| &row.event_type))
    .bind(column(|row| &row.event_version))
    .bind(column(|row| &row.payload))
    .bind(column(|row| &row.metadata))
    .execute(pool)
    .await?;
    Ok(())
}

async fn insert_sqlite(pool: &sqlx::SqlitePool, rows: &[Row]) -> anyhow::Result<()> {
    let mut transaction = petstore_event_store::database::begin(pool).await?;
    for chunk in rows.chunks(SQLITE_ROWS_PER_STATEMENT) {
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) ",
        );
        insert.push_values(chunk, |mut values, row| {
            values
                .push_bind(&row.aggregate_type)
                .push_bind(&row.aggregate_id)
                .push_bind(row.sequence)
                .push_bind(&row.event_type)
                .push_bind(&row.event_version)
                .push_bind(&row.payload)
                .push_bind(&row.metadata);
        });
        insert.build().execute(&mut *transaction).await?;
    }
    transaction.commit().await?;
    Ok(())
}

/// Every string in `value` that is a hyphenated UUID.
fn collect_uuids(value: &Value, into: &mut Vec<String>) {
    match value {
        Value::String(text)
            if text.len() == 36 && uuid::Uuid::parse_str(text).is_ok() && !into.contains(text) =>
        {
            into.push(text.clone());
        }
        Value::Array(items) => items.iter().for_each(|item| collect_uuids(item, into)),
        Value::Object(fields) => fields.values().for_each(|item| collect_uuids(item, into)),
        _ => {}
    }
}
