//! Test harness: every test gets its own database and its own topics and consumer groups on
//! the real PostgreSQL and the real broker (started by `scripts/test.sh`), so tests run in
//! parallel without seeing each other.
#![allow(dead_code)]

pub mod http;
pub mod raw;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use paystream_processors::accounts::processor as account_processor;
use paystream_processors::accounts::store;
use paystream_processors::domain::{Amount, Currency};
use paystream_processors::outbox::relay;
use paystream_processors::settings::Settings;
use paystream_processors::{db, kafka};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const DEADLINE: Duration = Duration::from_secs(90);

pub fn admin_url() -> String {
    std::env::var("PAYSTREAM_ADMIN_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://paystream:paystream@127.0.0.1:5432/paystream".into())
}

pub fn brokers() -> String {
    std::env::var("PAYSTREAM_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// Polls `check` until it returns `Some`, or panics with `what` after `DEADLINE`.
pub async fn wait_until<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    wait_until_or_explain(what, check, || async { String::new() }).await
}

/// Like `wait_until`; on timeout, `explain` says what the world looked like.
pub async fn wait_until_or_explain<T, F, Fut, E, EFut>(what: &str, check: F, explain: E) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
    E: FnOnce() -> EFut,
    EFut: Future<Output = String>,
{
    wait_until_within(what, DEADLINE, check, explain).await
}

/// Like `wait_until_or_explain`, with a deadline of its own, for a wait known to be slower
/// than `DEADLINE` (say why where it is used).
pub async fn wait_until_within<T, F, Fut, E, EFut>(
    what: &str,
    within: Duration,
    mut check: F,
    explain: E,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
    E: FnOnce() -> EFut,
    EFut: Future<Output = String>,
{
    let deadline = tokio::time::Instant::now() + within;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out waiting for: {what} {}", explain().await);
        }
    }
}

/// Runs `run(settings, pool, cancel)` in this process, with its own pool, until stopped.
pub fn spawn_worker<F, Fut>(settings: &Settings, run: F) -> Worker
where
    F: FnOnce(Settings, PgPool, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let cancel = CancellationToken::new();
    let pool = db::connect(&settings.database).expect("pool");
    let task = tokio::spawn(run(settings.clone(), pool, cancel.clone()));
    Worker { cancel, task }
}

pub struct TestEnv {
    pub id: String,
    pub settings: Settings,
    pub pool: PgPool,
    pub database_url: String,
}

impl TestEnv {
    pub async fn new(partitions: i32) -> Self {
        Self::with_brokers(partitions, &brokers()).await
    }

    pub async fn with_brokers(partitions: i32, brokers: &str) -> Self {
        let id = Uuid::new_v4().simple().to_string()[..12].to_owned();
        let admin = admin_url();
        let db_name = format!("ps_test_{id}");
        let mut conn = PgConnection::connect(&admin)
            .await
            .expect("connect as admin");
        sqlx::query(&format!("CREATE DATABASE {db_name}"))
            .execute(&mut conn)
            .await
            .expect("create db");
        let base = admin
            .rsplit_once('/')
            .map(|(b, _)| b)
            .expect("url has a database");
        let database_url = format!("{base}/{db_name}");

        let mut settings = Settings::load(None).expect("defaults");
        settings.database.url = database_url.clone();
        settings.database.max_connections = 8;
        settings.kafka.brokers = brokers.to_owned();
        settings.kafka.partitions = partitions;
        settings.kafka.session_timeout_ms = 6000;
        settings.topics.order_events = format!("{id}.order.events");
        settings.topics.account_events = format!("{id}.account.events");
        settings.topics.dead_letter = format!("{id}.deadletter.events");
        settings.processor.account_group = format!("{id}-account");
        settings.orders.group = format!("{id}-order");
        settings.api.rate_limit_per_s = 1_000_000.0;
        settings.api.rate_limit_burst = 1_000_000.0;
        settings.processor.retry_max_ms = 1000;
        settings.relay.poll_interval_ms = 200;
        // A killed relay's successor takes over this long after its last round.
        settings.relay.lease_ms = 3000;
        // A key of the test's own, as a deployment has (the published one is refused).
        settings.api.jwt_secret = format!("test-key-{}", Uuid::new_v4());

        // Workers in this process log to the test's captured output.
        paystream_processors::telemetry::init_logging(&settings.log);
        let pool = db::connect(&settings.database).expect("pool");
        db::migrate(&pool).await.expect("migrate");
        kafka::create_topics(&settings).await.expect("topics");
        Self {
            id,
            settings,
            pool,
            database_url,
        }
    }

    /// Environment overrides that make a `paystream` child process use this test's world.
    pub fn child_env(&self) -> Vec<(String, String)> {
        let s = &self.settings;
        [
            ("PAYSTREAM__DATABASE__URL", s.database.url.clone()),
            ("PAYSTREAM__DATABASE__MAX_CONNECTIONS", "8".into()),
            // Tests run in parallel: each worker's metrics endpoint takes a free port.
            ("PAYSTREAM__METRICS__LISTEN", "127.0.0.1:0".into()),
            ("PAYSTREAM__KAFKA__BROKERS", s.kafka.brokers.clone()),
            ("PAYSTREAM__API__JWT_SECRET", s.api.jwt_secret.clone()),
            (
                "PAYSTREAM__KAFKA__SESSION_TIMEOUT_MS",
                s.kafka.session_timeout_ms.to_string(),
            ),
            (
                "PAYSTREAM__TOPICS__ORDER_EVENTS",
                s.topics.order_events.clone(),
            ),
            (
                "PAYSTREAM__TOPICS__ACCOUNT_EVENTS",
                s.topics.account_events.clone(),
            ),
            (
                "PAYSTREAM__TOPICS__DEAD_LETTER",
                s.topics.dead_letter.clone(),
            ),
            (
                "PAYSTREAM__PROCESSOR__ACCOUNT_GROUP",
                s.processor.account_group.clone(),
            ),
            ("PAYSTREAM__ORDERS__GROUP", s.orders.group.clone()),
            (
                "PAYSTREAM__PROCESSOR__RETRY_MAX_MS",
                s.processor.retry_max_ms.to_string(),
            ),
            (
                "PAYSTREAM__RELAY__POLL_INTERVAL_MS",
                s.relay.poll_interval_ms.to_string(),
            ),
            ("PAYSTREAM__RELAY__LEASE_MS", s.relay.lease_ms.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// `paystream <args>` as a child process of this test's world.
    fn child_command(&self, args: &[&str], extra_env: &[(&str, &str)]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_paystream"));
        cmd.args(args)
            .envs(self.child_env())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .kill_on_drop(true);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Starts `paystream <args>` as a child process of this test's world.
    pub fn spawn_child(&self, args: &[&str], extra_env: &[(&str, &str)]) -> tokio::process::Child {
        self.child_command(args, extra_env)
            .spawn()
            .expect("spawn paystream")
    }

    /// Like `spawn_child`, with its log appended to `log` (many processes, long runs).
    pub fn spawn_child_to_file(
        &self,
        args: &[&str],
        extra_env: &[(&str, &str)],
        log: &std::path::Path,
    ) -> tokio::process::Child {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open the log");
        self.child_command(args, extra_env)
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("spawn paystream")
    }

    /// Like `spawn_child`, with stdout captured.
    pub fn spawn_child_piped(
        &self,
        args: &[&str],
        extra_env: &[(&str, &str)],
    ) -> tokio::process::Child {
        self.child_command(args, extra_env)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn paystream")
    }

    /// Like `spawn_child`, with stderr (the log) captured.
    pub fn spawn_child_logged(
        &self,
        args: &[&str],
        extra_env: &[(&str, &str)],
    ) -> tokio::process::Child {
        self.child_command(args, extra_env)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn paystream")
    }

    /// Runs an account processor worker in this process until the token is cancelled.
    pub fn spawn_account_processor(&self, settings: Settings) -> Worker {
        spawn_worker(&settings, account_processor::run)
    }

    pub fn spawn_relay(&self) -> Worker {
        spawn_worker(&self.settings, relay::run)
    }

    /// Opens a user account and deposits `balance` fen into it through the ledger.
    pub async fn funded_account(&self, user_id: i64, balance: i64) -> i64 {
        let mut tx = self.pool.begin().await.expect("begin");
        let id = store::open_account(&mut tx, user_id, Currency::CNY)
            .await
            .expect("open");
        self.deposit_in(&mut tx, id, balance).await;
        tx.commit().await.expect("commit");
        id
    }

    /// Records orders as the API takes them (PENDING rows in CNY, no event): the account
    /// processor moves money only for an order that exists with the event's terms. Each is
    /// `(order_id, user_id, amount)`.
    pub async fn record_orders(&self, orders: &[(i64, i64, i64)]) {
        let ids: Vec<i64> = orders.iter().map(|o| o.0).collect();
        let users: Vec<i64> = orders.iter().map(|o| o.1).collect();
        let amounts: Vec<i64> = orders.iter().map(|o| o.2).collect();
        sqlx::query(
            r#"
            INSERT INTO orders (id, order_no, user_id, amount_fen, currency)
            SELECT id, 'ORD-' || id, user_id, amount, 'CNY'
            FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS o(id, user_id, amount)
            ON CONFLICT (id) DO NOTHING
            "#,
        )
        .bind(&ids)
        .bind(&users)
        .bind(&amounts)
        .execute(&self.pool)
        .await
        .expect("record orders");
        // Orders the API takes later get ids past these.
        sqlx::query(
            "SELECT setval(pg_get_serial_sequence('orders', 'id'), (SELECT max(id) FROM orders))",
        )
        .execute(&self.pool)
        .await
        .expect("move the order id sequence");
    }

    /// An order as the API takes it: its row (`record_orders`), and the `OrderCreated` that
    /// announces it. A non-positive amount records nothing (the table refuses it; the event
    /// is poison anyway).
    pub async fn new_order(
        &self,
        event_id: Uuid,
        order_id: i64,
        user_id: i64,
        amount: i64,
    ) -> Vec<u8> {
        if amount > 0 {
            self.record_orders(&[(order_id, user_id, amount)]).await;
        }
        order_created(event_id, order_id, user_id, amount)
    }

    /// The saga's side of a cancel, as the order processor or the API does it: the order row
    /// CANCELLED, and the `OrderCancelled` that announces it.
    pub async fn cancel_order(
        &self,
        event_id: Uuid,
        order_id: i64,
        user_id: i64,
        refund: bool,
    ) -> Vec<u8> {
        sqlx::query("UPDATE orders SET status = 'CANCELLED', cancel_reason = 'USER_CANCELLED', cancelled_at = now() WHERE id = $1")
            .bind(order_id)
            .execute(&self.pool)
            .await
            .expect("cancel the order");
        order_cancelled(event_id, order_id, user_id, refund)
    }

    /// Deposits `fen` into the account through the ledger.
    pub async fn deposit(&self, account_id: i64, fen: i64) {
        let mut tx = self.pool.begin().await.expect("begin");
        self.deposit_in(&mut tx, account_id, fen).await;
        tx.commit().await.expect("commit");
    }

    async fn deposit_in(&self, conn: &mut PgConnection, account_id: i64, fen: i64) {
        if let Some(amount) = Amount::new(fen) {
            store::deposit(
                conn,
                account_id,
                amount,
                "test",
                &self.settings.topics.account_events,
            )
            .await
            .expect("deposit query")
            .expect("deposit posts");
        }
    }

    pub async fn balance(&self, account_id: i64) -> i64 {
        sqlx::query_scalar("SELECT balance_fen FROM accounts WHERE id = $1")
            .bind(account_id)
            .fetch_one(&self.pool)
            .await
            .expect("balance")
    }

    /// Sum of stored offsets of the account group: how many messages it has consumed.
    pub async fn consumed(&self) -> i64 {
        sqlx::query_scalar::<_, Option<i64>>(
            "SELECT sum(next_offset)::bigint FROM consumer_offsets WHERE consumer_group = $1",
        )
        .bind(&self.settings.processor.account_group)
        .fetch_one(&self.pool)
        .await
        .expect("offsets")
        .unwrap_or(0)
    }

    pub async fn wait_consumed(&self, n: i64) {
        let check = || async { (self.consumed().await >= n).then_some(()) };
        // Say where each partition is stuck, to tell a stalled worker from a slow broker.
        let explain = || async {
            let offsets: Vec<(i32, i64, i64, String)> = sqlx::query_as(
                "SELECT partition, next_offset, epoch, owner FROM consumer_offsets \
                 WHERE consumer_group = $1 ORDER BY partition",
            )
            .bind(&self.settings.processor.account_group)
            .fetch_all(&self.pool)
            .await
            .unwrap_or_default();
            format!("; stored (partition, offset, epoch, owner): {offsets:?}")
        };
        wait_until_or_explain(&format!("{n} messages consumed"), check, explain).await;
    }

    pub async fn scalar(&self, sql: &str) -> i64 {
        sqlx::query_scalar::<_, Option<i64>>(sql)
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .unwrap_or(0)
    }

    pub async fn assert_invariants(&self) {
        let violations = paystream_processors::audit::check(
            &self.pool,
            &paystream_processors::audit::Limits::quiescent(&self.settings),
        )
        .await
        .expect("audit runs");
        assert!(
            violations.is_empty(),
            "invariants violated: {violations:#?}"
        );
    }

    pub fn producer(&self) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.settings.kafka.brokers)
            .set("message.max.bytes", "8388608")
            .set("linger.ms", "1")
            .create()
            .expect("producer")
    }

    pub async fn produce(&self, producer: &FutureProducer, key: &str, value: &[u8]) {
        produce_to(
            producer,
            &self.settings.topics.order_events,
            key,
            value,
            &[],
        )
        .await;
    }

    /// Collects every message of `topic` from the beginning, in the background.
    pub fn collect(&self, topic: &str) -> Collector {
        Collector::start(&self.settings.kafka.brokers, topic, DEFAULT_SOCKET_TIMEOUT)
    }

    /// Like `collect`, for a long log on a slow broker: a request may take minutes. (tansu's
    /// sqlite storage reads a partition from the fetch position to its end for every fetch:
    /// a first fetch of some 18,000 records took 54 s on an idle broker, more under load,
    /// past librdkafka's default 60 s request timeout, after which it asks again.)
    pub fn collect_patiently(&self, topic: &str) -> Collector {
        Collector::start(&self.settings.kafka.brokers, topic, PATIENT_SOCKET_TIMEOUT)
    }
}

pub async fn produce_to(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    value: &[u8],
    headers: &[(&str, &str)],
) {
    let mut hs = OwnedHeaders::new();
    for (k, v) in headers {
        hs = hs.insert(Header {
            key: k,
            value: Some(*v),
        });
    }
    producer
        .send(
            FutureRecord::to(topic).key(key).payload(value).headers(hs),
            Timeout::After(Duration::from_secs(30)),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("produce");
}

pub struct Worker {
    pub cancel: CancellationToken,
    pub task: JoinHandle<anyhow::Result<()>>,
}

impl Worker {
    pub async fn stop(self) {
        self.cancel.cancel();
        self.task
            .await
            .expect("worker task")
            .expect("worker ends cleanly");
    }
}

/// An `OrderCreated` envelope as the order service would emit it (`TestEnv::new_order` also
/// records the order, without which no money moves).
pub fn order_created(event_id: Uuid, order_id: i64, user_id: i64, amount: i64) -> Vec<u8> {
    envelope(
        event_id,
        "OrderCreated",
        json!({
            "orderId": order_id, "orderNo": format!("ORD-{order_id}"), "userId": user_id,
            "amountFen": amount, "currency": "CNY",
            "items": [{"sku": "SKU-1", "qty": 1, "priceFen": amount}],
            "idempotencyKey": format!("key-{order_id}")
        }),
    )
}

pub fn order_cancelled(event_id: Uuid, order_id: i64, user_id: i64, refund: bool) -> Vec<u8> {
    envelope(
        event_id,
        "OrderCancelled",
        json!({"orderId": order_id, "userId": user_id, "reason": "USER_CANCELLED", "refundRequired": refund}),
    )
}

pub fn envelope(event_id: Uuid, event_type: &str, payload: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "eventId": event_id, "eventType": event_type, "schemaVersion": 1,
        "occurredAt": "2026-11-24T00:00:00Z", "payload": payload
    }))
    .expect("json")
}

#[derive(Debug, Clone)]
pub struct Received {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    /// Header values as text (lossy), by name.
    pub headers: HashMap<String, String>,
    /// Every header as it came, in order.
    pub header_bytes: Vec<(String, Vec<u8>)>,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.value).unwrap_or(Value::Null)
    }
}

pub struct Collector {
    pub messages: Arc<Mutex<Vec<Received>>>,
    task: JoinHandle<()>,
}

/// librdkafka's `socket.timeout.ms` default, and the patient collector's (the most it allows).
const DEFAULT_SOCKET_TIMEOUT: Duration = Duration::from_secs(60);
pub const PATIENT_SOCKET_TIMEOUT: Duration = Duration::from_secs(300);

impl Collector {
    fn start(brokers: &str, topic: &str, socket_timeout: Duration) -> Self {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("socket.timeout.ms", socket_timeout.as_millis().to_string())
            .set("group.id", format!("collector-{}", Uuid::new_v4()))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("fetch.max.bytes", "20971520")
            .set("max.partition.fetch.bytes", "10485760")
            .create()
            .expect("collector consumer");
        consumer.subscribe(&[topic]).expect("subscribe");
        let messages = Arc::new(Mutex::new(Vec::new()));
        let sink = messages.clone();
        let task = tokio::spawn(async move {
            let mut stream = consumer.stream();
            while let Some(Ok(m)) = stream.next().await {
                let header_bytes = paystream_processors::kafka::owned_headers(&m);
                let headers = header_bytes
                    .iter()
                    .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
                    .collect();
                let received = Received {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                    headers,
                    header_bytes,
                };
                sink.lock().expect("lock").push(received);
            }
        });
        Self { messages, task }
    }

    pub fn snapshot(&self) -> Vec<Received> {
        self.messages.lock().expect("lock").clone()
    }

    /// Waits until at least `n` messages arrived and returns them all.
    pub async fn wait_for(&self, n: usize) -> Vec<Received> {
        wait_until(&format!("{n} messages on the topic"), || async {
            let all = self.snapshot();
            (all.len() >= n).then_some(all)
        })
        .await
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Checks `event` against `schemas/<eventType>.v1.json`.
pub fn assert_valid(schemas: &std::path::Path, event_type: &str, event: &Value) {
    let path = schemas.join(format!("{event_type}.v1.json"));
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .expect("schema is JSON");
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(event)
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "{event_type} does not match its schema: {errors:?}\n{event}"
    );
}

pub fn schemas_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas")
}

/// A free TCP port on 127.0.0.1 (free when asked; tests bind it soon after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub struct Broker {
    child: tokio::process::Child,
}

impl Broker {
    /// Starts tansu with durable sqlite storage in `dir` (tansu resolves the sqlite URL's path
    /// against its working directory, so it runs there with a relative one).
    pub async fn start(port: u16, dir: &std::path::Path) -> Self {
        let bin = std::env::var("PAYSTREAM_TANSU_BIN")
            .expect("PAYSTREAM_TANSU_BIN (set by scripts/test.sh)");
        let url = format!("tcp://127.0.0.1:{port}");
        let child = tokio::process::Command::new(bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "sqlite://broker.db"])
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start tansu");
        wait_until("the broker to listen", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
        Self { child }
    }

    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill broker");
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// SplitMix64: reproducible "random" choices from a seed, without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
