//! [`replay_loopback`] and [`replay_kernel`]: a trace replayed through the fake kernel as it
//! was recorded. Every request goes out raw, with its recorded command, offset, length and
//! flags (the block layer does not split it again, so 6.12's 1,280 KiB writes reach the device
//! whole whatever kernel the fake one plays), and in flight together with exactly the requests
//! it overlapped at record time: a request is sent once every request that ended before it
//! started (on the trace's logical clock) has been answered. That keeps the replay within what
//! the model of the trace allows (any order of requests that overlapped), so reads are checked
//! as in [`replay_with`](super::replay_with).

use std::collections::VecDeque;

use userblk::link::loopback::{Op, Ticket};
use userblk::proto::{CommandFlags, TransmissionFlags};
use userblk::{BlockDevice, LoopbackError, LoopbackKernel, LoopbackOptions};

use super::replay::{check_geometry, check_read};
use super::{OpKind, ReplayError, ReplayOptions, ReplayReport, Trace, TraceOp};
use crate::target::OpError;

/// A request sent and not yet answered.
struct Pending {
    index: usize,
    ticket: Ticket,
}

/// Serves `device` through a [`LoopbackKernel`] with `options`, replays `trace` into it as
/// recorded ([`replay_kernel`]), and shuts the kernel down. Trimmed ranges are checked when the
/// device's capabilities say they read as zeroes.
///
/// ```
/// use userblk::{BlockDevice, LoopbackOptions, MemDevice};
/// use userblk_harness::trace::{replay_loopback, Recorder};
///
/// let rec = Recorder::new(MemDevice::new(4 << 20)).initial_zeroes(true);
/// rec.write(0, &vec![7; 1280 << 10])?; // a 1,280 KiB write, as 6.12 sends them
/// rec.read(0, &mut vec![0; 1280 << 10])?;
/// let trace = rec.trace();
/// let report = replay_loopback(&trace, Box::new(MemDevice::new(4 << 20)), LoopbackOptions::default())?;
/// assert_eq!(report.reads_checked, 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn replay_loopback(
    trace: &Trace,
    device: Box<dyn BlockDevice>,
    options: LoopbackOptions,
) -> Result<ReplayReport, ReplayError> {
    let replay_options = ReplayOptions {
        trim_zeroes: device.capabilities().trim_zeroes,
    };
    let kernel = LoopbackKernel::with_options(device, options).map_err(|e| ReplayError::Rig {
        what: "attaching",
        source: e.into(),
    })?;
    let result = replay_kernel(trace, &kernel, &replay_options);
    let detached = kernel.shutdown();
    let report = result?;
    detached.map_err(|e| ReplayError::Rig {
        what: "detaching",
        source: e.into(),
    })?;
    Ok(report)
}

/// Replays `trace` through `kernel` as recorded: raw requests of the recorded shapes, each in
/// flight with the requests it overlapped at record time, every read checked against the model.
///
/// What the export cannot take raw goes through the block layer's path instead, after
/// everything in flight has been answered, as the kernel would turn it: a FUA write without
/// `SEND_FUA` becomes WRITE then FLUSH, a write-zeroes without `SEND_WRITE_ZEROES` zero-filled
/// WRITEs, a flush without `SEND_FLUSH` nothing; a trim without `SEND_TRIM` is skipped, and so
/// is a request that failed at record time. Stops at the first failure.
pub fn replay_kernel(
    trace: &Trace,
    kernel: &LoopbackKernel,
    options: &ReplayOptions,
) -> Result<ReplayReport, ReplayError> {
    check_geometry(trace, kernel.size(), kernel.export().block_size)?;
    let flags = kernel.export().flags;
    let expectations = trace.expectations(options.trim_zeroes);
    let mut report = ReplayReport::default();
    let mut in_flight: VecDeque<Pending> = VecDeque::new();
    let finish = |p: Pending, report: &mut ReplayReport| -> Result<(), ReplayError> {
        let op = &trace.ops[p.index];
        let data = kernel
            .wait(p.ticket)
            .map_err(|e| failed(p.index, op, e, *report))?;
        report.ops_replayed += 1;
        if let Some(Some(exp)) = expectations.get(p.index) {
            check_read(trace, p.index, exp, &data, report).map_err(|mismatch| {
                ReplayError::Mismatch {
                    mismatch,
                    report: *report,
                }
            })?;
        }
        kernel.recycle(data);
        Ok(())
    };
    for (index, op) in trace.ops.iter().enumerate() {
        if op.errno.is_some()
            || (op.kind == OpKind::Trim && !flags.contains(TransmissionFlags::SEND_TRIM))
        {
            report.ops_skipped += 1;
            continue;
        }
        // What ended before this request started at record time ends before it here too.
        while let Some(pos) = in_flight
            .iter()
            .position(|p| trace.ops[p.index].end < op.start)
        {
            if let Some(p) = in_flight.remove(pos) {
                finish(p, &mut report)?;
            }
        }
        let data = match op.kind {
            OpKind::Write { .. } => trace.write_data(op).unwrap_or_default(),
            _ => Vec::new(),
        };
        let Some(raw) = raw_request(op, flags, &data) else {
            while let Some(p) = in_flight.pop_front() {
                finish(p, &mut report)?;
            }
            let read =
                through_block_layer(kernel, op, &data).map_err(|e| failed(index, op, e, report))?;
            report.ops_replayed += 1;
            if let (Some(read), Some(Some(exp))) = (read, expectations.get(index)) {
                check_read(trace, index, exp, &read, &mut report)
                    .map_err(|mismatch| ReplayError::Mismatch { mismatch, report })?;
            }
            continue;
        };
        let ticket = loop {
            match kernel.try_submit(raw) {
                Ok(Some(t)) => break t,
                // Every tag taken: the oldest request in flight must end first.
                Ok(None) => match in_flight.pop_front() {
                    Some(p) => finish(p, &mut report)?,
                    None => {
                        break kernel
                            .submit(raw)
                            .map_err(|e| failed(index, op, e, report))?
                    }
                },
                Err(e) => return Err(failed(index, op, e, report)),
            }
        };
        in_flight.push_back(Pending { index, ticket });
        report.max_in_flight = report.max_in_flight.max(in_flight.len() as u64);
    }
    while let Some(p) = in_flight.pop_front() {
        finish(p, &mut report)?;
    }
    Ok(report)
}

fn failed(index: usize, op: &TraceOp, e: LoopbackError, report: ReplayReport) -> ReplayError {
    ReplayError::Op {
        index,
        op: op.to_string(),
        source: OpError::from(e),
        report,
    }
}

/// The request exactly as recorded, if the export takes it raw.
fn raw_request<'a>(op: &TraceOp, flags: TransmissionFlags, data: &'a [u8]) -> Option<Op<'a>> {
    let len = u32::try_from(op.len).ok()?;
    let has = |f| flags.contains(f);
    Some(match op.kind {
        OpKind::Read { .. } => Op::read(op.offset, len),
        OpKind::Write { fua, .. } => {
            if fua && !has(TransmissionFlags::SEND_FLUSH | TransmissionFlags::SEND_FUA) {
                return None;
            }
            Op {
                flags: if fua {
                    CommandFlags::FUA
                } else {
                    CommandFlags::NONE
                },
                ..Op::write(op.offset, data)
            }
        }
        OpKind::Flush if has(TransmissionFlags::SEND_FLUSH) => Op::flush(),
        OpKind::Trim => Op::trim(op.offset, len),
        OpKind::WriteZeroes { may_trim } if has(TransmissionFlags::SEND_WRITE_ZEROES) => {
            Op::write_zeroes(op.offset, len, !may_trim)
        }
        OpKind::Flush | OpKind::WriteZeroes { .. } => return None,
    })
}

/// The block layer's version of a request the export does not take raw; a read's data.
fn through_block_layer(
    kernel: &LoopbackKernel,
    op: &TraceOp,
    data: &[u8],
) -> Result<Option<Vec<u8>>, LoopbackError> {
    match op.kind {
        OpKind::Read { .. } => return kernel.read(op.offset, op.len as usize).map(Some),
        OpKind::Write { fua: true, .. } => kernel.write_fua(op.offset, data),
        OpKind::Write { fua: false, .. } => kernel.write(op.offset, data),
        OpKind::Flush => kernel.flush(),
        OpKind::Trim => kernel.trim(op.offset, op.len),
        OpKind::WriteZeroes { may_trim } => kernel.write_zeroes(op.offset, op.len, !may_trim),
    }
    .map(|()| None)
}
