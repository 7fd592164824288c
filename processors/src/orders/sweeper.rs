//! The payment timeout: an order still PENDING `orders.payment_timeout_s` after it was created
//! is cancelled with reason `PAYMENT_TIMEOUT`, and `OrderCancelled` (asking for a refund, in
//! case a debit is already on its way) goes out in the same transaction.
//!
//! Safe on any number of workers at once: each round claims overdue orders with
//! `FOR UPDATE SKIP LOCKED` and re-checks `status = 'PENDING'` under the lock, so two sweepers
//! never cancel the same order, and a sweeper never overrides a payment that committed first.

use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::saga::{self, Transition, Trigger};
use super::store::cancellation;
use super::{reason, OrderStatus};
use crate::db::{classify, release, ErrorClass};
use crate::outbox;
use crate::settings::Settings;

/// Runs the sweeper until `cancel` fires. Database errors are logged and retried next round.
pub async fn run(
    settings: Settings,
    pool: PgPool,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let interval = Duration::from_millis(settings.orders.sweep_interval_ms.max(10));
    let timeout = Duration::from_secs(settings.orders.payment_timeout_s);
    tracing::info!(
        timeout_s = timeout.as_secs(),
        "payment timeout sweeper started"
    );
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(interval) => {}
        }
        match sweep_once(
            &pool,
            timeout,
            settings.orders.sweep_batch,
            &settings.topics.order_events,
        )
        .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(cancelled = n, "cancelled orders past their payment timeout"),
            Err(e) => log_error("sweep", &e),
        }
    }
}

fn log_error(what: &str, e: &sqlx::Error) {
    match classify(e) {
        ErrorClass::Transient => {
            tracing::warn!(error = %e, what, "sweeper round failed; retrying next round")
        }
        ErrorClass::Unexpected => {
            tracing::error!(error = %e, what, "sweeper round failed; retrying next round")
        }
    }
}

/// Cancels up to `batch` overdue PENDING orders; returns how many.
pub async fn sweep_once(
    pool: &PgPool,
    timeout: Duration,
    batch: i64,
    order_events_topic: &str,
) -> Result<usize, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let cancelled = match cancel_due(&mut tx, timeout, batch, order_events_topic).await {
        Ok(n) => n,
        Err(e) => {
            // At once, not on drop: the orders it locked would stay locked until then.
            release(tx).await;
            return Err(e);
        }
    };
    tx.commit().await?;
    crate::telemetry::METRICS
        .orders_timed_out
        .with_label_values(&[reason::PAYMENT_TIMEOUT])
        .inc_by(cancelled as u64);
    Ok(cancelled)
}

async fn cancel_due(
    tx: &mut PgConnection,
    timeout: Duration,
    batch: i64,
    order_events_topic: &str,
) -> Result<usize, sqlx::Error> {
    // The saga cancels on timeout only from PENDING (`saga::timeout_applies_to`, tested
    // there); the literal below keeps the partial index `orders_pending_by_age` usable.
    let pending = saga::Order::new(OrderStatus::Pending);
    let Transition::Cancel {
        reason,
        refund_required,
    } = saga::next(pending, Trigger::PaymentTimeout)
    else {
        return Ok(0);
    };
    let due: Vec<(i64, i64)> = sqlx::query_as(
        r#"
        WITH due AS (
            SELECT id FROM orders
            WHERE status = 'PENDING' AND created_at < now() - make_interval(secs => $1)
            ORDER BY created_at, id
            LIMIT $2
            FOR UPDATE SKIP LOCKED
        )
        UPDATE orders o
        SET status = $4, cancel_reason = $3, cancelled_at = now(), updated_at = now()
        FROM due
        WHERE o.id = due.id AND o.status = 'PENDING'
        RETURNING o.id, o.user_id
        "#,
    )
    .bind(timeout.as_secs_f64())
    .bind(batch)
    .bind(reason)
    .bind(OrderStatus::Cancelled.as_str())
    .fetch_all(&mut *tx)
    .await?;
    let events: Vec<_> = due
        .iter()
        .map(|&(order_id, user_id)| {
            cancellation(
                order_events_topic,
                order_id,
                user_id,
                reason,
                refund_required,
                Uuid::new_v4(),
            )
        })
        .collect();
    outbox::insert(&mut *tx, &events).await?;
    Ok(due.len())
}
