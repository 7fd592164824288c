//! The stored consumer offsets (`consumer_offsets`), with fencing: a worker claims a
//! partition by bumping its epoch, and a batch advances the offset only by compare-and-set on
//! the (epoch, offset) it started from. See the module docs of `consumer`.

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::dedupe;
use crate::db::Writes;
use crate::outbox;

#[derive(Debug, Clone, Copy)]
pub(super) struct Claim {
    pub partition: i32,
    pub next_offset: i64,
    pub epoch: i64,
    /// The fingerprint of the message at `next_offset - 1`, when the last commit wrote one.
    pub last_fp: Option<i64>,
}

/// The claim and stored offset a batch starts from: what its compare-and-set expects.
#[derive(Debug, Clone, Copy)]
pub(super) struct Position {
    pub epoch: i64,
    pub next_offset: i64,
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
    let rows: Vec<(i32, i64, i64, Option<i64>)> = sqlx::query_as(
        r#"
        INSERT INTO consumer_offsets (consumer_group, topic, partition, next_offset, epoch, owner)
        SELECT $1, $2, p, 0, 1, $4 FROM unnest($3::int[]) AS p
        ON CONFLICT (consumer_group, topic, partition) DO UPDATE
            SET epoch = consumer_offsets.epoch + 1, owner = EXCLUDED.owner, updated_at = now()
        RETURNING partition, next_offset, epoch, last_message_fp
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
        .map(|(partition, next_offset, epoch, last_fp)| Claim {
            partition,
            next_offset,
            epoch,
            last_fp,
        })
        .collect())
}

/// Says which partitions this worker (`owner`) holds, and returns the partitions of the
/// group's topic that no live worker holds: none that said so within `live`. Stale rows of
/// workers gone for a day are removed on the way.
pub(super) async fn heartbeat(
    pool: &PgPool,
    group: &str,
    topic: &str,
    owner: &str,
    held: &[i32],
    live: std::time::Duration,
) -> Result<Vec<i32>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        r#"
        INSERT INTO consumer_members (consumer_group, topic, owner, partitions, seen_at)
        VALUES ($1, $2, $3, $4, now())
        ON CONFLICT (consumer_group, topic, owner)
        DO UPDATE SET partitions = EXCLUDED.partitions, seen_at = now()
        "#,
    )
    .bind(group)
    .bind(topic)
    .bind(owner)
    .bind(held)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "DELETE FROM consumer_members WHERE consumer_group = $1 AND topic = $2 \
         AND seen_at < now() - interval '1 day'",
    )
    .bind(group)
    .bind(topic)
    .execute(&mut *tx)
    .await?;
    let orphans: Vec<i32> = sqlx::query_scalar(
        r#"
        SELECT o.partition FROM consumer_offsets o
        WHERE o.consumer_group = $1 AND o.topic = $2
          AND NOT EXISTS (
              SELECT 1 FROM consumer_members m
              WHERE m.consumer_group = $1 AND m.topic = $2
                AND m.seen_at > now() - make_interval(secs => $3)
                AND o.partition = ANY(m.partitions))
        ORDER BY o.partition
        "#,
    )
    .bind(group)
    .bind(topic)
    .bind(live.as_secs_f64())
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(orphans)
}

/// Removes this worker's membership row (a clean stop).
pub(super) async fn leave(pool: &PgPool, group: &str, topic: &str, owner: &str) {
    let _ = sqlx::query(
        "DELETE FROM consumer_members WHERE consumer_group = $1 AND topic = $2 AND owner = $3",
    )
    .bind(group)
    .bind(topic)
    .bind(owner)
    .execute(pool)
    .await;
}

/// The stored position of a partition: (epoch, next offset, fingerprint of the message
/// before it), if the row exists.
pub(super) async fn stored(
    conn: &mut PgConnection,
    group: &str,
    topic: &str,
    partition: i32,
) -> Result<Option<(i64, i64, Option<i64>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT epoch, next_offset, last_message_fp FROM consumer_offsets \
         WHERE consumer_group = $1 AND topic = $2 AND partition = $3",
    )
    .bind(group)
    .bind(topic)
    .bind(partition)
    .fetch_optional(conn)
    .await
}

/// One partition's compare-and-set in a batch's closing statement.
#[derive(Debug, Clone, Copy)]
pub(super) struct Advance {
    pub partition: i32,
    /// The claim and stored offset the batch started from.
    pub at: Position,
    pub next_offset: i64,
    /// The fingerprint of the batch's last message, the one at `next_offset - 1`.
    pub last_fp: Option<i64>,
}

/// The closing statement of a batch transaction: the handler's writes, the outbox rows, the
/// removal of the dedupe rows of events that were dead-lettered by the handler, and the
/// compare-and-set of the stored offset of every partition in the batch, in one round trip.
pub(super) struct Close<'a> {
    pub group: &'a str,
    pub topic: &'a str,
    pub advances: &'a [Advance],
    pub writes: Writes,
    pub outbox: outbox::Columns<'a>,
    pub unclaim: &'a [Uuid],
}

impl Close<'_> {
    /// The first partition (in the order given) whose compare-and-set was refused: it was
    /// claimed by someone else (or advanced) since its `at` was read, so the caller rolls
    /// back, the handler's writes and the outbox rows included. `None` when every partition
    /// advanced.
    pub async fn execute(self, conn: &mut PgConnection) -> Result<Option<Advance>, sqlx::Error> {
        // The handler's writes come first: their parameters are bound already.
        let (mut params, mut ctes) = self.writes.into_ctes();
        let group = params.push(self.group)?;
        // Each part is left out when it has nothing to do: an empty outbox insert would still
        // fire its statement trigger and wake the relay, and the planner's generic plan for
        // an empty `= ANY($n)` delete may scan the whole dedupe table.
        if !self.unclaim.is_empty() {
            let delete = dedupe::unclaim_sql(&mut params, &group, self.unclaim)?;
            ctes.push(format!("d AS ({delete})"));
        }
        if !self.outbox.is_empty() {
            ctes.push(format!("o AS ({})", self.outbox.insert_sql(&mut params)?));
        }
        let with = if ctes.is_empty() {
            String::new()
        } else {
            format!("WITH {}", ctes.join(", "))
        };
        let topic = params.push(self.topic)?;
        let column = |f: fn(&Advance) -> i64| self.advances.iter().map(f).collect::<Vec<i64>>();
        let partitions: Vec<i32> = self.advances.iter().map(|a| a.partition).collect();
        let partitions = params.push(partitions)?;
        let epochs = params.push(column(|a| a.at.epoch))?;
        let expected = params.push(column(|a| a.at.next_offset))?;
        let next = params.push(column(|a| a.next_offset))?;
        let fps: Vec<Option<i64>> = self.advances.iter().map(|a| a.last_fp).collect();
        let fps = params.push(fps)?;
        let sql = format!(
            r#"
            {with}
            UPDATE consumer_offsets c
               SET next_offset = v.next_offset,
                   last_message_fp = COALESCE(v.last_fp, c.last_message_fp),
                   updated_at = now()
              FROM unnest({partitions}::int[], {epochs}::bigint[], {expected}::bigint[],
                          {next}::bigint[], {fps}::bigint[])
                   AS v(partition, epoch, expected, next_offset, last_fp)
             WHERE c.consumer_group = {group} AND c.topic = {topic} AND c.partition = v.partition
               AND c.epoch = v.epoch AND c.next_offset = v.expected
            RETURNING c.partition
            "#
        );
        let advanced: Vec<i32> = sqlx::query_scalar_with(&sql, params.into_arguments())
            .fetch_all(conn)
            .await?;
        Ok(first_refused(self.advances, &advanced))
    }
}

/// The first of `advances` whose partition is not among those that `advanced`.
fn first_refused(advances: &[Advance], advanced: &[i32]) -> Option<Advance> {
    advances
        .iter()
        .find(|a| !advanced.contains(&a.partition))
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refused_partition_is_the_first_given_that_did_not_advance() {
        let advance = |partition| Advance {
            partition,
            at: Position {
                epoch: 1,
                next_offset: 10,
            },
            next_offset: 20,
            last_fp: None,
        };
        let given = [advance(2), advance(0), advance(5)];
        // (partitions that advanced, the refused one)
        let cases: [(&[i32], Option<i32>); 5] = [
            (&[2, 0, 5], None),
            (&[5, 2, 0], None),
            (&[0, 5], Some(2)),
            (&[2, 5], Some(0)),
            (&[], Some(2)),
        ];
        for (advanced, refused) in cases {
            let got = first_refused(&given, advanced).map(|a| a.partition);
            assert_eq!(got, refused, "{advanced:?}");
        }
    }
}
