//! Traces: recording through the loopback kernel, the file format, the model, and every shipped
//! trace (harness/traces/*.ubt) replayed against `MemDevice` and `FileDevice`.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use userblk::proto::TransmissionFlags;
use userblk::{BlockDevice, FileDevice, LoopbackKernel, MemDevice};
use userblk_harness::target::LoopbackRig;
use userblk_harness::trace::{
    replay, replay_on, Fill, OpKind, Recorder, ReplayError, Trace, TraceError, TraceHeader, TraceOp,
};

fn traces_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("traces")
}

fn shipped() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(traces_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("ubt"))
        .collect();
    v.sort();
    v
}

/// Small deterministic generator for workloads.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Four threads of mixed requests through the loopback kernel and the real server.
fn record_concurrent_workload() -> Trace {
    const SIZE: u64 = 4 << 20;
    let rec = Arc::new(
        Recorder::new(MemDevice::new(SIZE))
            .initial_zeroes(true)
            .description("test: 4 threads of mixed requests through the loopback"),
    );
    let kernel = LoopbackKernel::start(Arc::clone(&rec)).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let kernel = &kernel;
            s.spawn(move || {
                let mut rng = Rng(0x9e37_79b9 + t);
                for i in 0..150u64 {
                    let blocks = 1 + rng.next() % 64;
                    let offset = rng.next() % (SIZE / 512 - blocks) * 512;
                    let len = blocks * 512;
                    match rng.next() % 10 {
                        0..=3 => {
                            kernel.read(offset, len as usize).unwrap();
                        }
                        4..=5 => {
                            // Mostly repeated or zero content, as file systems write.
                            let fill = [0u8, 0x5a, (t * 16 + i % 3) as u8][(i % 3) as usize];
                            kernel.write(offset, &vec![fill; len as usize]).unwrap();
                        }
                        6 => {
                            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                            kernel.write_fua(offset, &data).unwrap();
                        }
                        7 => kernel.flush().unwrap(),
                        8 => kernel.write_zeroes(offset, len, i % 2 == 0).unwrap(),
                        _ => kernel.trim(offset, len).unwrap(),
                    }
                }
            });
        }
    });
    kernel.shutdown().unwrap();
    rec.trace()
}

fn file_device(dir: &tempfile::TempDir, size: u64) -> FileDevice {
    FileDevice::create(dir.path().join("disk.img"), size).unwrap()
}

#[test]
fn a_concurrent_recording_verifies_round_trips_and_replays() {
    let trace = record_concurrent_workload();
    let s = trace.summary();
    // No request exceeds 128 KiB, so none was split: one device call per request.
    assert_eq!(
        s.reads + s.writes + s.flushes + s.trims + s.write_zeroes,
        600
    );
    let verified = trace.verify().unwrap();
    assert!(verified.reads_verified > 100, "{verified:?}");

    let bytes = trace.encode();
    assert!(
        Trace::decode(&bytes).unwrap() == trace,
        "round trip differs"
    );

    let rig = LoopbackRig::default();
    let report = replay_on(&rig, Box::new(MemDevice::new(4 << 20)), &trace).unwrap();
    assert!(report.reads_checked > 100, "{report}");
    let dir = tempfile::tempdir().unwrap();
    let report = replay_on(&rig, Box::new(file_device(&dir, 4 << 20)), &trace).unwrap();
    assert!(report.reads_checked > 100, "{report}");
}

/// Reads correctly, except one byte.
struct FlipsAByte(MemDevice, u64);

impl BlockDevice for FlipsAByte {
    fn blocks(&self) -> u64 {
        self.0.blocks()
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
}

#[test]
fn a_wrong_read_is_reported_with_its_offset_and_a_hex_dump() {
    let rec = Recorder::new(MemDevice::new(1 << 20)).initial_zeroes(true);
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    rec.write(8192, &data).unwrap();
    rec.read(8192, &mut vec![0; 8192]).unwrap();
    let trace = rec.trace();

    let bad = FlipsAByte(MemDevice::new(1 << 20), 8192 + 4100);
    let err = replay_on(&LoopbackRig::default(), Box::new(bad), &trace).unwrap_err();
    let ReplayError::Mismatch { mismatch, report } = &err else {
        panic!("expected a mismatch, got {err}")
    };
    assert_eq!(mismatch.op_index, 1);
    assert_eq!(mismatch.offset, 8192 + 4100);
    assert_eq!(report.ops_replayed, 2);
    assert!(
        mismatch.expected_from.contains("op #0 (write)"),
        "{mismatch}"
    );
    let text = err.to_string();
    assert!(text.contains("expected 00003000:"), "{text}");
    assert!(text.contains("^^"), "{text}");
}

#[test]
fn a_dropped_write_is_caught_by_replay() {
    struct DropsWrites(MemDevice);
    impl BlockDevice for DropsWrites {
        fn blocks(&self) -> u64 {
            self.0.blocks()
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            self.0.read(offset, buf)
        }
        fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            if offset == 65536 {
                return Ok(());
            }
            self.0.write(offset, data)
        }
    }
    let rec = Recorder::new(MemDevice::new(4 << 20)).initial_zeroes(true);
    rec.write(65536, &[9; 4096]).unwrap();
    rec.read(65536, &mut [0; 4096]).unwrap();
    let small = rec.trace();
    let result = replay_on(
        &LoopbackRig::default(),
        Box::new(DropsWrites(MemDevice::new(4 << 20))),
        &small,
    );
    assert!(
        matches!(result, Err(ReplayError::Mismatch { .. })),
        "{result:?}"
    );
}

fn op(start: u64, end: u64, offset: u64, len: u64, kind: OpKind) -> TraceOp {
    TraceOp {
        start,
        end,
        offset,
        len,
        kind,
        errno: None,
    }
}

fn write(pieces: u32) -> OpKind {
    OpKind::Write {
        fua: false,
        pieces: vec![1; pieces as usize],
    }
}

#[test]
fn the_model_leaves_racing_bytes_unchecked() {
    let header = TraceHeader {
        size: 1 << 20,
        block_size: 512,
        flags: TransmissionFlags::SEND_FLUSH,
        initial_zeroes: true,
        trim_zeroes: false,
        description: String::new(),
    };
    let read = || OpKind::Read { hash: None };
    let ops = vec![
        op(0, 3, 0, 4096, write(1)),       // #0: write A
        op(1, 2, 0, 8192, read()),         // #1: read racing A: 0..4096 unknown, rest zero
        op(4, 5, 0, 4096, read()),         // #2: after A: A
        op(6, 9, 4096, 4096, write(1)),    // #3: write B ...
        op(7, 10, 4096, 4096, write(1)),   // #4: ... racing write C on the same range
        op(11, 12, 4096, 4096, read()),    // #5: unknown
        op(13, 14, 0, 4096, OpKind::Trim), // #6
        op(15, 16, 0, 4096, read()),       // #7: trimmed: unknown
    ];
    let trace = Trace::from_parts(header, vec![vec![7u8; 4096].into()], ops).unwrap();
    let exp = trace.expectations(false);
    assert_eq!(
        trace.expectations(true)[7].as_ref().unwrap().ranges,
        vec![(0..4096, Fill::Zero)]
    );
    assert_eq!(
        exp[1].as_ref().unwrap().ranges,
        vec![(0..4096, Fill::Unknown), (4096..8192, Fill::Zero)]
    );
    assert_eq!(
        exp[2].as_ref().unwrap().ranges,
        vec![(0..4096, Fill::Written(0))]
    );
    assert_eq!(
        exp[5].as_ref().unwrap().ranges,
        vec![(4096..8192, Fill::Unknown)]
    );
    assert_eq!(
        exp[7].as_ref().unwrap().ranges,
        vec![(0..4096, Fill::Unknown)]
    );
    assert!(exp[0].is_none() && exp[3].is_none());
}

#[test]
fn from_parts_refuses_bad_references() {
    let header = TraceHeader {
        size: 8192,
        block_size: 512,
        flags: TransmissionFlags::SEND_FLUSH,
        initial_zeroes: true,
        trim_zeroes: false,
        description: String::new(),
    };
    let bad_ref = vec![op(0, 1, 0, 4096, write(1))];
    assert!(Trace::from_parts(header.clone(), vec![], bad_ref).is_none());
    let outside = vec![op(0, 1, 8192, 512, OpKind::Trim)];
    assert!(Trace::from_parts(header, vec![], outside).is_none());
}

#[test]
fn corrupt_or_truncated_files_give_typed_errors() {
    let bytes = record_concurrent_workload().encode();
    assert!(matches!(Trace::decode(b""), Err(TraceError::BadMagic)));
    assert!(matches!(
        Trace::decode(b"PNG\r\n\x1a\n\0\0\0\0\0"),
        Err(TraceError::BadMagic)
    ));
    let mut v2 = bytes.clone();
    v2[8] = 2;
    assert!(matches!(
        Trace::decode(&v2),
        Err(TraceError::UnsupportedVersion(2))
    ));
    for cut in (0..bytes.len())
        .step_by(bytes.len() / 50)
        .chain(bytes.len() - 8..bytes.len())
    {
        assert!(
            Trace::decode(&bytes[..cut]).is_err(),
            "{cut}-byte prefix accepted"
        );
    }
    let mut rng = Rng(42);
    for _ in 0..300 {
        let mut b = bytes.clone();
        let i = 12 + (rng.next() as usize) % (b.len() - 12);
        b[i] ^= 1 << (rng.next() % 8);
        // The zlib checksum catches nearly all of these; none may panic.
        let _ = Trace::decode(&b);
        let len = (rng.next() % 200) as usize;
        let mut junk: Vec<u8> = userblk_harness::trace::MAGIC.to_vec();
        junk.extend([1, 0, 0, 0]);
        junk.extend((0..len).map(|_| rng.next() as u8));
        let _ = Trace::decode(&junk);
    }
}

#[test]
fn replay_refuses_a_target_too_small() {
    let trace = record_concurrent_workload();
    let kernel = LoopbackKernel::start(MemDevice::new(1 << 20)).unwrap();
    assert!(matches!(
        replay(&trace, &kernel),
        Err(ReplayError::Geometry(_))
    ));
}

#[test]
fn shipped_traces_verify_and_replay_on_mem_and_file_devices() {
    let paths = shipped();
    assert!(!paths.is_empty(), "no traces in {}", traces_dir().display());
    let rig = LoopbackRig::default();
    for path in paths {
        let name = path.display();
        let trace = Trace::read_file(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let verified = trace.verify().unwrap_or_else(|e| panic!("{name}: {e}"));
        let size = trace.header.size;
        let mem = replay_on(&rig, Box::new(MemDevice::new(size)), &trace)
            .unwrap_or_else(|e| panic!("{name} on MemDevice: {e}"));
        let dir = tempfile::tempdir().unwrap();
        let file = replay_on(&rig, Box::new(file_device(&dir, size)), &trace)
            .unwrap_or_else(|e| panic!("{name} on FileDevice: {e}"));
        assert_eq!(mem, file, "{name}");
        assert!(mem.reads_checked > 0, "{name}: no read checked");
        eprintln!(
            "{name}: {}\n  {}\n  verify: {verified:?}\n  replay: {mem}",
            trace.header.description,
            trace.summary()
        );
    }
}

/// The ext4 traces end with the file system unmounted: replayed onto a file, the image must
/// pass `e2fsck -fn`.
#[test]
fn replayed_ext4_traces_give_images_that_fsck_accepts() {
    let Some(e2fsck) = ["/usr/sbin/e2fsck", "/sbin/e2fsck"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        eprintln!("skipped: e2fsck not found (install e2fsprogs)");
        return;
    };
    let mut n = 0;
    for path in shipped() {
        if !path.to_string_lossy().contains("ext4") {
            continue;
        }
        let trace = Trace::read_file(&path).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        let dev = FileDevice::create(&image, trace.header.size).unwrap();
        replay_on(&LoopbackRig::default(), Box::new(dev), &trace)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let out = Command::new(e2fsck)
            .arg("-fn")
            .arg(&image)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: e2fsck -fn failed ({}):\n{}{}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "{}: e2fsck -fn clean: {}",
            path.display(),
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .unwrap_or("")
        );
        n += 1;
    }
    assert!(n > 0, "no ext4 trace shipped");
}
