//! The two ceilings the end-to-end figure is judged against, measured in the same run on the
//! same database, fed from memory (no broker), one task and connection per partition:
//!
//! - the *database limit*: the account processor's own batch transaction, the very statements
//!   it commits (`consumer::apply_batches`), batches of `batch_max` at full speed;
//! - the *seed design at its best*: what a team following the original request would deploy,
//!   one debit per transaction: claim the event id, `SELECT ... FOR UPDATE` the user's
//!   account and the settlement account, write the transfer, its two ledger entries and both
//!   balances, the outbox row and the offset, then commit. Hand-written SQL with prepared
//!   statements and no ORM: the best such a design does.
//!
//! Both write the same rows as the processor (the ledger's hash chains included), so the
//! database does the same work per debit; only how it is cut into transactions differs. The
//! seed design writes its transfers and entries into tables of its own with foreign keys
//! (`seed_transfers`, `seed_ledger_entries`), as such a team would: paystream checks the
//! ledger's references once per statement (migration 0011), which is cheaper for hundreds of
//! rows and dearer for one.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::future::try_join_all;
use paystream_processors::accounts::processor::AccountProcessor;
use paystream_processors::consumer::{self, WorkerConfig};
use paystream_processors::events::{decode_envelope, OrderEvent};
use paystream_processors::kafka::InboundMessage;
use paystream_processors::ledger::chain_hash;
use paystream_processors::settings::Settings;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::cpu::{CpuShare, CpuTicks, PgCpu};
use crate::load::{order_created, record_orders};
use crate::phase::phase_settings;
use crate::users::Users;

/// What one ceiling measured.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ceiling {
    pub(crate) debits: u64,
    pub(crate) elapsed: Duration,
    pub(crate) pg_cpu_us_per_debit: Option<f64>,
    pub(crate) cpu: Option<CpuShare>,
}

impl Ceiling {
    pub(crate) fn rate(&self) -> f64 {
        self.debits as f64 / self.elapsed.as_secs_f64()
    }
}

/// How the orders are fed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Design {
    /// The processor's batch transaction.
    Processor,
    /// One debit per transaction with row locks, as the original request describes.
    Seed,
}

/// One partition's orders as the consumer would have fetched them.
struct Feed {
    partition: i32,
    messages: Vec<InboundMessage>,
}

/// Runs phase `number` of `events` orders with `design`, one task per partition.
pub(crate) async fn measure(
    settings: &Settings,
    pool: &PgPool,
    id: &str,
    number: i64,
    users: &Users,
    events: u64,
    design: Design,
) -> anyhow::Result<Ceiling> {
    let (settings, name) = phase_settings(settings, id, number);
    let first_order = number * 100_000_000;
    record_orders(pool, first_order, users, 0..events).await?;
    let feeds = feeds(&settings, first_order, users, events)?;
    if design == Design::Seed {
        seed_tables(pool).await?;
    }

    let (pg_before, cpu_before) = (PgCpu::now(), CpuTicks::now());
    let started = Instant::now();
    let config = WorkerConfig {
        group: name.clone(),
        topic: settings.topics.order_events.clone(),
        dead_letter_topic: settings.topics.dead_letter.clone(),
        settings: settings.clone(),
    };
    let runs = feeds.iter().map(|feed| {
        let (config, pool) = (config.clone(), pool.clone());
        async move {
            match design {
                Design::Processor => {
                    let batches: Vec<Vec<InboundMessage>> = feed
                        .messages
                        .chunks(config.settings.processor.batch_max.max(1))
                        .map(<[InboundMessage]>::to_vec)
                        .collect();
                    let handler = AccountProcessor {
                        account_events_topic: config.settings.topics.account_events.clone(),
                        settlement_shards: config.settings.processor.settlement_shards,
                    };
                    consumer::apply_batches(config, pool, handler, feed.partition, &batches).await
                }
                Design::Seed => seed_design(&config, &pool, feed).await,
            }
        }
    });
    try_join_all(runs).await?;
    let elapsed = started.elapsed();
    let pg_cpu_us_per_debit = pg_before
        .zip(PgCpu::now())
        .and_then(|(before, after)| after.us_per(before, events));
    let cpu = cpu_before
        .zip(CpuTicks::now())
        .and_then(|(before, after)| after.share_since(before));

    let transfers = match design {
        Design::Processor => "transfers",
        Design::Seed => "seed_transfers",
    };
    let debits: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {transfers} WHERE kind = 'DEBIT' AND order_id >= $1 AND order_id < $2"
    ))
    .bind(first_order)
    .bind(first_order + events as i64)
    .fetch_one(pool)
    .await?;
    anyhow::ensure!(
        debits as u64 == events,
        "{design:?}: {debits} of {events} orders were debited"
    );
    // Nothing publishes these phases' rows; they would only slow the relay of a later run.
    sqlx::query("DELETE FROM outbox WHERE topic = $1")
        .bind(&settings.topics.account_events)
        .execute(pool)
        .await?;
    Ok(Ceiling {
        debits: events,
        elapsed,
        pg_cpu_us_per_debit,
        cpu,
    })
}

/// The orders split by partition as the broker would: by the user (the record key), so one
/// user's debits stay in one partition, in order.
fn feeds(
    settings: &Settings,
    first_order: i64,
    users: &Users,
    events: u64,
) -> anyhow::Result<Vec<Feed>> {
    let partitions = settings.kafka.partitions.max(1);
    let mut feeds: Vec<Feed> = (0..partitions)
        .map(|partition| Feed {
            partition,
            messages: Vec::new(),
        })
        .collect();
    for i in 0..events {
        let user = users.of(i);
        let feed = &mut feeds[user.rem_euclid(i64::from(partitions)) as usize];
        let offset = feed.messages.len() as i64;
        feed.messages.push(InboundMessage {
            topic: settings.topics.order_events.clone(),
            partition: feed.partition,
            offset,
            key: Some(user.to_string().into_bytes()),
            payload: Some(order_created(first_order + i as i64, user)?),
            headers: Vec::new(),
            unreadable_headers: 0,
            timestamp: Some(chrono::Utc::now().timestamp_millis()),
        });
    }
    feeds.retain(|f| !f.messages.is_empty());
    Ok(feeds)
}

/// The seed design's ledger: paystream's tables, with foreign keys.
async fn seed_tables(pool: &PgPool) -> anyhow::Result<()> {
    for sql in [
        "CREATE TABLE IF NOT EXISTS seed_transfers (LIKE transfers INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES, \
         FOREIGN KEY (from_account_id) REFERENCES accounts (id), FOREIGN KEY (to_account_id) REFERENCES accounts (id))",
        "CREATE TABLE IF NOT EXISTS seed_ledger_entries (LIKE ledger_entries INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES, \
         FOREIGN KEY (transfer_id) REFERENCES seed_transfers (id), FOREIGN KEY (account_id) REFERENCES accounts (id))",
    ] {
        sqlx::query(sql).execute(pool).await?;
    }
    Ok(())
}

/// The seed design on one partition: each order its own transaction.
async fn seed_design(config: &WorkerConfig, pool: &PgPool, feed: &Feed) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    let (group, topic) = (&config.group, &config.topic);
    sqlx::query(
        "INSERT INTO consumer_offsets (consumer_group, topic, partition, next_offset, epoch, owner) \
         VALUES ($1, $2, $3, 0, 1, 'seed-design')",
    )
    .bind(group)
    .bind(topic)
    .bind(feed.partition)
    .execute(&mut *conn)
    .await?;
    let shard = feed
        .partition
        .rem_euclid(config.settings.processor.settlement_shards.max(1));
    for msg in &feed.messages {
        let raw = decode_envelope(msg.payload.as_deref(), usize::MAX)
            .map_err(|p| anyhow::anyhow!("bench order: {}", p.message))?;
        let OrderEvent::Created(order) =
            OrderEvent::decode(&raw).map_err(|p| anyhow::anyhow!("bench order: {}", p.message))?
        else {
            anyhow::bail!("the bench produces only OrderCreated");
        };
        let debit = SeedDebit {
            event_id: raw.event_id,
            order_id: order.order_id,
            user_id: order.user_id,
            amount: order.amount_fen.fen(),
            offset: msg.offset,
        };
        let mut tx = sqlx::Acquire::begin(&mut *conn).await?;
        debit.apply(&mut tx, config, feed.partition, shard).await?;
        tx.commit().await?;
    }
    Ok(())
}

struct SeedDebit {
    event_id: Uuid,
    order_id: i64,
    user_id: i64,
    amount: i64,
    offset: i64,
}

impl SeedDebit {
    async fn apply(
        &self,
        tx: &mut PgConnection,
        config: &WorkerConfig,
        partition: i32,
        shard: i32,
    ) -> anyhow::Result<()> {
        let (group, topic) = (&config.group, &config.topic);
        let fresh = sqlx::query(
            r#"INSERT INTO processed_events (consumer_group, event_id, topic, partition, "offset")
               VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING"#,
        )
        .bind(group)
        .bind(self.event_id)
        .bind(topic)
        .bind(partition)
        .bind(self.offset)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        anyhow::ensure!(fresh, "the seed design saw event {} twice", self.event_id);
        let (user_account, user_balance, user_head): (i64, i64, Vec<u8>) = sqlx::query_as(
            "SELECT id, balance_fen, chain_head FROM accounts \
             WHERE kind = 'USER' AND user_id = $1 AND currency = 'CNY' FOR UPDATE",
        )
        .bind(self.user_id)
        .fetch_one(&mut *tx)
        .await?;
        let (settlement, settlement_balance, settlement_head): (i64, i64, Vec<u8>) =
            sqlx::query_as(
                "SELECT id, balance_fen, chain_head FROM accounts \
                 WHERE kind = 'SETTLEMENT' AND currency = 'CNY' AND shard = $1 FOR UPDATE",
            )
            .bind(shard)
            .fetch_one(&mut *tx)
            .await
            .context("the settlement account (an end-to-end phase creates it)")?;
        anyhow::ensure!(user_balance >= self.amount, "the bench funds every user");
        let transfer: i64 = sqlx::query_scalar(
            "INSERT INTO seed_transfers (kind, order_id, from_account_id, to_account_id, amount_fen, currency, cause_event_id) \
             VALUES ('DEBIT', $1, $2, $3, $4, 'CNY', $5) RETURNING id",
        )
        .bind(self.order_id)
        .bind(user_account)
        .bind(settlement)
        .bind(self.amount)
        .bind(self.event_id)
        .fetch_one(&mut *tx)
        .await?;
        let head = |bytes: &[u8]| <[u8; 32]>::try_from(bytes).unwrap_or([0; 32]);
        let (user_after, settlement_after) =
            (user_balance - self.amount, settlement_balance + self.amount);
        let user_hash = chain_hash(
            &head(&user_head),
            user_account,
            transfer,
            -self.amount,
            user_after,
        );
        let settlement_hash = chain_hash(
            &head(&settlement_head),
            settlement,
            transfer,
            self.amount,
            settlement_after,
        );
        sqlx::query(
            "INSERT INTO seed_ledger_entries (transfer_id, account_id, delta_fen, balance_after_fen, entry_hash) \
             VALUES ($1, $2, $3, $4, $5), ($1, $6, $7, $8, $9)",
        )
        .bind(transfer)
        .bind(user_account)
        .bind(-self.amount)
        .bind(user_after)
        .bind(user_hash.to_vec())
        .bind(settlement)
        .bind(self.amount)
        .bind(settlement_after)
        .bind(settlement_hash.to_vec())
        .execute(&mut *tx)
        .await?;
        for (account, balance, hash) in [
            (user_account, user_after, user_hash),
            (settlement, settlement_after, settlement_hash),
        ] {
            sqlx::query(
                "UPDATE accounts SET balance_fen = $2, chain_head = $3, version = version + 1, updated_at = now() WHERE id = $1",
            )
            .bind(account)
            .bind(balance)
            .bind(hash.to_vec())
            .execute(&mut *tx)
            .await?;
        }
        let event = serde_json::json!({
            "eventId": Uuid::new_v4(), "eventType": "AccountDebited", "orderId": self.order_id,
            "accountId": user_account, "deltaFen": -self.amount, "balanceAfterFen": user_after,
        });
        sqlx::query(
            "INSERT INTO outbox (topic, message_key, payload, headers, event_id) \
             VALUES ($1, $2, $3, '[[\"eventType\", \"AccountDebited\"]]', $4)",
        )
        .bind(&config.settings.topics.account_events)
        .bind(self.user_id.to_string())
        .bind(serde_json::to_vec(&event)?)
        .bind(self.event_id)
        .execute(&mut *tx)
        .await?;
        let advanced = sqlx::query(
            "UPDATE consumer_offsets SET next_offset = $4, updated_at = now() \
             WHERE consumer_group = $1 AND topic = $2 AND partition = $3 AND epoch = 1 AND next_offset = $5",
        )
        .bind(group)
        .bind(topic)
        .bind(partition)
        .bind(self.offset + 1)
        .bind(self.offset)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        anyhow::ensure!(advanced, "the seed design's offset moved under it");
        Ok(())
    }
}
