//! `petstore explain`: what happened to an order and what it waits for, from the event
//! store, as a table or as the JSON `GET /petstore-domain/admin/orders/{id}/timeline`
//! answers (one document, unpaged). Exits 0 when the order is terminal, 3 while it is in
//! flight, 4 when it is stuck (a deadline overdue or a dead letter open), 2 when the store
//! does not hold it.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use chrono::Utc;
use petstore_domain::OrderId;
use petstore_event_store::database::Database;
use petstore_read_models::timeline::{self, Timeline, TimelineEntry, Verdict};
use petstore_settings::Settings;

/// How often `--follow` reads the timeline again.
const FOLLOW_EVERY: Duration = Duration::from_millis(500);

/// `petstore explain`'s arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The order.
    #[arg(long)]
    order: String,
    /// Print the timeline as JSON (chronological, the HTTP route's document) instead of a
    /// table; with --follow, one JSON entry per line, then the document's `now`.
    #[arg(long)]
    json: bool,
    /// Keep printing new entries until the order is terminal.
    #[arg(long)]
    follow: bool,
    /// Folder of the embedded store (overrides storage.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

/// The exit code of a verdict.
fn exit_code(verdict: Verdict) -> ExitCode {
    ExitCode::from(match verdict {
        Verdict::Terminal => 0,
        Verdict::InFlight => 3,
        Verdict::Stuck => 4,
    })
}

/// The exit code of an order the store does not hold.
const UNKNOWN_ORDER: u8 = 2;

/// Prints the order's timeline; the exit code says where it stands.
pub async fn run(args: Args, mut settings: Settings) -> anyhow::Result<ExitCode> {
    let order_id = OrderId::parse(&args.order)
        .map_err(|error| anyhow::anyhow!("--order {}: {error}", args.order))?;
    if let Some(data_dir) = args.data_dir {
        settings.storage.data_dir = data_dir;
    }
    let database = Database::connect(&settings.database, &settings.storage).await?;
    let outcome = explain(&database, &order_id, args.json, args.follow).await;
    database.close().await;
    outcome
}

async fn explain(
    database: &Database,
    order_id: &OrderId,
    json: bool,
    follow: bool,
) -> anyhow::Result<ExitCode> {
    let Some(mut timeline) = whole(database, order_id).await? else {
        eprintln!("order {order_id} does not exist");
        return Ok(ExitCode::from(UNKNOWN_ORDER));
    };
    let mut stdout = std::io::stdout().lock();
    if !follow {
        if json {
            writeln!(stdout, "{}", serde_json::to_string_pretty(&timeline)?)?;
        } else {
            write!(stdout, "{}", now_text(&timeline))?;
            writeln!(stdout, "{}", entries_table(&timeline.entries))?;
        }
        return Ok(exit_code(timeline.now.verdict));
    }
    let mut printed = 0;
    loop {
        for entry in &timeline.entries[printed..] {
            if json {
                writeln!(stdout, "{}", serde_json::to_string(entry)?)?;
            } else {
                writeln!(stdout, "{}", entry_line(entry))?;
            }
        }
        stdout.flush()?;
        printed = timeline.entries.len();
        if timeline.now.verdict == Verdict::Terminal {
            break;
        }
        tokio::time::sleep(FOLLOW_EVERY).await;
        timeline = whole(database, order_id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("order {order_id} disappeared"))?;
    }
    if json {
        writeln!(stdout, "{}", serde_json::to_string(&timeline.now)?)?;
    } else {
        write!(stdout, "{}", now_text(&timeline))?;
    }
    Ok(exit_code(timeline.now.verdict))
}

/// The whole timeline, as of now.
async fn whole(database: &Database, order_id: &OrderId) -> anyhow::Result<Option<Timeline>> {
    Ok(timeline::whole(database, order_id, Utc::now()).await?)
}

/// The "now" block, as lines of text.
fn now_text(timeline: &Timeline) -> String {
    let now = &timeline.now;
    let verdict = match now.verdict {
        Verdict::Terminal => "terminal",
        Verdict::InFlight => "in flight",
        Verdict::Stuck => "STUCK",
    };
    let mut text = format!(
        "order {}: {} ({verdict}) as of {}\n",
        timeline.order_id, now.status, timeline.as_of
    );
    if let Some(reason) = &now.cancellation_reason {
        text += &format!("  cancelled because: {reason}\n");
    }
    for reason in &now.stuck_because {
        text += &format!("  stuck: {reason}\n");
    }
    if let Some(waiting_for) = &now.waiting_for {
        text += &format!("  waiting for: {waiting_for}\n");
    }
    let times = |count: u32| match count {
        1 => "once".to_owned(),
        count => format!("{count} times"),
    };
    let left = |millis: i64| {
        if millis >= 0 {
            format!("{:.1} s left", millis as f64 / 1000.0)
        } else {
            format!("overdue by {:.1} s", -millis as f64 / 1000.0)
        }
    };
    if let Some(deadline) = &now.deadline {
        text += &format!(
            "  deadline: {} due {} ({}, armed {})\n",
            deadline.kind,
            deadline.due_at,
            left(deadline.time_left_ms),
            times(deadline.times_armed)
        );
    }
    if let Some(retry) = &now.next_retry {
        text += &format!(
            "  next retry: {} at {} ({}, try {})\n",
            retry.kind,
            retry.due_at,
            left(retry.time_left_ms),
            retry.times_armed
        );
    }
    if let Some(call) = &now.last_call {
        text += &format!(
            "  last provider call: {} {}, {} ({} attempt{}, the last {} at {}; key {})\n",
            call.provider,
            call.operation,
            call.last_outcome,
            call.attempts,
            if call.attempts == 1 { "" } else { "s" },
            call.last_outcome,
            call.last_attempt_at,
            call.idempotency_key
        );
    }
    if let Some(error) = &now.last_error {
        text += &format!("  last error: {error}\n");
    }
    let steps: Vec<String> = now
        .steps
        .iter()
        .map(|step| format!("{} {}", step.name, step.state))
        .collect();
    text += &format!("  steps: {}\n", steps.join(", "));
    match &now.owner {
        Some(owner) => {
            let runner = owner.runner.as_deref().unwrap_or("no runner");
            text += &format!("  saga partition {}: {runner}", owner.partition);
            if let (Some(epoch), Some(expires)) = (owner.epoch, owner.lease_expires_in_ms) {
                text += &format!(" (epoch {epoch}, lease expires in {expires} ms)");
            }
            text += "\n";
        }
        None => text += "  saga partition: not recorded yet (no saga runner started)\n",
    }
    text += &format!("  {} entries\n", timeline.total_entries);
    text
}

/// One entry as a line (`--follow`).
fn entry_line(entry: &TimelineEntry) -> String {
    let position = entry
        .global_position
        .map(|position| format!(" @{position}"))
        .unwrap_or_default();
    format!(
        "{:>4} {} {:?}{position} {}",
        entry.index, entry.at, entry.kind, entry.summary
    )
}

/// The entries as a table.
fn entries_table(entries: &[TimelineEntry]) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    table.set_header(["#", "at", "kind", "what", "pos", "subject", "trace"]);
    let shown = |value: &Option<String>| value.clone().unwrap_or_else(|| "-".to_owned());
    for entry in entries {
        table.add_row([
            entry.index.to_string(),
            entry.at.clone(),
            entry.kind.as_str().to_owned(),
            entry.summary.clone(),
            entry
                .global_position
                .map_or_else(|| "-".to_owned(), |position| position.to_string()),
            shown(&entry.subject),
            shown(&entry.trace_id),
        ]);
    }
    table
}
