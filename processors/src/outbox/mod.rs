//! The transactional outbox: what a transaction wants published is written as rows in that
//! same transaction, and `relay` publishes them afterwards. Nothing is ever "DB then Kafka".

pub mod relay;

use sqlx::postgres::PgArguments;
use sqlx::{PgConnection, Postgres};
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

/// The rows of one outbox insert as column arrays, for `unnest`.
#[derive(Debug, Default)]
pub struct Columns<'a> {
    topics: Vec<&'a str>,
    keys: Vec<Option<&'a str>>,
    payloads: Vec<&'a [u8]>,
    headers: Vec<serde_json::Value>,
    event_ids: Vec<Option<Uuid>>,
}

impl<'a> Columns<'a> {
    pub fn new(rows: impl IntoIterator<Item = &'a OutboxRow>) -> Self {
        let mut c = Self::default();
        for row in rows {
            c.topics.push(row.topic.as_str());
            c.keys.push(row.key.as_deref());
            c.payloads.push(row.payload.as_slice());
            c.headers.push(serde_json::json!(row.headers));
            c.event_ids.push(row.event_id);
        }
        c
    }

    pub fn is_empty(&self) -> bool {
        self.topics.is_empty()
    }

    /// Binds the five arrays, in the order `insert_sql` numbers them from `$first`.
    pub fn bind<'q>(
        &'q self,
        query: sqlx::query::Query<'q, Postgres, PgArguments>,
    ) -> sqlx::query::Query<'q, Postgres, PgArguments> {
        query
            .bind(&self.topics)
            .bind(&self.keys)
            .bind(&self.payloads)
            .bind(&self.headers)
            .bind(&self.event_ids)
    }
}

/// The insert of `Columns` bound from parameter `$first` on, in the given order (ids follow
/// it). Usable on its own or as a data-modifying CTE.
pub fn insert_sql(first: usize) -> String {
    let [a, b, c, d, e] = [first, first + 1, first + 2, first + 3, first + 4];
    format!(
        r#"
        INSERT INTO outbox (topic, message_key, payload, headers, event_id)
        SELECT topic, message_key, payload, headers, event_id
        FROM unnest(${a}::text[], ${b}::text[], ${c}::bytea[], ${d}::jsonb[], ${e}::uuid[])
            WITH ORDINALITY AS r(topic, message_key, payload, headers, event_id, n)
        ORDER BY n
        "#
    )
}

/// Appends rows in the given order (ids follow it), in one statement.
pub async fn insert(conn: &mut PgConnection, rows: &[OutboxRow]) -> Result<(), sqlx::Error> {
    let columns = Columns::new(rows);
    if columns.is_empty() {
        return Ok(());
    }
    let sql = insert_sql(1);
    columns.bind(sqlx::query(&sql)).execute(conn).await?;
    Ok(())
}
