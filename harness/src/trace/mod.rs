//! Traces: the requests a device received, in order, with what each write wrote and a checksum of
//! what each read returned.
//!
//! - [`Recorder`] wraps a [`userblk::BlockDevice`] and logs every call it receives.
//! - [`Trace::encode`] and [`Trace::decode`] write and read the compact, versioned file format
//!   documented in `harness/traces/README.md` (decoding never panics: a corrupt file is a
//!   [`TraceError`]).
//! - [`replay`] issues a trace's requests to any [`crate::target::Target`] and checks every read
//!   against the model of the trace; [`replay_loopback`] does it through the fake kernel with
//!   the recorded request shapes and overlap; [`Trace::verify`] checks the trace against itself.
//!
//! Time is a logical clock: the recorder takes one tick when a call enters the device and one
//! when it returns, so two requests overlapped in time exactly when their tick intervals
//! intersect. The model ([`Trace::expectations`]) uses that to leave unchecked the bytes of a read
//! that a write in flight at the same time may or may not have reached.

mod as_recorded;
mod format;
mod model;
mod recorder;
mod replay;

pub use as_recorded::{replay_kernel, replay_loopback};
pub use format::{TraceError, MAGIC, MAX_BODY, MAX_DECODED, VERSION};
pub use model::{Expectation, Fill, VerifyReport};
pub use recorder::Recorder;
pub(crate) use replay::after_detach;
pub use replay::{
    replay, replay_on, replay_with, Mismatch, ReplayError, ReplayOptions, ReplayReport,
};

use std::path::{Path, PathBuf};

use userblk::proto::TransmissionFlags;

/// The traces in `dir`: its `*.ubt` files, sorted (none if it cannot be read).
pub(crate) fn trace_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "ubt"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Write data is stored in pieces cut at multiples of this many bytes of the device offset, so
/// that equal 4 KiB blocks (the page size, and what file systems write) are stored once.
pub const PIECE: u64 = 4096;

/// Offsets and lengths in a trace are multiples of this (the smallest logical block size).
pub const SECTOR: u64 = 512;

/// Largest READ or WRITE a trace may hold (the protocol's limit, 32 MiB).
pub const MAX_IO: u64 = 32 << 20;

/// The reference of an all-zero piece: its bytes are not stored.
pub const ZERO_PIECE: u32 = 0;

/// What a trace says about the device it was recorded on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceHeader {
    /// Device size in bytes.
    pub size: u64,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// The transmission flags the device's capabilities advertised.
    pub flags: TransmissionFlags,
    /// Whether the device read as zeroes before the first request (a fresh RAM disk or sparse
    /// file). When false, never-written ranges are not checked on replay.
    pub initial_zeroes: bool,
    /// Whether the device read trimmed ranges back as zeroes (its capabilities said
    /// `trim_zeroes`). When false, trimmed ranges are not checked by [`Trace::verify`].
    pub trim_zeroes: bool,
    /// Free text: where and how the trace was recorded (kernel, workload).
    pub description: String,
}

/// One request as the device received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceOp {
    /// Logical time at which the device was called.
    pub start: u64,
    /// Logical time at which the device returned (`> start`).
    pub end: u64,
    /// Byte offset (0 for a flush).
    pub offset: u64,
    /// Byte length (0 for a flush).
    pub len: u64,
    /// The request and what is known of its data.
    pub kind: OpKind,
    /// `None` when the device succeeded, else the errno it returned (5, EIO, for an error
    /// without one).
    pub errno: Option<i32>,
}

/// The kind of a [`TraceOp`], with its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// A read, with the [`hash64`] of the bytes the device returned (`None` if it failed).
    Read {
        /// Checksum of the data returned at record time.
        hash: Option<u64>,
    },
    /// A write: per piece of the range (see [`Trace::pieces`]), the reference of its content
    /// ([`ZERO_PIECE`] or an index into the trace's piece table). Empty when the write failed.
    Write {
        /// The write had FUA (forced unit access).
        fua: bool,
        /// Content references, one per piece.
        pieces: Vec<u32>,
    },
    /// A flush.
    Flush,
    /// A trim (discard); the range's content is unspecified afterwards.
    Trim,
    /// A write-zeroes.
    WriteZeroes {
        /// A hole may be punched (the request had no NO_HOLE flag).
        may_trim: bool,
    },
}

impl OpKind {
    /// A short name: `read`, `write`, `write+fua`, `flush`, `trim`, `write-zeroes`.
    pub fn name(&self) -> &'static str {
        match self {
            OpKind::Read { .. } => "read",
            OpKind::Write { fua: false, .. } => "write",
            OpKind::Write { fua: true, .. } => "write+fua",
            OpKind::Flush => "flush",
            OpKind::Trim => "trim",
            OpKind::WriteZeroes { .. } => "write-zeroes",
        }
    }

    /// Whether the request changes the device's content.
    pub fn mutates(&self) -> bool {
        matches!(
            self,
            OpKind::Write { .. } | OpKind::Trim | OpKind::WriteZeroes { .. }
        )
    }
}

impl std::fmt::Display for TraceOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            OpKind::Flush => write!(f, "flush")?,
            _ => write!(
                f,
                "{} at {} ({} bytes)",
                self.kind.name(),
                self.offset,
                self.len
            )?,
        }
        if let Some(e) = self.errno {
            write!(f, ", failed with errno {e}")?;
        }
        Ok(())
    }
}

/// A recorded request stream: header, table of distinct non-zero pieces, and the requests in
/// the order they reached the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    /// The device recorded.
    pub header: TraceHeader,
    /// Distinct non-zero pieces; reference `n` (from 1) is `pieces[n - 1]`.
    pieces: Vec<Box<[u8]>>,
    /// Requests sorted by `start`.
    pub ops: Vec<TraceOp>,
}

impl Trace {
    /// A trace from its parts. Returns `None` if an op refers to a piece that does not exist or
    /// has the wrong length for its place, or lies outside the device.
    pub fn from_parts(
        header: TraceHeader,
        pieces: Vec<Box<[u8]>>,
        mut ops: Vec<TraceOp>,
    ) -> Option<Trace> {
        ops.sort_by_key(|op| op.start);
        let trace = Trace {
            header,
            pieces,
            ops,
        };
        trace
            .ops
            .iter()
            .all(|op| trace.op_is_valid(op))
            .then_some(trace)
    }

    /// A trace whose pieces are numbered in order of first use by `ops` (sorted by start), as
    /// a decoded file's are, so that equal traces compare equal. Unused pieces are dropped.
    pub(crate) fn canonical(
        header: TraceHeader,
        pieces: &[Box<[u8]>],
        mut ops: Vec<TraceOp>,
    ) -> Trace {
        ops.sort_by_key(|op| op.start);
        let mut renumber = vec![ZERO_PIECE; pieces.len() + 1];
        let mut table = Vec::new();
        for op in &mut ops {
            if let OpKind::Write { pieces: refs, .. } = &mut op.kind {
                for r in refs {
                    let Some(data) = (*r as usize).checked_sub(1).and_then(|i| pieces.get(i))
                    else {
                        *r = ZERO_PIECE;
                        continue;
                    };
                    if renumber[*r as usize] == ZERO_PIECE {
                        table.push(data.clone());
                        renumber[*r as usize] = table.len() as u32;
                    }
                    *r = renumber[*r as usize];
                }
            }
        }
        Trace {
            header,
            pieces: table,
            ops,
        }
    }

    fn op_is_valid(&self, op: &TraceOp) -> bool {
        let in_range = op
            .offset
            .checked_add(op.len)
            .is_some_and(|end| end <= self.header.size);
        let aligned = op.offset % SECTOR == 0 && op.len % SECTOR == 0;
        let pieces_ok = match &op.kind {
            OpKind::Write { pieces, .. } if op.errno.is_none() => {
                let ranges = Trace::pieces(op.offset, op.len);
                ranges.len() == pieces.len()
                    && ranges.zip(pieces).all(|((_, len), &r)| {
                        r == ZERO_PIECE
                            || self.piece(r).is_some_and(|data| data.len() as u64 == len)
                    })
            }
            OpKind::Write { pieces, .. } => pieces.is_empty(),
            _ => true,
        };
        in_range && aligned && op.end >= op.start && pieces_ok
    }

    /// The pieces of `offset..offset + len`, as (offset, length): cut at every multiple of
    /// [`PIECE`].
    pub fn pieces(offset: u64, len: u64) -> impl ExactSizeIterator<Item = (u64, u64)> {
        let end = offset.saturating_add(len);
        let first = offset / PIECE;
        let count = if len == 0 {
            0
        } else {
            ((end - 1) / PIECE - first + 1) as usize
        };
        (0..count).map(move |i| {
            let start = ((first + i as u64) * PIECE).max(offset);
            let stop = ((first + i as u64 + 1) * PIECE).min(end);
            (start, stop - start)
        })
    }

    /// The bytes of piece reference `r`: `None` for [`ZERO_PIECE`] or an unknown reference.
    pub fn piece(&self, r: u32) -> Option<&[u8]> {
        let i = (r as usize).checked_sub(1)?;
        self.pieces.get(i).map(|p| &p[..])
    }

    /// Number of distinct non-zero pieces stored.
    pub fn piece_count(&self) -> usize {
        self.pieces.len()
    }

    /// The data a successful write op wrote (zero pieces expanded). `None` for other ops.
    pub fn write_data(&self, op: &TraceOp) -> Option<Vec<u8>> {
        let OpKind::Write { pieces, .. } = &op.kind else {
            return None;
        };
        if op.errno.is_some() {
            return None;
        }
        let mut data = Vec::with_capacity(op.len as usize);
        for ((_, len), &r) in Trace::pieces(op.offset, op.len).zip(pieces) {
            match self.piece(r) {
                Some(p) => data.extend_from_slice(p),
                None => data.resize(data.len() + len as usize, 0),
            }
        }
        Some(data)
    }

    /// Counts of the ops by kind, for reports: `(reads, writes, flushes, trims, zeroes)`.
    pub fn summary(&self) -> TraceSummary {
        let mut s = TraceSummary::default();
        for op in &self.ops {
            match op.kind {
                OpKind::Read { .. } => {
                    s.reads += 1;
                    s.bytes_read += op.len;
                }
                OpKind::Write { fua, .. } => {
                    s.writes += 1;
                    s.fua_writes += u64::from(fua);
                    s.bytes_written += op.len;
                }
                OpKind::Flush => s.flushes += 1,
                OpKind::Trim => s.trims += 1,
                OpKind::WriteZeroes { .. } => s.write_zeroes += 1,
            }
            s.failed += u64::from(op.errno.is_some());
        }
        s.pieces = self.pieces.len() as u64;
        s
    }
}

/// What a trace holds, in numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceSummary {
    /// Reads.
    pub reads: u64,
    /// Writes, FUA or not.
    pub writes: u64,
    /// Of which FUA.
    pub fua_writes: u64,
    /// Flushes.
    pub flushes: u64,
    /// Trims.
    pub trims: u64,
    /// Write-zeroes.
    pub write_zeroes: u64,
    /// Ops that failed at record time.
    pub failed: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written (by writes).
    pub bytes_written: u64,
    /// Distinct non-zero pieces stored.
    pub pieces: u64,
}

impl std::fmt::Display for TraceSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} reads ({} KiB), {} writes ({} KiB, {} FUA), {} flushes, {} trims, {} write-zeroes, \
             {} failed; {} distinct pieces",
            self.reads,
            self.bytes_read >> 10,
            self.writes,
            self.bytes_written >> 10,
            self.fua_writes,
            self.flushes,
            self.trims,
            self.write_zeroes,
            self.failed,
            self.pieces
        )
    }
}

/// The checksum traces use for read data: FxHash-style over 8-byte little-endian words (a
/// zero-padded tail), seeded with the length, finished with the SplitMix64 finaliser. Fast and
/// well spread; not cryptographic. Its exact definition is part of the file format.
pub fn hash64(data: &[u8]) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut h = (data.len() as u64).wrapping_mul(K);
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(b)).wrapping_mul(K);
    }
    let tail = words.remainder();
    if !tail.is_empty() {
        let mut b = [0u8; 8];
        b[..tail.len()].copy_from_slice(tail);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(b)).wrapping_mul(K);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_are_cut_at_4k_boundaries() {
        let p: Vec<_> = Trace::pieces(512, 8192).collect();
        assert_eq!(p, vec![(512, 3584), (4096, 4096), (8192, 512)]);
        assert_eq!(
            Trace::pieces(4096, 4096).collect::<Vec<_>>(),
            vec![(4096, 4096)]
        );
        assert_eq!(Trace::pieces(0, 0).count(), 0);
    }

    #[test]
    fn hash_depends_on_every_byte_and_the_length() {
        let a = vec![0u8; 512];
        let mut b = a.clone();
        b[511] = 1;
        assert_ne!(hash64(&a), hash64(&b));
        assert_ne!(hash64(&a), hash64(&a[..504]));
        // Pinned: the value is part of the file format.
        assert_eq!(hash64(b""), 0);
        // Computed from the definition in harness/traces/README.md by an independent script.
        assert_eq!(hash64(b"userblk"), 0xb3a4_0380_4756_fc50);
        assert_eq!(hash64(&[0u8; 512]), 0x0d8a_cd57_b477_51ce);
    }
}
