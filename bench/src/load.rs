//! The load: orders produced, `AccountDebited` received, and the work the pipeline did.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;
use paystream_processors::domain::{Amount, Currency};
use paystream_processors::events::{
    derived_event_id, AccountDebited, Envelope, EventPayload, OrderCreated, OrderItem,
};
use paystream_processors::kafka;
use paystream_processors::settings::Settings;
use paystream_processors::telemetry::METRICS;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use sqlx::PgPool;
use uuid::Uuid;

use crate::cpu::wall_us;
use crate::stats::nearest_rank;
use crate::users::Users;

/// How the work was cut: batch transactions of the account processor and relay rounds, with
/// what they carried, as counted by their metrics.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Work {
    pub(crate) transactions: u64,
    pub(crate) events: f64,
    pub(crate) relay_rounds: u64,
    pub(crate) relay_rows: f64,
}

impl Work {
    /// Prints how phase `number` cut its work over `seconds`.
    pub(crate) fn print(&self, number: i64, seconds: f64) {
        println!(
            "  phase {number}: {} batch transactions ({:.0}/s, {:.1} events each), {} relay rounds ({:.0}/s, {:.1} rows each)",
            self.transactions,
            self.transactions as f64 / seconds,
            self.events / self.transactions.max(1) as f64,
            self.relay_rounds,
            self.relay_rounds as f64 / seconds,
            self.relay_rows / self.relay_rounds.max(1) as f64,
        );
    }

    pub(crate) fn now() -> Self {
        let batches = METRICS.batch_size.with_label_values(&["account"]);
        let rounds = &METRICS.relay_round_rows;
        Self {
            transactions: batches.get_sample_count(),
            events: batches.get_sample_sum(),
            relay_rounds: rounds.get_sample_count(),
            relay_rows: rounds.get_sample_sum(),
        }
    }

    pub(crate) fn since(self, before: Self) -> Self {
        Self {
            transactions: self.transactions.saturating_sub(before.transactions),
            events: self.events - before.events,
            relay_rounds: self.relay_rounds.saturating_sub(before.relay_rounds),
            relay_rows: self.relay_rows - before.relay_rows,
        }
    }
}

/// When each order was produced: a monotonic instant (to the bench's receipt) and the wall
/// clock in microseconds (to the times PostgreSQL recorded, on the same host).
#[derive(Default)]
pub(crate) struct Sent {
    pub(crate) at: HashMap<i64, Instant>,
    pub(crate) wall_us: HashMap<i64, i64>,
}

/// The orders of one phase: order `i` is `first_order + i`, of user `users.of(i)`.
pub(crate) struct Orders<'a> {
    pub(crate) producer: &'a FutureProducer,
    pub(crate) topic: &'a str,
    pub(crate) first_order: i64,
    pub(crate) users: &'a Users,
}

impl Orders<'_> {
    /// Records orders `range` as the API would have taken them: the account processor moves
    /// money only for an order that exists with the event's terms.
    pub(crate) async fn record(
        &self,
        pool: &PgPool,
        range: std::ops::Range<u64>,
    ) -> anyhow::Result<()> {
        record_orders(pool, self.first_order, self.users, range).await
    }

    /// Produces orders `range`, at `rate` per second or as fast as the producer takes them,
    /// and waits until the broker acknowledged every one.
    pub(crate) async fn produce(
        &self,
        range: std::ops::Range<u64>,
        rate: Option<u64>,
        sent: &mut Sent,
    ) -> anyhow::Result<()> {
        let mut ticker = rate.map(|r| {
            let per_tick = (r / 100).max(1);
            (
                tokio::time::interval(Duration::from_secs_f64(per_tick as f64 / r as f64)),
                per_tick,
            )
        });
        let mut deliveries = Vec::with_capacity((range.end - range.start) as usize);
        let mut i = range.start;
        while i < range.end {
            let burst = match ticker.as_mut() {
                Some((interval, per_tick)) => {
                    interval.tick().await;
                    *per_tick
                }
                None => range.end - i,
            };
            for _ in 0..burst.min(range.end - i) {
                let order_id = self.first_order + i as i64;
                let user_id = self.users.of(i);
                let value = order_created(order_id, user_id)?;
                let key = user_id.to_string();
                sent.at.insert(order_id, Instant::now());
                sent.wall_us.insert(order_id, wall_us());
                let mut record = FutureRecord::to(self.topic).key(&key).payload(&value);
                loop {
                    match self.producer.send_result(record) {
                        Ok(delivery) => break deliveries.push(delivery),
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                            record = back;
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        Err((e, _)) => return Err(e).context("Failed to produce a bench order"),
                    }
                }
                i += 1;
            }
        }
        let failed = futures::future::join_all(deliveries)
            .await
            .into_iter()
            .filter(|d| !matches!(d, Ok(Ok(_))))
            .count();
        anyhow::ensure!(failed == 0, "{failed} orders could not be produced");
        Ok(())
    }
}

/// Records orders `first_order + i` for `i` in `range` (of user `users.of(i)`) as the API
/// would have taken them: the account processor moves money only for an order that exists
/// with the event's terms.
pub(crate) async fn record_orders(
    pool: &PgPool,
    first_order: i64,
    users: &Users,
    range: std::ops::Range<u64>,
) -> anyhow::Result<()> {
    let ids: Vec<i64> = range.clone().map(|i| first_order + i as i64).collect();
    let user_ids: Vec<i64> = range.map(|i| users.of(i)).collect();
    sqlx::query(
        r#"
        INSERT INTO orders (id, order_no, user_id, amount_fen, currency)
        SELECT id, 'BENCH-' || id, user_id, 1, 'CNY' FROM unnest($1::bigint[], $2::bigint[]) AS t(id, user_id)
        "#,
    )
    .bind(&ids)
    .bind(&user_ids)
    .execute(pool)
    .await
    .context("Failed to record the bench orders")?;
    vacuum_analyze(pool, "orders").await
}

/// Vacuums and analyzes `tables` after the bench loaded them in bulk, as pgbench does after
/// its load, so that they are what a system that grew to this size has, and autovacuum does
/// not pick the load up in the middle of a measured phase.
///
/// - Statistics: without them the planner takes a freshly loaded table for a small one and
///   looks a batch's rows up by scanning all of it: the 100,000 user accounts for every
///   batch's account lock, or every order for the batch's order check (docs/performance.md
///   §4). Autovacuum analyzes a table about a minute after it changed by a tenth, and a
///   phase starts at once.
/// - Dead rows: funding opens and then updates every user's account in one transaction,
///   100,000 dead row versions. Autovacuum took them up during the throughput phase, a
///   vacuum of about 1.4 s, in some runs and not others (§4).
pub(crate) async fn vacuum_analyze(pool: &PgPool, tables: &str) -> anyhow::Result<()> {
    sqlx::query(&format!("VACUUM (ANALYZE) {tables}"))
        .execute(pool)
        .await
        .with_context(|| format!("Failed to vacuum and analyze {tables}"))?;
    Ok(())
}

pub(crate) fn order_created(order_id: i64, user_id: i64) -> anyhow::Result<Vec<u8>> {
    let amount = Amount::new(1).context("amount")?;
    let payload = OrderCreated {
        order_id,
        order_no: format!("BENCH-{order_id}"),
        user_id,
        amount_fen: amount,
        currency: Currency::CNY,
        items: vec![OrderItem {
            sku: "BENCH".into(),
            qty: 1,
            price_fen: amount,
        }],
        idempotency_key: format!("bench-{order_id}"),
    };
    Ok(Envelope::new(Uuid::new_v4(), chrono::Utc::now(), payload).to_bytes())
}

/// When the bench saw an order's `AccountDebited`, and when the relay produced it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Received {
    pub(crate) at: Instant,
    pub(crate) wall_ms: i64,
    /// The record's CreateTime: when the relay's producer sent it.
    pub(crate) produced_ms: Option<i64>,
}

/// What PostgreSQL recorded of each order's `AccountDebited` (wall clock, microseconds):
/// when its batch transaction started (the outbox row's `created_at`) and when the broker
/// acknowledged it (`published_at`, as the relay saw the acknowledgement).
pub(crate) struct Timeline {
    pub(crate) rows: HashMap<i64, (i64, i64)>,
}

impl Timeline {
    pub(crate) async fn read(pool: &PgPool, account_events: &str) -> anyhow::Result<Self> {
        // The log of published rows names events, not orders: an order's `AccountDebited`
        // has the id derived from the `OrderCreated` its debit records as the cause.
        let debits: Vec<(i64, Uuid)> = sqlx::query_as(
            "SELECT order_id, cause_event_id FROM transfers \
             WHERE kind = 'DEBIT' AND cause_event_id IS NOT NULL",
        )
        .fetch_all(pool)
        .await?;
        let order_of: HashMap<Uuid, i64> = debits
            .into_iter()
            .map(|(order, cause)| {
                let debited = derived_event_id(cause, AccountDebited::TYPE);
                (debited, order)
            })
            .collect();
        let published: Vec<(Uuid, i64, i64)> = sqlx::query_as(
            r#"
            SELECT event_id,
                   (extract(epoch FROM created_at) * 1000000)::bigint,
                   (extract(epoch FROM published_at) * 1000000)::bigint
            FROM outbox_published WHERE topic = $1 AND event_id IS NOT NULL
            "#,
        )
        .bind(account_events)
        .fetch_all(pool)
        .await?;
        Ok(Self {
            rows: published
                .into_iter()
                .filter_map(|(event, started, published)| {
                    Some((*order_of.get(&event)?, (started, published)))
                })
                .collect(),
        })
    }

    /// Splits end-to-end latency into its hops: produce -> batch transaction start (broker
    /// hop 1 and batching), transaction start -> relay send (commit, NOTIFY, relay), relay
    /// send -> published (the broker's acknowledgement), and relay send -> bench receive
    /// (broker hop 2, a downstream consumer's view).
    pub(crate) fn print_hops(
        &self,
        sent_wall_us: &HashMap<i64, i64>,
        received: &HashMap<i64, Received>,
    ) {
        let (mut hop1, mut middle, mut acked, mut hop2) = (vec![], vec![], vec![], vec![]);
        for (order, (started, published)) in &self.rows {
            let Some(sent) = sent_wall_us.get(order) else {
                continue;
            };
            hop1.push(started - sent);
            let Some(got) = received.get(order) else {
                continue;
            };
            if let Some(relay_sent) = got.produced_ms.map(|ms| ms * 1000) {
                middle.push(relay_sent - started);
                acked.push(published - relay_sent);
                hop2.push(got.wall_ms * 1000 - relay_sent);
            }
        }
        for v in [&mut hop1, &mut middle, &mut acked, &mut hop2] {
            v.sort_unstable();
        }
        let pct = |v: &[i64], p: f64| nearest_rank(v, p).map_or(-1, |us| us / 1000);
        println!(
            "  hops p50/p99 ms: produce -> txn start {}/{}, txn start -> relay send {}/{}, relay send -> published {}/{}, relay send -> received {}/{}",
            pct(&hop1, 0.5),
            pct(&hop1, 0.99),
            pct(&middle, 0.5),
            pct(&middle, 0.99),
            pct(&acked, 0.5),
            pct(&acked, 0.99),
            pct(&hop2, 0.5),
            pct(&hop2, 0.99)
        );
    }
}

/// The two fields the bench's consumer reads of an account event. It shares the two cores
/// with what it measures, so it skips the rest rather than building the whole document.
#[derive(serde::Deserialize)]
struct Seen {
    #[serde(rename = "eventType")]
    event_type: String,
    payload: SeenPayload,
}

#[derive(serde::Deserialize)]
struct SeenPayload {
    #[serde(rename = "orderId")]
    order_id: Option<i64>,
}

pub(crate) fn results_consumer(
    settings: &Settings,
    received: Arc<Mutex<HashMap<i64, Received>>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut config = kafka::base_config(&settings.kafka);
    config
        .set(
            "group.id",
            format!("{}-results", settings.processor.account_group),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set(
            "fetch.wait.max.ms",
            settings.kafka.fetch_wait_max_ms.to_string(),
        );
    let consumer: StreamConsumer = config.create()?;
    consumer.subscribe(&[settings.topics.account_events.as_str()])?;
    Ok(tokio::spawn(async move {
        let mut stream = consumer.stream();
        while let Some(Ok(message)) = stream.next().await {
            let now = Received {
                at: Instant::now(),
                wall_ms: chrono::Utc::now().timestamp_millis(),
                produced_ms: message.timestamp().to_millis(),
            };
            let Some(value) = message.payload() else {
                continue;
            };
            let Ok(event) = serde_json::from_slice::<Seen>(value) else {
                continue;
            };
            if event.event_type != "AccountDebited" {
                continue;
            }
            if let (Some(order), Ok(mut map)) = (event.payload.order_id, received.lock()) {
                map.entry(order).or_insert(now);
            }
        }
    }))
}

pub(crate) async fn wait_for<F, Fut>(limit: Duration, what: &str, mut done: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    loop {
        tick.tick().await;
        if done().await {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
    }
}
