//! One assigned partition as this worker sees it, and the table of them that the Kafka thread
//! (fetch and rebalance) and the lanes share.
//!
//! A partition moves through typed phases: claimed and `Unproven` until its fetch position is
//! proven (`position`), then `Live`; `Held` if the log does not continue the stored position;
//! `Fenced` once a commit is refused because someone else claimed it. Only a `Live` partition's
//! messages are queued and applied. Independently, a lane task may own its queue (`Lane`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::position::Resume;
use crate::kafka::InboundMessage;

/// Where the proof of a partition's position stands.
#[derive(Debug)]
pub(super) enum Phase {
    /// Claimed; the fetch position is not proven yet, and nothing is applied.
    Unproven(Resume),
    /// The fetch continues the stored position: messages are queued and applied.
    Live,
    /// The log does not continue the stored position: its fetch is paused and nothing is
    /// applied until an operator acts and the partition is claimed again.
    Held,
    /// A commit was refused: this worker no longer owns the partition.
    Fenced,
}

/// Whether a lane task is applying the partition's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lane {
    /// No lane task; the fetch loop starts one when messages are queued.
    Idle,
    /// A lane task owns the queue and is between batches.
    Ready,
    /// A lane task is applying a batch it took at this instant.
    Applying(Instant),
}

/// Where this worker stands in one assigned partition.
#[derive(Debug)]
pub(super) struct PartitionState {
    pub epoch: i64,
    /// The stored offset: the next message to apply.
    pub next_offset: i64,
    /// The offset after the last message handed to the partition's lane (queued or being
    /// applied). Equal to `next_offset` when the lane is idle.
    pub dispatched: i64,
    /// Messages fetched and not yet applied, in offset order.
    pub queue: VecDeque<InboundMessage>,
    /// The bytes of `queue` (`InboundMessage::size`).
    pub queued_bytes: usize,
    pub lane: Lane,
    pub phase: Phase,
}

impl PartitionState {
    /// A partition just claimed at `epoch` with stored offset `next_offset`.
    pub fn claimed(epoch: i64, next_offset: i64, resume: Resume) -> Self {
        Self {
            epoch,
            next_offset,
            dispatched: next_offset,
            queue: VecDeque::new(),
            queued_bytes: 0,
            lane: Lane::Idle,
            phase: Phase::Unproven(resume),
        }
    }

    /// Whether a batch of this partition has been applying for `limit` or longer.
    pub fn stalled(&self, limit: Duration) -> bool {
        matches!(self.lane, Lane::Applying(since) if since.elapsed() >= limit)
    }

    /// A commit of this partition whose answer was lost (the connection died during COMMIT)
    /// did land: the stored offset is `stored`, ahead of what the lane knew. Drop what is
    /// queued and prove the position from the stored offset again, as after a claim (same
    /// epoch): the fetch rewinds to it and checks the message before it.
    pub fn reposition(&mut self, stored: i64, last_fp: Option<i64>) {
        let (resume, _) = Resume::claimed(stored, last_fp, Instant::now(), None);
        *self = Self::claimed(self.epoch, stored, resume);
    }

    /// A commit was refused: drop what is queued and apply nothing more.
    pub fn fence(&mut self) {
        self.phase = Phase::Fenced;
        self.queue.clear();
        self.queued_bytes = 0;
        self.lane = Lane::Idle;
    }

    /// Queues fetched messages (in offset order, after those queued already).
    pub fn enqueue(&mut self, msgs: Vec<InboundMessage>) {
        self.queued_bytes += msgs.iter().map(InboundMessage::size).sum::<usize>();
        self.queue.extend(msgs);
    }

    /// Takes the next batch off the queue: at most `max` messages and `max_bytes` bytes, and
    /// at least one message when any is queued. Returns it and its bytes.
    pub fn take_batch(&mut self, max: usize, max_bytes: usize) -> (Vec<InboundMessage>, usize) {
        let (n, bytes) = batch_len(self.queue.iter().map(InboundMessage::size), max, max_bytes);
        self.queued_bytes -= bytes;
        (self.queue.drain(..n).collect(), bytes)
    }

    /// Puts a batch taken by `take_batch` back at the front of the queue.
    pub fn put_back(&mut self, batch: Vec<InboundMessage>) {
        self.queued_bytes += batch.iter().map(InboundMessage::size).sum::<usize>();
        for msg in batch.into_iter().rev() {
            self.queue.push_front(msg);
        }
    }
}

/// The assigned partitions, shared by the Kafka thread and the lane tasks.
pub(super) type Partitions = Arc<Mutex<HashMap<i32, PartitionState>>>;

pub(super) fn lock(partitions: &Partitions) -> MutexGuard<'_, HashMap<i32, PartitionState>> {
    // A panic while holding this lock would already have ended the worker.
    partitions
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The state of `partition` while `epoch` is still its claim (not revoked or re-claimed
/// since a lane took it on).
pub(super) fn claimed(
    states: &mut HashMap<i32, PartitionState>,
    partition: i32,
    epoch: i64,
) -> Option<&mut PartitionState> {
    states.get_mut(&partition).filter(|s| s.epoch == epoch)
}

/// How many of the messages with these sizes (in queue order) make a batch, and their bytes:
/// at most `max` of them and `max_bytes` bytes, and at least one whatever its size.
fn batch_len(sizes: impl Iterator<Item = usize>, max: usize, max_bytes: usize) -> (usize, usize) {
    let (mut n, mut total) = (0, 0);
    for size in sizes.take(max) {
        if n > 0 && total + size > max_bytes {
            break;
        }
        n += 1;
        total += size;
    }
    (n, total)
}

#[cfg(test)]
mod tests {
    use super::batch_len;

    #[test]
    fn a_batch_is_bounded_in_messages_and_in_bytes_and_holds_at_least_one_message() {
        // (sizes, max messages, max bytes, batch length)
        let cases: [(&[usize], usize, usize, usize); 7] = [
            (&[], 10, 100, 0),
            (&[10, 10, 10], 10, 100, 3),
            (&[10, 10, 10], 2, 100, 2),
            (&[40, 40, 40], 10, 100, 2),
            (&[40, 60, 1], 10, 100, 2),
            (&[500, 1], 10, 100, 1),
            (&[1, 500], 10, 100, 1),
        ];
        for (sizes, max, max_bytes, expected) in cases {
            let (n, bytes) = batch_len(sizes.iter().copied(), max, max_bytes);
            assert_eq!(n, expected, "{sizes:?} {max} {max_bytes}");
            assert_eq!(bytes, sizes[..n].iter().sum::<usize>(), "{sizes:?}");
        }
    }
}
