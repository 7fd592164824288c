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

/// The nearest-rank percentile `p` of `sorted` (ascending) in milliseconds; NaN when empty.
pub(crate) fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    ms(nearest_rank(sorted, p))
}

/// The window the phases' tails are reported in (`p99_by_window`).
pub(crate) const FIVE_SECONDS_US: i64 = 5_000_000;

/// The p99 of produced -> published (milliseconds) in each `window_us` of produce time,
/// counted from the first produce: whether the tail stays put over a phase or grows with it
/// (the development broker's fetch cost grows with the length of the log).
pub(crate) fn p99_by_window(flights: &[(i64, i64)], window_us: i64) -> Vec<f64> {
    let Some(first) = flights.iter().map(|(sent, _)| *sent).min() else {
        return Vec::new();
    };
    let mut windows: Vec<Vec<(i64, i64)>> = Vec::new();
    for flight in flights {
        let i = usize::try_from((flight.0 - first) / window_us.max(1)).unwrap_or(0);
        if windows.len() <= i {
            windows.resize_with(i + 1, Vec::new);
        }
        windows[i].push(*flight);
    }
    windows
        .iter()
        .map(|window| percentile_ms(&flight_times(window.iter()), 0.99))
        .collect()
}

/// Milliseconds for a line of output: `12.3 / 45.6`.
pub(crate) fn joined_ms(values: &[f64]) -> String {
    values
        .iter()
        .map(|ms| format!("{ms:.1}"))
        .collect::<Vec<_>>()
        .join(" / ")
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

    #[test]
    fn the_tail_is_taken_per_window_of_produce_time() {
        // 100 flights a second for 3 s, produced at t; the third second is slower.
        let flights: Vec<(i64, i64)> = (0..300)
            .map(|i| {
                let sent = 1_000_000 + i * 10_000;
                let took = if i >= 200 {
                    20_000
                } else {
                    5_000 + (i % 100) * 10
                };
                (sent, sent + took)
            })
            .collect();
        let windows = p99_by_window(&flights, 1_000_000);
        assert_eq!(windows, vec![5.98, 5.98, 20.0]);
        // A window without flights in it (none produced in the second second) is NaN.
        let gap: Vec<(i64, i64)> = vec![(0, 1_000), (2_500_000, 2_503_000)];
        let windows = p99_by_window(&gap, 1_000_000);
        assert_eq!(windows.len(), 3);
        assert_eq!((windows[0], windows[2]), (1.0, 3.0));
        assert!(windows[1].is_nan());
        assert!(p99_by_window(&[], 1_000_000).is_empty());
    }
}
