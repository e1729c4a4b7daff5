//! The driver of one stream of ops: serves a device from the factory (through a rig, the
//! loopback fake kernel by default, or by direct calls), sends the ops one at a time, cuts the
//! power after the ops [`CrashPoints`] asks for, and checks each survivor with the
//! [model](super::model). Also what the concurrent driver shares with it: serving, checking
//! ops against the device, reading a survivor.

use std::fmt;
use std::io;
use std::sync::Arc;

use userblk::proto::TransmissionFlags;
use userblk::BlockDevice;

use super::model::{Durable, Effect, Model, PowerLoss, Stamp, Time};
use super::ops::CrashOp;
use super::{CrashError, Crashable};
use crate::factory::DeviceFactory;
use crate::target::{Attached, LoopbackRig, OpError, Rig, Target};

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

/// How the checker runs one stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrashOptions {
    /// Where to cut the power. Default: [`CrashPoints::EveryOp`].
    pub points: CrashPoints,
    /// Drive the device through the loopback fake kernel and the real server (`true`, the
    /// default), or call it directly. ([`check_on`] takes any rig instead.)
    pub loopback: bool,
    /// The device promises that each write lands whole or not at all (as sent: the kernel may
    /// split a write larger than its maximum request). Default: `false`: unflushed writes may
    /// be torn, each block surviving or not on its own.
    pub atomic_writes: bool,
}

impl Default for CrashOptions {
    fn default() -> CrashOptions {
        CrashOptions {
            points: CrashPoints::EveryOp,
            loopback: true,
            atomic_writes: false,
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

impl std::ops::AddAssign for CrashReport {
    fn add_assign(&mut self, other: CrashReport) {
        self.ops += other.ops;
        self.crash_points += other.crash_points;
        self.blocks_checked += other.blocks_checked;
    }
}

/// How ops reach the device.
#[derive(Clone, Copy)]
pub(crate) enum Via<'a> {
    Rig(&'a dyn Rig),
    /// The loopback fake kernel with its default options.
    Loopback,
    Direct,
}

impl Via<'_> {
    pub(crate) fn loopback_or_direct(loopback: bool) -> Via<'static> {
        if loopback {
            Via::Loopback
        } else {
            Via::Direct
        }
    }
}

/// A device being driven, and the handle that cuts its power.
pub(crate) struct Served {
    pub device: Arc<dyn Crashable>,
    attached: Option<Box<dyn Attached>>,
    direct: Direct,
    /// What the rules make of each op (from the flags the device advertised).
    pub semantics: Semantics,
}

/// How the transport treats flushes and FUA, from the advertised flags.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Semantics {
    /// No SEND_FLUSH: the device says it has no volatile cache, so every write is durable once
    /// acknowledged.
    pub write_through: bool,
    /// A kernel sends a FUA write to a device with a cache but without SEND_FUA as a write
    /// followed by a flush (block/blk-flush.c; the loopback kernel does the same).
    pub fua_is_flush: bool,
    /// SEND_TRIM: a trim reaches the device; without it, nothing changes.
    pub can_trim: bool,
}

impl Served {
    /// A fresh crashable device from `factory`, served `via`.
    pub(crate) fn new(factory: &dyn DeviceFactory, via: Via<'_>) -> Result<Served, CrashError> {
        let device = match factory.create_crashable() {
            None => return Err(CrashError::NotCrashable),
            Some(Err(source)) => return Err(CrashError::Factory(source)),
            Some(Ok(d)) => d,
        };
        let serve = |rig: &dyn Rig| {
            rig.attach(Box::new(Arc::clone(&device)))
                .map_err(CrashError::Setup)
        };
        let attached = match via {
            Via::Rig(rig) => Some(serve(rig)?),
            Via::Loopback => Some(serve(&LoopbackRig::default())?),
            Via::Direct => None,
        };
        let direct = Direct(Arc::clone(&device));
        let flags = match &attached {
            Some(t) => t.flags(),
            None => direct.flags(),
        };
        let write_through = !flags.contains(TransmissionFlags::SEND_FLUSH);
        Ok(Served {
            device,
            semantics: Semantics {
                write_through,
                fua_is_flush: attached.is_some()
                    && !write_through
                    && !flags.contains(TransmissionFlags::SEND_FUA),
                can_trim: flags.contains(TransmissionFlags::SEND_TRIM),
            },
            attached,
            direct,
        })
    }

    pub(crate) fn target(&self) -> &dyn Target {
        match &self.attached {
            Some(t) => &**t,
            None => &self.direct,
        }
    }

    /// Disconnects; serving must end cleanly.
    pub(crate) fn finish(self) -> Result<(), CrashError> {
        match self.attached {
            Some(t) => t.detach().map_err(CrashError::Detach),
            None => Ok(()),
        }
    }

    /// Sends `op`; `Ok(false)` when it does not reach the device (a trim without SEND_TRIM).
    pub(crate) fn apply(&self, op: &CrashOp) -> Result<bool, OpError> {
        let target = self.target();
        match op {
            CrashOp::Write { offset, data } => target.write(*offset, data).map(|()| true),
            CrashOp::WriteFua { offset, data } => target.write_fua(*offset, data).map(|()| true),
            CrashOp::Flush => target.flush().map(|()| true),
            CrashOp::WriteZeroes { offset, len } => {
                target.write_zeroes(*offset, *len, true).map(|()| true)
            }
            // A device without trim never sees one: nothing changes.
            CrashOp::Trim { .. } if !self.semantics.can_trim => Ok(false),
            CrashOp::Trim { offset, len } => target.trim(*offset, *len).map(|()| true),
        }
    }

    /// Records op `index` in `model` as the rules see it.
    pub(crate) fn record(
        &self,
        model: &mut Model,
        index: usize,
        op: &CrashOp,
        thread: Option<usize>,
        stamp: Stamp,
        applied: bool,
    ) {
        let fua = matches!(op, CrashOp::WriteFua { .. });
        let implies_flush = applied && fua && self.semantics.fua_is_flush;
        let durable = if self.semantics.write_through {
            Some(Durable::NoCache)
        } else if implies_flush {
            Some(Durable::FuaThenFlush)
        } else if fua {
            Some(Durable::Fua)
        } else {
            None
        };
        let effect = Effect {
            applied,
            durable,
            implies_flush,
        };
        model.record(index, op, thread, stamp, effect);
    }

    /// The device as it comes back after a power loss now.
    pub(crate) fn crash(&self, after: usize) -> Result<Box<dyn BlockDevice>, CrashError> {
        self.device
            .crash()
            .map_err(|source| CrashError::Crash { after, source })
    }
}

/// Calls a device directly, as a [`Target`].
struct Direct(Arc<dyn Crashable>);

fn op_err(e: io::Error) -> OpError {
    OpError {
        errno: e.raw_os_error(),
        message: e.to_string(),
    }
}

impl Target for Direct {
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

/// Refuses an op that is not whole blocks within the device, before anything is sent.
pub(crate) fn validate(index: usize, op: &CrashOp, bs: u64, size: u64) -> Result<(), CrashError> {
    let Some((offset, len)) = op.range() else {
        return Ok(());
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
    Ok(())
}

/// The longest run of blocks read at once.
const RUN: u64 = 256;

/// Calls `each(block, content)` for each of `blocks` (sorted), reading runs of consecutive ones.
pub(crate) fn read_blocks<E>(
    blocks: &[u64],
    bs: u64,
    read: &mut dyn FnMut(u64, usize) -> Result<Vec<u8>, E>,
    each: &mut dyn FnMut(u64, &[u8]),
) -> Result<(), E> {
    let mut i = 0;
    while i < blocks.len() {
        let mut j = i + 1;
        while j < blocks.len() && blocks[j] == blocks[j - 1] + 1 && ((j - i) as u64) < RUN {
            j += 1;
        }
        let data = read(blocks[i] * bs, ((j - i) as u64 * bs) as usize)?;
        for (k, block) in data.chunks(bs as usize).enumerate() {
            each(blocks[i + k], block);
        }
        i = j;
    }
    Ok(())
}

/// The hashes of `blocks` (sorted) in `survivor`.
pub(crate) fn survivor_hashes(
    model: &Model,
    survivor: &dyn BlockDevice,
    blocks: &[u64],
    bs: u64,
) -> io::Result<Vec<(u64, u64)>> {
    let mut found = Vec::with_capacity(blocks.len());
    read_blocks(
        blocks,
        bs,
        &mut |offset, len| {
            let mut buf = vec![0u8; len];
            survivor.read(offset, &mut buf).map(|()| buf)
        },
        &mut |b, block| found.push((b, model.hash(block))),
    )?;
    Ok(found)
}

/// Reads through `target` the content before the run of the blocks of `offset..offset+len`
/// not known yet.
pub(crate) fn learn(
    model: &mut Model,
    target: &dyn Target,
    offset: u64,
    len: u64,
    bs: u64,
) -> Result<(), OpError> {
    let unknown: Vec<u64> = (offset / bs..(offset + len).div_ceil(bs))
        .filter(|b| !model.knows(*b))
        .collect();
    let mut seen = Vec::with_capacity(unknown.len());
    read_blocks(
        &unknown,
        bs,
        &mut |offset, len| target.read(offset, len),
        &mut |b, block| seen.push((b, model.hash(block))),
    )?;
    for (b, h) in seen {
        model.learn(b, h);
    }
    Ok(())
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

/// Drives a fresh crashable device from `factory` with `ops`, through the loopback fake kernel
/// (or directly, as `options` say), simulates a power loss at the [`CrashPoints`] asked for,
/// and checks every block the stream touched against the write-cache rules. The device must
/// start with its content durable. Stops at the first violation.
///
/// ```
/// use userblk::MemDevice;
/// use userblk_harness::crash::{check, random_ops, CrashOptions};
/// use userblk_harness::factory;
///
/// let ops = random_ops(7, 64 << 10, 512, 50);
/// let factory = factory::crashable(|| MemDevice::new(64 << 10));
/// let report = check(&factory, &ops, &CrashOptions::default())?;
/// assert_eq!(report.crash_points, 50);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn check(
    factory: &dyn DeviceFactory,
    ops: &[CrashOp],
    options: &CrashOptions,
) -> Result<CrashReport, CrashError> {
    run(
        factory,
        Via::loopback_or_direct(options.loopback),
        ops,
        options,
    )
}

/// [`check`] through `rig` (e.g. a real `/dev/nbdN`); `options.loopback` is not used.
pub fn check_on(
    rig: &dyn Rig,
    factory: &dyn DeviceFactory,
    ops: &[CrashOp],
    options: &CrashOptions,
) -> Result<CrashReport, CrashError> {
    run(factory, Via::Rig(rig), ops, options)
}

/// [`check`] on one device already made (it must not have been written since its content was
/// last durable).
pub fn check_device<D: Crashable + 'static>(
    device: Arc<D>,
    ops: &[CrashOp],
    options: &CrashOptions,
) -> Result<CrashReport, CrashError> {
    check(&Once(std::sync::Mutex::new(Some(device))), ops, options)
}

/// The device [`check_device`] was given, as a factory that hands it out once.
struct Once<D>(std::sync::Mutex<Option<Arc<D>>>);

impl<D: Crashable + 'static> Once<D> {
    fn take(&self) -> io::Result<Arc<D>> {
        self.0
            .lock()
            .ok()
            .and_then(|mut d| d.take())
            .ok_or_else(|| io::Error::other("check_device's device was already used"))
    }
}

impl<D: Crashable + 'static> DeviceFactory for Once<D> {
    fn create(&self) -> io::Result<Box<dyn BlockDevice>> {
        Ok(Box::new(self.take()?))
    }

    fn create_crashable(&self) -> Option<io::Result<Arc<dyn Crashable>>> {
        Some(self.take().map(|d| d as Arc<dyn Crashable>))
    }
}

fn run(
    factory: &dyn DeviceFactory,
    via: Via<'_>,
    ops: &[CrashOp],
    options: &CrashOptions,
) -> Result<CrashReport, CrashError> {
    let served = Served::new(factory, via)?;
    let target = served.target();
    let bs = u64::from(target.block_size().max(1));
    let size = target.size();
    for (index, op) in ops.iter().enumerate() {
        validate(index, op, bs, size)?;
    }
    let mut model = Model::new(bs, options.atomic_writes);
    let points = crash_after(ops, options.points);
    let mut report = CrashReport::default();
    // One thread: the clock ticks once per event, so an op completes before the next is sent
    // and a power loss falls between two ops.
    let mut now: Time = 0;
    let mut tick = || {
        now += 1;
        now
    };
    for (index, op) in ops.iter().enumerate() {
        if let Some((offset, len)) = op.range() {
            learn(&mut model, target, offset, len, bs).map_err(CrashError::Setup)?;
        }
        let inv = tick();
        let applied = served.apply(op).map_err(|source| CrashError::Op {
            index,
            op: op.to_string(),
            source,
        })?;
        let comp = tick();
        served.record(&mut model, index, op, None, Stamp { inv, comp }, applied);
        report.ops += 1;
        if points[index] {
            let cs = tick();
            let survivor = served.crash(index)?;
            let ce = tick();
            let blocks = model.block_numbers();
            let found = survivor_hashes(&model, &*survivor, &blocks, bs).map_err(|source| {
                CrashError::Crash {
                    after: index,
                    source,
                }
            })?;
            let loss = PowerLoss {
                cs,
                ce,
                after: index,
                run: None,
            };
            report.blocks_checked += model.check(&loss, &found).map_err(CrashError::Violation)?;
            report.crash_points += 1;
        }
    }
    served.finish()?;
    Ok(report)
}
