//! One measured phase: orders produced, their debits applied and published, and what the
//! machine did meanwhile.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use paystream_processors::kafka;
use paystream_processors::settings::Settings;
use paystream_processors::startup::{self, Part};
use paystream_processors::telemetry::{self, METRICS};
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::util::Timeout;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::cpu::{CpuShare, CpuTicks, PgCpu, StealWindows};
use crate::load::{results_consumer, wait_for, Orders, Received, Sent, Timeline, Work};
use crate::stats::{flight_times, p99_by_window, percentile_ms, FIVE_SECONDS_US};
use crate::users::Users;

pub(crate) struct Phase {
    pub(crate) events: u64,
    pub(crate) elapsed: Duration,
    /// Produced -> `AccountDebited` published, per order, in ascending order.
    pub(crate) latencies: Vec<Duration>,
    /// Produced -> `AccountDebited` received by the bench's consumer, in ascending order.
    pub(crate) received: Vec<Duration>,
    pub(crate) cpu: Option<CpuShare>,
    /// PostgreSQL's CPU per debit over the phase (see `PgCpu`).
    pub(crate) pg_cpu_us_per_debit: Option<f64>,
    /// Produced -> published for the orders that no host steal touched (see `StealWindows`),
    /// in ascending order; `None` where steal cannot be read.
    pub(crate) unstolen: Option<Vec<Duration>>,
    /// Produced -> published p99 (ms) in each 5 s of the phase, in order.
    pub(crate) p99_by_5s: Vec<f64>,
    /// Batch transaction start -> published, per order, in ascending order: the part after
    /// the first broker hop.
    pub(crate) txn_to_published: Vec<Duration>,
}

impl Phase {
    pub(crate) fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    pub(crate) fn txn_to_published_ms(&self, p: f64) -> f64 {
        percentile_ms(&self.txn_to_published, p)
    }

    pub(crate) fn percentile_ms(&self, p: f64) -> f64 {
        percentile_ms(&self.latencies, p)
    }

    pub(crate) fn received_percentile_ms(&self, p: f64) -> f64 {
        percentile_ms(&self.received, p)
    }

    pub(crate) fn unstolen_percentile_ms(&self, p: f64) -> Option<f64> {
        Some(percentile_ms(self.unstolen.as_ref()?, p))
    }

    /// The share of the measured orders that no host steal touched.
    pub(crate) fn unstolen_pct(&self) -> Option<f64> {
        let clean = self.unstolen.as_ref()?.len();
        Some(clean as f64 * 100.0 / self.latencies.len().max(1) as f64)
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_phase(
    base: &Settings,
    pool: &PgPool,
    id: &str,
    number: i64,
    users: &Users,
    events: u64,
    rate: Option<u64>,
    batch_max: usize,
) -> anyhow::Result<Phase> {
    let (mut settings, name) = phase_settings(base, id, number);
    settings.processor.batch_max = batch_max;
    kafka::create_topics(&settings).await?;

    // Results: AccountDebited as received from the topic.
    let received: Arc<Mutex<HashMap<i64, Received>>> = Arc::default();
    let results = results_consumer(&settings, received.clone())?;

    // The processor and the relay as `paystream up` runs them, without HTTP.
    let pipeline = startup::start(
        &[Part::AccountProcessor, Part::Relay],
        &settings,
        pool,
        None,
    )?;
    wait_claimed(pool, &name, settings.kafka.partitions).await?;

    let producer: FutureProducer =
        kafka::producer_config(&settings.kafka, Duration::from_secs(60)).create()?;
    let orders = Orders {
        producer: &producer,
        topic: &settings.topics.order_events,
        first_order: number * 100_000_000,
        users,
    };
    // The latency phase measures the steady state: a second of orders at the rate first, not
    // measured, so that connection set-up and first fetches are not counted as latency.
    let warmup = rate.unwrap_or(0);
    orders.record(pool, 0..events + warmup).await?;
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
    let pg_before = PgCpu::now();
    let stop_sampling = CancellationToken::new();
    let steal_sampler = tokio::spawn(StealWindows::sample(stop_sampling.clone()));
    let started = Instant::now();
    orders.produce(0..events, rate, &mut sent).await?;
    producer.flush(Timeout::After(Duration::from_secs(10)))?;
    let Sent {
        at: sent,
        wall_us: sent_wall_us,
    } = sent;

    wait_published(pool, &settings, &received, events + warmup).await?;
    let delay_after = telemetry::bucket_counts(&METRICS.consume_delay, &["account"]);
    let batches = Work::now().since(batches_before);
    let cpu = cpu_before
        .zip(CpuTicks::now())
        .and_then(|(before, after)| after.share_since(before));
    let pg_cpu_us_per_debit = pg_before
        .zip(PgCpu::now())
        .and_then(|(before, after)| after.us_per(before, events));
    stop_sampling.cancel();
    let steal_windows = steal_sampler.await?;
    results.abort();
    pipeline.stop(Duration::from_secs(30)).await?;

    let timeline = Timeline::read(pool, &settings.topics.account_events).await?;
    let txn_to_published = print_breakdown(
        number,
        &timeline,
        &sent_wall_us,
        &delay_before,
        &delay_after,
    );
    batches.print(number, started.elapsed().as_secs_f64());
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
    let p99_by_5s = p99_by_window(&flights, FIVE_SECONDS_US);
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
        pg_cpu_us_per_debit,
        unstolen,
        p99_by_5s,
        txn_to_published,
    })
}

/// Phase `number`'s settings: topics and a consumer group of its own, named `bench-<id>-<n>`
/// (returned beside them).
pub(crate) fn phase_settings(base: &Settings, id: &str, number: i64) -> (Settings, String) {
    let mut settings = base.clone();
    let name = format!("bench-{id}-{number}");
    settings.topics.order_events = format!("{name}.order.events");
    settings.topics.account_events = format!("{name}.account.events");
    settings.topics.dead_letter = format!("{name}.deadletter.events");
    settings.processor.account_group = name.clone();
    (settings, name)
}

/// Waits until the processor of `group` claimed all its partitions.
async fn wait_claimed(pool: &PgPool, group: &str, partitions: i32) -> anyhow::Result<()> {
    wait_for(
        Duration::from_secs(120),
        "the processor to claim its partitions",
        || async {
            let claimed: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM consumer_offsets WHERE consumer_group = $1",
            )
            .bind(group)
            .fetch_one(pool)
            .await
            .unwrap_or(0);
            claimed >= i64::from(partitions)
        },
    )
    .await
}

/// Waits until `count` AccountDebited were received downstream and marked published.
async fn wait_published(
    pool: &PgPool,
    settings: &Settings,
    received: &Mutex<HashMap<i64, Received>>,
    count: u64,
) -> anyhow::Result<()> {
    let deadline = Duration::from_secs(600 + count / 100);
    wait_for(deadline, "every AccountDebited to be published", || async {
        received
            .lock()
            .map(|r| r.len() as u64 >= count)
            .unwrap_or(false)
    })
    .await?;
    // Received can come before the relay's mark commits: wait until nothing of the topic is
    // left in the outbox.
    wait_for(
        deadline,
        "every AccountDebited to be marked published",
        || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox WHERE topic = $1")
                .bind(&settings.topics.account_events)
                .fetch_one(pool)
                .await
                .is_ok_and(|n| n == 0)
        },
    )
    .await
}

/// Where the time goes: from the batch transaction's start to the broker's acknowledgement, for the
/// measured orders (the warm-up's first batches wait for connections to open), and from
/// creation to the processor's poll. Returns the first (transaction start -> published), sorted.
fn print_breakdown(
    number: i64,
    timeline: &Timeline,
    sent_wall_us: &HashMap<i64, i64>,
    delay_before: &[(f64, u64)],
    delay_after: &[(f64, u64)],
) -> Vec<Duration> {
    let to_published = flight_times(
        timeline
            .rows
            .iter()
            .filter(|(order, _)| sent_wall_us.contains_key(order))
            .map(|(_, started_published)| started_published),
    );
    println!(
        "  phase {number}: transaction start -> published: p50 {:.1} ms, p99 {:.1} ms",
        percentile_ms(&to_published, 0.5),
        percentile_ms(&to_published, 0.99)
    );
    let delay_ms = |q| {
        telemetry::bucket_quantile(delay_before, delay_after, q).map_or(f64::NAN, |s| s * 1000.0)
    };
    println!(
        "  phase {number}: message created -> polled by the processor: p50 <= {} ms, p99 <= {} ms (histogram bucket bounds)",
        delay_ms(0.5),
        delay_ms(0.99)
    );
    to_published
}
