//! Crash-consistency checker: drives a device with a stream of writes, FUA writes and flushes,
//! simulates a power loss after the ops it is asked to ([`CrashPoints`]), and checks that what
//! survives is a state the write-cache rules allow.
//!
//! The rules, per block (the device's logical block; a block is written atomically or not at
//! all), for a power loss after a given op:
//! - a write that completed before a flush that completed is durable, unless overwritten since;
//! - a FUA write is durable as soon as it completed, and so supersedes every earlier write;
//! - a write (or write-zeroes, or trim) since the block's last durable value may be lost or kept,
//!   each independently: the block may hold its durable value or any value written since.
//!
//! So the allowed set of a block is {its durable value} plus {every value written since}; a trim
//! allows anything until it is overwritten. The device under test says what survives through
//! [`Crashable::crash`]; the checker never asks the device to really lose its state, so one run
//! checks every crash point.
//!
//! It catches a device that acknowledges a flush before the data is durable, and one that loses
//! (or delays) a FUA write; it accepts any correct write-back cache, whatever subset of unflushed
//! writes it persists.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::sync::Arc;

use userblk::proto::TransmissionFlags;
use userblk::{BlockDevice, LoopbackKernel, LoopbackOptions, MemDevice};

use crate::target::{OpError, Target};
use crate::trace::{hash64, OpKind, Trace};

/// A device whose power can be cut in simulation.
pub trait Crashable: BlockDevice {
    /// The device as it would come back after a power loss now: a device holding exactly what
    /// this one has made durable (a device may keep any subset of its unflushed writes, as a
    /// real write-back cache might). It must not change `self`: the run goes on after each
    /// simulated crash.
    fn crash(&self) -> io::Result<Box<dyn BlockDevice>>;
}

/// A [`MemDevice`] has no volatile cache: all of it survives.
impl Crashable for MemDevice {
    fn crash(&self) -> io::Result<Box<dyn BlockDevice>> {
        let copy = MemDevice::with_block_size(self.size(), self.block_size());
        let mut buf = vec![0u8; 64 << 10];
        let zeroes = vec![0u8; 512];
        let mut at = 0u64;
        while at < self.size() {
            let n = (self.size() - at).min(buf.len() as u64) as usize;
            self.read(at, &mut buf[..n])?;
            // Copy only what is not zero, so that the copy stays as sparse as the original.
            for (i, sector) in buf[..n].chunks(512).enumerate() {
                if sector != &zeroes[..sector.len()] {
                    copy.write(at + (i * 512) as u64, sector)?;
                }
            }
            at += n as u64;
        }
        Ok(Box::new(copy))
    }
}

impl<T: Crashable + ?Sized> Crashable for Arc<T> {
    fn crash(&self) -> io::Result<Box<dyn BlockDevice>> {
        (**self).crash()
    }
}

impl<T: Crashable + ?Sized> Crashable for Box<T> {
    fn crash(&self) -> io::Result<Box<dyn BlockDevice>> {
        (**self).crash()
    }
}

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
    /// A flush: every write acknowledged before it is durable once it is acknowledged.
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
    fn range(&self) -> Option<(u64, u64)> {
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

    fn name(&self) -> &'static str {
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

/// A random stream of `count` ops on a device of `size` bytes with `block_size`-byte blocks:
/// mostly writes of one to eight blocks (a tenth FUA), a flush about every eighth op, and some
/// write-zeroes. The same seed gives the same stream.
pub fn random_ops(seed: u64, size: u64, block_size: u32, count: usize) -> Vec<CrashOp> {
    let mut rng = SplitMix(seed);
    let bs = u64::from(block_size.max(1));
    let blocks = (size / bs).max(1);
    (0..count)
        .map(|i| {
            let roll = rng.next() % 100;
            let n = (1 + rng.next() % 8).min(blocks);
            let offset = rng.next() % (blocks - n + 1) * bs;
            let len = n * bs;
            let data = || {
                let stamp = (i as u64 + 1).to_le_bytes();
                let mut d = vec![0u8; len as usize];
                for (j, b) in d.iter_mut().enumerate() {
                    *b = stamp[j % 8] ^ (j / 8) as u8;
                }
                d
            };
            match roll {
                0..=11 => CrashOp::Flush,
                12..=21 => CrashOp::WriteFua {
                    offset,
                    data: data(),
                },
                22..=26 => CrashOp::WriteZeroes { offset, len },
                _ => CrashOp::Write {
                    offset,
                    data: data(),
                },
            }
        })
        .collect()
}

/// SplitMix64: small, seedable, good enough to vary a workload.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// After which ops the power is cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPoints {
    /// After every op: the most thorough.
    EveryOp,
    /// Just before and just after every flush and FUA write, and after the last op: where the
    /// rules change. For long streams.
    Flushes,
    /// After every `n`th op, plus the [`Flushes`](CrashPoints::Flushes) points.
    Every(usize),
}

/// How the checker runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrashOptions {
    /// Where to cut the power. Default: [`CrashPoints::EveryOp`].
    pub points: CrashPoints,
    /// Drive the device through the loopback fake kernel and the real server (`true`, the
    /// default), or call it directly.
    pub loopback: bool,
}

impl Default for CrashOptions {
    fn default() -> CrashOptions {
        CrashOptions {
            points: CrashPoints::EveryOp,
            loopback: true,
        }
    }
}

/// What a successful check did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CrashReport {
    /// Ops driven.
    pub ops: usize,
    /// Power losses simulated.
    pub crash_points: usize,
    /// Blocks compared with their allowed values, summed over crash points.
    pub blocks_checked: u64,
}

impl fmt::Display for CrashReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ops, {} crash points, {} block checks",
            self.ops, self.crash_points, self.blocks_checked
        )
    }
}

/// A block that survived a simulated power loss with a value the rules do not allow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Ops completed before the power loss; the last is `last_op`.
    pub crash_after: usize,
    /// The last op completed, described (`op #12 (flush)`).
    pub last_op: String,
    /// The last flush completed before the crash, if any.
    pub last_flush: Option<usize>,
    /// The block (in device blocks).
    pub block: u64,
    /// Its byte offset.
    pub offset: u64,
    /// The values allowed, described with short hashes (`op #3 write [1a2b3c4d]`).
    pub allowed: Vec<String>,
    /// The value found, described.
    pub found: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "power lost after {} (last completed flush: {}): block {} (offset {}) holds {}; \
             allowed: {}",
            self.last_op,
            self.last_flush
                .map_or("none".to_string(), |i| format!("op #{i}")),
            self.block,
            self.offset,
            self.found,
            self.allowed.join(", ")
        )
    }
}

/// Why a crash check failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CrashError {
    /// The device could not be served, or a block could not be read before the run.
    #[error("setting up: {0}")]
    Setup(OpError),
    /// An op of the stream failed.
    #[error("op #{index} ({op}) failed: {source}")]
    Op {
        /// Index in the stream.
        index: usize,
        /// The op, described.
        op: String,
        /// The error.
        #[source]
        source: OpError,
    },
    /// [`Crashable::crash`] failed, or the device it returned could not be read.
    #[error("simulating a power loss after op #{after}: {source}")]
    Crash {
        /// Ops completed.
        after: usize,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The surviving content breaks the write-cache rules.
    #[error("crash-consistency violation: {0}")]
    Violation(Box<Violation>),
}

/// A block's value: the hash of its content, or any content (after a trim).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Value {
    hash: Option<u64>,
    /// Op that wrote it; `None` for the content before the run.
    origin: Option<usize>,
}

#[derive(Clone, Debug)]
struct BlockState {
    durable: Value,
    since: Vec<Value>,
}

impl BlockState {
    fn allows(&self, hash: u64) -> bool {
        std::iter::once(&self.durable)
            .chain(&self.since)
            .any(|v| v.hash.is_none_or(|h| h == hash))
    }
}

/// Calls a device directly, as a [`Target`].
struct Direct<'a>(&'a dyn BlockDevice);

fn op_err(e: io::Error) -> OpError {
    OpError {
        errno: e.raw_os_error(),
        message: e.to_string(),
    }
}

impl Target for Direct<'_> {
    fn size(&self) -> u64 {
        self.0.blocks() * u64::from(self.0.block_size())
    }
    fn block_size(&self) -> u32 {
        self.0.block_size()
    }
    fn flags(&self) -> TransmissionFlags {
        self.0.capabilities().transmission_flags()
    }
    fn sees_device_errno(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, OpError> {
        let mut buf = vec![0u8; len];
        self.0.read(offset, &mut buf).map_err(op_err)?;
        Ok(buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), OpError> {
        self.0.write(offset, data).map_err(op_err)
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> Result<(), OpError> {
        self.0.write_fua(offset, data).map_err(op_err)
    }
    fn flush(&self) -> Result<(), OpError> {
        self.0.flush().map_err(op_err)
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), OpError> {
        self.0.trim(offset, len).map_err(op_err)
    }
    fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> Result<(), OpError> {
        self.0.write_zeroes(offset, len, !no_hole).map_err(op_err)
    }
}

/// The model: every block the stream touched, with what may survive.
struct Model {
    bs: u64,
    blocks: BTreeMap<u64, BlockState>,
    /// Blocks with values written since their durable one.
    dirty: BTreeSet<u64>,
    zero_hash: u64,
    zero_block: Vec<u8>,
}

impl Model {
    /// hash64 of a block; zero blocks, the most common, by a plain comparison.
    fn hash(&self, block: &[u8]) -> u64 {
        if block == &self.zero_block[..] {
            self.zero_hash
        } else {
            hash64(block)
        }
    }

    /// Reads the initial content of the blocks of `offset..offset+len` not seen yet.
    fn learn(&mut self, target: &dyn Target, offset: u64, len: u64) -> Result<(), OpError> {
        let first = offset / self.bs;
        let end = (offset + len).div_ceil(self.bs);
        let mut b = first;
        while b < end {
            if self.blocks.contains_key(&b) {
                b += 1;
                continue;
            }
            let mut run_end = b + 1;
            while run_end < end && run_end - b < 256 && !self.blocks.contains_key(&run_end) {
                run_end += 1;
            }
            let data = target.read(b * self.bs, ((run_end - b) * self.bs) as usize)?;
            for (i, block) in data.chunks(self.bs as usize).enumerate() {
                let v = Value {
                    hash: Some(self.hash(block)),
                    origin: None,
                };
                self.blocks.insert(
                    b + i as u64,
                    BlockState {
                        durable: v,
                        since: Vec::new(),
                    },
                );
            }
            b = run_end;
        }
        Ok(())
    }

    fn apply(&mut self, index: usize, op: &CrashOp) {
        let bs = self.bs;
        let mut set = |offset: u64, len: u64, hash: &dyn Fn(u64) -> Option<u64>, fua: bool| {
            for b in offset / bs..(offset + len).div_ceil(bs) {
                let v = Value {
                    hash: hash(b),
                    origin: Some(index),
                };
                if let Some(st) = self.blocks.get_mut(&b) {
                    if fua {
                        st.durable = v;
                        st.since.clear();
                        self.dirty.remove(&b);
                    } else {
                        if !st.since.contains(&v) {
                            st.since.push(v);
                        }
                        self.dirty.insert(b);
                    }
                }
            }
        };
        match op {
            CrashOp::Write { offset, data } | CrashOp::WriteFua { offset, data } => {
                let fua = matches!(op, CrashOp::WriteFua { .. });
                let hash = |b: u64| {
                    let at = (b * bs - offset) as usize;
                    data.get(at..at + bs as usize).map(hash64)
                };
                set(*offset, data.len() as u64, &hash, fua);
            }
            CrashOp::WriteZeroes { offset, len } => {
                let z = self.zero_hash;
                set(*offset, *len, &|_| Some(z), false);
            }
            CrashOp::Trim { offset, len } => set(*offset, *len, &|_| None, false),
            CrashOp::Flush => {
                for b in std::mem::take(&mut self.dirty) {
                    if let Some(st) = self.blocks.get_mut(&b) {
                        if let Some(last) = st.since.pop() {
                            st.durable = last;
                        }
                        st.since.clear();
                    }
                }
            }
        }
    }

    fn describe(&self, v: &Value, ops: &[CrashOp]) -> String {
        let what = match v.origin {
            None => "the content before the run".to_string(),
            Some(i) => format!("op #{i} ({})", ops.get(i).map_or("?", CrashOp::name)),
        };
        match v.hash {
            Some(h) if h == self.zero_hash => format!("{what} [zeroes]"),
            Some(h) => format!("{what} [{:08x}]", h >> 32),
            None => format!("{what} [anything: trimmed]"),
        }
    }

    /// Compares every touched block of `survivor` with its allowed values.
    fn check(
        &self,
        survivor: &dyn BlockDevice,
        after: usize,
        last_flush: Option<usize>,
        ops: &[CrashOp],
        history: &BTreeMap<u64, Vec<Value>>,
    ) -> Result<u64, CrashError> {
        let bs = self.bs;
        let mut checked = 0u64;
        // A block that may hold anything (trimmed since its durable value) needs no read.
        let keys: Vec<u64> = self
            .blocks
            .iter()
            .filter(|(_, st)| {
                std::iter::once(&st.durable)
                    .chain(&st.since)
                    .all(|v| v.hash.is_some())
            })
            .map(|(b, _)| *b)
            .collect();
        let mut i = 0;
        let mut buf = Vec::new();
        while i < keys.len() {
            let mut j = i + 1;
            while j < keys.len() && keys[j] == keys[j - 1] + 1 && j - i < 256 {
                j += 1;
            }
            buf.resize(((j - i) as u64 * bs) as usize, 0);
            survivor
                .read(keys[i] * bs, &mut buf)
                .map_err(|source| CrashError::Crash { after, source })?;
            for (k, block) in buf.chunks(bs as usize).enumerate() {
                let b = keys[i + k];
                let Some(st) = self.blocks.get(&b) else {
                    continue;
                };
                let h = self.hash(block);
                checked += 1;
                if st.allows(h) {
                    continue;
                }
                let found = history
                    .get(&b)
                    .and_then(|vs| vs.iter().rev().find(|v| v.hash == Some(h)))
                    .map(|v| format!("{}, since superseded", self.describe(v, ops)))
                    .unwrap_or_else(|| format!("data [{:08x}] that no op wrote", h >> 32));
                return Err(CrashError::Violation(Box::new(Violation {
                    crash_after: after + 1,
                    last_op: format!("op #{after} ({})", ops[after]),
                    last_flush,
                    block: b,
                    offset: b * bs,
                    allowed: std::iter::once(&st.durable)
                        .chain(&st.since)
                        .map(|v| self.describe(v, ops))
                        .collect(),
                    found,
                })));
            }
            i = j;
        }
        Ok(checked)
    }
}

/// Which ops are followed by a simulated power loss.
fn crash_after(ops: &[CrashOp], points: CrashPoints) -> Vec<bool> {
    let n = ops.len();
    let mut at = vec![matches!(points, CrashPoints::EveryOp); n];
    if let CrashPoints::Every(k) = points {
        for i in (0..n).filter(|i| (i + 1) % k.max(1) == 0) {
            at[i] = true;
        }
    }
    for (i, op) in ops.iter().enumerate() {
        if matches!(op, CrashOp::Flush | CrashOp::WriteFua { .. }) {
            at[i] = true;
            if i > 0 {
                at[i - 1] = true;
            }
        }
    }
    if let Some(last) = at.last_mut() {
        *last = true;
    }
    at
}

/// Drives `device` with `ops`, simulates a power loss at the [`CrashPoints`] asked for, and
/// checks every block the stream touched against the write-cache rules. The device must start
/// with its content durable. Stops at the first violation.
///
/// ```
/// use std::sync::Arc;
/// use userblk::MemDevice;
/// use userblk_harness::crash::{check, random_ops, CrashOptions};
///
/// let ops = random_ops(7, 64 << 10, 512, 50);
/// let report = check(Arc::new(MemDevice::new(64 << 10)), &ops, &CrashOptions::default())?;
/// assert_eq!(report.crash_points, 50);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn check<D: Crashable + 'static>(
    device: Arc<D>,
    ops: &[CrashOp],
    options: &CrashOptions,
) -> Result<CrashReport, CrashError> {
    let kernel;
    let direct = Direct(&*device);
    let target: &dyn Target = if options.loopback {
        let opts = LoopbackOptions::default();
        kernel = LoopbackKernel::with_options(Arc::clone(&device), opts)
            .map_err(|e| CrashError::Setup(e.into()))?;
        &kernel
    } else {
        &direct
    };
    let bs = u64::from(device.block_size().max(1));
    let size = target.size();
    for (index, op) in ops.iter().enumerate() {
        let Some((offset, len)) = op.range() else {
            continue;
        };
        let fits = offset.checked_add(len).is_some_and(|end| end <= size);
        if offset % bs != 0 || len % bs != 0 || len == 0 || !fits {
            return Err(CrashError::Op {
                index,
                op: op.to_string(),
                source: OpError {
                    errno: Some(22),
                    message: format!("not whole {bs}-byte blocks within the device's {size} bytes"),
                },
            });
        }
    }
    let mut model = Model {
        bs,
        blocks: BTreeMap::new(),
        dirty: BTreeSet::new(),
        zero_hash: hash64(&vec![0u8; bs as usize]),
        zero_block: vec![0u8; bs as usize],
    };
    let mut history: BTreeMap<u64, Vec<Value>> = BTreeMap::new();
    let points = crash_after(ops, options.points);
    let flags = target.flags();
    let can_trim = flags.contains(TransmissionFlags::SEND_TRIM);
    // Without SEND_FLUSH the device says it has no volatile cache: every write must be durable
    // once acknowledged. Without SEND_FUA a FUA write reaches it as write + flush.
    let write_through = !flags.contains(TransmissionFlags::SEND_FLUSH);
    let fua_is_flush =
        options.loopback && !write_through && !flags.contains(TransmissionFlags::SEND_FUA);
    let mut report = CrashReport::default();
    let mut last_flush = None;
    for (index, op) in ops.iter().enumerate() {
        if let Some((offset, len)) = op.range() {
            model
                .learn(target, offset, len)
                .map_err(CrashError::Setup)?;
        }
        let fail = |source| CrashError::Op {
            index,
            op: op.to_string(),
            source,
        };
        let applied = match op {
            CrashOp::Write { offset, data } => target.write(*offset, data).map(|()| true),
            CrashOp::WriteFua { offset, data } => target.write_fua(*offset, data).map(|()| true),
            CrashOp::Flush => target.flush().map(|()| true),
            CrashOp::WriteZeroes { offset, len } => {
                target.write_zeroes(*offset, *len, true).map(|()| true)
            }
            // A device without trim never sees one: nothing changes.
            CrashOp::Trim { .. } if !can_trim => Ok(false),
            CrashOp::Trim { offset, len } => target.trim(*offset, *len).map(|()| true),
        }
        .map_err(fail)?;
        if applied {
            // Keep what each block held, to name a stale value in a report.
            for (b, st) in model.blocks.range(
                op.range()
                    .map_or(0..0, |(o, l)| o / bs..(o + l).div_ceil(bs)),
            ) {
                let h = history.entry(*b).or_default();
                h.push(st.durable);
                h.extend(st.since.iter().copied());
                h.dedup();
                let excess = h.len().saturating_sub(32);
                h.drain(..excess);
            }
            model.apply(index, op);
            let fua = matches!(op, CrashOp::WriteFua { .. });
            if write_through || (fua_is_flush && fua) {
                model.apply(index, &CrashOp::Flush);
            }
        }
        if *op == CrashOp::Flush {
            last_flush = Some(index);
        }
        report.ops += 1;
        if points[index] {
            let survivor = device.crash().map_err(|source| CrashError::Crash {
                after: index,
                source,
            })?;
            report.blocks_checked += model.check(&*survivor, index, last_flush, ops, &history)?;
            report.crash_points += 1;
        }
    }
    Ok(report)
}
