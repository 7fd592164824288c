//! Rebalance is a state transition: on revoke the partition table is emptied (lanes whose
//! claim is gone stop at their next step, and their commits are fenced anyway); on assign
//! each partition is claimed in PostgreSQL (its epoch bumped) and the fetch starts from the
//! stored offset, one message early so that the position can be proven (`position`).
//!
//! librdkafka calls this from inside `poll`, on the Kafka thread, which is why the claim
//! blocks on the runtime here: the assignment must not start before the claim is known.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use super::offsets::{self, Claim};
use super::partition::{lock, PartitionState, Partitions, Phase};
use super::position::{Interrupted, Resume};
use crate::backoff::Backoff;
use crate::telemetry::METRICS;

/// What the Kafka client's callbacks and the fetch loop share.
pub(super) struct Context {
    /// The handler's name: the `processor` label of metrics.
    pub name: &'static str,
    pub handle: Handle,
    pub pool: PgPool,
    pub group: String,
    pub topic: String,
    pub owner: String,
    pub cancel: CancellationToken,
    pub retry: Backoff,
    pub partitions: Partitions,
    /// The proofs the last revocation interrupted, by partition (see `Interrupted`).
    pub interrupted: Mutex<HashMap<i32, Interrupted>>,
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        self.forget_assignment(consumer);
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
        let Some(claimed) = self.claim(&partition_ids(tpl, &self.topic)) else {
            let _ = consumer.unassign();
            return;
        };
        self.take_on(&claimed, tpl);
        if let Err(e) = consumer.assign(tpl) {
            tracing::error!(error = %e, "assign failed");
        }
    }
}

impl Context {
    /// Empties the partition table and its gauges. librdkafka keeps a partition paused across
    /// a rebalance; a held partition must start afresh when it is claimed again.
    fn forget_assignment(&self, consumer: &BaseConsumer<Self>) {
        let mut held = TopicPartitionList::new();
        let mut interrupted = self.interrupted();
        interrupted.clear();
        for (partition, state) in lock(&self.partitions).drain() {
            let _ = METRICS
                .consumer_lag
                .remove_label_values(&[self.name, &partition.to_string()]);
            match &state.phase {
                Phase::Held => {
                    held.add_partition(&self.topic, partition);
                }
                Phase::Unproven(resume) => {
                    interrupted.insert(partition, resume.interrupted(state.next_offset));
                }
                Phase::Live | Phase::Fenced => {}
            }
        }
        drop(interrupted);
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
    }

    /// Enters the claimed partitions in the table, unproven, and positions their fetch.
    fn take_on(&self, claimed: &[Claim], tpl: &mut TopicPartitionList) {
        let now = Instant::now();
        let mut interrupted = self.interrupted();
        let mut states = lock(&self.partitions);
        for claim in claimed {
            let earlier = interrupted.remove(&claim.partition);
            let (resume, from) = Resume::claimed(claim.next_offset, claim.last_fp, now, earlier);
            let offset = Offset::Offset(from);
            if let Err(e) = tpl.set_partition_offset(&self.topic, claim.partition, offset) {
                tracing::error!(error = %e, partition = claim.partition, "cannot position partition");
            }
            states.insert(
                claim.partition,
                PartitionState::claimed(claim.epoch, claim.next_offset, resume),
            );
        }
        drop(states);
        drop(interrupted);
        METRICS
            .assigned_partitions
            .with_label_values(&[self.name])
            .set(claimed.len() as i64);
        tracing::info!(
            partitions = ?claimed.iter().map(|c| (c.partition, c.next_offset, c.epoch)).collect::<Vec<_>>(),
            "partitions assigned and claimed (partition, stored offset, epoch)"
        );
    }

    fn interrupted(&self) -> MutexGuard<'_, HashMap<i32, Interrupted>> {
        // Only the Kafka thread takes this lock, and it holds it for no call that can panic.
        self.interrupted
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Claims `ids` in PostgreSQL, retrying until it works or the worker is cancelled.
    fn claim(&self, ids: &[i32]) -> Option<Vec<Claim>> {
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
