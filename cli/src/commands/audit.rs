//! `petstore audit`: the audit trail of an order or a correlation id (every event, in
//! order, with its metadata), or the security audit trail, as a table or JSON.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use petstore_domain::OrderId;
use petstore_event_store::database::Database;
use petstore_query_api::audit;
use petstore_security::audit::{
    SecurityAudit, SecurityAuditEntry, SecurityAuditFilter, SecurityEventKind,
};
use petstore_settings::Settings;

use super::Format;

/// `petstore audit`'s arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The order whose trail to print.
    #[arg(
        long,
        conflicts_with_all = ["correlation_id", "security"],
        required_unless_present_any = ["correlation_id", "security"]
    )]
    order: Option<String>,
    /// The correlation id whose trail to print.
    #[arg(long, conflicts_with = "security")]
    correlation_id: Option<String>,
    /// Print the security audit trail instead (logins, refusals, rate-limit trips, admin
    /// actions, key-set fetches), newest first.
    #[arg(long)]
    security: bool,
    /// With --security: only this subject's entries.
    #[arg(long, requires = "security")]
    subject: Option<String>,
    /// With --security: only this kind (login, token_rejected, forbidden, rate_limited,
    /// admin_action, key_set_rotation).
    #[arg(long, requires = "security")]
    kind: Option<String>,
    /// With --security: only entries at or after this RFC 3339 time.
    #[arg(long, requires = "security")]
    since: Option<String>,
    /// With --security: at most this many entries.
    #[arg(long, default_value_t = 100, requires = "security")]
    limit: u32,
    /// `table` (default) or `json`.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Folder of the embedded store (overrides storage.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

/// Prints the trail `args` asks for.
pub async fn run(args: Args, mut settings: Settings) -> anyhow::Result<()> {
    let Args {
        order,
        correlation_id,
        security,
        subject,
        kind,
        since,
        limit,
        format,
        data_dir,
    } = args;
    if let Some(data_dir) = data_dir {
        settings.storage.data_dir = data_dir;
    }
    let database = Database::connect(&settings.database, &settings.storage).await?;
    if security {
        let filter = SecurityAuditFilter {
            subject,
            kind: kind
                .map(|kind| {
                    SecurityEventKind::parse(&kind)
                        .with_context(|| format!("--kind: no kind is called {kind}"))
                })
                .transpose()?,
            since_ms: since
                .map(|since| {
                    chrono::DateTime::parse_from_rfc3339(&since)
                        .map(|time| time.timestamp_millis())
                        .with_context(|| format!("--since: {since} is not RFC 3339"))
                })
                .transpose()?,
            limit,
            ..SecurityAuditFilter::default()
        };
        let entries = SecurityAudit::new(database.clone()).query(&filter).await?;
        database.close().await;
        let mut stdout = std::io::stdout().lock();
        match format {
            Format::Json => {
                writeln!(stdout, "{}", serde_json::to_string_pretty(&entries)?)?;
            }
            Format::Table => writeln!(stdout, "{}", security_table(&entries))?,
        }
        return Ok(());
    }
    let trail = match (order, correlation_id) {
        (Some(order), _) => {
            let order_id = OrderId::parse(&order)?;
            audit::by_order(&database, &order_id)
                .await?
                .with_context(|| format!("order {order_id} does not exist"))?
        }
        (None, Some(correlation_id)) => audit::by_correlation(&database, &correlation_id).await?,
        (None, None) => anyhow::bail!("give --order or --correlation-id"),
    };
    database.close().await;
    let mut stdout = std::io::stdout().lock();
    match format {
        Format::Json => writeln!(stdout, "{}", serde_json::to_string_pretty(&trail)?)?,
        Format::Table => writeln!(stdout, "{}", audit_table(&trail))?,
    }
    Ok(())
}

fn security_table(entries: &[SecurityAuditEntry]) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    table.set_header([
        "id",
        "at",
        "kind",
        "outcome",
        "subject",
        "client",
        "route",
        "correlation",
        "detail",
    ]);
    for entry in entries {
        let text = |value: &Option<String>| value.clone().unwrap_or_default();
        table.add_row([
            entry.id.to_string(),
            entry.at.clone(),
            entry.kind.clone(),
            entry.outcome.clone(),
            text(&entry.subject),
            text(&entry.client_ip),
            format!("{} {}", text(&entry.method), text(&entry.route)),
            text(&entry.correlation_id),
            entry.detail.clone(),
        ]);
    }
    table
}

fn audit_table(trail: &audit::AuditTrail) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    table.set_header([
        "#",
        "timestamp",
        "aggregate",
        "seq",
        "event",
        "ver",
        "subject",
        "causation",
        "event id",
    ]);
    // A key the event lacks (one the service did not append) shows as `-`.
    let shown = |value: &Option<String>| value.clone().unwrap_or_else(|| "-".to_owned());
    for entry in &trail.events {
        table.add_row([
            entry.global_position.to_string(),
            shown(&entry.timestamp),
            format!("{} {}", entry.aggregate_type, entry.aggregate_id),
            entry.sequence.to_string(),
            entry.event_type.clone(),
            entry.event_version.clone(),
            shown(&entry.subject),
            shown(&entry.causation_id),
            entry.event_id.clone(),
        ]);
    }
    table
}
