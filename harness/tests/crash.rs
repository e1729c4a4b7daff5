//! The crash-consistency checker against a sample write-back cache device, correct and with
//! seeded bugs, one stream at a time and with threads racing: each bug must be caught, and the
//! correct device must pass, whatever subset of its unflushed writes it keeps.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::{Arc, Mutex};

use userblk::{BlockDevice, Capabilities, MemDevice};
use userblk_harness::crash::{
    check, check_concurrent, check_device, check_streams, ops_from_trace, random_ops,
    ConcurrentOptions, CrashError, CrashOp, CrashOptions, CrashPoints, Crashable, ViolationKind,
};
use userblk_harness::factory::crashable;

const BS: usize = 512;
const SIZE: u64 = 256 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bug {
    None,
    /// Flush answers at once and writes the cache back only when the next request arrives.
    FlushAckedBeforeDurable,
    /// FUA writes go into the cache like any other write.
    FuaIgnored,
    /// Flush writes back all but the most recently cached block.
    FlushForgetsOne,
}

/// A write-back cache over a durable store of 512-byte blocks.
struct CacheDevice {
    bug: Bug,
    /// Which unflushed blocks a crash keeps: none, or every other one (by block number), to
    /// show that keeping any subset is allowed.
    keep_some_on_crash: bool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    durable: HashMap<u64, Vec<u8>>,
    /// Block -> (data, order cached).
    cache: BTreeMap<u64, (Vec<u8>, u64)>,
    order: u64,
    flush_owed: bool,
}

impl State {
    fn write_back(&mut self, skip_newest: bool) {
        let newest = self
            .cache
            .iter()
            .max_by_key(|(_, (_, o))| *o)
            .map(|(b, _)| *b);
        for (b, (data, _)) in std::mem::take(&mut self.cache) {
            if skip_newest && Some(b) == newest {
                continue;
            }
            self.durable.insert(b, data);
        }
    }
}

impl CacheDevice {
    fn new(bug: Bug) -> CacheDevice {
        CacheDevice {
            bug,
            keep_some_on_crash: false,
            state: Mutex::new(State::default()),
        }
    }

    /// Pays a flush that was acknowledged but not done (the FlushAckedBeforeDurable bug).
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        let mut st = self.state.lock().unwrap();
        if st.flush_owed {
            st.flush_owed = false;
            st.write_back(false);
        }
        st
    }
}

impl BlockDevice for CacheDevice {
    fn blocks(&self) -> u64 {
        SIZE / BS as u64
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            flush: true,
            fua: true,
            ..Capabilities::default()
        }
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let st = self.state();
        for (i, chunk) in buf.chunks_mut(BS).enumerate() {
            let b = offset / BS as u64 + i as u64;
            match st.cache.get(&b).map(|(d, _)| d).or(st.durable.get(&b)) {
                Some(d) => chunk.copy_from_slice(d),
                None => chunk.fill(0),
            }
        }
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut st = self.state();
        for (i, chunk) in data.chunks(BS).enumerate() {
            st.order += 1;
            let o = st.order;
            st.cache
                .insert(offset / BS as u64 + i as u64, (chunk.to_vec(), o));
        }
        Ok(())
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if self.bug == Bug::FuaIgnored {
            return self.write(offset, data);
        }
        let mut st = self.state();
        for (i, chunk) in data.chunks(BS).enumerate() {
            let b = offset / BS as u64 + i as u64;
            st.cache.remove(&b);
            st.durable.insert(b, chunk.to_vec());
        }
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        let mut st = self.state();
        match self.bug {
            Bug::FlushAckedBeforeDurable => st.flush_owed = true,
            Bug::FlushForgetsOne => st.write_back(true),
            _ => st.write_back(false),
        }
        Ok(())
    }
}

impl Crashable for CacheDevice {
    fn crash(&self) -> io::Result<Box<dyn BlockDevice>> {
        // Not `self.state()`: a crash must not pay an owed flush.
        let st = self.state.lock().unwrap();
        let survivor = MemDevice::new(SIZE);
        for (b, d) in &st.durable {
            survivor.write(b * BS as u64, d)?;
        }
        if self.keep_some_on_crash {
            for (b, (d, _)) in st.cache.iter().filter(|(b, _)| *b % 2 == 0) {
                survivor.write(b * BS as u64, d)?;
            }
        }
        Ok(Box::new(survivor))
    }
}

/// A correct cache that keeps every other unflushed block on a power loss.
fn keeps_some() -> CacheDevice {
    CacheDevice {
        keep_some_on_crash: true,
        ..CacheDevice::new(Bug::None)
    }
}

fn block(fill: u8, n: usize) -> Vec<u8> {
    vec![fill; n * BS]
}

#[test]
fn a_correct_write_back_cache_passes_at_every_crash_point() {
    for seed in 0..4 {
        let ops = random_ops(seed, SIZE, BS as u32, 300);
        let report = check(
            &crashable(move || CacheDevice::new(Bug::None)),
            &ops,
            &CrashOptions::default(),
        )
        .unwrap();
        assert_eq!(report.crash_points, 300);
        assert!(report.blocks_checked > 1000, "{report}");
    }
}

#[test]
fn a_correct_cache_may_keep_any_subset_of_unflushed_writes() {
    let ops = random_ops(11, SIZE, BS as u32, 300);
    check(&crashable(keeps_some), &ops, &CrashOptions::default()).unwrap();
}

#[test]
fn a_flush_acknowledged_before_the_data_is_durable_is_caught() {
    let ops = vec![
        CrashOp::Write {
            offset: 0,
            data: block(1, 2),
        },
        CrashOp::Flush,
        CrashOp::Write {
            offset: 4096,
            data: block(2, 1),
        },
    ];
    let err = check(
        &crashable(move || CacheDevice::new(Bug::FlushAckedBeforeDurable)),
        &ops,
        &CrashOptions::default(),
    )
    .unwrap_err();
    let CrashError::Violation(v) = err else {
        panic!("expected a violation, got {err}")
    };
    assert_eq!(v.crash_after, 2, "{v}");
    assert_eq!(v.last_flush, Some(1));
    assert_eq!(v.block, 0);
    assert!(v.found.contains("the content before the run"), "{v}");
    assert_eq!(v.allowed.len(), 1, "{v}");
    assert!(v.allowed[0].starts_with("op #0 (write)"), "{v}");
    let msg = v.to_string();
    assert!(msg.contains("power lost after op #1 (flush)"), "{msg}");
}

#[test]
fn a_lost_fua_write_is_caught() {
    let ops = vec![
        CrashOp::Write {
            offset: 0,
            data: block(1, 1),
        },
        CrashOp::WriteFua {
            offset: 8192,
            data: block(3, 4),
        },
    ];
    let err = check(
        &crashable(move || CacheDevice::new(Bug::FuaIgnored)),
        &ops,
        &CrashOptions::default(),
    )
    .unwrap_err();
    let CrashError::Violation(v) = err else {
        panic!("expected a violation, got {err}")
    };
    assert_eq!(v.crash_after, 2, "{v}");
    assert_eq!(v.offset, 8192);
    assert!(v.allowed[0].starts_with("op #1 (write+fua)"), "{v}");
}

#[test]
fn seeded_bugs_are_caught_in_random_streams() {
    for bug in [
        Bug::FlushAckedBeforeDurable,
        Bug::FuaIgnored,
        Bug::FlushForgetsOne,
    ] {
        for loopback in [true, false] {
            let ops = random_ops(3, SIZE, BS as u32, 300);
            let options = CrashOptions {
                loopback,
                ..CrashOptions::default()
            };
            let result = check(&crashable(move || CacheDevice::new(bug)), &ops, &options);
            assert!(
                matches!(result, Err(CrashError::Violation(_))),
                "{bug:?} (loopback: {loopback}) not caught: {result:?}"
            );
        }
    }
}

#[test]
fn flush_points_only_still_catch_a_late_flush() {
    let ops = random_ops(5, SIZE, BS as u32, 300);
    let options = CrashOptions {
        points: CrashPoints::Flushes,
        ..CrashOptions::default()
    };
    let report = check(
        &crashable(move || CacheDevice::new(Bug::None)),
        &ops,
        &options,
    )
    .unwrap();
    assert!(
        report.crash_points < 300 && report.crash_points > 30,
        "{report}"
    );
    let result = check(
        &crashable(move || CacheDevice::new(Bug::FlushAckedBeforeDurable)),
        &ops,
        &options,
    );
    assert!(matches!(result, Err(CrashError::Violation(_))));
}

#[test]
fn ops_outside_whole_blocks_are_refused_not_a_panic() {
    let dev = MemDevice::with_block_size(SIZE, 4096);
    for op in [
        CrashOp::Write {
            offset: 512,
            data: block(1, 8),
        },
        CrashOp::WriteZeroes {
            offset: SIZE,
            len: 4096,
        },
    ] {
        let result = check(
            &crashable(|| MemDevice::with_block_size(SIZE, 4096)),
            &[op],
            &CrashOptions::default(),
        );
        assert!(
            matches!(result, Err(CrashError::Op { index: 0, .. })),
            "{result:?}"
        );
    }
    drop(dev);
}

#[test]
fn a_device_without_a_cache_passes_and_trims_allow_anything() {
    let mut ops = random_ops(9, SIZE, BS as u32, 100);
    ops.push(CrashOp::Trim {
        offset: 0,
        len: 8192,
    });
    check(
        &crashable(|| MemDevice::new(SIZE)),
        &ops,
        &CrashOptions::default(),
    )
    .unwrap();
}

/// A device that says it has no write cache (no flush capability) must make every write
/// durable at once: a cache behind it is caught even without a single flush in the stream.
#[test]
fn a_device_claiming_no_cache_must_not_cache() {
    struct Hidden(CacheDevice);
    impl BlockDevice for Hidden {
        fn blocks(&self) -> u64 {
            self.0.blocks()
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities {
                flush: false,
                ..Capabilities::default()
            }
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            self.0.read(offset, buf)
        }
        fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            self.0.write(offset, data)
        }
    }
    impl Crashable for Hidden {
        fn crash(&self) -> io::Result<Box<dyn BlockDevice>> {
            self.0.crash()
        }
    }
    let ops = vec![CrashOp::Write {
        offset: 0,
        data: block(7, 1),
    }];
    let result = check(
        &crashable(|| Hidden(CacheDevice::new(Bug::None))),
        &ops,
        &CrashOptions::default(),
    );
    assert!(
        matches!(result, Err(CrashError::Violation(_))),
        "{result:?}"
    );
}

#[test]
fn shipped_traces_drive_the_checker() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("traces");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("ubt") {
            continue;
        }
        let trace = userblk_harness::trace::Trace::read_file(&path).unwrap();
        let ops = ops_from_trace(&trace);
        let dev = MemDevice::new(trace.header.size);
        let options = CrashOptions {
            // Eight points spread over the stream, plus each flush and FUA write.
            points: CrashPoints::Every(ops.len().div_ceil(8)),
            loopback: false,
            ..CrashOptions::default()
        };
        // One device already made: check_device takes it as it is.
        let report = check_device(Arc::new(dev), &ops, &options)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        eprintln!("{}: {report}", path.display());
        n += 1;
    }
    assert!(n > 0, "no trace in {}", dir.display());
}

#[test]
fn a_factory_of_devices_that_cannot_crash_is_refused_with_the_way_to_fix_it() {
    let ops = random_ops(1, SIZE, BS as u32, 10);
    let err = check(&|| MemDevice::new(SIZE), &ops, &CrashOptions::default()).unwrap_err();
    assert!(matches!(err, CrashError::NotCrashable), "{err}");
    assert!(err.to_string().contains("factory::crashable(||"), "{err}");
}

#[test]
fn a_correct_write_back_cache_passes_concurrent_runs() {
    for loopback in [true, false] {
        let options = ConcurrentOptions {
            loopback,
            ..ConcurrentOptions::default()
        };
        let report = check_concurrent(&crashable(|| CacheDevice::new(Bug::None)), &options)
            .unwrap_or_else(|e| panic!("loopback {loopback}: {e}"));
        assert_eq!(report.ops, 8 * 4 * 100, "{report}");
        assert!(report.crash_points >= 8 * 100, "{report}");
        check_concurrent(&crashable(keeps_some), &options).unwrap();
    }
    check_concurrent(
        &crashable(|| MemDevice::new(SIZE)),
        &ConcurrentOptions::default(),
    )
    .unwrap();
}

#[test]
fn seeded_bugs_are_caught_in_concurrent_runs() {
    for (bug, kind) in [
        (Bug::FlushAckedBeforeDurable, ViolationKind::LostAfterFlush),
        (Bug::FuaIgnored, ViolationKind::LostFuaWrite),
        (Bug::FlushForgetsOne, ViolationKind::LostAfterFlush),
    ] {
        let err = check_concurrent(
            &crashable(move || CacheDevice::new(bug)),
            &ConcurrentOptions::default(),
        )
        .unwrap_err();
        let CrashError::Violation(v) = &err else {
            panic!("{bug:?}: expected a violation, got {err}")
        };
        assert_eq!(v.kind, kind, "{bug:?}: {v}");
        assert!(
            err.to_string().starts_with(&format!("{kind}: block ")),
            "{err}"
        );
    }
}

/// The FUA write of thread 0 completes while thread 1 keeps writing; the power is cut after
/// every op, so some cuts fall with thread 1's ops in flight, which may survive or not.
#[test]
fn given_streams_run_one_thread_each() {
    let streams = vec![
        vec![
            CrashOp::WriteFua {
                offset: 0,
                data: block(1, 2),
            };
            20
        ],
        (0..20)
            .map(|i| CrashOp::Write {
                offset: 4096,
                data: block(i as u8 + 2, 4),
            })
            .chain([CrashOp::Flush])
            .collect(),
    ];
    let options = ConcurrentOptions {
        crash_every: 1,
        ..ConcurrentOptions::default()
    };
    let report = check_streams(&crashable(keeps_some), &streams, &options).unwrap();
    assert_eq!(report.ops, 41);
    assert_eq!(report.crash_points, 42);
    let err = check_streams(
        &crashable(|| CacheDevice::new(Bug::FuaIgnored)),
        &streams,
        &options,
    )
    .unwrap_err();
    assert!(err.to_string().starts_with("lost FUA write: "), "{err}");
}

#[test]
fn torn_writes_are_refused_only_when_the_device_promises_whole_writes() {
    let ops = random_ops(11, SIZE, BS as u32, 300);
    let whole = CrashOptions {
        atomic_writes: true,
        ..CrashOptions::default()
    };
    // Keeping every other unflushed block tears the writes of several blocks.
    check(&crashable(keeps_some), &ops, &CrashOptions::default()).unwrap();
    let err = check(&crashable(keeps_some), &ops, &whole).unwrap_err();
    let CrashError::Violation(v) = &err else {
        panic!("expected a violation, got {err}")
    };
    assert_eq!(v.kind, ViolationKind::TornWrite, "{v}");
    assert!(err.to_string().starts_with("torn write: op #"), "{err}");
    // Keeping none of them keeps writes whole.
    check(&crashable(|| CacheDevice::new(Bug::None)), &ops, &whole).unwrap();
    let options = ConcurrentOptions {
        atomic_writes: true,
        ..ConcurrentOptions::default()
    };
    check_concurrent(&crashable(|| CacheDevice::new(Bug::None)), &options).unwrap();
}

#[test]
fn a_huge_mem_device_is_crashable_at_the_cost_of_what_was_written() {
    // 4 TiB: a power loss copies what is allocated (MemDevice::snapshot), not the whole disk.
    let ops = random_ops(3, 1 << 20, BS as u32, 100);
    for factory in [
        &crashable(|| MemDevice::new(4 << 40)) as &dyn userblk_harness::factory::DeviceFactory,
        &userblk_harness::factory::mem(4 << 40),
    ] {
        let report = check(factory, &ops, &CrashOptions::default()).unwrap();
        assert_eq!(report.crash_points, 100);
    }
}
