//! [`replay`]: issue a trace's requests to a [`Target`] in the order they reached the recorded
//! device, one at a time through its block layer, and check every read against the model of
//! the trace. (Through the fake kernel, [`replay_loopback`](super::replay_loopback) keeps the
//! recorded request shapes and overlap instead.)

use std::fmt;

use userblk::proto::TransmissionFlags;
use userblk::BlockDevice;

use super::model::describe;
use super::{Fill, OpKind, Trace};
use crate::target::{OpError, Rig, Target};

/// What a replay did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Requests issued to the target.
    pub ops_replayed: u64,
    /// Requests not issued: failed at record time, or trims the target does not support.
    pub ops_skipped: u64,
    /// Reads of which at least one byte was checked.
    pub reads_checked: u64,
    /// Reads the model cannot predict at all (racing writes, unknown content).
    pub reads_unchecked: u64,
    /// Bytes compared.
    pub bytes_checked: u64,
    /// Most requests in flight together: 1 for a replay one at a time; for a replay as
    /// recorded, the recorded overlap.
    pub max_in_flight: u64,
}

impl fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ops replayed ({} skipped, up to {} in flight), {} reads checked ({} KiB), {} \
             reads unpredictable",
            self.ops_replayed,
            self.ops_skipped,
            self.max_in_flight,
            self.reads_checked,
            self.bytes_checked >> 10,
            self.reads_unchecked
        )
    }
}

/// A read that returned something other than what the model of the trace says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// Index of the read in the trace.
    pub op_index: usize,
    /// The read, described.
    pub op: String,
    /// Device offset of the first byte that differs.
    pub offset: u64,
    /// Where the expected bytes come from, e.g. `op #12 (write) at 4096..8192`.
    pub expected_from: String,
    /// Device offset of the first byte of `expected` and `found`.
    pub window: u64,
    /// Expected bytes around the first difference.
    pub expected: Vec<u8>,
    /// Bytes read there.
    pub found: Vec<u8>,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "op #{} ({}): first difference at byte offset {} (expected: {})",
            self.op_index, self.op, self.offset, self.expected_from
        )?;
        for (row, (e, g)) in self
            .expected
            .chunks(16)
            .zip(self.found.chunks(16))
            .enumerate()
        {
            let at = self.window + row as u64 * 16;
            let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>();
            let marks: String = e
                .iter()
                .zip(g)
                .map(|(a, b)| if a == b { "   " } else { "^^ " })
                .collect();
            writeln!(f, "  expected {at:08x}: {}", hex(e).join(" "))?;
            writeln!(f, "  found    {at:08x}: {}", hex(g).join(" "))?;
            if marks.contains('^') {
                writeln!(f, "                    {}", marks.trim_end())?;
            }
        }
        Ok(())
    }
}

/// Why a replay failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// The target cannot hold the trace: too small, or a block size the trace's offsets do not
    /// respect.
    #[error("the target does not fit the trace: {0}")]
    Geometry(String),
    /// The device could not be attached or detached.
    #[error("{what}: {source}")]
    Rig {
        /// `attaching` or `detaching`.
        what: &'static str,
        /// The error.
        #[source]
        source: OpError,
    },
    /// A request that succeeded at record time failed.
    #[error("op #{index} ({op}) failed: {source} (after: {report})")]
    Op {
        /// Index in the trace.
        index: usize,
        /// The op, described.
        op: String,
        /// The error.
        #[source]
        source: OpError,
        /// What was done before it.
        report: ReplayReport,
    },
    /// A read returned other data than the model says.
    #[error("read mismatch: {mismatch}(after: {report})")]
    Mismatch {
        /// The first difference.
        mismatch: Box<Mismatch>,
        /// What was done before it.
        report: ReplayReport,
    },
}

/// How [`replay_with`] models the target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplayOptions {
    /// The target reads trimmed ranges back as zeroes (its device's capabilities say
    /// `trim_zeroes`), so reads of them are checked too. Default: false.
    pub trim_zeroes: bool,
}

/// [`replay_with`] default options: trimmed content is not checked.
pub fn replay(trace: &Trace, target: &dyn Target) -> Result<ReplayReport, ReplayError> {
    replay_with(trace, target, &ReplayOptions::default())
}

/// Replays `trace` against `target`: every request that succeeded at record time is issued, one
/// at a time in the order the recorded device received them (the model leaves unchecked what
/// concurrency at record time made ambiguous, so any order consistent with it is valid), and
/// every read is compared with the model. Stops at the first failure.
///
/// Requests go through the target's normal path: for the loopback rig, the fake kernel and the
/// real [`userblk::Server`]; a FUA write to a target without FUA becomes write + flush, a
/// write-zeroes without WRITE_ZEROES becomes zero-filled writes, and trims are skipped when the
/// target does not support them (the model takes trimmed content as unknown anyway).
pub fn replay_with(
    trace: &Trace,
    target: &dyn Target,
    options: &ReplayOptions,
) -> Result<ReplayReport, ReplayError> {
    check_geometry(trace, target.size(), target.block_size())?;
    let can_trim = target.flags().contains(TransmissionFlags::SEND_TRIM);
    let expectations = trace.expectations(options.trim_zeroes);
    let mut report = ReplayReport::default();
    for (index, op) in trace.ops.iter().enumerate() {
        if op.errno.is_some() || (op.kind == OpKind::Trim && !can_trim) {
            report.ops_skipped += 1;
            continue;
        }
        let fail = |source: OpError, report: ReplayReport| ReplayError::Op {
            index,
            op: op.to_string(),
            source,
            report,
        };
        let result = match &op.kind {
            OpKind::Read { .. } => match target.read(op.offset, op.len as usize) {
                Ok(data) => {
                    report.ops_replayed += 1;
                    report.max_in_flight = 1;
                    if let Some(Some(exp)) = expectations.get(index) {
                        check_read(trace, index, exp, &data, &mut report)
                            .map_err(|mismatch| ReplayError::Mismatch { mismatch, report })?;
                    }
                    continue;
                }
                Err(e) => Err(e),
            },
            OpKind::Write { fua, .. } => {
                let data = trace.write_data(op).unwrap_or_default();
                if *fua {
                    target.write_fua(op.offset, &data)
                } else {
                    target.write(op.offset, &data)
                }
            }
            OpKind::Flush => target.flush(),
            OpKind::Trim => target.trim(op.offset, op.len),
            OpKind::WriteZeroes { may_trim } => target.write_zeroes(op.offset, op.len, !may_trim),
        };
        result.map_err(|e| fail(e, report))?;
        report.ops_replayed += 1;
    }
    report.max_in_flight = u64::from(report.ops_replayed > 0);
    Ok(report)
}

/// Refuses a target too small for the trace, or whose blocks do not divide the trace's.
pub(super) fn check_geometry(trace: &Trace, size: u64, bs: u32) -> Result<(), ReplayError> {
    let h = &trace.header;
    if size < h.size {
        return Err(ReplayError::Geometry(format!(
            "the trace needs {} bytes, the target has {size}",
            h.size,
        )));
    }
    if bs == 0 || h.block_size % bs != 0 {
        return Err(ReplayError::Geometry(format!(
            "the trace was recorded with {}-byte blocks; the target's {bs}-byte blocks do not \
             divide them",
            h.block_size
        )));
    }
    Ok(())
}

/// Compares a read's data with what the model expects; counts it in `report`.
pub(super) fn check_read(
    trace: &Trace,
    index: usize,
    exp: &super::Expectation,
    data: &[u8],
    report: &mut ReplayReport,
) -> Result<(), Box<Mismatch>> {
    let op = &trace.ops[index];
    let mut checked = 0u64;
    let mut buf = Vec::new();
    for (r, fill) in &exp.ranges {
        if *fill == Fill::Unknown {
            continue;
        }
        let at = (r.start - op.offset) as usize;
        let len = (r.end - r.start) as usize;
        buf.resize(len, 0);
        trace.expected_bytes(r.clone(), *fill, &mut buf);
        let Some(got) = data.get(at..at + len) else {
            continue;
        };
        if let Some(d) = buf.iter().zip(got).position(|(a, b)| a != b) {
            let first = r.start + d as u64;
            let w_start = (first & !15).saturating_sub(16).max(r.start);
            let w_end = ((first & !15) + 48).min(r.end);
            let (ws, we) = ((w_start - r.start) as usize, (w_end - r.start) as usize);
            return Err(Box::new(Mismatch {
                op_index: index,
                op: op.to_string(),
                offset: first,
                expected_from: describe(
                    &super::Expectation {
                        ranges: vec![(r.clone(), *fill)],
                    },
                    &trace.ops,
                ),
                window: w_start,
                expected: buf[ws..we].to_vec(),
                found: got[ws..we].to_vec(),
            }));
        }
        checked += len as u64;
    }
    if checked > 0 {
        report.reads_checked += 1;
        report.bytes_checked += checked;
    } else {
        report.reads_unchecked += 1;
    }
    Ok(())
}

/// Serves `device` on `rig`, replays `trace` against it (checking trimmed ranges when the
/// device's capabilities say they read as zeroes), and detaches.
pub fn replay_on(
    rig: &dyn Rig,
    device: Box<dyn BlockDevice>,
    trace: &Trace,
) -> Result<ReplayReport, ReplayError> {
    let options = ReplayOptions {
        trim_zeroes: device.capabilities().trim_zeroes,
    };
    let target = rig.attach(device).map_err(|source| ReplayError::Rig {
        what: "attaching",
        source,
    })?;
    let result = replay_with(trace, &*target, &options);
    after_detach(result, target.detach())
}

/// A replay's outcome once its device is detached: the replay's error if it failed, else the
/// detach's.
pub(crate) fn after_detach(
    result: Result<ReplayReport, ReplayError>,
    detached: Result<(), OpError>,
) -> Result<ReplayReport, ReplayError> {
    let report = result?;
    detached.map_err(|source| ReplayError::Rig {
        what: "detaching",
        source,
    })?;
    Ok(report)
}
