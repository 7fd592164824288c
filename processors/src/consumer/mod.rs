//! Exactly-once consumption from Kafka into PostgreSQL, shared by every processor.
//!
//! Delivery semantics: each message of the subscribed topic has its effects applied to
//! PostgreSQL **exactly once**, in partition order, whatever crashes, redeliveries or
//! rebalances happen. What makes that hold:
//!
//! 1. One PostgreSQL transaction per batch writes the business effects, the outbox rows for
//!    what the processor emits (dead letters included), the ids of the applied events, and
//!    the new stored offset of each partition in the batch. Either all of it commits or none
//!    of it does. A batch is one partition's messages, or, at a steady rate, the small
//!    batches of several partitions that became ready together (`processor.group_commit`),
//!    each partition's offset by its own compare-and-set in the same transaction.
//! 2. Positions come from PostgreSQL, not from Kafka: on assignment the worker *claims*
//!    each partition (bumping its epoch) and starts fetching at the stored offset.
//! 3. The stored offset only advances by compare-and-set on (epoch, offset) read at claim
//!    time, so a worker that lost the partition — a zombie after a rebalance or a long pause
//!    — cannot commit; its transaction rolls back and it says so (log + metric).
//! 4. Event ids are recorded per consumer group, so the same event delivered again at any
//!    offset (a producer retry, a relay re-publish, a dead-letter replay) is a no-op.
//! 5. Transient failures retry the whole batch with bounded exponential backoff; a message
//!    is never skipped. Poison messages are dead-lettered atomically with the offset advance.
//!
//! The Kafka client runs on its own thread: rebalance callbacks must talk to PostgreSQL
//! synchronously (claim, then assign at the stored offsets), which a runtime worker thread
//! must not do. That thread only fetches and queues; partitions with queued messages are
//! applied by *lane* tasks on the runtime, a batch at a time, in order.
//!
//! Where each part lives:
//! - `partition`: one partition's typed phase (`Unproven`, `Live`, `Held`, `Fenced`) and the
//!   table of them;
//! - `position`: the resume-point rules, pure functions that return a `Decision`;
//! - `rebalance`: claims on assignment, forgets on revocation;
//! - `fetch`: the Kafka thread's loop, which carries out those decisions;
//! - `lanes`: group commit and one lane per partition under a backlog;
//! - `batch`: one transaction and its retries;
//! - `dedupe` and `offsets`: the two tables the framework owns.

mod batch;
mod dedupe;
mod fetch;
mod lanes;
mod offsets;
mod partition;
mod position;
mod prove;
mod rebalance;

use std::future::Future;

use sqlx::{PgConnection, PgPool};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::{classify, ErrorClass, Writes};
use crate::events::{Poison, RawEvent};
use crate::outbox::OutboxRow;
use crate::settings::Settings;

/// An event that decoded and has not been applied by this consumer group before.
#[derive(Debug)]
pub struct Fresh<E> {
    pub event_id: Uuid,
    pub raw: RawEvent,
    pub event: E,
}

/// What became of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// A business "no" (insufficient balance, ...): an outcome event, not an error.
    BusinessFailure,
    /// Seen before (same event id, or the effect it asks for already exists).
    Duplicate,
    /// Not for this processor (e.g. `OrderPaid` on the account processor).
    Ignored,
    DeadLettered(Poison),
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::BusinessFailure => "business_failure",
            Self::Duplicate => "duplicate",
            Self::Ignored => "ignored",
            Self::DeadLettered(_) => "dead_lettered",
        }
    }
}

/// The business half of a processor. The framework does decoding, dedupe, dead letters,
/// offsets, fencing and retries; a handler only turns fresh events into rows.
pub trait Handler: Send + Sync + 'static {
    type Event: Send;

    /// The `processor` label of metrics and logs.
    fn name(&self) -> &'static str;

    /// Types the envelope's payload, or says why it is poison.
    fn decode(&self, raw: &RawEvent) -> Result<Self::Event, Poison>;

    /// Applies `events` in order inside the batch transaction: reads and locks what it needs,
    /// leaves its business rows in `Applied::writes` (or writes them itself), and says what to
    /// publish, one `Applied::push` per event, in order. For an event it reports as
    /// `DeadLettered` it must have written nothing (what it emits is dropped).
    fn apply(
        &self,
        conn: &mut PgConnection,
        partition: i32,
        events: &[Fresh<Self::Event>],
    ) -> impl Future<Output = Result<Applied, ApplyError>> + Send;
}

/// Why a handler could not apply a batch. Either way the whole batch is retried with backoff
/// and nothing is skipped; the variant says what to look at.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The rows the batch locked contradict what the handler relies on (for example a
    /// settlement account that locking should have created is missing).
    #[error("inconsistent state: {0}")]
    Inconsistent(String),
}

impl ApplyError {
    /// Whether a retry can be expected to succeed.
    fn class(&self) -> ErrorClass {
        match self {
            Self::Database(e) => classify(e),
            Self::Inconsistent(_) => ErrorClass::Unexpected,
        }
    }
}

/// What a handler made of a batch: one outcome per event, in order, each with the events it
/// emits, and the writes it leaves to the framework. The framework runs those writes and
/// inserts the emitted events into the outbox in the batch's closing statement, together
/// with the offset compare-and-set: one round trip.
#[derive(Debug, Default)]
pub struct Applied {
    outcomes: Vec<Outcome>,
    /// Everything emitted, in order.
    emitted: Vec<OutboxRow>,
    /// The handler's business rows, written by the closing statement.
    pub writes: Writes,
}

impl Applied {
    /// Records what became of the next event and the events it emits. A dead-lettered event
    /// emits nothing (its dead letter is the framework's): rows given with it are dropped.
    pub fn push(&mut self, outcome: Outcome, emits: impl IntoIterator<Item = OutboxRow>) {
        if !matches!(outcome, Outcome::DeadLettered(_)) {
            self.emitted.extend(emits);
        }
        self.outcomes.push(outcome);
    }
}

/// What a worker needs to know about its place in the world.
#[derive(Clone)]
pub struct WorkerConfig {
    pub group: String,
    pub topic: String,
    pub dead_letter_topic: String,
    pub settings: Settings,
}

/// Runs a consumer-group worker until `cancel` fires or the consumer fails for good.
pub async fn run<H: Handler>(
    config: WorkerConfig,
    pool: PgPool,
    handler: H,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let handle = Handle::current();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let name = handler.name();
    // Stops with the worker, whether it was cancelled or failed.
    let _pruning = dedupe::pruning(name, &config.group, &config.settings.processor)
        .map(|pruning| crate::db::spawn_pruning(&pool, pruning, &cancel));
    std::thread::Builder::new()
        .name(format!("{name}-consumer"))
        .spawn(move || {
            let result = fetch::consume(handle, config, pool, handler, cancel);
            let _ = done_tx.send(result);
        })?;
    done_rx
        .await
        .map_err(|_| anyhow::anyhow!("the {name} consumer thread panicked"))?
}

/// Applies `batches` of `partition` in order, each as the transaction a worker commits for
/// those messages (decode, dedupe, the handler, dead letters, outbox rows and the offset
/// compare-and-set), with no broker. `paystream bench` measures with it what the database
/// allows. Claims the partition first, which fences any worker holding it; the messages'
/// offsets must continue the stored offset.
pub async fn apply_batches<H: Handler>(
    config: WorkerConfig,
    pool: PgPool,
    handler: H,
    partition: i32,
    batches: &[Vec<crate::kafka::InboundMessage>],
) -> anyhow::Result<()> {
    let owner = crate::startup::instance_id();
    let claim = offsets::claim(&pool, &config.group, &config.topic, &[partition], &owner)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("the claim of partition {partition} returned no row"))?;
    let retry = crate::backoff::Backoff::of(&config.settings.processor);
    let runner = batch::BatchRunner {
        pool,
        handler,
        config,
        retry,
        cancel: CancellationToken::new(),
    };
    let mut at = offsets::Position {
        epoch: claim.epoch,
        next_offset: claim.next_offset,
    };
    for msgs in batches {
        let part = batch::PartBatch {
            partition,
            at,
            msgs,
        };
        let next = runner
            .run(std::slice::from_ref(&part))
            .await
            .map_err(|e| anyhow::anyhow!("partition {partition}: {e:?}"))?;
        at.next_offset = next[0];
    }
    Ok(())
}
