//! `paystream process account`: consumes `order.events` and moves money.
//!
//! Delivery semantics: exactly-once effects per event (see `consumer`). Per batch from one
//! partition, in one transaction: `OrderCreated` moves `amountFen` from the user's account to
//! the settlement account of this partition's shard, or records why not
//! (`AccountDebitFailed`); `OrderCancelled` with `refundRequired` moves it back, at most once
//! and only after a debit (`AccountRefunded`). The database backs the rules: one debit and
//! one refund per order (unique index), user balances never negative (check constraint).
//!
//! Hot rows: every debit credits a settlement account. Settlement is sharded per currency
//! (`settlement_shards`), a batch uses the shard of its partition, and it locks that row once
//! per batch and updates it once — so partitions processed in parallel never queue on one
//! row, and the per-row lock cost is paid per batch, not per debit.

use std::collections::{HashMap, HashSet};

use chrono::Utc;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::consumer::{self, Applied, Fresh, Handler, Outcome, WorkerConfig};
use crate::domain::{Amount, Currency};
use crate::events::{
    derived_event_id, AccountDebitFailed, AccountDebited, AccountRefunded, DebitFailure, Envelope,
    OrderEvent, Poison, PoisonClass, RawEvent,
};
use crate::ledger::{self, AccountKind, NewTransfer, PostError, Postings, TransferKind};
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

/// A debit already recorded for an order.
#[derive(Debug, Clone, Copy)]
struct Debit {
    from: i64,
    to: i64,
    amount: Amount,
    currency: Currency,
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
    ) -> Result<Applied, sqlx::Error> {
        if events.is_empty() {
            return Ok(Applied::default());
        }
        let shard = partition.rem_euclid(self.settlement_shards);

        // What exists already for these orders.
        let order_ids: Vec<i64> = events
            .iter()
            .filter_map(|f| match &f.event {
                OrderEvent::Created(c) => Some(c.order_id),
                OrderEvent::Cancelled(c) if c.refund_required => Some(c.order_id),
                _ => None,
            })
            .collect();
        let (mut debits, mut refunded) = existing_transfers(conn, &order_ids).await?;

        // Lock what this batch can touch: users first, then system accounts, each in id order.
        let mut user_ids: Vec<i64> = events
            .iter()
            .filter_map(|f| match &f.event {
                OrderEvent::Created(c) => Some(c.user_id),
                _ => None,
            })
            .collect();
        user_ids.sort_unstable();
        user_ids.dedup();
        let refund_from: Vec<i64> = debits.values().map(|d| d.from).collect();
        let refund_to: Vec<i64> = debits.values().map(|d| d.to).collect();
        let users = ledger::lock_user_accounts(conn, &user_ids, &refund_from).await?;
        let mut currencies: Vec<String> = events
            .iter()
            .filter_map(|f| match &f.event {
                OrderEvent::Created(c) => Some(c.currency.as_str().to_owned()),
                _ => None,
            })
            .collect();
        currencies.sort_unstable();
        currencies.dedup();
        let system = ledger::lock_system_accounts(
            conn,
            AccountKind::Settlement,
            &currencies,
            shard,
            &refund_to,
        )
        .await?;
        let settlement: HashMap<String, i64> = system
            .iter()
            .filter(|a| a.kind == AccountKind::Settlement && a.shard == shard)
            .map(|a| (a.currency.clone(), a.id))
            .collect();
        let user_accounts: HashMap<(i64, String), i64> = users
            .iter()
            .filter_map(|a| Some(((a.user_id?, a.currency.clone()), a.id)))
            .collect();
        let users_with_accounts: HashSet<i64> = users.iter().filter_map(|a| a.user_id).collect();
        let mut postings = Postings::new(users.into_iter().chain(system));

        let now = Utc::now();
        let mut emitted = Vec::new();
        let mut outcomes = Vec::with_capacity(events.len());
        for fresh in events {
            let outcome = match &fresh.event {
                OrderEvent::Created(order) => {
                    if debits.contains_key(&order.order_id) {
                        tracing::warn!(order_id = order.order_id, event_id = %fresh.event_id, "order already debited; treating OrderCreated as a duplicate");
                        outcomes.push(Outcome::Duplicate);
                        continue;
                    }
                    let currency = order.currency.as_str().to_owned();
                    let failure = |reason| {
                        let payload = AccountDebitFailed {
                            user_id: order.user_id,
                            order_id: order.order_id,
                            reason,
                            amount_fen: order.amount_fen,
                            currency: order.currency,
                        };
                        let id = derived_event_id(fresh.event_id, "AccountDebitFailed");
                        OutboxRow::event(
                            &self.account_events_topic,
                            order.user_id,
                            &Envelope::new(id, now, payload),
                        )
                    };
                    let Some(&from) = user_accounts.get(&(order.user_id, currency.clone())) else {
                        let reason = if users_with_accounts.contains(&order.user_id) {
                            DebitFailure::CurrencyMismatch
                        } else {
                            DebitFailure::AccountNotFound
                        };
                        emitted.push(failure(reason));
                        outcomes.push(Outcome::BusinessFailure);
                        continue;
                    };
                    if postings.account(from).is_some_and(|a| a.frozen) {
                        emitted.push(failure(DebitFailure::AccountFrozen));
                        outcomes.push(Outcome::BusinessFailure);
                        continue;
                    }
                    let Some(&to) = settlement.get(&currency) else {
                        // lock_system_accounts creates it; missing means a concurrent oddity.
                        return Err(sqlx::Error::RowNotFound);
                    };
                    let transfer = NewTransfer {
                        kind: TransferKind::Debit,
                        order_id: Some(order.order_id),
                        from,
                        to,
                        amount: order.amount_fen,
                        currency: order.currency,
                        cause_event_id: Some(fresh.event_id),
                        reference: None,
                    };
                    match postings.post(transfer) {
                        Ok(posted) => {
                            debits.insert(
                                order.order_id,
                                Debit {
                                    from,
                                    to,
                                    amount: order.amount_fen,
                                    currency: order.currency,
                                },
                            );
                            let payload = AccountDebited {
                                account_id: from,
                                user_id: order.user_id,
                                order_id: order.order_id,
                                delta_fen: -order.amount_fen.fen(),
                                balance_after_fen: posted.from_balance_after,
                                currency: order.currency,
                            };
                            let id = derived_event_id(fresh.event_id, "AccountDebited");
                            emitted.push(OutboxRow::event(
                                &self.account_events_topic,
                                order.user_id,
                                &Envelope::new(id, now, payload),
                            ));
                            Outcome::Applied
                        }
                        Err(PostError::InsufficientBalance) => {
                            emitted.push(failure(DebitFailure::InsufficientBalance));
                            Outcome::BusinessFailure
                        }
                        Err(e @ (PostError::Overflow | PostError::UnknownAccount)) => {
                            Outcome::DeadLettered(Poison::new(
                                PoisonClass::BalanceOverflow,
                                format!(
                                    "debit of order {} cannot be posted: {e:?}",
                                    order.order_id
                                ),
                            ))
                        }
                    }
                }
                OrderEvent::Cancelled(cancel) if cancel.refund_required => {
                    let Some(debit) = debits.get(&cancel.order_id).copied() else {
                        tracing::info!(order_id = cancel.order_id, "refund requested for an order that was never debited; nothing to refund");
                        outcomes.push(Outcome::Ignored);
                        continue;
                    };
                    if refunded.contains(&cancel.order_id) {
                        outcomes.push(Outcome::Duplicate);
                        continue;
                    }
                    let transfer = NewTransfer {
                        kind: TransferKind::Refund,
                        order_id: Some(cancel.order_id),
                        from: debit.to,
                        to: debit.from,
                        amount: debit.amount,
                        currency: debit.currency,
                        cause_event_id: Some(fresh.event_id),
                        reference: Some(cancel.reason.clone()),
                    };
                    match postings.post(transfer) {
                        Ok(posted) => {
                            refunded.insert(cancel.order_id);
                            let user_id = postings
                                .account(debit.from)
                                .and_then(|a| a.user_id)
                                .unwrap_or(cancel.user_id);
                            let payload = AccountRefunded {
                                account_id: debit.from,
                                user_id,
                                order_id: cancel.order_id,
                                delta_fen: debit.amount.fen(),
                                balance_after_fen: posted.to_balance_after,
                                currency: debit.currency,
                            };
                            let id = derived_event_id(fresh.event_id, "AccountRefunded");
                            emitted.push(OutboxRow::event(
                                &self.account_events_topic,
                                user_id,
                                &Envelope::new(id, now, payload),
                            ));
                            Outcome::Applied
                        }
                        Err(e) => Outcome::DeadLettered(Poison::new(
                            PoisonClass::BalanceOverflow,
                            format!(
                                "refund of order {} cannot be posted: {e:?}",
                                cancel.order_id
                            ),
                        )),
                    }
                }
                OrderEvent::Cancelled(_) | OrderEvent::Paid(_) => Outcome::Ignored,
            };
            outcomes.push(outcome);
        }

        postings.write(conn).await?;
        Ok(Applied { outcomes, emitted })
    }
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
