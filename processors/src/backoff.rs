//! Bounded exponential backoff with jitter, for every retry loop (batches, claims, the relay).

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Bounded exponential backoff with jitter.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The retry bounds every worker and the relay use (`processor.retry_initial_ms`,
    /// `processor.retry_max_ms`).
    pub fn of(processor: &crate::settings::ProcessorSettings) -> Self {
        Self {
            initial: Duration::from_millis(processor.retry_initial_ms),
            max: Duration::from_millis(processor.retry_max_ms),
        }
    }

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
}
