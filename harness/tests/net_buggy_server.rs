//! The client rig checks servers, not only devices: a hand-written NBD server with the bug vblk,
//! BUSE and buse-go share (READ data sent after an error reply) is caught by the conformance
//! suite through [`ExternalRig`] with the defaults; the bug really desynchronises the stream (the
//! next reply a plain reader takes is the junk, not the data); and the same server without the
//! bug passes. `out_of_range_rejected` holds such a server to what the protocol requires, not to
//! what it recommends: qemu-nbd's answers (EINVAL for a write past the end where the protocol says
//! SHOULD ENOSPC, success for a zero-length read, which it leaves unspecified) pass with a note,
//! while a server that cuts a write straddling the end and acknowledges it, or one that drops the
//! connection on a zero-length request, fails.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use userblk::link::net::handshake::{Handshake, Offer, Outcome, TlsMode};
use userblk::link::net::wire::{self, BlockSizes, ExportData, Opt};
use userblk::proto::{Command, Cookie, Errno, Reply, Request, TransmissionFlags, REQUEST_LEN};
use userblk::{BlockDevice, MemDevice};
use userblk_harness::conformance::{self, Outcome as CaseOutcome};
use userblk_harness::net_rig::ExternalRig;

const SIZE: u64 = 64 << 20;

/// How the hand-written server answers requests it should refuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    /// What the protocol asks.
    Correct,
    /// READ data sent after an error reply (vblk, BUSE, buse-go).
    PayloadAfterError,
    /// qemu-nbd's answers: EINVAL for a write past the end, success for a zero-length read.
    QemuLike,
    /// A write reaching past the end is cut to what fits, applied and acknowledged.
    ClampsWrites,
    /// A zero-length request closes the connection.
    DropsOnZeroLength,
}

/// A one-request-at-a-time NBD server over a `Vec`, as small servers are written.
fn serve(mut s: UnixStream, disk: &Mutex<Vec<u8>>, behaviour: Behaviour) {
    let payload_after_error = behaviour == Behaviour::PayloadAfterError;
    let offer = Offer {
        name: String::new(),
        description: String::new(),
        export: ExportData {
            size: SIZE,
            flags: TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_FLUSH,
        },
        block_sizes: BlockSizes {
            minimum: 512,
            preferred: 4096,
            maximum: 32 << 20,
        },
        structured_replies: false,
    };
    let Ok(mut hs) = Handshake::greet(&mut s, &offer, TlsMode::Off) else {
        return;
    };
    if !matches!(hs.options(&mut s), Ok(Outcome::Transmission(_))) {
        return;
    }
    let mut header = [0u8; REQUEST_LEN];
    while s.read_exact(&mut header).is_ok() {
        let Ok(req) = Request::parse(&header) else {
            return;
        };
        // What the protocol asks: EINVAL for a misaligned, empty or oversized request and a
        // READ past the end, ENOSPC for a WRITE past the end.
        let invalid =
            req.offset % 512 != 0 || req.len % 512 != 0 || req.len == 0 || req.len > 32 << 20;
        let bad = invalid || req.exceeds(SIZE);
        let reply = |s: &mut UnixStream, errno: Option<Errno>, data: &[u8]| {
            let r = match errno {
                Some(e) => Reply::error(req.cookie, e),
                None => Reply::ok(req.cookie),
            };
            let _ = s.write_all(&r.encode());
            let _ = s.write_all(data);
        };
        if req.len == 0 && behaviour == Behaviour::DropsOnZeroLength {
            return;
        }
        match req.command {
            Command::Read if req.len == 0 && behaviour == Behaviour::QemuLike => {
                reply(&mut s, None, &[]);
            }
            Command::Read if bad => {
                // The bug: the error reply is followed by the data the request asked for.
                let junk = if payload_after_error {
                    vec![0u8; req.len.min(1 << 20) as usize]
                } else {
                    Vec::new()
                };
                reply(&mut s, Some(Errno::EINVAL), &junk);
            }
            Command::Read => {
                let d = disk.lock().unwrap();
                let (o, l) = (req.offset as usize, req.len as usize);
                let data = d[o..o + l].to_vec();
                drop(d);
                reply(&mut s, None, &data);
            }
            Command::Write => {
                let mut data = vec![0u8; req.len as usize];
                if s.read_exact(&mut data).is_err() {
                    return;
                }
                if bad && !invalid && behaviour == Behaviour::ClampsWrites {
                    // The bug: what fits is written, and the write is acknowledged.
                    let o = req.offset.min(SIZE) as usize;
                    let fits = (SIZE as usize - o).min(data.len());
                    disk.lock().unwrap()[o..o + fits].copy_from_slice(&data[..fits]);
                    reply(&mut s, None, &[]);
                } else if bad {
                    let errno = if invalid || behaviour == Behaviour::QemuLike {
                        Errno::EINVAL
                    } else {
                        Errno::ENOSPC
                    };
                    reply(&mut s, Some(errno), &[]);
                } else {
                    let o = req.offset as usize;
                    disk.lock().unwrap()[o..o + data.len()].copy_from_slice(&data);
                    reply(&mut s, None, &[]);
                }
            }
            Command::Flush => reply(&mut s, None, &[]),
            Command::Disc => return,
            _ => reply(&mut s, Some(Errno::EINVAL), &[]),
        }
    }
}

/// The server on a Unix socket, until dropped.
struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(behaviour: Behaviour) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buggy.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let disk = Arc::new(Mutex::new(vec![0u8; SIZE as usize]));
        let stopping = Arc::clone(&stop);
        let accept = thread::spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let disk = Arc::clone(&disk);
                thread::spawn(move || serve(conn, &disk, behaviour));
            }
        });
        Server {
            path,
            stop,
            accept: Some(accept),
            _dir: dir,
        }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.path.display())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees the flag.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn run_suite(server: &Server) -> conformance::Report {
    let rig = ExternalRig::new(&server.uri()).unwrap();
    let factory = || Box::new(MemDevice::new(SIZE)) as Box<dyn BlockDevice>;
    let caps = userblk::Capabilities::default();
    conformance::run_all(&rig, &factory, caps)
}

#[test]
fn payload_after_an_error_reply_is_caught_with_the_defaults() {
    let buggy = Server::start(Behaviour::PayloadAfterError);
    let report = run_suite(&buggy);
    let case = report.case("out_of_range_rejected").unwrap();
    match &case.outcome {
        CaseOutcome::Fail(why) => assert!(why.contains("protocol violation"), "{why}"),
        other => panic!("the bug went unnoticed: {other:?}\n{report}"),
    }
}

#[test]
fn the_bug_desynchronises_the_stream() {
    let buggy = Server::start(Behaviour::PayloadAfterError);
    let mut s = UnixStream::connect(&buggy.path).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut greeting = [0u8; wire::GREETING_LEN];
    s.read_exact(&mut greeting).unwrap();
    let mut hs = wire::FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    // NBD_OPT_EXPORT_NAME with the empty name: the default export, old style.
    hs.extend(wire::encode_option(Opt::EXPORT_NAME, &[]));
    s.write_all(&hs).unwrap();
    let mut export = [0u8; 8 + 2 + 124];
    s.read_exact(&mut export).unwrap();
    // Write a block, read past the end (refused), then read the block back as a kernel would:
    // a 16-byte header, then the data.
    let mut w = Request::new(Command::Write, Cookie(1), 0, 512)
        .encode()
        .to_vec();
    w.extend([0xab; 512]);
    s.write_all(&w).unwrap();
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(Reply::parse(&h).unwrap().errno(), None);
    s.write_all(&Request::new(Command::Read, Cookie(2), SIZE, 512).encode())
        .unwrap();
    s.read_exact(&mut h).unwrap();
    assert_eq!(Reply::parse(&h).unwrap().errno(), Some(Errno::EINVAL));
    s.write_all(&Request::new(Command::Read, Cookie(3), 0, 512).encode())
        .unwrap();
    s.read_exact(&mut h).unwrap();
    // What should be READ 3's reply header is the junk after READ 2's error: the stream is
    // out of step, and the data written is never seen again on this connection.
    assert!(Reply::parse(&h).is_err(), "{h:02x?}");
}

#[test]
fn the_same_server_without_the_bug_passes() {
    let correct = Server::start(Behaviour::Correct);
    let report = run_suite(&correct);
    assert_eq!(
        report.case("out_of_range_rejected").unwrap().outcome,
        CaseOutcome::Pass,
        "{report}"
    );
    for name in ["read_after_write", "overlapping_writes", "request_sizes"] {
        assert_eq!(
            report.case(name).unwrap().outcome,
            CaseOutcome::Pass,
            "{report}"
        );
    }
}

#[test]
fn qemu_nbds_answers_are_within_the_protocol_and_noted() {
    let qemu_like = Server::start(Behaviour::QemuLike);
    let report = run_suite(&qemu_like);
    let case = report.case("out_of_range_rejected").unwrap();
    assert_eq!(case.outcome, CaseOutcome::Pass, "{report}");
    let note = case
        .notes
        .iter()
        .find(|n| n.contains("not what it recommends"))
        .unwrap_or_else(|| panic!("no note of the departures: {:?}", case.notes));
    assert!(
        note.contains("answered EINVAL (22), where the protocol says SHOULD ENOSPC (28)"),
        "{note}"
    );
}

#[test]
fn a_write_past_the_end_cut_and_acknowledged_fails() {
    let clamps = Server::start(Behaviour::ClampsWrites);
    let report = run_suite(&clamps);
    match &report.case("out_of_range_rejected").unwrap().outcome {
        CaseOutcome::Fail(why) => assert!(
            why.contains(&format!("WRITE at {}, 1024 bytes: succeeded", SIZE - 512)),
            "{why}"
        ),
        other => panic!("the clamped write went unnoticed: {other:?}\n{report}"),
    }
}

#[test]
fn a_connection_dropped_on_a_zero_length_read_fails() {
    let drops = Server::start(Behaviour::DropsOnZeroLength);
    let report = run_suite(&drops);
    match &report.case("out_of_range_rejected").unwrap().outcome {
        CaseOutcome::Fail(why) => assert!(why.contains("READ at 0, 0 bytes: "), "{why}"),
        other => panic!("the dropped connection went unnoticed: {other:?}\n{report}"),
    }
}
