//! Percentiles and rounding of measured latencies.

use std::time::Duration;

pub(crate) fn ms(d: Option<Duration>) -> f64 {
    d.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
}

/// Produced -> published of each (produced, published) flight in microseconds, in ascending
/// order.
pub(crate) fn flight_times<'a>(flights: impl Iterator<Item = &'a (i64, i64)>) -> Vec<Duration> {
    let mut times: Vec<Duration> = flights
        .map(|(sent, published)| Duration::from_micros((published - sent).max(0) as u64))
        .collect();
    times.sort_unstable();
    times
}

/// The nearest-rank percentile `p` (0..=1) of `sorted`, which must be in ascending order.
pub(crate) fn nearest_rank<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    let rank = ((sorted.len() as f64 * p).ceil() as usize).max(1);
    sorted.get(rank.min(sorted.len()).checked_sub(1)?).copied()
}

pub(crate) fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_picks_the_smallest_value_covering_the_share() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(nearest_rank(&v, 0.5), Some(50));
        assert_eq!(nearest_rank(&v, 0.99), Some(99));
        assert_eq!(nearest_rank(&v, 1.0), Some(100));
        assert_eq!(nearest_rank(&v, 0.0), Some(1));
        assert_eq!(nearest_rank(&[7], 0.99), Some(7));
        assert_eq!(nearest_rank::<i64>(&[], 0.5), None);
    }
}
