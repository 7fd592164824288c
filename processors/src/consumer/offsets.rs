//! Stored consumer offsets with fencing. See the module docs of `consumer`.

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::Position;
use crate::outbox;

#[derive(Debug, Clone, Copy)]
pub(super) struct Claim {
    pub partition: i32,
    pub next_offset: i64,
    pub epoch: i64,
}

/// Takes ownership of `partitions` for `owner`: each epoch goes up by one, which fences
/// whoever held them before. Returns where to resume each one.
pub(super) async fn claim(
    pool: &PgPool,
    group: &str,
    topic: &str,
    partitions: &[i32],
    owner: &str,
) -> Result<Vec<Claim>, sqlx::Error> {
    let rows: Vec<(i32, i64, i64)> = sqlx::query_as(
        r#"
        INSERT INTO consumer_offsets (consumer_group, topic, partition, next_offset, epoch, owner)
        SELECT $1, $2, p, 0, 1, $4 FROM unnest($3::int[]) AS p
        ON CONFLICT (consumer_group, topic, partition) DO UPDATE
            SET epoch = consumer_offsets.epoch + 1, owner = EXCLUDED.owner, updated_at = now()
        RETURNING partition, next_offset, epoch
        "#,
    )
    .bind(group)
    .bind(topic)
    .bind(partitions)
    .bind(owner)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(partition, next_offset, epoch)| Claim {
            partition,
            next_offset,
            epoch,
        })
        .collect())
}

/// The closing statement of a batch transaction: the outbox rows, the removal of the dedupe
/// rows of events that were dead-lettered by the handler, and the compare-and-set of the
/// stored offset, in one round trip.
pub(super) struct Close<'a> {
    pub group: &'a str,
    pub topic: &'a str,
    pub partition: i32,
    /// The claim and stored offset the batch started from.
    pub at: Position,
    pub next_offset: i64,
    pub outbox: outbox::Columns<'a>,
    pub unclaim: &'a [Uuid],
}

impl Close<'_> {
    /// `false` means the partition was claimed by someone else (or advanced) since `at` was
    /// read: fenced. The caller then rolls back, outbox rows included.
    pub async fn execute(&self, conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
        // Each part is left out when it has nothing to do: an empty outbox insert would still
        // fire its statement trigger and wake the relay, and the planner's generic plan for
        // an empty `= ANY($n)` delete may scan the whole dedupe table.
        let mut parts = Vec::new();
        if !self.unclaim.is_empty() {
            parts.push(
                "d AS (DELETE FROM processed_events WHERE consumer_group = $1 AND event_id = ANY($7))"
                    .to_owned(),
            );
        }
        if !self.outbox.is_empty() {
            let first = if self.unclaim.is_empty() { 7 } else { 8 };
            parts.push(format!("o AS ({})", outbox::insert_sql(first)));
        }
        let with = if parts.is_empty() {
            String::new()
        } else {
            format!("WITH {}", parts.join(", "))
        };
        let sql = format!(
            r#"
            {with}
            UPDATE consumer_offsets SET next_offset = $5, updated_at = now()
            WHERE consumer_group = $1 AND topic = $2 AND partition = $3
              AND epoch = $4 AND next_offset = $6
            "#
        );
        let mut query = sqlx::query(&sql)
            .bind(self.group)
            .bind(self.topic)
            .bind(self.partition)
            .bind(self.at.epoch)
            .bind(self.next_offset)
            .bind(self.at.next_offset);
        if !self.unclaim.is_empty() {
            query = query.bind(self.unclaim);
        }
        if !self.outbox.is_empty() {
            query = self.outbox.bind(query);
        }
        let result = query.execute(conn).await?;
        Ok(result.rows_affected() == 1)
    }
}
