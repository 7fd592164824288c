//! One batch transaction and its retries: decode, claim the event ids (dedupe), let the
//! handler apply the fresh events, dead-letter the poison, then the closing statement (the
//! handler's writes, outbox rows and the compare-and-set of every partition's stored
//! offset). All of it commits or none of it does. Transient failures retry the whole batch
//! with bounded exponential backoff; nothing is skipped.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use super::dedupe::ProcessedRows;
use super::offsets::{self, Advance, Close, Position};
use super::{ApplyError, Fresh, Handler, Outcome, WorkerConfig};
use crate::backoff::Backoff;
use crate::db::{ErrorClass, Writes};
use crate::dlq;
use crate::events::{decode_envelope, Poison, PoisonClass};
use crate::kafka::InboundMessage;
use crate::outbox::{self, OutboxRow};
use crate::telemetry::METRICS;

/// A record with a header that cannot be read is poison: it cannot be read whole, and what
/// it carries must not be applied on the strength of the part that could.
fn readable(msg: &InboundMessage) -> Result<(), Poison> {
    if msg.unreadable_headers == 0 {
        return Ok(());
    }
    Err(Poison::new(
        PoisonClass::UnreadableHeaders,
        format!(
            "{} header name(s) are not UTF-8; the record cannot be read whole (the dead letter keeps the value, the key and the headers that could be read)",
            msg.unreadable_headers
        ),
    ))
}

#[derive(Debug)]
pub(super) enum BatchError {
    /// This partition's commit was refused (the whole transaction rolled back).
    Fenced(i32),
    /// This partition's stored offset is ahead of where its batch started, under this
    /// worker's own claim: an earlier commit whose answer was lost (the connection died during
    /// COMMIT) did land. The whole transaction rolled back; the partition resumes from `stored`.
    Advanced(Advanced),
    Cancelled,
}

/// Where a partition's stored position stands after an earlier commit landed unseen.
#[derive(Debug, Clone, Copy)]
pub(super) struct Advanced {
    pub partition: i32,
    pub stored: i64,
    pub last_fp: Option<i64>,
}

pub(super) struct BatchRunner<H> {
    pub pool: PgPool,
    pub handler: H,
    pub config: WorkerConfig,
    pub retry: Backoff,
    pub cancel: CancellationToken,
}

/// Where a message sits in a batch transaction: (part, index in the part).
type Slot = (usize, usize);

/// One partition's part of a batch transaction: the messages and the position they start from.
pub(super) struct PartBatch<'a> {
    pub partition: i32,
    pub at: Position,
    pub msgs: &'a [InboundMessage],
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
    /// The compare-and-set was refused because this worker's own earlier commit advanced the
    /// offset (see `BatchError::Advanced`). Everything was rolled back.
    Advanced(Advanced),
}

/// The outcomes of a batch's messages as they are decided: per part, per message.
type Outcomes = Vec<Vec<Option<Outcome>>>;

/// The events of a batch that decoded, each with its place in the batch.
type Decoded<E> = Vec<(Slot, Fresh<E>)>;

impl<H: Handler> BatchRunner<H> {
    /// Applies the parts of one batch transaction (one partition's messages, or several
    /// partitions' small batches committed together), retrying transient failures until it
    /// commits, a partition is fenced, or the worker is cancelled. Returns the new stored
    /// offset of each part.
    pub async fn run(&self, parts: &[PartBatch<'_>]) -> Result<Vec<i64>, BatchError> {
        let mut attempt = 0;
        loop {
            let started = Instant::now();
            match self.attempt(parts).await {
                Ok(Attempt::Committed(outcomes)) => {
                    self.committed(parts, &outcomes, started);
                    return Ok(parts.iter().map(PartBatch::next_offset).collect());
                }
                Ok(Attempt::Fenced(partition)) => {
                    self.fenced(parts, partition);
                    return Err(BatchError::Fenced(partition));
                }
                Ok(Attempt::Advanced(advanced)) => {
                    tracing::warn!(
                        processor = self.handler.name(),
                        partition = advanced.partition,
                        stored = advanced.stored,
                        "an earlier commit whose answer was lost had landed; resuming from the stored offset (nothing is applied twice)"
                    );
                    return Err(BatchError::Advanced(advanced));
                }
                Err(e) => {
                    let delay = self.retry.delay(attempt);
                    self.failed(parts, attempt, &e, delay);
                    tokio::select! {
                        _ = self.cancel.cancelled() => return Err(BatchError::Cancelled),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    attempt += 1;
                }
            }
        }
    }

    fn committed(&self, parts: &[PartBatch<'_>], outcomes: &[Vec<Outcome>], started: Instant) {
        let name = self.handler.name();
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
    }

    fn fenced(&self, parts: &[PartBatch<'_>], partition: i32) {
        let name = self.handler.name();
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
    }

    fn failed(&self, parts: &[PartBatch<'_>], attempt: u32, e: &ApplyError, delay: Duration) {
        let name = self.handler.name();
        let class = e.class();
        METRICS
            .retries
            .with_label_values(&[name, class.as_str()])
            .inc();
        let partitions: Vec<i32> = parts.iter().map(|p| p.partition).collect();
        if class == ErrorClass::Transient {
            tracing::warn!(processor = name, ?partitions, attempt, error = %e, ?delay, "transient failure; retrying batch");
        } else {
            tracing::error!(processor = name, ?partitions, attempt, error = ?e, ?delay, "unexpected failure; retrying batch (nothing is skipped)");
        }
    }

    /// One try of one batch transaction.
    async fn attempt(&self, parts: &[PartBatch<'_>]) -> Result<Attempt, ApplyError> {
        let (decoded, mut outcomes) = self.decode(parts);
        // Repeats within the batch are duplicates; each event id is claimed once.
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

    /// Decodes every message: the events in (part, message) order, and the outcomes so far
    /// (the poison ones decided).
    fn decode(&self, parts: &[PartBatch<'_>]) -> (Decoded<H::Event>, Outcomes) {
        let max_bytes = self.config.settings.processor.max_event_bytes;
        let mut outcomes: Outcomes = parts.iter().map(|p| vec![None; p.msgs.len()]).collect();
        let mut decoded = Vec::new();
        for (k, part) in parts.iter().enumerate() {
            for (i, msg) in part.msgs.iter().enumerate() {
                let result = readable(msg)
                    .and_then(|()| decode_envelope(msg.payload.as_deref(), max_bytes))
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
        (decoded, outcomes)
    }

    /// The statements of one batch transaction, up to its commit: `Committed` means ready
    /// to commit, `Fenced` that a compare-and-set was refused and it must roll back.
    async fn in_transaction(
        &self,
        tx: &mut PgConnection,
        parts: &[PartBatch<'_>],
        claims: ProcessedRows,
        decoded: Decoded<H::Event>,
        mut outcomes: Outcomes,
    ) -> Result<Attempt, ApplyError> {
        let claimed = claims
            .claim(&mut *tx, &self.config.group, &self.config.topic)
            .await?;
        let (slots, fresh): (Vec<Slot>, Vec<Fresh<H::Event>>) = decoded
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
        for (((k, i), f), outcome) in slots.into_iter().zip(&fresh).zip(applied.outcomes) {
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
        let dead_letters = self.dead_letters(parts, &outcomes);
        let stall = self.config.settings.processor.stall_before_commit_ms;
        if stall > 0 {
            tokio::time::sleep(Duration::from_millis(stall)).await;
        }
        let emitted = applied.emitted.iter().chain(&dead_letters);
        let outbox = outbox::Columns::new(emitted);
        match self
            .close(tx, parts, applied.writes, outbox, &unclaim)
            .await?
        {
            Some(refused) => Ok(refused),
            None => Ok(Attempt::Committed(outcomes)),
        }
    }

    /// The dead-letter records of the messages whose outcome is `DeadLettered`.
    fn dead_letters(&self, parts: &[PartBatch<'_>], outcomes: &[Vec<Outcome>]) -> Vec<OutboxRow> {
        let settings = &self.config.settings;
        let mut dead_letters = Vec::new();
        for (part, part_outcomes) in parts.iter().zip(outcomes) {
            for (msg, outcome) in part.msgs.iter().zip(part_outcomes) {
                if let Outcome::DeadLettered(poison) = outcome {
                    tracing::warn!(partition = part.partition, offset = msg.offset, class = poison.class.as_str(), error = %poison.message, "dead-lettering poison message");
                    dead_letters.push(dlq::dead_letter(
                        &self.config.dead_letter_topic,
                        &self.config.group,
                        msg,
                        poison,
                        settings.dlq.max_attempts,
                        settings.kafka.message_max_bytes,
                    ));
                }
            }
        }
        dead_letters
    }

    /// The closing statement: the handler's writes, every part's offset compare-and-set, the
    /// outbox rows and the unclaims. Returns how the commit was refused, if it was.
    async fn close(
        &self,
        tx: &mut PgConnection,
        parts: &[PartBatch<'_>],
        writes: Writes,
        outbox: outbox::Columns<'_>,
        unclaim: &[uuid::Uuid],
    ) -> Result<Option<Attempt>, sqlx::Error> {
        let advances: Vec<Advance> = parts
            .iter()
            .map(|part| Advance {
                partition: part.partition,
                at: part.at,
                next_offset: part.next_offset(),
                last_fp: part.msgs.last().map(InboundMessage::fingerprint),
            })
            .collect();
        let (group, topic) = (&self.config.group, &self.config.topic);
        let close = Close {
            group,
            topic,
            advances: &advances,
            writes,
            outbox,
            unclaim,
        };
        let Some(refusal) = close.execute(&mut *tx).await? else {
            return Ok(None);
        };
        let now = offsets::stored(&mut *tx, group, topic, refusal.partition).await?;
        Ok(Some(refused(refusal.partition, refusal.at, now)))
    }
}
/// Why a partition's compare-and-set was refused, from the row as it stands now (epoch, next
/// offset, fingerprint). Only this worker advances the offset under its claim's epoch, one
/// batch per partition at a time: the same epoch further on is its own commit that landed
/// unseen; anything else (another epoch, no row) is a claim by someone else.
fn refused(partition: i32, at: Position, now: Option<(i64, i64, Option<i64>)>) -> Attempt {
    match now {
        Some((epoch, stored, last_fp)) if epoch == at.epoch && stored > at.next_offset => {
            Attempt::Advanced(Advanced {
                partition,
                stored,
                last_fp,
            })
        }
        _ => Attempt::Fenced(partition),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_commit_is_a_fence_unless_the_row_shows_this_claims_own_commit_landed() {
        let at = Position {
            epoch: 7,
            next_offset: 100,
        };
        // (the row now, advanced to)
        let cases = [
            (Some((8, 100, None)), None),
            (Some((8, 140, Some(3))), None),
            (None, None),
            (Some((7, 100, None)), None),
            (Some((7, 140, Some(3))), Some((140, Some(3)))),
        ];
        for (now, expected) in cases {
            let got = match refused(2, at, now) {
                Attempt::Advanced(a) => {
                    assert_eq!(a.partition, 2);
                    Some((a.stored, a.last_fp))
                }
                Attempt::Fenced(partition) => {
                    assert_eq!(partition, 2);
                    None
                }
                Attempt::Committed(_) => panic!("a refusal is never a commit"),
            };
            assert_eq!(got, expected, "{now:?}");
        }
    }
}
