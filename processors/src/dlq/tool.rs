//! `paystream dlq`: read, filter, show and replay dead letters.
//!
//! Replay re-publishes a dead letter's original bytes to its original topic with its
//! original key and headers (the `x-dlq-*` ones included, so a new failure counts one more
//! attempt). The payload keeps its `eventId`, so the processors' dedupe makes replaying the
//! same selection twice harmless. Each replay is recorded in `dlq_replays`; a dead letter
//! replayed before is skipped unless forced, and parked dead letters are always skipped, so a
//! message that keeps failing ends parked instead of going round again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use super::{
    ATTEMPTS, CONSUMER_GROUP, ERROR_CLASS, ERROR_MESSAGE, FIRST_FAILED_AT, ORIGINAL_TOPIC, PARKED,
};
use crate::kafka;
use crate::settings::Settings;

/// One record of the dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    /// When it landed on the dead-letter topic.
    pub timestamp: Option<DateTime<Utc>>,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// `eventType` and `eventId` of the payload when it is a JSON envelope, read once.
    event_type: Option<String>,
    event_id: Option<Uuid>,
}

impl DeadLetter {
    pub fn new(
        partition: i32,
        offset: i64,
        timestamp: Option<DateTime<Utc>>,
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
        headers: Vec<(String, Vec<u8>)>,
    ) -> Self {
        let envelope: Option<Value> = serde_json::from_slice(&payload).ok();
        let field = |name: &str| {
            envelope
                .as_ref()
                .and_then(|e| e.get(name))
                .and_then(Value::as_str)
        };
        let event_type = field("eventType").map(str::to_owned);
        let event_id = field("eventId").and_then(|id| id.parse().ok());
        Self {
            partition,
            offset,
            timestamp,
            key,
            payload,
            headers,
            event_type,
            event_id,
        }
    }

    /// `partition:offset` on the dead-letter topic: how the commands name a dead letter.
    pub fn id(&self) -> String {
        format!("{}:{}", self.partition, self.offset)
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    pub fn original_topic(&self) -> Option<String> {
        self.header(ORIGINAL_TOPIC)
    }

    pub fn error_class(&self) -> Option<String> {
        self.header(ERROR_CLASS)
    }

    pub fn attempts(&self) -> u32 {
        self.header(ATTEMPTS)
            .and_then(|a| a.parse().ok())
            .unwrap_or(0)
    }

    pub fn parked(&self) -> bool {
        self.header(PARKED).as_deref() == Some("true")
    }

    /// The `eventType` of the payload, when the payload is a JSON envelope.
    pub fn event_type(&self) -> Option<String> {
        self.event_type.clone()
    }

    pub fn event_id(&self) -> Option<Uuid> {
        self.event_id
    }

    /// A summary line's worth of fields, for `list --json`.
    pub fn summary(&self) -> Value {
        json!({
            "id": self.id(),
            "deadLetteredAt": self.timestamp,
            "originalTopic": self.original_topic(),
            "consumerGroup": self.header(CONSUMER_GROUP),
            "errorClass": self.error_class(),
            "errorMessage": self.header(ERROR_MESSAGE),
            "eventType": self.event_type(),
            "eventId": self.event_id(),
            "firstFailedAt": self.header(FIRST_FAILED_AT),
            "attempts": self.attempts(),
            "parked": self.parked(),
        })
    }

    /// Everything, for `show`: the summary, every header, the key and the payload (as text
    /// when it is UTF-8, otherwise as hex).
    pub fn detail(&self) -> Value {
        let text = |bytes: &[u8]| match std::str::from_utf8(bytes) {
            Ok(s) => json!({ "text": s }),
            Err(_) => {
                json!({ "hex": bytes.iter().map(|b| format!("{b:02x}")).collect::<String>() })
            }
        };
        let mut detail = self.summary();
        detail["key"] = self.key.as_deref().map_or(Value::Null, text);
        detail["headers"] = Value::Array(
            self.headers
                .iter()
                .map(|(k, v)| json!([k, String::from_utf8_lossy(v)]))
                .collect(),
        );
        detail["payloadBytes"] = json!(self.payload.len());
        detail["payload"] = text(&self.payload);
        detail
    }
}

/// Which dead letters a command works on. Empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub ids: Vec<(i32, i64)>,
    pub original_topic: Option<String>,
    pub error_class: Option<String>,
    pub event_type: Option<String>,
    pub consumer_group: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
            && self.original_topic.is_none()
            && self.error_class.is_none()
            && self.event_type.is_none()
            && self.consumer_group.is_none()
            && self.since.is_none()
            && self.until.is_none()
    }

    pub fn matches(&self, dl: &DeadLetter) -> bool {
        let eq = |want: &Option<String>, have: Option<String>| {
            want.as_ref()
                .is_none_or(|w| have.as_deref() == Some(w.as_str()))
        };
        (self.ids.is_empty() || self.ids.contains(&(dl.partition, dl.offset)))
            && eq(&self.original_topic, dl.original_topic())
            && eq(&self.error_class, dl.error_class())
            && eq(&self.event_type, dl.event_type())
            && eq(&self.consumer_group, dl.header(CONSUMER_GROUP))
            && self
                .since
                .is_none_or(|since| dl.timestamp.is_some_and(|t| t >= since))
            && self
                .until
                .is_none_or(|until| dl.timestamp.is_some_and(|t| t < until))
    }
}

/// Parses `partition:offset`.
pub fn parse_id(id: &str) -> Option<(i32, i64)> {
    let (partition, offset) = id.split_once(':')?;
    Some((partition.trim().parse().ok()?, offset.trim().parse().ok()?))
}

/// Reads the whole dead-letter topic (blocking). Stops once every partition has been read to
/// its high watermark and the topic went quiet briefly, or after `settings.dlq.read_idle_ms`
/// without a message (the watermark is only a hint: some brokers report it early).
pub fn read_all(settings: &Settings) -> anyhow::Result<Vec<DeadLetter>> {
    let (consumer, ends) = reader(settings)?;
    let idle_limit = Duration::from_millis(settings.dlq.read_idle_ms);
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    let mut letters = Vec::new();
    let mut last_message = Instant::now();
    loop {
        let at_end = ends
            .iter()
            .all(|(p, high)| next.get(p).copied().unwrap_or(0) >= *high);
        let idle = last_message.elapsed();
        if idle >= idle_limit || (at_end && idle >= Duration::from_millis(200)) {
            break;
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(e)) => tracing::warn!(error = %e, "reading the dead-letter topic"),
            Some(Ok(m)) => {
                last_message = Instant::now();
                next.insert(m.partition(), m.offset() + 1);
                letters.push(DeadLetter::new(
                    m.partition(),
                    m.offset(),
                    m.timestamp()
                        .to_millis()
                        .and_then(DateTime::from_timestamp_millis),
                    m.key().map(<[u8]>::to_vec),
                    m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                    crate::kafka::owned_headers(&m),
                ));
            }
        }
    }
    letters.sort_by_key(|d| (d.partition, d.offset));
    letters.dedup_by_key(|d| (d.partition, d.offset));
    Ok(letters)
}

/// A consumer of the whole dead-letter topic from its start, outside any group's offsets,
/// and the high watermark of each partition when it started.
fn reader(settings: &Settings) -> anyhow::Result<(BaseConsumer, BTreeMap<i32, i64>)> {
    let topic = &settings.topics.dead_letter;
    let max_bytes = kafka::dead_letter_max_bytes(&settings.kafka);
    let mut config = kafka::base_config(&settings.kafka);
    config
        .set(
            "group.id",
            format!("paystream-dlq-reader-{}", Uuid::new_v4()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.max.bytes", (max_bytes * 2).to_string())
        .set("max.partition.fetch.bytes", max_bytes.to_string());
    let consumer: BaseConsumer = config.create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        anyhow::bail!(
            "topic {topic} has no partitions (does it exist? try `paystream topics create`)"
        );
    }
    let mut ends = BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    for &partition in &partitions {
        let (low, high) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
        ends.insert(partition, high);
        assignment.add_partition_offset(topic, partition, Offset::Offset(low))?;
    }
    consumer.assign(&assignment)?;
    Ok((consumer, ends))
}

/// What a replay did.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplayReport {
    pub selected: usize,
    pub replayed: usize,
    pub would_replay: Vec<String>,
    pub skipped_parked: Vec<String>,
    pub skipped_already_replayed: Vec<String>,
    pub skipped_unknown_topic: Vec<String>,
    pub dry_run: bool,
}

/// How a replay runs.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub dry_run: bool,
    /// Replay dead letters that were replayed before, too.
    pub force: bool,
    /// Messages per second.
    pub rate: f64,
    pub operator: String,
}

/// Replays `letters` (already filtered). With `dry_run` it only says what it would do.
/// `progress(done, total)` is called after each message.
pub async fn replay(
    settings: &Settings,
    pool: &PgPool,
    letters: &[DeadLetter],
    options: &ReplayOptions,
    mut progress: impl FnMut(usize, usize),
) -> anyhow::Result<ReplayReport> {
    let mut report = ReplayReport {
        selected: letters.len(),
        dry_run: options.dry_run,
        ..ReplayReport::default()
    };
    let before = replayed_before(settings, pool, letters).await?;
    let mut todo = Vec::new();
    for dl in letters {
        match dl.original_topic() {
            _ if dl.parked() => report.skipped_parked.push(dl.id()),
            _ if !options.force && before.contains(&(dl.partition, dl.offset)) => {
                report.skipped_already_replayed.push(dl.id());
            }
            None => report.skipped_unknown_topic.push(dl.id()),
            Some(topic) => todo.push((dl, topic)),
        }
    }
    if options.dry_run || todo.is_empty() {
        report.would_replay = todo.iter().map(|(dl, _)| dl.id()).collect();
        return Ok(report);
    }
    let producer: FutureProducer = kafka::producer_config(
        &settings.kafka,
        Duration::from_millis(settings.relay.delivery_timeout_ms),
    )
    .create()?;
    let gap = Duration::from_secs_f64(1.0 / options.rate.max(0.001));
    let mut pace = tokio::time::interval(gap);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let total = todo.len();
    for (done, (dl, topic)) in todo.into_iter().enumerate() {
        pace.tick().await;
        publish(&producer, dl, &topic).await?;
        record_replay(settings, pool, options, dl, &topic).await?;
        report.replayed += 1;
        progress(done + 1, total);
    }
    Ok(report)
}

/// Which of `letters` were replayed before (`dlq_replays`), as (partition, offset).
async fn replayed_before(
    settings: &Settings,
    pool: &PgPool,
    letters: &[DeadLetter],
) -> Result<std::collections::HashSet<(i32, i64)>, sqlx::Error> {
    let partitions: Vec<i32> = letters.iter().map(|dl| dl.partition).collect();
    let offsets: Vec<i64> = letters.iter().map(|dl| dl.offset).collect();
    let rows = sqlx::query_as::<_, (i32, i64)>(
        r#"
        SELECT DISTINCT r.dlq_partition, r.dlq_offset
        FROM dlq_replays r
        JOIN unnest($2::int[], $3::bigint[]) AS s(dlq_partition, dlq_offset)
          ON s.dlq_partition = r.dlq_partition AND s.dlq_offset = r.dlq_offset
        WHERE r.dlq_topic = $1
        "#,
    )
    .bind(&settings.topics.dead_letter)
    .bind(&partitions)
    .bind(&offsets)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Sends a dead letter back to `topic` as it was: value, key and headers.
async fn publish(producer: &FutureProducer, dl: &DeadLetter, topic: &str) -> anyhow::Result<()> {
    let mut record = FutureRecord::to(topic)
        .payload(dl.payload.as_slice())
        .headers(kafka::record_headers(&dl.headers));
    if let Some(key) = &dl.key {
        record = record.key(key.as_slice());
    }
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| {
            anyhow::anyhow!("Failed to replay dead letter {} to {topic}: {e}", dl.id())
        })?;
    Ok(())
}

/// Records who replayed a dead letter, and where to.
async fn record_replay(
    settings: &Settings,
    pool: &PgPool,
    options: &ReplayOptions,
    dl: &DeadLetter,
    topic: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        r#"
        INSERT INTO dlq_replays
            (operator, dlq_topic, dlq_partition, dlq_offset, original_topic, event_id, error_class, attempts)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
        "#,
    )
    .bind(&options.operator)
    .bind(&settings.topics.dead_letter)
    .bind(dl.partition)
    .bind(dl.offset)
    .bind(topic)
    .bind(dl.event_id())
    .bind(dl.error_class())
    .bind(i32::try_from(dl.attempts()).unwrap_or(i32::MAX))
    .execute(pool)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(headers: &[(&str, &str)], payload: &str) -> DeadLetter {
        DeadLetter::new(
            1,
            7,
            DateTime::from_timestamp_millis(1_000_000),
            Some(b"42".to_vec()),
            payload.as_bytes().to_vec(),
            headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
                .collect(),
        )
    }

    #[test]
    fn filters_match_on_every_field_they_name() {
        let dl = letter(
            &[
                (ORIGINAL_TOPIC, "order.events"),
                (ERROR_CLASS, "NOT_JSON"),
                (CONSUMER_GROUP, "g"),
            ],
            r#"{"eventType": "OrderCreated", "eventId": "6f1c1b5e-2c3a-4d2e-9f00-000000000001"}"#,
        );
        assert!(Filter::default().matches(&dl));
        assert!(Filter {
            ids: vec![(1, 7)],
            ..Filter::default()
        }
        .matches(&dl));
        assert!(!Filter {
            ids: vec![(1, 8)],
            ..Filter::default()
        }
        .matches(&dl));
        assert!(Filter {
            error_class: Some("NOT_JSON".into()),
            event_type: Some("OrderCreated".into()),
            ..Filter::default()
        }
        .matches(&dl));
        assert!(!Filter {
            original_topic: Some("account.events".into()),
            ..Filter::default()
        }
        .matches(&dl));
        assert!(!Filter {
            since: DateTime::from_timestamp_millis(2_000_000),
            ..Filter::default()
        }
        .matches(&dl));
        assert!(Filter {
            until: DateTime::from_timestamp_millis(2_000_000),
            ..Filter::default()
        }
        .matches(&dl));
        assert_eq!(parse_id(" 3:15 "), Some((3, 15)));
        assert_eq!(parse_id("3-15"), None);
    }
}
