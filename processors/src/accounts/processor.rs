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
use crate::ledger::{Account, AccountKind, Postings};
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
        // The postings ride in the batch's closing statement.
        book.postings
            .write_into(conn, reserved, &mut applied.writes)
            .await?;
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

/// Loads and locks what a batch's events can touch, in one statement (`load`): what is
/// recorded for its orders (their terms, the debits and refunds already made, and ids
/// reserved for the transfers the batch may post) and the accounts, users first and system
/// accounts second, each in id order (so concurrent batches cannot deadlock).
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
    let mut user_ids: Vec<i64> = created().map(|c| c.user_id).collect();
    user_ids.sort_unstable();
    user_ids.dedup();
    let mut currencies: Vec<String> = created().map(|c| c.currency.as_str().to_owned()).collect();
    currencies.sort_unstable();
    currencies.dedup();
    let locks = store::Locks {
        users: &user_ids,
        ids: &[],
        system: AccountKind::Settlement,
        currencies: &currencies,
        shard,
    };
    let (recorded, mut accounts) = load(conn, &order_ids, &created_ids, &locks).await?;
    let Recorded {
        terms,
        debits,
        refunded,
        transfer_ids,
    } = recorded;
    // The first batch of a currency on a shard creates its settlement account, and locks
    // again (what it holds already, the accounts of the debits to refund among them).
    if !locks.has_system_accounts(&accounts) {
        let refund_accounts: Vec<i64> = debits.values().flat_map(|d| [d.from, d.to]).collect();
        let locks = store::Locks {
            ids: &refund_accounts,
            ..locks
        };
        accounts = store::lock_accounts(conn, &locks).await?;
    }
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
#[derive(Default)]
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

/// One row of `load`: a transfer ('T'), an order's terms ('O'), a reserved transfer id ('I')
/// or a locked account ('A'), side by side.
#[derive(sqlx::FromRow)]
struct Loaded {
    what: String,
    /// The order's id ('T', 'O'), the reserved id ('I') or the account's ('A').
    id: i64,
    /// The transfer's kind ('T') or the account's ('A').
    kind: Option<String>,
    from_id: Option<i64>,
    to_id: Option<i64>,
    /// The amount ('T', 'O') or the balance ('A').
    fen: i64,
    currency: String,
    user_id: Option<i64>,
    shard: Option<i32>,
    status: Option<String>,
    chain_head: Option<Vec<u8>>,
}

/// The debits and refunds recorded for `order_ids`, the terms of `created_ids`, a transfer
/// id for each of `order_ids`, and `locks`' accounts together with the accounts of those
/// debits (a refund moves money back between them), locked: one statement. Orders' terms
/// never change after they are created, so no lock is taken on them. The system accounts
/// missing are not created here (see `load_book`).
async fn load(
    conn: &mut PgConnection,
    order_ids: &[i64],
    created_ids: &[i64],
    locks: &store::Locks<'_>,
) -> Result<(Recorded, Vec<Account>), sqlx::Error> {
    let mut recorded = Recorded::default();
    if order_ids.is_empty() {
        return Ok((recorded, Vec::new()));
    }
    let debit_accounts =
        "ARRAY(SELECT unnest(ARRAY[from_account_id, to_account_id]) FROM t WHERE kind = 'DEBIT')";
    let lock = store::lock_sql("$4", debit_accounts, "$5", "$6", "$7");
    // The sequence is looked up once (as `ledger::Postings::write` does).
    let sql = format!(
        r#"
        WITH s AS MATERIALIZED (SELECT pg_get_serial_sequence('transfers', 'id')::regclass AS seq),
        t AS MATERIALIZED (
            SELECT order_id, kind, from_account_id, to_account_id, amount_fen, currency
            FROM transfers WHERE order_id = ANY($1) AND kind IN ('DEBIT', 'REFUND')
        ),
        a AS MATERIALIZED ({lock})
        SELECT 'T' AS what, order_id AS id, kind, from_account_id AS from_id, to_account_id AS to_id,
               amount_fen AS fen, currency::text AS currency, NULL::bigint AS user_id,
               NULL::int AS shard, NULL::text AS status, NULL::bytea AS chain_head
        FROM t
        UNION ALL
        SELECT 'O', id, NULL, NULL, NULL, amount_fen, currency::text, user_id, NULL, NULL, NULL
        FROM orders WHERE id = ANY($2)
        UNION ALL
        SELECT 'I', nextval(seq), NULL, NULL, NULL, 0, '', NULL, NULL, NULL, NULL
        FROM s, generate_series(1, $3)
        UNION ALL
        SELECT 'A', id, kind, NULL, NULL, balance_fen, currency::text, user_id, shard, status, chain_head
        FROM a
        "#
    );
    let rows: Vec<Loaded> = sqlx::query_as(&sql)
        .bind(order_ids)
        .bind(created_ids)
        .bind(order_ids.len() as i64)
        .bind(locks.users)
        .bind(locks.system_kind())
        .bind(locks.currencies)
        .bind(locks.shard)
        .fetch_all(&mut *conn)
        .await?;
    let mut accounts = Vec::new();
    for row in rows {
        // Rows the tables' checks let through always parse; one that does not is unknown
        // terms (its debit is refused rather than guessed) or not a debit we can refund.
        let (amount, currency) = (Amount::new(row.fen), Currency::parse(&row.currency));
        match (row.what.as_str(), row.kind.as_deref()) {
            ("I", _) => recorded.transfer_ids.push(row.id),
            ("O", _) => {
                if let (Some(user_id), Some(amount), Some(currency)) =
                    (row.user_id, amount, currency)
                {
                    let terms = OrderTerms {
                        user_id,
                        amount,
                        currency,
                    };
                    recorded.terms.insert(row.id, terms);
                }
            }
            ("T", Some("REFUND")) => {
                recorded.refunded.insert(row.id);
            }
            ("T", Some(_)) => {
                if let (Some(from), Some(to), Some(amount), Some(currency)) =
                    (row.from_id, row.to_id, amount, currency)
                {
                    let debit = Debit {
                        from,
                        to,
                        amount,
                        currency,
                    };
                    recorded.debits.insert(row.id, debit);
                }
            }
            ("A", _) => accounts.push(account(row)?),
            _ => {}
        }
    }
    recorded.transfer_ids.sort_unstable();
    Ok((recorded, accounts))
}

/// A locked account of `load`. Its columns are NOT NULL and checked, so one that does not
/// read is an error (the batch is retried and says why), not an account left out.
fn account(row: Loaded) -> Result<Account, sqlx::Error> {
    let id = row.id;
    let unreadable = || sqlx::Error::Decode(format!("account {id} does not read").into());
    let kind = row.kind.as_deref().and_then(AccountKind::parse);
    let kind = kind.ok_or_else(unreadable)?;
    let (Some(shard), Some(status), Some(chain_head)) = (row.shard, row.status, row.chain_head)
    else {
        return Err(unreadable());
    };
    Ok(Account::from((
        id,
        kind,
        row.user_id,
        row.currency,
        shard,
        status,
        row.fen,
        chain_head,
    )))
}
