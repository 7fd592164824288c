//! Reconciliation: set-based checks of the invariants of SPEC §6. Each query returns the
//! offending rows (capped), so a report can name them. The order check expects a quiet
//! system: a CANCELLED order whose compensating refund is still in flight shows up until the
//! refund lands.

use std::time::Duration;

use serde::Serialize;
use sqlx::PgPool;

use crate::settings::Settings;

mod offsets;

pub use offsets::check_offsets;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub invariant: &'static str,
    pub detail: String,
}

/// How long the system may take to settle before an unfinished state counts as a violation.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Orders and transfers younger than this are still moving through the saga.
    pub settle: Duration,
    /// A PENDING order older than this should have been paid or timed out.
    pub pending_timeout: Duration,
    /// An outbox row unpublished for longer than this means the relay is stuck.
    pub outbox_max_age: Duration,
}

impl Limits {
    /// For a system at rest (tests): nothing may be in flight.
    pub fn quiescent(settings: &Settings) -> Self {
        Self {
            settle: Duration::ZERO,
            pending_timeout: Duration::from_secs(settings.orders.payment_timeout_s),
            outbox_max_age: Duration::from_secs(settings.audit.outbox_max_age_s),
        }
    }

    /// For a running system: in-flight work gets `audit.settle_s` to finish.
    pub fn running(settings: &Settings) -> Self {
        let settle = Duration::from_secs(settings.audit.settle_s);
        Self {
            settle,
            pending_timeout: Duration::from_secs(settings.orders.payment_timeout_s) + settle,
            outbox_max_age: Duration::from_secs(settings.audit.outbox_max_age_s),
        }
    }
}

/// A check's SQL takes these as `$1`, `$2`, `$3` (seconds), in this order, if it uses them.
#[derive(Clone, Copy)]
enum Param {
    Settle,
    PendingTimeout,
    OutboxMaxAge,
}

const CHECKS: &[(&str, &str, &[Param])] = &[
    (
        "balance_equals_sum_of_entries",
        r#"
        SELECT format('account %s: balance %s, entries sum %s', a.id, a.balance_fen, coalesce(s.total, 0))
        FROM accounts a
        LEFT JOIN (SELECT account_id, sum(delta_fen) AS total FROM ledger_entries GROUP BY account_id) s
               ON s.account_id = a.id
        WHERE a.balance_fen <> coalesce(s.total, 0)
        LIMIT 100
        "#,
        &[],
    ),
    (
        "no_negative_user_balance",
        "SELECT format('account %s: balance %s', id, balance_fen) FROM accounts \
         WHERE kind = 'USER' AND balance_fen < 0 LIMIT 100",
        &[],
    ),
    (
        "money_is_conserved_per_currency",
        "SELECT format('%s: all balances sum to %s, expected 0', currency, sum(balance_fen)) \
         FROM accounts GROUP BY currency HAVING sum(balance_fen) <> 0",
        &[],
    ),
    (
        "each_transfer_has_two_balanced_entries",
        r#"
        SELECT format('transfer %s: %s entries summing to %s', t.id, count(e.id), coalesce(sum(e.delta_fen), 0))
        FROM transfers t LEFT JOIN ledger_entries e ON e.transfer_id = t.id
        GROUP BY t.id HAVING count(e.id) <> 2 OR coalesce(sum(e.delta_fen), 0) <> 0
        LIMIT 100
        "#,
        &[],
    ),
    (
        // The database checks these on every insert (migration 0011); this finds what was
        // written with its triggers disabled.
        "ledger_references_exist",
        r#"
        SELECT format('transfer %s: account %s does not exist', t.id, x.account_id)
        FROM transfers t CROSS JOIN LATERAL (VALUES (t.from_account_id), (t.to_account_id)) x(account_id)
        WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.id = x.account_id)
        UNION ALL
        SELECT format('ledger entry %s: transfer %s or account %s does not exist', e.id, e.transfer_id, e.account_id)
        FROM ledger_entries e
        WHERE NOT EXISTS (SELECT 1 FROM transfers t WHERE t.id = e.transfer_id)
           OR NOT EXISTS (SELECT 1 FROM accounts a WHERE a.id = e.account_id)
        LIMIT 100
        "#,
        &[],
    ),
    (
        "ledger_hash_chains_are_intact",
        r#"
        WITH chained AS (
            SELECT e.id, e.account_id, e.entry_hash,
                   sha256(coalesce(lag(e.entry_hash) OVER (PARTITION BY e.account_id ORDER BY e.id),
                                   decode(repeat('00', 32), 'hex'))
                          || int8send(e.account_id) || int8send(e.transfer_id)
                          || int8send(e.delta_fen) || int8send(e.balance_after_fen)) AS expected,
                   row_number() OVER (PARTITION BY e.account_id ORDER BY e.id DESC) AS from_end
            FROM ledger_entries e
        )
        (SELECT format('account %s: entry %s does not match its hash chain', account_id, id)
         FROM chained WHERE entry_hash <> expected ORDER BY id LIMIT 100)
        UNION ALL
        (SELECT format('account %s: chain head does not match its latest entry', a.id)
         FROM accounts a LEFT JOIN chained c ON c.account_id = a.id AND c.from_end = 1
         WHERE a.chain_head <> coalesce(c.entry_hash, decode(repeat('00', 32), 'hex'))
         LIMIT 100)
        "#,
        &[],
    ),
    (
        "refund_only_after_debit",
        r#"
        SELECT format('order %s: refunded without a debit', r.order_id)
        FROM transfers r
        WHERE r.kind = 'REFUND'
          AND NOT EXISTS (SELECT 1 FROM transfers d WHERE d.kind = 'DEBIT' AND d.order_id = r.order_id)
        LIMIT 100
        "#,
        &[],
    ),
    (
        "money_moves_only_for_its_order",
        r#"
        SELECT format('%s of order %s: %s', lower(t.kind), t.order_id,
                      CASE WHEN o.id IS NULL THEN 'no such order'
                           ELSE format('the order is user %s, %s %s; the transfer is user %s, %s %s',
                                       o.user_id, o.amount_fen, o.currency,
                                       coalesce(u.user_id::text, 'none'), t.amount_fen, t.currency)
                      END)
        FROM transfers t
        JOIN accounts u
          ON u.id = CASE t.kind WHEN 'DEBIT' THEN t.from_account_id ELSE t.to_account_id END
        LEFT JOIN orders o ON o.id = t.order_id
        WHERE t.kind IN ('DEBIT', 'REFUND')
          AND (o.id IS NULL OR u.user_id IS DISTINCT FROM o.user_id
               OR t.amount_fen <> o.amount_fen OR t.currency <> o.currency)
        ORDER BY t.id
        LIMIT 100
        "#,
        &[],
    ),
    (
        "order_state_matches_its_transfers",
        r#"
        SELECT format('order %s is %s with %s debit(s) and %s refund(s)', o.id, o.status, t.debits, t.refunds)
        FROM orders o
        CROSS JOIN LATERAL (
            SELECT count(*) FILTER (WHERE kind = 'DEBIT') AS debits,
                   count(*) FILTER (WHERE kind = 'REFUND') AS refunds,
                   max(created_at) AS last_at
            FROM transfers WHERE order_id = o.id
        ) t
        WHERE o.updated_at < now() - make_interval(secs => $1)
          AND (t.last_at IS NULL OR t.last_at < now() - make_interval(secs => $1))
          AND CASE o.status
            WHEN 'PENDING'   THEN t.refunds <> 0
            -- A PAID order whose cancel was accepted may have its refund in flight.
            WHEN 'PAID'      THEN t.debits <> 1 OR (t.refunds <> 0 AND o.refund_requested_at IS NULL)
            WHEN 'REFUNDED'  THEN t.debits <> 1 OR t.refunds <> 1
            -- Never debited, or debited and given back (compensation).
            WHEN 'CANCELLED' THEN t.debits <> t.refunds
        END
        LIMIT 100
        "#,
        &[Param::Settle],
    ),
    (
        "no_order_stuck_pending",
        r#"
        SELECT format('order %s has been PENDING since %s', id, created_at)
        FROM orders
        WHERE status = 'PENDING' AND created_at < now() - make_interval(secs => $1)
        ORDER BY created_at
        LIMIT 100
        "#,
        &[Param::PendingTimeout],
    ),
    (
        "outbox_is_published_in_time",
        r#"
        SELECT format('%s outbox row(s) unpublished for more than %s s, oldest id %s', count(*), $1, min(id))
        FROM outbox
        WHERE discarded_at IS NULL AND parked_at IS NULL
          AND created_at < now() - make_interval(secs => $1)
        HAVING count(*) > 0
        "#,
        &[Param::OutboxMaxAge],
    ),
    (
        "no_outbox_row_is_parked",
        r#"
        SELECT format('outbox row %s to %s parked since %s: %s (see `paystream outbox parked`)',
                      id, topic, parked_at, park_reason)
        FROM outbox
        WHERE parked_at IS NOT NULL AND discarded_at IS NULL
        ORDER BY id
        LIMIT 100
        "#,
        &[],
    ),
];

/// How many checks `check` runs.
pub const CHECK_COUNT: usize = CHECKS.len();

pub async fn check(pool: &PgPool, limits: &Limits) -> Result<Vec<Violation>, sqlx::Error> {
    // The audit reads whole tables: a legitimate long reader, so it lifts the connection's
    // statement timeout (`database.statement_timeout_ms`) for its own transaction.
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL statement_timeout = 0")
        .execute(&mut *tx)
        .await?;
    let mut violations = Vec::new();
    for (invariant, sql, params) in CHECKS {
        let mut query = sqlx::query_scalar(sql);
        for param in *params {
            let value = match param {
                Param::Settle => limits.settle,
                Param::PendingTimeout => limits.pending_timeout,
                Param::OutboxMaxAge => limits.outbox_max_age,
            };
            query = query.bind(value.as_secs_f64());
        }
        let rows: Vec<String> = query.fetch_all(&mut *tx).await?;
        violations.extend(
            rows.into_iter()
                .map(|detail| Violation { invariant, detail }),
        );
    }
    tx.commit().await?;
    Ok(violations)
}

/// Runs the audit every `audit.interval_s` (0: never) until `cancel` fires, and exports the
/// result (`paystream_audit_violations`, `paystream_audit_last_run_timestamp_seconds`).
pub async fn run_periodically(
    settings: Settings,
    pool: PgPool,
    cancel: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    if settings.audit.interval_s == 0 {
        return Ok(());
    }
    let limits = Limits::running(&settings);
    let mut every = tokio::time::interval(Duration::from_secs(settings.audit.interval_s));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = every.tick() => {}
        }
        match check(&pool, &limits).await {
            Ok(violations) => {
                crate::telemetry::METRICS
                    .audit_violations
                    .set(violations.len() as i64);
                crate::telemetry::METRICS
                    .audit_last_run
                    .set(chrono::Utc::now().timestamp() as f64);
                for v in &violations {
                    tracing::error!(invariant = v.invariant, detail = %v.detail, "audit violation");
                }
            }
            Err(e) => tracing::warn!(error = %e, "periodic audit failed; will run again"),
        }
        if let Err(e) = count_orders(&pool).await {
            tracing::warn!(error = %e, "counting orders by status failed; will run again");
        }
    }
}

/// Sets `paystream_orders{status}`.
pub async fn count_orders(pool: &PgPool) -> Result<(), sqlx::Error> {
    let counts: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM orders GROUP BY status")
            .fetch_all(pool)
            .await?;
    for status in crate::orders::OrderStatus::ALL {
        let n = counts
            .iter()
            .find(|(s, _)| s == status.as_str())
            .map_or(0, |(_, n)| *n);
        crate::telemetry::METRICS
            .orders_by_status
            .with_label_values(&[status.as_str()])
            .set(n);
    }
    Ok(())
}
