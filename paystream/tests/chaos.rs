//! The chaos soak: every role as its own process (the API, two account processors, an order
//! processor, a relay) on a broker of its own with durable storage, concurrent HTTP clients
//! that place orders and cancel some, and a seeded nemesis that kills, restarts, freezes and
//! cuts. Then it heals, waits for quiescence and checks: the invariants of SPEC §6; every
//! acknowledged order and cancel honoured; every ledger debit and refund has its event on
//! `account.events` and every such event its ledger row; stored offsets at the end of each
//! log. For each fault it measures the time from the fault's end to the next progress of
//! all three pipelines (account group, order group, relay).
//!
//! CI runs one short seed. `scripts/chaos.sh --seed N --minutes M` runs longer ones:
//! `CHAOS_SEED`, `CHAOS_SECONDS`. The report is a table and one JSON line on stdout.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::http::{order_body, Client};
use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::{json, Value};
use tokio::process::Child;

const USERS: i64 = 12;
const CLIENTS: usize = 3;
const PARTITIONS: i32 = 3;

/// SplitMix64: the nemesis and the clients are reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One `paystream` process of the system under test.
struct Role {
    name: &'static str,
    args: &'static [&'static str],
    /// Extra settings of this role.
    env: &'static [(&'static str, &'static str)],
    child: Option<Child>,
}

struct Cluster<'a> {
    env: &'a TestEnv,
    api_listen: String,
    roles: Vec<Role>,
    broker: Option<Broker>,
    broker_port: u16,
    broker_dir: std::path::PathBuf,
}

impl Cluster<'_> {
    fn spawn(&mut self, i: usize) {
        let role = &mut self.roles[i];
        let log = self.broker_dir.join(format!("{}.log", role.name));
        let mut settings = vec![
            ("PAYSTREAM__API__LISTEN", self.api_listen.as_str()),
            ("PAYSTREAM__DATABASE__MAX_CONNECTIONS", "4"),
            ("PAYSTREAM__LOG__FORMAT", "json"),
            ("RUST_LOG", "info"),
        ];
        settings.extend(role.env.iter().copied());
        let child = self.env.spawn_child_to_file(role.args, &settings, &log);
        role.child = Some(child);
    }

    async fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.roles[i].child.take() {
            // SIGKILL; a frozen process dies too.
            let _ = child.kill().await;
        }
    }

    fn signal(&self, i: usize, signal: &str) {
        if let Some(pid) = self.roles[i].child.as_ref().and_then(Child::id) {
            let _ = std::process::Command::new("kill")
                .args([signal, &pid.to_string()])
                .status();
        }
    }

    async fn restart_broker(&mut self, down: Duration) {
        if let Some(broker) = self.broker.take() {
            broker.kill().await;
        }
        tokio::time::sleep(down).await;
        self.broker = Some(Broker::start(self.broker_port, &self.broker_dir).await);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillAndRestart,
    KillAndRestartLater,
    Freeze,
    FreezeMidBatch,
    BrokerRestart,
    TerminateBackends,
}

impl Fault {
    const ALL: [Fault; 6] = [
        Fault::KillAndRestart,
        Fault::KillAndRestartLater,
        Fault::Freeze,
        Fault::FreezeMidBatch,
        Fault::BrokerRestart,
        Fault::TerminateBackends,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::KillAndRestart => "SIGKILL, restart at once",
            Fault::KillAndRestartLater => "SIGKILL, restart 2-10 s later",
            Fault::Freeze => "SIGSTOP past the session timeout, SIGCONT",
            Fault::FreezeMidBatch => "SIGSTOP mid-batch (rows locked) past the session timeout",
            Fault::BrokerRestart => "broker SIGKILL and restart",
            Fault::TerminateBackends => "pg_terminate_backend of every session",
        }
    }
}

/// What a client got acknowledged.
#[derive(Default)]
struct Acks {
    orders: Vec<(i64, i64)>,
    cancels: Vec<(i64, i64)>,
}

/// Posts until the API answers (it may be down or restarting), with the same idempotency key.
async fn post(
    api: &Client,
    path: &str,
    user: i64,
    key: &str,
    body: &Value,
    stop: &AtomicBool,
) -> Option<common::http::Reply> {
    let token = api.token(user);
    for attempt in 0.. {
        match api.try_post(path, &token, key, body).await {
            // Down, overloaded, rate-limited or still running the first attempt: try again.
            Ok(reply)
                if reply.status.is_server_error()
                    || reply.status == 429
                    || reply.status == 409 && reply.code() == "IDEMPOTENCY_KEY_IN_USE" => {}
            Ok(reply) => return Some(reply),
            Err(_) => {}
        }
        // After the load stops, an unanswered request is dropped (not acknowledged).
        if stop.load(Ordering::Relaxed) && attempt > 50 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

async fn client(api: Client, seed: u64, stop: Arc<AtomicBool>) -> Acks {
    let mut rng = Rng(seed);
    let mut acks = Acks::default();
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        // A steady load (about 20 orders/s per client), not a flood: the soak is about
        // faults, and the development broker with durable storage is slow.
        tokio::time::sleep(Duration::from_millis(50)).await;
        i += 1;
        let user = 1 + rng.below(USERS as u64) as i64;
        let amount = 100 + rng.below(5_000) as i64;
        let key = format!("chaos-{seed}-{i}");
        let Some(reply) = post(&api, "/v1/orders", user, &key, &order_body(amount), &stop).await
        else {
            continue;
        };
        assert_eq!(reply.status, 201, "{reply:?}");
        let id = reply.id();
        acks.orders.push((user, id));
        if rng.below(4) == 0 {
            let path = format!("/v1/orders/{id}/cancel");
            let Some(reply) = post(
                &api,
                &path,
                user,
                &format!("{key}-cancel"),
                &json!({}),
                &stop,
            )
            .await
            else {
                continue;
            };
            match (reply.status.as_u16(), reply.code()) {
                (200 | 202, _) => acks.cancels.push((user, id)),
                (409, "ORDER_NOT_CANCELLABLE") => {}
                _ => panic!("unexpected cancel reply {reply:?}"),
            }
        }
    }
    acks
}

/// When, and the progress counters: the stored offset of each partition of both groups, and
/// the published outbox rows.
type Sample = (Instant, Vec<i64>);

async fn sample(
    pool: &sqlx::PgPool,
    settings: &paystream_processors::settings::Settings,
) -> Option<Sample> {
    let counters: Vec<i64> = sqlx::query_scalar(
        r#"
        SELECT coalesce(o.next_offset, 0)
        FROM unnest(ARRAY[$1, $2]) WITH ORDINALITY AS g(name, n)
        CROSS JOIN generate_series(0, $3 - 1) AS p(partition)
        LEFT JOIN consumer_offsets o ON o.consumer_group = g.name AND o.partition = p.partition
        UNION ALL
        SELECT count(*) FROM outbox WHERE published_at IS NOT NULL
        "#,
    )
    .bind(&settings.processor.account_group)
    .bind(&settings.orders.group)
    .bind(PARTITIONS)
    .fetch_all(pool)
    .await
    .ok()?;
    Some((Instant::now(), counters))
}

/// Seconds from `end` until every counter (each partition of each group, and the relay) moved
/// past where it stood at `end`: a partition left without an owner counts, even while the
/// others move. The load keeps every partition busy, so each has work waiting.
fn recovery(samples: &[Sample], end: Instant) -> Option<f64> {
    let at_end = samples
        .iter()
        .rev()
        .find(|s| s.0 <= end)
        .or(samples.first())?;
    let mut worst = Duration::ZERO;
    for (k, &before) in at_end.1.iter().enumerate() {
        let moved = samples
            .iter()
            .find(|s| s.0 > end && s.1.get(k).is_some_and(|&v| v > before))?;
        worst = worst.max(moved.0.duration_since(end));
    }
    Some(worst.as_secs_f64())
}

fn high_watermarks(brokers: &str, topic: &str) -> Vec<i64> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "chaos-watermarks")
        .create()
        .expect("consumer");
    (0..PARTITIONS)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks")
                .1
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_a_seeded_nemesis_nothing_is_lost_or_doubled_and_every_pipeline_resumes() {
    let seed = env_u64("CHAOS_SEED", 1);
    let seconds = env_u64("CHAOS_SECONDS", 45);
    let broker_port = free_port();
    let broker_dir = std::env::temp_dir().join(format!("paystream-chaos-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&broker_dir).expect("broker dir");
    let broker = Broker::start(broker_port, &broker_dir).await;
    let brokers = format!("127.0.0.1:{broker_port}");
    let env = TestEnv::with_brokers(PARTITIONS, &brokers).await;
    let api_listen = format!("127.0.0.1:{}", free_port());
    let api = Client::new(format!("http://{api_listen}"), &env.settings.api.jwt_secret);
    // account-2 holds each batch open 200 ms before its commit, so a freeze of it lands in
    // the middle of a batch, with its rows locked.
    const MID_BATCH: usize = 2;
    let stall: &[(&str, &str)] = &[("PAYSTREAM__PROCESSOR__STALL_BEFORE_COMMIT_MS", "200")];
    let roles = [
        ("api", &["api"][..], &[][..]),
        ("account-1", &["process", "account"][..], &[][..]),
        ("account-2", &["process", "account"][..], stall),
        ("order", &["process", "order"][..], &[][..]),
        ("relay", &["relay"][..], &[][..]),
    ];
    let mut cluster = Cluster {
        env: &env,
        api_listen,
        roles: roles
            .iter()
            .map(|&(name, args, env)| Role {
                name,
                args,
                env,
                child: None,
            })
            .collect(),
        broker: Some(broker),
        broker_port,
        broker_dir,
    };
    for i in 0..cluster.roles.len() {
        cluster.spawn(i);
    }
    let never = AtomicBool::new(false);
    for user in 1..=USERS {
        let account = post(
            &api,
            "/v1/accounts",
            user,
            &format!("open-{user}"),
            &json!({"currency": "CNY"}),
            &never,
        )
        .await
        .expect("open");
        // A few users run dry, so some debits fail.
        let balance = if user % 4 == 0 { 20_000 } else { 100_000_000 };
        let path = format!("/v1/accounts/{}/deposits", account.id());
        let admin = Client::new(api.base.clone(), &env.settings.api.jwt_secret);
        let reply = admin
            .try_post(
                &path,
                &admin.admin_token(),
                &format!("fund-{user}"),
                &json!({"amountFen": balance}),
            )
            .await
            .expect("deposit");
        assert_eq!(reply.status, 201, "{reply:?}");
    }

    // Load and the progress sampler run through the whole nemesis phase.
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| tokio::spawn(client(api.clone(), seed * 1_000 + c as u64, stop.clone())))
        .collect();
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let sampler = {
        let (samples, pool, settings) = (samples.clone(), env.pool.clone(), env.settings.clone());
        // It samples through the heal too: a recovery is measured until then.
        tokio::spawn(async move {
            loop {
                if let Some(s) = sample(&pool, &settings).await {
                    samples.lock().expect("samples").push(s);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    // The nemesis: one fault at a time, a pause between, faults end by 80 % of the run.
    let mut rng = Rng(seed ^ 0xc4a0_5000);
    let started = Instant::now();
    let session = Duration::from_millis(env.settings.kafka.session_timeout_ms);
    let mut injected: Vec<(Fault, &'static str, Instant)> = Vec::new();
    while started.elapsed() < Duration::from_secs(seconds * 8 / 10) {
        tokio::time::sleep(Duration::from_millis(2_000 + rng.below(4_000))).await;
        let fault = Fault::ALL[rng.below(Fault::ALL.len() as u64) as usize];
        let i = match fault {
            Fault::FreezeMidBatch => MID_BATCH,
            _ => rng.below(cluster.roles.len() as u64) as usize,
        };
        let target = match fault {
            Fault::BrokerRestart => "broker",
            Fault::TerminateBackends => "postgresql",
            _ => cluster.roles[i].name,
        };
        match fault {
            Fault::KillAndRestart => {
                cluster.kill(i).await;
                cluster.spawn(i);
            }
            Fault::KillAndRestartLater => {
                cluster.kill(i).await;
                tokio::time::sleep(Duration::from_millis(2_000 + rng.below(8_000))).await;
                cluster.spawn(i);
            }
            Fault::Freeze | Fault::FreezeMidBatch => {
                cluster.signal(i, "-STOP");
                tokio::time::sleep(session + Duration::from_secs(2)).await;
                cluster.signal(i, "-CONT");
            }
            Fault::BrokerRestart => {
                cluster
                    .restart_broker(Duration::from_millis(1_000 + rng.below(2_000)))
                    .await;
            }
            Fault::TerminateBackends => {
                sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                )
                .execute(&env.pool)
                .await
                .expect("terminate backends");
            }
        }
        let end = Instant::now();
        injected.push((fault, target, end));
        // The next fault waits until this one's recovery is measured (or 60 s passed), so
        // that each recovery is this fault's alone.
        while end.elapsed() < Duration::from_secs(60)
            && recovery(&samples.lock().expect("samples"), end).is_none()
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut acks = Acks::default();
    for c in clients {
        let got = c.await.expect("client task");
        acks.orders.extend(got.orders);
        acks.cancels.extend(got.cancels);
    }

    // Heal: every role running, then quiescence.
    for i in 0..cluster.roles.len() {
        cluster.signal(i, "-CONT");
        let alive = cluster.roles[i]
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
        if !alive {
            cluster.spawn(i);
        }
    }
    let explain = || async {
        let state: Vec<(String, i32, i64, String, f64)> = sqlx::query_as(
            "SELECT consumer_group, partition, next_offset, owner, \
                    extract(epoch FROM now() - updated_at)::float8 FROM consumer_offsets ORDER BY 1, 2",
        )
        .fetch_all(&env.pool)
        .await
        .unwrap_or_default();
        let orders: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, count(*) FROM orders GROUP BY status ORDER BY 1")
                .fetch_all(&env.pool)
                .await
                .unwrap_or_default();
        let unpublished = env
            .scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            .await;
        format!(
            "\nfaults: {injected:?}\noffsets (group, partition, next, owner, idle s): {state:#?}\n\
             orders: {orders:?}\nunpublished outbox rows: {unpublished}\nlogs in {}",
            cluster.broker_dir.display()
        )
    };
    wait_until_or_explain("every order settled and the outbox drained", || async {
        let unsettled = env
            .scalar(
                r#"
                SELECT (SELECT count(*) FROM orders o
                        WHERE o.status = 'PENDING'
                           OR (o.status = 'PAID' AND o.refund_requested_at IS NOT NULL)
                           OR (o.status = 'CANCELLED' AND EXISTS
                                (SELECT 1 FROM transfers t WHERE t.order_id = o.id AND t.kind = 'DEBIT')
                               AND o.refunded_at IS NULL))
                     + (SELECT count(*) FROM outbox WHERE published_at IS NULL)
                "#,
            )
            .await;
        (unsettled == 0).then_some(())
    }, explain)
    .await;
    let account_events = env.settings.topics.account_events.clone();
    let order_events = env.settings.topics.order_events.clone();
    let stored = |group: String, topic: String| {
        let env = &env;
        async move {
            let rows: Vec<(i32, i64)> = sqlx::query_as(
                "SELECT partition, next_offset FROM consumer_offsets WHERE consumer_group = $1 AND topic = $2 ORDER BY partition",
            )
            .bind(group)
            .bind(topic)
            .fetch_all(&env.pool)
            .await
            .expect("offsets");
            rows
        }
    };
    // Stored offsets reach the end of each log (tansu may report a high watermark at the
    // start of the last record batch, so "at least").
    for (group, topic) in [
        (
            env.settings.processor.account_group.clone(),
            order_events.clone(),
        ),
        (env.settings.orders.group.clone(), account_events.clone()),
    ] {
        let brokers = brokers.clone();
        let t = topic.clone();
        let ends = tokio::task::spawn_blocking(move || high_watermarks(&brokers, &t))
            .await
            .expect("watermarks");
        wait_until(&format!("{group} to reach the end of {topic}"), || async {
            let offsets = stored(group.clone(), topic.clone()).await;
            let reached = (0..PARTITIONS).all(|p| {
                let end = ends[p as usize];
                end == 0 || offsets.iter().any(|&(q, next)| q == p && next >= end)
            });
            reached.then_some(())
        })
        .await;
    }
    sampler.abort();
    let samples = samples.lock().expect("samples").clone();

    // Every ledger debit and refund has its event on account.events, and every such event its
    // ledger row.
    let ends = {
        let (brokers, t) = (brokers.clone(), account_events.clone());
        tokio::task::spawn_blocking(move || high_watermarks(&brokers, &t))
            .await
            .expect("watermarks")
    };
    let wire = env.collect(&account_events);
    let received = wait_until("account.events read to its end", || async {
        let got = wire.snapshot();
        let reached = (0..PARTITIONS).all(|p| {
            ends[p as usize] == 0
                || got
                    .iter()
                    .any(|r| r.partition == p && r.offset + 1 >= ends[p as usize])
        });
        reached.then_some(got)
    })
    .await;
    let on_wire: BTreeSet<(String, i64)> = received
        .iter()
        .map(Received::json)
        .filter(|e| e["eventType"] == "AccountDebited" || e["eventType"] == "AccountRefunded")
        .map(|e| {
            (
                e["eventType"].as_str().unwrap_or("").to_owned(),
                e["payload"]["orderId"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    let in_ledger: BTreeSet<(String, i64)> = sqlx::query_as::<_, (String, i64)>(
        "SELECT CASE kind WHEN 'DEBIT' THEN 'AccountDebited' ELSE 'AccountRefunded' END, order_id \
         FROM transfers WHERE kind IN ('DEBIT', 'REFUND')",
    )
    .fetch_all(&env.pool)
    .await
    .expect("transfers")
    .into_iter()
    .collect();

    // Every acknowledged order and cancel is honoured.
    let statuses: HashMap<i64, String> =
        sqlx::query_as::<_, (i64, String)>("SELECT id, status FROM orders")
            .fetch_all(&env.pool)
            .await
            .expect("orders")
            .into_iter()
            .collect();
    let mut anomalies: Vec<String> = Vec::new();
    for &(_, id) in &acks.orders {
        match statuses.get(&id).map(String::as_str) {
            Some("PAID" | "CANCELLED" | "REFUNDED") => {}
            other => anomalies.push(format!("acknowledged order {id} is {other:?}")),
        }
    }
    for &(_, id) in &acks.cancels {
        match statuses.get(&id).map(String::as_str) {
            Some("CANCELLED" | "REFUNDED") => {}
            other => anomalies.push(format!(
                "acknowledged cancel of order {id}, which is {other:?}"
            )),
        }
    }
    for missing in in_ledger.difference(&on_wire) {
        anomalies.push(format!(
            "{missing:?} is in the ledger but not on account.events"
        ));
    }
    for missing in on_wire.difference(&in_ledger) {
        anomalies.push(format!(
            "{missing:?} is on account.events but not in the ledger"
        ));
    }
    let violations = paystream_processors::audit::check(
        &env.pool,
        &paystream_processors::audit::Limits::quiescent(&env.settings),
    )
    .await
    .expect("audit");
    anomalies.extend(
        violations
            .iter()
            .map(|v| format!("{}: {}", v.invariant, v.detail)),
    );

    // The report: per fault class, injections and the worst recovery.
    let mut table: BTreeMap<Fault, (usize, f64, usize)> = BTreeMap::new();
    for &(fault, target, end) in &injected {
        let entry = table.entry(fault).or_insert((0, 0.0, 0));
        entry.0 += 1;
        let at = end.duration_since(started).as_secs_f64();
        match recovery(&samples, end) {
            Some(secs) => {
                entry.1 = entry.1.max(secs);
                println!(
                    "fault ended at {at:.1} s: {} of {target}; resumed {secs:.1} s later",
                    fault.name()
                );
            }
            None => {
                entry.2 += 1;
                println!(
                    "fault ended at {at:.1} s: {} of {target}; no progress measured",
                    fault.name()
                );
            }
        }
    }
    println!(
        "chaos seed {seed}, {seconds} s: {} orders and {} cancels acknowledged, {} faults",
        acks.orders.len(),
        acks.cancels.len(),
        injected.len()
    );
    println!("| fault | injected | worst recovery (s) | unmeasured |");
    println!("| --- | --- | --- | --- |");
    for (fault, (n, worst, unmeasured)) in &table {
        println!("| {} | {n} | {worst:.1} | {unmeasured} |", fault.name());
    }
    let report = json!({
        "seed": seed,
        "seconds": seconds,
        "ordersAcknowledged": acks.orders.len(),
        "cancelsAcknowledged": acks.cancels.len(),
        "anomalies": anomalies.len(),
        "faults": table.iter().map(|(f, (n, worst, unmeasured))| json!({
            "fault": f.name(), "injected": n, "worstRecoverySeconds": worst, "unmeasured": unmeasured
        })).collect::<Vec<_>>(),
    });
    println!("{report}");
    assert!(
        !acks.orders.is_empty(),
        "no order was acknowledged: the soak tested nothing"
    );
    assert!(anomalies.is_empty(), "anomalies: {anomalies:#?}");
    for i in 0..cluster.roles.len() {
        cluster.kill(i).await;
    }
}
