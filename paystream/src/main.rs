//! The `paystream` command. It only wires: configuration, logging, signals, and the
//! long-running parts from `paystream-processors`.

mod bench;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use paystream_processors::account_processor;
use paystream_processors::outbox::relay;
use paystream_processors::settings::Settings;
use paystream_processors::db::{self, Pool};
use paystream_processors::{kafka, telemetry};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Parser)]
#[command(name = "paystream", version, about = "Exactly-once funds and orders on PostgreSQL and Kafka")]
struct Cli {
    /// Extra TOML configuration file, layered over the built-in defaults
    /// (PAYSTREAM__* environment variables override both).
    #[arg(long, global = true, env = "PAYSTREAM_CONFIG")]
    config: Option<PathBuf>,

    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true)]
    json_logs: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply database migrations (idempotent).
    Migrate,
    /// Manage Kafka topics.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// Run a stream processor as a consumer-group worker.
    Process {
        #[command(subcommand)]
        processor: ProcessorKind,
    },
    /// Publish the transactional outbox to Kafka.
    Relay,
    /// Everything in one process for a laptop: migrations, topics, processors, relay.
    Up,
    /// Load generator and measurement: throughput, latency, and one-per-transaction baseline.
    /// Works in a throwaway database and topics; the last line printed is JSON.
    Bench(bench::BenchArgs),
}

#[derive(Subcommand)]
enum TopicsCommand {
    /// Create order.events, account.events and deadletter.events (existing ones are kept).
    Create,
}

#[derive(Subcommand)]
enum ProcessorKind {
    /// Consume order.events: debits, refunds, dead letters.
    Account,
}

/// How long running parts get to finish their in-flight work after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut settings = Settings::load(cli.config.as_deref()).context("Failed to load configuration")?;
    if cli.json_logs {
        settings.log.format = paystream_processors::settings::LogFormat::Json;
    }
    telemetry::init_logging(&settings.log);
    let result = run(cli.command, settings).await;
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "paystream failed");
    }
    result
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<()> {
    let pool = db::connect(&settings.database).context("Invalid database configuration")?;
    match command {
        Command::Migrate => migrate(&pool).await,
        Command::Topics { command: TopicsCommand::Create } => {
            kafka::create_topics(&settings.kafka, &settings.topics).await
        }
        Command::Process { processor: ProcessorKind::Account } => {
            serve(|tracker, cancel| spawn_account_processor(tracker, cancel, &settings, &pool)).await
        }
        Command::Relay => serve(|tracker, cancel| spawn_relay(tracker, cancel, &settings, &pool)).await,
        Command::Bench(args) => {
            let report = bench::run(settings, args).await?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Command::Up => {
            migrate(&pool).await?;
            kafka::create_topics(&settings.kafka, &settings.topics).await?;
            serve(|tracker, cancel| {
                spawn_account_processor(tracker, cancel.clone(), &settings, &pool);
                spawn_relay(tracker, cancel, &settings, &pool);
                println!("paystream is up: account processor and relay are running (ctrl-c to stop)");
            })
            .await
        }
    }
}

async fn migrate(pool: &Pool) -> anyhow::Result<()> {
    db::migrate(pool).await.context("Failed to apply migrations")?;
    tracing::info!("migrations applied");
    Ok(())
}

fn spawn_account_processor(
    tracker: &TaskTracker,
    cancel: CancellationToken,
    settings: &Settings,
    pool: &Pool,
) {
    let (settings, pool) = (settings.clone(), pool.clone());
    tracker.spawn(async move {
        let result = account_processor::run(settings, pool, cancel.clone()).await;
        fatal_if_err("account processor", result, &cancel);
    });
}

fn spawn_relay(tracker: &TaskTracker, cancel: CancellationToken, settings: &Settings, pool: &Pool) {
    let (settings, pool) = (settings.clone(), pool.clone());
    tracker.spawn(async move {
        let result = relay::run(settings, pool, cancel.clone()).await;
        fatal_if_err("relay", result, &cancel);
    });
}

static FAILED: AtomicBool = AtomicBool::new(false);

/// A part that stops with an error takes the process down with it (cleanly): a half-running
/// worker is worse than a restarted one.
fn fatal_if_err(part: &str, result: anyhow::Result<()>, cancel: &CancellationToken) {
    if let Err(e) = result {
        tracing::error!(part, error = format!("{e:#}"), "fatal error; shutting down");
        FAILED.store(true, Ordering::SeqCst);
        cancel.cancel();
    }
}

/// Starts the parts, then waits for SIGTERM / ctrl-c (or a part failing), cancels, and waits
/// for in-flight work up to the grace period.
async fn serve(start: impl FnOnce(&TaskTracker, CancellationToken)) -> anyhow::Result<()> {
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    start(&tracker, cancel.clone());
    tracker.close();
    tokio::select! {
        _ = shutdown_signal() => tracing::info!("shutdown signal received"),
        _ = cancel.cancelled() => {}
    }
    cancel.cancel();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait()).await.is_err() {
        tracing::warn!("parts did not stop within the grace period; exiting anyway");
    }
    if FAILED.load(Ordering::SeqCst) {
        anyhow::bail!("a part of paystream failed; see the log above");
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
