//! The rules that move money for an order, as pure functions of the locked accounts and the
//! event: no SQL here. The account processor loads a `Book` for a batch (`processor`), asks
//! these rules for each event in order, turns their decisions into events, and writes the
//! postings once.
//!
//! - A debit (`OrderCreated`) moves `amountFen` from the user's account in the order's
//!   currency to this batch's settlement account, at most once per order. It fails, as a
//!   business outcome, when the user has no account at all (`ACCOUNT_NOT_FOUND`), none in that
//!   currency (`CURRENCY_MISMATCH`), the account is frozen (`ACCOUNT_FROZEN`), or the balance
//!   would go below zero (`INSUFFICIENT_BALANCE`). Each debit sees the balance left by the one
//!   before it in the batch.
//!   Money moves only for an order that exists with the event's user, amount and currency
//!   (`ORDER_NOT_FOUND`, `ORDER_MISMATCH` otherwise): an event on `order.events` is a claim,
//!   the order row is the fact.
//! - A refund (`OrderCancelled` with `refundRequired`) moves the debited amount back, only
//!   after a debit and at most once.
//! - A transfer the ledger cannot post (a balance leaving the i64 range) is poison.

use std::collections::{HashMap, HashSet};

use uuid::Uuid;

use crate::domain::{Amount, Currency};
use crate::events::{DebitFailure, OrderCancelled, OrderCreated};
use crate::ledger::{NewTransfer, PostError, Postings, TransferKind};

/// A debit recorded for an order (before this batch, or in it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Debit {
    pub from: i64,
    pub to: i64,
    pub amount: Amount,
    pub currency: Currency,
}

/// What an order owes: the terms the API recorded when it took the order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderTerms {
    pub user_id: i64,
    pub amount: Amount,
    pub currency: Currency,
}

impl OrderTerms {
    pub fn of(order: &OrderCreated) -> Self {
        Self {
            user_id: order.user_id,
            amount: order.amount_fen,
            currency: order.currency,
        }
    }
}

/// What a batch knows of the accounts and orders it touches: rows it has locked, in memory.
#[derive(Debug, Default)]
pub struct Book {
    /// The recorded terms of each order the batch's debits name (absent: no such order).
    pub orders: HashMap<i64, OrderTerms>,
    pub postings: Postings,
    /// The debit of each order, recorded or made in this batch.
    pub debits: HashMap<i64, Debit>,
    /// Orders already refunded.
    pub refunded: HashSet<i64>,
    /// The user account of each (user, currency).
    pub user_accounts: HashMap<(i64, Currency), i64>,
    /// Users with an account in any currency.
    pub users_with_accounts: HashSet<i64>,
    /// This batch's settlement account of each currency.
    pub settlement: HashMap<Currency, i64>,
}

/// What a debit for an order came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DebitDecision {
    /// Money moved: the user's account and its balance after.
    Debited { account_id: i64, balance_after: i64 },
    /// A business "no", announced as `AccountDebitFailed`.
    Failed(DebitFailure),
    /// The order was debited before.
    Duplicate,
    /// The ledger cannot post it (a balance would overflow): poison.
    Unpostable(String),
    /// The batch holds no settlement account for the currency: the caller's loading broke
    /// its contract; nothing moved.
    NoSettlementAccount,
}

/// What a refund for an order came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundDecision {
    /// Money moved back: the user's account, its owner and its balance after.
    Refunded {
        account_id: i64,
        user_id: i64,
        debit: Debit,
        balance_after: i64,
    },
    /// The order was never debited: there is nothing to give back.
    NeverDebited,
    /// The order was refunded before.
    Duplicate,
    /// The ledger cannot post it: poison.
    Unpostable(String),
}

impl Book {
    /// The debit an `OrderCreated` asks for; `cause` is the event's id.
    pub fn debit(&mut self, order: &OrderCreated, cause: Uuid) -> DebitDecision {
        if self.debits.contains_key(&order.order_id) {
            return DebitDecision::Duplicate;
        }
        match self.orders.get(&order.order_id) {
            None => return DebitDecision::Failed(DebitFailure::OrderNotFound),
            Some(&terms) if terms != OrderTerms::of(order) => {
                return DebitDecision::Failed(DebitFailure::OrderMismatch)
            }
            Some(_) => {}
        }
        let Some(&from) = self.user_accounts.get(&(order.user_id, order.currency)) else {
            return DebitDecision::Failed(if self.users_with_accounts.contains(&order.user_id) {
                DebitFailure::CurrencyMismatch
            } else {
                DebitFailure::AccountNotFound
            });
        };
        if self.postings.account(from).is_some_and(|a| a.frozen) {
            return DebitDecision::Failed(DebitFailure::AccountFrozen);
        }
        let Some(&to) = self.settlement.get(&order.currency) else {
            return DebitDecision::NoSettlementAccount;
        };
        let debit = Debit {
            from,
            to,
            amount: order.amount_fen,
            currency: order.currency,
        };
        match self
            .postings
            .post(transfer(TransferKind::Debit, order.order_id, debit, cause))
        {
            Ok(posted) => {
                self.debits.insert(order.order_id, debit);
                DebitDecision::Debited {
                    account_id: from,
                    balance_after: posted.from_balance_after,
                }
            }
            Err(PostError::InsufficientBalance) => {
                DebitDecision::Failed(DebitFailure::InsufficientBalance)
            }
            Err(e @ (PostError::Overflow | PostError::UnknownAccount)) => {
                DebitDecision::Unpostable(format!(
                    "debit of order {} cannot be posted: {e:?}",
                    order.order_id
                ))
            }
        }
    }

    /// The refund an `OrderCancelled` with `refundRequired` asks for; `cause` is its id.
    pub fn refund(&mut self, cancel: &OrderCancelled, cause: Uuid) -> RefundDecision {
        let Some(debit) = self.debits.get(&cancel.order_id).copied() else {
            return RefundDecision::NeverDebited;
        };
        if self.refunded.contains(&cancel.order_id) {
            return RefundDecision::Duplicate;
        }
        let back = Debit {
            from: debit.to,
            to: debit.from,
            ..debit
        };
        let mut refund = transfer(TransferKind::Refund, cancel.order_id, back, cause);
        refund.reference = Some(cancel.reason.clone());
        match self.postings.post(refund) {
            Ok(posted) => {
                self.refunded.insert(cancel.order_id);
                let user_id = self
                    .postings
                    .account(debit.from)
                    .and_then(|a| a.user_id)
                    .unwrap_or(cancel.user_id);
                RefundDecision::Refunded {
                    account_id: debit.from,
                    user_id,
                    debit,
                    balance_after: posted.to_balance_after,
                }
            }
            Err(e) => RefundDecision::Unpostable(format!(
                "refund of order {} cannot be posted: {e:?}",
                cancel.order_id
            )),
        }
    }
}

fn transfer(kind: TransferKind, order_id: i64, debit: Debit, cause: Uuid) -> NewTransfer {
    NewTransfer {
        kind,
        order_id: Some(order_id),
        from: debit.from,
        to: debit.to,
        amount: debit.amount,
        currency: debit.currency,
        cause_event_id: Some(cause),
        reference: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Account, AccountKind};

    const ALICE: i64 = 1;
    const BOB: i64 = 2;
    const CAROL: i64 = 3;
    const SETTLEMENT: i64 = 100;

    fn cny() -> Currency {
        Currency::parse("CNY").expect("CNY")
    }

    fn usd() -> Currency {
        Currency::parse("USD").expect("USD")
    }

    fn account(id: i64, user_id: Option<i64>, balance_fen: i64, frozen: bool) -> Account {
        Account {
            id,
            kind: if user_id.is_some() {
                AccountKind::User
            } else {
                AccountKind::Settlement
            },
            user_id,
            currency: "CNY".into(),
            shard: 0,
            frozen,
            balance_fen,
            chain_head: [0; 32],
        }
    }

    /// Alice (account 11) holds 1,000 fen, Bob (12) is frozen with 1,000, Carol (13) has only
    /// a USD account; the settlement account is near the top of the i64 range.
    fn book(settlement_balance: i64) -> Book {
        let accounts = [
            account(11, Some(ALICE), 1_000, false),
            account(12, Some(BOB), 1_000, true),
            account(13, Some(CAROL), 1_000, false),
            account(SETTLEMENT, None, settlement_balance, false),
        ];
        Book {
            postings: Postings::new(accounts),
            user_accounts: HashMap::from([
                ((ALICE, cny()), 11),
                ((BOB, cny()), 12),
                ((CAROL, usd()), 13),
            ]),
            users_with_accounts: HashSet::from([ALICE, BOB, CAROL]),
            settlement: HashMap::from([(cny(), SETTLEMENT)]),
            ..Book::default()
        }
    }

    impl Book {
        /// Records `order` as the API would have, so its debit may move money.
        fn knows(&mut self, order: &OrderCreated) {
            self.orders.insert(order.order_id, OrderTerms::of(order));
        }
    }

    fn order(order_id: i64, user_id: i64, fen: i64, currency: Currency) -> OrderCreated {
        OrderCreated {
            order_id,
            order_no: format!("NO-{order_id}"),
            user_id,
            amount_fen: Amount::new(fen).expect("positive"),
            currency,
            items: Vec::new(),
            idempotency_key: format!("key-{order_id}"),
        }
    }

    #[test]
    fn a_debit_moves_money_or_says_why_not() {
        use DebitDecision::*;
        let near_max = i64::MAX - 10;
        // (order, user, amount, currency, settlement balance, decision)
        let cases = [
            (
                1,
                ALICE,
                400,
                cny(),
                0,
                Debited {
                    account_id: 11,
                    balance_after: 600,
                },
            ),
            (
                2,
                ALICE,
                1_000,
                cny(),
                0,
                Debited {
                    account_id: 11,
                    balance_after: 0,
                },
            ),
            (
                3,
                ALICE,
                1_001,
                cny(),
                0,
                Failed(DebitFailure::InsufficientBalance),
            ),
            (4, BOB, 1, cny(), 0, Failed(DebitFailure::AccountFrozen)),
            (
                5,
                CAROL,
                1,
                cny(),
                0,
                Failed(DebitFailure::CurrencyMismatch),
            ),
            (6, 99, 1, cny(), 0, Failed(DebitFailure::AccountNotFound)),
            (7, CAROL, 1, usd(), 0, NoSettlementAccount),
            (
                8,
                ALICE,
                100,
                cny(),
                near_max,
                Unpostable("debit of order 8 cannot be posted: Overflow".into()),
            ),
        ];
        for (order_id, user, fen, currency, settlement_balance, expected) in cases {
            let mut book = book(settlement_balance);
            let order = order(order_id, user, fen, currency);
            book.knows(&order);
            let decision = book.debit(&order, Uuid::nil());
            assert_eq!(decision, expected, "order {order_id}");
            let debited = matches!(decision, Debited { .. });
            assert_eq!(
                book.debits.contains_key(&order_id),
                debited,
                "order {order_id}"
            );
        }
    }

    #[test]
    fn no_money_moves_for_an_order_that_does_not_exist_or_differs_from_the_event() {
        let recorded = order(1, ALICE, 400, cny());
        // (what the event claims, decision)
        let cases = [
            (order(2, ALICE, 400, cny()), DebitFailure::OrderNotFound),
            (order(1, BOB, 400, cny()), DebitFailure::OrderMismatch),
            (order(1, ALICE, 401, cny()), DebitFailure::OrderMismatch),
            (order(1, ALICE, 400, usd()), DebitFailure::OrderMismatch),
        ];
        for (claim, failure) in cases {
            let mut book = book(0);
            book.knows(&recorded);
            assert_eq!(
                book.debit(&claim, Uuid::nil()),
                DebitDecision::Failed(failure),
                "{claim:?}"
            );
            assert!(book.debits.is_empty());
            assert_eq!(
                book.postings.account(11).map(|a| a.balance_fen),
                Some(1_000)
            );
        }
    }

    #[test]
    fn debits_of_one_user_in_a_batch_each_see_the_balance_left_by_the_one_before() {
        let mut book = book(0);
        let decisions: Vec<DebitDecision> = [(1, 300), (2, 500), (3, 300), (4, 200)]
            .into_iter()
            .map(|(id, fen)| {
                let order = order(id, ALICE, fen, cny());
                book.knows(&order);
                book.debit(&order, Uuid::nil())
            })
            .collect();
        assert_eq!(
            decisions,
            [
                DebitDecision::Debited {
                    account_id: 11,
                    balance_after: 700
                },
                DebitDecision::Debited {
                    account_id: 11,
                    balance_after: 200
                },
                DebitDecision::Failed(DebitFailure::InsufficientBalance),
                DebitDecision::Debited {
                    account_id: 11,
                    balance_after: 0
                },
            ]
        );
    }

    #[test]
    fn an_order_is_debited_once_and_refunded_once_and_only_after_its_debit() {
        let mut book = book(0);
        let cancel = OrderCancelled {
            order_id: 1,
            user_id: ALICE,
            reason: "PAYMENT_TIMEOUT".into(),
            refund_required: true,
        };
        assert_eq!(
            book.refund(&cancel, Uuid::nil()),
            RefundDecision::NeverDebited
        );
        let created = order(1, ALICE, 400, cny());
        book.knows(&created);
        assert!(matches!(
            book.debit(&created, Uuid::nil()),
            DebitDecision::Debited { .. }
        ));
        assert_eq!(book.debit(&created, Uuid::nil()), DebitDecision::Duplicate);
        let debit = Debit {
            from: 11,
            to: SETTLEMENT,
            amount: created.amount_fen,
            currency: cny(),
        };
        assert_eq!(
            book.refund(&cancel, Uuid::nil()),
            RefundDecision::Refunded {
                account_id: 11,
                user_id: ALICE,
                debit,
                balance_after: 1_000
            }
        );
        assert_eq!(book.refund(&cancel, Uuid::nil()), RefundDecision::Duplicate);
        assert_eq!(
            book.postings.account(SETTLEMENT).map(|a| a.balance_fen),
            Some(0)
        );
    }
}
