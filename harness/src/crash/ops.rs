//! What the crash checker drives: [`CrashOp`], and where streams of them come from (a recorded
//! trace, a seeded random stream, or several seeded streams for threads that race).

use std::fmt;

use crate::random::Rng;
use crate::trace::{OpKind, Trace};

/// One step of the stream the checker drives.
#[derive(Clone, PartialEq, Eq)]
pub enum CrashOp {
    /// A write.
    Write {
        /// Byte offset.
        offset: u64,
        /// The data.
        data: Vec<u8>,
    },
    /// A write with FUA: durable once acknowledged.
    WriteFua {
        /// Byte offset.
        offset: u64,
        /// The data.
        data: Vec<u8>,
    },
    /// A flush: every write acknowledged before it is sent is durable once it is acknowledged.
    Flush,
    /// A write-zeroes.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// A trim: the range's content is unspecified until overwritten.
    Trim {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
}

impl CrashOp {
    /// The byte range it changes; `None` for a flush.
    pub fn range(&self) -> Option<(u64, u64)> {
        match self {
            CrashOp::Write { offset, data } | CrashOp::WriteFua { offset, data } => {
                Some((*offset, data.len() as u64))
            }
            CrashOp::WriteZeroes { offset, len } | CrashOp::Trim { offset, len } => {
                Some((*offset, *len))
            }
            CrashOp::Flush => None,
        }
    }

    /// `write`, `write+fua`, `flush`, `write-zeroes` or `trim`.
    pub fn name(&self) -> &'static str {
        match self {
            CrashOp::Write { .. } => "write",
            CrashOp::WriteFua { .. } => "write+fua",
            CrashOp::Flush => "flush",
            CrashOp::WriteZeroes { .. } => "write-zeroes",
            CrashOp::Trim { .. } => "trim",
        }
    }
}

impl fmt::Debug for CrashOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for CrashOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.range() {
            Some((o, l)) => write!(f, "{} at {o} ({l} bytes)", self.name()),
            None => f.write_str(self.name()),
        }
    }
}

/// The content-changing ops and flushes of a trace, in the order the device received them
/// (requests that failed at record time are left out).
pub fn ops_from_trace(trace: &Trace) -> Vec<CrashOp> {
    trace
        .ops
        .iter()
        .filter(|op| op.errno.is_none())
        .filter_map(|op| match op.kind {
            OpKind::Write { fua, .. } => {
                let data = trace.write_data(op)?;
                Some(if fua {
                    CrashOp::WriteFua {
                        offset: op.offset,
                        data,
                    }
                } else {
                    CrashOp::Write {
                        offset: op.offset,
                        data,
                    }
                })
            }
            OpKind::Flush => Some(CrashOp::Flush),
            OpKind::WriteZeroes { .. } => Some(CrashOp::WriteZeroes {
                offset: op.offset,
                len: op.len,
            }),
            OpKind::Trim => Some(CrashOp::Trim {
                offset: op.offset,
                len: op.len,
            }),
            OpKind::Read { .. } => None,
        })
        .collect()
}

/// Data for write number `id`: every 8-byte word differs from every other word of every other
/// write, so each block of each write is told apart from all others (and from zeroes) by its
/// content alone, which names the write a surviving block came from.
fn stamp(id: u64, len: u64) -> Vec<u8> {
    let mut word = Rng::new(id.wrapping_mul(0x2545_f491_4f6c_dd1d));
    let mut data = Vec::with_capacity(len as usize);
    for _ in 0..len.div_ceil(8) {
        data.extend_from_slice(&word.next_u64().to_le_bytes());
    }
    data.truncate(len as usize);
    data
}

/// One random op on blocks `first..first + blocks` (block size `bs`), numbered `id` for its
/// data: mostly writes of one to eight blocks, about one in eight a flush, a tenth FUA writes
/// and a few write-zeroes.
fn random_op(rng: &mut Rng, id: u64, first: u64, blocks: u64, bs: u64) -> CrashOp {
    let roll = rng.below(100);
    let n = (1 + rng.below(8)).min(blocks);
    let offset = (first + rng.below(blocks - n + 1)) * bs;
    let len = n * bs;
    match roll {
        0..=11 => CrashOp::Flush,
        12..=21 => CrashOp::WriteFua {
            offset,
            data: stamp(id, len),
        },
        22..=26 => CrashOp::WriteZeroes { offset, len },
        _ => CrashOp::Write {
            offset,
            data: stamp(id, len),
        },
    }
}

/// A random stream of `count` ops on a device of `size` bytes with `block_size`-byte blocks:
/// mostly writes of one to eight blocks (a tenth FUA), a flush about every eighth op, and some
/// write-zeroes, anywhere on the device. The same seed gives the same stream.
pub fn random_ops(seed: u64, size: u64, block_size: u32, count: usize) -> Vec<CrashOp> {
    let mut rng = Rng::new(seed);
    let bs = u64::from(block_size.max(1));
    let blocks = (size / bs).max(1);
    (0..count)
        .map(|i| random_op(&mut rng, i as u64 + 1, 0, blocks, bs))
        .collect()
}

/// Blocks a concurrent stream works on: few enough that threads keep writing the blocks that
/// another thread's flush is writing back.
const CONCURRENT_WINDOW: u64 = 256;

/// Random streams for `threads` threads racing on one device, `count` ops each, of the kinds
/// [`random_ops`] makes, all within one window of 256 blocks placed by the seed, so that writes
/// race each other and the flushes of other threads. Op `j` of thread `t` writes data unique to
/// it. The same seed gives the same streams (not the same interleaving).
pub fn concurrent_ops(
    seed: u64,
    size: u64,
    block_size: u32,
    threads: usize,
    count: usize,
) -> Vec<Vec<CrashOp>> {
    let mut rng = Rng::new(seed);
    let bs = u64::from(block_size.max(1));
    let blocks = (size / bs).max(1);
    let window = blocks.min(CONCURRENT_WINDOW);
    let first = rng.below(blocks - window + 1);
    (0..threads)
        .map(|t| {
            let mut rng = Rng::new(rng.next_u64());
            (0..count)
                .map(|j| {
                    let id = (t * count + j) as u64 + 1;
                    random_op(&mut rng, id, first, window, bs)
                })
                .collect()
        })
        .collect()
}
