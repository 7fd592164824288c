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
        let (mut book, reserved) = load_book(conn, events, shard).await?;
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
        book.postings.write_reserved(conn, reserved).await?;
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

/// Loads and locks what a batch's events can touch, in two statements: what is recorded for
/// its orders (their terms, the debits and refunds already made, and ids reserved for the
/// transfers the batch may post), then the accounts, users first and system accounts second,
/// each in id order (so concurrent batches cannot deadlock).
async fn load_book(
    conn: &mut PgConnection,
    events: &[Fresh<OrderEvent>],
    shard: i32,
) -> Result<(Book, Vec<i64>), sqlx::Error> {
    let created = || {
        events.iter().filter_map(|f| match &f.event {
            OrderEvent::Created(c) => Some(c),
            _ => None,
        })
    };
    let order_ids: Vec<i64> = events
        .iter()
        .filter_map(|f| match &f.event {
            OrderEvent::Created(c) => Some(c.order_id),
            OrderEvent::Cancelled(c) if c.refund_required => Some(c.order_id),
            _ => None,
        })
        .collect();
    let created_ids: Vec<i64> = created().map(|c| c.order_id).collect();
    let Recorded {
        terms,
        debits,
        refunded,
        transfer_ids,
    } = recorded(conn, &order_ids, &created_ids).await?;
    let mut user_ids: Vec<i64> = created().map(|c| c.user_id).collect();
    user_ids.sort_unstable();
    user_ids.dedup();
    // A refund moves money back between the accounts of the debit.
    let refund_accounts: Vec<i64> = debits.values().flat_map(|d| [d.from, d.to]).collect();
    let mut currencies: Vec<String> = created().map(|c| c.currency.as_str().to_owned()).collect();
    currencies.sort_unstable();
    currencies.dedup();
    let locks = store::Locks {
        users: &user_ids,
        ids: &refund_accounts,
        system: AccountKind::Settlement,
        currencies: &currencies,
        shard,
    };
    let accounts = store::lock_accounts(conn, &locks).await?;
    let settlement = accounts
        .iter()
        .filter(|a| a.kind == AccountKind::Settlement && a.shard == shard)
        .filter_map(|a| Some((Currency::parse(&a.currency)?, a.id)))
        .collect();
    let users = accounts.iter().filter(|a| a.kind == AccountKind::User);
    let user_accounts = users
        .clone()
        .filter_map(|a| Some(((a.user_id?, Currency::parse(&a.currency)?), a.id)))
        .collect();
    let users_with_accounts = users.filter_map(|a| a.user_id).collect();
    let book = Book {
        orders: terms,
        postings: Postings::new(accounts),
        debits,
        refunded,
        user_accounts,
        users_with_accounts,
        settlement,
    };
    Ok((book, transfer_ids))
}

/// What is recorded for a batch's orders.
struct Recorded {
    /// The terms of the orders that exist, of those the batch's `OrderCreated` name.
    terms: HashMap<i64, OrderTerms>,
    /// The debits already made for the batch's orders.
    debits: HashMap<i64, Debit>,
    /// The batch's orders already refunded.
    refunded: HashSet<i64>,
    /// Ids taken from the transfers' sequence, in order, one per order: each event posts at
    /// most one transfer. Those not used are a gap in the ids, as a rollback leaves.
    transfer_ids: Vec<i64>,
}

/// The debits and refunds recorded for `order_ids`, the terms of `created_ids`, and a
/// transfer id for each of `order_ids`, in one statement. Orders' terms never change after they are created, so no lock is taken.
async fn recorded(
    conn: &mut PgConnection,
    order_ids: &[i64],
    created_ids: &[i64],
) -> Result<Recorded, sqlx::Error> {
    let mut recorded = Recorded {
        terms: HashMap::new(),
        debits: HashMap::new(),
        refunded: HashSet::new(),
        transfer_ids: Vec::new(),
    };
    if order_ids.is_empty() {
        return Ok(recorded);
    }
    // (what, order id, kind, from, to, amount, currency, user id): transfers ('T'), orders
    // ('O') and the reserved transfer ids ('I', in the order id's place) side by side. The
    // sequence is looked up once (as `ledger::Postings::write` does).
    type Row = (
        String,
        i64,
        Option<String>,
        Option<i64>,
        Option<i64>,
        i64,
        String,
        Option<i64>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        r#"
        WITH s AS MATERIALIZED (SELECT pg_get_serial_sequence('transfers', 'id')::regclass AS seq)
        SELECT 'T', order_id, kind, from_account_id, to_account_id, amount_fen, currency::text, NULL::bigint
        FROM transfers WHERE order_id = ANY($1) AND kind IN ('DEBIT', 'REFUND')
        UNION ALL
        SELECT 'O', id, NULL, NULL, NULL, amount_fen, currency::text, user_id
        FROM orders WHERE id = ANY($2)
        UNION ALL
        SELECT 'I', nextval(seq), NULL, NULL, NULL, 0, '', NULL FROM s, generate_series(1, $3)
        "#,
    )
    .bind(order_ids)
    .bind(created_ids)
    .bind(order_ids.len() as i64)
    .fetch_all(conn)
    .await?;
    for (what, order_id, kind, from, to, amount, currency, user_id) in rows {
        // Rows the tables' checks let through always parse; one that does not is unknown
        // terms (its debit is refused rather than guessed) or not a debit we can refund.
        let (amount, currency) = (Amount::new(amount), Currency::parse(&currency));
        match (what.as_str(), kind.as_deref(), from, to, user_id) {
            ("I", ..) => recorded.transfer_ids.push(order_id),
            ("O", _, _, _, Some(user_id)) => {
                if let (Some(amount), Some(currency)) = (amount, currency) {
                    let terms = OrderTerms {
                        user_id,
                        amount,
                        currency,
                    };
                    recorded.terms.insert(order_id, terms);
                }
            }
            ("T", Some("REFUND"), _, _, _) => {
                recorded.refunded.insert(order_id);
            }
            ("T", Some(_), Some(from), Some(to), _) => {
                if let (Some(amount), Some(currency)) = (amount, currency) {
                    let debit = Debit {
                        from,
                        to,
                        amount,
                        currency,
                    };
                    recorded.debits.insert(order_id, debit);
                }
            }
            _ => {}
        }
    }
    recorded.transfer_ids.sort_unstable();
    Ok(recorded)
}
