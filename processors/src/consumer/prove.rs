//! How the fetch loop proves a claimed partition's position: it asks the rules of `position`
//! at each point where the fetch learns something (the message before the stored offset
//! arrived, the first message at or after it arrived, or the partition stayed silent) and
//! carries out their decisions: go live, seek, hold, or report.

use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};

use super::fetch::Fetch;
use super::partition::{lock, PartitionState, Phase};
use super::position::{forward_jump, Decision, Jump};
use super::Handler;
use crate::kafka::InboundMessage;
use crate::telemetry::METRICS;

impl<H: Handler> Fetch<H> {
    /// For an unproven partition: having fetched the message just before the stored offset,
    /// the fetch is contiguous through it. Returns whether the partition may take messages
    /// (it is live, or still unproven and to be judged by its first message).
    pub(super) fn prove_by_previous(
        &self,
        partition: i32,
        state: &mut PartitionState,
        msgs: &[InboundMessage],
    ) -> bool {
        let Phase::Unproven(resume) = &mut state.phase else {
            return matches!(state.phase, Phase::Live);
        };
        // The fetch is moving: the partition is not silent.
        resume.moved_at = Instant::now();
        let Some(previous) = msgs.iter().find(|m| m.offset == state.next_offset - 1) else {
            return true;
        };
        let decision = resume.previous_seen(previous.fingerprint());
        self.carry_out(partition, state, decision, previous.offset + 1)
    }

    /// For a partition still unproven: judges the first message at or after the stored
    /// offset. Returns whether its messages may be applied now.
    pub(super) fn prove_by_first(
        &self,
        partition: i32,
        state: &mut PartitionState,
        first: i64,
    ) -> bool {
        let Phase::Unproven(resume) = &state.phase else {
            return true;
        };
        let low = || match self.consumer.fetch_watermarks(
            &self.config.topic,
            partition,
            Duration::from_secs(10),
        ) {
            Ok((low, _high)) => Some(low),
            Err(e) => {
                tracing::warn!(partition, error = %e, "cannot read watermarks; will check the position again");
                None
            }
        };
        let decision = resume.first_fetched(state.next_offset, first, low);
        self.carry_out(partition, state, decision, first)
    }

    /// Checks the position of unproven partitions that stayed silent (see `Resume::silent`).
    pub(super) fn check_silent_partitions(&self) {
        let now = Instant::now();
        let mut states = lock(&self.partitions);
        for (&partition, state) in states.iter_mut() {
            let Phase::Unproven(resume) = &mut state.phase else {
                continue;
            };
            if !resume.silence_due(now) {
                continue;
            }
            resume.moved_at = now;
            let low = match self.consumer.fetch_watermarks(
                &self.config.topic,
                partition,
                Duration::from_secs(5),
            ) {
                Ok((low, _)) => low,
                Err(e) => {
                    tracing::warn!(partition, error = %e, "cannot read watermarks; will check again");
                    continue;
                }
            };
            let stored = state.next_offset;
            let decision = resume.silent(stored, low);
            if matches!(decision, Decision::Seek(_)) {
                resume.silent_seeks += 1;
            }
            self.carry_out(partition, state, decision, stored);
        }
    }

    /// Carries out a decision of `position` for an unproven partition; `seen` is the offset
    /// the fetch reached. Returns whether the partition's messages may be applied now.
    fn carry_out(
        &self,
        partition: i32,
        state: &mut PartitionState,
        decision: Decision,
        seen: i64,
    ) -> bool {
        let stored = state.next_offset;
        match decision {
            Decision::Apply => {
                state.phase = Phase::Live;
                true
            }
            Decision::ApplyPastGap(why) => {
                tracing::error!(
                    partition,
                    stored,
                    first = seen,
                    missing = seen - stored,
                    "{why}"
                );
                state.phase = Phase::Live;
                true
            }
            Decision::Seek(target) => {
                if let Phase::Unproven(resume) = &mut state.phase {
                    resume.rewind = stored - target;
                    resume.moved_at = Instant::now();
                }
                tracing::info!(
                    partition,
                    stored,
                    seen,
                    target,
                    "fetch did not resume at the stored offset; rewinding"
                );
                self.seek(partition, target);
                false
            }
            Decision::Wait => false,
            Decision::Hold(why) => {
                self.hold(partition, state, why);
                false
            }
            Decision::ReportPastEnd => {
                if let Phase::Unproven(resume) = &mut state.phase {
                    resume.reported_past_end = true;
                }
                tracing::error!(
                    partition,
                    stored,
                    "the log holds nothing from its start up to the stored offset: the topic was probably recreated under this database; this partition waits (docs/operations.md, \"stored offset past the end of the log\")"
                );
                false
            }
        }
    }

    /// Stops a partition whose log does not continue the stored position (found before any of
    /// its messages was queued): pauses its fetch, and says so in the log and in
    /// `paystream_partitions_held`. It stays so until it is claimed again (a rebalance or a
    /// restart), after an operator acted.
    fn hold(&self, partition: i32, state: &mut PartitionState, why: &str) {
        state.phase = Phase::Held;
        tracing::error!(
            partition,
            stored = state.next_offset,
            "{why}; this partition is held and nothing of it is applied (docs/operations.md, \"stored offset past the end of the log\")"
        );
        METRICS
            .partitions_held
            .with_label_values(&[self.name])
            .inc();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.config.topic, partition);
        if let Err(e) = self.consumer.pause(&tpl) {
            tracing::warn!(partition, error = %e, "cannot pause the held partition; its messages are dropped");
        }
    }

    fn seek(&self, partition: i32, target: i64) {
        let topic = &self.config.topic;
        if let Err(e) = self.consumer.seek(
            topic,
            partition,
            Offset::Offset(target),
            Duration::from_secs(5),
        ) {
            tracing::warn!(partition, target, error = %e, "seek failed; it will be retried");
        }
    }

    /// A live partition's fetch must go on where the last one ended (`expected`); when it
    /// skipped offsets instead, says so in the log and in `paystream_offset_jumps_total`.
    /// What is gone cannot be applied, so the partition goes on either way, but never
    /// silently: messages retention deleted before this group applied them are an error.
    pub(super) fn report_jump(&self, partition: i32, expected: i64, first: i64) {
        let topic = &self.config.topic;
        let low = || match self
            .consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
        {
            Ok((low, _)) => Some(low),
            Err(e) => {
                tracing::warn!(partition, error = %e, "cannot read watermarks to explain an offset jump");
                None
            }
        };
        let Some(jump) = forward_jump(expected, first, low) else {
            return;
        };
        METRICS
            .offset_jumps
            .with_label_values(&[self.name, jump.cause()])
            .inc();
        match jump {
            Jump::Deleted { missing } => tracing::error!(
                partition, expected, first, missing,
                "messages were deleted by retention before this consumer group applied them; they are lost to it (docs/operations.md, \"offset jumps\")"
            ),
            Jump::NotInLog { missing } => tracing::debug!(
                partition, expected, first, missing,
                "offsets without messages skipped (transaction markers or compaction)"
            ),
            Jump::Unknown { missing } => tracing::warn!(
                partition, expected, first, missing,
                "the fetch skipped offsets and the broker did not say why"
            ),
        }
    }
}
