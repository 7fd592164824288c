//! Reconciliation: set-based checks of the invariants of SPEC §6. Each query returns the
//! offending rows (capped), so a report can name them. The order check expects a quiet
//! system: a CANCELLED order whose compensating refund is still in flight shows up until the
//! refund lands.

use sqlx::PgPool;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub invariant: &'static str,
    pub detail: String,
}

const CHECKS: &[(&str, &str)] = &[
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
    ),
    (
        "no_negative_user_balance",
        "SELECT format('account %s: balance %s', id, balance_fen) FROM accounts \
         WHERE kind = 'USER' AND balance_fen < 0 LIMIT 100",
    ),
    (
        "money_is_conserved_per_currency",
        "SELECT format('%s: all balances sum to %s, expected 0', currency, sum(balance_fen)) \
         FROM accounts GROUP BY currency HAVING sum(balance_fen) <> 0",
    ),
    (
        "each_transfer_has_two_balanced_entries",
        r#"
        SELECT format('transfer %s: %s entries summing to %s', t.id, count(e.id), coalesce(sum(e.delta_fen), 0))
        FROM transfers t LEFT JOIN ledger_entries e ON e.transfer_id = t.id
        GROUP BY t.id HAVING count(e.id) <> 2 OR coalesce(sum(e.delta_fen), 0) <> 0
        LIMIT 100
        "#,
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
    ),
    (
        "order_state_matches_its_transfers",
        r#"
        SELECT format('order %s is %s with %s debit(s) and %s refund(s)', o.id, o.status, t.debits, t.refunds)
        FROM orders o
        CROSS JOIN LATERAL (
            SELECT count(*) FILTER (WHERE kind = 'DEBIT') AS debits,
                   count(*) FILTER (WHERE kind = 'REFUND') AS refunds
            FROM transfers WHERE order_id = o.id
        ) t
        WHERE CASE o.status
            WHEN 'PENDING'   THEN t.refunds <> 0
            -- A PAID order whose cancel was accepted may have its refund in flight.
            WHEN 'PAID'      THEN t.debits <> 1 OR (t.refunds <> 0 AND o.refund_requested_at IS NULL)
            WHEN 'REFUNDED'  THEN t.debits <> 1 OR t.refunds <> 1
            -- Never debited, or debited and given back (compensation).
            WHEN 'CANCELLED' THEN t.debits <> t.refunds
        END
        LIMIT 100
        "#,
    ),
];

pub async fn check(pool: &PgPool) -> Result<Vec<Violation>, sqlx::Error> {
    let mut violations = Vec::new();
    for (invariant, sql) in CHECKS {
        let rows: Vec<String> = sqlx::query_scalar(sql).fetch_all(pool).await?;
        violations.extend(rows.into_iter().map(|detail| Violation { invariant, detail }));
    }
    Ok(violations)
}
