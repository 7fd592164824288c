//! The dedupe table (`processed_events`): the ids of the events each consumer group applied.
//!
//! Dedupe works by claiming: a batch inserts its events' rows first, and only the events whose
//! row is new are applied. A concurrent transaction claiming the same event makes this one
//! wait for its outcome. The rows of events the handler dead-letters are deleted again in the
//! batch's closing statement, so that a replay after a fix can apply them.
//!
//! Retention: a group's rows are kept for `processor.dedupe_retention_hours`, then deleted
//! by the group's workers. Safe with any number of workers of a group: each chunk takes its
//! rows with `FOR UPDATE SKIP LOCKED`, so workers pruning at once split the rows instead of
//! queueing on them (see `db::Pruning` for the chunking). A chunk finds its rows through
//! `processed_events_by_age` and deletes them by `ctid` (they are locked, so it cannot move),
//! which keeps the plan a TID scan however large the table.

use std::collections::HashSet;
use std::time::Duration;

use sqlx::PgConnection;
use uuid::Uuid;

use crate::db::{Params, Pruning};
use crate::settings::ProcessorSettings;
use crate::telemetry::METRICS;

/// The rows one batch claims, as column arrays.
#[derive(Default)]
pub(super) struct ProcessedRows {
    event_ids: Vec<Uuid>,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
}

impl ProcessedRows {
    pub fn push(&mut self, event_id: Uuid, partition: i32, offset: i64) {
        self.event_ids.push(event_id);
        self.partitions.push(partition);
        self.offsets.push(offset);
    }

    /// Inserts the rows that are not there yet; returns their event ids.
    pub async fn claim(
        &self,
        conn: &mut PgConnection,
        group: &str,
        topic: &str,
    ) -> Result<HashSet<Uuid>, sqlx::Error> {
        if self.event_ids.is_empty() {
            return Ok(HashSet::new());
        }
        let claimed: Vec<Uuid> = sqlx::query_scalar(
            r#"
            INSERT INTO processed_events (consumer_group, event_id, topic, partition, "offset")
            SELECT $1, e, $3, p, o FROM unnest($2::uuid[], $4::int[], $5::bigint[]) AS t(e, p, o)
            ON CONFLICT DO NOTHING
            RETURNING event_id
            "#,
        )
        .bind(group)
        .bind(&self.event_ids)
        .bind(topic)
        .bind(&self.partitions)
        .bind(&self.offsets)
        .fetch_all(conn)
        .await?;
        Ok(claimed.into_iter().collect())
    }
}

/// The delete that gives back the claims of `event_ids` (dead-lettered by the handler), for
/// a batch's closing statement; `group` is the placeholder of the consumer group.
pub(super) fn unclaim_sql(
    params: &mut Params,
    group: &str,
    event_ids: &[Uuid],
) -> Result<String, sqlx::Error> {
    let ids = params.push(event_ids)?;
    Ok(format!(
        "DELETE FROM processed_events WHERE consumer_group = {group} AND event_id = ANY({ids})"
    ))
}

const PRUNE_SQL: &str = r#"
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
pub(super) fn pruning(
    name: &'static str,
    group: &str,
    settings: &ProcessorSettings,
) -> Option<Pruning> {
    (settings.dedupe_retention_hours > 0).then(|| Pruning {
        what: "processed event ids",
        sql: PRUNE_SQL,
        retention_hours: settings.dedupe_retention_hours,
        group: Some(group.to_owned()),
        interval: Duration::from_secs(settings.dedupe_prune_interval_s.max(1)),
        counter: METRICS.dedupe_pruned.with_label_values(&[name]),
    })
}
