//! `paystream bench`: load generator and measurement of the account processor end to end
//! (event produced -> debit committed -> `AccountDebited` published, and received by a
//! downstream consumer).
//!
//! Latency is measured to *published*: the broker acknowledged the `AccountDebited`
//! (`acks=all`) and the relay marked its outbox row so. That is where the processor's work
//! ends; a downstream consumer's own fetch wait comes on top and is printed beside it.
//!
//! It works in a database of its own (`paystream_bench_<id>`, created and dropped) and on
//! topics of its own, against the configured PostgreSQL and broker, with the processor and
//! relay running in this process. Three phases:
//! 1. throughput: `--events` orders produced as fast as possible, batched transactions;
//! 2. latency: orders at a steady `--rate` for `--seconds`, batched transactions;
//! 3. naive: the same work with one event per transaction (batch size 1), the
//!    `SELECT ... FOR UPDATE`-per-order approach of the original request, over
//!    `--naive-events` orders (its rate is steady from the start, and at a few hundred a
//!    second the full count would take minutes).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;
use paystream_processors::accounts::processor as account_processor;
use paystream_processors::domain::{Amount, Currency};
use paystream_processors::events::{Envelope, OrderCreated, OrderItem};
use paystream_processors::outbox::relay;
use paystream_processors::settings::Settings;
use paystream_processors::telemetry::{self, METRICS};
use paystream_processors::{db, kafka, ledger};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Orders in the throughput phase. Long enough (about ten seconds here) that filling and
    /// draining the pipeline, and a short burst of host CPU steal, do not decide the rate.
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// Orders in the one-per-transaction phase (at most `--events`).
    #[arg(long, default_value_t = 20_000)]
    pub naive_events: u64,
    /// Distinct users (accounts) the orders are spread over.
    #[arg(long, default_value_t = 1_000)]
    pub users: i64,
    /// Events per second in the latency phase.
    #[arg(long, default_value_t = 1_000)]
    pub rate: u64,
    /// Length of the latency phase.
    #[arg(long, default_value_t = 15)]
    pub seconds: u64,
    /// Partitions of the bench's topics. A worker applies its partitions in parallel, so
    /// more partitions than the machine has cores plus one only splits the same work into
    /// smaller transactions; `topics create` uses `kafka.partitions` (6) to leave room to
    /// scale out to more workers.
    #[arg(long, default_value_t = 3)]
    pub partitions: i32,
    /// Skip the one-event-per-transaction comparison.
    #[arg(long)]
    pub skip_naive: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub debits_per_sec: f64,
    /// Produced -> `AccountDebited` published, in the latency phase.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Produced -> `AccountDebited` received by a downstream consumer, in the latency phase.
    pub received_p50_ms: f64,
    pub received_p99_ms: f64,
    pub naive_debits_per_sec: Option<f64>,
    pub events: u64,
    pub naive_events: Option<u64>,
    pub batched_vs_naive: Option<f64>,
    pub latency_rate_per_sec: u64,
    pub throughput_p99_ms: f64,
    pub partitions: i32,
    /// The whole machine's CPU during the latency phase (Linux only): how busy it was, and
    /// how much time the hypervisor gave to other guests (steal).
    pub latency_cpu_busy_pct: Option<f64>,
    pub latency_cpu_steal_pct: Option<f64>,
    /// The same for the throughput phase: a few seconds long, so a burst of host steal
    /// there shows in `debits_per_sec`.
    pub throughput_cpu_busy_pct: Option<f64>,
    pub throughput_cpu_steal_pct: Option<f64>,
    /// Latency-phase p99 over the orders no host steal touched (no 100 ms interval in which
    /// the machine's steal counter moved lies between their produce and publish), and how
    /// many of the orders those were. A diagnostic beside `p99_ms`, not instead of it.
    pub unstolen_p99_ms: Option<f64>,
    pub unstolen_events_pct: Option<f64>,
}

struct Phase {
    events: u64,
    elapsed: Duration,
    /// Produced -> `AccountDebited` published, per order, in ascending order.
    latencies: Vec<Duration>,
    /// Produced -> `AccountDebited` received by the bench's consumer, in ascending order.
    received: Vec<Duration>,
    cpu: Option<CpuShare>,
    /// Produced -> published for the orders that no host steal touched (see `StealWindows`),
    /// in ascending order; `None` where steal cannot be read.
    unstolen: Option<Vec<Duration>>,
}

/// The machine's CPU time counters from `/proc/stat`, in ticks.
#[derive(Debug, Clone, Copy)]
struct CpuTicks {
    busy: u64,
    steal: u64,
    total: u64,
}

impl CpuTicks {
    /// `None` where there is no `/proc/stat` (not Linux).
    fn now() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    fn parse(stat: &str) -> Option<Self> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let field = |i: usize| v.get(i).copied().unwrap_or(0);
        let (idle, steal) = (field(3) + field(4), field(7));
        let total: u64 = (0..8).map(field).sum();
        Some(Self {
            busy: total - idle - steal,
            steal,
            total,
        })
    }

    fn share_since(self, before: Self) -> Option<CpuShare> {
        let total = self.total.checked_sub(before.total).filter(|t| *t > 0)? as f64;
        Some(CpuShare {
            busy_pct: self.busy.saturating_sub(before.busy) as f64 * 100.0 / total,
            steal_pct: self.steal.saturating_sub(before.steal) as f64 * 100.0 / total,
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct CpuShare {
    busy_pct: f64,
    steal_pct: f64,
}

/// When the host stole CPU during a phase: `/proc/stat` read every 100 ms, and the
/// intervals (wall clock, microseconds) in which the machine's steal counter moved. A
/// phase's steal percentage says how much; this says when, so that the orders in flight at
/// those moments can be told from the rest. The counter moves in 10 ms ticks, so a steal
/// shorter than that may show in the next interval.
#[derive(Debug, Default)]
struct StealWindows {
    stolen: Vec<(i64, i64)>,
}

impl StealWindows {
    const EVERY: Duration = Duration::from_millis(100);

    /// Samples until `stop` fires; `None` where there is no `/proc/stat` (not Linux).
    async fn sample(stop: CancellationToken) -> Option<Self> {
        let read = || Some((wall_us(), CpuTicks::now()?.steal));
        let mut last = read()?;
        let mut windows = Self::default();
        let mut tick = tokio::time::interval(Self::EVERY);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let now = read()?;
            if now.1 > last.1 {
                windows.stolen.push((last.0, now.0));
            }
            last = now;
        }
        Some(windows)
    }

    /// Whether `[from, to]` (microseconds) overlaps a window with steal.
    fn touches(&self, from: i64, to: i64) -> bool {
        // Windows are in time order and do not overlap: the first one ending after `from`
        // is the only candidate.
        let i = self.stolen.partition_point(|&(_, end)| end <= from);
        self.stolen.get(i).is_some_and(|&(start, _)| start < to)
    }
}

fn wall_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

impl Phase {
    fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        ms(nearest_rank(&self.latencies, p))
    }

    fn received_percentile_ms(&self, p: f64) -> f64 {
        ms(nearest_rank(&self.received, p))
    }

    fn unstolen_percentile_ms(&self, p: f64) -> Option<f64> {
        Some(ms(nearest_rank(self.unstolen.as_ref()?, p)))
    }

    /// The share of the measured orders that no host steal touched.
    fn unstolen_pct(&self) -> Option<f64> {
        let clean = self.unstolen.as_ref()?.len();
        Some(clean as f64 * 100.0 / self.latencies.len().max(1) as f64)
    }
}

fn ms(d: Option<Duration>) -> f64 {
    d.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
}

/// Produced -> published of each (produced, published) flight in microseconds, in ascending
/// order.
fn flight_times<'a>(flights: impl Iterator<Item = &'a (i64, i64)>) -> Vec<Duration> {
    let mut times: Vec<Duration> = flights
        .map(|(sent, published)| Duration::from_micros((published - sent).max(0) as u64))
        .collect();
    times.sort_unstable();
    times
}

/// The nearest-rank percentile `p` (0..=1) of `sorted`, which must be in ascending order.
fn nearest_rank<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    let rank = ((sorted.len() as f64 * p).ceil() as usize).max(1);
    sorted.get(rank.min(sorted.len()).checked_sub(1)?).copied()
}

pub async fn run(base: Settings, args: BenchArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(
        args.events > 0 && args.users > 0 && args.rate > 0 && args.partitions > 0,
        "--events, --users, --rate and --partitions must be positive"
    );
    let id = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let db_name = format!("paystream_bench_{id}");
    let admin = db::connect(&base.database)?;
    sqlx::query(&format!("CREATE DATABASE {db_name}"))
        .execute(&admin)
        .await
        .context("Failed to create the bench database (the role needs CREATEDB)")?;
    let mut settings = base.clone();
    let (prefix, _) = base
        .database
        .url
        .rsplit_once('/')
        .context("database.url has no database name")?;
    let query = base
        .database
        .url
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    settings.database.url = format!("{prefix}/{db_name}{query}");
    settings.database.max_connections = settings.database.max_connections.max(16);
    settings.kafka.partitions = args.partitions;

    let pool = db::connect(&settings.database)?;
    let result = phases(&settings, &pool, &id, &args).await;
    pool.close().await;
    if let Err(e) = sqlx::query(&format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"))
        .execute(&admin)
        .await
    {
        tracing::warn!(error = %e, database = %db_name, "could not drop the bench database");
    }
    result
}

async fn phases(
    settings: &Settings,
    pool: &PgPool,
    id: &str,
    args: &BenchArgs,
) -> anyhow::Result<Report> {
    db::migrate(pool).await?;
    println!(
        "bench: {} partitions, batch_max {}, {} users, synchronous_commit={}",
        settings.kafka.partitions,
        settings.processor.batch_max,
        args.users,
        sqlx::query_scalar::<_, String>("SHOW synchronous_commit")
            .fetch_one(pool)
            .await?
    );

    broker_floor(settings, id, args).await?;
    let throughput = phase(
        settings,
        pool,
        id,
        1,
        args,
        args.events,
        None,
        settings.processor.batch_max,
    )
    .await?;
    println!(
        "throughput: {} debits in {:.2} s = {:.0} debits/s (p50 {:.1} ms, p99 {:.1} ms under backlog)",
        throughput.events,
        throughput.elapsed.as_secs_f64(),
        throughput.rate(),
        throughput.percentile_ms(0.50),
        throughput.percentile_ms(0.99)
    );
    if let Some(cpu) = throughput.cpu {
        println!(
            "  machine CPU during the throughput phase: {:.0} % busy, {:.0} % stolen by the host",
            cpu.busy_pct, cpu.steal_pct
        );
    }
    let steady_events = args.rate * args.seconds;
    let latency = phase(
        settings,
        pool,
        id,
        2,
        args,
        steady_events,
        Some(args.rate),
        settings.processor.batch_max,
    )
    .await?;
    println!(
        "latency at {}/s: p50 {:.1} ms, p99 {:.1} ms over {} events (produced -> AccountDebited published); at a downstream consumer p50 {:.1} ms, p99 {:.1} ms",
        args.rate,
        latency.percentile_ms(0.50),
        latency.percentile_ms(0.99),
        latency.events,
        latency.received_percentile_ms(0.50),
        latency.received_percentile_ms(0.99)
    );
    if let Some(cpu) = latency.cpu {
        // On a shared virtual machine, time stolen by the host is the usual cause of a
        // run whose tail is far above the others.
        println!(
            "  machine CPU during the latency phase: {:.0} % busy, {:.0} % stolen by the host",
            cpu.busy_pct, cpu.steal_pct
        );
    }
    if let (Some(p50), Some(p99), Some(pct)) = (
        latency.unstolen_percentile_ms(0.50),
        latency.unstolen_percentile_ms(0.99),
        latency.unstolen_pct(),
    ) {
        println!(
            "  orders no host steal touched (no 100 ms interval with steal between produced and published): {pct:.1} %, p50 {p50:.1} ms, p99 {p99:.1} ms"
        );
    }
    let naive = if args.skip_naive {
        None
    } else {
        let events = args.naive_events.clamp(1, args.events);
        let naive = phase(settings, pool, id, 3, args, events, None, 1).await?;
        println!(
            "one event per transaction: {} debits in {:.2} s = {:.0} debits/s; batched is {:.1}x faster",
            naive.events,
            naive.elapsed.as_secs_f64(),
            naive.rate(),
            throughput.rate() / naive.rate()
        );
        Some((naive.rate(), events))
    };
    Ok(Report {
        debits_per_sec: throughput.rate().round(),
        p50_ms: round1(latency.percentile_ms(0.50)),
        p99_ms: round1(latency.percentile_ms(0.99)),
        received_p50_ms: round1(latency.received_percentile_ms(0.50)),
        received_p99_ms: round1(latency.received_percentile_ms(0.99)),
        naive_debits_per_sec: naive.map(|(rate, _)| rate.round()),
        events: args.events,
        naive_events: naive.map(|(_, events)| events),
        batched_vs_naive: naive.map(|(rate, _)| round1(throughput.rate() / rate)),
        latency_rate_per_sec: args.rate,
        throughput_p99_ms: round1(throughput.percentile_ms(0.99)),
        partitions: settings.kafka.partitions,
        latency_cpu_busy_pct: latency.cpu.map(|c| round1(c.busy_pct)),
        latency_cpu_steal_pct: latency.cpu.map(|c| round1(c.steal_pct)),
        throughput_cpu_busy_pct: throughput.cpu.map(|c| round1(c.busy_pct)),
        throughput_cpu_steal_pct: throughput.cpu.map(|c| round1(c.steal_pct)),
        unstolen_p99_ms: latency.unstolen_percentile_ms(0.99).map(round1),
        unstolen_events_pct: latency.unstolen_pct().map(round1),
    })
}

/// The broker alone, with the producer and consumer settings the processors use: messages
/// produced at the latency phase's rate, timed to their ack and to their arrival at a
/// consumer. End-to-end latency crosses the broker twice, so this is its floor.
async fn broker_floor(settings: &Settings, id: &str, args: &BenchArgs) -> anyhow::Result<()> {
    let mut settings = settings.clone();
    let name = format!("bench-{id}-0");
    settings.topics.order_events = format!("{name}.order.events");
    settings.topics.account_events = format!("{name}.account.events");
    settings.topics.dead_letter = format!("{name}.deadletter.events");
    kafka::create_topics(&settings.kafka, &settings.topics).await?;
    let topic = settings.topics.order_events.clone();
    let consumer: StreamConsumer = kafka::consumer_config(&settings.kafka, &name).create()?;
    let mut assignment = rdkafka::TopicPartitionList::new();
    for partition in 0..settings.kafka.partitions {
        assignment.add_partition_offset(&topic, partition, rdkafka::Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    // The first second is a warm-up (producer id, connections, first fetches), not measured.
    let warmup = args.rate as usize;
    let events = warmup + (args.rate * args.seconds.min(5)) as usize;
    let arrived: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; events]));
    let reader = {
        let arrived = arrived.clone();
        tokio::spawn(async move {
            let mut stream = consumer.stream();
            while let Some(Ok(message)) = stream.next().await {
                let now = Instant::now();
                let seq = message
                    .payload()
                    .and_then(|p| <[u8; 8]>::try_from(p).ok())
                    .map(|b| u64::from_be_bytes(b) as usize);
                if let (Some(seq), Ok(mut arrived)) = (seq, arrived.lock()) {
                    if let Some(slot) = arrived.get_mut(seq) {
                        slot.get_or_insert(now);
                    }
                }
            }
        })
    };
    let producer: FutureProducer =
        kafka::producer_config(&settings.kafka, Duration::from_secs(60)).create()?;
    let per_tick = (args.rate / 100).max(1);
    let mut interval =
        tokio::time::interval(Duration::from_secs_f64(per_tick as f64 / args.rate as f64));
    let mut sent = Vec::with_capacity(events);
    let mut acks = Vec::with_capacity(events);
    while sent.len() < events {
        interval.tick().await;
        for _ in 0..per_tick.min((events - sent.len()) as u64) {
            let seq = (sent.len() as u64).to_be_bytes();
            let key = (sent.len() % 1000).to_string();
            let at = Instant::now();
            let delivery = producer
                .send_result(FutureRecord::to(&topic).key(&key).payload(&seq[..]))
                .map_err(|(e, _)| e)
                .context("Failed to produce a probe message")?;
            sent.push(at);
            acks.push(tokio::spawn(async move {
                delivery
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .map(|_| Instant::now())
            }));
        }
    }
    let acked: Vec<Option<Instant>> = futures::future::join_all(acks)
        .await
        .into_iter()
        .map(|a| a.ok().flatten())
        .collect();
    wait_for(
        Duration::from_secs(60),
        "every probe message to arrive",
        || async {
            arrived
                .lock()
                .map(|a| a.iter().all(Option::is_some))
                .unwrap_or(false)
        },
    )
    .await?;
    reader.abort();
    let arrived = arrived
        .lock()
        .map_err(|_| anyhow::anyhow!("probe lock poisoned"))?
        .clone();
    let millis = |ends: &[Option<Instant>]| -> Vec<f64> {
        let mut ms: Vec<f64> = sent[warmup..]
            .iter()
            .zip(&ends[warmup..])
            .filter_map(|(start, end)| {
                end.map(|e| e.saturating_duration_since(*start).as_secs_f64() * 1000.0)
            })
            .collect();
        ms.sort_unstable_by(f64::total_cmp);
        ms
    };
    let pct = |ms: &[f64], p: f64| nearest_rank(ms, p).unwrap_or(f64::NAN);
    let (ack, trip) = (millis(&acked), millis(&arrived));
    println!(
        "broker alone at {}/s: produce -> ack p50 {:.1} ms, p99 {:.1} ms; produce -> consumed p50 {:.1} ms, p99 {:.1} ms ({} messages)",
        args.rate,
        pct(&ack, 0.5),
        pct(&ack, 0.99),
        pct(&trip, 0.5),
        pct(&trip, 0.99),
        events - warmup
    );
    Ok(())
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

#[allow(clippy::too_many_arguments)]
async fn phase(
    base: &Settings,
    pool: &PgPool,
    id: &str,
    number: i64,
    args: &BenchArgs,
    events: u64,
    rate: Option<u64>,
    batch_max: usize,
) -> anyhow::Result<Phase> {
    let mut settings = base.clone();
    let name = format!("bench-{id}-{number}");
    settings.topics.order_events = format!("{name}.order.events");
    settings.topics.account_events = format!("{name}.account.events");
    settings.topics.dead_letter = format!("{name}.deadletter.events");
    settings.processor.account_group = name.clone();
    settings.processor.batch_max = batch_max;
    kafka::create_topics(&settings.kafka, &settings.topics).await?;

    // Users of this phase, funded through the ledger.
    let first_user = number * 10_000_000;
    let mut tx = pool.begin().await?;
    for user in first_user..first_user + args.users {
        let account = ledger::open_account(&mut tx, user, Currency::CNY).await?;
        let amount = Amount::new(1_000_000_000).context("amount")?;
        ledger::deposit(
            &mut tx,
            account,
            amount,
            "bench",
            &settings.topics.account_events,
        )
        .await?
        .map_err(|e| anyhow::anyhow!("bench deposit failed: {e:?}"))?;
    }
    tx.commit().await?;

    // Results: AccountDebited as received from the topic.
    let received: Arc<Mutex<HashMap<i64, Received>>> = Arc::default();
    let results = results_consumer(&settings, received.clone())?;

    let cancel = CancellationToken::new();
    let processor = tokio::spawn(account_processor::run(
        settings.clone(),
        pool.clone(),
        cancel.clone(),
    ));
    let relay = tokio::spawn(relay::run(settings.clone(), pool.clone(), cancel.clone()));
    wait_for(
        Duration::from_secs(120),
        "the processor to claim its partitions",
        || async {
            let claimed: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM consumer_offsets WHERE consumer_group = $1",
            )
            .bind(&name)
            .fetch_one(pool)
            .await
            .unwrap_or(0);
            claimed >= i64::from(settings.kafka.partitions)
        },
    )
    .await?;

    let producer: FutureProducer =
        kafka::producer_config(&settings.kafka, Duration::from_secs(60)).create()?;
    let orders = Orders {
        producer: &producer,
        topic: &settings.topics.order_events,
        first_order: number * 100_000_000,
        first_user,
        users: args.users,
    };
    // The latency phase measures the steady state: a second of orders at the rate first, not
    // measured, so that connection set-up and first fetches are not counted as latency.
    let warmup = rate.unwrap_or(0);
    if warmup > 0 {
        orders
            .produce(events..events + warmup, rate, &mut Sent::default())
            .await?;
        wait_for(
            Duration::from_secs(120),
            "the warm-up orders to be debited",
            || async {
                received
                    .lock()
                    .map(|r| r.len() as u64 >= warmup)
                    .unwrap_or(false)
            },
        )
        .await?;
    }
    let delay_before = telemetry::bucket_counts(&METRICS.consume_delay, &["account"]);
    let batches_before = Work::now();
    let mut sent = Sent::default();
    let cpu_before = CpuTicks::now();
    let stop_sampling = CancellationToken::new();
    let steal_sampler = tokio::spawn(StealWindows::sample(stop_sampling.clone()));
    let started = Instant::now();
    orders.produce(0..events, rate, &mut sent).await?;
    producer.flush(Timeout::After(Duration::from_secs(10)))?;
    let Sent {
        at: sent,
        wall_us: sent_wall_us,
    } = sent;

    let deadline = Duration::from_secs(600 + events / 100);
    wait_for(deadline, "every AccountDebited to be published", || async {
        received
            .lock()
            .map(|r| r.len() as u64 >= events + warmup)
            .unwrap_or(false)
    })
    .await?;
    // Received can come before the relay's mark commits.
    wait_for(deadline, "every AccountDebited to be marked published", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM outbox WHERE topic = $1 AND published_at IS NOT NULL AND headers @> '[[\"eventType\", \"AccountDebited\"]]'",
        )
        .bind(&settings.topics.account_events)
        .fetch_one(pool)
        .await
        .is_ok_and(|n| n as u64 >= events + warmup)
    })
    .await?;
    let delay_after = telemetry::bucket_counts(&METRICS.consume_delay, &["account"]);
    let batches = Work::now().since(batches_before);
    let cpu = cpu_before
        .zip(CpuTicks::now())
        .and_then(|(before, after)| after.share_since(before));
    stop_sampling.cancel();
    let steal_windows = steal_sampler.await?;
    cancel.cancel();
    results.abort();
    processor.await??;
    relay.await??;

    // Where the time goes: from the batch transaction's start to the relay's mark, for the
    // measured orders (the warm-up's first batches wait for connections to open).
    let timeline = Timeline::read(pool, &settings.topics.account_events).await?;
    let mut marked: Vec<i64> = timeline
        .rows
        .iter()
        .filter(|(order, _)| sent_wall_us.contains_key(order))
        .map(|(_, (started, published))| published - started)
        .collect();
    marked.sort_unstable();
    let us_as_ms = |us: Option<i64>| us.map_or(f64::NAN, |us| us as f64 / 1000.0);
    println!(
        "  phase {number}: transaction start -> relay marked published: p50 {:.1} ms, p99 {:.1} ms",
        us_as_ms(nearest_rank(&marked, 0.5)),
        us_as_ms(nearest_rank(&marked, 0.99))
    );

    let delay_ms = |q| {
        telemetry::bucket_quantile(&delay_before, &delay_after, q).map_or(f64::NAN, |s| s * 1000.0)
    };
    println!(
        "  phase {number}: message created -> polled by the processor: p50 <= {} ms, p99 <= {} ms (histogram bucket bounds)",
        delay_ms(0.5),
        delay_ms(0.99)
    );
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "  phase {number}: {} batch transactions ({:.0}/s, {:.1} events each), {} relay rounds ({:.0}/s, {:.1} rows each)",
        batches.transactions,
        batches.transactions as f64 / seconds,
        batches.events / batches.transactions.max(1) as f64,
        batches.relay_rounds,
        batches.relay_rounds as f64 / seconds,
        batches.relay_rows / batches.relay_rounds.max(1) as f64,
    );
    let received = received
        .lock()
        .map_err(|_| anyhow::anyhow!("results lock poisoned"))?
        .clone();
    timeline.print_hops(&sent_wall_us, &received);
    let last = received.values().map(|r| r.at).max().unwrap_or(started);
    // Each measured order's flight: produced and published, wall clock in microseconds.
    let flights: Vec<(i64, i64)> = sent_wall_us
        .iter()
        .filter_map(|(order, sent)| Some((*sent, timeline.rows.get(order)?.1)))
        .collect();
    let latencies = flight_times(flights.iter());
    let unstolen = steal_windows
        .map(|windows| flight_times(flights.iter().filter(|(s, p)| !windows.touches(*s, *p))));
    let mut received_latencies: Vec<Duration> = sent
        .iter()
        .filter_map(|(order, at)| {
            received
                .get(order)
                .map(|done| done.at.saturating_duration_since(*at))
        })
        .collect();
    received_latencies.sort_unstable();
    Ok(Phase {
        events,
        elapsed: last.saturating_duration_since(started),
        latencies,
        received: received_latencies,
        cpu,
        unstolen,
    })
}

/// How the work was cut: batch transactions of the account processor and relay rounds, with
/// what they carried, as counted by their metrics.
#[derive(Debug, Clone, Copy)]
struct Work {
    transactions: u64,
    events: f64,
    relay_rounds: u64,
    relay_rows: f64,
}

impl Work {
    fn now() -> Self {
        let batches = METRICS.batch_size.with_label_values(&["account"]);
        let rounds = &METRICS.relay_round_rows;
        Self {
            transactions: batches.get_sample_count(),
            events: batches.get_sample_sum(),
            relay_rounds: rounds.get_sample_count(),
            relay_rows: rounds.get_sample_sum(),
        }
    }

    fn since(self, before: Self) -> Self {
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
struct Sent {
    at: HashMap<i64, Instant>,
    wall_us: HashMap<i64, i64>,
}

/// The orders of one phase: order `i` is `first_order + i`, of user `first_user + i % users`.
struct Orders<'a> {
    producer: &'a FutureProducer,
    topic: &'a str,
    first_order: i64,
    first_user: i64,
    users: i64,
}

impl Orders<'_> {
    /// Produces orders `range`, at `rate` per second or as fast as the producer takes them,
    /// and waits until the broker acknowledged every one.
    async fn produce(
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
                let user_id = self.first_user + (i as i64 % self.users);
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

fn order_created(order_id: i64, user_id: i64) -> anyhow::Result<Vec<u8>> {
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
struct Received {
    at: Instant,
    wall_ms: i64,
    /// The record's CreateTime: when the relay's producer sent it.
    produced_ms: Option<i64>,
}

/// What PostgreSQL recorded of each order's `AccountDebited` (wall clock, microseconds):
/// when its batch transaction started and when the relay marked it published.
struct Timeline {
    rows: HashMap<i64, (i64, i64)>,
}

impl Timeline {
    async fn read(pool: &PgPool, account_events: &str) -> anyhow::Result<Self> {
        let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
            r#"
            SELECT (convert_from(payload, 'UTF8')::jsonb -> 'payload' ->> 'orderId')::bigint,
                   (extract(epoch FROM created_at) * 1000000)::bigint,
                   (extract(epoch FROM published_at) * 1000000)::bigint
            FROM outbox WHERE topic = $1 AND published_at IS NOT NULL
              AND headers @> '[["eventType", "AccountDebited"]]'
            "#,
        )
        .bind(account_events)
        .fetch_all(pool)
        .await?;
        Ok(Self {
            rows: rows
                .into_iter()
                .map(|(order, started, published)| (order, (started, published)))
                .collect(),
        })
    }

    /// Splits end-to-end latency into its hops: produce -> batch transaction start (broker
    /// hop 1 and batching), transaction start -> relay send (commit, NOTIFY, relay), relay
    /// send -> published (broker ack and the relay's mark), and relay send -> bench receive
    /// (broker hop 2, a downstream consumer's view).
    fn print_hops(&self, sent_wall_us: &HashMap<i64, i64>, received: &HashMap<i64, Received>) {
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

fn results_consumer(
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
            let Ok(event) = serde_json::from_slice::<serde_json::Value>(value) else {
                continue;
            };
            if event["eventType"] != "AccountDebited" {
                continue;
            }
            if let (Some(order), Ok(mut map)) =
                (event["payload"]["orderId"].as_i64(), received.lock())
            {
                map.entry(order).or_insert(now);
            }
        }
    }))
}

async fn wait_for<F, Fut>(limit: Duration, what: &str, mut done: F) -> anyhow::Result<()>
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_order_is_touched_by_steal_only_when_its_flight_overlaps_a_stolen_interval() {
        let windows = StealWindows {
            stolen: vec![(100, 200), (500, 600)],
        };
        for (from, to, touched) in [
            (0, 50, false),
            (0, 100, false),
            (0, 101, true),
            (150, 160, true),
            (199, 300, true),
            (200, 500, false),
            (250, 550, true),
            (50, 700, true),
            (600, 800, false),
        ] {
            assert_eq!(windows.touches(from, to), touched, "[{from}, {to}]");
        }
        assert!(!StealWindows::default().touches(0, i64::MAX));
    }

    #[test]
    fn nearest_rank_picks_the_smallest_value_covering_the_share() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(nearest_rank(&v, 0.5), Some(50));
        assert_eq!(nearest_rank(&v, 0.99), Some(99));
        assert_eq!(nearest_rank(&v, 1.0), Some(100));
        assert_eq!(nearest_rank(&v, 0.0), Some(1));
        assert_eq!(nearest_rank(&[7], 0.99), Some(7));
        assert_eq!(nearest_rank::<i64>(&[], 0.5), None);
    }

    #[test]
    fn cpu_shares_come_from_the_machine_line_of_proc_stat() {
        let before =
            CpuTicks::parse("cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 50 0 25 400 5 0 0 20 0 0\n")
                .expect("parses");
        let after = CpuTicks::parse("cpu  160 0 70 900 10 0 0 60 0 0\n").expect("parses");
        // Over 200 ticks: 80 busy (user + system), 100 idle, 20 stolen.
        let share = after.share_since(before).expect("time passed");
        assert!((share.busy_pct - 40.0).abs() < 1e-9, "{share:?}");
        assert!((share.steal_pct - 10.0).abs() < 1e-9, "{share:?}");
        assert!(CpuTicks::parse("intr 1 2 3\n").is_none());
        assert!(before.share_since(before).is_none(), "no time passed");
    }
}
