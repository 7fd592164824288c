//! `paystream relay`: publishes outbox rows to Kafka.
//!
//! Delivery semantics: at-least-once on the wire, exactly-once in effect (every row carries
//! an event id that consumers dedupe on). What makes that hold:
//!
//! - A row leaves the outbox only after the broker acknowledged it (`acks=all`, idempotent
//!   producer): the relay deletes it and logs it in `outbox_published` (migration 0012). A
//!   relay killed in between re-publishes it: a harmless duplicate. For the same reason the
//!   marks commit without waiting for the WAL flush.
//! - The relay never remembers a high-water id. Each round takes the rows still in the
//!   outbox in id order, so a row whose transaction commits after rows with larger ids (ids
//!   are taken before commit) is simply found in a later round instead of being skipped.
//! - Per-key order: rows that share an account were inserted while holding that account's
//!   row lock, so their id order is their commit order. One relay publishes at a time: the
//!   holder of the lease (`relay_lease`, migration 0009), which it renews every round and
//!   gives back when it stops. No database transaction stays open while the broker is asked:
//!   a round reads its rows, sends them, then marks them in a short transaction that first
//!   renews the lease at the epoch the round started with. A relay that lost the lease (it
//!   froze, another took over after `relay.lease_ms`) cannot mark anything; what it sent is
//!   a copy of rows the new holder publishes (unmarked rows go again, in id order), so the
//!   first copy of each event on the wire is still in order and the consumers drop the rest.
//!   A relay that died loses the lease `relay.lease_ms` later.
//! - A row the broker refuses for good (larger than a message may be, a topic that does not
//!   exist or may not be written) is parked, not retried forever at the head of the line:
//!   only the later rows of its own topic and key wait behind it (per-key order), everything
//!   else flows. A row larger than the producer's limit is parked before anything is sent.
//!   A parked row is retried alone after `relay.park_retry_s`, or at once by
//!   `paystream outbox retry`; `paystream outbox discard` gives up on it, on the record.
//! - It wakes on `LISTEN paystream_outbox` (a trigger notifies on insert), polling only as a
//!   fallback, and prunes the log of published rows past the retention.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::future::join_all;
use futures::FutureExt;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::db::Pruning;
use crate::kafka::record_headers;
use crate::outbox::headers_from_json;
use crate::settings::Settings;
use crate::telemetry::METRICS;

/// The relay's lease: which relay may publish, at which epoch (it rises whenever the holder
/// changes or lapses), until when.
pub struct Lease {
    owner: String,
    ttl: Duration,
    epoch: Option<i64>,
    /// When this relay last took or renewed the lease (its own clock).
    renewed_at: Option<Instant>,
}

impl Lease {
    pub fn new(ttl: Duration) -> Self {
        Self {
            owner: crate::startup::instance_id(),
            ttl,
            epoch: None,
            renewed_at: None,
        }
    }

    /// The epoch, without asking the database, while the lease was renewed less than a third
    /// of its time to live ago: the round's marks renew it again, fenced by the epoch, so
    /// asking first would only cost a statement per round.
    fn fresh_epoch(&self) -> Option<i64> {
        self.epoch.filter(|_| {
            self.renewed_at
                .is_some_and(|at| at.elapsed() < self.ttl / 3)
        })
    }

    /// Takes the lease if it is free or lapsed, or renews it; the epoch while this relay
    /// holds it.
    async fn acquire(&mut self, pool: &PgPool) -> Result<Option<i64>, sqlx::Error> {
        let epoch: Option<i64> = sqlx::query_scalar(
            r#"
            UPDATE relay_lease
            SET epoch = CASE WHEN owner = $1 AND expires_at > now() THEN epoch ELSE epoch + 1 END,
                owner = $1,
                expires_at = now() + make_interval(secs => $2)
            WHERE id = 1 AND (owner = $1 OR expires_at <= now())
            RETURNING epoch
            "#,
        )
        .bind(&self.owner)
        .bind(self.ttl.as_secs_f64())
        .fetch_optional(pool)
        .await?;
        if epoch.is_some() && epoch != self.epoch {
            tracing::info!(epoch, owner = %self.owner, "relay lease taken: this relay publishes");
        } else if epoch.is_none() && self.epoch.is_some() {
            tracing::warn!(owner = %self.owner, "relay lease lost to another relay");
        }
        self.epoch = epoch;
        self.renewed_at = epoch.map(|_| Instant::now());
        Ok(epoch)
    }

    /// Gives the lease back (a clean stop), so a standby takes over at once.
    pub async fn release(&mut self, pool: &PgPool) {
        self.renewed_at = None;
        let Some(epoch) = self.epoch.take() else {
            return;
        };
        let released = sqlx::query(
            "UPDATE relay_lease SET expires_at = now() WHERE id = 1 AND owner = $1 AND epoch = $2",
        )
        .bind(&self.owner)
        .bind(epoch)
        .execute(pool)
        .await;
        if let Err(error) = released {
            tracing::warn!(%error, "could not give the relay lease back; it lapses by itself");
        }
    }
}

type Row = (
    i64,
    String,
    Option<String>,
    Option<Vec<u8>>,
    Vec<u8>,
    serde_json::Value,
);

/// How a round takes and settles rows beyond its row and byte budgets.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub rows: i64,
    pub bytes: i64,
    /// The most bytes one record may have (the producer's `message.max.bytes`).
    pub record_bytes: usize,
    /// A parked row is tried again this long after it was parked.
    pub park_retry: Duration,
}

/// The lease's time to live: a relay that died is replaced this long after its last round.
pub fn lease_ttl(settings: &Settings) -> Duration {
    Duration::from_millis(settings.relay.lease_ms)
}

impl Limits {
    pub fn new(settings: &Settings) -> Self {
        Self {
            rows: settings.relay.batch_max,
            bytes: settings.relay.round_max_bytes,
            record_bytes: crate::kafka::dead_letter_max_bytes(&settings.kafka),
            park_retry: Duration::from_secs(settings.relay.park_retry_s),
        }
    }
}

pub async fn run(
    settings: Settings,
    pool: PgPool,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let producer = producer(&settings)?;
    let retry = Backoff::of(&settings.processor);
    let poll = Duration::from_millis(settings.relay.poll_interval_ms);
    let mut listener: Option<PgListener> = None;
    // Pruning runs beside the publishing, so that it happens under a steady load too (the
    // loop below drains without pausing while rows keep coming) and never delays a round.
    let _pruning = crate::db::spawn_pruning(&pool, pruning(&settings), &cancel);
    let mut failures = 0;
    let mut lease = Lease::new(lease_ttl(&settings));
    let limits = Limits::new(&settings);
    tracing::info!("relay started");

    while !cancel.is_cancelled() {
        if listener.is_none() {
            listener = listen(&pool).await;
        }
        match bounded_round(&pool, &producer, limits, &mut lease).await {
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
    lease.release(&pool).await;
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

/// The retention of the log of published rows.
fn pruning(settings: &Settings) -> Pruning {
    Pruning {
        what: "published outbox rows (outbox_published)",
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
    /// Another relay holds the lease this round (or took it during the round).
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
    lease: &mut Lease,
) -> anyhow::Result<Round> {
    let limits = Limits {
        rows: limit,
        bytes: i64::MAX,
        record_bytes: usize::MAX,
        park_retry: Duration::from_secs(60),
    };
    bounded_round(pool, producer, limits, lease).await
}

/// One relay round, while this relay holds the lease: publishes up to `limits.rows`
/// unpublished rows, and up to `limits.bytes` of their payloads (at least one row), in id
/// order, then marks them (and parks what the broker refused for good) in one short
/// transaction fenced by the lease. `run` loops over it.
pub async fn bounded_round(
    pool: &PgPool,
    producer: &FutureProducer,
    limits: Limits,
    lease: &mut Lease,
) -> anyhow::Result<Round> {
    let epoch = match lease.fresh_epoch() {
        Some(epoch) => epoch,
        None => match lease.acquire(pool).await? {
            Some(epoch) => epoch,
            None => return Ok(Round::NotLeader),
        },
    };
    let delivered = match leased_round(pool, producer, limits, lease, epoch).await? {
        Leased::Delivered(delivered) => delivered,
        Leased::Empty => return Ok(Round::Published(0)),
        Leased::Lost => {
            tracing::warn!(epoch, "the relay lease lapsed during the round and another relay took it; this round's marks were not written (the new holder publishes those rows again)");
            lease.epoch = None;
            lease.renewed_at = None;
            return Ok(Round::NotLeader);
        }
    };
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

/// What a round under the lease came to.
enum Leased {
    Empty,
    Delivered(Delivered),
    /// The lease lapsed or was taken before the marks: nothing was marked.
    Lost,
}

struct Delivered {
    /// How many rows were marked published.
    published: usize,
    per_topic: HashMap<String, u64>,
    /// The first delivery that failed for a reason that may pass (the round is retried).
    first_error: Option<String>,
    /// Whether the round took as many rows or bytes as a round may: more may be waiting.
    full: bool,
}

async fn leased_round(
    pool: &PgPool,
    producer: &FutureProducer,
    limits: Limits,
    lease: &mut Lease,
    epoch: i64,
) -> Result<Leased, sqlx::Error> {
    let (limit, max_bytes) = (limits.rows, limits.bytes);
    // The rows in id order while the payloads before each one stay under `max_bytes` (the
    // running sum streams with the index scan, so the limit stops it); the last one read may
    // cross the budget and is kept for the next round unless it is the first. Not taken: a
    // discarded row, a parked one not yet due for its retry, and any row behind a parked
    // row of its own topic and key (a keyless row has no order to keep).
    let mut rows: Vec<Row> = sqlx::query_as(
        r#"
        SELECT id, topic, message_key, message_key_raw, payload, headers FROM (
            SELECT id, topic, message_key, message_key_raw, payload, headers,
                   sum(octet_length(payload)) OVER (ORDER BY id) - octet_length(payload) AS before
            FROM outbox o
            WHERE discarded_at IS NULL
              AND (parked_at IS NULL OR parked_at < now() - make_interval(secs => $3))
              AND NOT EXISTS (
                  SELECT 1 FROM outbox p
                  WHERE p.parked_at IS NOT NULL AND p.discarded_at IS NULL
                    AND p.topic = o.topic AND p.id < o.id
                    AND (o.message_key IS NOT NULL OR o.message_key_raw IS NOT NULL)
                    AND p.message_key IS NOT DISTINCT FROM o.message_key
                    AND p.message_key_raw IS NOT DISTINCT FROM o.message_key_raw)
            ORDER BY id LIMIT $1
        ) r
        WHERE before < $2 ORDER BY id
        "#,
    )
    .bind(limit)
    .bind(max_bytes)
    .bind(limits.park_retry.as_secs_f64())
    .fetch_all(pool)
    .await?;
    if rows.is_empty() {
        return Ok(Leased::Empty);
    }
    let read = rows.len();
    rows.truncate(within_budget(rows.iter().map(|row| row.4.len()), max_bytes));
    // Full when the round stopped at its row or byte budget: more may be waiting.
    let full = read as i64 >= limit || rows.len() < read;

    // Each row's key and headers, read once. A row larger than a record may be is parked
    // before anything is sent, and the later rows of its key are not sent either (they would
    // overtake it).
    let mut blocked: HashSet<(&str, &[u8])> = HashSet::new();
    let prepared: Vec<_> = rows
        .iter()
        .map(|(id, topic, key, raw_key, payload, headers)| {
            let key = raw_key.as_deref().or(key.as_ref().map(String::as_bytes));
            let headers = headers_from_json(headers);
            let header_bytes: usize = headers.iter().map(|(n, v)| n.len() + v.len()).sum();
            let size = payload.len() + key.map_or(0, <[u8]>::len) + header_bytes;
            let lane = key.map(|k| (topic.as_str(), k));
            let refusal = if size > limits.record_bytes {
                Some(Refusal::Permanent(format!(
                    "the record is about {size} bytes, more than a message may be ({})",
                    limits.record_bytes
                )))
            } else if lane.is_some_and(|l| blocked.contains(&l)) {
                Some(Refusal::Held)
            } else {
                None
            };
            if let (Some(Refusal::Permanent(_)), Some(lane)) = (&refusal, lane) {
                blocked.insert(lane);
            }
            (*id, topic.as_str(), key, payload, headers, refusal)
        })
        .collect();

    // Enqueue in id order; the idempotent producer keeps that order per partition.
    let deliveries = prepared
        .into_iter()
        .map(|(id, topic, key, payload, headers, refusal)| {
            let send = match refusal {
                Some(refusal) => Err(refusal),
                None => {
                    let mut record = FutureRecord::<[u8], [u8]>::to(topic)
                        .payload(payload)
                        .headers(record_headers(&headers));
                    if let Some(key) = key {
                        record = record.key(key);
                    }
                    Ok(producer.send(record, Timeout::Never))
                }
            };
            async move {
                // The time of publishing is the broker's acknowledgement, as the relay sees it.
                let outcome = match send {
                    Ok(delivery) => delivery
                        .await
                        .map(|_| Utc::now())
                        .map_err(|(e, _)| Refusal::of(&e)),
                    Err(refusal) => Err(refusal),
                };
                Sent {
                    id,
                    topic,
                    key,
                    outcome,
                }
            }
        });
    let results = join_all(deliveries).await;

    let settled = settle(results.into_iter());
    for (id, reason) in &settled.parked {
        tracing::error!(outbox_id = id, %reason, "outbox row parked: only later rows of its topic and key wait for it; see `paystream outbox parked`");
    }
    if !mark(pool, lease, epoch, &settled).await? {
        return Ok(Leased::Lost);
    }
    Ok(Leased::Delivered(Delivered {
        full,
        ..settled.report()
    }))
}

/// Takes the delivered rows out of the outbox into the log of published rows and parks the
/// refused ones, if this relay still holds the lease at `epoch` (false, and nothing written,
/// otherwise), and renews the lease: one statement, its own transaction. Every take of the
/// lease raises its epoch, so a relay replaced since the round began marks nothing; the lease
/// row stays locked until the marks commit, so no other relay takes it meanwhile. A round
/// that outlived the lease (a slow broker) but was not replaced still marks: nobody else
/// published meanwhile.
///
/// The marks need not wait for the WAL flush: a mark lost in a crash only means the row is
/// published again, a duplicate the consumers drop by event id.
async fn mark(
    pool: &PgPool,
    lease: &mut Lease,
    epoch: i64,
    settled: &Settlement,
) -> Result<bool, sqlx::Error> {
    let (parked, reasons): (Vec<i64>, Vec<String>) = settled.parked.iter().cloned().unzip();
    // The parking is left out when nothing was refused (nearly always): the statement is
    // planned for every call, and the empty part would be planned with it.
    let park = if parked.is_empty() {
        ""
    } else {
        r#", parked AS (
            UPDATE outbox o SET parked_at = clock_timestamp(), park_reason = p.reason
            FROM unnest($6::bigint[], $7::text[]) AS p(id, reason)
            WHERE o.id = p.id AND EXISTS (SELECT 1 FROM lease)
        )"#
    };
    // Each row's `published_at` is when the broker acknowledged it, not this statement's time.
    let sql = format!(
        r#"
        WITH lease AS (
            UPDATE relay_lease SET expires_at = now() + make_interval(secs => $3)
            WHERE id = 1 AND owner = $1 AND epoch = $2
            RETURNING 1
        ), published AS (
            DELETE FROM outbox
            WHERE id = ANY($4) AND EXISTS (SELECT 1 FROM lease)
            RETURNING id, topic, event_id, created_at
        ), logged AS (
            INSERT INTO outbox_published (id, topic, event_id, created_at, published_at)
            SELECT p.id, p.topic, p.event_id, p.created_at, a.acked_at
            FROM published p JOIN unnest($4::bigint[], $5::timestamptz[]) AS a(id, acked_at)
              ON a.id = p.id
            ORDER BY p.id
        ){park}
        SELECT EXISTS (SELECT 1 FROM lease), set_config('synchronous_commit', 'off', true)
        "#
    );
    let query = sqlx::query_as(&sql)
        .bind(&lease.owner)
        .bind(epoch)
        .bind(lease.ttl.as_secs_f64())
        .bind(&settled.published)
        .bind(&settled.published_at);
    let query = if parked.is_empty() {
        query
    } else {
        query.bind(&parked).bind(&reasons)
    };
    let (held, _): (bool, String) = query.fetch_one(pool).await?;
    if held {
        lease.renewed_at = Some(Instant::now());
    }
    Ok(held)
}

/// Why a row was not delivered this round.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Refusal {
    /// May pass (the broker is away, a timeout): the round fails and is retried.
    Transient(String),
    /// Will not pass by retrying now: the row is parked.
    Permanent(String),
    /// Not sent: an earlier row of its key was refused in this round.
    Held,
}

impl Refusal {
    fn of(e: &KafkaError) -> Self {
        use RDKafkaErrorCode::*;
        match e.rdkafka_error_code() {
            Some(
                MessageSizeTooLarge
                | InvalidMessageSize
                | MessageBatchTooLarge
                | InvalidMessage
                | InvalidRecord
                | InvalidTopic
                | UnknownTopic
                | UnknownTopicOrPartition
                | TopicAuthorizationFailed
                | ClusterAuthorizationFailed
                | PolicyViolation,
            ) => Self::Permanent(e.to_string()),
            _ => Self::Transient(e.to_string()),
        }
    }
}

/// One row's delivery in a round.
struct Sent<'a> {
    id: i64,
    topic: &'a str,
    key: Option<&'a [u8]>,
    /// When the broker acknowledged it, or why it was not delivered.
    outcome: Result<DateTime<Utc>, Refusal>,
}

/// What a round's deliveries come to.
#[derive(Debug, Default, PartialEq)]
struct Settlement {
    published: Vec<i64>,
    /// When each of `published` was acknowledged, in the same order.
    published_at: Vec<DateTime<Utc>>,
    parked: Vec<(i64, String)>,
    per_topic: HashMap<String, u64>,
    first_error: Option<String>,
}

impl Settlement {
    fn report(&self) -> Delivered {
        Delivered {
            published: self.published.len(),
            per_topic: self.per_topic.clone(),
            first_error: self.first_error.clone(),
            full: false,
        }
    }
}

/// Settles a round's deliveries, in id order. A delivered row is marked published unless an
/// earlier row of its topic and key failed in this round (it was sent, but is sent again
/// after that row: a duplicate the consumers drop). A row refused for good is parked, which
/// holds back the later rows of its key; one refused for a passing reason stays unpublished
/// and fails the round. Rows of other keys are not held back by either.
fn settle<'a>(results: impl Iterator<Item = Sent<'a>>) -> Settlement {
    let mut settled = Settlement::default();
    let mut failed_lanes: HashSet<(&str, &[u8])> = HashSet::new();
    for sent in results {
        let lane = sent.key.map(|k| (sent.topic, k));
        let behind = lane.is_some_and(|l| failed_lanes.contains(&l));
        match sent.outcome {
            Ok(acked_at) if !behind => {
                settled.published.push(sent.id);
                settled.published_at.push(acked_at);
                *settled.per_topic.entry(sent.topic.to_owned()).or_default() += 1;
                continue;
            }
            // Behind a failed row of its key: it waits for that row whatever happened to it.
            Ok(_) | Err(Refusal::Held) => {}
            Err(Refusal::Permanent(_)) if behind => {}
            Err(Refusal::Permanent(reason)) => {
                METRICS.relay_errors.with_label_values(&["parked"]).inc();
                settled.parked.push((sent.id, reason));
            }
            Err(Refusal::Transient(e)) => {
                METRICS.relay_errors.with_label_values(&["publish"]).inc();
                settled.first_error.get_or_insert_with(|| {
                    format!("outbox row {} to {}: {e}", sent.id, sent.topic)
                });
            }
        }
        if let Some(lane) = lane {
            failed_lanes.insert(lane);
        }
    }
    settled
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

/// Deletes the log of rows published longer ago than `relay.retention_hours` (see
/// `db::Pruning`). The outbox itself holds nothing published.
const PRUNE_SQL: &str = r#"
    DELETE FROM outbox_published
    WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM outbox_published
        WHERE published_at < now() - make_interval(hours => $1)
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    ))
"#;

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_refused_row_holds_back_only_the_later_rows_of_its_topic_and_key() {
        use Refusal::*;
        let big = || Err(Permanent("too large".into()));
        let away = || Err(Transient("broker away".into()));
        let at = DateTime::<Utc>::UNIX_EPOCH;
        let ok = || Ok(at);
        // (rows in id order as (id, topic, key, outcome), published, parked, error row)
        type Row = (
            i64,
            &'static str,
            Option<&'static [u8]>,
            Result<DateTime<Utc>, Refusal>,
        );
        type Case = (Vec<Row>, Vec<i64>, Vec<i64>, Option<i64>);
        let cases: Vec<Case> = vec![
            (vec![], vec![], vec![], None),
            (
                vec![(1, "t", Some(b"a"), ok()), (2, "u", Some(b"b"), ok())],
                vec![1, 2],
                vec![],
                None,
            ),
            // A's first row is refused for good: A's later rows wait, B flows.
            (
                vec![
                    (1, "t", Some(b"a"), big()),
                    (2, "t", Some(b"b"), ok()),
                    (3, "t", Some(b"a"), ok()),
                    (4, "t", Some(b"a"), Err(Held)),
                    (5, "t", Some(b"b"), ok()),
                ],
                vec![2, 5],
                vec![1],
                None,
            ),
            // The same key on another topic is another line.
            (
                vec![(1, "t", Some(b"a"), big()), (2, "u", Some(b"a"), ok())],
                vec![2],
                vec![1],
                None,
            ),
            // A passing failure fails the round, holds its key, not the others.
            (
                vec![
                    (1, "t", Some(b"a"), away()),
                    (2, "t", Some(b"a"), big()),
                    (3, "t", Some(b"b"), ok()),
                ],
                vec![3],
                vec![],
                Some(1),
            ),
            // Keyless rows keep no order: each stands alone.
            (
                vec![(1, "t", None, big()), (2, "t", None, ok())],
                vec![2],
                vec![1],
                None,
            ),
        ];
        for (rows, published, parked, error_row) in cases {
            let label = format!("{rows:?}");
            // Each delivered row acknowledged at its own second, to see the times follow the ids.
            let settled = settle(rows.into_iter().map(|(id, topic, key, outcome)| Sent {
                id,
                topic,
                key,
                outcome: outcome.map(|t| t + chrono::Duration::seconds(id)),
            }));
            assert_eq!(settled.published, published, "{label}");
            let acked: Vec<DateTime<Utc>> = published
                .iter()
                .map(|id| at + chrono::Duration::seconds(*id))
                .collect();
            assert_eq!(settled.published_at, acked, "{label}");
            let parked_ids: Vec<i64> = settled.parked.iter().map(|p| p.0).collect();
            assert_eq!(parked_ids, parked, "{label}");
            match error_row {
                None => assert_eq!(settled.first_error, None, "{label}"),
                Some(row) => assert!(
                    settled
                        .first_error
                        .as_deref()
                        .is_some_and(|e| e.starts_with(&format!("outbox row {row} to "))),
                    "{label}"
                ),
            }
        }
    }
}
