//! Time in the fake kernel: the kernel's request timeout with one connection and with two
//! (including a timed-out write landing after a later one, and a stale reply refused), the
//! stall watchdog, a device that never returns, per-command latency, and seeded jitter.
//!
//! No assertion here is on how long anything took: the limits are short so that the tests are
//! quick, and every wait in a device is either released by the test or far longer than them.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use userblk::link::loopback::{Jitter, KernelProfile, LoopbackLink, Op};
use userblk::proto::{Command, Cookie, Reply, Request, REQUEST_LEN};
use userblk::server::export_of;
use userblk::{
    BlockDevice, Capabilities, KernelLink, LoopbackError, LoopbackKernel, LoopbackOptions,
    MemDevice, ServerError, ServerOptions,
};

/// The kernel timeout and the stall limit in these tests: short, yet long enough that a
/// request that is not held back never reaches it on a loaded machine.
const LIMIT: Duration = Duration::from_secs(1);

/// A MemDevice whose first call at `offset` (a read or a write, per `writes`) waits until the
/// test opens the gate; later calls go through.
struct FirstCallWaits {
    mem: MemDevice,
    offset: u64,
    writes: bool,
    calls: AtomicUsize,
    open: Mutex<bool>,
    changed: Condvar,
    /// The held call has returned.
    released: AtomicBool,
}

impl FirstCallWaits {
    fn new(offset: u64, writes: bool) -> Arc<FirstCallWaits> {
        Arc::new(FirstCallWaits {
            mem: MemDevice::new(4 << 20),
            offset,
            writes,
            calls: AtomicUsize::new(0),
            open: Mutex::new(false),
            changed: Condvar::new(),
            released: AtomicBool::new(false),
        })
    }

    fn hold(&self, offset: u64, write: bool) -> bool {
        if offset != self.offset || write != self.writes {
            return false;
        }
        if self.calls.fetch_add(1, Ordering::SeqCst) != 0 {
            return false;
        }
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.changed.wait(open).unwrap();
        }
        true
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.changed.notify_all();
    }

    fn wait_released(&self) {
        let mut open = self.open.lock().unwrap();
        while !self.released.load(Ordering::SeqCst) {
            open = self.changed.wait(open).unwrap();
        }
    }

    fn done(&self) {
        let _guard = self.open.lock().unwrap();
        self.released.store(true, Ordering::SeqCst);
        self.changed.notify_all();
    }
}

impl BlockDevice for FirstCallWaits {
    fn blocks(&self) -> u64 {
        self.mem.blocks()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let held = self.hold(offset, false);
        let r = self.mem.read(offset, buf);
        if held {
            self.done();
        }
        r
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let held = self.hold(offset, true);
        let r = self.mem.write(offset, data);
        if held {
            self.done();
        }
        r
    }
}

fn with_timeout(connections: usize) -> LoopbackOptions {
    LoopbackOptions {
        connections,
        timeout: Some(LIMIT),
        ..LoopbackOptions::default()
    }
}

#[test]
fn one_connection_a_timed_out_request_fails_with_eio_and_the_device_goes_dead() {
    let dev = FirstCallWaits::new(8192, false);
    let k = LoopbackKernel::with_options(Arc::clone(&dev), with_timeout(1)).unwrap();
    k.write(0, &[7; 4096]).unwrap();
    let err = k.read(8192, 4096).unwrap_err();
    assert!(
        matches!(
            err,
            LoopbackError::TimedOut {
                command: Command::Read,
                offset: 8192,
                len: 4096,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.errno(), Some(5));
    assert!(err.to_string().contains("no connection left"), "{err}");
    // The only socket was shut down: every later operation fails, as after sock_shutdown.
    let later = k.read(0, 4096).unwrap_err();
    assert!(
        matches!(later, LoopbackError::ShutDown { conn: 0, .. }),
        "{later}"
    );
    assert_eq!(later.errno(), Some(5));
    assert!(later.to_string().contains("timed out"), "{later}");
    let stats = k.stats();
    assert_eq!((stats.timeouts, stats.requeued), (1, 0));
    dev.open();
    // The server sees the connection closed; its late reply goes nowhere.
    k.shutdown().unwrap();
}

#[test]
fn two_connections_a_timed_out_write_is_sent_again_and_the_first_sending_can_land_later() {
    let dev = FirstCallWaits::new(8192, true);
    let k = LoopbackKernel::with_options(Arc::clone(&dev), with_timeout(2)).unwrap();
    let a = vec![0xaa; 4096];
    let b = vec![0xbb; 4096];
    // Held in the device on connection 0; after the timeout it goes again on connection 1 and
    // completes there.
    k.write(8192, &a).unwrap();
    let stats = k.stats();
    assert_eq!((stats.timeouts, stats.requeued), (1, 1), "{stats:?}");
    // A later write to the same place completes, and reads back.
    k.write(8192, &b).unwrap();
    assert_eq!(k.read(8192, 4096).unwrap(), b);
    // Now the first sending of the timed-out write reaches the device: it overwrites the
    // later write. The kernel has long completed both; nothing tells it.
    dev.open();
    dev.wait_released();
    assert_eq!(
        k.read(8192, 4096).unwrap(),
        a,
        "the stale write landed after the later one"
    );
    assert!(k.violations().is_empty());
    k.shutdown().unwrap();
}

/// What the scripted server does on connection 1 with a request sent there again.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Reply with the cookie it came with.
    Current,
    /// Reply with the cookie of its first sending (on connection 0).
    Stale,
}

fn read_request(s: &mut UnixStream) -> Option<Request> {
    let mut header = [0u8; REQUEST_LEN];
    s.read_exact(&mut header).ok()?;
    Request::parse(&header).ok()
}

/// Connection 0 takes requests and never answers; connection 1 answers as `answer` says.
/// Returns the requests each connection got.
fn scripted(
    mut link: LoopbackLink,
    answer: Answer,
    seen: Arc<Mutex<[Vec<Request>; 2]>>,
) -> Result<(), ServerError> {
    let export = export_of(&MemDevice::new(1 << 20))?;
    let mut socks = link.start(&export)?.conns;
    let mut s1 = socks
        .pop()
        .ok_or(ServerError::InvalidGeometry("two sockets".into()))?;
    let mut s0 = socks
        .pop()
        .ok_or(ServerError::InvalidGeometry("two sockets".into()))?;
    let seen0 = Arc::clone(&seen);
    let silent = thread::spawn(move || {
        while let Some(req) = read_request(&mut s0) {
            seen0.lock().unwrap()[0].push(req);
        }
    });
    while let Some(req) = read_request(&mut s1) {
        if req.command == Command::Disc {
            break;
        }
        let first: Option<Cookie> = seen.lock().unwrap()[0].first().map(|r| r.cookie);
        seen.lock().unwrap()[1].push(req);
        let cookie = match (answer, first) {
            (Answer::Stale, Some(c)) => c,
            _ => req.cookie,
        };
        let _ = s1.write_all(&Reply::ok(cookie).encode());
        let _ = s1.write_all(&vec![0; req.len as usize]);
    }
    let _ = silent.join();
    Ok(())
}

fn scripted_kernel(answer: Answer) -> (LoopbackKernel, Arc<Mutex<[Vec<Request>; 2]>>) {
    let export = export_of(&MemDevice::new(1 << 20)).unwrap();
    let seen = Arc::new(Mutex::new([Vec::new(), Vec::new()]));
    let s = Arc::clone(&seen);
    let k = LoopbackKernel::with_server(export, with_timeout(2), move |l| scripted(l, answer, s))
        .unwrap();
    (k, seen)
}

#[test]
fn a_request_sent_again_keeps_its_queue_and_tag_with_the_next_cmd_cookie() {
    let (k, seen) = scripted_kernel(Answer::Current);
    assert_eq!(k.read(4096, 512).unwrap(), vec![0; 512]);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[0].len(), 1);
    assert_eq!(seen[1].len(), 1);
    let (first, again) = (seen[0][0], seen[1][0]);
    assert_eq!(
        (again.command, again.offset, again.len),
        (Command::Read, 4096, 512)
    );
    // 6.12: big-endian cmd_cookie << 32 | hwq << 16 | tag; hardware queue 0 and tag 0 both
    // times, though it went out on connection 1 the second time.
    assert_eq!(first.cookie, Cookie(1 << 32));
    assert_eq!(again.cookie, Cookie(2 << 32));
    assert!(k.violations().is_empty());
    k.shutdown().unwrap();
}

#[test]
fn a_reply_to_the_first_sending_is_refused_as_stale() {
    let (k, _seen) = scripted_kernel(Answer::Stale);
    // Connection 1 answers with the old cookie: the kernel drops it too, and with no
    // connection left the request times out for good.
    let err = k.read(4096, 512).unwrap_err();
    assert!(matches!(err, LoopbackError::TimedOut { .. }), "{err}");
    let v = k.violations();
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].conn, 1);
    assert!(v[0].what.contains("stale cookie"), "{}", v[0]);
    let err = k.shutdown().unwrap_err();
    assert!(matches!(err, LoopbackError::Violation(_)), "{err}");
}

#[test]
fn without_a_timeout_a_slow_request_is_waited_for() {
    let dev = FirstCallWaits::new(0, false);
    let k = LoopbackKernel::start(Arc::clone(&dev)).unwrap();
    let d = Arc::clone(&dev);
    let opener = thread::spawn(move || {
        // Opened a while after the request is held in the device.
        while d.calls.load(Ordering::SeqCst) == 0 {
            thread::sleep(Duration::from_millis(1));
        }
        thread::sleep(Duration::from_millis(300));
        d.open();
    });
    assert_eq!(k.read(0, 4096).unwrap(), vec![0; 4096]);
    opener.join().unwrap();
    assert_eq!(k.stats().timeouts, 0);
    k.shutdown().unwrap();
}

/// Reads of `range` sleep for `stall` (or for ever when `None`); everything else is a RAM
/// disk.
struct Stalls {
    mem: MemDevice,
    at: u64,
    stall: Option<Duration>,
}

impl BlockDevice for Stalls {
    fn blocks(&self) -> u64 {
        self.mem.blocks()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if offset == self.at {
            match self.stall {
                Some(d) => thread::sleep(d),
                None => loop {
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

fn watched(stall: Option<Duration>, at: u64) -> LoopbackKernel {
    let dev = Stalls {
        mem: MemDevice::new(4 << 20),
        at,
        stall,
    };
    let options = LoopbackOptions {
        stall_limit: Some(LIMIT),
        ..LoopbackOptions::default()
    };
    LoopbackKernel::with_options(dev, options).unwrap()
}

#[test]
fn a_30_s_stall_is_caught_by_the_watchdog() {
    let k = watched(Some(Duration::from_secs(30)), 0);
    let err = k.read(0, 4096).unwrap_err();
    let LoopbackError::Stalled {
        command,
        offset,
        len,
        in_flight,
        limit,
    } = err
    else {
        panic!("expected a stall, got {err}")
    };
    assert_eq!(
        (command, offset, len, limit),
        (Command::Read, 0, 4096, LIMIT)
    );
    assert!(in_flight >= limit);
    let text = err.to_string();
    assert!(
        text.starts_with("stall: READ at offset 0, 4096 bytes, in flight for "),
        "{text}"
    );
    assert!(text.ends_with("(limit 1 s)"), "{text}");
    // The connection is fine: other requests go through meanwhile.
    assert_eq!(k.read(4096, 4096).unwrap(), vec![0; 4096]);
    assert_eq!(k.stats().stalls, 1);
    // The server cannot finish the stalled read: shutdown gives up on it and says so.
    let err = k.shutdown().unwrap_err();
    let LoopbackError::Stuck { requests, .. } = &err else {
        panic!("expected Stuck, got {err}")
    };
    assert_eq!(requests.len(), 1);
    assert_eq!(
        (requests[0].command, requests[0].offset),
        (Command::Read, 0)
    );
    assert!(
        err.to_string().contains("READ at offset 0, 4096 bytes"),
        "{err}"
    );
}

#[test]
fn a_read_that_never_returns_fails_instead_of_hanging() {
    let k = watched(None, 1 << 20);
    let err = k.read(1 << 20, 8192).unwrap_err();
    assert!(
        matches!(
            err,
            LoopbackError::Stalled {
                offset: 0x10_0000,
                len: 8192,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(io::Error::from(err).kind(), io::ErrorKind::TimedOut);
    // Dropping the kernel returns too (DISC, a grace period, then the server is abandoned).
    drop(k);
    let k = watched(None, 0);
    assert!(k.read(0, 512).is_err());
    let err = k.shutdown().unwrap_err();
    assert!(
        err.to_string().contains("READ at offset 0, 512 bytes"),
        "{err}"
    );
}

#[test]
fn a_submitter_waiting_for_a_tag_gives_up_too() {
    let dev = Stalls {
        mem: MemDevice::new(4 << 20),
        at: 0,
        stall: None,
    };
    let options = LoopbackOptions {
        queue_depth: 1,
        stall_limit: Some(LIMIT),
        ..LoopbackOptions::default()
    };
    let k = LoopbackKernel::with_options(dev, options).unwrap();
    let stuck = k.submit(Op::read(0, 512)).unwrap();
    // The only tag is held by the stuck read: the next submit waits for it, then names it.
    let err = k.submit(Op::read(4096, 512)).unwrap_err();
    assert!(
        matches!(
            err,
            LoopbackError::Stalled {
                offset: 0,
                len: 512,
                ..
            }
        ),
        "{err}"
    );
    assert!(matches!(k.wait(stuck), Err(LoopbackError::Stalled { .. })));
    assert!(matches!(k.shutdown(), Err(LoopbackError::Stuck { .. })));
}

#[test]
fn latency_is_recorded_per_command() {
    let dev = Stalls {
        mem: MemDevice::new(4 << 20),
        at: 65536,
        stall: Some(Duration::from_millis(50)),
    };
    let k = LoopbackKernel::start(dev).unwrap();
    for i in 0..20u64 {
        k.write(i * 4096, &[i as u8; 4096]).unwrap();
        k.read(i * 4096, 4096).unwrap();
    }
    k.flush().unwrap();
    let report = k.latency();
    let read = report.get(Command::Read).unwrap();
    assert_eq!(read.count, 20);
    assert!(read.p50 <= read.p99 && read.p99 <= read.max, "{read:?}");
    // The read at 64 KiB slept 50 ms in the device: no request can be faster than its device call.
    assert!(read.max >= Duration::from_millis(50), "{read:?}");
    assert_eq!(report.get(Command::Write).unwrap().count, 20);
    assert_eq!(report.get(Command::Flush).unwrap().count, 1);
    assert!(report.get(Command::Trim).is_none());
    let table = report.to_string();
    assert!(table.contains("READ") && table.contains("p99"), "{table}");
    k.shutdown().unwrap();
}

/// Logs the offset of every read, in the order the device gets them (served inline: the order
/// on the wire).
struct Order {
    mem: MemDevice,
    log: Mutex<Vec<u64>>,
}

impl BlockDevice for Order {
    fn blocks(&self) -> u64 {
        self.mem.blocks()
    }
    fn capabilities(&self) -> Capabilities {
        self.mem.capabilities()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.log.lock().unwrap().push(offset);
        self.mem.read(offset, buf)
    }
}

fn dispatch_order(jitter: Option<Jitter>) -> Vec<u64> {
    let dev = Arc::new(Order {
        mem: MemDevice::new(4 << 20),
        log: Mutex::new(Vec::new()),
    });
    let options = LoopbackOptions {
        profile: KernelProfile::linux_6_1(),
        jitter,
        // One serving thread, so the device sees requests in the order they were sent.
        server: ServerOptions {
            workers: 1,
            batch_never_blocks: false,
            ..ServerOptions::default()
        },
        ..LoopbackOptions::default()
    };
    let k = LoopbackKernel::with_options(Arc::clone(&dev), options).unwrap();
    // 16 requests of 128 KiB, twice.
    k.read(0, 2 << 20).unwrap();
    k.read(2 << 20, 2 << 20).unwrap();
    k.shutdown().unwrap();
    let log = dev.log.lock().unwrap().clone();
    log
}

#[test]
fn the_same_seed_gives_the_same_dispatch_order() {
    let jitter = |seed| Jitter {
        seed,
        max_delay: Duration::from_micros(100),
        percent: 50,
    };
    let in_order: Vec<u64> = (0..32).map(|i| i * (128 << 10)).collect();
    assert_eq!(dispatch_order(None), in_order);
    let a = dispatch_order(Some(jitter(7)));
    assert_eq!(a, dispatch_order(Some(jitter(7))));
    assert_ne!(a, in_order);
    assert_ne!(a, dispatch_order(Some(jitter(8))));
    let mut sorted = a.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, in_order, "every request still sent once");
}
