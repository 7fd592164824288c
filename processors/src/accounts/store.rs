//! The `accounts` table's rows: which accounts exist, opened and locked here. Their
//! balances change only through the ledger (`ledger::Postings::write`).

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::domain::{Amount, Currency};
use crate::ledger::{Account, AccountKind, NewTransfer, PostError, Postings, TransferKind};

type AccountRow = (
    i64,
    AccountKind,
    Option<i64>,
    String,
    i32,
    String,
    i64,
    Vec<u8>,
);

impl From<AccountRow> for Account {
    fn from(
        (id, kind, user_id, currency, shard, status, balance_fen, chain_head): AccountRow,
    ) -> Self {
        Self {
            id,
            kind,
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

/// The accounts one transaction locks: the USER accounts of some users (all currencies),
/// accounts named by id, and the system accounts of one kind at one shard for some
/// currencies (those missing are created).
pub struct Locks<'a> {
    pub users: &'a [i64],
    pub ids: &'a [i64],
    /// `Settlement` or `Funding`; a user account is never created here.
    pub system: AccountKind,
    pub currencies: &'a [String],
    pub shard: i32,
}

impl Locks<'_> {
    /// Whether `rows` hold the system account of every currency asked for.
    pub fn has_system_accounts(&self, rows: &[Account]) -> bool {
        let kind = self.system_kind();
        self.currencies.iter().all(|currency| {
            rows.iter()
                .any(|a| a.kind == kind && a.shard == self.shard && &a.currency == currency)
        })
    }

    /// The kind of the system accounts locked (and created when missing).
    pub fn system_kind(&self) -> AccountKind {
        match self.system {
            AccountKind::Funding => AccountKind::Funding,
            AccountKind::User | AccountKind::Settlement => AccountKind::Settlement,
        }
    }
}

/// The select that locks and loads accounts: USER accounts of the users in `users`, accounts
/// whose id is in `ids`, and system accounts of kind `kind` at shard `shard` in `currencies`
/// (each argument an SQL expression: a placeholder, or a subquery for `ids`). USER accounts
/// first, then system accounts, each in id order, so that concurrent transactions cannot
/// deadlock on them (every transaction that locks accounts locks them this way).
pub(crate) fn lock_sql(
    users: &str,
    ids: &str,
    kind: &str,
    currencies: &str,
    shard: &str,
) -> String {
    // Each arm of the OR matches one index (the partial index of user accounts, the primary
    // key, the partial index of system accounts), whatever the plan's parameters.
    format!(
        "SELECT {ACCOUNT_COLUMNS} FROM accounts \
         WHERE (kind = 'USER' AND user_id = ANY({users})) OR id = ANY({ids}) \
            OR (kind <> 'USER' AND kind = {kind} AND currency = ANY({currencies}) AND shard = {shard}) \
         ORDER BY kind <> 'USER', id FOR UPDATE"
    )
}

/// Locks and loads `locks`' accounts in one statement (`lock_sql`); the system accounts
/// missing are created first.
pub async fn lock_accounts(
    conn: &mut PgConnection,
    locks: &Locks<'_>,
) -> Result<Vec<Account>, sqlx::Error> {
    let kind = locks.system_kind();
    let sql = lock_sql("$1", "$2", "$3", "$4", "$5");
    let select = || {
        sqlx::query_as::<_, AccountRow>(&sql)
            .bind(locks.users)
            .bind(locks.ids)
            .bind(kind)
            .bind(locks.currencies)
            .bind(locks.shard)
    };
    let mut rows: Vec<Account> = select()
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(Account::from)
        .collect();
    // Only the first transaction of a currency on a shard creates its account.
    if !locks.has_system_accounts(&rows) {
        sqlx::query(
            "INSERT INTO accounts (kind, currency, shard) SELECT $1, c, $3 FROM unnest($2::text[]) AS c \
             ON CONFLICT DO NOTHING",
        )
        .bind(kind)
        .bind(locks.currencies)
        .bind(locks.shard)
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

/// Opens the USER account of `user_id` in `currency`; `None` when it exists already (one per
/// user and currency).
pub async fn create_user_account(
    conn: &mut PgConnection,
    user_id: i64,
    currency: Currency,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO accounts (kind, user_id, currency) VALUES ('USER', $1, $2) \
         ON CONFLICT DO NOTHING RETURNING id",
    )
    .bind(user_id)
    .bind(currency.as_str())
    .fetch_optional(conn)
    .await
}

/// Opens the USER account of `user_id` in `currency`, or returns the existing one.
pub async fn open_account(
    conn: &mut PgConnection,
    user_id: i64,
    currency: Currency,
) -> Result<i64, sqlx::Error> {
    if let Some(id) = create_user_account(&mut *conn, user_id, currency).await? {
        return Ok(id);
    }
    sqlx::query_scalar(
        "SELECT id FROM accounts WHERE kind = 'USER' AND user_id = $1 AND currency = $2",
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
    // The funding account is the one of the user account's currency, known once it is read.
    let mut locks = Locks {
        users: &[],
        ids: &[account_id],
        system: AccountKind::Funding,
        currencies: &[],
        shard: 0,
    };
    let users = lock_accounts(conn, &locks).await?;
    // Only user accounts take deposits; a system account's id is no account here.
    let Some(user) = users.iter().find(|a| a.kind == AccountKind::User).cloned() else {
        return Ok(Err(PostError::UnknownAccount));
    };
    let Some(currency) = Currency::parse(&user.currency) else {
        return Ok(Err(PostError::UnknownAccount));
    };
    let currencies = [user.currency.clone()];
    locks = Locks {
        ids: &[],
        currencies: &currencies,
        ..locks
    };
    let funding = lock_accounts(conn, &locks).await?;
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
pub async fn first_user_without_account(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT GREATEST(COALESCE(max(user_id), 1000), 1000) + 1 FROM accounts WHERE kind = 'USER'",
    )
    .fetch_one(pool)
    .await
}
