//! Retention of the dedupe table: a consumer group's applied event ids (`processed_events`)
//! are kept for `processor.dedupe_retention_hours`, then deleted by the group's workers.
//!
//! Safe with any number of workers of a group: each chunk takes its rows with
//! `FOR UPDATE SKIP LOCKED`, so workers pruning at once split the rows instead of queueing on
//! them (see `db::prune_in_chunks` for the chunking).

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::db;
use crate::telemetry::METRICS;

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

/// Deletes `group`'s rows older than `retention_hours`; returns how many. A chunk finds its
/// rows through `processed_events_by_age` and deletes them by `ctid` (they are locked, so it
/// cannot move), which keeps the plan a TID scan however large the table.
async fn prune(
    pool: &PgPool,
    name: &'static str,
    group: &str,
    retention_hours: u64,
    cancel: &CancellationToken,
) -> Result<u64, sqlx::Error> {
    db::prune_in_chunks(
        pool,
        r#"
        DELETE FROM processed_events
        WHERE ctid = ANY(ARRAY(
            SELECT ctid FROM processed_events
            WHERE consumer_group = $3 AND processed_at < now() - make_interval(hours => $1)
            ORDER BY processed_at
            LIMIT $2
            FOR UPDATE SKIP LOCKED
        ))
        "#,
        retention_hours,
        Some(group),
        cancel,
        &METRICS.dedupe_pruned.with_label_values(&[name]),
    )
    .await
}
