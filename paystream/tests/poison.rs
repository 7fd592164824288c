//! Poison messages go to the dead-letter topic, atomically with the offset advance, and the
//! stream keeps flowing.

mod common;

use std::time::Duration;

use common::*;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use serde_json::json;
use uuid::Uuid;

/// Runs the account processor and the relay (with `settings`) until `letters` dead letters
/// arrived and `consumed` messages were applied, then stops them; returns the dead letters.
async fn dead_letters_after_processing(
    env: &TestEnv,
    settings: &paystream_processors::settings::Settings,
    letters: usize,
    consumed: i64,
) -> Vec<Received> {
    let dead = env.collect(&env.settings.topics.dead_letter);
    let worker = env.spawn_account_processor(settings.clone());
    let relay = spawn_worker(settings, paystream_processors::outbox::relay::run);
    let received = dead.wait_for(letters).await;
    env.wait_consumed(consumed).await;
    worker.stop().await;
    relay.stop().await;
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_poison_message_lands_on_the_dead_letter_topic_and_the_stream_keeps_flowing() {
    let env = TestEnv::new(1).await;
    let account = env.funded_account(7, 1_000).await;
    let created = |amount: serde_json::Value| {
        envelope(
            Uuid::new_v4(),
            "OrderCreated",
            json!({"orderId": 70, "orderNo": "ORD-70", "userId": 7, "amountFen": amount, "currency": "CNY",
                   "items": [{"sku": "A", "qty": 1, "priceFen": 1}], "idempotencyKey": "k"}),
        )
    };
    let mut huge = created(json!(1));
    huge.extend(std::iter::repeat_n(b' ', 2 * 1024 * 1024));
    let mut unknown_version: serde_json::Value =
        serde_json::from_slice(&created(json!(5))).expect("json");
    unknown_version["schemaVersion"] = json!(7);
    let poison: Vec<(&str, Vec<u8>)> = vec![
        ("NOT_JSON", b"this is not json".to_vec()),
        ("INVALID_UTF8", b"{\"eventId\": \"\xff\xfe\"}".to_vec()),
        (
            "SCHEMA_VIOLATION",
            envelope(
                Uuid::new_v4(),
                "OrderCreated",
                json!({"orderId": "seventy"}),
            ),
        ),
        (
            "UNKNOWN_EVENT_TYPE",
            envelope(Uuid::new_v4(), "OrderTeleported", json!({})),
        ),
        (
            "UNSUPPORTED_SCHEMA_VERSION",
            serde_json::to_vec(&unknown_version).expect("json"),
        ),
        ("INVALID_AMOUNT", created(json!(0))),
        ("INVALID_AMOUNT", created(json!(-100))),
        ("INVALID_AMOUNT", created(json!(9223372036854775808u64))),
        ("TOO_LARGE", huge),
    ];
    let producer = env.producer();
    for (_, value) in &poison {
        env.produce(&producer, "7", value).await;
    }
    env.produce(
        &producer,
        "7",
        &env.new_order(Uuid::new_v4(), 71, 7, 250).await,
    )
    .await;

    let letters =
        dead_letters_after_processing(&env, &env.settings, poison.len(), poison.len() as i64 + 1)
            .await;

    assert_eq!(
        letters.len(),
        poison.len(),
        "exactly one dead letter per poison message"
    );
    for (offset, (class, value)) in poison.iter().enumerate() {
        let letter = letters
            .iter()
            .find(|l| {
                l.headers.get("x-dlq-original-offset").map(String::as_str)
                    == Some(&offset.to_string())
            })
            .unwrap_or_else(|| panic!("no dead letter for offset {offset} ({class})"));
        assert_eq!(
            &letter.value, value,
            "dead letter keeps the original bytes ({class})"
        );
        assert_eq!(letter.key.as_deref(), Some(&b"7"[..]));
        let h = &letter.headers;
        assert_eq!(
            h.get("x-dlq-error-class").map(String::as_str),
            Some(*class),
            "offset {offset}"
        );
        assert_eq!(
            h.get("x-dlq-original-topic"),
            Some(&env.settings.topics.order_events)
        );
        assert_eq!(
            h.get("x-dlq-original-partition").map(String::as_str),
            Some("0")
        );
        assert_eq!(
            h.get("x-dlq-consumer-group"),
            Some(&env.settings.processor.account_group)
        );
        assert_eq!(h.get("x-dlq-attempts").map(String::as_str), Some("1"));
        assert!(h
            .get("x-dlq-error-message")
            .is_some_and(|m| !m.is_empty() && m.len() <= 1000));
        assert!(h
            .get("x-dlq-first-failed-at")
            .is_some_and(|t| chrono::DateTime::parse_from_rfc3339(t).is_ok()));
    }
    // The valid order behind them all was applied.
    assert_eq!(env.balance(account).await, 750);
    assert_eq!(
        env.scalar("SELECT count(*) FROM transfers WHERE kind = 'DEBIT'")
            .await,
        1
    );
    env.assert_invariants().await;
}

/// A debit the ledger refuses (the settlement account would leave the i64 range) is a dead
/// letter, and its dedupe row is not kept: once the cause is gone, the same event delivered
/// again (as `dlq replay` does) is applied, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debit_the_ledger_refuses_is_dead_lettered_and_applies_when_replayed_after_the_fix() {
    let env = TestEnv::new(1).await;
    // Funding ends at exactly i64::MIN; the big order then leaves the settlement account
    // 999 short of i64::MAX, and the second order of 1,000 cannot be credited to it.
    let small = env.funded_account(81, 1_000).await;
    let big_amount = i64::MAX - 999;
    let big = env.funded_account(82, big_amount).await;
    let refused = env.new_order(Uuid::new_v4(), 810, 81, 1_000).await;
    let producer = env.producer();
    env.produce(
        &producer,
        "82",
        &env.new_order(Uuid::new_v4(), 820, 82, big_amount).await,
    )
    .await;
    env.produce(&producer, "81", &refused).await;

    let dead = env.collect(&env.settings.topics.dead_letter);
    let worker = env.spawn_account_processor(env.settings.clone());
    let relay = env.spawn_relay();
    let letters = dead.wait_for(1).await;
    env.wait_consumed(2).await;
    assert_eq!(letters[0].value, refused);
    assert_eq!(
        letters[0]
            .headers
            .get("x-dlq-error-class")
            .map(String::as_str),
        Some("BALANCE_OVERFLOW")
    );
    assert_eq!(env.balance(small).await, 1_000);
    assert_eq!(
        env.scalar("SELECT count(*) FROM processed_events").await,
        1,
        "only the applied debit keeps its dedupe row"
    );

    // The fix: the big order is cancelled and refunded, which empties the settlement
    // account. Then the dead letter comes back.
    env.produce(
        &producer,
        "82",
        &env.cancel_order(Uuid::new_v4(), 820, 82, true).await,
    )
    .await;
    env.produce(&producer, "81", &refused).await;
    env.wait_consumed(4).await;
    worker.stop().await;
    relay.stop().await;

    assert_eq!(env.balance(small).await, 0);
    assert_eq!(env.balance(big).await, big_amount);
    assert_eq!(
        env.scalar("SELECT count(*) FROM transfers WHERE kind = 'DEBIT' AND order_id = 810")
            .await,
        1
    );
    assert_eq!(dead.snapshot().len(), 1, "the replay did not fail again");
    env.assert_invariants().await;
}

/// A dead letter is a little larger than its message (provenance headers). It must still go
/// through the relay, which publishes in id order: a row refused for its size would hold back
/// every event behind it. Its key and headers, none of them UTF-8 here, are the original's
/// bytes exactly. (When the outbox kept them as text, each invalid byte became three and
/// this message's dead letter was refused: the relay stalled on MessageSizeTooLarge.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_near_the_size_limit_with_a_binary_key_is_dead_lettered_and_the_stream_keeps_flowing(
) {
    let mut env = TestEnv::new(1).await;
    let limit = 64 * 1024;
    env.settings.kafka.message_max_bytes = limit;
    let account = env.funded_account(9, 1_000).await;
    // 62 KB on the wire, under the limit; as lossy text the key alone would be 36 KB.
    let key = vec![0xff_u8; 12_000];
    let value = vec![b'x'; 40_000];
    let mut headers = OwnedHeaders::new();
    for i in 0..10 {
        headers = headers.insert(Header {
            key: &format!("h{i}"),
            value: Some(&[0xfe_u8; 1_000][..]),
        });
    }
    let producer = env.producer();
    producer
        .send(
            FutureRecord::to(&env.settings.topics.order_events)
                .key(&key[..])
                .payload(&value[..])
                .headers(headers),
            Timeout::After(Duration::from_secs(30)),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("produce the poison message");
    env.produce(
        &producer,
        "9",
        &env.new_order(Uuid::new_v4(), 90, 9, 250).await,
    )
    .await;

    let dead = env.collect(&env.settings.topics.dead_letter);
    let events = env.collect(&env.settings.topics.account_events);
    let worker = env.spawn_account_processor(env.settings.clone());
    let relay = env.spawn_relay();
    let letters = dead.wait_for(1).await;
    wait_until("the AccountDebited behind the dead letter", || async {
        events
            .snapshot()
            .iter()
            .any(|m| m.json()["eventType"] == "AccountDebited")
            .then_some(())
    })
    .await;
    worker.stop().await;
    relay.stop().await;

    let letter = &letters[0];
    assert_eq!(letter.value, value, "the value is kept whole");
    let h = &letter.headers;
    assert_eq!(
        h.get("x-dlq-error-class").map(String::as_str),
        Some("NOT_JSON")
    );
    assert_eq!(letter.key.as_ref(), Some(&key), "the key is kept exactly");
    let copied: Vec<&(String, Vec<u8>)> = letter
        .header_bytes
        .iter()
        .filter(|(k, _)| k.starts_with('h'))
        .collect();
    assert_eq!(copied.len(), 10, "every original header is copied");
    assert!(copied.iter().all(|(_, v)| v == &vec![0xfe_u8; 1_000]));
    assert_eq!(h.get("x-dlq-key-lossy"), None);
    assert_eq!(h.get("x-dlq-headers-dropped"), None);
    assert_eq!(env.balance(account).await, 750);
    env.assert_invariants().await;
}

/// rdkafka's header accessor panics on a header name that is not UTF-8; read on the Kafka
/// thread, such a record used to kill the worker, again after every restart. It is now
/// dead-lettered with its reason, and the events behind it are applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_whose_header_name_is_not_utf8_is_dead_lettered_and_the_worker_goes_on() {
    assert_eq!(
        raw::crc32c(b"123456789"),
        0xE306_9283,
        "the raw producer's checksum"
    );
    let env = TestEnv::new(1).await;
    let account = env.funded_account(9, 1_000).await;
    let hostile = env.new_order(Uuid::new_v4(), 90, 9, 100).await;
    let records = [raw::RawRecord {
        key: Some(b"9".to_vec()),
        value: Some(hostile.clone()),
        headers: vec![
            (b"trace\xff\xfe".to_vec(), b"x".to_vec()),
            (b"origin".to_vec(), b"shop".to_vec()),
        ],
    }];
    raw::produce(&brokers(), &env.settings.topics.order_events, 0, &records).await;
    let producer = env.producer();
    env.produce(
        &producer,
        "9",
        &env.new_order(Uuid::new_v4(), 91, 9, 250).await,
    )
    .await;

    let letters = dead_letters_after_processing(&env, &env.settings, 1, 2).await;

    let letter = &letters[0];
    let header = |name: &str| letter.headers.get(name).map(String::as_str);
    assert_eq!(header("x-dlq-error-class"), Some("UNREADABLE_HEADERS"));
    assert_eq!(header("x-dlq-original-offset"), Some("0"));
    assert_eq!(header("x-dlq-headers-dropped"), Some("1"));
    assert_eq!(header("origin"), Some("shop"), "readable headers are kept");
    assert_eq!(letter.value, hostile, "the original value, byte for byte");
    assert_eq!(letter.key.as_deref(), Some(&b"9"[..]));
    assert_eq!(
        env.balance(account).await,
        750,
        "only the order behind the unreadable record was debited"
    );
    env.assert_invariants().await;
}

/// Memory is bounded in bytes, not only in messages: batches of large records hold at most
/// `processor.batch_max_bytes` (at least one record), and relay rounds at most
/// `relay.round_max_bytes` of payload, however many records fit the count limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_and_relay_rounds_of_large_records_stay_within_their_byte_budgets() {
    const RECORDS: usize = 12;
    let env = TestEnv::new(1).await;
    let mut settings = env.settings.clone();
    settings.processor.batch_max_bytes = 2 * 1024 * 1024;
    settings.relay.round_max_bytes = 2 * 1024 * 1024;
    let large = vec![b'x'; 900 * 1024]; // not JSON: each is dead-lettered whole
    let producer = env.producer();
    for _ in 0..RECORDS {
        env.produce(&producer, "5", &large).await;
    }
    dead_letters_after_processing(&env, &settings, RECORDS, RECORDS as i64).await;

    let metrics = &paystream_processors::telemetry::METRICS;
    let batches = metrics.batch_size.with_label_values(&["account"]);
    // Two 900 KiB records fit 2 MiB, a third does not: at least six batches.
    assert!(
        batches.get_sample_count() >= (RECORDS / 2) as u64,
        "{} batches for {RECORDS} records of 900 KiB",
        batches.get_sample_count()
    );
    assert_eq!(batches.get_sample_sum() as usize, RECORDS);
    let rounds = metrics.relay_round_rows.get_sample_count();
    assert!(
        rounds >= (RECORDS / 2) as u64,
        "{rounds} relay rounds for {RECORDS} dead letters of 900 KiB"
    );
}

/// SPEC §3: what fails its schema is poison. serde filled the envelope from a JSON array by
/// position, and the UUID parser took an eventId without hyphens, which the schema's pattern
/// refuses: both debited the user. Both are now dead-lettered, and the next event applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_that_is_an_array_or_whose_event_id_lacks_hyphens_moves_no_money() {
    let env = TestEnv::new(1).await;
    let account = env.funded_account(6, 1_000).await;
    let payload = |order: i64| {
        json!({"orderId": order, "orderNo": format!("ORD-{order}"), "userId": 6, "amountFen": 100,
               "currency": "CNY", "items": [{"sku": "A", "qty": 1, "priceFen": 100}],
               "idempotencyKey": format!("k-{order}")})
    };
    let as_array = json!([
        Uuid::new_v4(),
        "OrderCreated",
        1,
        "2026-01-01T00:00:00Z",
        payload(60)
    ]);
    let mut unhyphenated: serde_json::Value =
        serde_json::from_slice(&envelope(Uuid::new_v4(), "OrderCreated", payload(61)))
            .expect("json");
    unhyphenated["eventId"] = json!(Uuid::new_v4().simple().to_string());
    let producer = env.producer();
    for value in [&as_array, &unhyphenated] {
        env.produce(&producer, "6", &serde_json::to_vec(value).expect("json"))
            .await;
    }
    env.produce(
        &producer,
        "6",
        &env.new_order(Uuid::new_v4(), 62, 6, 250).await,
    )
    .await;

    let letters = dead_letters_after_processing(&env, &env.settings, 2, 3).await;

    for letter in &letters {
        assert_eq!(
            letter.headers.get("x-dlq-error-class").map(String::as_str),
            Some("SCHEMA_VIOLATION"),
            "{:?}",
            letter.headers
        );
    }
    assert_eq!(
        env.balance(account).await,
        750,
        "only the valid order was debited"
    );
    env.assert_invariants().await;
}
