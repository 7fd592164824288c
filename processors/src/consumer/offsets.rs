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
    /// The fingerprint of the message at `next_offset - 1`, when the last commit wrote one.
    pub last_fp: Option<i64>,
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
    /// The fingerprint of the batch's last message, the one at `next_offset - 1`.
    pub last_fp: Option<i64>,
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
                "d AS (DELETE FROM processed_events WHERE consumer_group = $1 AND event_id = ANY($8))"
                    .to_owned(),
            );
        }
        if !self.outbox.is_empty() {
            let first = if self.unclaim.is_empty() { 8 } else { 9 };
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
            UPDATE consumer_offsets
               SET next_offset = $5, last_message_fp = COALESCE($7, last_message_fp),
                   updated_at = now()
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
            .bind(self.at.next_offset)
            .bind(self.last_fp);
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

/// A fingerprint of one message: FNV-1a (64 bits) over its key, value and timestamp, each
/// tagged and length-prefixed. It is stored in PostgreSQL and compared across versions of
/// paystream, so it is spelled out here rather than taken from `std::hash`, whose output may
/// change between Rust releases. It tells "the message this database applied" from "another
/// message at the same offset"; it is not a defence against someone forging messages.
pub fn fingerprint(key: Option<&[u8]>, payload: Option<&[u8]>, timestamp: Option<i64>) -> i64 {
    const BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    fn feed(hash: &mut u64, bytes: &[u8]) {
        for byte in bytes {
            *hash ^= u64::from(*byte);
            *hash = hash.wrapping_mul(PRIME);
        }
    }
    fn field(hash: &mut u64, bytes: Option<&[u8]>) {
        match bytes {
            None => feed(hash, &[0]),
            Some(b) => {
                feed(hash, &[1]);
                feed(hash, &(b.len() as u64).to_le_bytes());
                feed(hash, b);
            }
        }
    }
    let mut hash = BASIS;
    field(&mut hash, key);
    field(&mut hash, payload);
    field(
        &mut hash,
        timestamp.map(i64::to_le_bytes).as_ref().map(|b| &b[..]),
    );
    hash as i64
}

#[cfg(test)]
mod tests {
    use super::fingerprint;

    #[test]
    fn a_fingerprint_is_fixed_and_tells_key_value_and_time_apart() {
        // Stored values must stay readable by later versions: pin two (computed separately).
        assert_eq!(
            fingerprint(None, None, None),
            0xd94d_1218_6c0f_2fb7_u64 as i64
        );
        let base = fingerprint(Some(b"7"), Some(b"{}"), Some(1));
        assert_eq!(base, 0x6ce3_1cf1_85bf_7aaf_u64 as i64);
        assert_eq!(base, fingerprint(Some(b"7"), Some(b"{}"), Some(1)));
        assert_ne!(base, fingerprint(Some(b"8"), Some(b"{}"), Some(1)));
        assert_ne!(base, fingerprint(Some(b"7"), Some(b"{ }"), Some(1)));
        assert_ne!(base, fingerprint(Some(b"7"), Some(b"{}"), Some(2)));
        assert_ne!(base, fingerprint(Some(b"7"), Some(b"{}"), None));
        // The length prefix keeps bytes from moving between key and value unnoticed.
        assert_ne!(
            fingerprint(Some(b"7{"), Some(b"}"), Some(1)),
            fingerprint(Some(b"7"), Some(b"{}"), Some(1))
        );
        assert_ne!(
            fingerprint(None, Some(b""), None),
            fingerprint(Some(b""), None, None)
        );
    }
}
