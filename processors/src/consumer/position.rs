//! Where a claimed partition resumes: the rules that prove a fetch continues the stored
//! position before anything of the partition is applied. Pure functions of what the fetch saw
//! and what the broker says of the log; the fetch loop (`fetch`) carries out their decisions.
//!
//! A fetch must resume exactly at the stored offset, and the message before it must be the
//! one the group applied last (its fingerprint is stored with the offset). When the first
//! message is further on, the missing offsets are either not in the log (deleted by retention,
//! compacted, or transaction markers) — then the gap is real and is logged — or the broker
//! returned a later record batch than the one holding the stored offset (seen with tansu when
//! resuming in the middle of a batch). The worker tells the two apart by rewinding, further
//! each time, down to the low watermark, and dropping what lies below the stored offset. It
//! never skips an event that is still in the topic, and never resumes in a log whose message
//! before the stored offset is another.

use std::time::{Duration, Instant};

/// How long an unproven partition may stay silent before its position is checked: resuming
/// inside the last record batch can bring nothing at all, and the broker's high watermark
/// cannot be relied on to say so (tansu reports it at that batch's boundary).
pub(super) const SILENCE: Duration = Duration::from_secs(2);

/// How many times the silence window doubles: silence is also what a fetch looks like that
/// the broker has not answered yet, and a slow broker (tansu with durable storage reads the
/// log from the fetch offset to its end, about 2 ms per record) must get the time to answer.
const SILENCE_DOUBLINGS: u32 = 4;

/// How much further back each rewind goes. A later message than the stored offset arrived:
/// the batch that holds the stored offset ends just before it, four times further is enough.
const REWIND_FACTOR: i64 = 4;

/// The same after silence. Silence waits twice as long each time, so it must reach further in
/// the same time: tansu's memory storage returns nothing for a fetch inside the log's last
/// record batch, which a busy producer fills with thousands of records. From the claim the
/// rewinds are 16, 256, 4,096 and 65,536 messages, made 2, 6, 14 and 30 s after it.
const SILENT_REWIND_FACTOR: i64 = 16;

/// What the fetch loop does next with a partition whose position is not proven yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decision {
    /// The position is proven: apply from here on.
    Apply,
    /// Proven, but the offsets up to the first message are not in the log: say so, then apply.
    ApplyPastGap(&'static str),
    /// Fetch again from this offset, further back than before.
    Seek(i64),
    /// Nothing can be decided yet; look again later.
    Wait,
    /// The log does not continue the stored position: apply nothing of this partition until
    /// an operator acts and it is claimed again.
    Hold(&'static str),
    /// The log ends before the stored offset: say so once, then wait.
    ReportPastEnd,
}

/// What the proof of a claimed partition's position has seen so far.
#[derive(Debug, Clone)]
pub(super) struct Resume {
    /// The fingerprint of the message at `stored - 1` as the last commit stored it.
    pub last_fp: Option<i64>,
    /// How far back from the stored offset the fetch was last positioned (1 at the claim: the
    /// fetch starts with the message before the stored offset, to compare it).
    pub rewind: i64,
    /// When the fetch position was last set (claim or rewind), or when a message last arrived.
    /// Repositioning must not depend on messages arriving.
    pub moved_at: Instant,
    /// Whether this claim already said that the log ends before the stored offset.
    pub reported_past_end: bool,
    /// How often silence moved the fetch; each time the next silence must last twice as long.
    pub silent_seeks: u32,
}

/// What a proof that a rebalance interrupted had learnt, kept for the next claim of the
/// partition. A coordinator that rebalances every few seconds (tansu after a restart) would
/// otherwise restart every proof from the first rewind, and a proof that needs more time than
/// the coordinator leaves between rebalances would never finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Interrupted {
    stored: i64,
    rewind: i64,
    silent_seeks: u32,
}

impl Resume {
    /// A fresh claim of a partition whose stored offset is `stored`; returns it and the offset
    /// to fetch from: the message before the stored one, to compare it, or as far back as an
    /// interrupted proof of the same stored offset had rewound. Starting further back is always
    /// safe: what lies below the stored offset is only read, never applied, and every decision
    /// still needs its evidence. Only the search is carried over.
    pub fn claimed(
        stored: i64,
        last_fp: Option<i64>,
        now: Instant,
        interrupted: Option<Interrupted>,
    ) -> (Self, i64) {
        let (rewind, silent_seeks) = match interrupted {
            Some(i) if i.stored == stored => (i.rewind, i.silent_seeks),
            _ => (i64::from(stored > 0), 0),
        };
        let resume = Self {
            last_fp,
            rewind,
            moved_at: now,
            reported_past_end: false,
            silent_seeks,
        };
        (resume, stored - rewind)
    }

    /// What this proof learnt, for the next claim of the partition at `stored`.
    pub fn interrupted(&self, stored: i64) -> Interrupted {
        Interrupted {
            stored,
            rewind: self.rewind,
            silent_seeks: self.silent_seeks,
        }
    }

    /// The fetch brought the message just before the stored offset, with fingerprint `fp`: the
    /// fetch is contiguous through it, so the position is right if that message is the one the
    /// group applied last.
    pub fn previous_seen(&self, fp: i64) -> Decision {
        match self.last_fp {
            Some(last) if last != fp => Decision::Hold(
                "the message before the stored offset is not the one this consumer group applied: the topic was probably recreated under this database",
            ),
            // No fingerprint (an offset stored by an older version): the only evidence is
            // that the log ended before the stored offset and grew back to it afterwards.
            None if self.reported_past_end => Decision::Hold(
                "the log reached the stored offset only after it was found to end before it: the topic was probably recreated under this database",
            ),
            _ => Decision::Apply,
        }
    }

    /// The first message fetched at or after the stored offset is at `first`, and the message
    /// before the stored offset was not seen. `low` asks the broker for the log's low
    /// watermark (`None`: it could not say), only when the answer matters.
    pub fn first_fetched(
        &self,
        stored: i64,
        first: i64,
        low: impl FnOnce() -> Option<i64>,
    ) -> Decision {
        let start_is_proof = stored == 0 || (self.last_fp.is_none() && !self.reported_past_end);
        if first == stored && start_is_proof {
            return Decision::Apply;
        }
        let Some(low) = low() else {
            return Decision::Wait;
        };
        if stored < low {
            return Decision::ApplyPastGap("stored offset is below the topic's low watermark: these messages were deleted before being applied");
        }
        // Fetching from the log start (directly, or after rewinding to it) and still seeing a
        // later offset first means the offsets in between do not exist; so does the message
        // before the stored offset, and there is nothing to compare.
        if stored - self.rewind <= low {
            if first > stored {
                return Decision::ApplyPastGap("offsets between the stored offset and the first message are not in the topic (transaction markers or compaction); continuing");
            }
            return Decision::Apply;
        }
        Decision::Seek(self.further_back(stored, low, REWIND_FACTOR))
    }

    /// Whether the partition has been silent long enough to check its position. Once the
    /// log was reported to end before the stored offset, the fetch reads on from the log
    /// start: the message before the stored offset is judged when (if ever) it arrives.
    pub fn silence_due(&self, now: Instant) -> bool {
        !self.reported_past_end && now.saturating_duration_since(self.moved_at) >= self.silence()
    }

    /// How long silence must last to count: `SILENCE`, doubled for each seek silence made.
    fn silence(&self) -> Duration {
        SILENCE * 2u32.pow(self.silent_seeks.min(SILENCE_DOUBLINGS))
    }

    /// The partition stayed silent and the log's low watermark is `low`. Silence after a
    /// rewind that re-read the message before the stored offset is settled by
    /// `previous_seen`; this rule never accepts a gap, it only seeks.
    pub fn silent(&self, stored: i64, low: i64) -> Decision {
        if stored <= low {
            return Decision::Apply;
        }
        // Read from the log start and still silent: the log ends before the stored offset (a
        // topic deleted and recreated under this database, or a database restored from
        // elsewhere). New messages would arrive at offsets the database counts as applied.
        if stored - self.rewind <= low {
            return Decision::ReportPastEnd;
        }
        Decision::Seek(self.further_back(stored, low, SILENT_REWIND_FACTOR))
    }

    /// `factor` times further back than last time, bounded by the low watermark.
    fn further_back(&self, stored: i64, low: i64, factor: i64) -> i64 {
        stored - (self.rewind * factor).max(1).min(stored - low)
    }
}

/// Why a live partition's fetch skipped offsets: from `expected` (the next offset after what
/// was fetched before) the fetch went on at a later one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Jump {
    /// The missing offsets lie below the log start: retention removed messages this group
    /// never applied (it lagged too far). They are gone; the loss is reported loudly.
    Deleted { missing: i64 },
    /// The log starts at or below them: they hold no messages (transaction markers, or
    /// compaction), which is normal on a topic with transactional producers.
    NotInLog { missing: i64 },
    /// The broker did not say where its log starts.
    Unknown { missing: i64 },
}

impl Jump {
    /// The `cause` label of `paystream_offset_jumps_total`.
    pub fn cause(self) -> &'static str {
        match self {
            Self::Deleted { .. } => "deleted",
            Self::NotInLog { .. } => "not_in_log",
            Self::Unknown { .. } => "unknown",
        }
    }
}

/// Whether a live partition's fetch, expected to go on at `expected`, went on at `first`;
/// `low` asks the broker for the log start, only when it did not.
pub(super) fn forward_jump(
    expected: i64,
    first: i64,
    low: impl FnOnce() -> Option<i64>,
) -> Option<Jump> {
    if first <= expected {
        return None;
    }
    let missing = first - expected;
    Some(match low() {
        Some(low) if expected < low => Jump::Deleted { missing },
        Some(_) => Jump::NotInLog { missing },
        None => Jump::Unknown { missing },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resume(last_fp: Option<i64>, rewind: i64, reported_past_end: bool) -> Resume {
        Resume {
            last_fp,
            rewind,
            moved_at: Instant::now(),
            reported_past_end,
            silent_seeks: 0,
        }
    }

    #[test]
    fn a_claim_fetches_from_the_message_before_the_stored_offset() {
        let now = Instant::now();
        let (r, from) = Resume::claimed(10, Some(7), now, None);
        assert_eq!((from, r.rewind, r.last_fp), (9, 1, Some(7)));
        let (r, from) = Resume::claimed(0, None, now, None);
        assert_eq!((from, r.rewind), (0, 0), "nothing before offset 0");
    }

    #[test]
    fn a_claim_goes_on_from_where_an_interrupted_proof_of_the_same_offset_had_rewound() {
        let now = Instant::now();
        let proof = |rewind, silent_seeks| Resume {
            silent_seeks,
            ..resume(Some(7), rewind, true)
        };
        // (interrupted proof: stored, rewind, silent seeks; claimed at; from, rewind, seeks)
        let cases = [
            (None, 100, (99, 1, 0)),
            (Some((100, 64, 3)), 100, (36, 64, 3)),
            // The group applied more meanwhile: the search starts afresh.
            (Some((100, 64, 3)), 120, (119, 1, 0)),
            // Nothing was learnt.
            (Some((100, 1, 0)), 100, (99, 1, 0)),
        ];
        for (interrupted, stored, (from, rewind, seeks)) in cases {
            let interrupted =
                interrupted.map(|(at, rewind, seeks)| proof(rewind, seeks).interrupted(at));
            let (r, start) = Resume::claimed(stored, Some(9), now, interrupted);
            assert_eq!(
                (
                    start,
                    r.rewind,
                    r.silent_seeks,
                    r.last_fp,
                    r.reported_past_end
                ),
                (from, rewind, seeks, Some(9), false),
                "{interrupted:?} claimed at {stored}"
            );
        }
    }

    #[test]
    fn the_message_before_the_stored_offset_proves_or_holds_the_position() {
        use Decision::*;
        // (stored fingerprint, reported past end, fingerprint seen, decision)
        let cases = [
            (Some(7), false, 7, Apply),
            (Some(7), true, 7, Apply),
            (None, false, 7, Apply),
            (Some(7), false, 8, Hold("the message before the stored offset is not the one this consumer group applied: the topic was probably recreated under this database")),
            (None, true, 7, Hold("the log reached the stored offset only after it was found to end before it: the topic was probably recreated under this database")),
        ];
        for (last_fp, past_end, seen, expected) in cases {
            let decision = resume(last_fp, 1, past_end).previous_seen(seen);
            assert_eq!(decision, expected, "{last_fp:?} {past_end} {seen}");
        }
    }

    #[test]
    fn the_first_message_at_or_after_the_stored_offset_is_judged_against_the_log_start() {
        use Decision::*;
        let gap_below = "stored offset is below the topic's low watermark: these messages were deleted before being applied";
        let gap_between = "offsets between the stored offset and the first message are not in the topic (transaction markers or compaction); continuing";
        // (stored, last fp, rewind, past end, first, low, decision)
        let cases = [
            // A fetch that starts at the stored offset proves it when nothing can precede it.
            (0, None, 0, false, 0, None, Apply),
            (10, None, 1, false, 10, None, Apply),
            // With a fingerprint the message before must be seen; asking the broker failed.
            (10, Some(1), 1, false, 10, None, Wait),
            // The log start is past the stored offset: deleted before being applied.
            (10, Some(1), 1, false, 20, Some(15), ApplyPastGap(gap_below)),
            // Fetching from the log start: what is missing does not exist.
            (
                10,
                Some(1),
                10,
                false,
                12,
                Some(0),
                ApplyPastGap(gap_between),
            ),
            (10, Some(1), 1, false, 10, Some(9), Apply),
            (
                10,
                Some(1),
                1,
                false,
                12,
                Some(9),
                ApplyPastGap(gap_between),
            ),
            // Otherwise rewind, four times further each time, never below the log start.
            (100, Some(1), 1, false, 100, Some(0), Seek(96)),
            (100, Some(1), 4, false, 104, Some(0), Seek(84)),
            (100, Some(1), 4, false, 104, Some(90), Seek(90)),
            (
                100,
                Some(1),
                16,
                false,
                104,
                Some(90),
                ApplyPastGap(gap_between),
            ),
            (100, None, 1, true, 100, Some(0), Seek(96)),
        ];
        for (stored, last_fp, rewind, past_end, first, low, expected) in cases {
            let r = resume(last_fp, rewind, past_end);
            let decision = r.first_fetched(stored, first, || low);
            assert_eq!(
                decision, expected,
                "stored {stored} fp {last_fp:?} rewind {rewind} past end {past_end} first {first} low {low:?}"
            );
        }
    }

    #[test]
    fn the_broker_is_not_asked_when_the_start_proves_the_position() {
        let r = resume(None, 1, false);
        let decision = r.first_fetched(10, 10, || panic!("asked for the low watermark"));
        assert_eq!(decision, Decision::Apply);
    }

    #[test]
    fn a_silent_partition_is_rewound_until_the_log_start_then_reported() {
        use Decision::*;
        // (stored, rewind, low, decision)
        let cases = [
            (0, 0, 0, Apply),
            (10, 1, 10, Apply),
            (10, 1, 12, Apply),
            // Sixteen times further back each time, never below the log start.
            (1000, 1, 0, Seek(984)),
            (1000, 16, 0, Seek(744)),
            (1000, 16, 900, Seek(900)),
            (1000, 256, 0, Seek(0)),
            (10, 1, 0, Seek(0)),
            (10, 10, 0, ReportPastEnd),
            (10, 1, 9, ReportPastEnd),
        ];
        for (stored, rewind, low, expected) in cases {
            let decision = resume(Some(1), rewind, false).silent(stored, low);
            assert_eq!(
                decision, expected,
                "stored {stored} rewind {rewind} low {low}"
            );
        }
    }

    #[test]
    fn silence_is_checked_after_two_quiet_seconds_twice_as_many_after_each_seek_it_made_until_the_end_was_reported(
    ) {
        let start = Instant::now();
        let r = resume(Some(1), 1, false);
        let r = Resume {
            moved_at: start,
            ..r
        };
        assert!(!r.silence_due(start + Duration::from_millis(1999)));
        assert!(r.silence_due(start + SILENCE));
        let reported = Resume {
            reported_past_end: true,
            ..r.clone()
        };
        assert!(!reported.silence_due(start + Duration::from_secs(60)));
        // Each seek made by silence doubles the next window, up to 32 seconds.
        for (seeks, window) in [(1, 4), (2, 8), (3, 16), (4, 32), (9, 32)] {
            let r = Resume {
                silent_seeks: seeks,
                ..r.clone()
            };
            let window = Duration::from_secs(window);
            assert!(
                !r.silence_due(start + window - Duration::from_millis(1)),
                "{seeks}"
            );
            assert!(r.silence_due(start + window), "{seeks}");
        }
    }

    #[test]
    fn a_live_fetch_that_skips_offsets_is_named_by_where_the_log_starts() {
        // (expected, first, low, jump)
        let cases = [
            (10, 10, Some(0), None),
            (10, 11, Some(0), Some(Jump::NotInLog { missing: 1 })),
            (10, 25, Some(10), Some(Jump::NotInLog { missing: 15 })),
            (10, 25, Some(20), Some(Jump::Deleted { missing: 15 })),
            (10, 25, None, Some(Jump::Unknown { missing: 15 })),
        ];
        for (expected, first, low, jump) in cases {
            assert_eq!(
                forward_jump(expected, first, || low),
                jump,
                "{expected} {first} {low:?}"
            );
        }
        let asked = std::cell::Cell::new(false);
        let no_jump = forward_jump(10, 10, || {
            asked.set(true);
            Some(0)
        });
        assert_eq!(
            (no_jump, asked.get()),
            (None, false),
            "no broker call without a jump"
        );
    }
}
