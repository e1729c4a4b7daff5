//! Bugs that live in time: a device whose reads of one range take 30 s (a retry loop against a
//! dead replica, say), and one whose request never returns (a lost completion). With the
//! defaults, the fake kernel's watchdog fails the operation as a stall naming the request, and
//! the test ends instead of hanging: the stuck server thread is abandoned, not joined.

use std::io;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use userblk::{BlockDevice, Capabilities, MemDevice};
use userblk_harness::conformance::{self, Env, Outcome};
use userblk_harness::target::LoopbackRig;

const SIZE: u64 = 8 << 20;
/// The slow range: the last 4 KiB, which `read_after_write` reads back.
const SLOW: std::ops::Range<u64> = SIZE - 4096..SIZE;

#[derive(Clone, Copy)]
enum Delay {
    /// Reads of the range take this long, then succeed.
    For(Duration),
    /// Reads of the range never return.
    Forever,
}

/// A MemDevice whose reads of [`SLOW`] wait.
struct SlowRange {
    mem: MemDevice,
    delay: Delay,
}

impl SlowRange {
    fn new(delay: Delay) -> SlowRange {
        SlowRange {
            mem: MemDevice::new(SIZE),
            delay,
        }
    }
}

impl BlockDevice for SlowRange {
    fn blocks(&self) -> u64 {
        self.mem.blocks()
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            never_blocks: false,
            ..self.mem.capabilities()
        }
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if offset < SLOW.end && offset + buf.len() as u64 > SLOW.start {
            match self.delay {
                Delay::For(d) => thread::sleep(d),
                Delay::Forever => loop {
                    thread::park();
                },
            }
        }
        self.mem.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.mem.write(offset, data)
    }
}

/// The bug is real: a read of the range does not come back within a second.
#[test]
fn the_slow_range_really_stalls_a_reader() {
    for delay in [Delay::For(Duration::from_secs(30)), Delay::Forever] {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let dev = SlowRange::new(delay);
            let mut buf = vec![0u8; 4096];
            let _ = tx.send(dev.read(SLOW.start, &mut buf));
        });
        assert!(
            rx.recv_timeout(Duration::from_secs(1)).is_err(),
            "the read returned at once"
        );
        // The reader thread is left behind, as the harness leaves a stuck server.
    }
}

fn read_after_write_on(delay: Delay) -> Outcome {
    let factory = move || SlowRange::new(delay);
    let rig = LoopbackRig::default();
    let env = Env::new(&rig, &factory, factory().capabilities());
    let case = conformance::cases()
        .into_iter()
        .find(|c| c.name == "read_after_write")
        .expect("the case exists");
    conformance::run_case(&env, &case).outcome
}

fn assert_stall(outcome: Outcome) {
    let Outcome::Fail(why) = outcome else {
        panic!("a 30 s stall passed: {outcome:?}");
    };
    let first = why.lines().next().unwrap_or_default();
    assert!(first.starts_with("stall: "), "{why}");
    let offset: u64 = first
        .split("READ at offset ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no READ offset named: {why}"));
    assert!(SLOW.contains(&offset), "{why}");
    assert!(first.contains("in flight for"), "{why}");
}

#[test]
fn a_30_second_stall_is_caught_by_the_watchdog_with_the_defaults() {
    assert_stall(read_after_write_on(Delay::For(Duration::from_secs(30))));
}

#[test]
fn a_request_that_never_returns_fails_the_case_and_the_test_ends() {
    assert_stall(read_after_write_on(Delay::Forever));
}

#[test]
fn a_slow_but_bounded_range_passes() {
    assert_eq!(
        read_after_write_on(Delay::For(Duration::from_millis(20))),
        Outcome::Pass
    );
}
