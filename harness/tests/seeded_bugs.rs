//! Seeded driver bugs, each caught by the check named: the harness must fail on each of these
//! devices, with a message that says what is wrong. (If a check stops catching its bug, the
//! test here fails.)

use std::io;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use userblk::link::loopback::LoopbackLink;
use userblk::proto::{Command, Errno, Reply, Request, REQUEST_LEN};
use userblk::server::export_of;
use userblk::{BlockDevice, Capabilities, KernelLink, LoopbackKernel, LoopbackOptions, MemDevice};
use userblk_harness::conformance::{self, Env, Outcome};
use userblk_harness::random::{random_run_with, Mode, RandomConfig};
use userblk_harness::script::Script;
use userblk_harness::target::LoopbackRig;

const SIZE: u64 = 8 << 20;

#[path = "seeded_bugs/durability.rs"]
mod durability;
#[path = "seeded_bugs/offsets.rs"]
mod offsets;
#[path = "seeded_bugs/races.rs"]
mod races;
#[path = "seeded_bugs/short_reads.rs"]
mod short_reads;
#[path = "seeded_bugs/time.rs"]
mod time;

/// A MemDevice with one method replaced.
struct Buggy {
    mem: MemDevice,
    bug: Bug,
    writes: AtomicU64,
}

#[derive(Clone, Copy)]
enum Bug {
    /// Writes touching the middle block are acknowledged and dropped.
    LostMiddleWrite,
    /// Every 5th write is acknowledged and dropped.
    LostEveryFifthWrite,
    /// The bounds check rejects a request ending exactly at the end (`>=` for `>`).
    OffByOneAtEnd,
    /// Trim does nothing, though the capabilities promise zeroes after it.
    StaleTrim,
}

fn buggy(bug: Bug) -> Box<dyn BlockDevice> {
    Box::new(Buggy {
        mem: MemDevice::new(SIZE),
        bug,
        writes: AtomicU64::new(0),
    })
}

impl BlockDevice for Buggy {
    fn blocks(&self) -> u64 {
        self.mem.blocks()
    }
    fn capabilities(&self) -> Capabilities {
        self.mem.capabilities()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if let Bug::OffByOneAtEnd = self.bug {
            if offset + buf.len() as u64 >= SIZE {
                return Err(io::Error::from_raw_os_error(22));
            }
        }
        self.mem.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst);
        let end = offset + data.len() as u64;
        match self.bug {
            Bug::LostMiddleWrite if offset <= SIZE / 2 && end > SIZE / 2 => Ok(()),
            Bug::LostEveryFifthWrite if n % 5 == 4 => Ok(()),
            Bug::OffByOneAtEnd if end >= SIZE => Err(io::Error::from_raw_os_error(22)),
            _ => self.mem.write(offset, data),
        }
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.bug {
            Bug::StaleTrim => Ok(()),
            _ => self.mem.trim(offset, len),
        }
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.mem.write_zeroes(offset, len, may_trim)
    }
}

/// Runs the suite on the buggy device and returns the named case's failure message.
fn failure_of(bug: Bug, case: &str) -> String {
    let rig = LoopbackRig::default();
    let factory = move || buggy(bug);
    let env = Env::new(&rig, &factory, factory().capabilities());
    let report = conformance::run_cases(&env, &conformance::cases(), &mut |_, _| {});
    match &report.case(case).expect("no such case").outcome {
        Outcome::Fail(m) => m.clone(),
        other => panic!("{case} did not catch the bug: {other:?}\n{report}"),
    }
}

#[test]
fn lost_write_is_caught_by_read_after_write() {
    let msg = failure_of(Bug::LostMiddleWrite, "read_after_write");
    assert!(msg.contains("middle block"), "{msg}");
    assert!(msg.contains("first difference at byte"), "{msg}");
}

#[test]
fn lost_write_is_caught_by_random_testing_and_shrunk_to_a_script_that_fails() {
    let rig = LoopbackRig::default();
    let factory = || buggy(Bug::LostEveryFifthWrite);
    let caps = factory().capabilities();
    // Sequential, and shrinking bounded by re-runs only (its default 4 s budget can run out
    // first on a loaded machine, leaving a longer script).
    let cfg = RandomConfig {
        ops: 100,
        mode: Mode::Sequential,
        shrink_time: Duration::from_secs(600),
        ..RandomConfig::default()
    };
    let failure = random_run_with(&rig, &factory, caps, 7, &cfg)
        .map(|_| ())
        .expect_err("random testing missed a lost write");
    let text = failure.to_string();
    println!("{text}");
    assert!(
        text.contains("does not hold what the model expects"),
        "{text}"
    );
    // Shrunk to a handful of operations: five writes (the fifth lost) and a read.
    assert!(failure.ops.len() <= 8, "{text}");
    // The printed script parses and fails the same way against the buggy device...
    let script = Script::parse(&failure.script.to_string()).unwrap();
    let err = script.replay(buggy(Bug::LostEveryFifthWrite)).unwrap_err();
    assert!(err.to_string().contains("first difference"), "{err}");
    // ...and passes against a correct one: it is a regression test.
    script.replay(MemDevice::new(SIZE)).unwrap();
}

#[test]
fn off_by_one_at_the_last_block_is_caught_by_read_after_write() {
    let msg = failure_of(Bug::OffByOneAtEnd, "read_after_write");
    assert!(msg.contains("last block"), "{msg}");
    assert!(msg.contains("EINVAL"), "{msg}");
}

#[test]
fn stale_data_after_trim_is_caught_by_trim_check() {
    let msg = failure_of(Bug::StaleTrim, "trim_reads_back_as_promised");
    assert!(msg.contains("stale data after trim"), "{msg}");
    assert!(msg.contains("trim_zeroes"), "{msg}");
}

/// A server that answers every READ with an EIO error reply followed by the data anyway, as
/// vblk, BUSE and buse-go do.
fn payload_after_error(
    mut link: LoopbackLink,
    export: userblk::Export,
) -> Result<(), userblk::ServerError> {
    let mut socks = link.start(&export)?.conns;
    let mut s = socks.remove(0);
    let mut header = [0u8; REQUEST_LEN];
    while s.read_exact(&mut header).is_ok() {
        let Ok(req) = Request::parse(&header) else {
            break;
        };
        match req.command {
            Command::Disc => break,
            Command::Write => {
                let mut payload = vec![0u8; req.len as usize];
                let _ = s.read_exact(&mut payload);
                let _ = s.write_all(&Reply::ok(req.cookie).encode());
            }
            Command::Read => {
                let _ = s.write_all(&Reply::error(req.cookie, Errno::EIO).encode());
                let _ = s.write_all(&vec![0xee; req.len as usize]);
            }
            _ => {
                let _ = s.write_all(&Reply::ok(req.cookie).encode());
            }
        }
    }
    Ok(())
}

#[test]
fn data_returned_with_an_error_is_caught_by_the_loopback_reply_checks() {
    let export = export_of(&MemDevice::new(SIZE)).unwrap();
    let kernel = LoopbackKernel::with_server(export, LoopbackOptions::default(), move |link| {
        payload_after_error(link, export)
    })
    .unwrap();
    // The error itself arrives; the payload behind it is read as the next reply header.
    let first = kernel.read(4096, 512).unwrap_err();
    assert_eq!(first.errno(), Some(5), "{first}");
    let err = kernel.shutdown().unwrap_err().to_string();
    assert!(err.contains("protocol violation"), "{err}");
    assert!(
        err.contains("follows the error reply EIO (5) to READ"),
        "{err}"
    );
}

#[test]
fn data_returned_with_an_error_is_caught_by_a_script_on_a_raw_socket() {
    let export = export_of(&MemDevice::new(SIZE)).unwrap();
    let (link, mut ends) = LoopbackLink::new(1).unwrap();
    let server = std::thread::spawn(move || payload_after_error(link, export));
    let script = Script::parse("write 0 512 fill:1\nread 0 512 => EIO\n").unwrap();
    let err = script
        .replay_socket(ends.remove(0), SIZE)
        .unwrap_err()
        .to_string();
    assert!(err.contains("step 2 (line 2)"), "{err}");
    assert!(
        err.contains("follow the error reply EIO (5) to READ"),
        "{err}"
    );
    server.join().unwrap().unwrap();
}
