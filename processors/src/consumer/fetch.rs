//! The Kafka thread: polls the broker, proves each claimed partition's position (carrying out
//! the decisions of `position`), queues the messages of live partitions and starts their
//! lanes. It never applies anything itself, so fetching goes on while batches commit.
//!
//! Backpressure: fetching pauses while the queues hold `4 × batch_max` messages per
//! partition or `processor.queue_max_bytes` bytes, and stops altogether while a batch has been stuck for half of
//! `max.poll.interval.ms`, so that Kafka's liveness check moves the partitions to a healthy
//! worker, as it would for a stuck poll loop; the stuck batch's commit is then fenced.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::consumer::{BaseConsumer, Consumer};
use sqlx::PgPool;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::batch::BatchRunner;
use super::lanes::Lanes;
use super::partition::{lock, Lane, Partitions, Phase};
use super::rebalance::Context;
use super::{offsets, Handler, WorkerConfig};
use crate::backoff::Backoff;
use crate::kafka::InboundMessage;
use crate::settings::Settings;
use crate::telemetry::METRICS;

/// How often each worker reports its consumer lag (and reads how many partitions the topic
/// has).
const LAG_INTERVAL: Duration = Duration::from_secs(5);

/// Runs the worker's Kafka side on the calling thread until `cancel` fires, then waits for
/// the lanes to finish or abandon their transaction.
pub(super) fn consume<H: Handler>(
    handle: Handle,
    config: WorkerConfig,
    pool: PgPool,
    handler: H,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let settings = &config.settings;
    let owner = crate::startup::instance_id();
    let retry = Backoff::of(&settings.processor);
    let partitions: Partitions = Arc::default();
    let name = handler.name();
    let context = Context {
        name,
        handle: handle.clone(),
        pool: pool.clone(),
        group: config.group.clone(),
        topic: config.topic.clone(),
        owner: owner.clone(),
        cancel: cancel.clone(),
        retry,
        partitions: partitions.clone(),
        interrupted: Mutex::default(),
    };
    let consumer: BaseConsumer<Context> =
        crate::kafka::consumer_config(&settings.kafka, &config.group)
            .create_with_context(context)?;
    consumer.subscribe(&[config.topic.as_str()])?;
    tracing::info!(processor = name, group = %config.group, topic = %config.topic, %owner, "worker started");
    METRICS.partitions_held.with_label_values(&[name]).set(0);

    let (committed_tx, committed) = mpsc::channel();
    let membership = Membership::new(&pool, owner.clone(), &settings.kafka);
    let runner = BatchRunner {
        pool,
        handler,
        config: config.clone(),
        retry,
        cancel: cancel.clone(),
    };
    let lanes = Lanes::new(runner, partitions.clone(), committed_tx);
    let fetch = Fetch {
        lag_client: Arc::new(crate::kafka::base_config(&settings.kafka).create()?),
        consumer,
        config,
        handle,
        partitions,
        lanes,
        committed,
        tasks: Vec::new(),
        name,
        membership,
        topic_partitions: Arc::default(),
    };
    fetch.run(&cancel);
    Ok(())
}

/// What this worker says of the partitions it holds, and what it found of those nobody holds
/// (see `check_membership`).
struct Membership {
    pool: PgPool,
    owner: String,
    /// How often this worker says what it holds.
    every: Duration,
    /// A worker that said nothing for this long holds nothing (the session timeout).
    live: Duration,
    said_at: Option<Instant>,
    orphaned_since: Option<Instant>,
    rejoined_at: Option<Instant>,
    /// Rejoins since the group last settled (see `rejoin_due`).
    rejoins: u32,
    /// The heartbeat in flight: it runs on the runtime, so the poll loop never waits for
    /// PostgreSQL; its answer is taken up once it is there.
    pending: Option<JoinHandle<Result<Vec<i32>, sqlx::Error>>>,
}

impl Membership {
    fn new(pool: &PgPool, owner: String, kafka: &crate::settings::KafkaSettings) -> Self {
        let session = Duration::from_millis(kafka.session_timeout_ms);
        Self {
            pool: pool.clone(),
            owner,
            every: (session / 5).max(Duration::from_millis(500)),
            live: session,
            said_at: None,
            orphaned_since: None,
            rejoined_at: None,
            rejoins: 0,
            pending: None,
        }
    }
}

/// The Kafka thread's state; `prove` adds the proof of positions to it.
pub(super) struct Fetch<H> {
    pub(super) consumer: BaseConsumer<Context>,
    pub(super) config: WorkerConfig,
    handle: Handle,
    pub(super) partitions: Partitions,
    lanes: Lanes<H>,
    /// (partition, epoch, stored offset) after each commit, for the Kafka-side mirror.
    committed: mpsc::Receiver<(i32, i64, i64)>,
    tasks: Vec<JoinHandle<()>>,
    /// Its own client, off this thread: a watermark request is a broker round trip, and the
    /// poll loop must not wait for it.
    lag_client: Arc<BaseConsumer>,
    pub(super) name: &'static str,
    membership: Membership,
    /// How many partitions the topic has, as the broker last said (0: not known yet).
    topic_partitions: Arc<AtomicI32>,
}

impl<H: Handler> Fetch<H> {
    fn run(mut self, cancel: &CancellationToken) {
        let settings = self.config.settings.clone();
        // Fetched but not yet applied messages, over all partitions, before polling pauses.
        let queue_limit =
            settings.processor.batch_max * 4 * (settings.kafka.partitions.max(1) as usize);
        let stall_limit = Duration::from_millis(settings.kafka.max_poll_interval_ms / 2);
        let mut lag_measured: Option<Instant> = None;
        while !cancel.is_cancelled() {
            self.mirror_commits();
            self.tasks.retain(|task| !task.is_finished());
            if lag_measured.is_none_or(|at| at.elapsed() >= LAG_INTERVAL) {
                lag_measured = Some(Instant::now());
                self.measure_lag();
            }
            self.check_membership();
            let (assigned, queued, queued_bytes, stalled) = {
                let states = lock(&self.partitions);
                (
                    states.len().max(1),
                    states.values().map(|s| s.queue.len()).sum::<usize>(),
                    states.values().map(|s| s.queued_bytes).sum::<usize>(),
                    states.values().any(|s| s.stalled(stall_limit)),
                )
            };
            let full = queued >= queue_limit || queued_bytes >= settings.processor.queue_max_bytes;
            if full || stalled {
                // The lanes are behind (or stuck): let them drain before fetching more.
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            let messages = poll_batch(
                &self.consumer,
                &settings,
                settings.processor.batch_max * assigned,
            );
            self.check_silent_partitions();
            if !messages.is_empty() {
                self.dispatch(messages);
            }
        }
        tracing::info!(processor = self.name, "worker stopping");
        let (group, topic) = (&self.config.group, &self.config.topic);
        // A heartbeat still in flight would write the membership back after it is removed.
        if let Some(heartbeat) = self.membership.pending.take() {
            let _ = self.handle.block_on(heartbeat);
        }
        self.handle.block_on(offsets::leave(
            &self.membership.pool,
            group,
            topic,
            &self.membership.owner,
        ));
        // Let the lanes finish or abandon their transaction (their retries stop on cancel).
        self.handle.block_on(join_all(self.tasks));
    }

    /// Says which partitions this worker holds, and rejoins the group when a partition has
    /// been held by no live worker for a session timeout. Standard Kafka reassigns a dead
    /// member's partitions by itself; the development broker's coordinator (tansu 0.6) can
    /// leave one assigned to nobody after a worker dies and comes back, with no rebalance to
    /// follow. Leaving and joining again makes it assign every partition anew; on Apache
    /// Kafka this never fires, as nothing stays orphaned for a session timeout.
    ///
    /// The heartbeat is a PostgreSQL transaction; it runs on the runtime and its answer is
    /// taken up at a later turn of the loop, so fetching never waits for the database here
    /// (a slow or frozen server would otherwise hold every partition's messages back).
    fn check_membership(&mut self) {
        let m = &mut self.membership;
        if let Some(heartbeat) = m.pending.take_if(|h| h.is_finished()) {
            match self.handle.block_on(heartbeat) {
                Ok(Ok(orphans)) => {
                    let partitions = self.topic_partitions.load(Ordering::Relaxed);
                    self.act_on_orphans(in_topic(orphans, partitions));
                }
                Ok(Err(error)) => {
                    tracing::debug!(%error, "could not say which partitions this worker holds");
                }
                Err(error) => tracing::warn!(%error, "the membership heartbeat task failed"),
            }
            return;
        }
        if m.pending.is_some() || m.said_at.is_some_and(|at| at.elapsed() < m.every) {
            return;
        }
        m.said_at = Some(Instant::now());
        let held: Vec<i32> = lock(&self.partitions).keys().copied().collect();
        let (pool, group, topic, owner, live) = (
            m.pool.clone(),
            self.config.group.clone(),
            self.config.topic.clone(),
            m.owner.clone(),
            m.live,
        );
        m.pending = Some(self.handle.spawn(async move {
            offsets::heartbeat(&pool, &group, &topic, &owner, &held, live).await
        }));
    }

    /// Counts the orphans a heartbeat found, and rejoins the group when they have been
    /// orphans for a session timeout (see `check_membership`).
    fn act_on_orphans(&mut self, orphans: Vec<i32>) {
        let m = &mut self.membership;
        METRICS
            .partitions_orphaned
            .with_label_values(&[self.name])
            .set(orphans.len() as i64);
        let since_rejoin = m.rejoined_at.map(|at| at.elapsed());
        if orphans.is_empty() {
            m.orphaned_since = None;
            if since_rejoin.is_none_or(|d| d >= settled_after(m.live)) {
                m.rejoins = 0;
            }
            return;
        }
        let since = *m.orphaned_since.get_or_insert_with(Instant::now);
        if !rejoin_due(since.elapsed(), since_rejoin, m.rejoins, m.live) {
            return;
        }
        m.rejoins += 1;
        tracing::warn!(
            processor = self.name,
            ?orphans,
            rejoins = m.rejoins,
            next_at_the_earliest_s = rejoin_backoff(m.live, m.rejoins).as_secs(),
            "partitions held by no live worker for a session timeout (the broker's group coordinator left them unassigned); rejoining the group"
        );
        METRICS
            .consumer_rejoins
            .with_label_values(&[self.name])
            .inc();
        m.rejoined_at = Some(Instant::now());
        m.orphaned_since = None;
        self.consumer.unsubscribe();
        if let Err(error) = self.consumer.subscribe(&[self.config.topic.as_str()]) {
            tracing::error!(%error, "could not subscribe again; retrying at the next check");
        }
    }

    /// Mirrors committed offsets to Kafka for lag tools; PostgreSQL stays the truth.
    fn mirror_commits(&self) {
        for (partition, epoch, next_offset) in self.committed.try_iter() {
            if lock(&self.partitions)
                .get(&partition)
                .is_some_and(|s| s.epoch == epoch)
            {
                let _ = self
                    .consumer
                    .store_offset(&self.config.topic, partition, next_offset);
            }
        }
    }

    fn measure_lag(&self) {
        let stored: Vec<(i32, i64)> = lock(&self.partitions)
            .iter()
            .map(|(p, s)| (*p, s.next_offset))
            .collect();
        let (client, topic, name, partitions) = (
            self.lag_client.clone(),
            self.config.topic.clone(),
            self.name,
            self.topic_partitions.clone(),
        );
        self.handle.spawn_blocking(move || {
            if let Some(count) = partition_count(&client, &topic) {
                partitions.store(count, Ordering::Relaxed);
            }
            measure_lag(&client, &topic, name, &stored);
        });
    }

    /// Queues the messages of each live partition (proving the position of unproven ones
    /// first) and starts a lane for each partition that had none.
    fn dispatch(&mut self, messages: Vec<InboundMessage>) {
        let mut by_partition: BTreeMap<i32, Vec<InboundMessage>> = BTreeMap::new();
        for msg in messages {
            by_partition.entry(msg.partition).or_default().push(msg);
        }
        let group_commit = self.config.settings.processor.group_commit;
        let mut states = lock(&self.partitions);
        let (mut group, mut singles) = (Vec::new(), Vec::new());
        for (partition, mut msgs) in by_partition {
            let Some(state) = states.get_mut(&partition) else {
                continue;
            };
            if !self.prove_by_previous(partition, state, &msgs) {
                continue;
            }
            // Older offsets were applied or queued already (a re-fetch after repositioning).
            msgs.retain(|m| m.offset >= state.dispatched);
            let Some(first) = msgs.first().map(|m| m.offset) else {
                continue;
            };
            if matches!(state.phase, Phase::Live) {
                self.report_jump(partition, state.dispatched, first);
            } else if !self.prove_by_first(partition, state, first) {
                continue;
            }
            state.dispatched = msgs.last().map_or(state.dispatched, |m| m.offset + 1);
            state.enqueue(msgs);
            if state.lane == Lane::Idle {
                if !group_commit {
                    state.lane = Lane::Ready;
                    singles.push((partition, state.epoch));
                } else if self.lanes.start_group() {
                    state.lane = Lane::Ready;
                    group.push((partition, state.epoch));
                } // else the running group lane adopts it at its next batch
            }
        }
        drop(states);
        if !group.is_empty() {
            self.tasks
                .push(self.handle.spawn(self.lanes.clone().run_group(group)));
        }
        for member in singles {
            self.tasks
                .push(self.handle.spawn(self.lanes.clone().run_one(member)));
        }
    }
}

/// How many partitions the broker says `topic` has; `None` when it could not say.
fn partition_count(client: &BaseConsumer, topic: &str) -> Option<i32> {
    let metadata = client
        .fetch_metadata(Some(topic), Duration::from_secs(1))
        .ok()?;
    let topic = metadata.topics().iter().find(|t| t.name() == topic)?;
    if topic.error().is_some() || topic.partitions().is_empty() {
        return None;
    }
    i32::try_from(topic.partitions().len()).ok()
}

/// The orphans the topic still has, given how many partitions it has (`0`: not known, all of
/// them). A stored offset of a partition the topic no longer has (it was deleted and created
/// again with fewer) is nobody's to hold: no worker will ever be assigned it, so counting it
/// would keep the alert firing and the workers rejoining for good. `paystream audit` reports
/// such an offset once something was applied there, for an operator to remove.
fn in_topic(mut orphans: Vec<i32>, partitions: i32) -> Vec<i32> {
    if partitions > 0 {
        orphans.retain(|&p| p < partitions);
    }
    orphans
}

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
                use rdkafka::types::RDKafkaErrorCode::{UnknownTopic, UnknownTopicOrPartition};
                match e.rdkafka_error_code() {
                    // The worker keeps polling (the topic may be created meanwhile), and says
                    // what fixes it.
                    Some(UnknownTopic | UnknownTopicOrPartition) => tracing::warn!(
                        error = %e,
                        "the topic does not exist on the broker; run `paystream topics create`"
                    ),
                    _ => tracing::warn!(error = %e, "consumer error"),
                }
                break;
            }
            Some(Ok(m)) => {
                let msg = InboundMessage::read(&m);
                let age = msg
                    .timestamp
                    .map(|created| (chrono::Utc::now().timestamp_millis() - created).max(0) as u64);
                if let Some(age) = age {
                    METRICS
                        .consume_delay
                        .with_label_values(&[consumer.context().name])
                        .observe(age as f64 / 1000.0);
                }
                out.push(msg);
                deadline.get_or_insert_with(|| {
                    Instant::now() + linger_left(settings.processor.batch_linger(), age)
                });
            }
        }
    }
    out
}

/// Whether to leave and rejoin the group: some partition has been held by no live worker for
/// a session timeout (`live`), and the last rejoin is at least `rejoin_backoff` ago. Each
/// rejoin makes the coordinator rebalance the whole group, and while it does, partitions are
/// held by nobody: on a slow coordinator (a broker just restarted) rejoins every few seconds
/// by several workers keep the group rebalancing for good, and a partition whose position
/// takes a few fetches to prove never gets there. So the wait doubles with every rejoin until
/// the group has settled (no orphans for `settled_after`).
fn rejoin_due(
    orphaned_for: Duration,
    since_rejoin: Option<Duration>,
    rejoins: u32,
    live: Duration,
) -> bool {
    orphaned_for >= live && since_rejoin.is_none_or(|d| d >= rejoin_backoff(live, rejoins))
}

/// The least time between a worker's rejoins after `rejoins` of them: two session timeouts,
/// doubling up to thirty-two.
fn rejoin_backoff(live: Duration, rejoins: u32) -> Duration {
    live * 2u32.pow(rejoins.clamp(1, 5))
}

/// How long the group must go without orphans after a rejoin for the backoff to start over.
fn settled_after(live: Duration) -> Duration {
    live * 4
}

/// How much longer a batch waits for more messages once it has its first, `age` ms after
/// that message was created: the linger is a budget for the oldest event's wait, so time the
/// event already spent in the producer and the broker counts against it. Never longer than
/// the whole linger (a producer clock running ahead cannot stretch it), and nothing is left
/// for an event already older than the linger (a backlog fills its batches anyway).
fn linger_left(linger: Duration, age_ms: Option<u64>) -> Duration {
    linger.saturating_sub(Duration::from_millis(age_ms.unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_rejoins_only_after_a_session_of_orphans_and_ever_less_often_until_the_group_settles(
    ) {
        let live = Duration::from_secs(10);
        let s = Duration::from_secs;
        // (orphaned for, since the last rejoin, rejoins so far, due)
        let cases = [
            (s(9), None, 0, false),
            (s(10), None, 0, true),
            (s(10), Some(s(19)), 1, false),
            (s(10), Some(s(20)), 1, true),
            (s(30), Some(s(39)), 2, false),
            (s(10), Some(s(40)), 2, true),
            (s(10), Some(s(79)), 3, false),
            (s(10), Some(s(80)), 3, true),
            (s(10), Some(s(319)), 9, false),
            (s(10), Some(s(320)), 9, true),
            (s(5), Some(s(1_000)), 9, false),
        ];
        for (orphaned, since, rejoins, due) in cases {
            assert_eq!(
                rejoin_due(orphaned, since, rejoins, live),
                due,
                "orphaned {orphaned:?}, since {since:?}, rejoins {rejoins}"
            );
        }
        assert_eq!(settled_after(live), s(40));
    }

    #[test]
    fn a_partition_the_topic_no_longer_has_is_no_orphan() {
        // (orphans found in the stored offsets, partitions the topic has, orphans counted)
        let cases: [(&[i32], i32, &[i32]); 5] = [
            (&[1, 5], 2, &[1]),
            (&[5], 1, &[]),
            (&[0, 1, 2], 3, &[0, 1, 2]),
            (&[1, 5], 0, &[1, 5]),
            (&[], 4, &[]),
        ];
        for (found, partitions, counted) in cases {
            assert_eq!(
                in_topic(found.to_vec(), partitions),
                counted,
                "found {found:?}, the topic has {partitions}"
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
