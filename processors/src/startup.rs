//! One wiring: the parts a paystream process can run, which parts each command runs, and one
//! `start` that `main`, the test harness and the bench all use.
//!
//! Every part has the shape `run(settings, pool, cancel)`. A part that stops with an error
//! takes the whole process down with it (cleanly): a half-running worker is worse than a
//! restarted one.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ops::OpsState;
use crate::settings::Settings;
use crate::{accounts, api, audit, orders, outbox};

/// A long-running part of paystream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The HTTP API (with /metrics, /healthz and /readyz).
    Api,
    /// Consumes `order.events`: debits, refunds, dead letters.
    AccountProcessor,
    /// Consumes `account.events`: the saga.
    OrderProcessor,
    /// Cancels orders nobody paid for in time.
    Sweeper,
    /// Deletes expired idempotency keys.
    IdempotencyExpiry,
    /// Publishes the outbox.
    Relay,
    /// Runs the audit every `audit.interval_s` and exports the result.
    PeriodicAudit,
}

/// `paystream api`.
pub const API: &[Part] = &[Part::Api];
/// `paystream process account`.
pub const ACCOUNT_WORKER: &[Part] = &[Part::AccountProcessor];
/// `paystream process order`: the sweeper and the expiry are safe on every worker.
pub const ORDER_WORKER: &[Part] = &[Part::OrderProcessor, Part::Sweeper, Part::IdempotencyExpiry];
/// `paystream relay`: the periodic audit runs beside it (one or two relays per deployment).
pub const RELAY: &[Part] = &[Part::Relay, Part::PeriodicAudit];
/// `paystream up`: everything in one process.
pub const EVERYTHING: &[Part] = &[
    Part::Api,
    Part::AccountProcessor,
    Part::OrderProcessor,
    Part::Sweeper,
    Part::IdempotencyExpiry,
    Part::Relay,
    Part::PeriodicAudit,
];

type PartFuture = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

impl Part {
    /// The name logs use for the part.
    pub fn name(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::AccountProcessor => "account processor",
            Self::OrderProcessor => "order processor",
            Self::Sweeper => "payment timeout sweeper",
            Self::IdempotencyExpiry => "idempotency key expiry",
            Self::Relay => "relay",
            Self::PeriodicAudit => "periodic audit",
        }
    }

    /// The processor whose readiness `/readyz` reports, for a consumer part.
    fn processor(self) -> Option<&'static str> {
        match self {
            Self::AccountProcessor => Some("account"),
            Self::OrderProcessor => Some("order"),
            _ => None,
        }
    }

    /// The part's work; `None` for the API, which needs a listener (see `start`).
    fn run(
        self,
        settings: Settings,
        pool: PgPool,
        cancel: CancellationToken,
    ) -> Option<PartFuture> {
        Some(match self {
            Self::Api => return None,
            Self::AccountProcessor => Box::pin(accounts::processor::run(settings, pool, cancel)),
            Self::OrderProcessor => Box::pin(orders::processor::run(settings, pool, cancel)),
            Self::Sweeper => Box::pin(orders::sweeper::run(settings, pool, cancel)),
            Self::IdempotencyExpiry => {
                Box::pin(api::idempotency::run_expiry(settings, pool, cancel))
            }
            Self::Relay => Box::pin(outbox::relay::run(settings, pool, cancel)),
            Self::PeriodicAudit => Box::pin(audit::run_periodically(settings, pool, cancel)),
        })
    }
}

/// Parts started by `start`, running until they are stopped or one fails.
pub struct Running {
    tracker: TaskTracker,
    cancel: CancellationToken,
    failed: Arc<AtomicBool>,
}

/// A name for this process, unique among the processes of a deployment: the host, the
/// process id and a random suffix (owners of partition claims and of the relay lease).
pub fn instance_id() -> String {
    format!(
        "{}-{}-{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into()),
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Starts `parts`. `http` is where the process serves HTTP: with `Part::Api` among the parts,
/// the API (which includes the operations endpoints); without it, the operations endpoints
/// (/metrics, /healthz, /readyz) alone; `None`, no HTTP at all.
pub fn start(
    parts: &[Part],
    settings: &Settings,
    pool: &PgPool,
    http: Option<TcpListener>,
) -> anyhow::Result<Running> {
    let running = Running {
        tracker: TaskTracker::new(),
        cancel: CancellationToken::new(),
        failed: Arc::default(),
    };
    if parts.contains(&Part::Api) {
        settings.api.check_signing_key()?;
    }
    if let Some(listener) = http {
        let processors = parts.iter().filter_map(|p| p.processor()).collect();
        let ops = OpsState::new(settings, pool.clone(), processors)?;
        let cancel = running.cancel.clone();
        let address = listener.local_addr()?;
        if parts.contains(&Part::Api) {
            tracing::info!(%address, "HTTP API listening");
            let state = api::AppState::new(settings.clone(), pool.clone(), ops);
            running.spawn(Part::Api.name(), api::serve(listener, state, cancel));
        } else {
            running.spawn("metrics endpoint", crate::ops::serve(listener, ops, cancel));
        }
    }
    for &part in parts {
        let cancel = running.cancel.clone();
        if let Some(work) = part.run(settings.clone(), pool.clone(), cancel) {
            running.spawn(part.name(), work);
        }
    }
    running.tracker.close();
    Ok(running)
}

impl Running {
    fn spawn(
        &self,
        part: &'static str,
        work: impl Future<Output = anyhow::Result<()>> + Send + 'static,
    ) {
        let (cancel, failed) = (self.cancel.clone(), self.failed.clone());
        self.tracker.spawn(async move {
            if let Err(e) = work.await {
                tracing::error!(part, error = format!("{e:#}"), "fatal error; shutting down");
                failed.store(true, Ordering::SeqCst);
                cancel.cancel();
            }
        });
    }

    /// Runs until `stop` resolves or a part fails, then cancels every part and waits up to
    /// `grace` for their in-flight work. Fails if a part failed.
    pub async fn run_until(
        self,
        stop: impl Future<Output = ()>,
        grace: Duration,
    ) -> anyhow::Result<()> {
        tokio::select! {
            _ = stop => {}
            _ = self.cancel.cancelled() => {}
        }
        self.stop(grace).await
    }

    /// Cancels every part and waits up to `grace` for their in-flight work. Fails if a part
    /// failed.
    pub async fn stop(self, grace: Duration) -> anyhow::Result<()> {
        self.cancel.cancel();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("parts did not stop within the grace period; exiting anyway");
        }
        if self.failed.load(Ordering::SeqCst) {
            anyhow::bail!("a part of paystream failed; see the log above");
        }
        Ok(())
    }
}
