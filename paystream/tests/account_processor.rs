//! The account processor against the real PostgreSQL and broker.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use paystream_processors::telemetry::METRICS;
use serde_json::Value;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_order_created_delivered_twice_at_different_offsets_is_applied_once() {
    let env = TestEnv::new(1).await;
    let account = env.funded_account(1, 1_000).await;
    let producer = env.producer();
    let event_id = Uuid::new_v4();
    env.produce(&producer, "1", &env.new_order(event_id, 10, 1, 100).await)
        .await;
    env.produce(
        &producer,
        "1",
        &env.new_order(Uuid::new_v4(), 11, 1, 1).await,
    )
    .await;
    env.produce(&producer, "1", &env.new_order(event_id, 10, 1, 100).await)
        .await;

    let worker = env.spawn_account_processor(env.settings.clone());
    env.wait_consumed(3).await;
    worker.stop().await;

    assert_eq!(env.balance(account).await, 1_000 - 100 - 1);
    assert_eq!(
        env.scalar("SELECT count(*) FROM transfers WHERE kind = 'DEBIT' AND order_id = 10")
            .await,
        1
    );
    assert_eq!(env.scalar("SELECT count(*) FROM processed_events").await, 2);
    assert_eq!(
        env.scalar(
            "SELECT count(*) FROM outbox WHERE headers @> '[[\"eventType\", \"AccountDebited\"]]'"
        )
        .await,
        2
    );
    env.assert_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insufficient_balance_emits_debit_failed_and_leaves_every_balance_unchanged() {
    let env = TestEnv::new(1).await;
    let account = env.funded_account(2, 100).await;
    let before: Vec<(i64, i64)> =
        sqlx::query_as("SELECT id, balance_fen FROM accounts ORDER BY id")
            .fetch_all(&env.pool)
            .await
            .expect("balances");
    let events = env.collect(&env.settings.topics.account_events);
    let producer = env.producer();
    env.produce(
        &producer,
        "2",
        &env.new_order(Uuid::new_v4(), 20, 2, 500).await,
    )
    .await;

    let worker = env.spawn_account_processor(env.settings.clone());
    let relay = env.spawn_relay();
    // AccountCredited from the deposit, then the failure.
    let received = events.wait_for(2).await;
    worker.stop().await;
    relay.stop().await;

    let failed: Vec<Value> = received
        .iter()
        .map(Received::json)
        .filter(|e| e["eventType"] == "AccountDebitFailed")
        .collect();
    assert_eq!(failed.len(), 1, "{received:?}");
    assert_eq!(failed[0]["payload"]["reason"], "INSUFFICIENT_BALANCE");
    assert_eq!(failed[0]["payload"]["orderId"], 20);
    let after: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT id, balance_fen FROM accounts WHERE kind <> 'SETTLEMENT' ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .expect("balances");
    assert_eq!(after, before);
    assert_eq!(env.balance(account).await, 100);
    assert_eq!(
        env.scalar("SELECT count(*) FROM transfers WHERE kind = 'DEBIT'")
            .await,
        0
    );
    env.assert_invariants().await;
}

/// An `OrderCreated` is a claim; the order row the API wrote is what is owed. Records
/// produced as raw bytes (not through paystream's producer): one names an order that does
/// not exist, two name a real order with another amount or user. None moves money, each
/// gets `AccountDebitFailed` with its reason, and the order's own event is applied after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_created_for_an_order_that_does_not_exist_or_differs_from_it_moves_no_money() {
    let env = TestEnv::new(1).await;
    let account = env.funded_account(6, 1_000).await;
    env.funded_account(7, 1_000).await;
    env.record_orders(&[(61, 6, 300)]).await;
    let events = env.collect(&env.settings.topics.account_events);
    let record = |key: &str, value: Vec<u8>| raw::RawRecord {
        key: Some(key.as_bytes().to_vec()),
        value: Some(value),
        headers: vec![],
    };
    let records = [
        record("6", order_created(Uuid::new_v4(), 60, 6, 300)),
        record("6", order_created(Uuid::new_v4(), 61, 6, 999)),
        record("7", order_created(Uuid::new_v4(), 61, 7, 300)),
        record("6", order_created(Uuid::new_v4(), 61, 6, 300)),
    ];
    raw::produce(&brokers(), &env.settings.topics.order_events, 0, &records).await;

    let worker = env.spawn_account_processor(env.settings.clone());
    let relay = env.spawn_relay();
    // Two deposits, three failures, one debit.
    let received = events.wait_for(6).await;
    worker.stop().await;
    relay.stop().await;

    let outcomes: Vec<(String, Value, Value)> = received
        .iter()
        .map(Received::json)
        .filter(|e| e["eventType"] != "AccountCredited")
        .inspect(|e| assert_valid(&schemas_dir(), e["eventType"].as_str().unwrap_or(""), e))
        .map(|e| {
            let p = &e["payload"];
            (
                e["eventType"].as_str().unwrap_or("").to_owned(),
                p["orderId"].clone(),
                p["reason"].clone(),
            )
        })
        .collect();
    let failed = |order: i64, reason: &str| {
        (
            "AccountDebitFailed".to_owned(),
            Value::from(order),
            Value::from(reason),
        )
    };
    assert_eq!(
        outcomes,
        [
            failed(60, "ORDER_NOT_FOUND"),
            failed(61, "ORDER_MISMATCH"),
            failed(61, "ORDER_MISMATCH"),
            ("AccountDebited".to_owned(), Value::from(61), Value::Null),
        ]
    );
    assert_eq!(env.balance(account).await, 700);
    assert_eq!(
        env.scalar("SELECT count(*) FROM transfers WHERE kind = 'DEBIT'")
            .await,
        1
    );
    env.assert_invariants().await;
}

/// 100 orders of 10 against a balance of 500, spread over four partitions (as a producer
/// that ignored the user-id key would) and two workers, so batches really race on the row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_orders_of_10_against_500_give_exactly_50_debits() {
    let env = TestEnv::new(4).await;
    let account = env.funded_account(3, 500).await;
    let producer = env.producer();
    let orders: Vec<(i64, i64, i64)> = (0..100).map(|i| (1_000 + i, 3, 10)).collect();
    env.record_orders(&orders).await;
    let sends = (0..100).map(|i| {
        let value = order_created(Uuid::new_v4(), 1_000 + i, 3, 10);
        let producer = producer.clone();
        let topic = env.settings.topics.order_events.clone();
        async move { produce_to(&producer, &topic, &format!("spread-{i}"), &value, &[]).await }
    });
    futures::future::join_all(sends).await;

    let mut small_batches = env.settings.clone();
    small_batches.processor.batch_max = 7;
    let a = env.spawn_account_processor(small_batches.clone());
    let b = env.spawn_account_processor(small_batches);
    env.wait_consumed(100).await;
    a.stop().await;
    b.stop().await;

    assert_eq!(env.balance(account).await, 0);
    assert_eq!(
        env.scalar("SELECT count(*) FROM transfers WHERE kind = 'DEBIT'")
            .await,
        50
    );
    assert_eq!(
        env.scalar("SELECT count(*) FROM outbox WHERE headers @> '[[\"eventType\", \"AccountDebitFailed\"]]'").await,
        50
    );
    env.assert_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_order_is_refunded_once_and_only_after_a_debit() {
    let env = TestEnv::new(1).await;
    let account = env.funded_account(4, 1_000).await;
    let producer = env.producer();
    // Refund asked for an order never debited: nothing happens.
    env.produce(
        &producer,
        "4",
        &env.cancel_order(Uuid::new_v4(), 40, 4, true).await,
    )
    .await;
    env.produce(
        &producer,
        "4",
        &env.new_order(Uuid::new_v4(), 41, 4, 300).await,
    )
    .await;
    env.produce(
        &producer,
        "4",
        &env.cancel_order(Uuid::new_v4(), 41, 4, true).await,
    )
    .await;
    // A second cancellation with another event id must not refund twice.
    env.produce(
        &producer,
        "4",
        &env.cancel_order(Uuid::new_v4(), 41, 4, true).await,
    )
    .await;

    let worker = env.spawn_account_processor(env.settings.clone());
    env.wait_consumed(4).await;
    worker.stop().await;

    assert_eq!(env.balance(account).await, 1_000);
    assert_eq!(
        env.scalar("SELECT count(*) FROM transfers WHERE kind = 'REFUND'")
            .await,
        1
    );
    assert_eq!(
        env.scalar("SELECT count(*) FROM transfers WHERE order_id = 40")
            .await,
        0
    );
    env.assert_invariants().await;
}

/// Every event type the code emits, checked against `schemas/<Type>.v1.json`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_the_code_emits_validates_against_its_json_schema() {
    let env = TestEnv::new(1).await;
    env.funded_account(5, 500).await;
    let producer = env.producer();
    for value in [
        env.new_order(Uuid::new_v4(), 50, 5, 200).await,
        env.new_order(Uuid::new_v4(), 51, 5, 10_000).await,
        env.new_order(Uuid::new_v4(), 52, 99, 1).await,
        env.cancel_order(Uuid::new_v4(), 50, 5, true).await,
    ] {
        env.produce(&producer, "5", &value).await;
    }
    let worker = env.spawn_account_processor(env.settings.clone());
    env.wait_consumed(4).await;
    worker.stop().await;

    let schemas = Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas");
    let payloads: Vec<Vec<u8>> = sqlx::query_scalar("SELECT payload FROM outbox ORDER BY id")
        .fetch_all(&env.pool)
        .await
        .expect("outbox");
    let mut seen: HashMap<String, usize> = HashMap::new();
    for payload in payloads {
        let event: Value = serde_json::from_slice(&payload).expect("outbox payload is JSON");
        let event_type = event["eventType"].as_str().expect("eventType").to_owned();
        assert_valid(&schemas, &event_type, &event);
        *seen.entry(event_type).or_default() += 1;
    }
    for expected in [
        "AccountCredited",
        "AccountDebited",
        "AccountDebitFailed",
        "AccountRefunded",
    ] {
        assert!(
            seen.contains_key(expected),
            "no {expected} emitted: {seen:?}"
        );
    }
    // The inputs the tests produce follow the contract too.
    for input in [
        order_created(Uuid::new_v4(), 1, 1, 1),
        order_cancelled(Uuid::new_v4(), 1, 1, false),
    ] {
        let event: Value = serde_json::from_slice(&input).expect("json");
        assert_valid(&schemas, event["eventType"].as_str().expect("type"), &event);
    }
}

/// The dedupe table is bounded: a worker deletes its group's event ids older than
/// `dedupe_retention_hours` (more than one chunk of them here), and leaves alone the ids
/// inside the retention, which still dedupe, and other groups' ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processed_event_ids_past_their_retention_are_pruned_and_newer_ones_still_dedupe() {
    let env = TestEnv::new(1).await;
    let group = env.settings.processor.account_group.clone();
    let backdate = |group: &str, n: i64, age: &str| {
        sqlx::query(
            "INSERT INTO processed_events (consumer_group, event_id, topic, partition, \"offset\", processed_at) \
             SELECT $1, gen_random_uuid(), 'earlier', 0, g, now() - $3::interval FROM generate_series(1, $2) AS g",
        )
        .bind(group.to_owned())
        .bind(n)
        .bind(age.to_owned())
        .execute(&env.pool)
    };
    backdate(&group, 25_000, "2 hours")
        .await
        .expect("expired ids");
    backdate(&group, 1, "30 minutes")
        .await
        .expect("a recent id");
    backdate("another-group", 1, "2 hours")
        .await
        .expect("another group's id");

    // An order the balance cannot pay: only its processed id stops a late copy from being
    // applied once the balance is there (no debit exists for the ledger to refuse a second).
    let account = env.funded_account(7, 1_000).await;
    let producer = env.producer();
    let event_id = Uuid::new_v4();
    let order = env.new_order(event_id, 70, 7, 2_000).await;
    env.produce(&producer, "7", &order).await;

    let mut settings = env.settings.clone();
    settings.processor.dedupe_retention_hours = 1;
    // One pass, at start, must delete every expired chunk.
    settings.processor.dedupe_prune_interval_s = 3600;
    let worker = env.spawn_account_processor(settings);
    env.wait_consumed(1).await;
    let expired = format!(
        "SELECT count(*) FROM processed_events WHERE consumer_group = '{group}' \
         AND processed_at < now() - interval '1 hour'"
    );
    wait_until("the expired ids to be pruned", || async {
        (env.scalar(&expired).await == 0).then_some(())
    })
    .await;

    env.deposit(account, 5_000).await;
    env.produce(&producer, "7", &order).await;
    env.wait_consumed(2).await;
    worker.stop().await;

    assert_eq!(
        env.scalar(&format!(
            "SELECT count(*) FROM processed_events WHERE consumer_group = '{group}'"
        ))
        .await,
        2,
        "the recent id and the order's id stay"
    );
    assert_eq!(
        env.scalar(&format!(
            "SELECT count(*) FROM processed_events WHERE consumer_group = '{group}' AND event_id = '{event_id}'"
        ))
        .await,
        1
    );
    assert_eq!(
        env.scalar("SELECT count(*) FROM processed_events WHERE consumer_group = 'another-group'")
            .await,
        1,
        "another group's ids are its own workers' business"
    );
    assert_eq!(
        env.scalar("SELECT count(*) FROM transfers WHERE kind = 'DEBIT'")
            .await,
        0,
        "the late copy was a duplicate"
    );
    assert_eq!(env.balance(account).await, 6_000);
    assert_eq!(
        paystream_processors::telemetry::METRICS
            .dedupe_pruned
            .with_label_values(&["account"])
            .get(),
        25_000,
        "paystream_dedupe_pruned_total counts what was deleted"
    );
    env.assert_invariants().await;
}

/// A hot account: one user's orders arrive together and are applied in one batch
/// transaction, each against the balance the one before it left. The user can afford only
/// some of them, so each order's outcome depends on every earlier one in the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debits_of_one_user_in_one_batch_each_see_the_balance_left_by_the_one_before() {
    let env = TestEnv::new(1).await;
    let account = env.funded_account(5, 1_000).await;
    let producer = env.producer();
    // (order, fen) -> balance after, or None for insufficient balance.
    let orders = [
        (50, 300, Some(700)),
        (51, 500, Some(200)),
        (52, 300, None),
        (53, 200, Some(0)),
        (54, 1, None),
        (55, 100, None),
    ];
    // Produced before the worker starts: its first fetch holds them all.
    for (order, fen, _) in orders {
        let value = env.new_order(Uuid::new_v4(), order, 5, fen).await;
        env.produce(&producer, "5", &value).await;
    }
    let worker = env.spawn_account_processor(env.settings.clone());
    env.wait_consumed(orders.len() as i64).await;
    worker.stop().await;

    let batches = METRICS.batch_size.with_label_values(&["account"]);
    assert!(
        batches.get_sample_sum() > batches.get_sample_count() as f64,
        "the orders were not applied together ({} transactions for {} orders)",
        batches.get_sample_count(),
        batches.get_sample_sum()
    );
    let debited: HashMap<i64, i64> = sqlx::query_as(
        "SELECT t.order_id, e.balance_after_fen FROM transfers t \
         JOIN ledger_entries e ON e.transfer_id = t.id AND e.account_id = $1 \
         WHERE t.kind = 'DEBIT'",
    )
    .bind(account)
    .fetch_all(&env.pool)
    .await
    .expect("debits")
    .into_iter()
    .collect();
    for (order, _, after) in orders {
        assert_eq!(debited.get(&order).copied(), after, "order {order}");
    }
    let failed: Vec<(i64,)> = sqlx::query_as(
        "SELECT (convert_from(payload, 'UTF8')::jsonb #>> '{payload,orderId}')::bigint FROM outbox \
         WHERE headers @> '[[\"eventType\", \"AccountDebitFailed\"]]' ORDER BY 1",
    )
    .fetch_all(&env.pool)
    .await
    .expect("failures");
    assert_eq!(failed, [(52,), (54,), (55,)]);
    assert_eq!(env.balance(account).await, 0);
    env.assert_invariants().await;
}
