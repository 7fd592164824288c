//! The audit's checks of stored consumer offsets against the broker: within the log, the
//! same log the group applied, and moving.

use std::time::Duration;

use sqlx::PgPool;

use super::Violation;
use crate::settings::Settings;

/// Stored consumer offsets must never be ahead of their topic's high watermark: an offset
/// past the end of the log means positions were written for messages that do not exist (a
/// restored database against a newer or recreated topic, or a bug). And the message just
/// before a stored offset, when still in the log, must be the one the group applied (its
/// fingerprint, stored by the same compare-and-set): a topic recreated under the database
/// and grown past the stored offset passes the first check but not this one. The workers
/// hold such a partition; this says so before they start (after a restore, say). And a
/// group with messages waiting in a partition must have moved its stored offset within
/// `audit.stall_after_s`: a stopped, held or stuck worker is a stall, and correct but stopped
/// is an outage. Asks the broker, so it runs in `paystream audit`, not in the database-only
/// `check`.
pub async fn check_offsets(pool: &PgPool, settings: &Settings) -> anyhow::Result<Vec<Violation>> {
    let stored: Vec<Stored> = sqlx::query_as(
        r#"
        SELECT consumer_group, topic, partition, next_offset, last_message_fp,
               extract(epoch FROM now() - updated_at)::float8
        FROM consumer_offsets ORDER BY 1, 2, 3
        "#,
    )
    .fetch_all(pool)
    .await?;
    if stored.is_empty() {
        return Ok(Vec::new());
    }
    let kafka = settings.kafka.clone();
    let stall_after = settings.audit.stall_after_s as f64;
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let client: BaseConsumer = crate::kafka::base_config(&kafka).create()?;
        let reader = log_reader(&kafka)?;
        let mut violations = Vec::new();
        for (group, topic, partition, next_offset, fingerprint, idle_s) in stored {
            let (low, high) = match client.fetch_watermarks(&topic, partition, Duration::from_secs(10)) {
                Ok(watermarks) => watermarks,
                // A log that does not exist has no messages: a stored position after its
                // first message is past its end (a deleted or recreated topic, or a database
                // restored from elsewhere).
                Err(e) if names_a_missing_log(&e) => {
                    if next_offset > 0 {
                        violations.push(Violation {
                            invariant: "stored_offsets_within_the_log",
                            detail: format!("{group} {topic}/{partition}: stored offset {next_offset}, but the broker has no such topic or partition"),
                        });
                    }
                    continue;
                }
                Err(e) => anyhow::bail!("Failed to read the watermarks of {topic}/{partition}: {e}"),
            };
            if let Some(stall) = stalled(next_offset, high, idle_s, stall_after) {
                violations.push(Violation {
                    invariant: "consumer_groups_make_progress",
                    detail: format!("{group} {topic}/{partition}: {stall}"),
                });
            }
            let last = next_offset - 1;
            // A broker may report the high watermark at the start of the last record batch
            // (tansu 0.6 does), so a stored offset past it is read for before it is called
            // a violation.
            let found = if last < low {
                None // applied and since removed by retention: nothing to compare
            } else if next_offset > high || fingerprint.is_some() {
                read_from(&reader, &topic, partition, (high - 1).min(last).max(0), last)?
            } else {
                None
            };
            if next_offset > high && found.is_none() {
                violations.push(Violation {
                    invariant: "stored_offsets_within_the_log",
                    detail: format!("{group} {topic}/{partition}: stored offset {next_offset} is past the high watermark {high}"),
                });
                continue;
            }
            if let (Some(stored), Some((offset, in_log))) = (fingerprint, found) {
                if offset == last && in_log != stored {
                    violations.push(Violation {
                        invariant: "stored_offsets_match_the_log",
                        detail: format!("{group} {topic}/{partition}: the message at {last}, before the stored offset, is not the one this group applied (the topic was recreated, or the database restored next to another cluster)"),
                    });
                }
            }
        }
        Ok(violations)
    })
    .await?
}

/// A stored offset as the audit reads it: group, topic, partition, next offset, fingerprint,
/// and seconds since it last moved (or was claimed).
type Stored = (String, String, i32, i64, Option<i64>, f64);

/// Whether a partition with messages waiting (its high watermark past the stored offset)
/// has stood still for longer than `stall_after` seconds; says how, if so.
fn stalled(next_offset: i64, high: i64, idle_s: f64, stall_after: f64) -> Option<String> {
    let waiting = high - next_offset;
    (stall_after > 0.0 && waiting > 0 && idle_s > stall_after).then(|| {
        format!("{waiting} message(s) waiting and the stored offset {next_offset} has not moved for {idle_s:.0} s (a stopped, held or stuck worker; see docs/operations.md)")
    })
}

fn log_reader(
    kafka: &crate::settings::KafkaSettings,
) -> anyhow::Result<rdkafka::consumer::BaseConsumer> {
    Ok(crate::kafka::base_config(kafka)
        .set("group.id", "paystream-audit")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()?)
}

/// Reads `topic`/`partition` from `from` to the first message at or after `target`, and
/// returns its offset and fingerprint (as `kafka::fingerprint` computes it when the
/// message is applied); `None` at the end of the log.
fn read_from(
    reader: &rdkafka::consumer::BaseConsumer,
    topic: &str,
    partition: i32,
    from: i64,
    target: i64,
) -> anyhow::Result<Option<(i64, i64)>> {
    use rdkafka::consumer::Consumer;
    use rdkafka::error::KafkaError;
    use rdkafka::message::Message;
    use rdkafka::types::RDKafkaErrorCode;
    use rdkafka::{Offset, TopicPartitionList};

    let mut at = TopicPartitionList::new();
    at.add_partition_offset(topic, partition, Offset::Offset(from))?;
    reader.assign(&at)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while let Some(wait) = deadline.checked_duration_since(std::time::Instant::now()) {
        match reader.poll(wait) {
            Some(Ok(m))
                if m.topic() == topic && m.partition() == partition && m.offset() >= target =>
            {
                let fingerprint =
                    crate::kafka::fingerprint(m.key(), m.payload(), m.timestamp().to_millis());
                return Ok(Some((m.offset(), fingerprint)));
            }
            Some(Ok(_)) => {}
            Some(Err(KafkaError::PartitionEOF(p))) if p == partition => return Ok(None),
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(e)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::OffsetOutOfRange) => {
                return Ok(None)
            }
            Some(Err(e)) => anyhow::bail!("Failed to read {topic}/{partition}: {e}"),
            None => break,
        }
    }
    Ok(None)
}

/// The broker's (or librdkafka's) word that a topic or partition does not exist.
fn names_a_missing_log(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as Code;
    matches!(
        e.rdkafka_error_code(),
        Some(Code::UnknownTopicOrPartition | Code::UnknownTopic | Code::UnknownPartition)
    )
}

#[cfg(test)]
mod tests {
    use super::stalled;

    #[test]
    fn a_partition_is_stalled_only_with_messages_waiting_and_no_move_for_longer_than_the_limit() {
        // (next offset, high watermark, idle seconds, limit, stalled)
        let cases = [
            (10, 10, 900.0, 120.0, false), // nothing waiting: an idle topic is no stall
            (10, 9, 900.0, 120.0, false),  // a high watermark reported early (tansu)
            (10, 15, 60.0, 120.0, false),  // moved recently
            (10, 15, 121.0, 120.0, true),
            (0, 1, 121.0, 120.0, true),
            (10, 15, 900.0, 0.0, false), // the check is off
        ];
        for (next, high, idle, limit, expected) in cases {
            let got = stalled(next, high, idle, limit);
            assert_eq!(
                got.is_some(),
                expected,
                "{next} {high} {idle} {limit}: {got:?}"
            );
        }
    }
}
