//! Retention of the dedupe table: a consumer group's applied event ids (`processed_events`)
//! are kept for `processor.dedupe_retention_hours`, then deleted by the group's workers.
//!
//! Safe with any number of workers of a group: each chunk takes its rows with
//! `FOR UPDATE SKIP LOCKED`, so workers pruning at once split the rows instead of queueing on
//! them (see `db::Pruning` for the chunking). A chunk finds its rows through
//! `processed_events_by_age` and deletes them by `ctid` (they are locked, so it cannot move),
//! which keeps the plan a TID scan however large the table.

use std::time::Duration;

use crate::db::Pruning;
use crate::settings::ProcessorSettings;
use crate::telemetry::METRICS;

const SQL: &str = r#"
    DELETE FROM processed_events
    WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM processed_events
        WHERE consumer_group = $3 AND processed_at < now() - make_interval(hours => $1)
        ORDER BY processed_at
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    ))
"#;

/// The pruning of `group`'s processed event ids; `None` when they are kept forever.
pub fn pruning(name: &'static str, group: &str, settings: &ProcessorSettings) -> Option<Pruning> {
    (settings.dedupe_retention_hours > 0).then(|| Pruning {
        what: "processed event ids",
        sql: SQL,
        retention_hours: settings.dedupe_retention_hours,
        group: Some(group.to_owned()),
        interval: Duration::from_secs(settings.dedupe_prune_interval_s.max(1)),
        counter: METRICS.dedupe_pruned.with_label_values(&[name]),
    })
}
