//! The double-entry ledger. Money only moves as a transfer between two accounts, recorded as
//! one `transfers` row and two `ledger_entries` rows (each with the balance after it), and
//! the accounts' balances change in the same transaction. Postings are computed in memory
//! over rows the caller has locked, then written by three set-based writes that run as one
//! statement, on their own or inside a caller's (a batch's closing statement).
//!
//! `write` and `write_into` (in `write.rs`) are the only code that writes `transfers` and
//! `ledger_entries`, and the balances and chain heads of `accounts`; which rows exist is
//! `accounts::store`'s.

mod write;

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::domain::{Amount, Currency};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountKind {
    User,
    Settlement,
    Funding,
}

impl AccountKind {
    pub const ALL: [AccountKind; 3] = [Self::User, Self::Settlement, Self::Funding];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "USER",
            Self::Settlement => "SETTLEMENT",
            Self::Funding => "FUNDING",
        }
    }

    pub fn parse(kind: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == kind)
    }
}

// Stored as the TEXT of `as_str`; the column's CHECK lists the same three.
crate::db::text_column!(AccountKind);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferKind {
    Debit,
    Refund,
    Deposit,
}

impl TransferKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Debit => "DEBIT",
            Self::Refund => "REFUND",
            Self::Deposit => "DEPOSIT",
        }
    }
}

/// An account row, locked `FOR UPDATE` by whoever loaded it.
#[derive(Debug, Clone)]
pub struct Account {
    pub id: i64,
    pub kind: AccountKind,
    pub user_id: Option<i64>,
    pub currency: String,
    /// Which of the system accounts of its kind and currency (0 for user accounts).
    pub shard: i32,
    pub frozen: bool,
    pub balance_fen: i64,
    /// Hash of the account's latest ledger entry (see `chain_hash`).
    pub chain_head: [u8; 32],
}

/// The hash of a ledger entry, chained to the previous entry of its account. The same
/// formula is in `migrations/0003_ledger_hash_chain.sql` and in the audit's SQL.
pub fn chain_hash(
    previous: &[u8; 32],
    account_id: i64,
    transfer_id: i64,
    delta_fen: i64,
    balance_after_fen: i64,
) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(previous);
    for field in [account_id, transfer_id, delta_fen, balance_after_fen] {
        hasher.update(field.to_be_bytes());
    }
    hasher.finalize().into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostError {
    /// A user account would go below zero.
    InsufficientBalance,
    /// A balance would leave the i64 range.
    Overflow,
    /// An account of the transfer was not loaded (and locked) by the caller.
    UnknownAccount,
}

/// A transfer to record.
#[derive(Debug, Clone)]
pub struct NewTransfer {
    pub kind: TransferKind,
    pub order_id: Option<i64>,
    pub from: i64,
    pub to: i64,
    pub amount: Amount,
    pub currency: Currency,
    pub cause_event_id: Option<Uuid>,
    pub reference: Option<String>,
}

/// Balances after a posted transfer.
#[derive(Debug, Clone, Copy)]
pub struct Posted {
    pub from_balance_after: i64,
    pub to_balance_after: i64,
}

/// Transfers posted in memory against locked accounts, written by `write`.
#[derive(Debug, Default)]
pub struct Postings {
    accounts: HashMap<i64, Account>,
    transfers: Vec<NewTransfer>,
    /// (from balance after, to balance after) per transfer.
    balances_after: Vec<(i64, i64)>,
}

impl Postings {
    pub fn new(accounts: impl IntoIterator<Item = Account>) -> Self {
        Self {
            accounts: accounts.into_iter().map(|a| (a.id, a)).collect(),
            ..Self::default()
        }
    }

    pub fn account(&self, id: i64) -> Option<&Account> {
        self.accounts.get(&id)
    }

    /// Moves money if both accounts are loaded and the rules allow it; on error nothing
    /// changes.
    pub fn post(&mut self, transfer: NewTransfer) -> Result<Posted, PostError> {
        let amount = transfer.amount.fen();
        let (Some(from), Some(to)) = (
            self.accounts.get(&transfer.from),
            self.accounts.get(&transfer.to),
        ) else {
            return Err(PostError::UnknownAccount);
        };
        let from_after = from
            .balance_fen
            .checked_sub(amount)
            .ok_or(PostError::Overflow)?;
        let to_after = to
            .balance_fen
            .checked_add(amount)
            .ok_or(PostError::Overflow)?;
        if from.kind == AccountKind::User && from_after < 0 {
            return Err(PostError::InsufficientBalance);
        }
        for (id, after) in [(transfer.from, from_after), (transfer.to, to_after)] {
            if let Some(account) = self.accounts.get_mut(&id) {
                account.balance_fen = after;
            }
        }
        self.transfers.push(transfer);
        self.balances_after.push((from_after, to_after));
        Ok(Posted {
            from_balance_after: from_after,
            to_balance_after: to_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(id: i64, kind: AccountKind, balance_fen: i64) -> Account {
        Account {
            id,
            kind,
            user_id: None,
            currency: "CNY".into(),
            shard: 0,
            frozen: false,
            balance_fen,
            chain_head: [0; 32],
        }
    }

    #[test]
    fn the_chain_hash_depends_on_every_field_and_on_the_previous_hash() {
        let base = chain_hash(&[0; 32], 1, 2, -3, 4);
        assert_eq!(base, chain_hash(&[0; 32], 1, 2, -3, 4));
        for other in [
            chain_hash(&[1; 32], 1, 2, -3, 4),
            chain_hash(&[0; 32], 9, 2, -3, 4),
            chain_hash(&[0; 32], 1, 9, -3, 4),
            chain_hash(&[0; 32], 1, 2, 3, 4),
            chain_hash(&[0; 32], 1, 2, -3, 5),
        ] {
            assert_ne!(base, other);
        }
    }

    fn transfer(from: i64, to: i64, fen: i64) -> NewTransfer {
        NewTransfer {
            kind: TransferKind::Debit,
            order_id: Some(1),
            from,
            to,
            amount: Amount::new(fen).expect("positive"),
            currency: Currency::CNY,
            cause_event_id: None,
            reference: None,
        }
    }

    #[test]
    fn a_user_account_never_goes_negative_and_a_refused_post_changes_nothing() {
        let mut p = Postings::new([
            account(1, AccountKind::User, 500),
            account(2, AccountKind::Settlement, 0),
        ]);
        for _ in 0..50 {
            assert!(p.post(transfer(1, 2, 10)).is_ok());
        }
        assert_eq!(
            p.post(transfer(1, 2, 10)).err(),
            Some(PostError::InsufficientBalance)
        );
        assert_eq!(p.account(1).map(|a| a.balance_fen), Some(0));
        assert_eq!(p.account(2).map(|a| a.balance_fen), Some(500));
    }

    #[test]
    fn overflow_is_refused_and_system_accounts_may_go_negative() {
        let mut p = Postings::new([
            account(1, AccountKind::Funding, 0),
            account(2, AccountKind::User, i64::MAX - 5),
        ]);
        assert_eq!(p.post(transfer(1, 2, 6)).err(), Some(PostError::Overflow));
        let posted = p.post(transfer(1, 2, 5)).expect("fits");
        assert_eq!(
            (posted.from_balance_after, posted.to_balance_after),
            (-5, i64::MAX)
        );
    }
}
