//! `paystream relay`: publishes outbox rows to Kafka.
//!
//! Delivery semantics: at-least-once on the wire, exactly-once in effect (every row carries
//! an event id that consumers dedupe on). What makes that hold:
//!
//! - A row is marked published only after the broker acknowledged it (`acks=all`, idempotent
//!   producer). A relay killed in between re-publishes it: a harmless duplicate. For the same
//!   reason the marks commit without waiting for the WAL flush.
//! - The relay never remembers a high-water id. Each round takes the *unpublished* rows in id
//!   order, so a row whose transaction commits after rows with larger ids (ids are taken
//!   before commit) is simply found in a later round instead of being skipped.
//! - Per-key order: rows that share an account were inserted while holding that account's
//!   row lock, so their id order is their commit order. Each round runs in one transaction
//!   holding a transaction-scoped advisory lock, so two relays never publish concurrently and
//!   cannot interleave a key; if a relay dies its lock dies with its connection.
//! - It wakes on `LISTEN paystream_outbox` (a trigger notifies on insert), polling only as a
//!   fallback, and prunes published rows past the retention.

use std::collections::HashMap;
use std::time::Duration;

use futures::future::join_all;
use futures::FutureExt;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::db::{release, Pruning};
use crate::kafka::record_headers;
use crate::outbox::headers_from_json;
use crate::settings::Settings;
use crate::telemetry::METRICS;

/// `pg_try_advisory_xact_lock` key of the relay ("paystrm" in ASCII).
const RELAY_LOCK: i64 = 0x0070_6179_7374_726d;

type Row = (
    i64,
    String,
    Option<String>,
    Option<Vec<u8>>,
    Vec<u8>,
    serde_json::Value,
);

pub async fn run(
    settings: Settings,
    pool: PgPool,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let producer = producer(&settings)?;
    let retry = Backoff {
        initial: Duration::from_millis(settings.processor.retry_initial_ms),
        max: Duration::from_millis(settings.processor.retry_max_ms),
    };
    let poll = Duration::from_millis(settings.relay.poll_interval_ms);
    let mut listener: Option<PgListener> = None;
    // Pruning runs beside the publishing, so that it happens under a steady load too (the
    // loop below drains without pausing while rows keep coming) and never delays a round.
    let _pruning = crate::db::spawn_pruning(&pool, pruning(&settings), &cancel);
    let mut failures = 0;
    tracing::info!("relay started");

    while !cancel.is_cancelled() {
        if listener.is_none() {
            listener = listen(&pool).await;
        }
        let (rows, bytes) = (settings.relay.batch_max, settings.relay.round_max_bytes);
        match bounded_round(&pool, &producer, rows, bytes).await {
            Ok(Round::Full(_)) => {
                failures = 0;
                continue; // a full round: there may be more, drain before waiting
            }
            // Fewer than a full round: every row committed before this round's snapshot was
            // taken, and each row committed since has notified (or will); waiting for that
            // notification saves a round that would find nothing.
            Ok(Round::Published(_)) => failures = 0,
            Ok(Round::NotLeader) => {
                failures = 0;
                METRICS.relay_standby_rounds.inc();
            }
            Err(e) => {
                let delay = retry.delay(failures);
                failures += 1;
                tracing::warn!(error = %e, ?delay, "relay round failed; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                continue;
            }
        }
        if !wait_for_work(&mut listener, poll, &cancel).await {
            break;
        }
    }
    tracing::info!("relay stopping; flushing producer");
    let _ = producer.flush(Timeout::After(Duration::from_secs(5)));
    Ok(())
}

/// The relay's producer. Dead letters may be a little larger than the messages they carry
/// (`dlq`); the relay publishes them, so its limit is the dead-letter topic's.
fn producer(settings: &Settings) -> anyhow::Result<FutureProducer> {
    let delivery_timeout = Duration::from_millis(settings.relay.delivery_timeout_ms);
    let max_bytes = crate::kafka::dead_letter_max_bytes(&settings.kafka);
    Ok(
        crate::kafka::producer_config(&settings.kafka, delivery_timeout)
            .set("message.max.bytes", max_bytes.to_string())
            .create()?,
    )
}

/// The retention of published outbox rows.
fn pruning(settings: &Settings) -> Pruning {
    Pruning {
        what: "published outbox rows",
        sql: PRUNE_SQL,
        retention_hours: settings.relay.retention_hours,
        group: None,
        interval: Duration::from_secs(settings.relay.prune_interval_s.max(1)),
        counter: METRICS.outbox_pruned.clone(),
    }
}

/// Waits for a notification, the fallback poll, or shutdown; returns false on shutdown. A
/// lost LISTEN connection is dropped (the next round opens another).
async fn wait_for_work(
    listener: &mut Option<PgListener>,
    poll: Duration,
    cancel: &CancellationToken,
) -> bool {
    let notified = async {
        match listener.as_mut() {
            Some(l) => {
                if let Err(e) = l.recv().await {
                    tracing::warn!(error = %e, "LISTEN connection lost; falling back to polling");
                    return false;
                }
                true
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = cancel.cancelled() => return false,
        ok = notified => if !ok { *listener = None },
        _ = tokio::time::sleep(poll) => {}
    }
    // Notifications that are already here are covered by the round about to start (its
    // snapshot comes after their commits): one round for all of them, not one each.
    while let Some(l) = listener.as_mut() {
        match l.try_recv().now_or_never() {
            Some(Ok(Some(_))) => {}
            Some(Ok(None) | Err(_)) => *listener = None,
            None => break,
        }
    }
    true
}

async fn listen(pool: &PgPool) -> Option<PgListener> {
    let mut listener = PgListener::connect_with(pool).await.ok()?;
    listener.listen("paystream_outbox").await.ok()?;
    Some(listener)
}

/// What one relay round did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Round {
    /// Another relay holds the lock this round.
    NotLeader,
    /// Published every row there was (so many).
    Published(usize),
    /// Published as many rows as a round takes (rows or bytes): more may be waiting.
    Full(usize),
}

/// One relay round over at most `limit` rows, with no bound on their bytes; see
/// `bounded_round`. Public for tests.
pub async fn publish_round(
    pool: &PgPool,
    producer: &FutureProducer,
    limit: i64,
) -> anyhow::Result<Round> {
    bounded_round(pool, producer, limit, i64::MAX).await
}

/// One relay round: publishes up to `limit` unpublished rows, and up to `max_bytes` of their
/// payloads (at least one row), in id order and marks them, all inside one transaction that
/// holds the relay lock, which is released when this returns. `run` loops over it.
pub async fn bounded_round(
    pool: &PgPool,
    producer: &FutureProducer,
    limit: i64,
    max_bytes: i64,
) -> anyhow::Result<Round> {
    let mut tx = pool.begin().await?;
    // Every way out ends the transaction explicitly, never by dropping `tx` (`db::release`):
    // until a dropped transaction's rollback runs it holds the relay lock, so this relay's
    // next round (on another pooled connection) would find itself "not the leader" and leave
    // the rows of the notification that woke it waiting for the next notification or the
    // fallback poll.
    let delivered = match locked_round(&mut tx, producer, limit, max_bytes).await {
        Ok(Locked::Delivered(delivered)) => delivered,
        Ok(Locked::NotLeader) => {
            tx.rollback().await?;
            return Ok(Round::NotLeader);
        }
        Ok(Locked::Empty) => {
            tx.rollback().await?;
            return Ok(Round::Published(0));
        }
        Err(e) => {
            release(tx).await;
            return Err(e.into());
        }
    };
    tx.commit().await?;
    METRICS.relay_round_rows.observe(delivered.published as f64);
    for (topic, n) in delivered.per_topic {
        METRICS
            .relay_published
            .with_label_values(&[&topic])
            .inc_by(n);
    }
    match delivered.first_error {
        Some(e) => anyhow::bail!("publish failed: {e}"),
        None if delivered.full => Ok(Round::Full(delivered.published)),
        None => Ok(Round::Published(delivered.published)),
    }
}

/// What a round did while holding the relay lock, before its commit.
enum Locked {
    NotLeader,
    Empty,
    Delivered(Delivered),
}

struct Delivered {
    /// How many rows were marked published: the id-ordered prefix the broker acknowledged.
    published: usize,
    per_topic: HashMap<String, u64>,
    /// The first failed delivery; the rows from it on stay unpublished.
    first_error: Option<String>,
    /// Whether the round took as many rows or bytes as a round may: more may be waiting.
    full: bool,
}

async fn locked_round(
    tx: &mut PgConnection,
    producer: &FutureProducer,
    limit: i64,
    max_bytes: i64,
) -> Result<Locked, sqlx::Error> {
    // The marks need not wait for the WAL flush: a mark lost in a crash only means the row
    // is published again, a duplicate the consumers drop by event id.
    let (leader, _): (bool, String) = sqlx::query_as(
        "SELECT pg_try_advisory_xact_lock($1), set_config('synchronous_commit', 'off', true)",
    )
    .bind(RELAY_LOCK)
    .fetch_one(&mut *tx)
    .await?;
    if !leader {
        return Ok(Locked::NotLeader);
    }
    // The rows in id order while the payloads before each one stay under `max_bytes` (the
    // running sum streams with the index scan, so the limit stops it); the last one read may
    // cross the budget and is kept for the next round unless it is the first.
    let mut rows: Vec<Row> = sqlx::query_as(
        r#"
        SELECT id, topic, message_key, message_key_raw, payload, headers FROM (
            SELECT id, topic, message_key, message_key_raw, payload, headers,
                   sum(octet_length(payload)) OVER (ORDER BY id) - octet_length(payload) AS before
            FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT $1
        ) r
        WHERE before < $2 ORDER BY id
        "#,
    )
    .bind(limit)
    .bind(max_bytes)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Ok(Locked::Empty);
    }
    let read = rows.len();
    rows.truncate(within_budget(rows.iter().map(|row| row.4.len()), max_bytes));
    // Full when the round stopped at its row or byte budget: more may be waiting.
    let full = read as i64 >= limit || rows.len() < read;

    // Enqueue in id order; the idempotent producer keeps that order per partition.
    let deliveries = rows
        .iter()
        .map(|(id, topic, key, raw_key, payload, headers)| {
            let mut record = FutureRecord::<[u8], [u8]>::to(topic)
                .payload(payload)
                .headers(record_headers(&headers_from_json(headers)));
            if let Some(key) = raw_key.as_deref().or(key.as_ref().map(String::as_bytes)) {
                record = record.key(key);
            }
            let send = producer.send(record, Timeout::Never);
            async move { (*id, topic.as_str(), send.await) }
        });
    let results = join_all(deliveries).await;

    let delivered = delivered_prefix(results.into_iter().map(|(id, topic, result)| {
        let error = result.err().map(|(e, _)| e.to_string());
        (id, topic, error)
    }));
    // clock_timestamp(), not now(): the time the acknowledgements were in, not when this
    // round's transaction began (before its rows were even read).
    sqlx::query("UPDATE outbox SET published_at = clock_timestamp() WHERE id = ANY($1)")
        .bind(&delivered.ids)
        .execute(&mut *tx)
        .await?;
    Ok(Locked::Delivered(Delivered {
        full,
        ..delivered.report
    }))
}

/// How many of the rows with these payload sizes fit `max_bytes` together (at least one).
fn within_budget(sizes: impl Iterator<Item = usize>, max_bytes: i64) -> usize {
    let mut total = 0i64;
    let mut n = 0;
    for size in sizes {
        total = total.saturating_add(size as i64);
        if n > 0 && total > max_bytes {
            break;
        }
        n += 1;
    }
    n
}

/// The rows to mark published, and what the round reports.
struct Prefix {
    ids: Vec<i64>,
    report: Delivered,
}

/// The id-ordered prefix of a round's rows that was delivered: (row id, topic, error). After a
/// failure, later rows are published again next round (duplicates the consumers dedupe),
/// never marked out of order.
fn delivered_prefix<'a>(results: impl Iterator<Item = (i64, &'a str, Option<String>)>) -> Prefix {
    let mut ids = Vec::new();
    let mut per_topic: HashMap<&str, u64> = HashMap::new();
    let mut first_error = None;
    for (id, topic, error) in results {
        match error {
            None if first_error.is_none() => {
                ids.push(id);
                *per_topic.entry(topic).or_default() += 1;
            }
            None => {}
            Some(e) => {
                METRICS.relay_errors.with_label_values(&["publish"]).inc();
                first_error.get_or_insert_with(|| format!("outbox row {id} to {topic}: {e}"));
            }
        }
    }
    let report = Delivered {
        published: ids.len(),
        per_topic: per_topic
            .into_iter()
            .map(|(t, n)| (t.to_owned(), n))
            .collect(),
        first_error,
        full: false,
    };
    Prefix { ids, report }
}

/// Deletes published rows past `relay.retention_hours` (see `db::Pruning`), never a
/// row that is not published.
const PRUNE_SQL: &str = r#"
    DELETE FROM outbox
    WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM outbox
        WHERE published_at IS NOT NULL AND published_at < now() - make_interval(hours => $1)
        ORDER BY published_at
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    ))
"#;

#[cfg(test)]
mod tests {
    use super::*;

    /// A round's results, the ids marked published, how many topics, the row the error names.
    type Case = (
        Vec<(i64, &'static str, Option<String>)>,
        Vec<i64>,
        usize,
        Option<i64>,
    );

    #[test]
    fn a_round_takes_the_rows_whose_payloads_fit_its_byte_budget_and_at_least_one() {
        // (payload sizes, budget, rows taken)
        let cases: [(&[usize], i64, usize); 5] = [
            (&[10, 10, 10], 100, 3),
            (&[40, 40, 40], 100, 2),
            (&[40, 60, 1], 100, 2),
            (&[500, 1], 100, 1),
            (&[10, 10], i64::MAX, 2),
        ];
        for (sizes, budget, expected) in cases {
            assert_eq!(
                within_budget(sizes.iter().copied(), budget),
                expected,
                "{sizes:?}"
            );
        }
    }

    #[test]
    fn only_the_id_ordered_prefix_before_the_first_failure_is_marked_published() {
        let failed = || Some("broker refused".to_owned());
        let cases: [Case; 4] = [
            (vec![], vec![], 0, None),
            (
                vec![(1, "a", None), (2, "b", None), (3, "a", None)],
                vec![1, 2, 3],
                2,
                None,
            ),
            (
                vec![(1, "a", None), (2, "b", failed()), (3, "a", None)],
                vec![1],
                1,
                Some(2),
            ),
            (
                vec![(1, "a", failed()), (2, "a", failed())],
                vec![],
                0,
                Some(1),
            ),
        ];
        for (results, ids, topics, error_row) in cases {
            let prefix = delivered_prefix(results.into_iter());
            assert_eq!(prefix.ids, ids);
            assert_eq!(prefix.report.published, ids.len());
            assert_eq!(prefix.report.per_topic.len(), topics);
            let error = prefix.report.first_error;
            match error_row {
                None => assert_eq!(error, None),
                Some(row) => {
                    let expected = format!("outbox row {row} to ");
                    assert!(
                        error.is_some_and(|e| e.starts_with(&expected)),
                        "{expected}"
                    );
                }
            }
        }
    }
}
