//! The transactional outbox: what a transaction wants published is written as rows in that
//! same transaction, and `relay` publishes them afterwards. Nothing is ever "DB then Kafka".

pub mod relay;

use sqlx::PgConnection;
use uuid::Uuid;

use crate::events::{Envelope, EventPayload};

/// One message to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub topic: String,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
    pub event_id: Option<Uuid>,
}

impl OutboxRow {
    /// A business event keyed by user id (SPEC §2: all of one user's money moves through one
    /// partition, in order).
    pub fn event<P: EventPayload>(topic: &str, user_id: i64, envelope: &Envelope<P>) -> Self {
        Self {
            topic: topic.to_owned(),
            key: Some(user_id.to_string()),
            payload: envelope.to_bytes(),
            headers: vec![("eventType".to_owned(), P::TYPE.to_owned())],
            event_id: Some(envelope.event_id),
        }
    }
}

/// Appends rows in the given order (ids follow it), in one statement.
pub async fn insert(conn: &mut PgConnection, rows: &[OutboxRow]) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut topics = Vec::with_capacity(rows.len());
    let mut keys = Vec::with_capacity(rows.len());
    let mut payloads = Vec::with_capacity(rows.len());
    let mut headers = Vec::with_capacity(rows.len());
    let mut event_ids = Vec::with_capacity(rows.len());
    for row in rows {
        topics.push(row.topic.as_str());
        keys.push(row.key.as_deref());
        payloads.push(row.payload.as_slice());
        headers.push(serde_json::json!(row.headers));
        event_ids.push(row.event_id);
    }
    sqlx::query(
        r#"
        INSERT INTO outbox (topic, message_key, payload, headers, event_id)
        SELECT topic, message_key, payload, headers, event_id
        FROM unnest($1::text[], $2::text[], $3::bytea[], $4::jsonb[], $5::uuid[])
            WITH ORDINALITY AS r(topic, message_key, payload, headers, event_id, n)
        ORDER BY n
        "#,
    )
    .bind(&topics)
    .bind(&keys)
    .bind(&payloads)
    .bind(&headers)
    .bind(&event_ids)
    .execute(conn)
    .await?;
    Ok(())
}
