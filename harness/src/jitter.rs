//! [`Jitter`]: a wrapper device that sleeps for seeded random moments before and after each call
//! to the device it wraps, so that concurrent requests meet in more orders than an unloaded
//! machine would ever produce, and a race window that is open for microseconds is hit within
//! seconds of testing instead of once a month in production.
//!
//! Most calls get no delay; some get tens of microseconds; a few get up to a few milliseconds
//! (see [`JitterProfile`]). The delays come from a seeded schedule: the n-th call the device
//! receives gets the n-th pair of delays, so one seed gives the same schedule every time. Which
//! request is the n-th depends on how the threads were scheduled, which no seed controls.
//!
//! ```
//! use std::time::Duration;
//! use userblk::{BlockDevice, MemDevice};
//! use userblk_harness::jitter::{Jitter, JitterProfile};
//!
//! let dev = Jitter::new(MemDevice::new(1 << 20), 7);
//! dev.write(0, &[1; 512])?;
//! let mut buf = [0; 512];
//! dev.read(0, &mut buf)?;
//! assert_eq!(buf, [1; 512]);
//! // It sleeps, so the server must not run it inline.
//! assert!(!dev.capabilities().never_blocks);
//!
//! let quiet = JitterProfile { short_percent: 0, long_percent: 0, ..JitterProfile::default() };
//! assert_eq!(quiet.delay(7, 0), Duration::ZERO);
//! # Ok::<(), std::io::Error>(())
//! ```

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use userblk::{BlockDevice, Capabilities};

use crate::random::generate::mix;

/// How often and how long [`Jitter`] sleeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JitterProfile {
    /// Of 100 delays (one before and one after each call), how many are short: 10 to 100 µs.
    /// Default: 20.
    pub short_percent: u32,
    /// Of 100 delays, how many are long: 100 µs up to `max_delay`. Default: 3.
    pub long_percent: u32,
    /// The longest delay. Default: 2 ms.
    pub max_delay: Duration,
}

impl Default for JitterProfile {
    fn default() -> JitterProfile {
        JitterProfile {
            short_percent: 20,
            long_percent: 3,
            max_delay: Duration::from_millis(2),
        }
    }
}

impl JitterProfile {
    /// The `n`-th delay of the schedule seeded with `seed` (delays `2k` and `2k + 1` go before
    /// and after the `k`-th call).
    pub fn delay(&self, seed: u64, n: u64) -> Duration {
        let r = mix(mix(seed ^ 0x6a69_7474_6572) ^ n);
        let roll = (r % 100) as u32;
        let frac = (r >> 8) % 1_000_000;
        let span = |lo: u64, hi: u64| lo + (hi.saturating_sub(lo)) * frac / 1_000_000;
        let max = self.max_delay.as_micros() as u64;
        if roll < self.long_percent {
            // Long delays spread evenly on a log scale: as many near 200 µs as near 2 ms.
            let lo = 100f64.min(max as f64).max(1.0);
            let micros = lo * (max as f64 / lo).max(1.0).powf(frac as f64 / 1e6);
            Duration::from_micros(micros as u64)
        } else if roll < self.long_percent + self.short_percent {
            Duration::from_micros(span(10, 100.min(max)))
        } else {
            Duration::ZERO
        }
    }
}

/// A device that passes every call to `D`, with seeded random sleeps before and after it. See
/// the [module docs](self).
#[derive(Debug)]
pub struct Jitter<D> {
    inner: D,
    seed: u64,
    profile: JitterProfile,
    calls: AtomicU64,
}

impl<D: BlockDevice> Jitter<D> {
    /// Wraps `inner` with the default profile and the schedule of `seed`.
    pub fn new(inner: D, seed: u64) -> Jitter<D> {
        Jitter::with_profile(inner, seed, JitterProfile::default())
    }

    /// Wraps `inner` with `profile` and the schedule of `seed`.
    pub fn with_profile(inner: D, seed: u64, profile: JitterProfile) -> Jitter<D> {
        Jitter {
            inner,
            seed,
            profile,
            calls: AtomicU64::new(0),
        }
    }

    /// The device wrapped.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// Calls made so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    fn around<T>(&self, call: impl FnOnce(&D) -> T) -> T {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        sleep(self.profile.delay(self.seed, 2 * n));
        let out = call(&self.inner);
        sleep(self.profile.delay(self.seed, 2 * n + 1));
        out
    }
}

fn sleep(d: Duration) {
    if !d.is_zero() {
        std::thread::sleep(d);
    }
}

impl<D: BlockDevice> BlockDevice for Jitter<D> {
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn blocks(&self) -> u64 {
        self.inner.blocks()
    }
    fn capabilities(&self) -> Capabilities {
        // Sleeping is blocking: a server that ran this inline would serialise every request
        // of a connection and close the very windows the delays are meant to open.
        Capabilities {
            never_blocks: false,
            ..self.inner.capabilities()
        }
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.around(|d| d.read(offset, buf))
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.around(|d| d.write(offset, data))
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.around(|d| d.write_fua(offset, data))
    }
    fn flush(&self) -> io::Result<()> {
        self.around(|d| d.flush())
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.around(|d| d.trim(offset, len))
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.around(|d| d.write_zeroes(offset, len, may_trim))
    }
    fn unmount(&self) {
        self.inner.unmount();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_is_seeded_mostly_zero_and_bounded() {
        let p = JitterProfile::default();
        let a: Vec<_> = (0..10_000).map(|n| p.delay(3, n)).collect();
        let b: Vec<_> = (0..10_000).map(|n| p.delay(3, n)).collect();
        assert_eq!(a, b);
        assert_ne!(a, (0..10_000).map(|n| p.delay(4, n)).collect::<Vec<_>>());
        let zero = a.iter().filter(|d| d.is_zero()).count();
        let long = a
            .iter()
            .filter(|d| **d >= Duration::from_micros(100))
            .count();
        assert!((7400..8300).contains(&zero), "{zero}");
        assert!((200..400).contains(&long), "{long}");
        assert!(a.iter().all(|d| *d <= p.max_delay));
        assert!(a.iter().any(|d| *d >= Duration::from_millis(1)));
    }

    #[test]
    fn it_forwards_every_call_and_counts_them() {
        let quiet = JitterProfile {
            short_percent: 0,
            long_percent: 0,
            ..JitterProfile::default()
        };
        let dev =
            Jitter::with_profile(userblk::MemDevice::with_block_size(1 << 20, 4096), 1, quiet);
        assert_eq!(dev.block_size(), 4096);
        assert_eq!(dev.blocks(), 256);
        assert!(dev.capabilities().trim_zeroes);
        dev.write(4096, &[9; 4096]).unwrap();
        dev.write_fua(0, &[8; 4096]).unwrap();
        dev.trim(4096, 4096).unwrap();
        dev.write_zeroes(0, 4096, true).unwrap();
        dev.flush().unwrap();
        let mut buf = vec![1; 8192];
        dev.read(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(dev.calls(), 6);
    }
}
