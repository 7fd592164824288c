//! The outbox relay's ordering trap, and surviving a broker restart.

mod common;

use std::collections::HashMap;

use common::*;
use paystream_processors::outbox::{self, OutboxRow};
use tokio::io::{AsyncBufReadExt, BufReader};
use uuid::Uuid;

fn row(env: &TestEnv, marker: &str) -> OutboxRow {
    OutboxRow {
        topic: env.settings.topics.account_events.clone(),
        key: Some(b"1".to_vec()),
        payload: marker.as_bytes().to_vec(),
        headers: vec![],
        event_id: Some(Uuid::new_v4()),
    }
}

/// Ids are taken at insert, visibility comes at commit: a row with a smaller id can become
/// visible after a larger one was already published. A relay tracking "id > last" skips it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_row_that_commits_late_is_published_not_skipped() {
    let env = TestEnv::new(1).await;
    let wire = env.collect(&env.settings.topics.account_events);
    let relay = env.spawn_relay();

    let mut slow = env.pool.begin().await.expect("begin slow");
    outbox::insert(&mut slow, &[row(&env, "late")])
        .await
        .expect("late row");
    let mut fast = env.pool.begin().await.expect("begin fast");
    outbox::insert(&mut fast, &[row(&env, "early")])
        .await
        .expect("early row");
    fast.commit().await.expect("commit fast");

    let late_id: i64 = sqlx::query_scalar("SELECT id FROM outbox WHERE payload = 'late'")
        .fetch_one(&mut *slow)
        .await
        .expect("late id");
    // The relay may have published (and so taken out of the outbox) the early row already.
    let early_id = env
        .scalar("SELECT max(id) FROM (SELECT id FROM outbox UNION ALL SELECT id FROM outbox_published) r")
        .await;
    assert!(late_id < early_id, "the late row must hold the smaller id");
    wire.wait_for(1).await;
    // The relay marks a row after the broker acknowledged it, so the mark may commit a
    // moment after the message is readable.
    wait_until("the early row marked published", || async {
        (env.scalar("SELECT count(*) FROM outbox_published").await == 1).then_some(())
    })
    .await;
    assert_eq!(
        wire.snapshot().len(),
        1,
        "the late row must not be published before it commits"
    );

    slow.commit().await.expect("commit slow");
    let messages = wire.wait_for(2).await;
    wait_until("both rows marked published", || async {
        (env.scalar("SELECT count(*) FROM outbox").await == 0).then_some(())
    })
    .await;
    relay.stop().await;
    let values: Vec<&[u8]> = messages.iter().map(|m| m.value.as_slice()).collect();
    assert_eq!(values, [&b"early"[..], &b"late"[..]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_processor_and_relay_recover_by_themselves_when_the_broker_restarts() {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("paystream-broker-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("broker dir");
    let broker = Broker::start(port, &dir).await;
    let env = TestEnv::with_brokers(1, &format!("127.0.0.1:{port}")).await;
    let account = env.funded_account(11, 10_000).await;

    let worker = env.spawn_account_processor(env.settings.clone());
    let relay = env.spawn_relay();
    let producer = env.producer();
    for i in 0..20 {
        env.produce(
            &producer,
            "11",
            &env.new_order(Uuid::new_v4(), 110 + i, 11, 10).await,
        )
        .await;
    }
    env.wait_consumed(20).await;
    drop(producer);

    broker.kill().await;
    let broker = Broker::start(port, &dir).await;
    let producer = env.producer();
    for i in 20..40 {
        env.produce(
            &producer,
            "11",
            &env.new_order(Uuid::new_v4(), 110 + i, 11, 10).await,
        )
        .await;
    }
    env.wait_consumed(40).await;
    wait_until("every outbox row published after the restart", || async {
        (env.scalar("SELECT count(*) FROM outbox").await == 0).then_some(())
    })
    .await;
    worker.stop().await;
    relay.stop().await;
    broker.kill().await;
    let _ = std::fs::remove_dir_all(&dir);

    assert_eq!(env.balance(account).await, 10_000 - 40 * 10);
    assert_eq!(
        env.scalar("SELECT count(*) FROM transfers WHERE kind = 'DEBIT'")
            .await,
        40
    );
    env.assert_invariants().await;
}

/// Two relays at once: every row arrives, and per key the first arrival of each row follows
/// id order (a re-publish may duplicate, never reorder what a consumer first sees).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_running_at_once_neither_reorder_a_key_nor_lose_a_row() {
    let env = TestEnv::new(3).await;
    let keys = 8;
    let per_key = 250;
    let mut tx = env.pool.begin().await.expect("begin");
    let rows: Vec<OutboxRow> = (0..keys * per_key)
        .map(|i| OutboxRow {
            topic: env.settings.topics.account_events.clone(),
            key: Some(format!("user-{}", i % keys).into_bytes()),
            payload: format!("{}:{}", i % keys, i / keys).into_bytes(),
            headers: vec![],
            event_id: Some(Uuid::new_v4()),
        })
        .collect();
    outbox::insert(&mut tx, &rows).await.expect("rows");
    tx.commit().await.expect("commit");

    let wire = env.collect(&env.settings.topics.account_events);
    let mut small = env.settings.clone();
    small.relay.batch_max = 37;
    let relays: Vec<_> = (0..2)
        .map(|_| {
            let cancel = tokio_util::sync::CancellationToken::new();
            let task = tokio::spawn(paystream_processors::outbox::relay::run(
                small.clone(),
                env.pool.clone(),
                cancel.clone(),
            ));
            (cancel, task)
        })
        .collect();
    let received = wire.wait_for((keys * per_key) as usize).await;
    for (cancel, task) in relays {
        cancel.cancel();
        task.await
            .expect("relay task")
            .expect("relay stops cleanly");
    }

    let mut next_seq = vec![0_u32; keys as usize];
    let mut seen = std::collections::HashSet::new();
    for m in &received {
        let text = String::from_utf8(m.value.clone()).expect("utf8");
        if !seen.insert(text.clone()) {
            continue; // a duplicate on the wire
        }
        let (key, seq) = text.split_once(':').expect("key:seq");
        let (key, seq): (usize, u32) = (key.parse().expect("key"), seq.parse().expect("seq"));
        assert_eq!(seq, next_seq[key], "key {key} first saw {seq} out of order");
        next_seq[key] += 1;
    }
    assert_eq!(seen.len(), (keys * per_key) as usize, "a row was lost");
}

/// The relay publishes on notifications alone: with the fallback poll an hour away, a
/// stream of single-row commits from three writers is published completely, through rounds
/// that are full (the relay drains on at once) and partial (it waits for the next
/// notification, and takes every notification already delivered as covered by one round).
/// The only relay never finds its own lock taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_publishes_every_commit_on_its_notification_without_the_fallback_poll() {
    let env = TestEnv::new(1).await;
    let mut settings = env.settings.clone();
    settings.relay.poll_interval_ms = 3_600_000;
    // Small rounds, so that both a full round (drain on at once) and a partial one (wait for
    // the next notification) happen many times.
    settings.relay.batch_max = 7;
    let wire = env.collect(&env.settings.topics.account_events);
    let relay = spawn_worker(&settings, outbox::relay::run);
    let (writers, per_writer) = (3, 200);
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let pool = env.pool.clone();
            let topic = env.settings.topics.account_events.clone();
            tokio::spawn(async move {
                for i in 0..per_writer {
                    let row = OutboxRow {
                        topic: topic.clone(),
                        key: Some(format!("writer-{w}").into_bytes()),
                        payload: format!("{w}:{i}").into_bytes(),
                        headers: vec![],
                        event_id: Some(Uuid::new_v4()),
                    };
                    let mut tx = pool.begin().await.expect("begin");
                    outbox::insert(&mut tx, &[row]).await.expect("row");
                    tx.commit().await.expect("commit");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer");
    }
    let total = writers * per_writer;
    wait_until("every row marked published", || async {
        (env.scalar("SELECT count(*) FROM outbox").await == 0).then_some(())
    })
    .await;
    let received = wire.wait_for(total).await;
    relay.stop().await;
    let distinct: std::collections::HashSet<&[u8]> =
        received.iter().map(|m| m.value.as_slice()).collect();
    assert_eq!(distinct.len(), total, "a row was lost");
    assert_eq!(
        paystream_processors::telemetry::METRICS
            .relay_standby_rounds
            .get(),
        0,
        "the only relay found its own lock taken"
    );
}

/// A row's `published_at` is when the broker acknowledged it, not when the relay got round to
/// marking it: here the marks wait on a row lock after every message is on the topic, and the
/// recorded times still come before the lock was let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_at_is_the_brokers_acknowledgement_not_the_time_of_the_marks() {
    let env = TestEnv::new(1).await;
    let wire = env.collect(&env.settings.topics.account_events);
    let rows: Vec<OutboxRow> = (0..5).map(|i| row(&env, &format!("m{i}"))).collect();
    let mut tx = env.pool.begin().await.expect("begin");
    outbox::insert(&mut tx, &rows).await.expect("rows");
    tx.commit().await.expect("commit");
    // Lock one row before the relay starts: it reads and sends all five (a plain read does
    // not wait on a row lock), and its marks, which delete the rows, wait here.
    let mut holder = env.pool.begin().await.expect("begin");
    sqlx::query("SELECT id FROM outbox ORDER BY id LIMIT 1 FOR UPDATE")
        .execute(&mut *holder)
        .await
        .expect("lock a row");
    let relay = env.spawn_relay();
    wire.wait_for(5).await;
    wait_until("the relay's marks to wait on the lock", || async {
        let waiting = env
            .scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND query LIKE '%INSERT INTO outbox_published%'",
            )
            .await;
        (waiting > 0).then_some(())
    })
    .await;
    let released: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&env.pool)
        .await
        .expect("clock");
    holder.commit().await.expect("let the lock go");
    wait_until("every row marked published", || async {
        (env.scalar("SELECT count(*) FROM outbox").await == 0).then_some(())
    })
    .await;
    relay.stop().await;
    let times: Vec<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as("SELECT created_at, published_at FROM outbox_published ORDER BY id")
            .fetch_all(&env.pool)
            .await
            .expect("published rows");
    assert_eq!(times.len(), 5);
    for (created, published) in times {
        assert!(
            created <= published,
            "published {published} before created {created}"
        );
        assert!(
            published < released,
            "published_at {published} is the marks' time, not the acknowledgement (lock let go at {released})"
        );
    }
}

/// A relay's consecutive rounds, on whichever pooled connections, never find the right to
/// publish held by that same relay. (With the advisory lock this replaced, a dropped
/// transaction kept it until its connection was next used, and the relay stood by itself.)
/// A current-thread runtime runs a dropped connection's rollback only once the next round
/// has started, which made that fail here every time.
#[tokio::test]
async fn consecutive_relay_rounds_of_one_relay_never_stand_by_for_that_relay() {
    let env = TestEnv::new(1).await;
    let producer: rdkafka::producer::FutureProducer = paystream_processors::kafka::producer_config(
        &env.settings.kafka,
        std::time::Duration::from_secs(30),
    )
    .create()
    .expect("producer");
    // Two idle connections, so that consecutive rounds can use different ones.
    let first = env.pool.acquire().await.expect("connection");
    let second = env.pool.acquire().await.expect("connection");
    drop((first, second));
    wait_until("two idle connections", || async {
        (env.pool.num_idle() >= 2).then_some(())
    })
    .await;
    let mut lease = outbox::relay::Lease::new(std::time::Duration::from_secs(15));
    for _ in 0..20 {
        let round = outbox::relay::publish_round(&env.pool, &producer, 10, &mut lease)
            .await
            .expect("round");
        assert_eq!(round, outbox::relay::Round::Published(0));
    }
}

/// The log of published rows is deleted once older than `relay.retention_hours` (more than
/// one prune chunk of it here); newer entries stay, and an old row that was never published
/// is published, not pruned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_outbox_rows_past_the_retention_are_pruned_and_the_rest_stay() {
    let env = TestEnv::new(1).await;
    let topic = env.settings.topics.account_events.clone();
    // Entries of rows published long ago (ids far below the outbox's own).
    let logged = |first: i64, n: i64, published_ago: &str| {
        sqlx::query(
            "INSERT INTO outbox_published (id, topic, event_id, created_at, published_at) \
             SELECT -i, $1, gen_random_uuid(), now() - interval '3 hours', now() - $4::interval \
             FROM generate_series($2, $2 + $3 - 1) AS i",
        )
        .bind(topic.clone())
        .bind(first)
        .bind(n)
        .bind(published_ago.to_owned())
        .execute(&env.pool)
    };
    logged(1, 12_000, "2 hours").await.expect("expired entries");
    logged(20_000, 1, "30 minutes")
        .await
        .expect("a recent entry");
    sqlx::query(
        "INSERT INTO outbox (topic, message_key, payload, event_id, created_at) \
         VALUES ($1, '1', convert_to('never-published', 'UTF8'), gen_random_uuid(), now() - interval '3 hours')",
    )
    .bind(topic.clone())
    .execute(&env.pool)
    .await
    .expect("an unpublished row");
    let count = |ids: &str| format!("SELECT count(*) FROM outbox_published WHERE {ids}");

    let wire = env.collect(&topic);
    let mut settings = env.settings.clone();
    settings.relay.retention_hours = 1;
    // One pass, at the first idle moment, must delete every expired chunk.
    settings.relay.prune_interval_s = 3600;
    let relay = spawn_worker(&settings, outbox::relay::run);
    wait_until("the expired entries to be pruned", || async {
        (env.scalar(&count("id BETWEEN -12000 AND -1")).await == 0).then_some(())
    })
    .await;
    let received = wire.wait_for(1).await;
    relay.stop().await;

    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0].value, b"never-published");
    assert_eq!(env.scalar(&count("id = -20000")).await, 1);
    assert_eq!(
        env.scalar(&count("id > 0")).await,
        1,
        "the old row, published"
    );
    assert_eq!(env.scalar("SELECT count(*) FROM outbox").await, 0);
    assert_eq!(
        paystream_processors::telemetry::METRICS.outbox_pruned.get(),
        12_000,
        "paystream_outbox_pruned_total counts what was deleted"
    );
}

/// `topics create` accepted existing topics whatever they were. A topic that cannot take the
/// records paystream sends to it (its max.message.bytes is smaller) would stall the relay, so
/// the command now fails and says exactly what differs; a different partition count is only
/// a warning. The event topics it creates take no record larger than the processors read
/// (`processor.max_event_bytes`), not the 10 MiB they used to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_create_refuses_existing_topics_too_small_for_what_paystream_sends() {
    let env = TestEnv::new(1).await;
    let mut same = env.settings.clone();
    same.kafka.partitions = 3;
    paystream_processors::kafka::create_topics(&same)
        .await
        .expect("existing topics that fit pass, whatever their partition count");

    let mut larger = env.settings.clone();
    larger.kafka.message_max_bytes = env.settings.kafka.message_max_bytes * 2;
    larger.processor.max_event_bytes = env.settings.kafka.message_max_bytes * 2;
    let error = paystream_processors::kafka::create_topics(&larger)
        .await
        .expect_err("the existing topics are too small")
        .to_string();
    let expected = format!(
        "{}: max.message.bytes is {}, paystream sends records of up to {} bytes",
        env.settings.topics.order_events,
        env.settings.processor.max_event_bytes,
        larger.processor.max_event_bytes
    );
    assert!(error.contains(&expected), "{error}");
    assert!(error.contains(&env.settings.topics.dead_letter), "{error}");
}

/// A row the broker can never take (here: larger than a message may be) used to stop every
/// row behind it, on every topic. Now it is parked: the later rows of its own topic and key
/// wait behind it (per-key order), everything else is published; the audit names it, and
/// discarding it (on the record) lets its key go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_row_the_broker_refuses_for_good_holds_back_only_its_own_key() {
    let env = TestEnv::new(1).await;
    let mut settings = env.settings.clone();
    // The relay's record limit is this plus the dead-letter allowance (64 KiB).
    settings.kafka.message_max_bytes = 100_000;
    let topic = env.settings.topics.account_events.clone();
    let wire = env.collect(&topic);
    let keyed = |topic: &str, key: &str, payload: &[u8]| OutboxRow {
        topic: topic.to_owned(),
        key: Some(key.as_bytes().to_vec()),
        payload: payload.to_vec(),
        headers: vec![],
        event_id: Some(Uuid::new_v4()),
    };
    let rows = [
        keyed(&topic, "a", &vec![b'x'; 300_000]),
        keyed(&topic, "a", b"a-after"),
        keyed(&topic, "b", b"b-1"),
        keyed(&env.settings.topics.order_events, "a", b"other-topic-a"),
        keyed(&topic, "b", b"b-2"),
    ];
    let mut tx = env.pool.begin().await.expect("begin");
    outbox::insert(&mut tx, &rows).await.expect("insert");
    tx.commit().await.expect("commit");
    let payloads: HashMap<i64, Vec<u8>> = sqlx::query_as("SELECT id, payload FROM outbox")
        .fetch_all(&env.pool)
        .await
        .expect("the rows")
        .into_iter()
        .collect();
    let relay = spawn_worker(&settings, paystream_processors::outbox::relay::run);

    let published = || async {
        let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM outbox_published ORDER BY id")
            .fetch_all(&env.pool)
            .await
            .expect("published rows");
        ids.iter()
            .map(|id| payloads[id].clone())
            .collect::<Vec<_>>()
    };
    let flowed: Vec<&[u8]> = vec![b"b-1", b"other-topic-a", b"b-2"];
    wait_until("the other keys and topics to be published", || async {
        (published().await == flowed).then_some(())
    })
    .await;
    let parked = wait_until("the refused row to be parked", || async {
        let parked = outbox::parked(&env.pool).await.expect("parked rows");
        (!parked.is_empty()).then_some(parked)
    })
    .await;
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(
        (parked[0].key.as_deref(), parked[0].waiting),
        (Some("a"), 1)
    );
    let violations = paystream_processors::audit::check(
        &env.pool,
        &paystream_processors::audit::Limits::quiescent(&env.settings),
    )
    .await
    .expect("audit");
    assert!(
        violations
            .iter()
            .any(|v| v.invariant == "no_outbox_row_is_parked"),
        "{violations:?}"
    );

    let id = parked[0].id.to_string();
    let out = env
        .spawn_child_piped(
            &[
                "outbox",
                "discard",
                &id,
                "--reason",
                "too large for the test topic",
            ],
            &[("USER", "test-operator")],
        )
        .wait_with_output()
        .await
        .expect("paystream outbox discard");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let received = wire.wait_for(3).await;
    relay.stop().await;
    let values: Vec<&[u8]> = received.iter().map(|r| r.value.as_slice()).collect();
    assert_eq!(values, [&b"b-1"[..], b"b-2", b"a-after"]);
    let recorded: (String, String, String) =
        sqlx::query_as("SELECT action, actor, reason FROM outbox_actions")
            .fetch_one(&env.pool)
            .await
            .expect("the discard is recorded");
    assert_eq!(
        recorded,
        (
            "DISCARD".to_owned(),
            "test-operator".to_owned(),
            "too large for the test topic".to_owned()
        )
    );
    assert!(outbox::parked(&env.pool).await.expect("parked").is_empty());
}

/// A relay frozen in the middle of a round (SIGSTOP while it waits for the broker's acks) used
/// to hold its transaction and the relay lock: no other relay could publish until the
/// server's idle-in-transaction timeout (60 s), or ever with that timeout off. Now a standby
/// takes the lapsed lease after `relay.lease_ms` and publishes everything while the frozen one
/// still sleeps; when that one wakes, its marks are refused and it stands by.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_frozen_mid_round_is_replaced_after_its_lease_and_cannot_mark_when_it_wakes() {
    let env = TestEnv::new(1).await;
    let wire = env.collect(&env.settings.topics.account_events);
    // Relay A cannot reach a broker, so each of its rounds waits for acks until its delivery
    // timeout (8 s); nothing ends its session for being idle in a transaction.
    let nowhere = format!("127.0.0.1:{}", free_port());
    let mut frozen = env.spawn_child_logged(
        &["relay"],
        &[
            ("PAYSTREAM__KAFKA__BROKERS", &nowhere),
            ("PAYSTREAM__RELAY__DELIVERY_TIMEOUT_MS", "8000"),
            ("PAYSTREAM__DATABASE__IDLE_IN_TRANSACTION_TIMEOUT_MS", "0"),
        ],
    );
    let pid = frozen.id().expect("pid").to_string();
    let mut log = BufReader::new(frozen.stderr.take().expect("stderr")).lines();
    wait_until("relay A to take the lease", || async {
        let owner: String = sqlx::query_scalar("SELECT owner FROM relay_lease")
            .fetch_one(&env.pool)
            .await
            .expect("lease");
        owner.contains(&format!("-{pid}-")).then_some(())
    })
    .await;
    let rows: Vec<OutboxRow> = (0..20).map(|i| row(&env, &format!("m{i}"))).collect();
    let mut tx = env.pool.begin().await.expect("begin");
    outbox::insert(&mut tx, &rows).await.expect("rows");
    tx.commit().await.expect("commit");
    let committed: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&env.pool)
        .await
        .expect("clock");
    // A read the rows (its last statement, after the commit, is the round's SELECT) and now
    // waits for acks: freeze it there.
    wait_until("relay A to take the rows into a round", || async {
        let reading: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND query LIKE '%sum(octet_length(payload)) OVER%' AND state_change > $1",
        )
        .bind(committed)
        .fetch_one(&env.pool)
        .await
        .unwrap_or(0);
        (reading > 0).then_some(())
    })
    .await;
    let signal = |signal: &'static str| {
        let pid = pid.clone();
        async move {
            let status = tokio::process::Command::new("kill")
                .args([signal, &pid])
                .status()
                .await
                .expect("kill");
            assert!(status.success());
        }
    };
    signal("-STOP").await;

    let standby = env.spawn_relay();
    wait_until(
        "the standby to publish every row while A is frozen",
        || async {
            let unpublished = env.scalar("SELECT count(*) FROM outbox").await;
            (unpublished == 0).then_some(())
        },
    )
    .await;
    let marks = || async {
        let marks: Vec<(i64, chrono::DateTime<chrono::Utc>)> =
            sqlx::query_as("SELECT id, published_at FROM outbox_published ORDER BY id")
                .fetch_all(&env.pool)
                .await
                .expect("marks");
        marks
    };
    let marked = marks().await;

    signal("-CONT").await;
    tokio::time::timeout(DEADLINE, async {
        while let Some(line) = log.next_line().await.expect("read the log") {
            if line.contains("relay lease lapsed during the round") {
                return;
            }
        }
        panic!("relay A ended without saying its marks were refused");
    })
    .await
    .expect("relay A woke and found its lease gone");
    assert_eq!(
        marks().await,
        marked,
        "relay A changed marks after losing the lease"
    );
    let received = wire.wait_for(20).await;
    let markers: std::collections::BTreeSet<Vec<u8>> =
        received.iter().map(|r| r.value.clone()).collect();
    assert_eq!(markers.len(), 20);
    standby.stop().await;
    frozen.kill().await.expect("stop relay A");
}
