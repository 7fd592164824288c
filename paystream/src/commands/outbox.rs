//! `paystream outbox`: the rows the broker refused for good, and what an operator does
//! with them (each action is recorded in `outbox_actions`).

use anyhow::Context as _;
use clap::Subcommand;
use paystream_processors::db::Pool;
use paystream_processors::outbox::{self, ParkedAction};

#[derive(Subcommand)]
pub enum OutboxCommand {
    /// List parked rows: why the broker refused each, and how many rows of its key wait.
    Parked {
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Try a parked row again now (after fixing the topic or its limit).
    Retry {
        /// The outbox row id (from `paystream outbox parked`).
        id: i64,
        /// Why, for the record.
        #[arg(long)]
        reason: String,
        /// Who, for the record (default: $USER).
        #[arg(long, env = "USER", default_value = "unknown")]
        by: String,
    },
    /// Give up on a parked row: it is never published, and the rows of its key behind it go
    /// on. Whoever consumes that topic never sees this event.
    Discard {
        id: i64,
        #[arg(long)]
        reason: String,
        #[arg(long, env = "USER", default_value = "unknown")]
        by: String,
    },
}

pub async fn run(pool: &Pool, command: OutboxCommand) -> anyhow::Result<()> {
    let (id, action, reason, by) = match command {
        OutboxCommand::Parked { json } => return list(pool, json).await,
        OutboxCommand::Retry { id, reason, by } => (id, ParkedAction::Retry, reason, by),
        OutboxCommand::Discard { id, reason, by } => (id, ParkedAction::Discard, reason, by),
    };
    let done = outbox::act_on_parked(pool, id, action, &by, &reason)
        .await
        .context("Failed to update the outbox row")?;
    anyhow::ensure!(
        done,
        "outbox row {id} is not parked (see `paystream outbox parked`)"
    );
    let what = match action {
        ParkedAction::Retry => "will be retried in the relay's next round",
        ParkedAction::Discard => "is discarded; the rows behind it go on",
    };
    println!("outbox row {id} {what} (recorded in outbox_actions)");
    Ok(())
}

async fn list(pool: &Pool, json: bool) -> anyhow::Result<()> {
    let rows = outbox::parked(pool)
        .await
        .context("Failed to read parked outbox rows")?;
    for row in &rows {
        if json {
            println!("{}", serde_json::to_string(row)?);
        } else {
            println!(
                "{} {} key={} {} bytes, parked {} ({} waiting behind): {}",
                row.id,
                row.topic,
                row.key.as_deref().unwrap_or("-"),
                row.bytes,
                row.parked_at.to_rfc3339(),
                row.waiting,
                row.reason.as_deref().unwrap_or("")
            );
        }
    }
    if !json && rows.is_empty() {
        println!("no parked outbox rows");
    }
    Ok(())
}
