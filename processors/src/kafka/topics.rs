//! `paystream topics create`: creates the three topics, and checks the ones that exist
//! already against what paystream needs of them, saying exactly what differs.
//!
//! The event topics it creates take no record larger than the processors read
//! (`processor.max_event_bytes`, or `kafka.message_max_bytes` if smaller): a larger one is
//! refused to its producer instead of reaching a processor only to be dead-lettered. The
//! dead-letter topic takes `kafka.message_max_bytes` plus the dead-letter allowance.
//!
//! A topic whose `max.message.bytes` is below what paystream sends to it refuses records the
//! relay must publish (a dead letter of a large message, say), which would hold back every
//! row behind it: that is an error. A partition count other than `kafka.partitions`, and a
//! retention longer than the dedupe window (`processor.dedupe_retention_hours`: a copy of an
//! event read after its id was pruned would be applied again) are warnings.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use super::{base_config, dead_letter_max_bytes};
use crate::settings::Settings;

/// What paystream needs of one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wanted {
    name: String,
    partitions: i32,
    max_message_bytes: usize,
}

/// What the broker says of an existing topic; `None` where it did not say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Found {
    partitions: Option<i32>,
    max_message_bytes: Option<usize>,
    retention_ms: Option<i64>,
}

/// How an existing topic differs from what paystream needs.
#[derive(Debug, Default, PartialEq, Eq)]
struct Differences {
    errors: Vec<String>,
    warnings: Vec<String>,
}

/// Creates `topics.order_events`, `topics.account_events` and `topics.dead_letter`; checks
/// those that exist already and fails when one cannot take what paystream sends to it.
pub async fn create_topics(settings: &Settings) -> anyhow::Result<()> {
    let kafka = &settings.kafka;
    let wanted = wanted(settings);
    let admin: AdminClient<DefaultClientContext> = base_config(kafka).create()?;
    let max_bytes: Vec<String> = wanted
        .iter()
        .map(|w| w.max_message_bytes.to_string())
        .collect();
    let new_topics: Vec<NewTopic<'_>> = wanted
        .iter()
        .zip(&max_bytes)
        .map(|(w, max)| {
            let replication = TopicReplication::Fixed(kafka.replication_factor);
            NewTopic::new(&w.name, w.partitions, replication).set("max.message.bytes", max)
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let mut existing = Vec::new();
    for result in admin.create_topics(&new_topics, &options).await? {
        match result {
            Ok(name) => {
                tracing::info!(topic = %name, partitions = kafka.partitions, "topic created")
            }
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => existing.push(name),
            Err((name, code)) => {
                return Err(KafkaError::AdminOp(code))
                    .map_err(|e| anyhow::anyhow!("Failed to create topic {name}: {e}"))
            }
        }
    }
    let mut errors = Vec::new();
    for w in wanted.iter().filter(|w| existing.contains(&w.name)) {
        let found = describe(&admin, &w.name).await;
        let diff = compare(w, &found, dedupe_window_ms(settings));
        for warning in &diff.warnings {
            tracing::warn!(topic = %w.name, "{warning}");
        }
        errors.extend(diff.errors.into_iter().map(|e| format!("{}: {e}", w.name)));
        tracing::info!(topic = %w.name, "topic already exists; checked");
    }
    anyhow::ensure!(
        errors.is_empty(),
        "existing topics cannot take what paystream sends to them: {} (raise max.message.bytes with kafka-configs --alter, or lower kafka.message_max_bytes)",
        errors.join("; ")
    );
    Ok(())
}

/// How long processed event ids are kept, in milliseconds; `None` when they are kept forever.
fn dedupe_window_ms(settings: &Settings) -> Option<i64> {
    let hours = settings.processor.dedupe_retention_hours;
    (hours > 0).then(|| (hours.min(876_000) * 3_600_000) as i64)
}

fn wanted(settings: &Settings) -> Vec<Wanted> {
    let (kafka, topics) = (&settings.kafka, &settings.topics);
    let event = settings
        .processor
        .max_event_bytes
        .min(kafka.message_max_bytes);
    [
        (&topics.order_events, event),
        (&topics.account_events, event),
        (&topics.dead_letter, dead_letter_max_bytes(kafka)),
    ]
    .into_iter()
    .map(|(name, max_message_bytes)| Wanted {
        name: name.clone(),
        partitions: kafka.partitions,
        max_message_bytes,
    })
    .collect()
}

/// Reads partitions, `max.message.bytes` and `retention.ms` of an existing topic; what the
/// broker does not answer stays `None` (and is said in the log).
async fn describe(admin: &AdminClient<DefaultClientContext>, name: &str) -> Found {
    let mut found = Found::default();
    match admin
        .inner()
        .fetch_metadata(Some(name), Duration::from_secs(10))
    {
        Ok(metadata) => {
            found.partitions = metadata
                .topics()
                .iter()
                .find(|t| t.name() == name)
                .map(|t| t.partitions().len() as i32);
        }
        Err(e) => tracing::warn!(topic = name, error = %e, "cannot read the topic's partitions"),
    }
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let spec = [ResourceSpecifier::Topic(name)];
    match admin.describe_configs(&spec, &options).await {
        Ok(results) => match results.into_iter().next() {
            Some(Ok(resource)) => {
                let value = |key: &str| resource.get(key).and_then(|e| e.value.clone());
                found.max_message_bytes = value("max.message.bytes").and_then(|v| v.parse().ok());
                found.retention_ms = value("retention.ms").and_then(|v| v.parse().ok());
            }
            Some(Err(code)) => {
                tracing::warn!(topic = name, ?code, "cannot read the topic's configuration")
            }
            None => {}
        },
        Err(e) => tracing::warn!(topic = name, error = %e, "cannot read the topic's configuration"),
    }
    found
}

/// How `found` differs from `wanted`; `dedupe_window_ms` is how long processed event ids are
/// kept (`None`: forever, or unknown).
fn compare(wanted: &Wanted, found: &Found, dedupe_window_ms: Option<i64>) -> Differences {
    let mut diff = Differences::default();
    if let Some(max) = found
        .max_message_bytes
        .filter(|max| *max < wanted.max_message_bytes)
    {
        diff.errors.push(format!(
            "max.message.bytes is {max}, paystream sends records of up to {} bytes",
            wanted.max_message_bytes
        ));
    }
    if let Some(partitions) = found.partitions.filter(|p| *p != wanted.partitions) {
        diff.warnings.push(format!(
            "has {partitions} partitions, kafka.partitions is {}: at most {partitions} workers of a group share it",
            wanted.partitions
        ));
    }
    if let (Some(retention), Some(window)) = (found.retention_ms, dedupe_window_ms) {
        // retention.ms -1 keeps records forever.
        if retention < 0 || retention > window {
            diff.warnings.push(format!(
                "retention.ms is {retention}, longer than the dedupe window ({window} ms, processor.dedupe_retention_hours): an event read again after its id was pruned would be applied again"
            ));
        }
    }
    diff
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted() -> Wanted {
        Wanted {
            name: "order.events".into(),
            partitions: 6,
            max_message_bytes: 1_000,
        }
    }

    #[test]
    fn an_existing_topic_is_compared_with_what_paystream_needs() {
        let day = 24 * 3600 * 1000;
        let found = |partitions, max, retention| Found {
            partitions,
            max_message_bytes: max,
            retention_ms: retention,
        };
        // (found, dedupe window, errors, warnings)
        let cases = [
            (found(Some(6), Some(1_000), Some(day)), Some(7 * day), 0, 0),
            (found(Some(6), Some(999), Some(day)), Some(7 * day), 1, 0),
            (found(Some(3), Some(5_000), Some(day)), Some(7 * day), 0, 1),
            (
                found(Some(6), Some(1_000), Some(8 * day)),
                Some(7 * day),
                0,
                1,
            ),
            (found(Some(6), Some(1_000), Some(-1)), Some(7 * day), 0, 1),
            (found(Some(6), Some(1_000), Some(-1)), None, 0, 0),
            (found(None, None, None), Some(7 * day), 0, 0),
            (found(Some(1), Some(10), Some(-1)), Some(day), 1, 2),
        ];
        for (found, window, errors, warnings) in cases {
            let diff = compare(&wanted(), &found, window);
            assert_eq!(
                (diff.errors.len(), diff.warnings.len()),
                (errors, warnings),
                "{found:?} {window:?}: {diff:?}"
            );
        }
    }
}
