//! Replaying a trace as recorded: every shipped trace reaches the device with exactly its
//! recorded requests (6.12's 1,280 KiB writes whole, even through a fake kernel playing 6.1,
//! which would split them), with the recorded requests in flight together, and reads still
//! checked.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use userblk::link::loopback::KernelProfile;
use userblk::{BlockDevice, LoopbackOptions, MemDevice};
use userblk_harness::target::LoopbackRig;
use userblk_harness::trace::{
    replay_loopback, replay_on, OpKind, Recorder, ReplayError, Trace, TraceOp,
};

fn shipped(name: &str) -> Trace {
    let path: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("traces")
        .join(name);
    Trace::read_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// (kind, offset, length) of every request that succeeded, sorted: what a device received,
/// whatever the order of requests that overlapped.
fn shapes(ops: &[TraceOp]) -> Vec<(String, u64, u64)> {
    let mut v: Vec<_> = ops
        .iter()
        .filter(|op| op.errno.is_none())
        .map(|op| {
            let kind = match op.kind {
                OpKind::WriteZeroes { may_trim } => format!("write-zeroes {may_trim}"),
                _ => op.kind.name().to_string(),
            };
            (kind, op.offset, op.len)
        })
        .collect();
    v.sort();
    v
}

/// Most requests that overlapped in (logical) time at record time.
fn recorded_overlap(trace: &Trace) -> u64 {
    let ops: Vec<&TraceOp> = trace.ops.iter().filter(|op| op.errno.is_none()).collect();
    (0..ops.len())
        .map(|i| 1 + ops[..i].iter().filter(|o| o.end > ops[i].start).count() as u64)
        .max()
        .unwrap_or(0)
}

/// Replays `trace` as recorded onto a recorded RAM disk, through a kernel playing `profile`.
fn rerecorded(trace: &Trace, profile: KernelProfile) -> (Trace, u64) {
    let rec = Arc::new(Recorder::new(MemDevice::new(trace.header.size)).initial_zeroes(true));
    let options = LoopbackOptions::for_profile(profile);
    let report = replay_loopback(trace, Box::new(Arc::clone(&rec)), options)
        .unwrap_or_else(|e| panic!("{}: {e}", trace.header.description));
    assert!(report.reads_checked > 0, "{report}");
    (rec.trace(), report.max_in_flight)
}

#[test]
fn every_shipped_trace_reaches_the_device_with_its_recorded_shapes_and_overlap() {
    for name in [
        "ext4-6.1.ubt",
        "ext4-6.12.ubt",
        "fio-6.1.ubt",
        "fio-6.12.ubt",
    ] {
        let trace = shipped(name);
        let (again, in_flight) = rerecorded(&trace, KernelProfile::linux_6_1());
        assert_eq!(shapes(&again.ops), shapes(&trace.ops), "{name}");
        assert_eq!(in_flight, recorded_overlap(&trace), "{name}");
        assert!(in_flight > 1, "{name}: nothing overlapped");
        eprintln!(
            "{name}: {} requests as recorded, up to {in_flight} in flight",
            again.ops.len()
        );
    }
}

#[test]
fn the_6_12_trace_keeps_its_1280_kib_writes_which_the_block_layer_path_splits() {
    let trace = shipped("ext4-6.12.ubt");
    let big = |t: &Trace| {
        t.ops
            .iter()
            .filter(|op| matches!(op.kind, OpKind::Write { .. }) && op.len == 1280 << 10)
            .count()
    };
    assert_eq!(big(&trace), 3);
    let (as_recorded, _) = rerecorded(&trace, KernelProfile::linux_6_1());
    assert_eq!(big(&as_recorded), 3);
    // One at a time through the block layer of a 6.1 kernel, they arrive in 128 KiB pieces.
    let rec = Arc::new(Recorder::new(MemDevice::new(trace.header.size)).initial_zeroes(true));
    let rig = LoopbackRig {
        options: LoopbackOptions::for_profile(KernelProfile::linux_6_1()),
    };
    let report = replay_on(&rig, Box::new(Arc::clone(&rec)), &trace).unwrap();
    assert_eq!(report.max_in_flight, 1);
    let split = rec.trace();
    assert_eq!(big(&split), 0);
    assert!(split.ops.iter().all(|op| !matches!(
        op.kind,
        OpKind::Read { .. } | OpKind::Write { .. }
    ) || op.len <= 128 << 10));
}

/// Reads correctly, except one byte.
struct FlipsAByte(MemDevice, u64);

impl BlockDevice for FlipsAByte {
    fn blocks(&self) -> u64 {
        self.0.blocks()
    }
    fn capabilities(&self) -> userblk::Capabilities {
        self.0.capabilities()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read(offset, buf)?;
        if (offset..offset + buf.len() as u64).contains(&self.1) {
            buf[(self.1 - offset) as usize] ^= 0x40;
        }
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write(offset, data)
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write_fua(offset, data)
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.0.write_zeroes(offset, len, may_trim)
    }
}

#[test]
fn a_wrong_read_is_still_caught_with_requests_in_flight_together() {
    let trace = shipped("fio-6.12.ubt");
    // A byte the fio verify phase reads back after writing it.
    let read = trace
        .ops
        .iter()
        .rev()
        .find(|op| matches!(op.kind, OpKind::Read { .. }) && op.errno.is_none())
        .unwrap();
    let bad = FlipsAByte(MemDevice::new(trace.header.size), read.offset + 100);
    let err = replay_loopback(&trace, Box::new(bad), LoopbackOptions::default()).unwrap_err();
    let ReplayError::Mismatch { mismatch, .. } = &err else {
        panic!("expected a mismatch, got {err}")
    };
    assert_eq!(mismatch.offset, read.offset + 100, "{err}");
    // The same trace passes on a correct device.
    replay_loopback(
        &trace,
        Box::new(MemDevice::new(trace.header.size)),
        LoopbackOptions::default(),
    )
    .unwrap();
}
