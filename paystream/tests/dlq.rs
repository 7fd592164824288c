//! `paystream dlq` against the real broker and PostgreSQL: list and filter, show, replay,
//! dry run, replaying twice, and parking a message that keeps failing.

mod common;

use common::*;
use paystream_processors::dlq;
use serde_json::{json, Value};
use uuid::Uuid;

/// Runs `paystream dlq <args>` on `env`; returns stdout, asserting success.
async fn run_dlq(env: &TestEnv, args: &[&str]) -> String {
    let mut all = vec!["dlq"];
    all.extend_from_slice(args);
    let out = env
        .spawn_child_piped(&all, &[("PAYSTREAM__DLQ__READ_IDLE_MS", "1000")])
        .wait_with_output()
        .await
        .expect("dlq runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "paystream {all:?} failed: {stdout}");
    stdout
}

fn json_lines(out: &str) -> Vec<Value> {
    out.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The last line of `dlq replay`: its JSON report.
fn report(out: &str) -> Value {
    out.lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null)
}

/// Puts a dead letter on the dead-letter topic as the processor writes them.
async fn put_dead_letter(env: &TestEnv, key: &str, payload: &[u8], class: &str, attempts: u32) {
    let attempts = attempts.to_string();
    let headers = [
        (
            dlq::ORIGINAL_TOPIC,
            env.settings.topics.order_events.as_str(),
        ),
        (dlq::ORIGINAL_PARTITION, "0"),
        (dlq::ORIGINAL_OFFSET, "0"),
        (
            dlq::CONSUMER_GROUP,
            env.settings.processor.account_group.as_str(),
        ),
        (dlq::ERROR_CLASS, class),
        (dlq::ERROR_MESSAGE, "left behind by an earlier release"),
        (dlq::FIRST_FAILED_AT, "2026-11-01T00:00:00.000Z"),
        (dlq::ATTEMPTS, attempts.as_str()),
    ];
    produce_to(
        &env.producer(),
        &env.settings.topics.dead_letter,
        key,
        payload,
        &headers,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_finds_poison_messages_with_their_reasons_and_its_filters_work() {
    let env = TestEnv::new(1).await;
    env.funded_account(1, 1_000).await;
    let dead = env.collect(&env.settings.topics.dead_letter);
    let producer = env.producer();
    env.produce(&producer, "1", b"not json at all").await;
    env.produce(
        &producer,
        "1",
        &envelope(Uuid::new_v4(), "OrderShipped", json!({})),
    )
    .await;
    env.produce(
        &producer,
        "1",
        &env.new_order(Uuid::new_v4(), 9, 1, 0).await,
    )
    .await;
    env.produce(
        &producer,
        "1",
        &env.new_order(Uuid::new_v4(), 10, 1, 100).await,
    )
    .await;
    let worker = env.spawn_account_processor(env.settings.clone());
    let relay = env.spawn_relay();
    dead.wait_for(3).await;
    worker.stop().await;
    relay.stop().await;

    let all = json_lines(&run_dlq(&env, &["list", "--json"]).await);
    let mut classes: Vec<&str> = all
        .iter()
        .filter_map(|d| d["errorClass"].as_str())
        .collect();
    classes.sort_unstable();
    assert_eq!(
        classes,
        ["INVALID_AMOUNT", "NOT_JSON", "UNKNOWN_EVENT_TYPE"],
        "{all:?}"
    );
    assert!(all
        .iter()
        .all(|d| d["originalTopic"] == env.settings.topics.order_events.as_str()));
    assert!(all
        .iter()
        .all(|d| d["consumerGroup"] == env.settings.processor.account_group.as_str()));

    let not_json =
        json_lines(&run_dlq(&env, &["list", "--json", "--error-class", "NOT_JSON"]).await);
    assert_eq!(not_json.len(), 1);
    let orders =
        json_lines(&run_dlq(&env, &["list", "--json", "--event-type", "OrderCreated"]).await);
    assert_eq!(orders.len(), 1);
    assert_eq!(orders[0]["errorClass"], "INVALID_AMOUNT");
    assert!(
        json_lines(&run_dlq(&env, &["list", "--json", "--original-topic", "elsewhere"]).await)
            .is_empty()
    );
    let future =
        json_lines(&run_dlq(&env, &["list", "--json", "--since", "2100-01-01T00:00:00Z"]).await);
    assert!(future.is_empty());
    let table = run_dlq(&env, &["list"]).await;
    assert!(table.starts_with("3 dead letter(s)"), "{table}");

    let id = not_json[0]["id"].as_str().expect("id");
    let shown: Value =
        serde_json::from_str(&run_dlq(&env, &["show", id]).await).expect("show prints JSON");
    assert_eq!(shown["payload"]["text"], "not json at all");
    assert_eq!(shown["key"]["text"], "1");
    let headers: Vec<&str> = shown["headers"]
        .as_array()
        .expect("headers")
        .iter()
        .filter_map(|h| h[0].as_str())
        .collect();
    for name in [
        dlq::ORIGINAL_TOPIC,
        dlq::ORIGINAL_PARTITION,
        dlq::ORIGINAL_OFFSET,
        dlq::CONSUMER_GROUP,
        dlq::ERROR_CLASS,
        dlq::ERROR_MESSAGE,
        dlq::FIRST_FAILED_AT,
        dlq::ATTEMPTS,
    ] {
        assert!(headers.contains(&name), "{name} missing from {headers:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_dead_letter_with_a_valid_payload_is_applied_once_however_often_it_is_replayed()
{
    let env = TestEnv::new(1).await;
    let account = env.funded_account(5, 1_000).await;
    put_dead_letter(
        &env,
        "5",
        &env.new_order(Uuid::new_v4(), 500, 5, 300).await,
        "SCHEMA_VIOLATION",
        1,
    )
    .await;
    let order_topic = env.collect(&env.settings.topics.order_events);
    let worker = env.spawn_account_processor(env.settings.clone());
    let relay = env.spawn_relay();

    let dry = report(
        &run_dlq(
            &env,
            &["replay", "--error-class", "SCHEMA_VIOLATION", "--dry-run"],
        )
        .await,
    );
    assert_eq!(
        (
            dry["dryRun"].as_bool(),
            dry["replayed"].as_u64(),
            dry["wouldReplay"].as_array().map(Vec::len)
        ),
        (Some(true), Some(0), Some(1)),
        "{dry}"
    );
    assert_eq!(env.scalar("SELECT count(*) FROM dlq_replays").await, 0);

    let first = report(
        &run_dlq(
            &env,
            &[
                "replay",
                "--error-class",
                "SCHEMA_VIOLATION",
                "--operator",
                "alice",
            ],
        )
        .await,
    );
    assert_eq!(first["replayed"], 1, "{first}");
    env.wait_consumed(1).await;
    assert_eq!(env.balance(account).await, 700);

    // Again: skipped as already replayed. Forced: published again, and dedupe applies nothing.
    let again = report(&run_dlq(&env, &["replay", "--error-class", "SCHEMA_VIOLATION"]).await);
    assert_eq!(
        (
            again["replayed"].as_u64(),
            again["skippedAlreadyReplayed"].as_array().map(Vec::len)
        ),
        (Some(0), Some(1)),
        "{again}"
    );
    let forced = report(
        &run_dlq(
            &env,
            &["replay", "--error-class", "SCHEMA_VIOLATION", "--force"],
        )
        .await,
    );
    assert_eq!(forced["replayed"], 1, "{forced}");
    env.wait_consumed(2).await;
    worker.stop().await;
    relay.stop().await;

    assert_eq!(env.balance(account).await, 700);
    assert_eq!(
        env.scalar("SELECT count(*) FROM transfers WHERE order_id = 500")
            .await,
        1
    );
    assert_eq!(
        env.scalar("SELECT count(*) FROM dlq_replays WHERE event_id IS NOT NULL")
            .await,
        2
    );
    assert_eq!(
        env.scalar("SELECT count(*) FROM dlq_replays WHERE operator = 'alice'")
            .await,
        1
    );
    // The dry run published nothing: the order topic holds exactly the two real replays,
    // with the original key.
    let replayed = order_topic.wait_for(2).await;
    assert_eq!(replayed.len(), 2);
    assert!(replayed
        .iter()
        .all(|m| m.key.as_deref() == Some(b"5".as_slice())));
    env.assert_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_that_keeps_failing_is_parked_at_the_attempt_limit_not_looped() {
    let env = TestEnv::new(1).await;
    let max = env.settings.dlq.max_attempts;
    put_dead_letter(&env, "8", b"still not json", "NOT_JSON", max - 1).await;
    let dead = env.collect(&env.settings.topics.dead_letter);
    let worker = env.spawn_account_processor(env.settings.clone());
    let relay = env.spawn_relay();

    let first = report(&run_dlq(&env, &["replay", "--error-class", "NOT_JSON"]).await);
    assert_eq!(first["replayed"], 1, "{first}");
    let letters = dead.wait_for(2).await;
    let parked = &letters[1];
    assert_eq!(
        parked.headers.get(dlq::ATTEMPTS).map(String::as_str),
        Some(max.to_string().as_str())
    );
    assert_eq!(
        parked.headers.get(dlq::PARKED).map(String::as_str),
        Some("true")
    );
    assert_eq!(
        parked.headers.get(dlq::FIRST_FAILED_AT).map(String::as_str),
        Some("2026-11-01T00:00:00.000Z")
    );

    // Nothing is left to replay: the original was replayed, the new one is parked.
    let second = report(&run_dlq(&env, &["replay", "--error-class", "NOT_JSON"]).await);
    let skipped = (
        second["replayed"].as_u64(),
        second["skippedParked"].as_array().map(Vec::len),
        second["skippedAlreadyReplayed"].as_array().map(Vec::len),
    );
    assert_eq!(skipped, (Some(0), Some(1), Some(1)), "{second}");
    let listed = json_lines(&run_dlq(&env, &["list", "--json"]).await);
    assert_eq!(
        listed.iter().filter(|d| d["parked"] == true).count(),
        1,
        "{listed:?}"
    );
    worker.stop().await;
    relay.stop().await;
}

/// A poison message whose key and headers are not UTF-8, dead-lettered by the processor (so
/// through the outbox and the relay), is replayed with exactly its key and headers: it lands
/// on the partition the original did, and fails again as the same message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_with_a_binary_key_and_headers_is_replayed_byte_for_byte() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::FutureRecord;
    use rdkafka::util::Timeout;
    use std::time::Duration;

    let env = TestEnv::new(4).await;
    let key = vec![0x00, 0xff, 0xfe, 0x80, 0x01];
    let binary = vec![0xc3, 0x28, 0xa0, 0xa1];
    let headers = OwnedHeaders::new().insert(Header {
        key: "trace",
        value: Some(&binary[..]),
    });
    let original = env
        .producer()
        .send(
            FutureRecord::to(&env.settings.topics.order_events)
                .key(&key[..])
                .payload(&b"not json"[..])
                .headers(headers),
            Timeout::After(Duration::from_secs(30)),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("produce the poison message");
    let dead = env.collect(&env.settings.topics.dead_letter);
    let orders = env.collect(&env.settings.topics.order_events);
    let worker = env.spawn_account_processor(env.settings.clone());
    let relay = env.spawn_relay();
    let letter = dead.wait_for(1).await.remove(0);
    assert_eq!(letter.key.as_ref(), Some(&key));
    assert!(letter
        .header_bytes
        .contains(&("trace".to_owned(), binary.clone())));

    let replayed = report(&run_dlq(&env, &["replay", "--error-class", "NOT_JSON"]).await);
    assert_eq!(replayed["replayed"], 1, "{replayed}");
    let on_orders = orders.wait_for(2).await;
    let again = dead.wait_for(2).await;
    worker.stop().await;
    relay.stop().await;

    let copy = &on_orders[1];
    assert_eq!(copy.key.as_ref(), Some(&key));
    assert_eq!(
        copy.partition, original.partition,
        "the original's partition"
    );
    assert!(copy
        .header_bytes
        .contains(&("trace".to_owned(), binary.clone())));
    let second = &again[1];
    assert_eq!(second.key.as_ref(), Some(&key));
    assert_eq!(
        second.headers.get(dlq::ATTEMPTS).map(String::as_str),
        Some("2")
    );
    assert_eq!(second.headers.get(dlq::KEY_LOSSY), None);
}
