//! Lanes apply each partition's queue in order, a batch at a time, on the runtime: the Kafka
//! thread keeps fetching while batches commit, and one partition never has two batches in
//! flight.
//!
//! Group commit (`processor.group_commit`): one *group lane* commits the small batches of
//! every partition that has messages in one transaction, and while that transaction is in
//! flight the fetch thread only queues. The next batch is whatever arrived meanwhile, so a lone
//! event is committed at once and a steady stream batches by itself, with no timer: the batch
//! size follows the commit time. A partition whose messages arrive while the group lane is
//! busy joins it at its next batch (`take` adopts idle partitions with queued messages). At a
//! steady rate a transaction per partition would cost a commit, a relay round and about ten
//! round trips each. Once the members' batches together fill `batch_max` (a backlog), each
//! goes on in a lane of its own, and partitions commit in parallel.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use futures::future::join_all;

use super::batch::{BatchError, BatchRunner, PartBatch};
use super::offsets::Position;
use super::partition::{claimed, lock, Lane, PartitionState, Partitions, Phase};
use super::Handler;
use crate::kafka::InboundMessage;

/// A lane's members: (partition, the claim epoch the lane took it on with).
type Members = Vec<(i32, i64)>;

/// One member's batch taken from its queue.
type Taken = (i32, Position, Vec<InboundMessage>);

pub(super) struct Lanes<H> {
    runner: Arc<BatchRunner<H>>,
    partitions: Partitions,
    /// (partition, epoch, stored offset) after each commit, for the Kafka-side mirror.
    committed: mpsc::Sender<(i32, i64, i64)>,
    /// Whether a group lane is running. Read and written only under the partitions lock, so
    /// that a partition queued as the group lane finds nothing to do is either adopted by it
    /// or sees it gone and starts a new one.
    group_running: Arc<AtomicBool>,
}

impl<H> Clone for Lanes<H> {
    fn clone(&self) -> Self {
        Self {
            runner: self.runner.clone(),
            partitions: self.partitions.clone(),
            committed: self.committed.clone(),
            group_running: self.group_running.clone(),
        }
    }
}

impl<H: Handler> Lanes<H> {
    pub fn new(
        runner: BatchRunner<H>,
        partitions: Partitions,
        committed: mpsc::Sender<(i32, i64, i64)>,
    ) -> Self {
        Self {
            runner: Arc::new(runner),
            partitions,
            committed,
            group_running: Arc::default(),
        }
    }

    /// Called by the fetch thread, under the partitions lock, for a partition that just got
    /// messages and has no lane: whether to start a group lane for it. `false` when the running
    /// group lane will adopt it.
    pub fn start_group(&self) -> bool {
        !self.group_running.swap(true, Ordering::SeqCst)
    }

    /// The group lane: applies the queues of `members`, and of every partition that gets
    /// messages meanwhile, until none has any left or the worker is cancelled.
    pub async fn run_group(self, members: Members) {
        self.run(members, true).await;
    }

    /// A lane of its own for one partition (no group commit, or a backlog).
    pub async fn run_one(self, member: (i32, i64)) {
        self.run(vec![member], false).await;
    }

    /// Applies the queues of `members` until they are empty, a claim is gone (revoked or
    /// re-claimed), a partition is fenced, or the worker is cancelled. A group lane also takes
    /// on idle partitions with queued messages.
    async fn run(self, mut members: Members, group: bool) {
        let processor = &self.runner.config.settings.processor;
        let (batch_max, batch_max_bytes) = (processor.batch_max, processor.batch_max_bytes);
        loop {
            let (taken, bytes) = self.take(&mut members, group, batch_max, batch_max_bytes);
            if taken.is_empty() {
                return;
            }
            let total: usize = taken.iter().map(|(_, _, batch)| batch.len()).sum();
            if taken.len() > 1 && (total >= batch_max || bytes >= batch_max_bytes) {
                // A backlog: put the batches back and give every member its own lane.
                self.put_back(taken, group);
                let lanes = members
                    .into_iter()
                    .map(|m| Box::pin(self.clone().run(vec![m], false)));
                join_all(lanes).await;
                return;
            }
            if !self.commit(taken, &mut members).await {
                if group {
                    let _states = lock(&self.partitions);
                    self.group_running.store(false, Ordering::SeqCst);
                }
                return;
            }
        }
    }

    /// Takes each member's next batch; a member with nothing left (or fenced, or no longer
    /// claimed at its epoch) leaves the lane. A group lane first adopts every idle, live
    /// partition with queued messages, and is over (for the fetch thread to see) once it
    /// takes nothing. Returns the batches and their bytes together.
    fn take(
        &self,
        members: &mut Members,
        group: bool,
        batch_max: usize,
        max_bytes: usize,
    ) -> (Vec<Taken>, usize) {
        let mut taken = Vec::new();
        let mut bytes = 0;
        let mut states = lock(&self.partitions);
        if group {
            for (&partition, state) in states.iter_mut() {
                let waiting = state.lane == Lane::Idle
                    && matches!(state.phase, Phase::Live)
                    && !state.queue.is_empty();
                if waiting {
                    state.lane = Lane::Ready;
                    members.push((partition, state.epoch));
                }
            }
            members.sort_unstable();
        }
        members.retain(|&(partition, epoch)| {
            let Some(state) = claimed(&mut states, partition, epoch) else {
                return false; // revoked or re-claimed; the new claim has its own lane
            };
            if state.queue.is_empty() || matches!(state.phase, Phase::Fenced) {
                state.lane = Lane::Idle;
                return false;
            }
            let (batch, batch_bytes) = state.take_batch(batch_max, max_bytes);
            bytes += batch_bytes;
            state.lane = Lane::Applying(Instant::now());
            let at = Position {
                epoch,
                next_offset: state.next_offset,
            };
            taken.push((partition, at, batch));
            true
        });
        if group && taken.is_empty() {
            self.group_running.store(false, Ordering::SeqCst);
        }
        (taken, bytes)
    }

    /// Puts taken batches back for lanes of their own; a group lane is over once it has.
    fn put_back(&self, taken: Vec<Taken>, group: bool) {
        let mut states = lock(&self.partitions);
        if group {
            self.group_running.store(false, Ordering::SeqCst);
        }
        for (partition, at, batch) in taken {
            if let Some(state) = claimed(&mut states, partition, at.epoch) {
                state.lane = Lane::Ready;
                state.put_back(batch);
            }
        }
    }

    /// Commits the taken batches in one transaction. A fenced member is dropped and the
    /// others are tried again at once: their transaction was rolled back with it. Returns
    /// whether the lane goes on (false once the worker is cancelled).
    async fn commit(&self, mut pending: Vec<Taken>, members: &mut Members) -> bool {
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
                            state.lane = Lane::Ready;
                            state.next_offset = next_offset;
                            let _ = self.committed.send((*partition, at.epoch, next_offset));
                        }
                    }
                    return true;
                }
                Err(BatchError::Fenced(fenced)) => {
                    if let Some(state) = pending_state(&mut states, &pending, fenced) {
                        state.fence();
                    }
                    pending.retain(|p| p.0 != fenced);
                    members.retain(|m| m.0 != fenced);
                    if pending.is_empty() {
                        return true;
                    }
                }
                Err(BatchError::Advanced(advanced)) => {
                    let partition = advanced.partition;
                    if let Some(state) = pending_state(&mut states, &pending, partition) {
                        state.reposition(advanced.stored, advanced.last_fp);
                    }
                    pending.retain(|p| p.0 != partition);
                    members.retain(|m| m.0 != partition);
                    if pending.is_empty() {
                        return true;
                    }
                }
                Err(BatchError::Cancelled) => {
                    for (partition, at, _) in &pending {
                        if let Some(state) = claimed(&mut states, *partition, at.epoch) {
                            state.lane = Lane::Idle;
                        }
                    }
                    return false;
                }
            }
        }
    }
}

/// The state of a pending member's partition, while its claim is still the lane's.
fn pending_state<'a>(
    states: &'a mut HashMap<i32, PartitionState>,
    pending: &[Taken],
    partition: i32,
) -> Option<&'a mut PartitionState> {
    let (_, at, _) = pending.iter().find(|p| p.0 == partition)?;
    claimed(states, partition, at.epoch)
}
