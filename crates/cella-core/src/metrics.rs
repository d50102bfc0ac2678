//! Per-sandbox metrics history.
//!
//! E2B's `GET /sandboxes/{id}/metrics?start&end` answers a time series, and the SDKs'
//! `get_metrics()` hand that list to users who chart it. A single "current" sample would also
//! make CPU use depend on who asked last (it is a rate between two readings). So the server
//! samples every live sandbox at a fixed interval into a bounded ring, and a request reads a
//! window of it plus one fresh sample, without changing any state.

use std::collections::VecDeque;

use cella_api::SandboxMetric;

/// Samples kept per sandbox: one hour at the default 5 s interval.
pub const DEFAULT_HISTORY: usize = 720;

/// A raw reading of a sandbox's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    /// When, ms since the epoch.
    pub at_ms: i64,
    /// Cumulative CPU time, ns.
    pub cpu_ns: u64,
}

/// The bounded history of one sandbox.
#[derive(Debug)]
pub struct MetricsRing {
    samples: VecDeque<SandboxMetric>,
    cap: usize,
    last: Option<Reading>,
}

impl MetricsRing {
    /// An empty ring keeping at most `cap` samples (at least one).
    pub fn new(cap: usize) -> MetricsRing {
        MetricsRing {
            samples: VecDeque::new(),
            cap: cap.max(1),
            last: None,
        }
    }

    /// The reading the next CPU rate is measured from (`None`: since the start).
    pub fn last_reading(&self) -> Option<Reading> {
        self.last
    }

    /// Record a sample taken at `reading`; the oldest sample goes when the ring is full.
    pub fn push(&mut self, sample: SandboxMetric, reading: Reading) {
        if self.samples.len() == self.cap {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
        self.last = Some(reading);
    }

    /// Samples whose `timestampUnix` lies in `[start, end]` (unix seconds, both optional), oldest
    /// first.
    pub fn window(&self, start: Option<i64>, end: Option<i64>) -> Vec<SandboxMetric> {
        self.samples
            .iter()
            .filter(|m| start.is_none_or(|s| m.timestamp_unix >= s))
            .filter(|m| end.is_none_or(|e| m.timestamp_unix <= e))
            .cloned()
            .collect()
    }

    /// Number of samples held.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether no sample was recorded yet.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// CPU use in percent of `cpu_count` CPUs between `from` and `to`, clamped to 0..=100.
pub fn cpu_percent(from: Reading, to: Reading, cpu_count: u32) -> f64 {
    let wall_ns = ((to.at_ms - from.at_ms).max(1) as f64) * 1e6 * f64::from(cpu_count.max(1));
    (to.cpu_ns.saturating_sub(from.cpu_ns) as f64 / wall_ns * 100.0).clamp(0.0, 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ts: i64) -> SandboxMetric {
        SandboxMetric {
            timestamp: String::new(),
            timestamp_unix: ts,
            cpu_count: 1,
            cpu_used_pct: 0.0,
            mem_used: 0,
            mem_total: 0,
            mem_cache: 0,
            disk_used: 0,
            disk_total: 0,
        }
    }

    fn reading(at_ms: i64, cpu_ns: u64) -> Reading {
        Reading { at_ms, cpu_ns }
    }

    #[test]
    fn the_ring_drops_the_oldest_sample_when_full() {
        let mut ring = MetricsRing::new(3);
        for ts in 1..=5 {
            ring.push(sample(ts), reading(ts * 1000, 0));
        }
        let ts: Vec<i64> = ring
            .window(None, None)
            .iter()
            .map(|m| m.timestamp_unix)
            .collect();
        assert_eq!(ts, vec![3, 4, 5]);
        assert_eq!(ring.last_reading(), Some(reading(5000, 0)));
    }

    #[test]
    fn a_window_is_inclusive_on_both_ends() {
        let mut ring = MetricsRing::new(10);
        for ts in [10, 15, 20, 25] {
            ring.push(sample(ts), reading(ts * 1000, 0));
        }
        let ts =
            |s, e| -> Vec<i64> { ring.window(s, e).iter().map(|m| m.timestamp_unix).collect() };
        assert_eq!(ts(Some(15), Some(20)), vec![15, 20]);
        assert_eq!(ts(Some(16), None), vec![20, 25]);
        assert_eq!(ts(None, Some(14)), vec![10]);
        assert!(ts(Some(30), None).is_empty());
    }

    #[test]
    fn cpu_percent_is_a_rate_over_the_interval_and_cpus() {
        // 1 s of CPU over 2 s of wall time on 1 CPU: 50 %.
        assert_eq!(
            cpu_percent(reading(0, 0), reading(2000, 1_000_000_000), 1),
            50.0
        );
        // The same on 2 CPUs: 25 %.
        assert_eq!(
            cpu_percent(reading(0, 0), reading(2000, 1_000_000_000), 2),
            25.0
        );
        // A counter that went backwards (a hostile or reset cgroup) is 0, never negative.
        assert_eq!(cpu_percent(reading(0, 5), reading(1000, 1), 1), 0.0);
        // More than possible is clamped.
        assert_eq!(cpu_percent(reading(0, 0), reading(1, u64::MAX), 1), 100.0);
    }
}
