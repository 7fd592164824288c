//! Writing posted transfers: the transfers, their entries (hash-chained per account) and the
//! accounts' new balances and chain heads, as three data-modifying statements that run as one
//! (`db::Writes`), on their own or in the statement of a caller's.

use std::collections::HashSet;

use sqlx::PgConnection;
use uuid::Uuid;

use super::{chain_hash, Postings};
use crate::db::Writes;

/// The `transfers` rows of a write, as column arrays for `unnest`.
#[derive(Default)]
struct Transfers {
    ids: Vec<i64>,
    kinds: Vec<&'static str>,
    order_ids: Vec<Option<i64>>,
    froms: Vec<i64>,
    tos: Vec<i64>,
    amounts: Vec<i64>,
    currencies: Vec<String>,
    causes: Vec<Option<Uuid>>,
    references: Vec<Option<String>>,
}

/// The `ledger_entries` rows of a write, two per transfer, in chain order.
#[derive(Default)]
struct Entries {
    transfer_ids: Vec<i64>,
    account_ids: Vec<i64>,
    deltas: Vec<i64>,
    balances_after: Vec<i64>,
    hashes: Vec<Vec<u8>>,
}

/// The new balance and chain head of every account a write touched.
struct Balances {
    ids: Vec<i64>,
    balances: Vec<i64>,
    heads: Vec<Vec<u8>>,
}

/// `count` ids from the transfers' id sequence, in order. The sequence is looked up once (a
/// catalog function in the select list would run for every id: 2.7 us each against 0.35).
const NEXT_TRANSFER_IDS: &str =
    "WITH s AS MATERIALIZED (SELECT pg_get_serial_sequence('transfers', 'id')::regclass AS seq) \
     SELECT nextval(seq) FROM s, generate_series(1, $1)";

async fn next_transfer_ids(conn: &mut PgConnection, count: usize) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar(NEXT_TRANSFER_IDS)
        .bind(count as i64)
        .fetch_all(conn)
        .await
}

impl Postings {
    /// Writes transfers, entries (hash-chained per account) and new balances and chain heads:
    /// one statement, whatever the count (two when ids must be taken first).
    pub async fn write(self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        let mut writes = Writes::default();
        self.write_into(&mut *conn, Vec::new(), &mut writes).await?;
        writes.execute(conn).await
    }

    /// Adds the writes of `write` to `writes`, which the caller runs later in the same
    /// transaction, taking the transfers' ids from `reserved` (taken from the transfers' id
    /// sequence, in order, by an earlier statement of the caller's) while they last; only when
    /// they are not enough does it ask the sequence for more.
    pub async fn write_into(
        mut self,
        conn: &mut PgConnection,
        reserved: Vec<i64>,
        writes: &mut Writes,
    ) -> Result<(), sqlx::Error> {
        if self.transfers.is_empty() {
            return Ok(());
        }
        let mut ids = reserved;
        let missing = self.transfers.len().saturating_sub(ids.len());
        if missing > 0 {
            ids.extend(next_transfer_ids(conn, missing).await?);
        }
        ids.truncate(self.transfers.len());
        let (transfers, entries) = self.rows(ids);
        let balances = self.balances();
        // The entries' references (migration 0011's statement-level checks) are checked at the
        // end of the statement that carries them, when the transfers are there.
        writes.push(|p| {
            Ok(format!(
                "INSERT INTO transfers \
                     (id, kind, order_id, from_account_id, to_account_id, amount_fen, currency, \
                      cause_event_id, reference) \
                 SELECT * FROM unnest({}::bigint[], {}::text[], {}::bigint[], {}::bigint[], \
                                      {}::bigint[], {}::bigint[], {}::text[], {}::uuid[], {}::text[])",
                p.push(&transfers.ids)?,
                p.push(&transfers.kinds)?,
                p.push(&transfers.order_ids)?,
                p.push(&transfers.froms)?,
                p.push(&transfers.tos)?,
                p.push(&transfers.amounts)?,
                p.push(&transfers.currencies)?,
                p.push(&transfers.causes)?,
                p.push(&transfers.references)?,
            ))
        })?;
        // Entry ids must follow the chain order within each account.
        writes.push(|p| {
            Ok(format!(
                "INSERT INTO ledger_entries \
                     (transfer_id, account_id, delta_fen, balance_after_fen, entry_hash) \
                 SELECT transfer_id, account_id, delta_fen, balance_after_fen, entry_hash \
                 FROM unnest({}::bigint[], {}::bigint[], {}::bigint[], {}::bigint[], {}::bytea[]) \
                     WITH ORDINALITY AS e(transfer_id, account_id, delta_fen, balance_after_fen, entry_hash, n) \
                 ORDER BY n",
                p.push(&entries.transfer_ids)?,
                p.push(&entries.account_ids)?,
                p.push(&entries.deltas)?,
                p.push(&entries.balances_after)?,
                p.push(&entries.hashes)?,
            ))
        })?;
        writes.push(|p| {
            Ok(format!(
                "UPDATE accounts \
                 SET balance_fen = v.balance, chain_head = v.head, version = version + 1, updated_at = now() \
                 FROM unnest({}::bigint[], {}::bigint[], {}::bytea[]) AS v(id, balance, head) \
                 WHERE accounts.id = v.id",
                p.push(&balances.ids)?,
                p.push(&balances.balances)?,
                p.push(&balances.heads)?,
            ))
        })
    }

    /// The rows of the posted transfers with these ids, advancing each account's chain head
    /// over its entries.
    fn rows(&mut self, ids: Vec<i64>) -> (Transfers, Entries) {
        let mut transfers = Transfers::default();
        let mut entries = Entries::default();
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
                entries.transfer_ids.push(*id);
                entries.account_ids.push(account_id);
                entries.deltas.push(delta);
                entries.balances_after.push(after);
                entries.hashes.push(hash.to_vec());
            }
            transfers.kinds.push(t.kind.as_str());
            transfers.order_ids.push(t.order_id);
            transfers.froms.push(t.from);
            transfers.tos.push(t.to);
            transfers.amounts.push(t.amount.fen());
            transfers.currencies.push(t.currency.as_str().to_owned());
            transfers.causes.push(t.cause_event_id);
            transfers.references.push(t.reference.clone());
        }
        transfers.ids = ids;
        (transfers, entries)
    }

    /// Every account the transfers touched, once, with its balance and chain head now.
    fn balances(&self) -> Balances {
        let mut seen = HashSet::new();
        let ids: Vec<i64> = self
            .transfers
            .iter()
            .flat_map(|t| [t.from, t.to])
            .filter(|id| seen.insert(*id))
            .collect();
        let account = |id: &i64| self.accounts.get(id);
        Balances {
            balances: ids
                .iter()
                .map(|id| account(id).map_or(0, |a| a.balance_fen))
                .collect(),
            heads: ids
                .iter()
                .map(|id| account(id).map_or_else(Vec::new, |a| a.chain_head.to_vec()))
                .collect(),
            ids,
        }
    }
}
