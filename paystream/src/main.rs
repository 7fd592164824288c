//! The `paystream` command. It only wires: configuration, logging, signals, and the
//! long-running parts from `paystream-processors`.

mod bench;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use paystream_processors::accounts::processor as account_processor;
use paystream_processors::api;
use paystream_processors::db::{self, Pool};
use paystream_processors::dlq::tool as dlq_tool;
use paystream_processors::ops::OpsState;
use paystream_processors::orders::{processor as order_processor, sweeper};
use paystream_processors::outbox::relay;
use paystream_processors::settings::Settings;
use paystream_processors::{kafka, telemetry};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
    /// Reconcile: check the invariants of SPEC §6 (ledger, conservation, order states, stuck
    /// orders, stuck outbox). Exit code 0 when all hold, 2 when any is violated.
    Audit {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
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
    /// Consume account.events: move orders to PAID, CANCELLED or REFUNDED, compensate late
    /// debits; also runs the payment timeout sweeper (safe on every worker).
    Order,
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters, grouped by original topic and error class.
    List {
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// One JSON object per dead letter instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter: every header, the key and the original payload.
    Show {
        /// partition:offset on the dead-letter topic, as `list` prints it.
        id: String,
    },
    /// Re-publish selected dead letters to their original topic, with their original key,
    /// headers and eventId (dedupe keeps a second replay harmless). Parked ones are skipped.
    Replay {
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// Replay every dead letter (required when no filter is given).
        #[arg(long)]
        all: bool,
        /// Say what would be replayed; publish and record nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also replay dead letters that were replayed before (see dlq_replays).
        #[arg(long)]
        force: bool,
        /// Messages per second (default: dlq.replay_rate_per_s).
        #[arg(long)]
        rate: Option<f64>,
        /// Who replays, for the record in dlq_replays (default: $USER).
        #[arg(long, env = "USER", default_value = "unknown")]
        operator: String,
    },
}

#[derive(clap::Args)]
struct DlqFilterArgs {
    /// A dead letter by partition:offset (repeatable).
    #[arg(long = "id")]
    ids: Vec<String>,
    /// Topic the message was consumed from.
    #[arg(long)]
    original_topic: Option<String>,
    /// Error class, e.g. NOT_JSON, SCHEMA_VIOLATION, INVALID_AMOUNT.
    #[arg(long)]
    error_class: Option<String>,
    /// eventType of the payload, e.g. OrderCreated.
    #[arg(long)]
    event_type: Option<String>,
    /// Consumer group that dead-lettered it.
    #[arg(long)]
    group: Option<String>,
    /// Dead-lettered at or after this time (RFC 3339).
    #[arg(long)]
    since: Option<chrono::DateTime<chrono::Utc>>,
    /// Dead-lettered before this time (RFC 3339).
    #[arg(long)]
    until: Option<chrono::DateTime<chrono::Utc>>,
}

impl DlqFilterArgs {
    fn to_filter(&self) -> anyhow::Result<dlq_tool::Filter> {
        let ids = self
            .ids
            .iter()
            .map(|id| {
                dlq_tool::parse_id(id)
                    .with_context(|| format!("--id {id:?} is not partition:offset"))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(dlq_tool::Filter {
            ids,
            original_topic: self.original_topic.clone(),
            error_class: self.error_class.clone(),
            event_type: self.event_type.clone(),
            consumer_group: self.group.clone(),
            since: self.since,
            until: self.until,
        })
    }
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
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut settings =
        Settings::load(cli.config.as_deref()).context("Failed to load configuration")?;
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
        Command::Topics {
            command: TopicsCommand::Create,
        } => kafka::create_topics(&settings.kafka, &settings.topics).await,
        Command::Process {
            processor: ProcessorKind::Account,
        } => {
            let ops = OpsState::new(&settings, pool.clone(), vec!["account"])?;
            serve(|tracker, cancel| {
                spawn_ops(tracker, cancel.clone(), &settings, ops);
                spawn_account_processor(tracker, cancel, &settings, &pool);
            })
            .await
        }
        Command::Process {
            processor: ProcessorKind::Order,
        } => {
            let ops = OpsState::new(&settings, pool.clone(), vec!["order"])?;
            serve(|tracker, cancel| {
                spawn_ops(tracker, cancel.clone(), &settings, ops);
                spawn_order_processor(tracker, cancel, &settings, &pool);
            })
            .await
        }
        Command::Relay => {
            let ops = OpsState::new(&settings, pool.clone(), Vec::new())?;
            serve(|tracker, cancel| {
                spawn_ops(tracker, cancel.clone(), &settings, ops);
                spawn_relay(tracker, cancel, &settings, &pool);
            })
            .await
        }
        Command::Api => {
            serve(|tracker, cancel| spawn_part(tracker, cancel, &settings, &pool, "api", api::run))
                .await
        }
        Command::Audit { json } => audit(&settings, &pool, json).await,
        Command::Dlq { command } => dlq(&settings, &pool, command).await,
        Command::Token(args) => {
            if args.user < 1 {
                anyhow::bail!("--user must be a positive user id");
            }
            let ttl = Duration::from_secs(args.ttl_hours.saturating_mul(3600));
            println!(
                "{}",
                api::auth::mint(&settings.api.jwt_secret, args.user, args.admin, ttl)?
            );
            Ok(())
        }
        Command::Bench(args) => {
            let report = bench::run(settings, args).await?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Command::Up => {
            migrate(&pool).await?;
            kafka::create_topics(&settings.kafka, &settings.topics).await?;
            let listener = tokio::net::TcpListener::bind(&settings.api.listen)
                .await
                .with_context(|| format!("Failed to listen on {}", settings.api.listen))?;
            let ops = OpsState::new(&settings, pool.clone(), vec!["account", "order"])?;
            // The printed session opens an account, so it is for a user who has none yet: it
            // can be pasted again after every start, on the same database.
            let demo_user: i64 = sqlx::query_scalar(
                "SELECT GREATEST(COALESCE(max(user_id), 1000), 1000) + 1 FROM accounts WHERE kind = 'USER'",
            )
            .fetch_one(&pool)
            .await?;
            serve(|tracker, cancel| {
                let state = api::AppState::new(settings.clone(), pool.clone(), ops);
                let api_cancel = cancel.clone();
                tracker.spawn(async move {
                    let result = api::serve(listener, state, api_cancel.clone()).await;
                    fatal_if_err("api", result, &api_cancel);
                });
                spawn_account_processor(tracker, cancel.clone(), &settings, &pool);
                spawn_order_processor(tracker, cancel.clone(), &settings, &pool);
                spawn_relay(tracker, cancel, &settings, &pool);
                print_welcome(&settings, demo_user);
            })
            .await
        }
    }
}

async fn read_dead_letters(
    settings: &Settings,
    filter: &dlq_tool::Filter,
) -> anyhow::Result<Vec<dlq_tool::DeadLetter>> {
    let reader_settings = settings.clone();
    let all = tokio::task::spawn_blocking(move || dlq_tool::read_all(&reader_settings))
        .await
        .context("The dead-letter reader stopped")?
        .context("Failed to read the dead-letter topic")?;
    Ok(all.into_iter().filter(|dl| filter.matches(dl)).collect())
}

async fn dlq(settings: &Settings, pool: &Pool, command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::List { filter, json } => {
            let letters = read_dead_letters(settings, &filter.to_filter()?).await?;
            if json {
                for dl in &letters {
                    println!("{}", dl.summary());
                }
                return Ok(());
            }
            println!(
                "{} dead letter(s) on {}",
                letters.len(),
                settings.topics.dead_letter
            );
            let mut groups: std::collections::BTreeMap<(String, String), usize> =
                Default::default();
            for dl in &letters {
                let key = (
                    dl.original_topic().unwrap_or_default(),
                    dl.error_class().unwrap_or_default(),
                );
                *groups.entry(key).or_default() += 1;
            }
            for ((topic, class), n) in &groups {
                println!("  {topic:<24} {class:<28} {n}");
            }
            if !letters.is_empty() {
                println!(
                    "\n{:<10} {:<26} {:<24} {:<28} {:<20} ATTEMPTS",
                    "ID", "DEAD-LETTERED AT", "ORIGINAL TOPIC", "ERROR CLASS", "EVENT TYPE"
                );
            }
            for dl in &letters {
                println!(
                    "{:<10} {:<26} {:<24} {:<28} {:<20} {}{}",
                    dl.id(),
                    dl.timestamp
                        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                        .unwrap_or_default(),
                    dl.original_topic().unwrap_or_default(),
                    dl.error_class().unwrap_or_default(),
                    dl.event_type().unwrap_or_else(|| "-".into()),
                    dl.attempts(),
                    if dl.parked() { " (parked)" } else { "" },
                );
            }
            Ok(())
        }
        DlqCommand::Show { id } => {
            let (partition, offset) = dlq_tool::parse_id(&id)
                .with_context(|| format!("{id:?} is not partition:offset"))?;
            let filter = dlq_tool::Filter {
                ids: vec![(partition, offset)],
                ..Default::default()
            };
            let letters = read_dead_letters(settings, &filter).await?;
            let dl = letters.first().with_context(|| {
                format!("no dead letter {id} on {}", settings.topics.dead_letter)
            })?;
            println!("{}", serde_json::to_string_pretty(&dl.detail())?);
            Ok(())
        }
        DlqCommand::Replay {
            filter,
            all,
            dry_run,
            force,
            rate,
            operator,
        } => {
            let filter = filter.to_filter()?;
            if filter.is_empty() && !all {
                anyhow::bail!(
                    "say which dead letters to replay (--id, --error-class, ...) or pass --all"
                );
            }
            let letters = read_dead_letters(settings, &filter).await?;
            let options = dlq_tool::ReplayOptions {
                dry_run,
                force,
                rate: rate.unwrap_or(settings.dlq.replay_rate_per_s),
                operator,
            };
            let report = dlq_tool::replay(settings, pool, &letters, &options, |done, total| {
                eprint!("\rreplaying {done}/{total}");
                if done == total {
                    eprintln!();
                }
            })
            .await?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
    }
}

async fn audit(settings: &Settings, pool: &Pool, json: bool) -> anyhow::Result<()> {
    let limits = paystream_processors::audit::Limits::running(settings);
    let mut violations = paystream_processors::audit::check(pool, &limits)
        .await
        .context("Failed to run the audit")?;
    violations.extend(
        paystream_processors::audit::check_offsets(pool, settings)
            .await
            .context("Failed to check stored offsets against the broker")?,
    );
    let checks = paystream_processors::audit::CHECK_COUNT + 1;
    if json {
        let report = serde_json::json!({
            "ok": violations.is_empty(),
            "checks": checks,
            "checkedAt": chrono::Utc::now(),
            "violations": violations,
        });
        println!("{report}");
    } else if violations.is_empty() {
        println!("audit: all {checks} checks hold");
    } else {
        println!(
            "audit: {} violation(s) across {checks} checks",
            violations.len()
        );
        for v in &violations {
            println!("  [{}] {}", v.invariant, v.detail);
        }
    }
    if !violations.is_empty() {
        std::process::exit(2);
    }
    Ok(())
}

async fn migrate(pool: &Pool) -> anyhow::Result<()> {
    db::migrate(pool)
        .await
        .context("Failed to apply migrations")?;
    tracing::info!("migrations applied");
    Ok(())
}

fn spawn_account_processor(
    tracker: &TaskTracker,
    cancel: CancellationToken,
    settings: &Settings,
    pool: &Pool,
) {
    spawn_part(
        tracker,
        cancel,
        settings,
        pool,
        "account processor",
        account_processor::run,
    );
}

/// Serves /metrics, /healthz and /readyz of a worker on `metrics.listen`.
fn spawn_ops(tracker: &TaskTracker, cancel: CancellationToken, settings: &Settings, ops: OpsState) {
    let listen = settings.metrics.listen.clone();
    tracker.spawn(async move {
        let result = paystream_processors::ops::serve(&listen, ops, cancel.clone()).await;
        fatal_if_err("metrics endpoint", result, &cancel);
    });
}

fn spawn_order_processor(
    tracker: &TaskTracker,
    cancel: CancellationToken,
    settings: &Settings,
    pool: &Pool,
) {
    spawn_part(
        tracker,
        cancel.clone(),
        settings,
        pool,
        "order processor",
        order_processor::run,
    );
    spawn_part(
        tracker,
        cancel,
        settings,
        pool,
        "payment timeout sweeper",
        sweeper::run,
    );
}

/// Spawns a long-running part `run(settings, pool, cancel)`; its failure stops the process.
fn spawn_part<F, Fut>(
    tracker: &TaskTracker,
    cancel: CancellationToken,
    settings: &Settings,
    pool: &Pool,
    part: &'static str,
    run: F,
) where
    F: FnOnce(Settings, Pool, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let future = run(settings.clone(), pool.clone(), cancel.clone());
    tracker.spawn(async move {
        let result = future.await;
        fatal_if_err(part, result, &cancel);
    });
}

/// What `paystream up` prints once everything runs: where to look, and a session to paste.
fn print_welcome(settings: &Settings, user_id: i64) {
    let url = settings.api.public_url.trim_end_matches('/');
    let day = Duration::from_secs(24 * 3600);
    let (user, admin) = match (
        api::auth::mint(&settings.api.jwt_secret, user_id, false, day),
        api::auth::mint(&settings.api.jwt_secret, 1, true, day),
    ) {
        (Ok(user), Ok(admin)) => (user, admin),
        _ => return,
    };
    println!(
        r#"paystream is up (ctrl-c to stop)
  API:     {url}/v1   (OpenAPI: {url}/openapi.json)
  Metrics: {url}/metrics   Health: {url}/healthz   Ready: {url}/readyz

Try it — user {user_id} opens an account, an admin deposits, user {user_id} orders and cancels:

export API={url} TOKEN={user} ADMIN={admin}
ACCOUNT=$(curl -s -X POST $API/v1/accounts -H "Authorization: Bearer $TOKEN" -H "Idempotency-Key: acct-{user_id}" -d '{{"currency":"CNY"}}' | grep -o '"id":[0-9]*' | cut -d: -f2); echo "account $ACCOUNT"
curl -s -X POST $API/v1/accounts/$ACCOUNT/deposits -H "Authorization: Bearer $ADMIN" -H "Idempotency-Key: dep-{user_id}" -d '{{"amountFen":10000}}'; echo
ORDER=$(curl -s -X POST $API/v1/orders -H "Authorization: Bearer $TOKEN" -H "Idempotency-Key: order-{user_id}" -d '{{"amountFen":2500,"currency":"CNY","items":[{{"sku":"tea","qty":1,"priceFen":2500}}]}}' | grep -o '"id":[0-9]*' | cut -d: -f2); echo "order $ORDER"
for i in $(seq 50); do curl -s $API/v1/orders/$ORDER -H "Authorization: Bearer $TOKEN" | grep -q '"status":"PAID"' && break; sleep 0.1; done
curl -s $API/v1/orders/$ORDER -H "Authorization: Bearer $TOKEN"; echo
curl -s -X POST $API/v1/orders/$ORDER/cancel -H "Authorization: Bearer $TOKEN" -H "Idempotency-Key: cancel-{user_id}"; echo
for i in $(seq 50); do curl -s $API/v1/orders/$ORDER -H "Authorization: Bearer $TOKEN" | grep -q '"status":"REFUNDED"' && break; sleep 0.1; done
curl -s $API/v1/orders/$ORDER -H "Authorization: Bearer $TOKEN"; echo
curl -s "$API/v1/accounts/$ACCOUNT/entries" -H "Authorization: Bearer $TOKEN"; echo"#
    );
}

/// The relay, and the periodic audit next to it (one or two relays run per deployment).
fn spawn_relay(tracker: &TaskTracker, cancel: CancellationToken, settings: &Settings, pool: &Pool) {
    spawn_part(
        tracker,
        cancel.clone(),
        settings,
        pool,
        "periodic audit",
        paystream_processors::audit::run_periodically,
    );
    spawn_part(tracker, cancel, settings, pool, "relay", relay::run);
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
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
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
