//! The double-entry ledger. Money only moves as a transfer between two accounts, recorded as
//! one `transfers` row and two `ledger_entries` rows (each with the balance after it), and
//! the accounts' balances change in the same transaction. Postings are computed in memory
//! over rows the caller has locked, then written in a few set-based statements.

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::{Amount, Currency};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountKind {
    User,
    Settlement,
    Funding,
}

impl AccountKind {
    fn parse(kind: &str) -> Self {
        match kind {
            "SETTLEMENT" => Self::Settlement,
            "FUNDING" => Self::Funding,
            _ => Self::User,
        }
    }
}

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

type AccountRow = (i64, String, Option<i64>, String, i32, String, i64, Vec<u8>);

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

impl From<AccountRow> for Account {
    fn from(
        (id, kind, user_id, currency, shard, status, balance_fen, chain_head): AccountRow,
    ) -> Self {
        Self {
            id,
            kind: AccountKind::parse(&kind),
            user_id,
            currency,
            shard,
            frozen: status == "FROZEN",
            balance_fen,
            // The column is 32 bytes by construction; a wrong length breaks the chain, which
            // the audit reports.
            chain_head: chain_head.try_into().unwrap_or([0; 32]),
        }
    }
}

const ACCOUNT_COLUMNS: &str = "id, kind, user_id, currency, shard, status, balance_fen, chain_head";

/// Locks and loads the USER accounts of `user_ids` (all currencies) and those with `ids`, in
/// id order so that concurrent transactions cannot deadlock on them.
pub async fn lock_user_accounts(
    conn: &mut PgConnection,
    user_ids: &[i64],
    ids: &[i64],
) -> Result<Vec<Account>, sqlx::Error> {
    let sql = format!(
        "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE kind = 'USER' AND (user_id = ANY($1) OR id = ANY($2)) \
         ORDER BY id FOR UPDATE"
    );
    let rows: Vec<AccountRow> = sqlx::query_as(&sql)
        .bind(user_ids)
        .bind(ids)
        .fetch_all(conn)
        .await?;
    Ok(rows.into_iter().map(Account::from).collect())
}

/// Locks and loads the system accounts of `kind` for `currencies` at `shard` (creating the
/// missing ones first) together with the system accounts `ids`, in id order. Call after
/// locking user accounts: users first, system accounts second, everywhere.
pub async fn lock_system_accounts(
    conn: &mut PgConnection,
    kind: AccountKind,
    currencies: &[String],
    shard: i32,
    ids: &[i64],
) -> Result<Vec<Account>, sqlx::Error> {
    let (kind, kind_name) = match kind {
        AccountKind::Funding => (AccountKind::Funding, "FUNDING"),
        _ => (AccountKind::Settlement, "SETTLEMENT"),
    };
    let sql = format!(
        "SELECT {ACCOUNT_COLUMNS} FROM accounts \
         WHERE (kind = $1 AND shard = $3 AND currency = ANY($2)) OR (kind <> 'USER' AND id = ANY($4)) \
         ORDER BY id FOR UPDATE"
    );
    let select = || {
        sqlx::query_as::<_, AccountRow>(&sql)
            .bind(kind_name)
            .bind(currencies)
            .bind(shard)
            .bind(ids)
    };
    let mut rows: Vec<Account> = select()
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(Account::from)
        .collect();
    let present = |rows: &[Account], currency: &String| {
        rows.iter()
            .any(|a| a.kind == kind && a.shard == shard && &a.currency == currency)
    };
    // Only the first batch of a currency on a shard creates its account.
    if currencies.iter().any(|c| !present(&rows, c)) {
        sqlx::query(
            "INSERT INTO accounts (kind, currency, shard) SELECT $1, c, $3 FROM unnest($2::text[]) AS c \
             ON CONFLICT DO NOTHING",
        )
        .bind(kind_name)
        .bind(currencies)
        .bind(shard)
        .execute(&mut *conn)
        .await?;
        rows = select()
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .map(Account::from)
            .collect();
    }
    Ok(rows)
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

    /// Writes transfers, entries (hash-chained per account) and new balances and chain heads:
    /// two statements, whatever the count.
    pub async fn write(mut self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        if self.transfers.is_empty() {
            return Ok(());
        }
        let n = self.transfers.len();
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT nextval(pg_get_serial_sequence('transfers', 'id')) FROM generate_series(1, $1)",
        )
        .bind(n as i64)
        .fetch_all(&mut *conn)
        .await?;

        let mut kinds = Vec::with_capacity(n);
        let mut order_ids = Vec::with_capacity(n);
        let mut froms = Vec::with_capacity(n);
        let mut tos = Vec::with_capacity(n);
        let mut amounts = Vec::with_capacity(n);
        let mut currencies = Vec::with_capacity(n);
        let mut causes = Vec::with_capacity(n);
        let mut references = Vec::with_capacity(n);
        let mut e_transfer = Vec::with_capacity(2 * n);
        let mut e_account = Vec::with_capacity(2 * n);
        let mut e_delta = Vec::with_capacity(2 * n);
        let mut e_after = Vec::with_capacity(2 * n);
        let mut e_hash: Vec<Vec<u8>> = Vec::with_capacity(2 * n);
        for ((t, id), (from_after, to_after)) in
            self.transfers.iter().zip(&ids).zip(&self.balances_after)
        {
            for (account_id, delta, after) in [
                (t.from, -t.amount.fen(), *from_after),
                (t.to, t.amount.fen(), *to_after),
            ] {
                // `post` only accepts transfers between loaded accounts.
                let hash = match self.accounts.get_mut(&account_id) {
                    Some(account) => {
                        account.chain_head =
                            chain_hash(&account.chain_head, account_id, *id, delta, after);
                        account.chain_head
                    }
                    None => chain_hash(&[0; 32], account_id, *id, delta, after),
                };
                e_hash.push(hash.to_vec());
            }
            kinds.push(t.kind.as_str());
            order_ids.push(t.order_id);
            froms.push(t.from);
            tos.push(t.to);
            amounts.push(t.amount.fen());
            currencies.push(t.currency.as_str().to_owned());
            causes.push(t.cause_event_id);
            references.push(t.reference.clone());
            e_transfer.extend([*id, *id]);
            e_account.extend([t.from, t.to]);
            e_delta.extend([-t.amount.fen(), t.amount.fen()]);
            e_after.extend([*from_after, *to_after]);
        }
        let mut seen = std::collections::HashSet::new();
        let touched: Vec<i64> = self
            .transfers
            .iter()
            .flat_map(|t| [t.from, t.to])
            .filter(|id| seen.insert(*id))
            .collect();
        let balances: Vec<i64> = touched
            .iter()
            .map(|id| self.accounts.get(id).map_or(0, |a| a.balance_fen))
            .collect();
        let heads: Vec<Vec<u8>> = touched
            .iter()
            .map(|id| {
                self.accounts
                    .get(id)
                    .map_or_else(Vec::new, |a| a.chain_head.to_vec())
            })
            .collect();
        // One statement: the foreign keys of the entries are checked at its end, when the
        // transfers are there.
        sqlx::query(
            r#"
            WITH t AS (
                INSERT INTO transfers
                    (id, kind, order_id, from_account_id, to_account_id, amount_fen, currency,
                     cause_event_id, reference)
                SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[],
                                     $6::bigint[], $7::text[], $8::uuid[], $9::text[])
            ), e AS (
                INSERT INTO ledger_entries (transfer_id, account_id, delta_fen, balance_after_fen, entry_hash)
                SELECT transfer_id, account_id, delta_fen, balance_after_fen, entry_hash
                FROM unnest($10::bigint[], $11::bigint[], $12::bigint[], $13::bigint[], $14::bytea[])
                    WITH ORDINALITY AS e(transfer_id, account_id, delta_fen, balance_after_fen, entry_hash, n)
                -- Entry ids must follow the chain order within each account.
                ORDER BY n
            )
            UPDATE accounts
            SET balance_fen = v.balance, chain_head = v.head, version = version + 1, updated_at = now()
            FROM unnest($15::bigint[], $16::bigint[], $17::bytea[]) AS v(id, balance, head)
            WHERE accounts.id = v.id
            "#,
        )
        .bind(&ids)
        .bind(&kinds)
        .bind(&order_ids)
        .bind(&froms)
        .bind(&tos)
        .bind(&amounts)
        .bind(&currencies)
        .bind(&causes)
        .bind(&references)
        .bind(&e_transfer)
        .bind(&e_account)
        .bind(&e_delta)
        .bind(&e_after)
        .bind(&e_hash)
        .bind(&touched)
        .bind(&balances)
        .bind(&heads)
        .execute(conn)
        .await?;
        Ok(())
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

/// Opens the USER account of `user_id` in `currency`, or returns the existing one.
pub async fn open_account(
    conn: &mut PgConnection,
    user_id: i64,
    currency: Currency,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        r#"
        WITH inserted AS (
            INSERT INTO accounts (kind, user_id, currency) VALUES ('USER', $1, $2)
            ON CONFLICT DO NOTHING RETURNING id
        )
        SELECT id FROM inserted
        UNION ALL
        SELECT id FROM accounts WHERE kind = 'USER' AND user_id = $1 AND currency = $2
        LIMIT 1
        "#,
    )
    .bind(user_id)
    .bind(currency.as_str())
    .fetch_one(conn)
    .await
}

/// A deposit that was posted.
#[derive(Debug, Clone, Copy)]
pub struct Deposited {
    pub account_id: i64,
    pub user_id: i64,
    pub balance_after_fen: i64,
}

/// Moves `amount` from the external funding account into a user account (the only way money
/// enters paystream), and queues `AccountCredited` in the outbox, in the caller's
/// transaction.
pub async fn deposit(
    conn: &mut PgConnection,
    account_id: i64,
    amount: Amount,
    reference: &str,
    account_events_topic: &str,
) -> Result<Result<Deposited, PostError>, sqlx::Error> {
    let users = lock_user_accounts(conn, &[], &[account_id]).await?;
    let Some(user) = users.first().cloned() else {
        return Ok(Err(PostError::UnknownAccount));
    };
    let Some(currency) = Currency::parse(&user.currency) else {
        return Ok(Err(PostError::UnknownAccount));
    };
    let funding = lock_system_accounts(
        conn,
        AccountKind::Funding,
        std::slice::from_ref(&user.currency),
        0,
        &[],
    )
    .await?;
    let Some(funding_id) = funding.first().map(|a| a.id) else {
        return Err(sqlx::Error::RowNotFound);
    };
    let mut postings = Postings::new(users.into_iter().chain(funding));
    let posted = match postings.post(NewTransfer {
        kind: TransferKind::Deposit,
        order_id: None,
        from: funding_id,
        to: account_id,
        amount,
        currency,
        cause_event_id: None,
        reference: Some(reference.to_owned()),
    }) {
        Ok(posted) => posted,
        Err(e) => return Ok(Err(e)),
    };
    postings.write(conn).await?;
    let user_id = user.user_id.unwrap_or_default();
    let payload = crate::events::AccountCredited {
        account_id,
        user_id,
        delta_fen: amount.fen(),
        balance_after_fen: posted.to_balance_after,
        currency,
        reference: reference.to_owned(),
    };
    let envelope = crate::events::Envelope::new(Uuid::new_v4(), chrono::Utc::now(), payload);
    crate::outbox::insert(
        conn,
        &[crate::outbox::OutboxRow::event(
            account_events_topic,
            user_id,
            &envelope,
        )],
    )
    .await?;
    Ok(Ok(Deposited {
        account_id,
        user_id,
        balance_after_fen: posted.to_balance_after,
    }))
}

/// A user id above every user that has an account (and above 1000): for a demonstration
/// session that opens an account and can be run again on the same database.
pub async fn first_user_without_account(pool: &sqlx::PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT GREATEST(COALESCE(max(user_id), 1000), 1000) + 1 FROM accounts WHERE kind = 'USER'",
    )
    .fetch_one(pool)
    .await
}
