//! The transactional outbox: what a transaction wants published is written as rows in that
//! same transaction, and `relay` publishes them afterwards. Nothing is ever "DB then Kafka".

pub mod relay;

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::db::Params;
use crate::events::{Envelope, EventPayload};

/// One message to publish. Keys and header values are bytes, as Kafka has them: a dead
/// letter keeps its original's exactly, whatever they hold.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub event_id: Option<Uuid>,
}

impl OutboxRow {
    /// A business event keyed by user id (SPEC §2: all of one user's money moves through one
    /// partition, in order).
    pub fn event<P: EventPayload>(topic: &str, user_id: i64, envelope: &Envelope<P>) -> Self {
        Self {
            topic: topic.to_owned(),
            key: Some(user_id.to_string().into_bytes()),
            payload: envelope.to_bytes(),
            headers: vec![("eventType".to_owned(), P::TYPE.as_bytes().to_vec())],
            event_id: Some(envelope.event_id),
        }
    }
}

/// Headers as the outbox stores them: `[[name, value], ...]` in order, a value as a JSON
/// string when it is UTF-8 (readable when an operator looks at the table), else as
/// `{"hex": "..."}`. `headers_from_json` reads both.
pub fn headers_to_json(headers: &[(String, Vec<u8>)]) -> serde_json::Value {
    headers
        .iter()
        .map(|(name, value)| {
            let value = match std::str::from_utf8(value) {
                Ok(text) => serde_json::Value::from(text),
                Err(_) => serde_json::json!({ "hex": hex(value) }),
            };
            serde_json::json!([name, value])
        })
        .collect()
}

/// The headers `headers_to_json` stored; an entry of any other shape is skipped.
pub fn headers_from_json(headers: &serde_json::Value) -> Vec<(String, Vec<u8>)> {
    headers
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|pair| {
            let name = pair.get(0)?.as_str()?;
            let value = pair.get(1)?;
            let bytes = match value.as_str() {
                Some(text) => text.as_bytes().to_vec(),
                None => unhex(value.get("hex")?.as_str()?)?,
            };
            Some((name.to_owned(), bytes))
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The rows of one outbox insert as column arrays, for `unnest`. A key that is UTF-8 goes to
/// `message_key` (text, readable), any other to `message_key_raw`.
#[derive(Debug, Default)]
pub struct Columns<'a> {
    topics: Vec<&'a str>,
    keys: Vec<Option<&'a str>>,
    raw_keys: Vec<Option<&'a [u8]>>,
    payloads: Vec<&'a [u8]>,
    headers: Vec<serde_json::Value>,
    event_ids: Vec<Option<Uuid>>,
}

impl<'a> Columns<'a> {
    pub fn new(rows: impl IntoIterator<Item = &'a OutboxRow>) -> Self {
        let mut c = Self::default();
        for row in rows {
            let (key, raw_key) = match row.key.as_deref() {
                Some(key) => match std::str::from_utf8(key) {
                    Ok(text) => (Some(text), None),
                    Err(_) => (None, Some(key)),
                },
                None => (None, None),
            };
            c.topics.push(row.topic.as_str());
            c.keys.push(key);
            c.raw_keys.push(raw_key);
            c.payloads.push(row.payload.as_slice());
            c.headers.push(headers_to_json(&row.headers));
            c.event_ids.push(row.event_id);
        }
        c
    }

    pub fn is_empty(&self) -> bool {
        self.topics.is_empty()
    }

    /// The insert of these rows, its six arrays bound as the next parameters of `params`.
    /// Usable on its own or as a data-modifying CTE; ids follow the given order.
    pub fn insert_sql(&self, params: &mut Params) -> Result<String, sqlx::Error> {
        let topics = params.push(&self.topics)?;
        let keys = params.push(&self.keys)?;
        let raw_keys = params.push(&self.raw_keys)?;
        let payloads = params.push(&self.payloads)?;
        let headers = params.push(&self.headers)?;
        let event_ids = params.push(&self.event_ids)?;
        Ok(format!(
            r#"
            INSERT INTO outbox (topic, message_key, message_key_raw, payload, headers, event_id)
            SELECT topic, message_key, message_key_raw, payload, headers, event_id
            FROM unnest({topics}::text[], {keys}::text[], {raw_keys}::bytea[], {payloads}::bytea[],
                        {headers}::jsonb[], {event_ids}::uuid[])
                WITH ORDINALITY AS r(topic, message_key, message_key_raw, payload, headers, event_id, n)
            ORDER BY n
            "#
        ))
    }
}

/// How many rows wait to be published, how long the oldest has waited (seconds), and how many
/// of them are parked. Cheap: the outbox holds only what is not published yet (and the few
/// rows an operator discarded).
pub async fn backlog(pool: &PgPool) -> Result<(i64, Option<f64>, i64), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*), extract(epoch FROM now() - min(created_at))::float8, \
                count(*) FILTER (WHERE parked_at IS NOT NULL) \
         FROM outbox WHERE discarded_at IS NULL",
    )
    .fetch_one(pool)
    .await
}

/// Appends rows in the given order (ids follow it), in one statement.
pub async fn insert(conn: &mut PgConnection, rows: &[OutboxRow]) -> Result<(), sqlx::Error> {
    let columns = Columns::new(rows);
    if columns.is_empty() {
        return Ok(());
    }
    let mut params = Params::default();
    let sql = columns.insert_sql(&mut params)?;
    sqlx::query_with(&sql, params.into_arguments())
        .execute(conn)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_keep_their_bytes_through_the_outbox() {
        let headers = vec![
            ("eventType".to_owned(), b"AccountDebited".to_vec()),
            ("binary".to_owned(), vec![0x00, 0xff, 0xfe, 0x41]),
            ("empty".to_owned(), vec![]),
            ("eventType".to_owned(), b"again, in order".to_vec()),
        ];
        let json = headers_to_json(&headers);
        assert_eq!(json[0], serde_json::json!(["eventType", "AccountDebited"]));
        assert_eq!(json[1], serde_json::json!(["binary", {"hex": "00fffe41"}]));
        assert_eq!(headers_from_json(&json), headers);
        // Rows written before binary values were kept: text pairs only.
        assert_eq!(
            headers_from_json(&serde_json::json!([["a", "b"], ["bad"], ["c", {"hex": "zz"}]])),
            vec![("a".to_owned(), b"b".to_vec())]
        );
    }
}

/// A parked outbox row, as `paystream outbox parked` shows it.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct Parked {
    pub id: i64,
    pub topic: String,
    pub key: Option<String>,
    pub event_id: Option<uuid::Uuid>,
    pub bytes: i32,
    pub parked_at: chrono::DateTime<chrono::Utc>,
    pub reason: Option<String>,
    /// Later rows of the same topic and key waiting behind it.
    pub waiting: i64,
}

/// The parked rows not yet published or discarded, oldest first.
pub async fn parked(pool: &PgPool) -> Result<Vec<Parked>, sqlx::Error> {
    sqlx::query_as(
        r#"
        SELECT p.id, p.topic,
               coalesce(p.message_key, encode(p.message_key_raw, 'hex')) AS key,
               p.event_id, octet_length(p.payload) AS bytes, p.parked_at, p.park_reason AS reason,
               (SELECT count(*) FROM outbox o
                WHERE o.topic = p.topic AND o.id > p.id
                  AND o.discarded_at IS NULL
                  AND (p.message_key IS NOT NULL OR p.message_key_raw IS NOT NULL)
                  AND o.message_key IS NOT DISTINCT FROM p.message_key
                  AND o.message_key_raw IS NOT DISTINCT FROM p.message_key_raw) AS waiting
        FROM outbox p
        WHERE p.parked_at IS NOT NULL AND p.discarded_at IS NULL
        ORDER BY p.id
        "#,
    )
    .fetch_all(pool)
    .await
}

/// What an operator does with a parked row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParkedAction {
    /// Try it again in the relay's next round.
    Retry,
    /// Give up on it: it is never published, and the rows behind it go on.
    Discard,
}

/// Carries out `action` on the parked row `id` and records who did it and why, in one
/// transaction; false if no such parked row waits.
pub async fn act_on_parked(
    pool: &PgPool,
    id: i64,
    action: ParkedAction,
    actor: &str,
    reason: &str,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let change = match action {
        ParkedAction::Retry => "parked_at = NULL",
        ParkedAction::Discard => "discarded_at = now()",
    };
    let changed = sqlx::query(&format!(
        "UPDATE outbox SET {change} WHERE id = $1 AND parked_at IS NOT NULL \
         AND discarded_at IS NULL"
    ))
    .bind(id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if changed == 0 {
        tx.rollback().await?;
        return Ok(false);
    }
    let name = match action {
        ParkedAction::Retry => "RETRY",
        ParkedAction::Discard => "DISCARD",
    };
    sqlx::query(
        "INSERT INTO outbox_actions (outbox_id, action, actor, reason) VALUES ($1, $2, $3, $4)",
    )
    .bind(id)
    .bind(name)
    .bind(actor)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    // Wake the relay (the trigger only fires on INSERT into outbox).
    sqlx::query("SELECT pg_notify('paystream_outbox', '')")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(true)
}
