//! Stored consumer offsets with fencing. See the module docs of `consumer`.

use sqlx::{PgConnection, PgPool};

use super::Position;

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

/// Compare-and-set of the stored offset, inside the batch transaction. `false` means the
/// partition was claimed by someone else (or advanced) since `at` was read: fenced.
pub(super) async fn advance(
    conn: &mut PgConnection,
    group: &str,
    topic: &str,
    partition: i32,
    at: Position,
    next_offset: i64,
) -> Result<bool, sqlx::Error> {
    let result = sqlx::query(
        r#"
        UPDATE consumer_offsets SET next_offset = $5, updated_at = now()
        WHERE consumer_group = $1 AND topic = $2 AND partition = $3
          AND epoch = $4 AND next_offset = $6
        "#,
    )
    .bind(group)
    .bind(topic)
    .bind(partition)
    .bind(at.epoch)
    .bind(next_offset)
    .bind(at.next_offset)
    .execute(conn)
    .await?;
    Ok(result.rows_affected() == 1)
}
