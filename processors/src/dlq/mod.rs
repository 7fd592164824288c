//! Dead letters: a message that can never be processed is written, with its original bytes
//! and key, to the dead-letter topic (through the outbox, in the same transaction that
//! advances the offset past it). Headers say where it came from and why.
//!
//! A dead letter that was replayed and failed again counts one more attempt; from
//! `max_attempts` on it is marked parked (`x-dlq-parked: true`) and `paystream dlq replay`
//! leaves it alone, so a message that can never succeed is not looped.
//!
//! A dead letter always fits on its topic. The relay publishes the outbox in id order, so a
//! row the broker refuses for its size would hold back every event behind it. A dead letter
//! is the original message plus at most [`crate::kafka::DEAD_LETTER_ALLOWANCE`] bytes, and
//! the dead-letter topic and the relay's producer allow `kafka.message_max_bytes` plus that
//! much:
//! - the key and the header values are kept as the bytes they were (the outbox stores bytes
//!   that are not UTF-8 as such), so a replay lands on the original's partition;
//! - provenance headers are small (the error message is cut to 1,000 characters);
//! - the original headers are copied only up to [`COPIED_HEADERS_MAX`] bytes, the rest
//!   counted in `x-dlq-headers-dropped`;
//! - a key longer than [`KEY_MAX`] or a value larger than `kafka.message_max_bytes` (a source
//!   topic that allows more than paystream is configured for) is cut, flagged
//!   (`x-dlq-key-truncated-from`, `x-dlq-payload-truncated-from`) and parked: it cannot be
//!   replayed as it was.
//!
//! Dead letters written before keys were kept as bytes may carry `x-dlq-key-lossy: true`
//! (their key is a lossy text form of the original); that flag is kept if they fail again.

pub mod tool;

use chrono::{SecondsFormat, Utc};

use crate::events::Poison;
use crate::kafka::InboundMessage;
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
pub const KEY_LOSSY: &str = "x-dlq-key-lossy";
pub const HEADERS_DROPPED: &str = "x-dlq-headers-dropped";
pub const PAYLOAD_TRUNCATED_FROM: &str = "x-dlq-payload-truncated-from";
pub const KEY_TRUNCATED_FROM: &str = "x-dlq-key-truncated-from";

/// Most bytes of original headers (names and values) a dead letter copies.
pub const COPIED_HEADERS_MAX: usize = 16 * 1024;
/// Longest key a dead letter keeps whole.
pub const KEY_MAX: usize = 16 * 1024;

const HEADER_PREFIX: &str = "x-dlq-";
/// Error messages are cut to this many characters (a 2 MiB payload must not echo itself).
const MAX_ERROR_MESSAGE: usize = 1000;

/// The dead-letter record for `msg`. A message that was itself replayed from the dead-letter
/// topic keeps its first-failed time and counts one more attempt. `message_max_bytes` is
/// the largest value it keeps whole (see the module documentation for the size bound).
pub fn dead_letter(
    topic: &str,
    group: &str,
    msg: &InboundMessage,
    poison: &Poison,
    max_attempts: u32,
    message_max_bytes: usize,
) -> OutboxRow {
    let previous = |name: &str| header_text(&msg.headers, name);
    let attempts = previous(ATTEMPTS)
        .and_then(|a| a.parse::<u32>().ok())
        .unwrap_or(0)
        + 1;
    let first_failed_at = previous(FIRST_FAILED_AT)
        .unwrap_or_else(|| Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true));
    let message: String = poison.message.chars().take(MAX_ERROR_MESSAGE).collect();

    let (mut headers, copy_dropped) = copied_headers(&msg.headers);
    // Headers that could not be read at all (a name that is not UTF-8) are dropped too.
    let mut dropped = copy_dropped + msg.unreadable_headers;
    let mut provenance =
        |name: &str, value: String| headers.push((name.to_owned(), value.into_bytes()));
    // What an earlier failure of a replayed dead letter already lost stays said.
    dropped += previous(HEADERS_DROPPED)
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(0);
    if dropped > 0 {
        provenance(HEADERS_DROPPED, dropped.to_string());
    }
    if previous(KEY_LOSSY).is_some() {
        provenance(KEY_LOSSY, "true".to_owned());
    }
    let mut parked = attempts >= max_attempts;
    let mut key = msg.key.clone();
    if let Some(key) = key.as_mut().filter(|k| k.len() > KEY_MAX) {
        provenance(KEY_TRUNCATED_FROM, key.len().to_string());
        key.truncate(KEY_MAX);
        parked = true;
    }
    let mut payload = msg.payload.clone().unwrap_or_default();
    if payload.len() > message_max_bytes {
        provenance(PAYLOAD_TRUNCATED_FROM, payload.len().to_string());
        payload.truncate(message_max_bytes);
        parked = true;
    }
    provenance(ORIGINAL_TOPIC, msg.topic.clone());
    provenance(ORIGINAL_PARTITION, msg.partition.to_string());
    provenance(ORIGINAL_OFFSET, msg.offset.to_string());
    provenance(CONSUMER_GROUP, group.to_owned());
    provenance(ERROR_CLASS, poison.class.as_str().to_owned());
    provenance(ERROR_MESSAGE, message);
    provenance(FIRST_FAILED_AT, first_failed_at);
    provenance(ATTEMPTS, attempts.to_string());
    if parked {
        provenance(PARKED, "true".to_owned());
    }
    OutboxRow {
        topic: topic.to_owned(),
        key,
        payload,
        headers,
        event_id: None,
    }
}

/// A header's value as text, when it is there and UTF-8.
fn header_text(headers: &[(String, Vec<u8>)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
        .map(str::to_owned)
}

/// The original headers a dead letter keeps (none of an earlier dead letter's provenance), up
/// to `COPIED_HEADERS_MAX` bytes of names and values, and how many did not fit.
fn copied_headers(headers: &[(String, Vec<u8>)]) -> (Vec<(String, Vec<u8>)>, usize) {
    let mut kept = Vec::new();
    let (mut copied, mut dropped) = (0, 0);
    for (k, v) in headers
        .iter()
        .filter(|(k, _)| !k.starts_with(HEADER_PREFIX))
    {
        if copied + k.len() + v.len() > COPIED_HEADERS_MAX {
            dropped += 1;
            continue;
        }
        copied += k.len() + v.len();
        kept.push((k.clone(), v.clone()));
    }
    (kept, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::PoisonClass;

    fn header<'a>(row: &'a OutboxRow, name: &str) -> Option<&'a str> {
        row.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    fn message(key: &[u8], payload: Vec<u8>, headers: Vec<(String, Vec<u8>)>) -> InboundMessage {
        InboundMessage {
            topic: "order.events".into(),
            partition: 3,
            offset: 99,
            key: Some(key.to_vec()),
            payload: Some(payload),
            headers,
            unreadable_headers: 0,
            timestamp: None,
        }
    }

    #[test]
    fn a_replayed_dead_letter_keeps_its_first_failure_and_counts_attempts() {
        let mut msg = message(b"42", b"\xffgarbage".to_vec(), vec![]);
        let poison = Poison::new(PoisonClass::InvalidUtf8, "bad");
        let first = dead_letter("deadletter.events", "g", &msg, &poison, 3, 1 << 20);
        assert_eq!(first.payload, b"\xffgarbage");
        assert_eq!(first.key.as_deref(), Some(&b"42"[..]));
        assert_eq!(header(&first, ATTEMPTS), Some("1"));
        assert_eq!(header(&first, ORIGINAL_OFFSET), Some("99"));
        assert_eq!(header(&first, ERROR_CLASS), Some("INVALID_UTF8"));

        msg.headers = first.headers.clone();
        let second = dead_letter("deadletter.events", "g", &msg, &poison, 3, 1 << 20);
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

        msg.headers = second.headers.clone();
        let third = dead_letter("deadletter.events", "g", &msg, &poison, 3, 1 << 20);
        assert_eq!(header(&third, ATTEMPTS), Some("3"));
        assert_eq!(
            header(&third, PARKED),
            Some("true"),
            "parked at the limit, not looped"
        );
    }

    /// The size a dead letter takes on the wire, roughly: key, value, and every header.
    fn wire_size(row: &OutboxRow) -> usize {
        row.key.as_ref().map_or(0, Vec::len)
            + row.payload.len()
            + row
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + 2)
                .sum::<usize>()
    }

    #[test]
    fn a_dead_letter_keeps_binary_keys_and_headers_and_is_never_more_than_the_allowance_larger() {
        let limit = 64 * 1024;
        // Not UTF-8 anywhere.
        let key = vec![0xff; 12_000];
        let value = vec![b'x'; limit - key.len() - 1];
        let headers: Vec<(String, Vec<u8>)> = (0..40)
            .map(|i| (format!("h{i}"), vec![0xfe; 1_000]))
            .collect();
        let original = key.len()
            + value.len()
            + headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        let msg = message(&key, value.clone(), headers.clone());
        let poison = Poison::new(PoisonClass::NotJson, "x".repeat(5_000).as_str());
        let letter = dead_letter("deadletter.events", "g", &msg, &poison, 3, limit);
        assert!(
            wire_size(&letter) <= original + crate::kafka::DEAD_LETTER_ALLOWANCE / 2,
            "{} bytes from a {original}-byte message",
            wire_size(&letter)
        );
        assert_eq!(letter.payload, value, "the value is kept whole");
        assert_eq!(letter.key, Some(key), "the key is kept exactly");
        let copied: Vec<&(String, Vec<u8>)> = letter
            .headers
            .iter()
            .filter(|(k, _)| k.starts_with('h'))
            .collect();
        assert!(!copied.is_empty());
        for (k, v) in &copied {
            assert!(
                headers.contains(&(k.clone(), v.clone())),
                "{k} kept exactly"
            );
        }
        let dropped: usize = header(&letter, HEADERS_DROPPED)
            .and_then(|n| n.parse().ok())
            .expect("dropped count");
        assert_eq!(dropped, 40 - copied.len());
        assert_eq!(header(&letter, KEY_LOSSY), None);
        assert_eq!(header(&letter, PARKED), None);

        // Replayed and failing again: the key is still the original's, and what was lost
        // stays said.
        let mut again = msg.clone();
        again.key = letter.key.clone();
        again.headers = letter.headers.clone();
        let second = dead_letter("deadletter.events", "g", &again, &poison, 3, limit);
        assert_eq!(second.key, msg.key);
        assert_eq!(
            header(&second, HEADERS_DROPPED),
            Some(dropped.to_string().as_str())
        );
    }

    #[test]
    fn a_key_longer_than_the_limit_is_cut_flagged_and_parked() {
        let msg = message(&[0xff; KEY_MAX + 10], b"x".to_vec(), vec![]);
        let poison = Poison::new(PoisonClass::NotJson, "bad");
        let letter = dead_letter("deadletter.events", "g", &msg, &poison, 3, 1 << 20);
        assert_eq!(letter.key.as_ref().map(Vec::len), Some(KEY_MAX));
        let expected = (KEY_MAX + 10).to_string();
        assert_eq!(header(&letter, KEY_TRUNCATED_FROM), Some(expected.as_str()));
        assert_eq!(header(&letter, PARKED), Some("true"));
    }

    #[test]
    fn a_value_larger_than_the_limit_is_cut_flagged_and_parked() {
        let msg = message(b"7", vec![b'x'; 5_000], vec![]);
        let poison = Poison::new(PoisonClass::TooLarge, "too large");
        let letter = dead_letter("deadletter.events", "g", &msg, &poison, 3, 4_096);
        assert_eq!(letter.payload.len(), 4_096);
        assert_eq!(header(&letter, PAYLOAD_TRUNCATED_FROM), Some("5000"));
        assert_eq!(
            header(&letter, PARKED),
            Some("true"),
            "cannot be replayed as it was"
        );
        assert_eq!(letter.key.as_deref(), Some(&b"7"[..]));
        assert_eq!(header(&letter, KEY_TRUNCATED_FROM), None);
    }

    #[test]
    fn a_letter_from_before_keys_were_bytes_stays_flagged_lossy_when_it_fails_again() {
        let msg = message(
            "\u{fffd}\u{fffd}".as_bytes(),
            b"x".to_vec(),
            vec![(KEY_LOSSY.to_owned(), b"true".to_vec())],
        );
        let poison = Poison::new(PoisonClass::NotJson, "bad");
        let letter = dead_letter("deadletter.events", "g", &msg, &poison, 3, 1 << 20);
        assert_eq!(header(&letter, KEY_LOSSY), Some("true"));
    }
}
