//! Crashes, kills and zombies: whatever fails, every event is applied exactly once.

mod common;

use std::time::Duration;

use common::*;
use paystream_processors::events::{derived_event_id, AccountDebited, EventPayload};
use paystream_processors::outbox::{self, OutboxRow};
use paystream_processors::telemetry::METRICS;
use uuid::Uuid;

const USERS: i64 = 50;

/// Produces `range` orders of 3 fen spread over `USERS` users, keyed by user.
async fn produce_orders(env: &TestEnv, range: std::ops::Range<i64>) {
    let producer = env.producer();
    let orders: Vec<(i64, i64, i64)> = range
        .clone()
        .map(|i| (10_000 + i, 100 + i % USERS, 3))
        .collect();
    env.record_orders(&orders).await;
    let sends = range.map(|i| {
        let user = 100 + i % USERS;
        let value = order_created(Uuid::new_v4(), 10_000 + i, user, 3);
        let (producer, topic) = (producer.clone(), env.settings.topics.order_events.clone());
        async move { produce_to(&producer, &topic, &user.to_string(), &value, &[]).await }
    });
    futures::future::join_all(sends).await;
}

async fn fund_users(env: &TestEnv) {
    for user in 100..100 + USERS {
        env.funded_account(user, 1_000_000).await;
    }
}

async fn assert_each_order_debited_once(env: &TestEnv, orders: i64) {
    assert_eq!(
        env.scalar("SELECT count(*) FROM transfers WHERE kind = 'DEBIT'")
            .await,
        orders
    );
    assert_eq!(
        env.scalar("SELECT count(DISTINCT order_id) FROM transfers WHERE kind = 'DEBIT'")
            .await,
        orders
    );
    assert_eq!(
        env.scalar("SELECT count(*) FROM processed_events").await,
        orders
    );
    assert_eq!(env.scalar("SELECT sum(-delta_fen)::bigint FROM ledger_entries e JOIN accounts a ON a.id = e.account_id WHERE a.kind = 'USER' AND delta_fen < 0").await, orders * 3);
    // Each debit's AccountDebited was written once: still in the outbox, or published (the
    // relay moves a row to the log of published rows).
    let causes: Vec<Uuid> =
        sqlx::query_scalar("SELECT cause_event_id FROM transfers WHERE kind = 'DEBIT'")
            .fetch_all(&env.pool)
            .await
            .expect("debits");
    let debited: Vec<Uuid> = causes
        .into_iter()
        .map(|cause| derived_event_id(cause, AccountDebited::TYPE))
        .collect();
    let emitted: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM outbox WHERE event_id = ANY($1)) \
              + (SELECT count(*) FROM outbox_published WHERE event_id = ANY($1))",
    )
    .bind(&debited)
    .fetch_one(&env.pool)
    .await
    .expect("emitted");
    assert_eq!(emitted, orders);
    env.assert_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_killed_with_sigkill_mid_stream_and_restarted_applies_every_event_exactly_once()
{
    let env = TestEnv::new(3).await;
    fund_users(&env).await;
    produce_orders(&env, 0..1_200).await;

    let small_batches = [("PAYSTREAM__PROCESSOR__BATCH_MAX", "40")];
    let mut child = env.spawn_child(&["process", "account"], &small_batches);
    wait_until("the processor to make progress", || async {
        (env.consumed().await >= 300).then_some(())
    })
    .await;
    child.kill().await.expect("SIGKILL the processor");
    let at_kill = env.consumed().await;
    assert!(
        at_kill < 2_500,
        "the kill must land mid-stream (consumed {at_kill})"
    );

    produce_orders(&env, 1_200..2_500).await;
    let mut child = env.spawn_child(&["process", "account"], &small_batches);
    env.wait_consumed(2_500).await;
    child.kill().await.expect("stop the processor");

    assert_each_order_debited_once(&env, 2_500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_with_sigkill_mid_publish_loses_no_row_and_duplicates_are_harmless() {
    let env = TestEnv::new(3).await;
    fund_users(&env).await;
    // The order service's side of the outbox: OrderCreated rows waiting to be published.
    let total = 3_000_i64;
    let orders: Vec<(i64, i64, i64)> = (0..total)
        .map(|i| (20_000 + i, 100 + i % USERS, 3))
        .collect();
    env.record_orders(&orders).await;
    let mut tx = env.pool.begin().await.expect("begin");
    let rows: Vec<OutboxRow> = (0..total)
        .map(|i| {
            let user = 100 + i % USERS;
            OutboxRow {
                topic: env.settings.topics.order_events.clone(),
                key: Some(user.to_string().into_bytes()),
                payload: order_created(Uuid::new_v4(), 20_000 + i, user, 3),
                headers: vec![],
                event_id: None,
            }
        })
        .collect();
    outbox::insert(&mut tx, &rows).await.expect("outbox rows");
    tx.commit().await.expect("commit");

    let wire = env.collect(&env.settings.topics.order_events);
    let small_batches = [("PAYSTREAM__RELAY__BATCH_MAX", "50")];
    let mut relay = env.spawn_child(&["relay"], &small_batches);
    wait_until("the relay to publish some rows", || async {
        (env.scalar("SELECT count(*) FROM outbox_published").await >= 500).then_some(())
    })
    .await;
    relay.kill().await.expect("SIGKILL the relay");
    let marked = env.scalar("SELECT count(*) FROM outbox_published").await;
    assert!(
        marked < total,
        "the kill must land mid-publish ({marked} of {total} marked)"
    );

    let mut relay = env.spawn_child(&["relay"], &small_batches);
    wait_until("every outbox row published", || async {
        (env.scalar("SELECT count(*) FROM outbox").await == 0).then_some(())
    })
    .await;
    // Every row reaches the topic. Count distinct rows, not messages: the rows published
    // twice (sent before the kill, not yet marked) can make up the total while the last
    // acknowledged rows are still on their way to this consumer.
    wait_until("every row on the topic", || async {
        let distinct: std::collections::HashSet<Vec<u8>> =
            wire.snapshot().into_iter().map(|m| m.value).collect();
        (distinct.len() as i64 == total).then_some(())
    })
    .await;

    // Downstream, whatever was duplicated on the wire is applied once.
    let worker = env.spawn_account_processor(env.settings.clone());
    wait_until("every distinct order processed", || async {
        (env.scalar("SELECT count(*) FROM processed_events").await >= total).then_some(())
    })
    .await;
    worker.stop().await;
    relay.kill().await.expect("stop the relay");
    assert_each_order_debited_once(&env, total).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_connections_killed_mid_batch_are_retried_and_nothing_is_skipped_or_doubled() {
    let env = TestEnv::new(3).await;
    fund_users(&env).await;
    produce_orders(&env, 0..1_500).await;

    let mut settings = env.settings.clone();
    settings.processor.batch_max = 25;
    settings.processor.retry_initial_ms = 10;
    let worker = env.spawn_account_processor(settings);

    // Keep terminating the processor's backends until everything is consumed.
    let admin = sqlx::PgPool::connect(&env.database_url)
        .await
        .expect("admin pool");
    let mut killed = 0_i64;
    let mut tick = tokio::time::interval(Duration::from_millis(30));
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while env.consumed().await < 1_500 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "processing did not finish"
        );
        tick.tick().await;
        if killed < 40 {
            let n: i64 = sqlx::query_scalar(
                r#"
                SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                WHERE datname = current_database() AND pid <> pg_backend_pid()
                  AND application_name = 'paystream' AND state IN ('active', 'idle in transaction')
                "#,
            )
            .fetch_one(&admin)
            .await
            .expect("terminate");
            killed += n;
        }
    }
    worker.stop().await;

    assert!(
        killed > 0,
        "no connection was killed mid-batch; the test proved nothing"
    );
    let retried: u64 = ["transient", "unexpected"]
        .iter()
        .map(|class| METRICS.retries.with_label_values(&["account", class]).get())
        .sum();
    assert!(retried > 0, "the processor never retried");
    assert_each_order_debited_once(&env, 1_500).await;
}

/// Worker A stalls inside its batch transaction (a long GC pause, a frozen VM) past
/// `max.poll.interval.ms`, is dropped from the group, and worker B takes the partition over
/// and applies the event. When A wakes up its commit must be refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_worker_cannot_commit_after_a_rebalance() {
    let env = TestEnv::new(1).await;
    let account = env.funded_account(9, 1_000).await;

    let mut stalled = env.settings.clone();
    stalled.kafka.session_timeout_ms = 3_000;
    stalled.kafka.max_poll_interval_ms = 3_000;
    stalled.processor.stall_before_commit_ms = 10_000;
    let zombie = env.spawn_account_processor(stalled);
    env.produce(
        &env.producer(),
        "9",
        &env.new_order(Uuid::new_v4(), 90, 9, 100).await,
    )
    .await;
    wait_until("worker A to sit inside its batch transaction", || async {
        (env.scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'idle in transaction'").await > 0).then_some(())
    })
    .await;

    let successor = env.spawn_account_processor(env.settings.clone());
    wait_until("worker B to apply the event", || async {
        (env.scalar("SELECT count(*) FROM transfers WHERE kind = 'DEBIT'")
            .await
            == 1)
            .then_some(())
    })
    .await;
    wait_until("worker A's commit to be fenced", || async {
        (METRICS.fenced_commits.with_label_values(&["account"]).get() >= 1).then_some(())
    })
    .await;
    zombie.stop().await;
    successor.stop().await;

    assert_eq!(env.balance(account).await, 900);
    assert_eq!(
        env.scalar("SELECT count(*) FROM transfers WHERE kind = 'DEBIT'")
            .await,
        1
    );
    assert!(env.scalar("SELECT max(epoch) FROM consumer_offsets").await >= 2);
    env.assert_invariants().await;
}

/// A partition of the group that no live worker says it holds is counted in
/// `paystream_partitions_orphaned` (what the alert `PaystreamPartitionsOrphaned` watches):
/// lasting, it means the broker's coordinator left it to a member that does not process it
/// (here a plain consumer in the group) and its events wait. Not counted: the worker's own
/// partition, and a stored offset of a partition the topic no longer has (it was deleted and
/// created again with fewer), which no worker will ever be assigned. Orphaned for a session
/// timeout, the worker rejoins the group; the count falls back once a live worker holds the
/// orphan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_no_live_worker_holds_is_counted_until_one_does() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let env = TestEnv::new(2).await;
    let (group, topic) = (
        &env.settings.processor.account_group,
        &env.settings.topics.order_events,
    );
    for partition in [0, 1, 5] {
        sqlx::query(
            "INSERT INTO consumer_offsets (consumer_group, topic, partition, next_offset, epoch, owner) \
             VALUES ($1, $2, $3, 0, 1, 'a worker long gone')",
        )
        .bind(group)
        .bind(topic)
        .bind(partition)
        .execute(&env.pool)
        .await
        .expect("a stored offset nobody holds");
    }
    // A member of the group that takes partitions and never processes or says so.
    let silent: BaseConsumer =
        paystream_processors::kafka::consumer_config(&env.settings.kafka, group)
            .create()
            .expect("a plain consumer");
    silent.subscribe(&[topic.as_str()]).expect("subscribed");
    let (stop, assigned) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let polling = {
        let (stop, assigned) = (stop.clone(), assigned.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                silent.poll(Duration::from_millis(100));
                let holds = silent.assignment().is_ok_and(|a| a.count() > 0);
                assigned.store(holds, Ordering::Relaxed);
            }
        })
    };
    wait_until("the plain consumer to be assigned the topic", || async {
        assigned.load(Ordering::Relaxed).then_some(())
    })
    .await;

    let worker = env.spawn_account_processor(env.settings.clone());
    let orphaned = || {
        METRICS
            .partitions_orphaned
            .with_label_values(&["account"])
            .get()
    };
    wait_until(
        "the worker to hold one partition and count the other one, not partition 5",
        || async {
            let held = METRICS
                .assigned_partitions
                .with_label_values(&["account"])
                .get();
            (held == 1 && orphaned() == 1).then_some(())
        },
    )
    .await;
    // Orphaned for a session timeout: the worker leaves and joins again, so that the
    // coordinator assigns anew (here the plain consumer keeps its partition).
    wait_until("the worker to rejoin the group", || async {
        let rejoins = METRICS
            .consumer_rejoins
            .with_label_values(&["account"])
            .get();
        (rejoins >= 1).then_some(())
    })
    .await;

    sqlx::query(
        "INSERT INTO consumer_members (consumer_group, topic, owner, partitions, seen_at) \
         VALUES ($1, $2, 'another live worker', ARRAY[0, 1], now())",
    )
    .bind(group)
    .bind(topic)
    .execute(&env.pool)
    .await
    .expect("a live worker holding it");
    wait_until("the count to fall back to none", || async {
        (orphaned() == 0).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    polling.join().expect("the plain consumer's thread");
    worker.stop().await;
}

/// Small batches of several partitions commit in one transaction (`processor.group_commit`),
/// and every partition's stored offset still advances to its end by its own compare-and-set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_batches_of_several_partitions_commit_together_and_each_is_applied_once() {
    let env = TestEnv::new(3).await;
    fund_users(&env).await;
    let worker = env.spawn_account_processor(env.settings.clone());
    // Rounds of a few orders, each round after the previous one is applied: every round is a
    // small batch on each partition its users hash to.
    let (rounds, per_round) = (20, 12);
    for round in 0..rounds {
        produce_orders(&env, round * per_round..(round + 1) * per_round).await;
        env.wait_consumed((round + 1) * per_round).await;
    }
    worker.stop().await;
    assert_each_order_debited_once(&env, rounds * per_round).await;
    let partitions = METRICS.batch_partitions.with_label_values(&["account"]);
    assert!(
        partitions.get_sample_sum() > partitions.get_sample_count() as f64,
        "no batch transaction held more than one partition ({} transactions)",
        partitions.get_sample_count()
    );
    // The topic holds only these orders: each partition's stored offset is one past the last
    // of its messages that was applied, and all of them were.
    let ends: Vec<(i32, i64, i64, i64)> = sqlx::query_as(
        "SELECT o.partition, o.next_offset, max(p.\"offset\") + 1, count(*) \
         FROM consumer_offsets o JOIN processed_events p USING (consumer_group, topic, partition) \
         WHERE o.consumer_group = $1 GROUP BY o.partition, o.next_offset ORDER BY o.partition",
    )
    .bind(&env.settings.processor.account_group)
    .fetch_all(&env.pool)
    .await
    .expect("offsets");
    assert_eq!(ends.len(), 3, "every partition got orders: {ends:?}");
    for (partition, next_offset, after_last, applied) in ends {
        assert_eq!(
            next_offset, after_last,
            "partition {partition}: {next_offset} stored"
        );
        assert_eq!(
            applied, next_offset,
            "partition {partition}: a message was not applied"
        );
    }
}

/// One partition of a transaction that holds several partitions' batches is claimed away
/// while the transaction runs (here by bumping its claim epoch, as another worker's claim
/// does). Its refused compare-and-set rolls the whole transaction back; the worker commits the
/// other partitions without it, and applies nothing of the claimed partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_claimed_away_during_a_shared_transaction_is_left_out_and_the_rest_commit() {
    let env = TestEnv::new(3).await;
    fund_users(&env).await;
    let mut stalled = env.settings.clone();
    stalled.processor.stall_before_commit_ms = 2_000;
    // Once the worker fetches all three partitions, orders produced at once reach it within
    // one poll window of this linger, and one transaction holds all three partitions' batches
    // (with no linger, the first fetch may come back with only some of them).
    stalled.processor.batch_linger_ms = 1_000;
    let worker = env.spawn_account_processor(stalled);
    wait_until("the worker to claim every partition", || async {
        (env.scalar("SELECT count(*) FROM consumer_offsets").await == 3).then_some(())
    })
    .await;
    produce_orders(&env, 0..30).await;
    wait_until("the worker to sit inside its batch transaction", || async {
        (env.scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'idle in transaction'").await > 0).then_some(())
    })
    .await;
    // Partition 2 comes last in the transaction: its compare-and-set is the third.
    sqlx::query(
        "UPDATE consumer_offsets SET epoch = epoch + 1 WHERE consumer_group = $1 AND partition = 2",
    )
    .bind(&env.settings.processor.account_group)
    .execute(&env.pool)
    .await
    .expect("claim partition 2 away");
    wait_until(
        "partitions 0 and 1 to commit without partition 2",
        || async {
            (env.scalar(
            "SELECT count(*) FROM consumer_offsets WHERE partition IN (0, 1) AND next_offset > 0",
        )
        .await
            == 2)
            .then_some(())
        },
    )
    .await;
    worker.stop().await;

    assert_eq!(
        METRICS.fenced_commits.with_label_values(&["account"]).get(),
        1,
        "partition 2's compare-and-set must be refused once"
    );
    let together = METRICS.batch_partitions.with_label_values(&["account"]);
    assert_eq!(
        (together.get_sample_count(), together.get_sample_sum()),
        (1, 2.0),
        "one transaction must have committed partitions 0 and 1 together"
    );
    assert_eq!(
        env.scalar("SELECT count(*) FROM processed_events WHERE partition = 2")
            .await,
        0,
        "nothing of the claimed partition may be applied"
    );
    assert_eq!(
        env.scalar("SELECT next_offset FROM consumer_offsets WHERE partition = 2")
            .await,
        0
    );
    let applied = env.scalar("SELECT count(*) FROM processed_events").await;
    assert!(applied > 0 && applied < 30, "{applied} of 30 applied");
    assert_eq!(
        env.scalar(
            "SELECT sum(next_offset)::bigint FROM consumer_offsets WHERE partition IN (0, 1)"
        )
        .await,
        applied
    );
    assert_eq!(
        env.scalar("SELECT count(*) FROM transfers WHERE kind = 'DEBIT'")
            .await,
        applied
    );
    env.assert_invariants().await;
}

/// SIGTERM: the worker finishes (or abandons) its in-flight batch, leaves the group and exits
/// 0; what it committed is consistent and a successor carries on from the stored offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_worker_cleanly_and_a_successor_carries_on() {
    let env = TestEnv::new(3).await;
    fund_users(&env).await;
    produce_orders(&env, 0..1_000).await;
    let mut child = env.spawn_child(
        &["process", "account"],
        &[("PAYSTREAM__PROCESSOR__BATCH_MAX", "20")],
    );
    wait_until("the processor to make progress", || async {
        (env.consumed().await >= 100).then_some(())
    })
    .await;
    let pid = child.id().expect("child pid").to_string();
    let status = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("kill");
    assert!(status.success());
    let exit = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("exits in time")
        .expect("wait");
    assert!(
        exit.success(),
        "graceful shutdown must exit 0, got {exit:?}"
    );
    env.assert_invariants().await;

    let successor = env.spawn_account_processor(env.settings.clone());
    env.wait_consumed(1_000).await;
    successor.stop().await;
    assert_each_order_debited_once(&env, 1_000).await;
}

type Log = tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>;

/// Spawns `paystream process account` with its log captured.
fn spawn_logged_processor(env: &TestEnv) -> (tokio::process::Child, Log) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = env.spawn_child_logged(&["process", "account"], &[]);
    let log = BufReader::new(child.stderr.take().expect("stderr")).lines();
    (child, log)
}

/// Reads the log until a line contains `needle`. False when the log ends first or after 60 s.
async fn log_says(log: &mut Log, needle: &str) -> bool {
    let found = async {
        while let Some(line) = log.next_line().await.expect("read the log") {
            if line.contains(needle) {
                return true;
            }
        }
        false
    };
    tokio::time::timeout(Duration::from_secs(60), found)
        .await
        .unwrap_or(false)
}

const PAST_END: &str = "the log holds nothing from its start up to the stored offset";

/// A topic deleted and recreated under a live database leaves stored offsets past the end
/// of the new, empty log. The worker applies nothing there and says so in its log instead of
/// waiting silently. When the new log grows past the stored offset, its messages are not
/// the ones the database counted as applied: the partition is held, nothing is skipped into
/// (docs/operations.md). This stored offset has no fingerprint, as one written by a version
/// before fingerprints: the report itself is the evidence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_offset_past_the_end_of_a_recreated_topic_is_reported_and_the_partition_is_held() {
    let env = TestEnv::new(1).await;
    fund_users(&env).await;
    sqlx::query(
        "INSERT INTO consumer_offsets (consumer_group, topic, partition, next_offset, epoch, owner) \
         VALUES ($1, $2, 0, 3, 1, 'a worker of the old topic')",
    )
    .bind(&env.settings.processor.account_group)
    .bind(&env.settings.topics.order_events)
    .execute(&env.pool)
    .await
    .expect("stored offset");
    let (mut child, mut log) = spawn_logged_processor(&env);
    let reported = log_says(&mut log, PAST_END).await;
    let held = if reported {
        produce_orders(&env, 0..5).await;
        log_says(&mut log, "the log reached the stored offset only after").await
    } else {
        false
    };
    child.kill().await.expect("stopped");
    assert!(reported, "the worker named the problem in its log");
    assert!(
        held,
        "the worker held the partition when the new log reached the stored offset"
    );
    assert_eq!(env.scalar("SELECT count(*) FROM processed_events").await, 0);
    assert_eq!(
        env.scalar("SELECT next_offset FROM consumer_offsets").await,
        3,
        "the stored offset was left for an operator to decide"
    );
}

/// The same, for real: events applied from a topic, the topic deleted and created again, new
/// events produced to it. The message before the stored offset is another one than the group
/// applied (its fingerprint differs), so the worker holds the partition instead of skipping
/// the new topic's first events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_recreated_under_a_live_database_is_held_and_none_of_its_events_are_skipped() {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let env = TestEnv::new(1).await;
    fund_users(&env).await;
    produce_orders(&env, 0..5).await;
    let worker = env.spawn_account_processor(env.settings.clone());
    env.wait_consumed(5).await;
    worker.stop().await;

    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.settings.kafka.brokers)
        .create()
        .expect("admin client");
    let deleted = admin
        .delete_topics(&[&env.settings.topics.order_events], &AdminOptions::new())
        .await
        .expect("delete topic");
    assert!(deleted.iter().all(Result::is_ok), "{deleted:?}");
    paystream_processors::kafka::create_topics(&env.settings)
        .await
        .expect("create the topic again");
    // Eight new orders: offsets 0 to 7 of the new log, where the database stands at 5.
    produce_orders(&env, 100..108).await;

    let (mut child, mut log) = spawn_logged_processor(&env);
    let held = log_says(&mut log, "is not the one this consumer group applied").await;
    child.kill().await.expect("stopped");
    assert!(held, "the worker held the partition and said why");
    assert_each_order_debited_once(&env, 5).await;
    assert_eq!(
        env.scalar("SELECT next_offset FROM consumer_offsets").await,
        5,
        "the stored offset was left for an operator to decide"
    );
}
