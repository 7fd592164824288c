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

mod broker;
mod cpu;
mod load;
mod phase;
mod stats;

use anyhow::Context as _;
use paystream_processors::db;
use paystream_processors::settings::Settings;
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use broker::broker_floor;
use phase::run_phase;
use stats::round1;

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
    let throughput = run_phase(
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
    let latency = run_phase(
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
        let naive = run_phase(settings, pool, id, 3, args, events, None, 1).await?;
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
