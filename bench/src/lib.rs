//! `paystream bench`: load generator and measurement of the account processor end to end
//! (event produced -> debit committed -> `AccountDebited` published, and received by a
//! downstream consumer).
//!
//! Latency is measured to *published*: the broker acknowledged the `AccountDebited`
//! (`acks=all`), at the time the relay saw the acknowledgement and logged with the row. That is
//! where the processor's work ends; a downstream consumer's own fetch wait comes on top and is
//! printed beside it.
//!
//! It works in a database of its own (`paystream_bench_<id>`, created and dropped) and on
//! topics of its own, against the configured PostgreSQL and broker, with the processor and
//! relay running in this process. Its users (100,000 by default) are funded once and chosen
//! per order by `--skew`. Phases:
//! 1. throughput: `--events` orders produced as fast as possible, end to end;
//! 2. latency: orders at a steady `--rate` for `--seconds`, end to end;
//! 3. the database limit: the processor's own batch transactions fed from memory, no broker;
//! 4. the seed design at its best: one debit per transaction with row locks, from memory,
//!    over `--seed-events` orders (its rate is steady from the start).
//!
//! Each ceiling is measured in the same run as the figure it is compared with, because this
//! machine's speed varies from run to run by more than the differences that matter.

mod broker;
mod ceilings;
mod cpu;
mod load;
mod phase;
mod stats;
mod users;

use std::time::Duration;

use anyhow::Context as _;
use paystream_processors::db;
use paystream_processors::settings::Settings;
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use broker::broker_floor;
use ceilings::{Ceiling, Design};
use cpu::PgCpu;
use phase::run_phase;
use stats::round1;
pub use users::Skew;
use users::Users;

#[derive(Debug, Clone, clap::Args)]

pub struct BenchArgs {
    /// Orders in the throughput phase. Long enough (about ten seconds here) that filling and
    /// draining the pipeline, and a short burst of host CPU steal, do not decide the rate.
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// Orders in the seed-design phase (one debit per transaction, at most `--events`).
    #[arg(long, default_value_t = 20_000)]
    pub seed_events: u64,
    /// Distinct users (accounts) the orders are spread over.
    #[arg(long, default_value_t = 100_000)]
    pub users: i64,
    /// How orders pick their user: `uniform` (each user equally often), or `zipf:<s>` over the
    /// users' ranks as softwaremill/tb-perf draws accounts (`zipf:1.0`, `zipf:2.0`).
    #[arg(long, default_value = "uniform")]
    pub skew: Skew,
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
    /// Skip the two ceilings (the database limit and the seed design).
    #[arg(long)]
    pub skip_ceilings: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    /// End to end: produced -> debited -> `AccountDebited` published, under a backlog.
    pub debits_per_sec: f64,
    /// Produced -> `AccountDebited` published, in the latency phase.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Produced -> `AccountDebited` received by a downstream consumer, in the latency phase.
    pub received_p50_ms: f64,
    pub received_p99_ms: f64,
    /// The processor's batch transactions fed from memory: what the database allows.
    pub db_limit_debits_per_sec: Option<f64>,
    /// One debit per transaction with row locks, from memory: the original request's design.
    pub seed_design_debits_per_sec: Option<f64>,
    pub vs_db_limit: Option<f64>,
    pub vs_seed_design: Option<f64>,
    /// PostgreSQL's CPU time per debit in the end-to-end throughput phase, from the kernel's
    /// accounting of the server's processes (same host only).
    pub pg_cpu_us_per_debit: Option<f64>,
    /// The same in the database-limit and seed-design phases.
    pub db_limit_pg_cpu_us_per_debit: Option<f64>,
    pub seed_design_pg_cpu_us_per_debit: Option<f64>,
    pub skew: String,
    pub users: i64,
    pub events: u64,
    pub seed_events: Option<u64>,
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
    /// The same for the two ceilings.
    pub db_limit_cpu_steal_pct: Option<f64>,
    pub seed_design_cpu_steal_pct: Option<f64>,
    /// Latency-phase p99 over the orders no host steal touched (no 100 ms interval in which
    /// the machine's steal counter moved lies between their produce and publish), and how
    /// many of the orders those were. A diagnostic beside `p99_ms`, not instead of it.
    pub unstolen_p99_ms: Option<f64>,
    pub unstolen_events_pct: Option<f64>,
    /// Latency-phase p99 (produced -> published) in each 5 s of the phase: on the development
    /// broker it grows with the length of the log (docs/performance.md).
    pub p99_ms_by_5s: Vec<f64>,
    /// The broker alone at the same rate for as long (phase 0), produced -> consumed: the
    /// first of the two broker hops in `p50_ms`/`p99_ms`, which no code of ours is in.
    pub broker_p50_ms: f64,
    pub broker_p99_ms: f64,
    /// Latency phase, batch transaction start -> published: paystream's part after that hop
    /// (the transaction, the relay, the broker's acknowledgement).
    pub txn_to_published_p50_ms: f64,
    pub txn_to_published_p99_ms: f64,
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
    drop_database(&admin, &db_name).await;
    result
}

/// Drops the bench's database. `WITH (FORCE)` ends the bench's own sessions, but it may not
/// end an autovacuum worker (the server's own process; this role is no superuser), which
/// the run's dead rows often bring: the drop is refused (42501) while the worker is there,
/// so it waits for the worker to leave and asks again.
async fn drop_database(admin: &PgPool, name: &str) {
    const TRIES: u32 = 3;
    let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
    for attempt in 1..=TRIES {
        let error = match sqlx::query(&drop).execute(admin).await {
            Ok(_) => return,
            Err(error) => error,
        };
        let refused = error
            .as_database_error()
            .and_then(|e| e.code())
            .is_some_and(|code| code == "42501");
        if !refused || attempt == TRIES {
            tracing::warn!(%error, database = name, "could not drop the bench database; drop it by hand");
            return;
        }
        let others_left =
            load::wait_for(Duration::from_secs(60), "autovacuum to leave", || async {
                sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1",
                )
                .bind(name)
                .fetch_one(admin)
                .await
                .is_ok_and(|n| n == 0)
            })
            .await;
        if let Err(wait) = others_left {
            tracing::warn!(%wait, database = name, "the bench database is still in use");
        }
    }
}

async fn phases(
    settings: &Settings,
    pool: &PgPool,
    id: &str,
    args: &BenchArgs,
) -> anyhow::Result<Report> {
    db::migrate(pool).await?;
    println!(
        "bench: {} partitions, batch_max {}, {} users ({}), synchronous_commit={}",
        settings.kafka.partitions,
        settings.processor.batch_max,
        args.users,
        args.skew,
        sqlx::query_scalar::<_, String>("SHOW synchronous_commit")
            .fetch_one(pool)
            .await?
    );
    if PgCpu::now().is_none() {
        println!("  PostgreSQL's processes are not on this host: no PostgreSQL CPU figures");
    }
    let users = Users::new(1, args.users, args.skew);
    users.fund(pool, 1_000_000_000).await?;

    let broker = broker_floor(settings, id, args).await?;
    let throughput = run_phase(
        settings,
        pool,
        id,
        1,
        &users,
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
    print_cpu(
        "the throughput phase",
        throughput.cpu,
        throughput.pg_cpu_us_per_debit,
    );
    let steady_events = args.rate * args.seconds;
    let latency = run_phase(
        settings,
        pool,
        id,
        2,
        &users,
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
    // On a shared virtual machine, time stolen by the host is the usual cause of a run whose
    // tail is far above the others.
    print_cpu(
        "the latency phase",
        latency.cpu,
        latency.pg_cpu_us_per_debit,
    );
    if let (Some(p50), Some(p99), Some(pct)) = (
        latency.unstolen_percentile_ms(0.50),
        latency.unstolen_percentile_ms(0.99),
        latency.unstolen_pct(),
    ) {
        println!(
            "  orders no host steal touched (no 100 ms interval with steal between produced and published): {pct:.1} %, p50 {p50:.1} ms, p99 {p99:.1} ms"
        );
    }
    println!(
        "  p99 in each 5 s of the phase: {} ms",
        stats::joined_ms(&latency.p99_by_5s)
    );
    let (db_limit, seed) = if args.skip_ceilings {
        (None, None)
    } else {
        let db_limit = ceilings::measure(
            settings,
            pool,
            id,
            3,
            &users,
            args.events,
            Design::Processor,
        )
        .await?;
        print_ceiling(
            "database limit (the processor's batch transactions, from memory)",
            &db_limit,
            throughput.rate(),
        );
        let seed_events = args.seed_events.clamp(1, args.events);
        let seed =
            ceilings::measure(settings, pool, id, 4, &users, seed_events, Design::Seed).await?;
        print_ceiling(
            "seed design (one debit per transaction, SELECT ... FOR UPDATE, from memory)",
            &seed,
            throughput.rate(),
        );
        (Some(db_limit), Some(seed))
    };
    let rate = |c: &Option<Ceiling>| c.as_ref().map(|c| c.rate().round());
    let ratio = |c: &Option<Ceiling>| c.as_ref().map(|c| round2(throughput.rate() / c.rate()));
    Ok(Report {
        debits_per_sec: throughput.rate().round(),
        p50_ms: round1(latency.percentile_ms(0.50)),
        p99_ms: round1(latency.percentile_ms(0.99)),
        received_p50_ms: round1(latency.received_percentile_ms(0.50)),
        received_p99_ms: round1(latency.received_percentile_ms(0.99)),
        db_limit_debits_per_sec: rate(&db_limit),
        seed_design_debits_per_sec: rate(&seed),
        vs_db_limit: ratio(&db_limit),
        vs_seed_design: ratio(&seed),
        pg_cpu_us_per_debit: throughput.pg_cpu_us_per_debit.map(round1),
        db_limit_pg_cpu_us_per_debit: db_limit.and_then(|c| c.pg_cpu_us_per_debit).map(round1),
        seed_design_pg_cpu_us_per_debit: seed.and_then(|c| c.pg_cpu_us_per_debit).map(round1),
        skew: args.skew.to_string(),
        users: args.users,
        events: args.events,
        seed_events: seed.map(|c| c.debits),
        latency_rate_per_sec: args.rate,
        throughput_p99_ms: round1(throughput.percentile_ms(0.99)),
        partitions: settings.kafka.partitions,
        latency_cpu_busy_pct: latency.cpu.map(|c| round1(c.busy_pct)),
        latency_cpu_steal_pct: latency.cpu.map(|c| round1(c.steal_pct)),
        throughput_cpu_busy_pct: throughput.cpu.map(|c| round1(c.busy_pct)),
        throughput_cpu_steal_pct: throughput.cpu.map(|c| round1(c.steal_pct)),
        db_limit_cpu_steal_pct: db_limit.and_then(|c| c.cpu).map(|c| round1(c.steal_pct)),
        seed_design_cpu_steal_pct: seed.and_then(|c| c.cpu).map(|c| round1(c.steal_pct)),
        unstolen_p99_ms: latency.unstolen_percentile_ms(0.99).map(round1),
        unstolen_events_pct: latency.unstolen_pct().map(round1),
        p99_ms_by_5s: latency.p99_by_5s.iter().copied().map(round1).collect(),
        broker_p50_ms: round1(broker.p50_ms),
        broker_p99_ms: round1(broker.p99_ms),
        txn_to_published_p50_ms: round1(latency.txn_to_published_ms(0.50)),
        txn_to_published_p99_ms: round1(latency.txn_to_published_ms(0.99)),
    })
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn print_cpu(phase: &str, cpu: Option<cpu::CpuShare>, pg_us: Option<f64>) {
    if let Some(cpu) = cpu {
        print!(
            "  machine CPU during {phase}: {:.0} % busy, {:.1} % stolen by the host",
            cpu.busy_pct, cpu.steal_pct
        );
        match pg_us {
            Some(us) => println!("; PostgreSQL {us:.0} us of CPU per debit"),
            None => println!(),
        }
    }
}

fn print_ceiling(what: &str, ceiling: &Ceiling, end_to_end: f64) {
    println!(
        "{what}: {} debits in {:.2} s = {:.0} debits/s; end to end is {:.0} % of it ({:.1}x)",
        ceiling.debits,
        ceiling.elapsed.as_secs_f64(),
        ceiling.rate(),
        end_to_end * 100.0 / ceiling.rate(),
        end_to_end / ceiling.rate(),
    );
    print_cpu("it", ceiling.cpu, ceiling.pg_cpu_us_per_debit);
}
