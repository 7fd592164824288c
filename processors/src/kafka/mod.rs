//! The Kafka edge: how producers and consumers are configured, the records read from the
//! broker, the size limits of the topics, and topic creation.

mod message;
mod topics;

pub use message::{fingerprint, InboundMessage};
pub use topics::create_topics;

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};

use crate::settings::KafkaSettings;

/// A received message's headers as owned (name, value) pairs, in order (a header without a
/// value has an empty one), and how many could not be read. rdkafka's header accessor panics
/// on a name that is not UTF-8 (it unwraps `CStr::to_str`), so each header is read on its own
/// under `catch_unwind` and such a header is counted instead of taking the thread down.
pub fn read_headers(message: &impl Message) -> (Vec<(String, Vec<u8>)>, usize) {
    let Some(headers) = message.headers() else {
        return (Vec::new(), 0);
    };
    let mut read = Vec::with_capacity(headers.count());
    let mut unreadable = 0;
    for i in 0..headers.count() {
        let header = std::panic::catch_unwind(AssertUnwindSafe(|| {
            headers.try_get(i).map(|h| {
                (
                    h.key.to_owned(),
                    h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                )
            })
        }));
        match header {
            Ok(Some(pair)) => read.push(pair),
            Ok(None) => {}
            Err(_) => unreadable += 1,
        }
    }
    (read, unreadable)
}

/// The headers `read_headers` can read; those it cannot are left out.
pub fn owned_headers(message: &impl Message) -> Vec<(String, Vec<u8>)> {
    read_headers(message).0
}

/// (key, value) pairs as the headers of a record to send, in order: the inverse of
/// `owned_headers`.
pub fn record_headers(headers: &[(String, Vec<u8>)]) -> OwnedHeaders {
    headers.iter().fold(
        OwnedHeaders::new_with_capacity(headers.len()),
        |out, (key, value)| {
            out.insert(Header {
                key,
                value: Some(value),
            })
        },
    )
}

pub fn base_config(kafka: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.brokers)
        .set("client.id", "paystream")
        .set("log_level", "4");
    config
}

/// An idempotent, `acks=all` producer: retries never duplicate or reorder within a partition.
pub fn producer_config(kafka: &KafkaSettings, delivery_timeout: Duration) -> ClientConfig {
    let mut config = base_config(kafka);
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", kafka.linger_ms.to_string())
        .set("compression.type", "lz4")
        .set("message.max.bytes", kafka.message_max_bytes.to_string())
        .set(
            "message.timeout.ms",
            delivery_timeout.as_millis().to_string(),
        );
    config
}

/// A group consumer whose positions come from PostgreSQL: Kafka-side commits only mirror
/// them for lag tools, and the application assigns partitions itself on rebalance.
pub fn consumer_config(kafka: &KafkaSettings, group: &str) -> ClientConfig {
    let mut config = base_config(kafka);
    config
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "roundrobin")
        .set("session.timeout.ms", kafka.session_timeout_ms.to_string())
        .set(
            "max.poll.interval.ms",
            kafka.max_poll_interval_ms.to_string(),
        )
        .set("fetch.wait.max.ms", kafka.fetch_wait_max_ms.to_string())
        // librdkafka wants fetch.max.bytes >= message.max.bytes (default 1,000,000).
        .set("message.max.bytes", kafka.message_max_bytes.to_string())
        .set("fetch.max.bytes", (kafka.message_max_bytes * 2).to_string())
        .set(
            "max.partition.fetch.bytes",
            kafka.message_max_bytes.to_string(),
        )
        // The client's own prefetch queue, bounded in bytes; it must hold one full fetch.
        .set(
            "queued.max.messages.kbytes",
            kafka
                .fetch_queue_max_kbytes
                .max(kafka.message_max_bytes * 2 / 1024)
                .to_string(),
        );
    config
}

/// How much larger than `kafka.message_max_bytes` a dead letter may be; the dead-letter
/// topic and the relay's producer allow that much more (see `dlq` for how a dead letter
/// stays within it).
pub const DEAD_LETTER_ALLOWANCE: usize = 64 * 1024;

/// The largest record the dead-letter topic takes: a dead letter is its message plus at most
/// [`DEAD_LETTER_ALLOWANCE`] bytes (provenance headers, and a key and copied headers of
/// bounded size).
pub fn dead_letter_max_bytes(kafka: &KafkaSettings) -> usize {
    kafka.message_max_bytes + DEAD_LETTER_ALLOWANCE
}
