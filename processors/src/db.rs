//! PostgreSQL: the pool, migrations, and the one place that decides whether a database
//! error is worth retrying.

use std::time::Duration;

use prometheus::IntCounter;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPoolOptions};
use sqlx::{
    Arguments, ConnectOptions, Connection as _, Encode, PgPool, Postgres, Transaction, Type,
};
use tokio_util::sync::CancellationToken;

use crate::settings::DatabaseSettings;

pub type Pool = PgPool;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

pub fn connect(settings: &DatabaseSettings) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = settings.url.parse()?;
    let options = options
        .application_name("paystream")
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1))
        .options(session_limits(settings));
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_millis(settings.connect_timeout_ms))
        .connect_lazy_with(options))
}

/// The session settings that bound every wait of a connection (see `DatabaseSettings`), sent
/// with the connection's start-up so that no statement runs without them. Zero leaves the
/// server's own setting.
fn session_limits(settings: &DatabaseSettings) -> Vec<(&'static str, String)> {
    let keepalive = settings.tcp_keepalive_idle_s;
    [
        ("statement_timeout", settings.statement_timeout_ms),
        ("lock_timeout", settings.lock_timeout_ms),
        (
            "idle_in_transaction_session_timeout",
            settings.idle_in_transaction_timeout_ms,
        ),
        ("tcp_keepalives_idle", keepalive),
        (
            "tcp_keepalives_interval",
            settings.tcp_keepalive_interval_s * u64::from(keepalive > 0),
        ),
        (
            "tcp_keepalives_count",
            settings.tcp_keepalive_count * u64::from(keepalive > 0),
        ),
    ]
    .into_iter()
    .filter(|(_, value)| *value > 0)
    .map(|(name, value)| (name, value.to_string()))
    .collect()
}

/// The advisory lock one `migrate` holds at a time (advisory locks are per database).
const MIGRATE_LOCK: i64 = 0x7061_7973_6d69_6772; // "paysmigr"

/// Applies every pending migration. Safe to run concurrently and repeatedly: one migrator at
/// a time holds `MIGRATE_LOCK`, and the others skip what it applied.
///
/// The others wait *between* statements (`pg_try_advisory_lock`, retried), never inside one:
/// migration 0006 builds an index CONCURRENTLY, which waits for every open snapshot, and a
/// migrator blocked in `pg_advisory_lock` holds one, so the two would deadlock and PostgreSQL
/// would abort one of them (sqlx's own lock, taken next, is then uncontended).
///
/// A migration may legitimately run long (an index build) and wait for other transactions:
/// it runs on a connection of its own without the statement and lock timeouts, which is then
/// closed rather than returned to the pool with those limits lifted.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    let mut conn = pool.acquire().await?.detach();
    sqlx::query("SELECT set_config('statement_timeout', '0', false), set_config('lock_timeout', '0', false)")
        .execute(&mut conn)
        .await?;
    let started = std::time::Instant::now();
    let mut said = Duration::ZERO;
    while !sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
        .bind(MIGRATE_LOCK)
        .fetch_one(&mut conn)
        .await?
    {
        if started.elapsed() >= said + Duration::from_secs(10) {
            said = started.elapsed();
            tracing::info!(
                waited_s = said.as_secs(),
                "another `paystream migrate` is running; waiting for it to finish"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let result = MIGRATOR.run(&mut conn).await;
    // Closing the connection would release it too; a failed unlock only means that.
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATE_LOCK)
        .execute(&mut conn)
        .await;
    let _ = conn.close().await;
    result
}

/// Maps an enum with `as_str(self) -> &'static str` and `parse(&str) -> Option<Self>` to a
/// TEXT column holding `as_str`: rows carry the enum, and text that is none of its values
/// fails to decode instead of becoming a value nobody handles.
macro_rules! text_column {
    ($ty:ty) => {
        impl sqlx::Type<sqlx::Postgres> for $ty {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::Type<sqlx::Postgres>>::type_info()
            }

            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        impl sqlx::Encode<'_, sqlx::Postgres> for $ty {
            fn encode_by_ref(
                &self,
                buf: &mut sqlx::postgres::PgArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<sqlx::Postgres>>::encode(self.as_str(), buf)
            }
        }

        impl sqlx::Decode<'_, sqlx::Postgres> for $ty {
            fn decode(
                value: sqlx::postgres::PgValueRef<'_>,
            ) -> Result<Self, sqlx::error::BoxDynError> {
                let text = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
                <$ty>::parse(text)
                    .ok_or_else(|| format!("{text:?} is not a {}", stringify!($ty)).into())
            }
        }
    };
}
pub(crate) use text_column;

/// The parameters of a statement built piece by piece: each value is bound where its
/// placeholder is written into the SQL text, so text and bindings cannot drift apart.
#[derive(Default)]
pub struct Params {
    args: PgArguments,
    count: usize,
}

impl Params {
    /// Binds `value` as the next parameter; returns its placeholder (`$n`).
    pub fn push<'q, T>(&mut self, value: T) -> Result<String, sqlx::Error>
    where
        T: Encode<'q, Postgres> + Type<Postgres> + 'q,
    {
        self.args.add(value).map_err(sqlx::Error::Encode)?;
        self.count += 1;
        Ok(format!("${}", self.count))
    }

    /// The bound values, for `sqlx::query_with`.
    pub fn into_arguments(self) -> PgArguments {
        self.args
    }
}

/// Data-modifying statements that run together as one statement, as its CTEs, their values
/// bound into one `Params`. A batch handler's writes ride in the batch's closing statement
/// this way (`consumer::Applied::writes`): one round trip for the business rows, the outbox
/// rows and the offsets. The statements of one `Writes` share a snapshot, so none of them may
/// read what another writes, nor write a row another writes.
#[derive(Default)]
pub struct Writes {
    params: Params,
    statements: Vec<String>,
}

impl std::fmt::Debug for Writes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writes")
            .field("statements", &self.statements.len())
            .field("params", &self.params.count)
            .finish()
    }
}

impl Writes {
    /// Adds the INSERT, UPDATE or DELETE that `build` returns (no RETURNING), binding its
    /// values as it writes their placeholders.
    pub fn push(
        &mut self,
        build: impl FnOnce(&mut Params) -> Result<String, sqlx::Error>,
    ) -> Result<(), sqlx::Error> {
        let sql = build(&mut self.params)?;
        self.statements.push(sql);
        Ok(())
    }

    /// The parameters bound so far, for the statement that carries these writes to go on
    /// binding, and the writes as its CTEs (`w1 AS (…)`, `w2 AS (…)`, …).
    pub fn into_ctes(self) -> (Params, Vec<String>) {
        let ctes = self
            .statements
            .iter()
            .enumerate()
            .map(|(i, sql)| format!("w{} AS ({sql})", i + 1))
            .collect();
        (self.params, ctes)
    }

    /// Runs the writes on their own, as one statement.
    pub async fn execute(mut self, conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
        let Some(last) = self.statements.pop() else {
            return Ok(());
        };
        let (params, ctes) = self.into_ctes();
        let sql = if ctes.is_empty() {
            last
        } else {
            format!("WITH {} {last}", ctes.join(", "))
        };
        sqlx::query_with(&sql, params.into_arguments())
            .execute(conn)
            .await?;
        Ok(())
    }
}

/// Rows one prune statement deletes at most.
const PRUNE_CHUNK: i64 = 10_000;

/// A table kept to a retention: `sql` deletes at most `$2` rows older than `$1` hours (of
/// the consumer group `$3`, when `group` is given).
pub struct Pruning {
    /// What is pruned, for the logs.
    pub what: &'static str,
    pub sql: &'static str,
    pub retention_hours: u64,
    pub group: Option<String>,
    pub interval: Duration,
    /// Counts each chunk as it commits.
    pub counter: IntCounter,
}

/// Starts `run_pruning` as a task of its own that stops when `cancel` fires or when the
/// returned guard is dropped (the part it belongs to stopped or failed).
#[must_use = "pruning stops when the guard is dropped"]
pub fn spawn_pruning(
    pool: &PgPool,
    pruning: Pruning,
    cancel: &CancellationToken,
) -> tokio_util::sync::DropGuard {
    let stop = cancel.child_token();
    tokio::spawn(run_pruning(pool.clone(), pruning, stop.clone()));
    stop.drop_guard()
}

/// Prunes now and then every `interval`, until `cancel` fires. A task of its own, so a long
/// prune never holds up the work next to it; failures are logged and retried at the next
/// interval (a late prune costs only disk).
pub async fn run_pruning(pool: PgPool, pruning: Pruning, cancel: CancellationToken) {
    let Pruning {
        what,
        retention_hours,
        ref group,
        ..
    } = pruning;
    loop {
        match pruning.prune(&pool, &cancel).await {
            Ok(0) => {}
            Ok(rows) => tracing::info!(rows, what, group, retention_hours, "pruned expired rows"),
            Err(e) => tracing::warn!(error = %e, what, group, "prune failed; retrying later"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(pruning.interval) => {}
        }
    }
}

impl Pruning {
    /// Deletes the expired rows a chunk at a time, until a chunk comes back short or `cancel`
    /// fires; returns how many. Chunks are short transactions of their own, so a large
    /// backlog never holds locks or a snapshot for long next to the batch transactions.
    async fn prune(&self, pool: &PgPool, cancel: &CancellationToken) -> Result<u64, sqlx::Error> {
        // A century keeps everything and still leaves `now() - interval` inside the
        // timestamp range.
        let hours = self.retention_hours.min(876_000) as i32;
        let mut total = 0;
        while !cancel.is_cancelled() {
            let mut query = sqlx::query(self.sql).bind(hours).bind(PRUNE_CHUNK);
            if let Some(group) = &self.group {
                query = query.bind(group);
            }
            let deleted = query.execute(pool).await?.rows_affected();
            total += deleted;
            self.counter.inc_by(deleted);
            if deleted < PRUNE_CHUNK as u64 {
                break;
            }
        }
        Ok(total)
    }
}

/// Rolls a transaction back now instead of on drop. Dropping a transaction only queues its
/// ROLLBACK, which sqlx sends when the connection is next used, so until then its locks (row
/// locks, advisory locks) outlive the code that took them, and whoever waits on them waits for
/// nothing. Every path that gives up on an open transaction, after a refusal or a failure,
/// ends it with this.
pub async fn release(tx: Transaction<'_, Postgres>) {
    if let Err(error) = tx.rollback().await {
        // The connection is unusable and will be closed, which ends the session and its locks.
        tracing::warn!(%error, "rolling back a transaction failed");
    }
}

/// What to do about a failed database call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Expected under load or failure; retry with backoff (lost connection, 40001, 40P01, ...).
    Transient,
    /// Unexpected (a constraint we did not foresee, a bug). Still retried — skipping a money
    /// event is worse than stalling a partition — but logged loudly.
    Unexpected,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Transient => "transient",
            Self::Unexpected => "unexpected",
        }
    }
}

pub fn classify(err: &sqlx::Error) -> ErrorClass {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => ErrorClass::Transient,
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // serialization_failure, deadlock_detected, unique_violation (a concurrent writer
            // got there first; the retry will see its row), lock_not_available (lock_timeout),
            // idle_in_transaction_session_timeout (the session was ended; the retry takes a
            // new one).
            Some("40001" | "40P01" | "23505" | "55P03" | "25P03") => ErrorClass::Transient,
            // connection exceptions, insufficient resources, operator intervention
            // (admin shutdown, pg_terminate_backend), system errors.
            Some(code)
                if code.starts_with("08")
                    || code.starts_with("53")
                    || code.starts_with("57")
                    || code.starts_with("58") =>
            {
                ErrorClass::Transient
            }
            _ => ErrorClass::Unexpected,
        },
        _ => ErrorClass::Unexpected,
    }
}
