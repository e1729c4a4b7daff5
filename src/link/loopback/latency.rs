//! Request latency as the fake kernel sees it (from sending a request to its reply), per
//! command, in log-linear histograms: eight buckets per power of two (under 12.5 % error),
//! fixed size, so recording a reply costs a few instructions and no allocation.

use std::fmt;
use std::time::Duration;

use crate::proto::Command;

/// Sub-buckets per power of two (a power of two itself).
const SUB: u64 = 8;
const SUB_BITS: u32 = SUB.trailing_zeros();
/// Values below `SUB` ns get a bucket each; above, `SUB` per power of two up to 2^63.
const BUCKETS: usize = (SUB + (64 - SUB_BITS as u64) * SUB) as usize;

fn bucket(ns: u64) -> usize {
    if ns < SUB {
        return ns as usize;
    }
    let e = 63 - ns.leading_zeros();
    let mant = (ns >> (e - SUB_BITS)) & (SUB - 1);
    (SUB + u64::from(e - SUB_BITS) * SUB + mant) as usize
}

/// The smallest and largest value of a bucket.
fn bucket_range(i: usize) -> (u64, u64) {
    let i = i as u64;
    if i < SUB {
        return (i, i);
    }
    let e = (i - SUB) / SUB + u64::from(SUB_BITS);
    let mant = (i - SUB) % SUB;
    let width = 1u64 << (e - u64::from(SUB_BITS));
    let low = (SUB + mant) * width;
    (low, low.saturating_add(width - 1))
}

/// A histogram of durations with eight buckets per power of two.
#[derive(Clone, PartialEq, Eq)]
pub struct LatencyHistogram {
    buckets: Box<[u64; BUCKETS]>,
    count: u64,
    max_ns: u64,
    total_ns: u128,
}

impl Default for LatencyHistogram {
    fn default() -> LatencyHistogram {
        LatencyHistogram {
            buckets: Box::new([0; BUCKETS]),
            count: 0,
            max_ns: 0,
            total_ns: 0,
        }
    }
}

impl fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("count", &self.count)
            .field("p50", &self.quantile(0.5))
            .field("p99", &self.quantile(0.99))
            .field("max", &self.max())
            .finish()
    }
}

impl LatencyHistogram {
    /// Adds one duration.
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[bucket(ns)] += 1;
        self.count += 1;
        self.max_ns = self.max_ns.max(ns);
        self.total_ns += u128::from(ns);
    }

    /// Durations recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The longest, exactly.
    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.max_ns)
    }

    /// The mean.
    pub fn mean(&self) -> Duration {
        match self.count {
            0 => Duration::ZERO,
            n => Duration::from_nanos(u64::try_from(self.total_ns / u128::from(n)).unwrap_or(0)),
        }
    }

    /// The `q` quantile (0.5 for the median), to within 12.5 %: the middle of the bucket that
    /// holds it, never above the maximum (the maximum itself for 1.0). Zero when empty.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.count == 0 {
            return Duration::ZERO;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        if rank >= self.count {
            return self.max();
        }
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let (low, high) = bucket_range(i);
                let mid = low + (high - low) / 2;
                return Duration::from_nanos(mid.min(self.max_ns));
            }
        }
        self.max()
    }

    /// How many durations are certainly above `d` (those in buckets wholly above it).
    pub fn count_above(&self, d: Duration) -> u64 {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.buckets
            .iter()
            .enumerate()
            .filter(|&(i, _)| bucket_range(i).0 > ns)
            .map(|(_, &n)| n)
            .sum()
    }

    /// Adds another histogram's durations.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
        self.count += other.count;
        self.max_ns = self.max_ns.max(other.max_ns);
        self.total_ns += other.total_ns;
    }
}

/// The commands the kernel sends, in report order.
const COMMANDS: [Command; 5] = [
    Command::Read,
    Command::Write,
    Command::Flush,
    Command::Trim,
    Command::WriteZeroes,
];

/// Requests up to this many bytes are "small" in [`CommandLatency::by_size`]; larger ones
/// "large". A 1 MiB copy legitimately takes a hundred times a 4 KiB one, so outliers are counted
/// against the median of their own size class.
pub const SMALL_REQUEST: u32 = 64 << 10;

/// Per-command histograms, as the fake kernel keeps them.
#[derive(Clone, Debug, Default)]
pub(super) struct Latencies {
    per_command: [LatencyHistogram; COMMANDS.len()],
    by_size: [[LatencyHistogram; 2]; COMMANDS.len()],
}

impl Latencies {
    /// Records a `len`-byte request of `command` that took `d`.
    pub(super) fn record(&mut self, command: Command, len: u32, d: Duration) {
        if let Some(i) = COMMANDS.iter().position(|&c| c == command) {
            self.per_command[i].record(d);
            self.by_size[i][usize::from(len > SMALL_REQUEST)].record(d);
        }
    }

    pub(super) fn report(&self) -> LatencyReport {
        LatencyReport {
            commands: COMMANDS
                .iter()
                .zip(self.per_command.iter().zip(&self.by_size))
                .filter(|(_, (h, _))| h.count() > 0)
                .map(|(&command, (h, by_size))| CommandLatency {
                    command,
                    count: h.count(),
                    p50: h.quantile(0.5),
                    p99: h.quantile(0.99),
                    max: h.max(),
                    histogram: h.clone(),
                    by_size: by_size.clone(),
                })
                .collect(),
        }
    }
}

/// Latency of one command's requests: from sending the request to reading its reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandLatency {
    /// The command.
    pub command: Command,
    /// Requests answered.
    pub count: u64,
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Longest.
    pub max: Duration,
    /// All of them.
    pub histogram: LatencyHistogram,
    /// The same requests by size: up to [`SMALL_REQUEST`] bytes, and larger.
    pub by_size: [LatencyHistogram; 2],
}

impl CommandLatency {
    /// Requests slower than `factor` times the median of their size class (see
    /// [`by_size`](Self::by_size)): the outliers worth a look.
    pub fn slower_than_median(&self, factor: u32) -> u64 {
        self.slower_than(factor, Duration::ZERO)
    }

    /// Requests slower than both `factor` times the median of their size class and `floor`.
    pub fn slower_than(&self, factor: u32, floor: Duration) -> u64 {
        self.by_size
            .iter()
            .filter(|h| h.count() > 0)
            .map(|h| h.count_above(h.quantile(0.5).saturating_mul(factor).max(floor)))
            .sum()
    }
}

/// Request latency per command, from [`LoopbackKernel::latency`](super::LoopbackKernel::latency).
/// Its `Display` is a table with a column of outliers (over 100 times the median).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LatencyReport {
    /// The commands sent at least once, in the order READ, WRITE, FLUSH, TRIM, WRITE_ZEROES.
    pub commands: Vec<CommandLatency>,
}

impl LatencyReport {
    /// Factor over the median beyond which a request counts as an outlier in the table.
    pub const OUTLIER_FACTOR: u32 = 100;

    /// The entry for `command`, if it was sent.
    pub fn get(&self, command: Command) -> Option<&CommandLatency> {
        self.commands.iter().find(|c| c.command == command)
    }

    /// Adds `other`'s requests to this report (the same commands' histograms merged), so
    /// the latency of many kernels (one per test case) reads as one table.
    pub fn merge(&mut self, other: &LatencyReport) {
        for theirs in &other.commands {
            match self
                .commands
                .iter_mut()
                .find(|c| c.command == theirs.command)
            {
                Some(ours) => {
                    ours.histogram.merge(&theirs.histogram);
                    for (o, t) in ours.by_size.iter_mut().zip(&theirs.by_size) {
                        o.merge(t);
                    }
                    ours.count = ours.histogram.count();
                    ours.p50 = ours.histogram.quantile(0.5);
                    ours.p99 = ours.histogram.quantile(0.99);
                    ours.max = ours.histogram.max();
                }
                None => self.commands.push(theirs.clone()),
            }
        }
        let order = |c: &CommandLatency| COMMANDS.iter().position(|&x| x == c.command);
        self.commands.sort_by_key(order);
    }

    /// Total outliers (over [`OUTLIER_FACTOR`](Self::OUTLIER_FACTOR) times the median of their
    /// command and size class).
    pub fn outliers(&self) -> u64 {
        self.commands
            .iter()
            .map(|c| c.slower_than_median(Self::OUTLIER_FACTOR))
            .sum()
    }
}

/// A duration with a unit that suits it: `850 ns`, `12.5 µs`, `3.2 ms`, `1.50 s`.
fn short(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns < 1_000 {
        format!("{ns} ns")
    } else if ns < 1_000_000 {
        format!("{:.1} µs", ns as f64 / 1e3)
    } else if ns < 1_000_000_000 {
        format!("{:.1} ms", ns as f64 / 1e6)
    } else {
        format!("{:.2} s", ns as f64 / 1e9)
    }
}

impl fmt::Display for LatencyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<13} {:>9} {:>10} {:>10} {:>10} {:>9}",
            "command",
            "requests",
            "p50",
            "p99",
            "max",
            format!(">{}×p50", Self::OUTLIER_FACTOR)
        )?;
        for c in &self.commands {
            writeln!(
                f,
                "{:<13} {:>9} {:>10} {:>10} {:>10} {:>9}",
                c.command.name(),
                c.count,
                short(c.p50),
                short(c.p99),
                short(c.max),
                c.slower_than_median(Self::OUTLIER_FACTOR)
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order() {
        let mut last = 0;
        for ns in (0..10_000u64).chain([u64::MAX / 3, u64::MAX - 1, u64::MAX]) {
            let b = bucket(ns);
            assert!(b < BUCKETS);
            assert!(b >= last || ns > 10_000);
            last = b;
            let (low, high) = bucket_range(b);
            assert!(
                low <= ns && ns <= high,
                "{ns} not in bucket {b} ({low}..={high})"
            );
        }
        for b in 1..BUCKETS {
            assert_eq!(bucket_range(b).0, bucket_range(b - 1).1 + 1, "bucket {b}");
        }
    }

    #[test]
    fn merged_reports_add_up_and_keep_command_order() {
        let mut a = Latencies::default();
        let mut b = Latencies::default();
        for i in 1..=100 {
            a.record(Command::Write, 4096, Duration::from_micros(i));
            b.record(Command::Read, 4096, Duration::from_micros(10));
        }
        b.record(Command::Write, 4096, Duration::from_secs(2));
        let mut merged = a.report();
        merged.merge(&b.report());
        let names: Vec<_> = merged.commands.iter().map(|c| c.command).collect();
        assert_eq!(names, [Command::Read, Command::Write]);
        let w = merged.get(Command::Write).unwrap();
        assert_eq!(w.count, 101);
        assert_eq!(w.max, Duration::from_secs(2));
        assert_eq!(w.slower_than_median(LatencyReport::OUTLIER_FACTOR), 1);
    }

    #[test]
    fn quantiles_are_within_an_eighth() {
        let mut h = LatencyHistogram::default();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        h.record(Duration::from_secs(2));
        assert_eq!(h.count(), 1001);
        let p50 = h.quantile(0.5).as_secs_f64();
        assert!((p50 - 500e-6).abs() / 500e-6 < 0.125, "{p50}");
        let p99 = h.quantile(0.99).as_secs_f64();
        assert!((p99 - 990e-6).abs() / 990e-6 < 0.125, "{p99}");
        assert_eq!(h.max(), Duration::from_secs(2));
        assert_eq!(h.quantile(1.0), Duration::from_secs(2));
        // Only the 2 s one is over 100 times the median.
        assert_eq!(h.count_above(h.quantile(0.5) * 100), 1);
    }

    #[test]
    fn the_report_lists_commands_sent_and_flags_outliers() {
        let mut l = Latencies::default();
        for _ in 0..99 {
            l.record(Command::Read, 4096, Duration::from_micros(20));
        }
        l.record(Command::Read, 4096, Duration::from_millis(50));
        l.record(Command::Flush, 0, Duration::from_micros(5));
        let r = l.report();
        assert_eq!(r.commands.len(), 2);
        let read = r.get(Command::Read).unwrap();
        assert_eq!(read.count, 100);
        assert!(read.p50 <= read.p99 && read.p99 <= read.max);
        assert_eq!(read.max, Duration::from_millis(50));
        assert_eq!(r.outliers(), 1);
        let table = r.to_string();
        assert!(table.contains("READ"), "{table}");
        assert!(table.contains("50.0 ms"), "{table}");
        assert!(r.get(Command::Write).is_none());
    }

    #[test]
    fn large_requests_are_outliers_only_against_large_ones() {
        let mut l = Latencies::default();
        // 4 KiB writes at 20 µs and 1 MiB writes at 5 ms: none is an outlier of its own size,
        // though every large one is 250 times the median of all writes.
        for _ in 0..90 {
            l.record(Command::Write, 4096, Duration::from_micros(20));
        }
        for _ in 0..10 {
            l.record(Command::Write, 1 << 20, Duration::from_millis(5));
        }
        let r = l.report();
        let write = r.get(Command::Write).unwrap();
        assert_eq!(write.histogram.count_above(write.p50 * 100), 10);
        assert_eq!(r.outliers(), 0);
        // A large write that stalls is one.
        l.record(Command::Write, 1 << 20, Duration::from_secs(2));
        assert_eq!(l.report().outliers(), 1);
        assert_eq!(
            l.report()
                .get(Command::Write)
                .unwrap()
                .slower_than(100, Duration::from_secs(3)),
            0
        );
    }
}
