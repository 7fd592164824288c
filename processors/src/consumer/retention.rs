//! Retention of the dedupe table: a consumer group's applied event ids (`processed_events`)
//! are kept for `processor.dedupe_retention_hours`, then deleted by the group's workers.
//!
//! Safe with any number of workers of a group: each chunk takes its rows with
//! `FOR UPDATE SKIP LOCKED`, so workers pruning at once split the rows instead of queueing on
//! them, and chunks are small, short transactions of their own, so pruning a large backlog
//! never holds locks or a snapshot for long next to the batch transactions.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::telemetry::METRICS;

/// Rows deleted per statement.
const CHUNK: i64 = 10_000;

/// Prunes `group`'s expired rows now and then every `interval`, until `cancel` fires.
/// Failures are logged and retried at the next interval: a late prune costs only disk.
pub async fn run(
    pool: PgPool,
    name: &'static str,
    group: String,
    retention_hours: u64,
    interval: Duration,
    cancel: CancellationToken,
) {
    loop {
        match prune(&pool, name, &group, retention_hours, &cancel).await {
            Ok(0) => {}
            Ok(rows) => {
                tracing::info!(
                    rows,
                    group,
                    retention_hours,
                    "pruned expired processed event ids"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, group, "pruning processed event ids failed; retrying later")
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Deletes `group`'s rows older than `retention_hours`, a chunk at a time; returns how many.
/// `name` is the processor, the metric's label.
/// A chunk finds its rows through `processed_events_by_age` and deletes them by `ctid` (they
/// are locked, so it cannot move), which keeps the plan a TID scan however large the table.
async fn prune(
    pool: &PgPool,
    name: &'static str,
    group: &str,
    retention_hours: u64,
    cancel: &CancellationToken,
) -> Result<u64, sqlx::Error> {
    // A century keeps everything and still leaves `now() - interval` inside the timestamp range.
    let hours = retention_hours.min(876_000) as i32;
    let mut total = 0;
    while !cancel.is_cancelled() {
        let deleted = sqlx::query(
            r#"
            DELETE FROM processed_events
            WHERE ctid = ANY(ARRAY(
                SELECT ctid FROM processed_events
                WHERE consumer_group = $1 AND processed_at < now() - make_interval(hours => $2)
                ORDER BY processed_at
                LIMIT $3
                FOR UPDATE SKIP LOCKED
            ))
            "#,
        )
        .bind(group)
        .bind(hours)
        .bind(CHUNK)
        .execute(pool)
        .await?
        .rows_affected();
        total += deleted;
        // Counted per chunk: a later chunk's failure does not hide what was deleted.
        METRICS
            .dedupe_pruned
            .with_label_values(&[name])
            .inc_by(deleted);
        if deleted < CHUNK as u64 {
            break;
        }
    }
    Ok(total)
}
