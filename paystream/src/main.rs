//! The `paystream` command. It only wires: configuration, logging, signals, and the
//! long-running parts from `paystream-processors`.

mod commands;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use commands::dlq::DlqCommand;
use paystream_processors::db::{self, Pool};
use paystream_processors::settings::Settings;
use paystream_processors::{api, kafka, startup, telemetry};

#[derive(Parser)]
#[command(
    name = "paystream",
    version,
    about = "Exactly-once funds and orders on PostgreSQL and Kafka"
)]
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
    /// Serve the HTTP API (accounts, deposits, orders), with /metrics, /healthz and /readyz.
    Api,
    /// Everything in one process for a laptop: migrations, topics, the API, both processors,
    /// the relay and the payment timeout sweeper. Prints the URLs and a curl session.
    Up,
    /// Mint a bearer token for development, signed with the configured api.jwt_secret.
    Token(TokenArgs),
    /// Inspect and replay dead letters (deadletter.events).
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Outbox rows the broker refused for good (parked): list, retry, discard.
    Outbox {
        #[command(subcommand)]
        command: commands::outbox::OutboxCommand,
    },
    /// Reconcile: check the invariants of SPEC §6 (ledger, conservation, order states, stuck
    /// orders, stuck outbox). Exit code 0 when all hold, 2 when any is violated.
    Audit {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Load generator and measurement: throughput, latency, and one-per-transaction baseline.
    /// Works in a throwaway database and topics; the last line printed is JSON.
    Bench(paystream_bench::BenchArgs),
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
    /// Consume account.events: move orders to PAID, CANCELLED or REFUNDED, compensate late
    /// debits; also runs the payment timeout sweeper (safe on every worker).
    Order,
}

#[derive(clap::Args)]
struct TokenArgs {
    /// The user id the token speaks for.
    #[arg(long)]
    user: i64,
    /// Allow operator calls (deposits).
    #[arg(long)]
    admin: bool,
    /// How long the token is valid.
    #[arg(long, default_value_t = 24)]
    ttl_hours: u64,
}

/// How long running parts get to finish their in-flight work after a shutdown signal.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let mut settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("paystream: Failed to load configuration: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if cli.json_logs {
        settings.log.format = paystream_processors::settings::LogFormat::Json;
    }
    telemetry::init_logging(&settings.log);
    // The error is said once, as its chain of causes: never a backtrace for an operator.
    match run(cli.command, settings).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            match hint(&e) {
                Some(hint) => tracing::error!(error = format!("{e:#}"), hint, "paystream failed"),
                None => tracing::error!(error = format!("{e:#}"), "paystream failed"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// What to do about an error an operator can fix with a command: a database that was never
/// migrated, an unreachable database or broker, a missing topic.
fn hint(error: &anyhow::Error) -> Option<&'static str> {
    for cause in error.chain() {
        if let Some(e) = cause.downcast_ref::<sqlx::Error>() {
            return match e {
                sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01") => {
                    Some("the database is not migrated: run `paystream migrate`")
                }
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => Some(
                    "PostgreSQL is not reachable at database.url (PAYSTREAM__DATABASE__URL); scripts/pg.sh up starts a local one",
                ),
                _ => None,
            };
        }
        if let Some(e) = cause.downcast_ref::<rdkafka::error::KafkaError>() {
            use rdkafka::types::RDKafkaErrorCode as Code;
            return match e.rdkafka_error_code() {
                Some(Code::UnknownTopic | Code::UnknownTopicOrPartition) => {
                    Some("a topic is missing: run `paystream topics create`")
                }
                Some(Code::BrokerTransportFailure | Code::AllBrokersDown) => Some(
                    "the broker is not reachable at kafka.brokers (PAYSTREAM__KAFKA__BROKERS); scripts/broker.sh up starts a local one",
                ),
                _ => None,
            };
        }
    }
    None
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<()> {
    let pool = db::connect(&settings.database).context("Invalid database configuration")?;
    match command {
        Command::Migrate => migrate(&pool).await,
        Command::Topics {
            command: TopicsCommand::Create,
        } => kafka::create_topics(&settings).await,
        Command::Process {
            processor: ProcessorKind::Account,
        } => {
            serve(
                startup::ACCOUNT_WORKER,
                &settings,
                &pool,
                &settings.metrics.listen,
            )
            .await
        }
        Command::Process {
            processor: ProcessorKind::Order,
        } => {
            serve(
                startup::ORDER_WORKER,
                &settings,
                &pool,
                &settings.metrics.listen,
            )
            .await
        }
        Command::Relay => serve(startup::RELAY, &settings, &pool, &settings.metrics.listen).await,
        Command::Api => serve(startup::API, &settings, &pool, &settings.api.listen).await,
        Command::Audit { json } => commands::audit::run(&settings, &pool, json).await,
        Command::Dlq { command } => commands::dlq::run(&settings, &pool, command).await,
        Command::Outbox { command } => commands::outbox::run(&pool, command).await,
        Command::Token(args) => token(&settings, &args),
        Command::Bench(args) => {
            let report = paystream_bench::run(settings, args).await?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Command::Up => commands::up::run(&settings, &pool).await,
    }
}

fn token(settings: &Settings, args: &TokenArgs) -> anyhow::Result<()> {
    if args.user < 1 {
        anyhow::bail!("--user must be a positive user id");
    }
    let ttl = Duration::from_secs(args.ttl_hours.saturating_mul(3600));
    let token = api::auth::mint(&settings.api.jwt_secret, args.user, args.admin, ttl)?;
    println!("{token}");
    Ok(())
}

pub(crate) async fn migrate(pool: &Pool) -> anyhow::Result<()> {
    db::migrate(pool)
        .await
        .context("Failed to apply migrations")?;
    tracing::info!("migrations applied");
    Ok(())
}

/// Runs `parts` with their HTTP endpoints on `listen` until SIGTERM / ctrl-c (or a part
/// failing), then cancels them and waits for in-flight work up to the grace period.
async fn serve(
    parts: &[startup::Part],
    settings: &Settings,
    pool: &Pool,
    listen: &str,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("Failed to listen on {listen}"))?;
    let running = startup::start(parts, settings, pool, Some(listener))?;
    running.run_until(shutdown_signal(), SHUTDOWN_GRACE).await
}

pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
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
