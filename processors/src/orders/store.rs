//! The order rows and the events that announce their changes, written together.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::saga::{self, CancelRequest, Refusal};
use super::OrderStatus;
use crate::domain::{Amount, Currency};
use crate::events::{Envelope, OrderCancelled, OrderCreated, OrderItem};
use crate::outbox::{self, OutboxRow};

/// An order as stored and as the API shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    pub id: i64,
    pub order_no: String,
    pub user_id: i64,
    pub amount_fen: i64,
    pub currency: String,
    pub items: serde_json::Value,
    pub status: OrderStatus,
    pub cancel_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub paid_at: Option<DateTime<Utc>>,
    pub cancelled_at: Option<DateTime<Utc>>,
    pub refund_requested_at: Option<DateTime<Utc>>,
    pub refunded_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "id, order_no, user_id, amount_fen, currency, items, status, cancel_reason, \
    created_at, updated_at, paid_at, cancelled_at, refund_requested_at, refunded_at";

/// A validated order request.
#[derive(Debug, Clone)]
pub struct NewOrder {
    pub user_id: i64,
    pub amount: Amount,
    pub currency: Currency,
    pub items: Vec<OrderItem>,
    pub idempotency_key: String,
}

/// Writes a PENDING order and its `OrderCreated`, in the caller's transaction.
pub async fn create(
    conn: &mut PgConnection,
    new: &NewOrder,
    order_events_topic: &str,
) -> Result<Order, sqlx::Error> {
    let items = serde_json::to_value(&new.items).unwrap_or_default();
    let order: Order = sqlx::query_as(&format!(
        r#"
        WITH next AS (SELECT nextval(pg_get_serial_sequence('orders', 'id')) AS id)
        INSERT INTO orders (id, order_no, user_id, amount_fen, currency, items, idempotency_key)
        SELECT id, 'PS' || to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD') || lpad(id::text, 12, '0'),
               $1, $2, $3, $4, $5
        FROM next
        RETURNING {COLUMNS}
        "#
    ))
    .bind(new.user_id)
    .bind(new.amount.fen())
    .bind(new.currency.as_str())
    .bind(items)
    .bind(&new.idempotency_key)
    .fetch_one(&mut *conn)
    .await?;
    let payload = OrderCreated {
        order_id: order.id,
        order_no: order.order_no.clone(),
        user_id: new.user_id,
        amount_fen: new.amount,
        currency: new.currency,
        items: new.items.clone(),
        idempotency_key: new.idempotency_key.clone(),
    };
    let envelope = Envelope::new(Uuid::new_v4(), order.created_at, payload);
    outbox::insert(
        conn,
        &[OutboxRow::event(order_events_topic, new.user_id, &envelope)],
    )
    .await?;
    Ok(order)
}

/// One order of one user (`None` when it does not exist or belongs to someone else).
pub async fn get(
    conn: &mut PgConnection,
    user_id: i64,
    order_id: i64,
) -> Result<Option<Order>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM orders WHERE id = $1 AND user_id = $2"
    ))
    .bind(order_id)
    .bind(user_id)
    .fetch_optional(conn)
    .await
}

/// A page of a user's orders, newest first, strictly older than `before` (the cursor).
pub async fn list(
    conn: &mut PgConnection,
    user_id: i64,
    status: Option<OrderStatus>,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<Order>, sqlx::Error> {
    sqlx::query_as(&format!(
        r#"
        SELECT {COLUMNS} FROM orders
        WHERE user_id = $1
          AND ($2::text IS NULL OR status = $2)
          AND ($3::bigint IS NULL OR id < $3)
        ORDER BY id DESC
        LIMIT $4
        "#
    ))
    .bind(user_id)
    .bind(status.map(OrderStatus::as_str))
    .bind(before)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// How many orders are PENDING, and how old the oldest is (seconds). Uses the partial index
/// on PENDING orders, so it stays cheap on a big table.
pub async fn pending(pool: &PgPool) -> Result<(i64, Option<f64>), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*), extract(epoch FROM now() - min(created_at))::float8 FROM orders WHERE status = 'PENDING'",
    )
    .fetch_one(pool)
    .await
}

/// What a cancel request did.
#[derive(Debug)]
pub enum CancelOutcome {
    /// A PENDING order is now CANCELLED. If a debit slipped in before the cancel, the account
    /// processor refunds it (it reads `OrderCancelled` after `OrderCreated`, in order).
    Cancelled(Order),
    /// A PAID order stays PAID until its refund lands, then becomes REFUNDED.
    RefundRequested(Order),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelRefused {
    NotFound,
    /// Already CANCELLED or REFUNDED.
    AlreadyFinal(OrderStatus),
    /// A PAID order whose refund is already on its way.
    RefundAlreadyRequested,
}

/// Cancels an order on its owner's request, in the caller's transaction.
pub async fn cancel(
    conn: &mut PgConnection,
    user_id: i64,
    order_id: i64,
    order_events_topic: &str,
) -> Result<Result<CancelOutcome, CancelRefused>, sqlx::Error> {
    let current: Option<(OrderStatus, Option<DateTime<Utc>>)> = sqlx::query_as(
        "SELECT status, refund_requested_at FROM orders WHERE id = $1 AND user_id = $2 FOR UPDATE",
    )
    .bind(order_id)
    .bind(user_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((status, refund_requested_at)) = current else {
        return Ok(Err(CancelRefused::NotFound));
    };
    let order = saga::Order {
        status,
        refund_requested: refund_requested_at.is_some(),
        refunded: false,
    };
    let (outcome, why) = match saga::cancel_requested(order) {
        Ok(CancelRequest::Cancel { reason }) => {
            let order = mark_cancelled(conn, order_id, reason).await?;
            (CancelOutcome::Cancelled(order), reason)
        }
        Ok(CancelRequest::RequestRefund { reason }) => {
            let order: Order = sqlx::query_as(&format!(
                r#"
                UPDATE orders SET refund_requested_at = now(), cancel_reason = $2, updated_at = now()
                WHERE id = $1 RETURNING {COLUMNS}
                "#
            ))
            .bind(order_id)
            .bind(reason)
            .fetch_one(&mut *conn)
            .await?;
            (CancelOutcome::RefundRequested(order), reason)
        }
        Err(Refusal::RefundAlreadyRequested) => {
            return Ok(Err(CancelRefused::RefundAlreadyRequested))
        }
        Err(Refusal::AlreadyFinal(status)) => return Ok(Err(CancelRefused::AlreadyFinal(status))),
    };
    let (CancelOutcome::Cancelled(order) | CancelOutcome::RefundRequested(order)) = &outcome;
    let event = cancellation(
        order_events_topic,
        order.id,
        order.user_id,
        why,
        true,
        Uuid::new_v4(),
    );
    outbox::insert(conn, &[event]).await?;
    Ok(Ok(outcome))
}

async fn mark_cancelled(
    conn: &mut PgConnection,
    order_id: i64,
    why: &str,
) -> Result<Order, sqlx::Error> {
    sqlx::query_as(&format!(
        r#"
        UPDATE orders SET status = $3, cancel_reason = $2, cancelled_at = now(), updated_at = now()
        WHERE id = $1 RETURNING {COLUMNS}
        "#
    ))
    .bind(order_id)
    .bind(why)
    .bind(OrderStatus::Cancelled.as_str())
    .fetch_one(conn)
    .await
}

/// `OrderCancelled` for an order. Cancels that may race a debit (by the user, by the timeout
/// sweeper) always set `refund_required`: the account processor refunds only a debit that
/// exists and only once, so asking costs nothing when there is none, and it covers a debit
/// that was made but not yet reported when the order was cancelled.
pub fn cancellation(
    order_events_topic: &str,
    order_id: i64,
    user_id: i64,
    why: &str,
    refund_required: bool,
    event_id: Uuid,
) -> OutboxRow {
    let payload = OrderCancelled {
        order_id,
        user_id,
        reason: why.to_owned(),
        refund_required,
    };
    OutboxRow::event(
        order_events_topic,
        user_id,
        &Envelope::new(event_id, Utc::now(), payload),
    )
}
