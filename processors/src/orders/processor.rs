//! `paystream process order`: consumes `account.events` and moves orders through the saga.
//!
//! Delivery semantics: exactly-once effects per event, through the same consumer framework
//! as the account processor (`consumer`): one transaction per partition batch holds the order
//! updates, the events they emit (outbox), the dedupe rows and the stored offset.
//!
//! The transitions are `saga::next`'s; this module loads the orders, carries them out and
//! writes the rows back:
//!
//! - `AccountDebited`: PENDING -> PAID and `OrderPaid`. If the order was already CANCELLED
//!   (the user or the payment timeout got there first) it stays CANCELLED and the debit is
//!   compensated: `OrderCancelled` with `refundRequired` asks the account processor to give
//!   the money back (it refunds at most once, so a refund already under way is not doubled).
//! - `AccountDebitFailed`: PENDING -> CANCELLED with the failure as reason, and
//!   `OrderCancelled` without refund (nothing was taken).
//! - `AccountRefunded`: PAID -> REFUNDED; on a CANCELLED order the refund is recorded
//!   (`refunded_at`) and the order stays CANCELLED.
//!
//! The order rows of a batch are locked in id order, so the API's cancel and the timeout
//! sweeper serialize with the processor per order: whichever commits first decides, and the
//! other sees its result.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::saga::{self, Transition, Trigger};
use super::store::cancellation;
use super::OrderStatus;
use crate::consumer::{self, Applied, ApplyError, Fresh, Handler, Outcome, WorkerConfig};
use crate::db::Writes;
use crate::domain::{Amount, Currency};
use crate::events::{derived_event_id, AccountEvent, Envelope, OrderPaid, Poison, RawEvent};
use crate::outbox::OutboxRow;
use crate::settings::Settings;

/// Runs one order-processor worker (a member of `orders.group` consuming
/// `topics.account_events`) until `cancel` fires.
pub async fn run(
    settings: Settings,
    pool: PgPool,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let handler = OrderProcessor {
        order_events_topic: settings.topics.order_events.clone(),
    };
    let config = WorkerConfig {
        group: settings.orders.group.clone(),
        topic: settings.topics.account_events.clone(),
        dead_letter_topic: settings.topics.dead_letter.clone(),
        settings,
    };
    consumer::run(config, pool, handler, cancel).await
}

pub struct OrderProcessor {
    pub order_events_topic: String,
}

/// An order row as the saga sees it, changed in memory during a batch and written once.
#[derive(Debug, Clone, sqlx::FromRow)]
struct SagaRow {
    id: i64,
    user_id: i64,
    amount_fen: i64,
    currency: String,
    status: OrderStatus,
    cancel_reason: Option<String>,
    paid_at: Option<DateTime<Utc>>,
    cancelled_at: Option<DateTime<Utc>>,
    refunded_at: Option<DateTime<Utc>>,
    refund_requested_at: Option<DateTime<Utc>>,
    #[sqlx(skip)]
    dirty: bool,
}

impl SagaRow {
    fn set_status(&mut self, status: OrderStatus) {
        self.status = status;
        self.dirty = true;
    }

    /// `OrderPaid` for this order, its id derived from the debit's; `None` (and an error in
    /// the log) if the row holds an amount or currency the table's checks should have refused.
    fn paid(&self, cause: Uuid, now: DateTime<Utc>, topic: &str) -> Option<OutboxRow> {
        let (Some(amount_fen), Some(currency)) = (
            Amount::new(self.amount_fen),
            Currency::parse(&self.currency),
        ) else {
            tracing::error!(
                order_id = self.id,
                "order row has an invalid amount or currency"
            );
            return None;
        };
        let payload = OrderPaid {
            order_id: self.id,
            user_id: self.user_id,
            amount_fen,
            currency,
        };
        let id = derived_event_id(cause, "OrderPaid");
        Some(OutboxRow::event(
            topic,
            self.user_id,
            &Envelope::new(id, now, payload),
        ))
    }
}

impl Handler for OrderProcessor {
    type Event = AccountEvent;

    fn name(&self) -> &'static str {
        "order"
    }

    fn decode(&self, raw: &RawEvent) -> Result<AccountEvent, Poison> {
        AccountEvent::decode(raw)
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        _partition: i32,
        events: &[Fresh<AccountEvent>],
    ) -> Result<Applied, ApplyError> {
        let mut order_ids: Vec<i64> = events.iter().filter_map(|f| f.event.order_id()).collect();
        order_ids.sort_unstable();
        order_ids.dedup();
        let mut orders: HashMap<i64, SagaRow> = if order_ids.is_empty() {
            HashMap::new()
        } else {
            sqlx::query_as::<_, SagaRow>(
                r#"
                SELECT id, user_id, amount_fen, currency, status, cancel_reason, paid_at, cancelled_at,
                       refunded_at, refund_requested_at
                FROM orders WHERE id = ANY($1) ORDER BY id FOR UPDATE
                "#,
            )
            .bind(&order_ids)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .map(|row| (row.id, row))
            .collect()
        };

        let now = Utc::now();
        let mut applied = Applied::default();
        for fresh in events {
            let (outcome, emits) = match fresh.event.order_id() {
                Some(order_id) => match orders.get_mut(&order_id) {
                    Some(order) => self.advance(order, fresh, now),
                    None => {
                        tracing::warn!(order_id, event_id = %fresh.event_id, "account event for an order paystream does not know; ignored");
                        (Outcome::Ignored, None)
                    }
                },
                None => (Outcome::Ignored, None),
            };
            applied.push(outcome, emits);
        }
        // The orders' new states ride in the batch's closing statement.
        write(
            &mut applied.writes,
            orders.into_values().filter(|o| o.dirty),
        )?;
        Ok(applied)
    }
}

impl OrderProcessor {
    /// Moves `order` as the saga says for the account event `fresh`; returns the outcome and
    /// the event that announces the move.
    fn advance(
        &self,
        order: &mut SagaRow,
        fresh: &Fresh<AccountEvent>,
        now: DateTime<Utc>,
    ) -> (Outcome, Option<OutboxRow>) {
        let trigger = match &fresh.event {
            AccountEvent::Debited { .. } => Trigger::Debited,
            AccountEvent::DebitFailed { reason, .. } => Trigger::DebitFailed(*reason),
            AccountEvent::Refunded { .. } => Trigger::Refunded,
            // A deposit concerns no order.
            AccountEvent::Credited => return (Outcome::Ignored, None),
        };
        let saga = saga::Order {
            status: order.status,
            refund_requested: order.refund_requested_at.is_some(),
            refunded: order.refunded_at.is_some(),
        };
        self.carry_out(order, saga::next(saga, trigger), fresh.event_id, now)
    }

    /// Carries out a transition of `order` caused by the event `cause`; returns the outcome
    /// and the event that announces it.
    fn carry_out(
        &self,
        order: &mut SagaRow,
        transition: Transition,
        cause: Uuid,
        now: DateTime<Utc>,
    ) -> (Outcome, Option<OutboxRow>) {
        let order_id = order.id;
        let topic = &self.order_events_topic;
        let cancelled = derived_event_id(cause, "OrderCancelled");
        match transition {
            Transition::Pay => {
                order.set_status(OrderStatus::Paid);
                order.paid_at = Some(now);
                // `None` only for a row the table's checks should have refused.
                (Outcome::Applied, order.paid(cause, now, topic))
            }
            Transition::Cancel {
                reason,
                refund_required,
            } => {
                order.set_status(OrderStatus::Cancelled);
                order.cancel_reason = Some(reason.to_owned());
                order.cancelled_at = Some(now);
                let user = order.user_id;
                let row = cancellation(topic, order_id, user, reason, refund_required, cancelled);
                (Outcome::Applied, Some(row))
            }
            Transition::Compensate => {
                // The money was taken for an order that is no longer wanted.
                let why = order.cancel_reason.clone().unwrap_or_default();
                tracing::info!(order_id, reason = %why, "debit landed after the order was cancelled; requesting a refund");
                let row = cancellation(topic, order_id, order.user_id, &why, true, cancelled);
                (Outcome::Applied, Some(row))
            }
            Transition::CompleteRefund => {
                order.set_status(OrderStatus::Refunded);
                order.refunded_at = Some(now);
                (Outcome::Applied, None)
            }
            Transition::RecordRefund => {
                order.refunded_at = Some(now);
                order.dirty = true;
                (Outcome::Applied, None)
            }
            Transition::Unexpected => {
                tracing::warn!(
                    order_id,
                    "refund reported for an order that is still PENDING; ignored"
                );
                (Outcome::Ignored, None)
            }
            // Account events never ask for a refund or a cancel; the rest is behind us.
            Transition::Stale | Transition::RequestRefund { .. } | Transition::Refuse(_) => {
                (Outcome::Duplicate, None)
            }
        }
    }
}

/// The update of the orders the batch moved, for the batch's closing statement.
fn write(writes: &mut Writes, rows: impl Iterator<Item = SagaRow>) -> Result<(), sqlx::Error> {
    let rows: Vec<SagaRow> = rows.collect();
    if rows.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let statuses: Vec<&str> = rows.iter().map(|r| r.status.as_str()).collect();
    let reasons: Vec<Option<&str>> = rows.iter().map(|r| r.cancel_reason.as_deref()).collect();
    let paid: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.paid_at).collect();
    let cancelled: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.cancelled_at).collect();
    let refunded: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.refunded_at).collect();
    writes.push(|p| {
        Ok(format!(
            "UPDATE orders o \
             SET status = u.status, cancel_reason = u.cancel_reason, paid_at = u.paid_at, \
                 cancelled_at = u.cancelled_at, refunded_at = u.refunded_at, updated_at = now() \
             FROM unnest({}::bigint[], {}::text[], {}::text[], {}::timestamptz[], \
                         {}::timestamptz[], {}::timestamptz[]) \
                 AS u(id, status, cancel_reason, paid_at, cancelled_at, refunded_at) \
             WHERE o.id = u.id",
            p.push(&ids)?,
            p.push(&statuses)?,
            p.push(&reasons)?,
            p.push(&paid)?,
            p.push(&cancelled)?,
            p.push(&refunded)?,
        ))
    })
}
