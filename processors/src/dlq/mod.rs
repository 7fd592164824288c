//! Dead letters: a message that can never be processed is written, with its original bytes
//! and key, to the dead-letter topic (through the outbox, in the same transaction that
//! advances the offset past it). Headers say where it came from and why.
//!
//! A dead letter that was replayed and failed again counts one more attempt; from
//! `max_attempts` on it is marked parked (`x-dlq-parked: true`) and `paystream dlq replay`
//! leaves it alone, so a message that can never succeed is not looped.

pub mod tool;

use chrono::{SecondsFormat, Utc};

use crate::consumer::InboundMessage;
use crate::events::Poison;
use crate::outbox::OutboxRow;

pub const ORIGINAL_TOPIC: &str = "x-dlq-original-topic";
pub const ORIGINAL_PARTITION: &str = "x-dlq-original-partition";
pub const ORIGINAL_OFFSET: &str = "x-dlq-original-offset";
pub const CONSUMER_GROUP: &str = "x-dlq-consumer-group";
pub const ERROR_CLASS: &str = "x-dlq-error-class";
pub const ERROR_MESSAGE: &str = "x-dlq-error-message";
pub const FIRST_FAILED_AT: &str = "x-dlq-first-failed-at";
pub const ATTEMPTS: &str = "x-dlq-attempts";
pub const PARKED: &str = "x-dlq-parked";

const HEADER_PREFIX: &str = "x-dlq-";
/// Error messages are cut to this many characters (a 2 MiB payload must not echo itself).
const MAX_ERROR_MESSAGE: usize = 1000;

/// The dead-letter record for `msg`. A message that was itself replayed from the dead-letter
/// topic keeps its first-failed time and counts one more attempt.
pub fn dead_letter(
    topic: &str,
    group: &str,
    msg: &InboundMessage,
    poison: &Poison,
    max_attempts: u32,
) -> OutboxRow {
    let previous = |name: &str| {
        msg.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .map(str::to_owned)
    };
    let attempts = previous(ATTEMPTS)
        .and_then(|a| a.parse::<u32>().ok())
        .unwrap_or(0)
        + 1;
    let first_failed_at = previous(FIRST_FAILED_AT)
        .unwrap_or_else(|| Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true));
    let message: String = poison.message.chars().take(MAX_ERROR_MESSAGE).collect();

    let mut headers: Vec<(String, String)> = msg
        .headers
        .iter()
        .filter(|(k, _)| !k.starts_with(HEADER_PREFIX))
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
        .collect();
    headers.extend([
        (ORIGINAL_TOPIC.to_owned(), msg.topic.clone()),
        (ORIGINAL_PARTITION.to_owned(), msg.partition.to_string()),
        (ORIGINAL_OFFSET.to_owned(), msg.offset.to_string()),
        (CONSUMER_GROUP.to_owned(), group.to_owned()),
        (ERROR_CLASS.to_owned(), poison.class.as_str().to_owned()),
        (ERROR_MESSAGE.to_owned(), message),
        (FIRST_FAILED_AT.to_owned(), first_failed_at),
        (ATTEMPTS.to_owned(), attempts.to_string()),
    ]);
    if attempts >= max_attempts {
        headers.push((PARKED.to_owned(), "true".to_owned()));
    }
    OutboxRow {
        topic: topic.to_owned(),
        key: msg
            .key
            .as_ref()
            .map(|k| String::from_utf8_lossy(k).into_owned()),
        payload: msg.payload.clone().unwrap_or_default(),
        headers,
        event_id: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::PoisonClass;

    fn header<'a>(row: &'a OutboxRow, name: &str) -> Option<&'a str> {
        row.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn a_replayed_dead_letter_keeps_its_first_failure_and_counts_attempts() {
        let mut msg = InboundMessage {
            topic: "order.events".into(),
            partition: 3,
            offset: 99,
            key: Some(b"42".to_vec()),
            payload: Some(b"\xffgarbage".to_vec()),
            headers: vec![],
            timestamp: None,
        };
        let poison = Poison::new(PoisonClass::InvalidUtf8, "bad");
        let first = dead_letter("deadletter.events", "g", &msg, &poison, 3);
        assert_eq!(first.payload, b"\xffgarbage");
        assert_eq!(first.key.as_deref(), Some("42"));
        assert_eq!(header(&first, ATTEMPTS), Some("1"));
        assert_eq!(header(&first, ORIGINAL_OFFSET), Some("99"));
        assert_eq!(header(&first, ERROR_CLASS), Some("INVALID_UTF8"));

        msg.headers = first
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
            .collect();
        let second = dead_letter("deadletter.events", "g", &msg, &poison, 3);
        assert_eq!(header(&second, ATTEMPTS), Some("2"));
        assert_eq!(
            header(&second, FIRST_FAILED_AT),
            header(&first, FIRST_FAILED_AT)
        );
        assert_eq!(
            second.headers.iter().filter(|(k, _)| k == ATTEMPTS).count(),
            1
        );
        assert_eq!(header(&second, PARKED), None);

        msg.headers = second
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
            .collect();
        let third = dead_letter("deadletter.events", "g", &msg, &poison, 3);
        assert_eq!(header(&third, ATTEMPTS), Some("3"));
        assert_eq!(
            header(&third, PARKED),
            Some("true"),
            "parked at the limit, not looped"
        );
    }
}
