//! What random tests do: the seeded generator, the operations ([`ModelOp`]) and the two ways of
//! choosing them: one sequence spread over the device ([`generate`]) and, for concurrent runs,
//! one list per client thread crowded onto a small hot region ([`generate_threads`]) so that
//! reads race writes on the same blocks.

use userblk::Capabilities;

/// A small seeded generator (splitmix64): the same seed gives the same operations everywhere.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// A number in `0..n` (`0` when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// A number in `lo..=hi` (`lo` when `hi < lo`).
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo).saturating_add(1))
    }
}

/// The splitmix64 finaliser: a good 64-bit hash of `z`.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One block operation of a random test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelOp {
    /// Write the `seed` pattern (see [`Pattern::Seed`](crate::script::Pattern::Seed)), with FUA
    /// when `fua`.
    Write {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Pattern seed.
        seed: u64,
        /// FUA.
        fua: bool,
    },
    /// Read and check.
    Read {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Flush.
    Flush,
    /// Trim.
    Trim {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Write zeroes.
    Zeroes {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// NO_HOLE.
        no_hole: bool,
    },
}

impl ModelOp {
    /// The byte range it touches, if any.
    pub fn range(&self) -> Option<(u64, u64)> {
        match *self {
            ModelOp::Write { offset, len, .. }
            | ModelOp::Read { offset, len }
            | ModelOp::Trim { offset, len }
            | ModelOp::Zeroes { offset, len, .. } => Some((offset, len)),
            ModelOp::Flush => None,
        }
    }

    /// Whether it changes what blocks hold (write, trim, write-zeroes).
    pub fn writes(&self) -> bool {
        !matches!(self, ModelOp::Read { .. } | ModelOp::Flush)
    }

    /// Whether it touches the bytes `from..to`.
    pub fn touches(&self, from: u64, to: u64) -> bool {
        self.range()
            .is_some_and(|(offset, len)| offset < to && offset + len > from)
    }

    /// The same operation with another length.
    pub(crate) fn with_len(self, new: u64) -> ModelOp {
        match self {
            ModelOp::Write {
                offset, seed, fua, ..
            } => ModelOp::Write {
                offset,
                len: new,
                seed,
                fua,
            },
            ModelOp::Read { offset, .. } => ModelOp::Read { offset, len: new },
            ModelOp::Trim { offset, .. } => ModelOp::Trim { offset, len: new },
            ModelOp::Zeroes {
                offset, no_hole, ..
            } => ModelOp::Zeroes {
                offset,
                len: new,
                no_hole,
            },
            ModelOp::Flush => ModelOp::Flush,
        }
    }
}

/// Generates a sequence for a device of `size` bytes: operations clustered near the start, the
/// end and 64/128 KiB boundaries so that they overlap often, then a read of every range written.
pub fn generate(seed: u64, n: usize, size: u64, bs: u64, caps: Capabilities) -> Vec<ModelOp> {
    let mut rng = Rng::new(seed);
    let blocks = size / bs;
    let mut ops = Vec::with_capacity(n + n / 2);
    let mut written = Vec::new();
    if blocks == 0 {
        return ops;
    }
    for _ in 0..n {
        let nb = match rng.below(100) {
            0..=59 => 1 + rng.below(8),
            60..=89 => 1 + rng.below(128),
            _ => 1 + rng.below(((1 << 20) / bs).max(1)),
        }
        .min(blocks);
        let hot = blocks.min(((2 << 20) / bs).max(1));
        let start = match rng.below(10) {
            0..=5 => rng.below(hot),
            6 | 7 => blocks - 1 - rng.below(hot),
            8 => {
                let step = ((64 << 10) / bs).max(1);
                (1 + rng.below(blocks / step)) * step - rng.below(4).min(step)
            }
            _ => rng.below(blocks),
        }
        .min(blocks - nb);
        let (offset, len) = (start * bs, nb * bs);
        let mut kind = rng.below(100);
        if caps.read_only {
            kind = 0;
        }
        let op = match kind {
            0..=34 => ModelOp::Read { offset, len },
            35..=74 => ModelOp::Write {
                offset,
                len,
                seed: rng.next_u64() % 1_000_000,
                fua: kind >= 70,
            },
            75..=79 => ModelOp::Flush,
            80..=89 if caps.trim => ModelOp::Trim { offset, len },
            _ => ModelOp::Zeroes {
                offset,
                len,
                no_hole: rng.below(2) == 0,
            },
        };
        if op.writes() {
            written.push((offset, len));
        }
        ops.push(op);
    }
    written.sort_unstable();
    written.dedup();
    for (offset, len) in written.into_iter().take(n / 2) {
        ops.push(ModelOp::Read { offset, len });
    }
    ops
}

/// Bytes of the hot region that most operations of a concurrent run crowd onto: a few 4 KiB
/// pages, so that two requests often share a block (a read racing a write) or a page (two
/// writes to different sectors of one page).
pub const HOT_BYTES: u64 = 32 << 10;

/// The pattern seed of operation `index` of thread `thread` in the run with seed `run`: unique
/// within the run (so a block's content names the write that put it there) and different from
/// run to run (so what an earlier run left on reused storage is never taken for this run's
/// data).
pub fn pattern_seed(run: u64, thread: usize, index: usize) -> u64 {
    // 40 bits: short enough to read in a script, wide enough never to collide in practice.
    mix(run.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ ((thread as u64) << 32) ^ index as u64)
        & ((1 << 40) - 1)
}

/// Bytes of the focus area that the threads crowd onto together for a few operations at a
/// time: half a 4 KiB page (at least two blocks), so that requests in flight at once often
/// share a block, or a page.
pub const FOCUS_BYTES: u64 = 2 << 10;

/// Operations of each thread that share one focus area, so that, threads running at about the
/// same pace, requests on the same blocks are in flight at the same moment.
pub const FOCUS_OPS: usize = 8;

/// Generates one operation list per client thread for a concurrent run on a device of `size`
/// bytes with blocks of `bs`: `ops` operations in all. Operation `i` of every thread lands,
/// seven times in ten, in the focus area of window `i / FOCUS_OPS` ([`FOCUS_BYTES`], at a seeded place
/// in the hot region), so that the threads meet on the same blocks at about the same moment;
/// else, one time in two, anywhere in a hot region of [`HOT_BYTES`] (at a seeded place: the
/// start, the end or a 64 KiB boundary), one to a few blocks long; the rest spread over the
/// device, up to 64 KiB long, a few up to 1 MiB (big requests are the sequential mode's
/// business; here they would only slow the races down). Reads are two in five; the rest are
/// writes (one in five with FUA), write-zeroes, trims when the device has them, and flushes.
pub fn generate_threads(
    seed: u64,
    threads: usize,
    ops: usize,
    size: u64,
    bs: u64,
    caps: Capabilities,
) -> Vec<Vec<ModelOp>> {
    let threads = threads.max(1);
    let bs = bs.max(1);
    let blocks = size / bs;
    let mut rng = Rng::new(mix(seed ^ 0x636f_6e63_7572_7265));
    if blocks == 0 {
        return vec![Vec::new(); threads];
    }
    let hot = blocks.min((HOT_BYTES / bs).max(8));
    let step = ((64 << 10) / bs).max(1);
    let hot_start = match rng.below(4) {
        0 => 0,
        1 => blocks - hot,
        _ => (rng.below(blocks / step) * step).min(blocks - hot),
    };
    let per_thread = ops.div_ceil(threads);
    let area = hot.min((FOCUS_BYTES / bs).max(2));
    let focus: Vec<u64> = (0..per_thread.div_ceil(FOCUS_OPS))
        .map(|_| hot_start + rng.below((hot - area) / area + 1) * area)
        .collect();
    let mut out = Vec::with_capacity(threads);
    for t in 0..threads {
        let mut list = Vec::with_capacity(per_thread);
        for i in 0..per_thread.min(ops - (t * per_thread).min(ops)) {
            let (start, nb) = match rng.below(100) {
                0..=69 => {
                    let nb = rng.between(1, 2).min(area);
                    (focus[i / FOCUS_OPS] + rng.below(area - nb + 1), nb)
                }
                70..=84 => {
                    let nb = match rng.below(10) {
                        0..=6 => rng.between(1, 2),
                        _ => rng.between(1, 8),
                    }
                    .min(hot);
                    (hot_start + rng.below(hot - nb + 1), nb)
                }
                85..=98 => {
                    let nb = rng.between(1, ((64 << 10) / bs).max(1)).min(blocks);
                    (rng.below(blocks - nb + 1), nb)
                }
                _ => {
                    let nb = rng.between(1, ((1 << 20) / bs).max(1)).min(blocks);
                    (rng.below(blocks - nb + 1), nb)
                }
            };
            let (offset, len) = (start * bs, nb * bs);
            let kind = if caps.read_only { 0 } else { rng.below(100) };
            list.push(match kind {
                0..=39 => ModelOp::Read { offset, len },
                40..=73 => ModelOp::Write {
                    offset,
                    len,
                    seed: pattern_seed(seed, t, i),
                    fua: kind >= 67,
                },
                74..=79 => ModelOp::Flush,
                80..=87 if caps.trim => ModelOp::Trim { offset, len },
                _ => ModelOp::Zeroes {
                    offset,
                    len,
                    no_hole: rng.below(2) == 0,
                },
            });
        }
        out.push(list);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_lists_are_seeded_aligned_and_crowded() {
        let caps = Capabilities {
            trim: true,
            ..Capabilities::default()
        };
        let a = generate_threads(3, 4, 400, 64 << 20, 4096, caps);
        assert_eq!(a, generate_threads(3, 4, 400, 64 << 20, 4096, caps));
        assert_ne!(a, generate_threads(4, 4, 400, 64 << 20, 4096, caps));
        assert_eq!(a.len(), 4);
        assert_eq!(a.iter().map(Vec::len).sum::<usize>(), 400);
        let all: Vec<_> = a.iter().flatten().collect();
        for op in &all {
            if let Some((o, l)) = op.range() {
                assert!(o % 4096 == 0 && l % 4096 == 0 && l > 0 && o + l <= 64 << 20);
            }
        }
        // Most ranged operations share a block with another.
        let ranged: Vec<_> = all.iter().filter_map(|o| o.range()).collect();
        let overlapping = ranged
            .iter()
            .filter(|&&(o, l)| {
                ranged
                    .iter()
                    .filter(|&&(o2, l2)| o2 < o + l && o < o2 + l2)
                    .count()
                    > 1
            })
            .count();
        assert!(
            overlapping * 2 > ranged.len(),
            "{overlapping} of {}",
            ranged.len()
        );
        // Every kind appears.
        for probe in [
            |o: &&ModelOp| matches!(o, ModelOp::Read { .. }),
            |o: &&ModelOp| matches!(o, ModelOp::Write { fua: true, .. }),
            |o: &&ModelOp| matches!(o, ModelOp::Write { fua: false, .. }),
            |o: &&ModelOp| matches!(o, ModelOp::Flush),
            |o: &&ModelOp| matches!(o, ModelOp::Trim { .. }),
            |o: &&ModelOp| matches!(o, ModelOp::Zeroes { .. }),
        ] {
            assert!(all.iter().any(probe));
        }
    }

    #[test]
    fn pattern_seeds_are_unique_within_a_run_and_differ_between_runs() {
        let mut seen = std::collections::HashSet::new();
        for t in 0..8 {
            for i in 0..1000 {
                assert!(seen.insert(pattern_seed(5, t, i)));
            }
        }
        assert_ne!(pattern_seed(5, 0, 0), pattern_seed(6, 0, 0));
    }

    #[test]
    fn a_tiny_device_still_gets_valid_operations() {
        let lists = generate_threads(1, 3, 30, 4096, 512, Capabilities::default());
        for op in lists.iter().flatten() {
            if let Some((o, l)) = op.range() {
                assert!(o + l <= 4096 && l >= 512);
            }
        }
        assert!(generate_threads(1, 2, 10, 0, 512, Capabilities::default())
            .iter()
            .all(Vec::is_empty));
    }
}
