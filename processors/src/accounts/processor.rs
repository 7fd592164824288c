//! `paystream process account`: consumes `order.events` and moves money.
//!
//! Delivery semantics: exactly-once effects per event (see `consumer`). Per batch, in one
//! transaction, the rules of `rules` decide: `OrderCreated` moves `amountFen` from the user's
//! account to the settlement account of this partition's shard, or records why not
//! (`AccountDebitFailed`, also when no order has the event's id, user, amount and currency:
//! the order row, written by the API in the same database, is what is owed);
//! `OrderCancelled` with `refundRequired` moves it back, at most once
//! and only after a debit (`AccountRefunded`). The database backs the rules: one debit and
//! one refund per order (unique index), user balances never negative (check constraint).
//!
//! Hot rows: every debit credits a settlement account. Settlement is sharded per currency
//! (`settlement_shards`), a batch uses the shard of its partition, and it locks that row once
//! per batch and updates it once — so partitions processed in parallel never queue on one
//! row, and the per-row lock cost is paid per batch, not per debit.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use super::rules::{Book, Debit, DebitDecision, OrderTerms, RefundDecision};
use super::store;
use crate::consumer::{self, Applied, ApplyError, Fresh, Handler, Outcome, WorkerConfig};
use crate::domain::{Amount, Currency};
use crate::events::{
    derived_event_id, AccountDebitFailed, AccountDebited, AccountRefunded, Envelope, EventPayload,
    OrderCancelled, OrderCreated, OrderEvent, Poison, PoisonClass, RawEvent,
};
use crate::ledger::{AccountKind, Postings};
use crate::orders;
use crate::outbox::OutboxRow;
use crate::settings::Settings;

/// Runs one account-processor worker (a member of `processor.account_group` consuming
/// `topics.order_events`) until `cancel` fires.
pub async fn run(
    settings: Settings,
    pool: PgPool,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let handler = AccountProcessor {
        account_events_topic: settings.topics.account_events.clone(),
        settlement_shards: settings.processor.settlement_shards,
    };
    let config = WorkerConfig {
        group: settings.processor.account_group.clone(),
        topic: settings.topics.order_events.clone(),
        dead_letter_topic: settings.topics.dead_letter.clone(),
        settings,
    };
    consumer::run(config, pool, handler, cancel).await
}

pub struct AccountProcessor {
    pub account_events_topic: String,
    pub settlement_shards: i32,
}

impl Handler for AccountProcessor {
    type Event = OrderEvent;

    fn name(&self) -> &'static str {
        "account"
    }

    fn decode(&self, raw: &RawEvent) -> Result<OrderEvent, Poison> {
        OrderEvent::decode(raw)
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        partition: i32,
        events: &[Fresh<OrderEvent>],
    ) -> Result<Applied, ApplyError> {
        if events.is_empty() {
            return Ok(Applied::default());
        }
        let shard = partition.rem_euclid(self.settlement_shards);
        let mut book = load_book(conn, events, shard).await?;
        let now = Utc::now();
        let mut applied = Applied::default();
        for fresh in events {
            let (outcome, emits) = match &fresh.event {
                OrderEvent::Created(order) => {
                    let decision = book.debit(order, fresh.event_id);
                    self.debited(fresh, order, decision, now)?
                }
                OrderEvent::Cancelled(cancel) if cancel.refund_required => {
                    let decision = book.refund(cancel, fresh.event_id);
                    self.refunded(fresh, cancel, decision, now)
                }
                OrderEvent::Cancelled(_) | OrderEvent::Paid(_) => (Outcome::Ignored, None),
            };
            applied.push(outcome, emits);
        }
        book.postings.write(conn).await?;
        Ok(applied)
    }
}

impl AccountProcessor {
    /// The outcome of a debit decision, and the event that announces it.
    fn debited(
        &self,
        fresh: &Fresh<OrderEvent>,
        order: &OrderCreated,
        decision: DebitDecision,
        now: DateTime<Utc>,
    ) -> Result<(Outcome, Option<OutboxRow>), ApplyError> {
        Ok(match decision {
            DebitDecision::Debited {
                account_id,
                balance_after,
            } => {
                let payload = AccountDebited {
                    account_id,
                    user_id: order.user_id,
                    order_id: order.order_id,
                    delta_fen: -order.amount_fen.fen(),
                    balance_after_fen: balance_after,
                    currency: order.currency,
                };
                let row = self.event(fresh, order.user_id, now, payload);
                (Outcome::Applied, Some(row))
            }
            DebitDecision::Failed(reason) => {
                let payload = AccountDebitFailed {
                    user_id: order.user_id,
                    order_id: order.order_id,
                    reason,
                    amount_fen: order.amount_fen,
                    currency: order.currency,
                };
                let row = self.event(fresh, order.user_id, now, payload);
                (Outcome::BusinessFailure, Some(row))
            }
            DebitDecision::Duplicate => {
                tracing::warn!(order_id = order.order_id, event_id = %fresh.event_id, "order already debited; treating OrderCreated as a duplicate");
                (Outcome::Duplicate, None)
            }
            DebitDecision::Unpostable(why) => (
                Outcome::DeadLettered(Poison::new(PoisonClass::BalanceOverflow, why)),
                None,
            ),
            // `lock_system_accounts` creates it; missing means a concurrent oddity: the batch
            // is retried.
            DebitDecision::NoSettlementAccount => {
                return Err(ApplyError::Inconsistent(format!(
                    "no settlement account in {} for order {}",
                    order.currency.as_str(),
                    order.order_id
                )))
            }
        })
    }

    /// The outcome of a refund decision, and the event that announces it.
    fn refunded(
        &self,
        fresh: &Fresh<OrderEvent>,
        cancel: &OrderCancelled,
        decision: RefundDecision,
        now: DateTime<Utc>,
    ) -> (Outcome, Option<OutboxRow>) {
        match decision {
            RefundDecision::Refunded {
                account_id,
                user_id,
                debit,
                balance_after,
            } => {
                let payload = AccountRefunded {
                    account_id,
                    user_id,
                    order_id: cancel.order_id,
                    delta_fen: debit.amount.fen(),
                    balance_after_fen: balance_after,
                    currency: debit.currency,
                };
                (
                    Outcome::Applied,
                    Some(self.event(fresh, user_id, now, payload)),
                )
            }
            RefundDecision::NeverDebited => {
                tracing::info!(
                    order_id = cancel.order_id,
                    "refund requested for an order that was never debited; nothing to refund"
                );
                (Outcome::Ignored, None)
            }
            RefundDecision::Duplicate => (Outcome::Duplicate, None),
            RefundDecision::Unpostable(why) => (
                Outcome::DeadLettered(Poison::new(PoisonClass::BalanceOverflow, why)),
                None,
            ),
        }
    }

    /// An `account.events` record caused by `cause`, its id derived from the cause's.
    fn event<P: EventPayload>(
        &self,
        cause: &Fresh<OrderEvent>,
        user_id: i64,
        now: DateTime<Utc>,
        payload: P,
    ) -> OutboxRow {
        let id = derived_event_id(cause.event_id, P::TYPE);
        OutboxRow::event(
            &self.account_events_topic,
            user_id,
            &Envelope::new(id, now, payload),
        )
    }
}

/// Loads and locks what a batch's events can touch: users first, then system accounts, each
/// in id order (so concurrent batches cannot deadlock), and the debits and refunds already
/// recorded for its orders.
async fn load_book(
    conn: &mut PgConnection,
    events: &[Fresh<OrderEvent>],
    shard: i32,
) -> Result<Book, sqlx::Error> {
    let order_ids: Vec<i64> = events
        .iter()
        .filter_map(|f| match &f.event {
            OrderEvent::Created(c) => Some(c.order_id),
            OrderEvent::Cancelled(c) if c.refund_required => Some(c.order_id),
            _ => None,
        })
        .collect();
    let (debits, refunded) = existing_transfers(conn, &order_ids).await?;
    let created = || {
        events.iter().filter_map(|f| match &f.event {
            OrderEvent::Created(c) => Some(c),
            _ => None,
        })
    };
    let created_ids: Vec<i64> = created().map(|c| c.order_id).collect();
    let orders = orders::store::terms(conn, &created_ids)
        .await?
        .into_iter()
        .filter_map(|(id, user_id, amount, currency)| {
            // A row the table's checks let through always parses; one that does not is
            // unknown terms, so its debit is refused rather than guessed.
            let terms = OrderTerms {
                user_id,
                amount: Amount::new(amount)?,
                currency: Currency::parse(&currency)?,
            };
            Some((id, terms))
        })
        .collect();
    let mut user_ids: Vec<i64> = created().map(|c| c.user_id).collect();
    user_ids.sort_unstable();
    user_ids.dedup();
    let refund_from: Vec<i64> = debits.values().map(|d| d.from).collect();
    let refund_to: Vec<i64> = debits.values().map(|d| d.to).collect();
    let users = store::lock_user_accounts(conn, &user_ids, &refund_from).await?;
    let mut currencies: Vec<String> = created().map(|c| c.currency.as_str().to_owned()).collect();
    currencies.sort_unstable();
    currencies.dedup();
    let system = store::lock_system_accounts(
        conn,
        AccountKind::Settlement,
        &currencies,
        shard,
        &refund_to,
    )
    .await?;
    let settlement = system
        .iter()
        .filter(|a| a.kind == AccountKind::Settlement && a.shard == shard)
        .filter_map(|a| Some((Currency::parse(&a.currency)?, a.id)))
        .collect();
    let user_accounts = users
        .iter()
        .filter_map(|a| Some(((a.user_id?, Currency::parse(&a.currency)?), a.id)))
        .collect();
    let users_with_accounts = users.iter().filter_map(|a| a.user_id).collect();
    Ok(Book {
        orders,
        postings: Postings::new(users.into_iter().chain(system)),
        debits,
        refunded,
        user_accounts,
        users_with_accounts,
        settlement,
    })
}

/// Debits and refunds already recorded for `order_ids`.
async fn existing_transfers(
    conn: &mut PgConnection,
    order_ids: &[i64],
) -> Result<(HashMap<i64, Debit>, HashSet<i64>), sqlx::Error> {
    let mut debits = HashMap::new();
    let mut refunded = HashSet::new();
    if order_ids.is_empty() {
        return Ok((debits, refunded));
    }
    let rows: Vec<(i64, String, i64, i64, i64, String)> = sqlx::query_as(
        r#"
        SELECT order_id, kind, from_account_id, to_account_id, amount_fen, currency
        FROM transfers WHERE order_id = ANY($1) AND kind IN ('DEBIT', 'REFUND')
        "#,
    )
    .bind(order_ids)
    .fetch_all(conn)
    .await?;
    for (order_id, kind, from, to, amount, currency) in rows {
        if kind == "REFUND" {
            refunded.insert(order_id);
            continue;
        }
        // Rows written by us always satisfy these; anything else is not a debit we can refund.
        if let (Some(amount), Some(currency)) = (Amount::new(amount), Currency::parse(&currency)) {
            debits.insert(
                order_id,
                Debit {
                    from,
                    to,
                    amount,
                    currency,
                },
            );
        }
    }
    Ok((debits, refunded))
}
