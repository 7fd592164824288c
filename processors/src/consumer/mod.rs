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
//! applied by *lane* tasks on the runtime, a batch at a time, in order: one lane for the
//! partitions that became ready together while their batches are small, one lane each once
//! they are large (a backlog). So fetching goes on while batches commit, a backlog's
//! partitions commit in parallel, and one partition never has two batches in flight. A batch stuck for half of
//! `max.poll.interval.ms` stops the fetching, so that Kafka's liveness check moves the
//! partitions to a healthy worker, as it would for a stuck poll loop.

mod offsets;
mod retention;

pub use offsets::fingerprint;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use sqlx::{PgConnection, PgPool};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::{classify, ErrorClass};
use crate::dlq;
use crate::events::{decode_envelope, Poison, RawEvent};
use crate::outbox::{self, OutboxRow};
use crate::settings::Settings;
use crate::telemetry::METRICS;

/// A message as read from Kafka, owned.
#[derive(Debug, Clone)]
pub struct InboundMessage {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// The message's timestamp in milliseconds, when it has one.
    pub timestamp: Option<i64>,
}

impl InboundMessage {
    /// See `fingerprint`: what the stored offset remembers of the last message applied.
    pub fn fingerprint(&self) -> i64 {
        fingerprint(self.key.as_deref(), self.payload.as_deref(), self.timestamp)
    }
}

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

    /// Applies `events` in order inside the batch transaction: writes the business rows and
    /// says what to publish. Returns one outcome per event, in order. For an event it
    /// reports as `DeadLettered` it must have written and emitted nothing.
    fn apply(
        &self,
        conn: &mut PgConnection,
        partition: i32,
        events: &[Fresh<Self::Event>],
    ) -> impl Future<Output = Result<Applied, sqlx::Error>> + Send;
}

/// What a handler made of a batch.
#[derive(Debug, Default)]
pub struct Applied {
    /// One per event, in order.
    pub outcomes: Vec<Outcome>,
    /// Events to publish, in order. The framework writes them to the outbox in the batch's
    /// closing statement, together with the offset compare-and-set.
    pub emitted: Vec<OutboxRow>,
}

/// Where this worker stands in one assigned partition.
#[derive(Debug)]
struct PartitionState {
    epoch: i64,
    /// The stored offset: the next message to apply.
    next_offset: i64,
    /// The offset after the last message handed to the partition's lane (queued or being
    /// applied). Equal to `next_offset` when the lane is idle.
    dispatched: i64,
    /// Messages fetched and not yet applied, in offset order.
    queue: VecDeque<InboundMessage>,
    /// Whether a lane task is applying this partition's queue.
    running: bool,
    /// When the lane started the batch it is applying now, if any.
    batch_started: Option<Instant>,
    /// Set once a commit was refused: this worker no longer owns the partition.
    fenced: bool,
    /// Whether the fetch position was checked against the stored offset since the claim.
    /// Until it is, no message of the partition is applied (see `position`).
    verified: bool,
    /// The fingerprint of the message at `next_offset - 1` as the last commit stored it.
    last_fp: Option<i64>,
    /// How far back from the stored offset the fetch was last positioned (1 at the claim:
    /// the fetch starts with the message before the stored offset, to compare it).
    rewind: i64,
    /// When the fetch position was last set (claim or rewind) or, while unverified, when a
    /// message last arrived. Repositioning must not depend on messages arriving: resuming
    /// inside the last record batch can bring none.
    moved_at: Instant,
    /// Whether this claim already said that the log ends before the stored offset.
    reported_past_end: bool,
    /// Set when the log does not continue the stored position (another message before the
    /// stored offset): nothing more is fetched or applied until an operator acts and the
    /// partition is claimed again.
    held: bool,
}

impl PartitionState {
    /// Checks the message just before the stored offset: is it the one this consumer group
    /// applied last? `Err` says why not.
    fn check_previous(&self, previous: &InboundMessage) -> Result<(), &'static str> {
        match self.last_fp {
            Some(fp) if fp != previous.fingerprint() => Err(
                "the message before the stored offset is not the one this consumer group applied: the topic was probably recreated under this database",
            ),
            // No fingerprint (an offset stored by an older version): the only evidence is
            // that the log ended before the stored offset and grew back to it afterwards.
            None if self.reported_past_end => Err(
                "the log reached the stored offset only after it was found to end before it: the topic was probably recreated under this database",
            ),
            _ => Ok(()),
        }
    }

    /// Whether a fetch that starts exactly at the stored offset proves the position,
    /// without seeing the message before it.
    fn start_is_proof(&self) -> bool {
        self.next_offset == 0 || (self.last_fp.is_none() && !self.reported_past_end)
    }
}

/// The claim and stored offset a batch starts from: what its compare-and-set expects.
#[derive(Debug, Clone, Copy)]
pub(super) struct Position {
    epoch: i64,
    next_offset: i64,
}

#[derive(Debug)]
enum BatchError {
    /// This partition's commit was refused (the whole transaction rolled back).
    Fenced(i32),
    Cancelled,
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
    let _pruning = retention::pruning(name, &config.group, &config.settings.processor)
        .map(|pruning| crate::db::spawn_pruning(&pool, pruning, &cancel));
    std::thread::Builder::new()
        .name(format!("{name}-consumer"))
        .spawn(move || {
            let result = consume(handle, config, pool, handler, cancel);
            let _ = done_tx.send(result);
        })?;
    done_rx
        .await
        .map_err(|_| anyhow::anyhow!("the {name} consumer thread panicked"))?
}

struct Context {
    /// The handler's name: the `processor` label of metrics.
    name: &'static str,
    handle: Handle,
    pool: PgPool,
    group: String,
    topic: String,
    owner: String,
    cancel: CancellationToken,
    retry: Backoff,
    partitions: Partitions,
}

/// The assigned partitions, shared by the Kafka thread and the lane tasks.
type Partitions = Arc<Mutex<HashMap<i32, PartitionState>>>;

fn lock(
    partitions: &Mutex<HashMap<i32, PartitionState>>,
) -> std::sync::MutexGuard<'_, HashMap<i32, PartitionState>> {
    // A panic while holding this lock would already have ended the worker.
    partitions
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        // librdkafka keeps a partition paused across a rebalance; a held partition must
        // start afresh when it is claimed again.
        let mut held = TopicPartitionList::new();
        for (partition, state) in self.lock_partitions().drain() {
            let _ = METRICS
                .consumer_lag
                .remove_label_values(&[self.name, &partition.to_string()]);
            if state.held {
                held.add_partition(&self.topic, partition);
            }
        }
        if held.count() > 0 {
            if let Err(e) = consumer.resume(&held) {
                tracing::warn!(error = %e, "cannot resume held partitions");
            }
        }
        METRICS
            .assigned_partitions
            .with_label_values(&[self.name])
            .set(0);
        METRICS
            .partitions_held
            .with_label_values(&[self.name])
            .set(0);
        if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS {
            if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS {
                tracing::error!(?err, "rebalance error; dropping the assignment");
            } else {
                tracing::info!(partitions = ?partition_ids(tpl, &self.topic), "partitions revoked");
            }
            if let Err(e) = consumer.unassign() {
                tracing::error!(error = %e, "unassign failed");
            }
            return;
        }
        let ids = partition_ids(tpl, &self.topic);
        let claimed = match self.claim(&ids) {
            Some(claimed) => claimed,
            None => {
                let _ = consumer.unassign();
                return;
            }
        };
        let mut states = self.lock_partitions();
        for claim in &claimed {
            // Start with the message before the stored offset: it is compared with the one
            // the group applied last (`PartitionState::check_previous`).
            let rewind = i64::from(claim.next_offset > 0);
            let offset = Offset::Offset(claim.next_offset - rewind);
            if let Err(e) = tpl.set_partition_offset(&self.topic, claim.partition, offset) {
                tracing::error!(error = %e, partition = claim.partition, "cannot position partition");
            }
            states.insert(
                claim.partition,
                PartitionState {
                    epoch: claim.epoch,
                    next_offset: claim.next_offset,
                    dispatched: claim.next_offset,
                    queue: VecDeque::new(),
                    running: false,
                    batch_started: None,
                    fenced: false,
                    verified: false,
                    last_fp: claim.last_fp,
                    rewind,
                    moved_at: Instant::now(),
                    reported_past_end: false,
                    held: false,
                },
            );
        }
        drop(states);
        METRICS
            .assigned_partitions
            .with_label_values(&[self.name])
            .set(claimed.len() as i64);
        tracing::info!(
            partitions = ?claimed.iter().map(|c| (c.partition, c.next_offset, c.epoch)).collect::<Vec<_>>(),
            "partitions assigned and claimed (partition, stored offset, epoch)"
        );
        if let Err(e) = consumer.assign(tpl) {
            tracing::error!(error = %e, "assign failed");
        }
    }
}

impl Context {
    fn lock_partitions(&self) -> std::sync::MutexGuard<'_, HashMap<i32, PartitionState>> {
        lock(&self.partitions)
    }

    /// Claims `ids` in PostgreSQL, retrying until it works or the worker is cancelled.
    fn claim(&self, ids: &[i32]) -> Option<Vec<offsets::Claim>> {
        let mut attempt = 0;
        loop {
            let result = self.handle.block_on(offsets::claim(
                &self.pool,
                &self.group,
                &self.topic,
                ids,
                &self.owner,
            ));
            match result {
                Ok(claimed) => return Some(claimed),
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "claiming partitions failed; retrying");
                    if self.cancel.is_cancelled() {
                        return None;
                    }
                    std::thread::sleep(self.retry.delay(attempt));
                    attempt += 1;
                }
            }
        }
    }
}

fn partition_ids(tpl: &TopicPartitionList, topic: &str) -> Vec<i32> {
    tpl.elements_for_topic(topic)
        .iter()
        .map(|e| e.partition())
        .collect()
}

fn consume<H: Handler>(
    handle: Handle,
    config: WorkerConfig,
    pool: PgPool,
    handler: H,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let settings = &config.settings;
    let owner = format!(
        "{}-{}-{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into()),
        std::process::id(),
        &Uuid::new_v4().simple().to_string()[..8]
    );
    let retry = Backoff {
        initial: Duration::from_millis(settings.processor.retry_initial_ms),
        max: Duration::from_millis(settings.processor.retry_max_ms),
    };
    let partitions: Partitions = Arc::default();
    let context = Context {
        name: handler.name(),
        handle: handle.clone(),
        pool: pool.clone(),
        group: config.group.clone(),
        topic: config.topic.clone(),
        owner: owner.clone(),
        cancel: cancel.clone(),
        retry,
        partitions: partitions.clone(),
    };
    let consumer: BaseConsumer<Context> =
        crate::kafka::consumer_config(&settings.kafka, &config.group)
            .create_with_context(context)?;
    consumer.subscribe(&[config.topic.as_str()])?;
    tracing::info!(processor = handler.name(), group = %config.group, topic = %config.topic, %owner, "worker started");
    METRICS
        .partitions_held
        .with_label_values(&[handler.name()])
        .set(0);

    let (committed_tx, committed) = mpsc::channel();
    let lanes = Lanes {
        runner: Arc::new(BatchRunner {
            pool,
            handler,
            config: config.clone(),
            retry,
            cancel: cancel.clone(),
        }),
        partitions: partitions.clone(),
        committed: committed_tx,
    };
    let mut tasks: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    // Fetched but not yet applied messages, over all partitions, before polling pauses.
    let queue_limit =
        settings.processor.batch_max * 4 * (settings.kafka.partitions.max(1) as usize);
    let stall_limit = Duration::from_millis(settings.kafka.max_poll_interval_ms / 2);
    // Its own client, off this thread: a watermark request is a broker round trip, and the
    // poll loop must not wait for it.
    let lag_client: Arc<BaseConsumer> =
        Arc::new(crate::kafka::base_config(&settings.kafka).create()?);
    let mut lag_measured = Instant::now();
    while !cancel.is_cancelled() {
        // Mirror committed offsets to Kafka for lag tools; PostgreSQL stays the truth.
        for (partition, epoch, next_offset) in committed.try_iter() {
            if lock(&partitions)
                .get(&partition)
                .is_some_and(|s| s.epoch == epoch)
            {
                let _ = consumer.store_offset(&config.topic, partition, next_offset);
            }
        }
        tasks.retain(|task| !task.is_finished());
        if lag_measured.elapsed() >= LAG_INTERVAL {
            lag_measured = Instant::now();
            let stored: Vec<(i32, i64)> = lock(&partitions)
                .iter()
                .map(|(p, s)| (*p, s.next_offset))
                .collect();
            let (client, topic, name) = (
                lag_client.clone(),
                config.topic.clone(),
                lanes.runner.handler.name(),
            );
            handle.spawn_blocking(move || measure_lag(&client, &topic, name, &stored));
        }
        let (assigned, queued, stalled) = {
            let states = lock(&partitions);
            let stalled = states
                .values()
                .any(|s| s.batch_started.is_some_and(|t| t.elapsed() >= stall_limit));
            (
                states.len().max(1),
                states.values().map(|s| s.queue.len()).sum::<usize>(),
                stalled,
            )
        };
        if queued >= queue_limit || stalled {
            // The lanes are behind: let them drain before fetching more. A batch stuck for
            // half of max.poll.interval.ms stops polling altogether, so that Kafka's liveness
            // check hands this worker's partitions to a healthy one, as with a stuck poll
            // loop; the stuck batch's commit is then fenced.
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let messages = poll_batch(&consumer, settings, settings.processor.batch_max * assigned);
        check_silent_partitions(&consumer, &config.topic);
        if messages.is_empty() {
            continue;
        }
        let mut by_partition: BTreeMap<i32, Vec<InboundMessage>> = BTreeMap::new();
        for msg in messages {
            by_partition.entry(msg.partition).or_default().push(msg);
        }
        let mut states = lock(&partitions);
        let mut starting = Vec::new();
        for (partition, mut msgs) in by_partition {
            let Some(state) = states.get_mut(&partition).filter(|s| !s.fenced && !s.held) else {
                continue;
            };
            if !state.verified {
                // The fetch is moving: the partition is not silent.
                state.moved_at = Instant::now();
                // Having fetched the message just before the stored offset, the fetch is
                // contiguous through it: the position is right, if that message is the
                // one the group applied last.
                if let Some(previous) = msgs.iter().find(|m| m.offset == state.next_offset - 1) {
                    if let Err(why) = state.check_previous(previous) {
                        hold(&consumer, &config.topic, partition, state, why);
                        continue;
                    }
                    state.verified = true;
                }
            }
            // Older offsets were applied or queued already (a re-fetch after repositioning).
            msgs.retain(|m| m.offset >= state.dispatched);
            let Some(first) = msgs.first().map(|m| m.offset) else {
                continue;
            };
            if !state.verified && !position(&consumer, &config.topic, partition, state, first) {
                continue;
            }
            state.dispatched = msgs.last().map_or(state.dispatched, |m| m.offset + 1);
            state.queue.extend(msgs);
            if !state.running {
                state.running = true;
                starting.push((partition, state.epoch));
            }
        }
        drop(states);
        if settings.processor.group_commit {
            if !starting.is_empty() {
                tasks.push(handle.spawn(lanes.clone().run(starting)));
            }
        } else {
            for member in starting {
                tasks.push(handle.spawn(lanes.clone().run(vec![member])));
            }
        }
    }
    tracing::info!(processor = lanes.runner.handler.name(), "worker stopping");
    // Let the lanes finish or abandon their transaction (their retries stop on cancel).
    handle.block_on(join_all(tasks));
    Ok(())
}

/// Applies each partition's queue in order, one lane task per partition while it has
/// messages: the Kafka thread keeps fetching while batches commit, and partitions commit in
/// parallel.
struct Lanes<H> {
    runner: Arc<BatchRunner<H>>,
    partitions: Partitions,
    /// (partition, epoch, stored offset) after each commit, for the Kafka-side mirror.
    committed: mpsc::Sender<(i32, i64, i64)>,
}

impl<H> Clone for Lanes<H> {
    fn clone(&self) -> Self {
        Self {
            runner: self.runner.clone(),
            partitions: self.partitions.clone(),
            committed: self.committed.clone(),
        }
    }
}

impl<H: Handler> Lanes<H> {
    /// Applies the queues of `members` (partition, claim epoch) until they are empty, a
    /// claim is gone (revoked or re-claimed), a partition is fenced, or the worker is
    /// cancelled. While more than one member has messages and their batches are small, one
    /// transaction commits them all: at a steady rate every partition of a poll window has a
    /// few messages, and a transaction per partition would cost a commit, a relay round and
    /// about ten round trips each. Once the members' batches together fill `batch_max` (a
    /// backlog), each goes on in a lane of its own, and partitions commit in parallel.
    async fn run(self, mut members: Vec<(i32, i64)>) {
        let batch_max = self.runner.config.settings.processor.batch_max;
        loop {
            // Take each member's next batch; a member with nothing left leaves.
            let mut taken: Vec<(i32, Position, Vec<InboundMessage>)> = Vec::new();
            {
                let mut states = lock(&self.partitions);
                members.retain(|&(partition, epoch)| {
                    let Some(state) = claimed(&mut states, partition, epoch) else {
                        return false; // revoked or re-claimed; the new claim has its own lane
                    };
                    if state.queue.is_empty() || state.fenced {
                        state.running = false;
                        return false;
                    }
                    let n = state.queue.len().min(batch_max);
                    let batch: Vec<InboundMessage> = state.queue.drain(..n).collect();
                    state.batch_started = Some(Instant::now());
                    let at = Position {
                        epoch,
                        next_offset: state.next_offset,
                    };
                    taken.push((partition, at, batch));
                    true
                });
            }
            if taken.is_empty() {
                return;
            }
            let total: usize = taken.iter().map(|(_, _, batch)| batch.len()).sum();
            if taken.len() > 1 && total >= batch_max {
                // A backlog: put the batches back and give every member its own lane.
                {
                    let mut states = lock(&self.partitions);
                    for (partition, at, batch) in taken {
                        if let Some(state) = claimed(&mut states, partition, at.epoch) {
                            state.batch_started = None;
                            for msg in batch.into_iter().rev() {
                                state.queue.push_front(msg);
                            }
                        }
                    }
                }
                join_all(
                    members
                        .into_iter()
                        .map(|m| Box::pin(self.clone().run(vec![m]))),
                )
                .await;
                return;
            }
            let mut pending = taken;
            // A fenced member is dropped and the others are tried again at once: their
            // transaction was rolled back with it.
            loop {
                let parts: Vec<PartBatch<'_>> = pending
                    .iter()
                    .map(|(partition, at, batch)| PartBatch {
                        partition: *partition,
                        at: *at,
                        msgs: batch,
                    })
                    .collect();
                let result = self.runner.run(&parts).await;
                let mut states = lock(&self.partitions);
                match result {
                    Ok(next_offsets) => {
                        for ((partition, at, _), next_offset) in pending.iter().zip(next_offsets) {
                            if let Some(state) = claimed(&mut states, *partition, at.epoch) {
                                state.batch_started = None;
                                state.next_offset = next_offset;
                                let _ = self.committed.send((*partition, at.epoch, next_offset));
                            }
                        }
                        break;
                    }
                    Err(BatchError::Fenced(fenced)) => {
                        if let Some((_, at, _)) = pending.iter().find(|p| p.0 == fenced) {
                            if let Some(state) = claimed(&mut states, fenced, at.epoch) {
                                state.batch_started = None;
                                state.fenced = true;
                                state.queue.clear();
                                state.running = false;
                            }
                        }
                        pending.retain(|p| p.0 != fenced);
                        members.retain(|m| m.0 != fenced);
                        if pending.is_empty() {
                            break;
                        }
                    }
                    Err(BatchError::Cancelled) => {
                        for (partition, at, _) in &pending {
                            if let Some(state) = claimed(&mut states, *partition, at.epoch) {
                                state.batch_started = None;
                                state.running = false;
                            }
                        }
                        return;
                    }
                }
            }
        }
    }
}

/// The state of `partition` while `epoch` is still its claim (not revoked or re-claimed
/// since a lane took it on).
fn claimed(
    states: &mut HashMap<i32, PartitionState>,
    partition: i32,
    epoch: i64,
) -> Option<&mut PartitionState> {
    states.get_mut(&partition).filter(|s| s.epoch == epoch)
}

/// Checks the first message fetched at or after the stored offset, when the message just
/// before it was not seen (that case is settled in `consume`). Returns whether the
/// partition's messages may be applied now.
///
/// A fetch must resume exactly at the stored offset, and the message before it must be the
/// one the group applied last. When the first message is further on, the missing offsets are
/// either not in the log (deleted by retention, compacted, or transaction markers) — then the
/// gap is real and is logged — or the broker returned a later record batch than the one
/// holding the stored offset (seen with tansu when resuming in the middle of a batch). The
/// worker tells the two apart by rewinding, further each time, down to the low watermark,
/// and dropping what lies below the stored offset. It never skips an event that is still in
/// the topic, and never resumes in a log whose message before the stored offset is another.
fn position(
    consumer: &BaseConsumer<Context>,
    topic: &str,
    partition: i32,
    state: &mut PartitionState,
    first: i64,
) -> bool {
    if first == state.next_offset && state.start_is_proof() {
        state.verified = true;
        return true;
    }
    let low = match consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)) {
        Ok((low, _high)) => low,
        Err(e) => {
            tracing::warn!(partition, error = %e, "cannot read watermarks; will check the position again");
            return false;
        }
    };
    let gap = |why: &str| {
        tracing::error!(
            partition,
            stored = state.next_offset,
            first,
            missing = first - state.next_offset,
            "{why}"
        );
    };
    if state.next_offset < low {
        gap("stored offset is below the topic's low watermark: these messages were deleted before being applied");
        state.verified = true;
        return true;
    }
    // Fetching from the log start (directly, or after rewinding to it) and still seeing a
    // later offset first means the offsets in between do not exist; so does the message
    // before the stored offset, and there is nothing to compare.
    let from = state.next_offset - state.rewind;
    if from <= low {
        if first > state.next_offset {
            gap("offsets between the stored offset and the first message are not in the topic (transaction markers or compaction); continuing");
        }
        state.verified = true;
        return true;
    }
    rewind(consumer, topic, partition, state, low, first);
    false
}

/// Seeks further back than last time (x4, bounded by the low watermark).
fn rewind(
    consumer: &BaseConsumer<Context>,
    topic: &str,
    partition: i32,
    state: &mut PartitionState,
    low: i64,
    seen: i64,
) {
    state.rewind = (state.rewind * 4).max(1).min(state.next_offset - low);
    let target = state.next_offset - state.rewind;
    tracing::info!(
        partition,
        stored = state.next_offset,
        seen,
        target,
        "fetch did not resume at the stored offset; rewinding"
    );
    state.moved_at = Instant::now();
    seek(consumer, topic, partition, target);
}

/// How often each worker reports its consumer lag.
const LAG_INTERVAL: Duration = Duration::from_secs(5);

/// Sets the lag gauge of each assigned partition: high watermark minus stored offset. The
/// watermark is the broker's word and only a measure here; positioning never relies on it.
fn measure_lag(client: &BaseConsumer, topic: &str, name: &str, stored: &[(i32, i64)]) {
    for &(partition, next_offset) in stored {
        if let Ok((_, high)) = client.fetch_watermarks(topic, partition, Duration::from_secs(1)) {
            METRICS
                .consumer_lag
                .with_label_values(&[name, &partition.to_string()])
                .set((high - next_offset).max(0));
        }
    }
}

/// How long an unverified partition may stay silent before its position is checked.
const SILENCE: Duration = Duration::from_secs(2);

/// A claimed partition that stays silent is rewound too: resuming inside the last record
/// batch can bring nothing at all, and the broker's high watermark cannot be relied on to say
/// so (tansu reports it at that batch's boundary). Silence after a rewind that re-read the
/// message just before the stored offset is verified in `consume`; from the log start a fetch
/// is contiguous. This path never accepts a gap; it only seeks.
fn check_silent_partitions(consumer: &BaseConsumer<Context>, topic: &str) {
    let mut states = consumer.context().lock_partitions();
    for (partition, state) in states.iter_mut() {
        // Once reported, the fetch reads on from the log start: the message before the
        // stored offset is judged when (if ever) it arrives.
        if state.verified
            || state.fenced
            || state.held
            || state.reported_past_end
            || state.moved_at.elapsed() < SILENCE
        {
            continue;
        }
        state.moved_at = Instant::now();
        let low = match consumer.fetch_watermarks(topic, *partition, Duration::from_secs(5)) {
            Ok((low, _)) => low,
            Err(e) => {
                tracing::warn!(partition, error = %e, "cannot read watermarks; will check again");
                continue;
            }
        };
        if state.next_offset <= low {
            state.verified = true;
            continue;
        }
        // Read from the log start and still silent: the log ends before the stored offset
        // (a topic deleted and recreated under this database, or a database restored from
        // elsewhere). Nothing is applied until the position is proven, but new messages
        // would arrive at offsets the database counts as applied: an operator must decide.
        if state.next_offset - state.rewind <= low {
            state.reported_past_end = true;
            tracing::error!(
                partition,
                stored = state.next_offset,
                low,
                "the log holds nothing from its start up to the stored offset: the topic was probably recreated under this database; this partition waits (docs/operations.md, \"stored offset past the end of the log\")"
            );
            continue;
        }
        rewind(consumer, topic, *partition, state, low, state.next_offset);
    }
}

/// Stops a partition whose log does not continue the stored position (found before any of
/// its messages was queued): pauses its fetch, and says so in the log and in
/// `paystream_partitions_held`. It stays so until it is claimed again (a rebalance or a
/// restart), after an operator acted.
fn hold(
    consumer: &BaseConsumer<Context>,
    topic: &str,
    partition: i32,
    state: &mut PartitionState,
    why: &str,
) {
    state.held = true;
    tracing::error!(
        partition,
        stored = state.next_offset,
        "{why}; this partition is held and nothing of it is applied (docs/operations.md, \"stored offset past the end of the log\")"
    );
    METRICS
        .partitions_held
        .with_label_values(&[consumer.context().name])
        .inc();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    if let Err(e) = consumer.pause(&tpl) {
        tracing::warn!(partition, error = %e, "cannot pause the held partition; its messages are dropped");
    }
}

fn seek(consumer: &BaseConsumer<Context>, topic: &str, partition: i32, target: i64) {
    if let Err(e) = consumer.seek(
        topic,
        partition,
        Offset::Offset(target),
        Duration::from_secs(5),
    ) {
        tracing::warn!(partition, target, error = %e, "seek failed; it will be retried");
    }
}

/// Collects up to `limit` messages: waits up to 100 ms for the first, then lingers for
/// more until the first message is `batch_linger` old. Rebalance callbacks run inside these
/// polls.
fn poll_batch(
    consumer: &BaseConsumer<Context>,
    settings: &Settings,
    limit: usize,
) -> Vec<InboundMessage> {
    let mut out = Vec::new();
    let mut deadline: Option<Instant> = None;
    while out.len() < limit {
        let timeout = match deadline {
            None => Duration::from_millis(100),
            Some(d) => d.saturating_duration_since(Instant::now()),
        };
        match consumer.poll(timeout) {
            None => break,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "consumer error");
                break;
            }
            Some(Ok(m)) => {
                let timestamp = m.timestamp().to_millis();
                let age = timestamp
                    .map(|created| (chrono::Utc::now().timestamp_millis() - created).max(0) as u64);
                if let Some(age) = age {
                    METRICS
                        .consume_delay
                        .with_label_values(&[consumer.context().name])
                        .observe(age as f64 / 1000.0);
                }
                out.push(InboundMessage {
                    topic: m.topic().to_owned(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec),
                    headers: crate::kafka::owned_headers(&m),
                    timestamp,
                });
                deadline.get_or_insert_with(|| {
                    Instant::now() + linger_left(settings.processor.batch_linger(), age)
                });
            }
        }
    }
    out
}

/// How much longer a batch waits for more messages once it has its first, `age` ms after
/// that message was created: the linger is a budget for the oldest event's wait, so time the
/// event already spent in the producer and the broker counts against it. Never longer than
/// the whole linger (a producer clock running ahead cannot stretch it), and nothing is left
/// for an event already older than the linger (a backlog fills its batches anyway).
fn linger_left(linger: Duration, age_ms: Option<u64>) -> Duration {
    linger.saturating_sub(Duration::from_millis(age_ms.unwrap_or(0)))
}

struct BatchRunner<H> {
    pool: PgPool,
    handler: H,
    config: WorkerConfig,
    retry: Backoff,
    cancel: CancellationToken,
}

/// Where a message sits in a batch transaction: (part, index in the part).
type Slot = (usize, usize);

/// One partition's part of a batch transaction: the messages and the position they start from.
struct PartBatch<'a> {
    partition: i32,
    at: Position,
    msgs: &'a [InboundMessage],
}

impl PartBatch<'_> {
    /// The stored offset once this part commits.
    fn next_offset(&self) -> i64 {
        self.msgs
            .last()
            .map_or(self.at.next_offset, |m| m.offset + 1)
    }
}

/// How one try of a batch transaction ended, when the database answered.
enum Attempt {
    /// Committed; one outcome per message, per part.
    Committed(Vec<Vec<Outcome>>),
    /// The compare-and-set of this partition's offset was refused: this worker no longer owns
    /// it. Everything was rolled back, the other parts included.
    Fenced(i32),
}

impl<H: Handler> BatchRunner<H> {
    /// Applies the parts of one batch transaction (one partition's messages, or several
    /// partitions' small batches committed together), retrying transient failures until it
    /// commits, a partition is fenced, or the worker is cancelled. Returns the new stored
    /// offset of each part.
    async fn run(&self, parts: &[PartBatch<'_>]) -> Result<Vec<i64>, BatchError> {
        let name = self.handler.name();
        let mut attempt = 0;
        loop {
            let started = Instant::now();
            match self.attempt(parts).await {
                Ok(Attempt::Committed(outcomes)) => {
                    let elapsed = started.elapsed().as_secs_f64();
                    METRICS
                        .batch_duration
                        .with_label_values(&[name])
                        .observe(elapsed);
                    let messages: usize = parts.iter().map(|p| p.msgs.len()).sum();
                    METRICS
                        .batch_size
                        .with_label_values(&[name])
                        .observe(messages as f64);
                    METRICS
                        .batch_partitions
                        .with_label_values(&[name])
                        .observe(parts.len() as f64);
                    for outcome in outcomes.iter().flatten() {
                        METRICS
                            .events_consumed
                            .with_label_values(&[name, &self.config.topic, outcome.label()])
                            .inc();
                    }
                    for part in parts {
                        tracing::debug!(
                            processor = name,
                            partition = part.partition,
                            stored = part.at.next_offset,
                            first = part.msgs.first().map(|m| m.offset),
                            next = part.next_offset(),
                            together = parts.len(),
                            "batch committed"
                        );
                    }
                    return Ok(parts.iter().map(PartBatch::next_offset).collect());
                }
                Ok(Attempt::Fenced(partition)) => {
                    METRICS.fenced_commits.with_label_values(&[name]).inc();
                    let at = parts
                        .iter()
                        .find(|p| p.partition == partition)
                        .map(|p| p.at);
                    tracing::warn!(
                        processor = name,
                        partition,
                        epoch = at.map(|a| a.epoch),
                        offset = at.map(|a| a.next_offset),
                        "commit fenced: this worker no longer owns the partition; batch rolled back"
                    );
                    return Err(BatchError::Fenced(partition));
                }
                Err(e) => {
                    let class = classify(&e);
                    METRICS
                        .retries
                        .with_label_values(&[name, class.as_str()])
                        .inc();
                    let delay = self.retry.delay(attempt);
                    let partitions: Vec<i32> = parts.iter().map(|p| p.partition).collect();
                    if class == ErrorClass::Transient {
                        tracing::warn!(processor = name, ?partitions, attempt, error = %e, ?delay, "transient failure; retrying batch");
                    } else {
                        tracing::error!(processor = name, ?partitions, attempt, error = ?e, ?delay, "unexpected failure; retrying batch (nothing is skipped)");
                    }
                    tokio::select! {
                        _ = self.cancel.cancelled() => return Err(BatchError::Cancelled),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    attempt += 1;
                }
            }
        }
    }

    /// One try of one batch transaction.
    async fn attempt(&self, parts: &[PartBatch<'_>]) -> Result<Attempt, sqlx::Error> {
        let settings = &self.config.settings;
        // Outcomes per part, per message; decoded events in (part, message) order.
        let mut outcomes: Vec<Vec<Option<Outcome>>> =
            parts.iter().map(|p| vec![None; p.msgs.len()]).collect();
        let mut decoded: Vec<(Slot, Fresh<H::Event>)> = Vec::new();
        for (k, part) in parts.iter().enumerate() {
            for (i, msg) in part.msgs.iter().enumerate() {
                let result =
                    decode_envelope(msg.payload.as_deref(), settings.processor.max_event_bytes)
                        .and_then(|raw| {
                            Ok(Fresh {
                                event_id: raw.event_id,
                                event: self.handler.decode(&raw)?,
                                raw,
                            })
                        });
                match result {
                    Ok(fresh) => decoded.push(((k, i), fresh)),
                    Err(poison) => outcomes[k][i] = Some(Outcome::DeadLettered(poison)),
                }
            }
        }

        // Dedupe by claiming: the processed rows go in first, and only the events whose row
        // is new are applied. A concurrent transaction claiming the same event makes this
        // one wait for its outcome. The rows of events the handler dead-letters are deleted
        // again at the end, so that a replay after a fix can apply them.
        let mut in_batch = HashSet::new();
        let mut claims = ProcessedRows::default();
        for ((k, i), f) in &decoded {
            if in_batch.insert(f.event_id) {
                claims.push(f.event_id, parts[*k].partition, parts[*k].msgs[*i].offset);
            } else {
                outcomes[*k][*i] = Some(Outcome::Duplicate);
            }
        }
        let mut tx = self.pool.begin().await?;
        match self
            .in_transaction(&mut tx, parts, claims, decoded, outcomes)
            .await
        {
            Ok(Attempt::Committed(outcomes)) => {
                tx.commit().await?;
                Ok(Attempt::Committed(outcomes))
            }
            Ok(fenced) => {
                tx.rollback().await?;
                Ok(fenced)
            }
            Err(e) => {
                // At once, not on drop: an aborted transaction keeps its row locks until its
                // rollback runs, and the retry (or another worker) would wait on them.
                crate::db::release(tx).await;
                Err(e)
            }
        }
    }

    /// The statements of one batch transaction, up to its commit: `Committed` means ready
    /// to commit, `Fenced` that a compare-and-set was refused and it must roll back.
    async fn in_transaction(
        &self,
        tx: &mut PgConnection,
        parts: &[PartBatch<'_>],
        claims: ProcessedRows,
        decoded: Vec<(Slot, Fresh<H::Event>)>,
        mut outcomes: Vec<Vec<Option<Outcome>>>,
    ) -> Result<Attempt, sqlx::Error> {
        let settings = &self.config.settings;
        let group = &self.config.group;
        let claimed = claims.claim(&mut *tx, group, &self.config.topic).await?;
        let (positions, fresh): (Vec<Slot>, Vec<Fresh<H::Event>>) = decoded
            .into_iter()
            .filter(|((k, i), f)| {
                if outcomes[*k][*i].is_some() {
                    return false; // a repeat within the batch
                }
                let new = claimed.contains(&f.event_id);
                if !new {
                    outcomes[*k][*i] = Some(Outcome::Duplicate);
                }
                new
            })
            .unzip();

        // One handler call for every part: the settlement side takes the first part's shard.
        let applied = self
            .handler
            .apply(&mut *tx, parts[0].partition, &fresh)
            .await?;
        let mut unclaim = Vec::new();
        for (((k, i), f), outcome) in positions.into_iter().zip(&fresh).zip(applied.outcomes) {
            if matches!(outcome, Outcome::DeadLettered(_)) {
                unclaim.push(f.event_id);
            }
            outcomes[k][i] = Some(outcome);
        }

        let outcomes: Vec<Vec<Outcome>> = outcomes
            .into_iter()
            .map(|part| {
                part.into_iter()
                    .map(|o| o.unwrap_or(Outcome::Ignored))
                    .collect()
            })
            .collect();
        let mut dead_letters: Vec<OutboxRow> = Vec::new();
        for (part, part_outcomes) in parts.iter().zip(&outcomes) {
            for (msg, outcome) in part.msgs.iter().zip(part_outcomes) {
                if let Outcome::DeadLettered(poison) = outcome {
                    tracing::warn!(partition = part.partition, offset = msg.offset, class = poison.class.as_str(), error = %poison.message, "dead-lettering poison message");
                    dead_letters.push(dlq::dead_letter(
                        &self.config.dead_letter_topic,
                        group,
                        msg,
                        poison,
                        self.config.settings.dlq.max_attempts,
                        self.config.settings.kafka.message_max_bytes,
                    ));
                }
            }
        }

        if settings.processor.stall_before_commit_ms > 0 {
            tokio::time::sleep(Duration::from_millis(
                settings.processor.stall_before_commit_ms,
            ))
            .await;
        }
        // One closing statement per part: its offset's compare-and-set. The first also
        // carries the outbox rows and the unclaims.
        for (k, part) in parts.iter().enumerate() {
            let first = k == 0;
            let close = offsets::Close {
                group,
                topic: &self.config.topic,
                partition: part.partition,
                at: part.at,
                next_offset: part.next_offset(),
                last_fp: part.msgs.last().map(InboundMessage::fingerprint),
                outbox: if first {
                    outbox::Columns::new(applied.emitted.iter().chain(&dead_letters))
                } else {
                    outbox::Columns::default()
                },
                unclaim: if first { &unclaim } else { &[] },
            };
            if !close.execute(&mut *tx).await? {
                return Ok(Attempt::Fenced(part.partition));
            }
        }
        Ok(Attempt::Committed(outcomes))
    }
}

#[derive(Default)]
struct ProcessedRows {
    event_ids: Vec<Uuid>,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
}

impl ProcessedRows {
    fn push(&mut self, event_id: Uuid, partition: i32, offset: i64) {
        self.event_ids.push(event_id);
        self.partitions.push(partition);
        self.offsets.push(offset);
    }

    /// Inserts the rows that are not there yet; returns their event ids.
    async fn claim(
        &self,
        conn: &mut PgConnection,
        group: &str,
        topic: &str,
    ) -> Result<HashSet<Uuid>, sqlx::Error> {
        if self.event_ids.is_empty() {
            return Ok(HashSet::new());
        }
        let claimed: Vec<Uuid> = sqlx::query_scalar(
            r#"
            INSERT INTO processed_events (consumer_group, event_id, topic, partition, "offset")
            SELECT $1, e, $3, p, o FROM unnest($2::uuid[], $4::int[], $5::bigint[]) AS t(e, p, o)
            ON CONFLICT DO NOTHING
            RETURNING event_id
            "#,
        )
        .bind(group)
        .bind(&self.event_ids)
        .bind(topic)
        .bind(&self.partitions)
        .bind(&self.offsets)
        .fetch_all(conn)
        .await?;
        Ok(claimed.into_iter().collect())
    }
}

/// Bounded exponential backoff with jitter.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .initial
            .saturating_mul(2u32.saturating_pow(attempt.min(16)));
        let capped = exp.min(self.max);
        // Up to 25 % jitter so that workers retrying together do not stampede.
        let jitter_range = (capped.as_millis() as u64 / 4).max(1);
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        capped - Duration::from_millis(random % jitter_range).min(capped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_bounded() {
        let b = Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(5),
        };
        assert!(b.delay(0) <= Duration::from_millis(50));
        assert!(b.delay(3) > Duration::from_millis(50 * 8 * 3 / 4 - 1));
        for attempt in [10, 100, u32::MAX] {
            let d = b.delay(attempt);
            assert!(
                d <= Duration::from_secs(5) && d >= Duration::from_millis(3750),
                "{d:?}"
            );
        }
    }

    #[test]
    fn the_linger_counts_from_when_the_first_event_was_created() {
        let linger = Duration::from_millis(20);
        assert_eq!(linger_left(linger, Some(8)), Duration::from_millis(12));
        assert_eq!(linger_left(linger, Some(0)), linger);
        assert_eq!(
            linger_left(linger, None),
            linger,
            "no timestamp: the whole linger"
        );
        assert_eq!(linger_left(linger, Some(20)), Duration::ZERO);
        assert_eq!(
            linger_left(linger, Some(5_000)),
            Duration::ZERO,
            "a backlog"
        );
    }
}
