//! The machine's CPU as `/proc/stat` counts it: how busy it was, and when and how much the
//! host stole.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// The machine's CPU time counters from `/proc/stat`, in ticks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuTicks {
    pub(crate) busy: u64,
    pub(crate) steal: u64,
    pub(crate) total: u64,
}

impl CpuTicks {
    /// `None` where there is no `/proc/stat` (not Linux).
    pub(crate) fn now() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    pub(crate) fn parse(stat: &str) -> Option<Self> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let field = |i: usize| v.get(i).copied().unwrap_or(0);
        let (idle, steal) = (field(3) + field(4), field(7));
        let total: u64 = (0..8).map(field).sum();
        Some(Self {
            busy: total - idle - steal,
            steal,
            total,
        })
    }

    pub(crate) fn share_since(self, before: Self) -> Option<CpuShare> {
        let total = self.total.checked_sub(before.total).filter(|t| *t > 0)? as f64;
        Some(CpuShare {
            busy_pct: self.busy.saturating_sub(before.busy) as f64 * 100.0 / total,
            steal_pct: self.steal.saturating_sub(before.steal) as f64 * 100.0 / total,
        })
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuShare {
    pub(crate) busy_pct: f64,
    pub(crate) steal_pct: f64,
}

/// When the host stole CPU during a phase: `/proc/stat` read every 100 ms, and the
/// intervals (wall clock, microseconds) in which the machine's steal counter moved. A
/// phase's steal percentage says how much; this says when, so that the orders in flight at
/// those moments can be told from the rest. The counter moves in 10 ms ticks, so a steal
/// shorter than that may show in the next interval.
#[derive(Debug, Default)]
pub(crate) struct StealWindows {
    pub(crate) stolen: Vec<(i64, i64)>,
}

impl StealWindows {
    const EVERY: Duration = Duration::from_millis(100);

    /// Samples until `stop` fires; `None` where there is no `/proc/stat` (not Linux).
    pub(crate) async fn sample(stop: CancellationToken) -> Option<Self> {
        let read = || Some((wall_us(), CpuTicks::now()?.steal));
        let mut last = read()?;
        let mut windows = Self::default();
        let mut tick = tokio::time::interval(Self::EVERY);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let now = read()?;
            if now.1 > last.1 {
                windows.stolen.push((last.0, now.0));
            }
            last = now;
        }
        Some(windows)
    }

    /// Whether `[from, to]` (microseconds) overlaps a window with steal.
    pub(crate) fn touches(&self, from: i64, to: i64) -> bool {
        // Windows are in time order and do not overlap: the first one ending after `from`
        // is the only candidate.
        let i = self.stolen.partition_point(|&(_, end)| end <= from);
        self.stolen.get(i).is_some_and(|&(start, _)| start < to)
    }
}

/// The CPU time PostgreSQL's processes used, as the kernel accounts it (`/proc/<pid>/stat` of
/// every process named `postgres`, plus the time of the backends that exited, which the
/// postmaster collected as its children's). On the same host only, Linux only.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PgCpu {
    ticks: u64,
}

impl PgCpu {
    /// Linux's `USER_HZ`, the unit of `/proc/<pid>/stat` times (100 on every architecture it
    /// supports for user space).
    const TICKS_PER_SEC: u64 = 100;

    /// `None` where there is no `/proc` or no PostgreSQL process on this host.
    pub(crate) fn now() -> Option<Self> {
        let mut ticks = 0;
        let mut seen = false;
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let name = entry.file_name();
            if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue; // exited meanwhile
            };
            if let Some(t) = Self::postgres_ticks(&stat) {
                ticks += t;
                seen = true;
            }
        }
        seen.then_some(Self { ticks })
    }

    /// utime + stime + cutime + cstime of a `postgres` process's stat line. Only the
    /// postmaster has children's time (its exited backends); counting it once per process is
    /// right because a child's time moves to its parent only when it exits.
    fn postgres_ticks(stat: &str) -> Option<u64> {
        let open = stat.find('(')?;
        let close = stat.rfind(')')?;
        if &stat[open + 1..close] != "postgres" {
            return None;
        }
        // Fields after the command: state is field 3; utime..cstime are fields 14..17.
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        (11..15).map(|i| fields.get(i)?.parse::<u64>().ok()).sum()
    }

    /// Microseconds of PostgreSQL CPU per unit of work since `before`.
    pub(crate) fn us_per(self, before: Self, units: u64) -> Option<f64> {
        let ticks = self.ticks.checked_sub(before.ticks)?;
        (units > 0).then(|| ticks as f64 * 1e6 / Self::TICKS_PER_SEC as f64 / units as f64)
    }
}

pub(crate) fn wall_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_order_is_touched_by_steal_only_when_its_flight_overlaps_a_stolen_interval() {
        let windows = StealWindows {
            stolen: vec![(100, 200), (500, 600)],
        };
        for (from, to, touched) in [
            (0, 50, false),
            (0, 100, false),
            (0, 101, true),
            (150, 160, true),
            (199, 300, true),
            (200, 500, false),
            (250, 550, true),
            (50, 700, true),
            (600, 800, false),
        ] {
            assert_eq!(windows.touches(from, to), touched, "[{from}, {to}]");
        }
        assert!(!StealWindows::default().touches(0, i64::MAX));
    }

    #[test]
    fn postgres_cpu_comes_from_the_stat_lines_of_postgres_processes_only() {
        let line = |comm: &str| {
            format!("123 ({comm}) S 1 123 123 0 -1 4194560 500 0 0 0 70 30 5 2 20 0 1 0 100 0 0")
        };
        assert_eq!(PgCpu::postgres_ticks(&line("postgres")), Some(107));
        assert_eq!(PgCpu::postgres_ticks(&line("paystream")), None);
        assert_eq!(PgCpu::postgres_ticks(&line("postgres) (x")), None);
        assert_eq!(
            PgCpu::postgres_ticks("123 (postgres) S 1"),
            None,
            "truncated"
        );
        let (before, after) = (PgCpu { ticks: 1_000 }, PgCpu { ticks: 1_450 });
        // 450 ticks = 4.5 s of CPU over 50,000 debits = 90 us each.
        assert_eq!(after.us_per(before, 50_000), Some(90.0));
        assert_eq!(after.us_per(before, 0), None);
        assert_eq!(before.us_per(after, 10), None, "counters never go back");
    }

    #[test]
    fn cpu_shares_come_from_the_machine_line_of_proc_stat() {
        let before =
            CpuTicks::parse("cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 50 0 25 400 5 0 0 20 0 0\n")
                .expect("parses");
        let after = CpuTicks::parse("cpu  160 0 70 900 10 0 0 60 0 0\n").expect("parses");
        // Over 200 ticks: 80 busy (user + system), 100 idle, 20 stolen.
        let share = after.share_since(before).expect("time passed");
        assert!((share.busy_pct - 40.0).abs() < 1e-9, "{share:?}");
        assert!((share.steal_pct - 10.0).abs() < 1e-9, "{share:?}");
        assert!(CpuTicks::parse("intr 1 2 3\n").is_none());
        assert!(before.share_since(before).is_none(), "no time passed");
    }
}
