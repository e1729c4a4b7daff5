//! Shrinking random failures: in whole device blocks, only to smaller runs that fail the same
//! way, and the original failure printed whole when nothing smaller reproduces it.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use userblk::{BlockDevice, Capabilities, MemDevice};
use userblk_harness::random::{
    loopback_rig, random_run, random_run_with, FailureKind, Mode, ModelOp, RandomConfig,
};
use userblk_harness::script::Script;
use userblk_harness::target::LoopbackRig;

const SIZE: u64 = 8 << 20;

/// A MemDevice with a bug, the kind chosen by the test.
struct Buggy {
    mem: MemDevice,
    bug: Bug,
    /// Writes seen, by every device of the test (shared).
    writes: Arc<AtomicU64>,
    /// Whether it has served a read.
    loaded: AtomicBool,
}

#[derive(Clone, Copy)]
enum Bug {
    /// Writes longer than 8 KiB are acknowledged and dropped.
    LongWritesLost,
    /// As `LongWritesLost`, and writes fail with EIO until the device has served a read (it
    /// loads its metadata lazily, on the first read).
    LongWritesLostEarlyWritesFail,
    /// The 40th write any device of the test receives is dropped: once only.
    OneWriteLost,
}

impl BlockDevice for Buggy {
    fn block_size(&self) -> u32 {
        self.mem.block_size()
    }
    fn blocks(&self) -> u64 {
        self.mem.blocks()
    }
    fn capabilities(&self) -> Capabilities {
        self.mem.capabilities()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.loaded.store(true, Ordering::SeqCst);
        self.mem.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst);
        match self.bug {
            Bug::LongWritesLostEarlyWritesFail if !self.loaded.load(Ordering::SeqCst) => {
                Err(io::Error::from_raw_os_error(5))
            }
            Bug::LongWritesLost | Bug::LongWritesLostEarlyWritesFail if data.len() > 8192 => Ok(()),
            Bug::OneWriteLost if n == 39 => Ok(()),
            _ => self.mem.write(offset, data),
        }
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.mem.write_zeroes(offset, len, may_trim)
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.mem.trim(offset, len)
    }
}

fn factory(bug: Bug, block_size: u32) -> impl Fn() -> Buggy + Send + Sync {
    let writes = Arc::new(AtomicU64::new(0));
    move || Buggy {
        mem: MemDevice::with_block_size(SIZE, block_size),
        bug,
        writes: Arc::clone(&writes),
        loaded: AtomicBool::new(false),
    }
}

#[test]
fn shrinking_on_a_4k_device_keeps_whole_blocks_and_the_script_fails_the_same_way() {
    let make = factory(Bug::LongWritesLost, 4096);
    let caps = make().capabilities();
    let failure = random_run(&LoopbackRig::default(), &make, caps, 3, 100, 300)
        .expect_err("random testing missed lost writes");
    let text = failure.to_string();
    println!("{text}");
    assert_eq!(failure.kind, FailureKind::LostWrite, "{text}");
    assert!(failure.ops.len() <= 4, "{text}");
    for op in &failure.ops {
        if let Some((offset, len)) = op.range() {
            assert!(
                offset % 4096 == 0 && len % 4096 == 0 && len > 0,
                "{op:?}\n{text}"
            );
        }
    }
    // Halving stopped at the smallest write still lost: just over 8 KiB, in whole blocks.
    assert!(
        failure
            .ops
            .iter()
            .any(|op| matches!(op, ModelOp::Write { len: 12288, .. })),
        "{text}"
    );
    let script = Script::parse(&failure.script.to_string()).unwrap();
    let err = script.replay(make()).unwrap_err().to_string();
    assert!(err.contains("first difference"), "{err}");
    script
        .replay(MemDevice::with_block_size(SIZE, 4096))
        .unwrap();
}

#[test]
fn shrinking_keeps_only_candidates_that_fail_the_same_way() {
    // A run that fails by losing a write. Its first operation is a read; candidates without
    // it fail with EIO at their first write instead, a different failure, which must not be
    // kept.
    let make = factory(Bug::LongWritesLostEarlyWritesFail, 4096);
    let caps = make().capabilities();
    let rig = LoopbackRig::default();
    let seed = (1..100u64)
        .find(|&seed| {
            random_run(&rig, &make, caps, seed, 60, 0)
                .is_err_and(|f| f.kind == FailureKind::LostWrite)
        })
        .expect("a seed whose run fails by a lost write first");
    let failure = random_run(&rig, &make, caps, seed, 60, 300)
        .expect_err("random testing missed lost writes");
    let text = failure.to_string();
    println!("seed {seed}:\n{text}");
    assert_eq!(failure.kind, FailureKind::LostWrite, "{text}");
    assert!(text.starts_with("lost write: block "), "{text}");
    assert!(!text.contains("EIO") && !text.contains("errno 5"), "{text}");
    assert!(text.contains("failing the same way (lost write)"), "{text}");
    assert!(failure.ops.len() < failure.original_len, "{text}");
}

#[test]
fn a_failure_that_does_not_come_back_is_printed_whole() {
    let make = factory(Bug::OneWriteLost, 512);
    let caps = make().capabilities();
    let config = RandomConfig {
        mode: Mode::Sequential,
        ops: 120,
        shrink_attempts: 20,
        ..RandomConfig::default()
    };
    // Read-backs make every lost write visible; later runs (shrinking) never lose one.
    let failure = random_run_with(&loopback_rig(), &make, caps, 5, &config)
        .expect_err("the lost write was missed");
    let text = failure.to_string();
    println!("{text}");
    assert!(
        matches!(
            failure.kind,
            FailureKind::LostWrite | FailureKind::StaleRead
        ),
        "{text}"
    );
    assert!(
        text.contains("no smaller run failed the same way"),
        "{text}"
    );
    assert!(text.contains("this is the original failure"), "{text}");
    assert_eq!(failure.ops.len(), failure.original_len, "{text}");
    // Whole: what went wrong, the history of the block, the hex dump.
    assert!(
        text.contains("does not hold what the model expects"),
        "{text}"
    );
    assert!(text.contains("operations on block"), "{text}");
    assert!(text.contains("first difference"), "{text}");
}

#[test]
fn concurrent_failures_shrink_to_a_few_operations_and_print_their_threads() {
    let make = factory(Bug::LongWritesLost, 512);
    let caps = make().capabilities();
    let config = RandomConfig {
        runs: 1,
        ..RandomConfig::default()
    };
    let failure = random_run_with(&loopback_rig(), &make, caps, 9, &config)
        .expect_err("random testing missed lost writes");
    let text = failure.to_string();
    println!("{text}");
    assert_eq!(failure.kind, FailureKind::LostWrite, "{text}");
    assert_eq!(failure.threads.len(), 4, "{text}");
    assert!(failure.ops.len() < failure.original_len / 4, "{text}");
    assert!(text.contains("concurrent, 4 threads"), "{text}");
    assert!(text.contains("not the threads' timing"), "{text}");
    // Operations are named by thread and index, with their invoke/complete ticks.
    assert!(text.contains("=> #"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains(" t") && l.contains(" write ")),
        "{text}"
    );
    // The script parses and fails the same way against the buggy device.
    let script = Script::parse(&failure.script.to_string()).unwrap();
    let err = script.replay(make()).unwrap_err().to_string();
    assert!(err.contains("first difference"), "{err}");
}
