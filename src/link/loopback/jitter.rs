//! [`Jitter`]: seeded disorder on the kernel side. Before sending a request the fake kernel may
//! wait a little, and the requests of one operation leave in a shuffled order, as blk-mq may
//! dispatch queued requests; the same seed gives the same draws, so a run reproduces (exactly,
//! from one submitting thread; with several, the draws are the same but the threads take them
//! in the order the scheduler lets them).

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// Seeded delays before sending a request, and a shuffled dispatch order for the requests of
/// one operation. Off by default ([`LoopbackOptions::jitter`](super::LoopbackOptions::jitter)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Jitter {
    /// Seed of the generator: the same seed gives the same delays and orders.
    pub seed: u64,
    /// Longest delay before sending a request.
    pub max_delay: Duration,
    /// Chance, in percent (0 to 100), that a request is delayed.
    pub percent: u8,
}

impl Jitter {
    /// Jitter with `seed`: a quarter of the requests delayed by up to 200 µs.
    pub fn new(seed: u64) -> Jitter {
        Jitter {
            seed,
            max_delay: Duration::from_micros(200),
            percent: 25,
        }
    }
}

/// The generator behind a [`Jitter`]: SplitMix64, one draw at a time under a lock.
#[derive(Debug)]
pub(super) struct JitterSource {
    jitter: Jitter,
    state: Mutex<u64>,
}

impl JitterSource {
    pub(super) fn new(jitter: Jitter) -> JitterSource {
        JitterSource {
            jitter,
            state: Mutex::new(jitter.seed),
        }
    }

    fn next(&self) -> u64 {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// The delay before the next request, if it gets one.
    pub(super) fn delay(&self) -> Option<Duration> {
        let roll = self.next() % 100;
        if roll >= u64::from(self.jitter.percent) {
            return None;
        }
        let max = u64::try_from(self.jitter.max_delay.as_nanos()).unwrap_or(u64::MAX);
        Some(Duration::from_nanos(self.next() % max.saturating_add(1)))
    }

    /// Shuffles `items` (Fisher-Yates).
    pub(super) fn shuffle<T>(&self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_draws() {
        let order = |seed| {
            let j = JitterSource::new(Jitter::new(seed));
            let mut v: Vec<u32> = (0..20).collect();
            j.shuffle(&mut v);
            let delays: Vec<_> = (0..20).map(|_| j.delay()).collect();
            (v, delays)
        };
        assert_eq!(order(1), order(1));
        assert_ne!(order(1).0, order(2).0);
        let (v, delays) = order(3);
        let mut sorted = v.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..20).collect::<Vec<_>>());
        assert!(delays
            .iter()
            .flatten()
            .all(|d| *d <= Duration::from_micros(200)));
        assert!(delays.iter().any(Option::is_some) && delays.iter().any(Option::is_none));
    }
}
