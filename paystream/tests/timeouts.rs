//! Every wait on PostgreSQL is bounded: each connection starts with the configured statement,
//! lock and idle-in-transaction timeouts and TCP keepalives, so a frozen or vanished worker's
//! locks are released by the server instead of held until someone notices.

mod common;

use common::{TestEnv, DEADLINE};
use paystream_processors::accounts::store;
use paystream_processors::db::{self, classify, ErrorClass};
use paystream_processors::domain::Currency;

async fn setting(pool: &sqlx::PgPool, name: &str) -> String {
    sqlx::query_scalar("SELECT setting FROM pg_settings WHERE name = $1")
        .bind(name)
        .fetch_one(pool)
        .await
        .expect("setting")
}

/// An account of `user`, and a transaction on `pool` that holds its row locked.
async fn locked_account(
    env: &TestEnv,
    pool: &sqlx::PgPool,
    user: i64,
) -> (i64, sqlx::Transaction<'static, sqlx::Postgres>) {
    let mut conn = env.pool.acquire().await.expect("connection");
    let account = store::open_account(&mut conn, user, Currency::CNY)
        .await
        .expect("account");
    drop(conn);
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("SELECT id FROM accounts WHERE id = $1 FOR UPDATE")
        .bind(account)
        .execute(&mut *tx)
        .await
        .expect("lock the row");
    (account, tx)
}

/// Updates `account` on `pool`, failing the test rather than waiting past the deadline.
async fn update_account(pool: &sqlx::PgPool, account: i64) -> Result<u64, sqlx::Error> {
    let update = sqlx::query("UPDATE accounts SET updated_at = now() WHERE id = $1")
        .bind(account)
        .execute(pool);
    tokio::time::timeout(DEADLINE, update)
        .await
        .expect("the update is not left waiting")
        .map(|done| done.rows_affected())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_starts_with_the_configured_limits() {
    let env = TestEnv::new(1).await;
    let mut settings = env.settings.database.clone();
    settings.statement_timeout_ms = 45_000;
    settings.lock_timeout_ms = 7_000;
    settings.idle_in_transaction_timeout_ms = 50_000;
    settings.tcp_keepalive_idle_s = 11;
    settings.tcp_keepalive_interval_s = 4;
    settings.tcp_keepalive_count = 2;
    let pool = db::connect(&settings).expect("pool");
    for (name, expected) in [
        ("statement_timeout", "45000"),
        ("lock_timeout", "7000"),
        ("idle_in_transaction_session_timeout", "50000"),
        ("tcp_keepalives_idle", "11"),
        ("tcp_keepalives_interval", "4"),
        ("tcp_keepalives_count", "2"),
    ] {
        assert_eq!(setting(&pool, name).await, expected, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_left_idle_in_a_transaction_loses_its_locks_to_the_next_one() {
    let env = TestEnv::new(1).await;
    // A worker that froze inside its transaction, holding an account row.
    let mut frozen_settings = env.settings.database.clone();
    frozen_settings.idle_in_transaction_timeout_ms = 1_000;
    let frozen_pool = db::connect(&frozen_settings).expect("pool");
    let (account, mut frozen) = locked_account(&env, &frozen_pool, 7).await;

    // Its successor gets the row once the server has ended the frozen session (without the
    // timeout it would wait for the lock forever, or until its own lock_timeout).
    let mut successor_settings = env.settings.database.clone();
    successor_settings.lock_timeout_ms = 30_000;
    let successor = db::connect(&successor_settings).expect("pool");
    let updated = update_account(&successor, account).await;
    assert_eq!(updated.expect("the successor takes the row"), 1);

    // The frozen worker finds its session gone when it wakes, and retries as transient.
    let error = sqlx::query("SELECT 1")
        .execute(&mut *frozen)
        .await
        .expect_err("the frozen session was ended");
    assert_eq!(classify(&error), ErrorClass::Transient, "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_wait_longer_than_the_lock_timeout_fails_as_transient_instead_of_waiting_on() {
    let env = TestEnv::new(1).await;
    let (account, holder) = locked_account(&env, &env.pool, 8).await;
    let mut waiter_settings = env.settings.database.clone();
    waiter_settings.lock_timeout_ms = 300;
    let waiter = db::connect(&waiter_settings).expect("pool");
    let error = update_account(&waiter, account)
        .await
        .expect_err("the wait ends at the lock timeout");
    assert_eq!(classify(&error), ErrorClass::Transient, "{error:?}");
    holder.rollback().await.expect("rollback");
}
