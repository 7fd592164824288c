//! The payment timeout: an order still PENDING `orders.payment_timeout_s` after it was created
//! is cancelled with reason `PAYMENT_TIMEOUT`, and `OrderCancelled` (asking for a refund, in
//! case a debit is already on its way) goes out in the same transaction.
//!
//! Safe on any number of workers at once: each round claims overdue orders with
//! `FOR UPDATE SKIP LOCKED` and re-checks `status = 'PENDING'` under the lock, so two sweepers
//! never cancel the same order, and a sweeper never overrides a payment that committed first.
//! The same loop expires old idempotency keys.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::reason;
use super::store::cancellation;
use crate::db::{classify, ErrorClass};
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
        match expire_idempotency_keys(&pool).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(expired = n, "expired idempotency keys"),
            Err(e) => log_error("expire idempotency keys", &e),
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
        SET status = 'CANCELLED', cancel_reason = $3, cancelled_at = now(), updated_at = now()
        FROM due
        WHERE o.id = due.id AND o.status = 'PENDING'
        RETURNING o.id, o.user_id
        "#,
    )
    .bind(timeout.as_secs_f64())
    .bind(batch)
    .bind(reason::PAYMENT_TIMEOUT)
    .fetch_all(&mut *tx)
    .await?;
    let events: Vec<_> = due
        .iter()
        .map(|&(order_id, user_id)| {
            cancellation(
                order_events_topic,
                order_id,
                user_id,
                reason::PAYMENT_TIMEOUT,
                true,
                Uuid::new_v4(),
            )
        })
        .collect();
    outbox::insert(&mut tx, &events).await?;
    tx.commit().await?;
    crate::telemetry::METRICS
        .orders_timed_out
        .with_label_values(&[reason::PAYMENT_TIMEOUT])
        .inc_by(due.len() as u64);
    Ok(due.len())
}

/// Deletes idempotency keys past their retention.
pub async fn expire_idempotency_keys(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        r#"
        DELETE FROM idempotency_keys
        WHERE (user_id, key) IN (
            SELECT user_id, key FROM idempotency_keys WHERE expires_at < now() LIMIT 1000
        )
        "#,
    )
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
