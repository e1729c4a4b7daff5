//! How serving an async device ends while its writer is blocked (a client that does not read
//! its replies) and tasks are in flight: DISC, the client vanishing, another connection failing,
//! the runtime shut down. Each must end with no hang (every wait here is bounded: a hang is a
//! clear failure), exactly one reply per request that can still be delivered, and every buffer
//! back in the pool (`serve_async` asserts that in debug builds, which the tests are).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use rstest::rstest;

use crate::async_device::{AsyncBlockDevice, AsyncDevice, IoBuf};
use crate::proto::{encode_request, Command, Cookie, Errno, Reply, Request, REPLY_LEN};
use crate::server::{export_of, serve, Dispatcher, ServerError, ServerOptions};
use crate::Capabilities;

const READ_LEN: u32 = 64 << 10;

/// Reads that take a moment (an await, as a remote disk's), fill their buffer with a byte of
/// their offset, and are counted; a read at `never_at` never completes. With `never_blocks`,
/// every other read is ready at once (the reader polls those itself, and spawns the others).
struct Slow {
    reads: Arc<AtomicU64>,
    never_at: Option<u64>,
    never_blocks: bool,
}

impl AsyncBlockDevice for Slow {
    fn blocks(&self) -> u64 {
        (64 << 20) / 512
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            never_blocks: self.never_blocks,
            ..Capabilities::default()
        }
    }
    async fn read(&self, offset: u64, mut buf: IoBuf) -> (io::Result<()>, IoBuf) {
        if Some(offset) == self.never_at {
            std::future::pending::<()>().await;
        }
        if !self.never_blocks || offset / u64::from(READ_LEN) % 2 == 1 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.reads.fetch_add(1, Ordering::SeqCst);
        buf.fill(fill_byte(offset));
        (Ok(()), buf)
    }
}

fn fill_byte(offset: u64) -> u8 {
    (offset / u64::from(READ_LEN) % 251) as u8 + 1
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Serves `streams` on a thread; the receiver gets serve's result.
fn serve_in_background(
    dev: AsyncDevice<Slow>,
    streams: Vec<UnixStream>,
    max_in_flight_bytes: usize,
) -> mpsc::Receiver<Result<(), ServerError>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let export = export_of(&dev).unwrap();
        let options = ServerOptions {
            max_in_flight_bytes,
            ..ServerOptions::default()
        };
        let _ = tx.send(serve(Dispatcher::new(&dev), &export, &streams, &options));
    });
    rx
}

fn ended(rx: &mpsc::Receiver<Result<(), ServerError>>) -> Result<(), ServerError> {
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(result) => result,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("serving did not end within 20 s"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("serving panicked (output above)"),
    }
}

/// `n` READs of `READ_LEN` at distinct offsets, cookies 0..n.
fn reads(n: u64) -> Vec<u8> {
    let mut b = Vec::new();
    for i in 0..n {
        b.extend(
            Request::new(Command::Read, Cookie(i), i * u64::from(READ_LEN), READ_LEN).encode(),
        );
    }
    b
}

/// The device's read count once it has stopped changing (the server is stuck on the client).
fn settled(reads: &AtomicU64) -> u64 {
    let mut last = reads.load(Ordering::SeqCst);
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        thread::sleep(Duration::from_millis(200));
        let now = reads.load(Ordering::SeqCst);
        if now == last || Instant::now() > until {
            return now;
        }
        last = now;
    }
}

/// Reads `n` replies: (cookie, errno) of each, sorted by cookie, data checked.
fn replies(client: &mut UnixStream, n: u64) -> Vec<(u64, Option<Errno>)> {
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..n {
        let mut header = [0u8; REPLY_LEN];
        client.read_exact(&mut header).unwrap();
        let reply = Reply::parse(&header).unwrap();
        if reply.errno().is_none() {
            let mut data = vec![0u8; READ_LEN as usize];
            client.read_exact(&mut data).unwrap();
            let want = fill_byte(reply.cookie.0 * u64::from(READ_LEN));
            assert!(data.iter().all(|&b| b == want), "reply {}", reply.cookie.0);
        }
        got.push((reply.cookie.0, reply.errno()));
    }
    got.sort_unstable_by_key(|r| r.0);
    got
}

/// DISC (unless sent already), then nothing more comes: the server closes.
fn disc_and_eof(client: &mut UnixStream, disc_sent: bool) {
    if !disc_sent {
        client
            .write_all(&Request::new(Command::Disc, Cookie(u64::MAX), 0, 0).encode())
            .unwrap();
    }
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{} bytes after the last reply", rest.len());
}

/// The client sends READs (32 that fit in its budget with DISC behind them, or 64 that do not,
/// so the reader waits for memory) and reads nothing: the writer blocks on the full socket.
/// Then the client either reads everything (DISC: every request gets exactly one reply, then
/// EOF) or vanishes (serving ends, every buffer back).
/// For a device that never blocks, the reader writes the replies of the futures it found
/// ready itself, and blocks on the socket in its turn.
#[rstest]
#[case::disc_then_read(32, 4 << 20, true, true)]
#[case::disc_then_vanish(32, 4 << 20, true, false)]
#[case::reader_waiting_for_memory_then_vanish(64, 1 << 20, false, false)]
#[case::reader_waiting_for_memory_then_read(64, 1 << 20, false, true)]
fn a_blocked_writer_ends_with_the_client(
    #[case] n: u64,
    #[case] budget: usize,
    #[case] disc: bool,
    #[case] read_back: bool,
    #[values(false, true)] never_blocks: bool,
) {
    let rt = runtime();
    let count = Arc::new(AtomicU64::new(0));
    let slow = Slow {
        reads: Arc::clone(&count),
        never_at: None,
        never_blocks,
    };
    let dev = AsyncDevice::with_runtime(slow, rt.handle().clone());
    let (mut client, server_end) = UnixStream::pair().unwrap();
    let done = serve_in_background(dev, vec![server_end], budget);
    let mut requests = reads(n);
    if disc {
        requests.extend(Request::new(Command::Disc, Cookie(n), 0, 0).encode());
    }
    client.write_all(&requests).unwrap();
    let served = settled(&count);
    if disc {
        assert_eq!(served, n, "the budget holds every request");
    } else {
        assert!(
            served < n,
            "{served} of {n} READs served past the byte budget"
        );
    }
    // The replies are not all in the socket: serving waits for the client.
    assert!(
        done.recv_timeout(Duration::from_millis(300)).is_err(),
        "serving ended before its replies were written"
    );
    if read_back {
        let want: Vec<_> = (0..n).map(|c| (c, None)).collect();
        assert_eq!(replies(&mut client, n), want);
        disc_and_eof(&mut client, disc);
        ended(&done).unwrap();
    } else {
        drop(client);
        // Whatever the server says about the broken stream, it ends, and gives every buffer
        // back (the debug assertion at the end of serve_async).
        let _ = ended(&done);
    }
}

/// A corrupt stream on one connection ends serving even while another connection's writer is
/// blocked on a client that reads nothing (and keeps its socket open) with tasks in flight.
#[test]
fn another_connection_failing_ends_a_blocked_writer() {
    let rt = runtime();
    let count = Arc::new(AtomicU64::new(0));
    let slow = Slow {
        reads: Arc::clone(&count),
        never_at: None,
        never_blocks: false,
    };
    let dev = AsyncDevice::with_runtime(slow, rt.handle().clone());
    let (mut hog, hog_end) = UnixStream::pair().unwrap();
    let (mut bad, bad_end) = UnixStream::pair().unwrap();
    let done = serve_in_background(dev, vec![hog_end, bad_end], 1 << 20);
    hog.write_all(&reads(64)).unwrap();
    assert!(settled(&count) < 64);
    // A request header with a wrong magic: the stream is out of sync.
    bad.write_all(&encode_request(0xdead_beef, 0, Cookie(1), 0, 512))
        .unwrap();
    let result = ended(&done);
    assert!(
        matches!(result, Err(ServerError::Protocol { conn: 1, .. })),
        "{result:?}"
    );
    drop(hog);
}

/// The runtime shut down under requests whose futures never complete: each of them is answered
/// EIO (its task dropped its `InFlight`), the others as usual, and DISC ends serving.
#[test]
fn a_runtime_shut_down_answers_its_tasks_eio() {
    let rt = runtime();
    let count = Arc::new(AtomicU64::new(0));
    let slow = Slow {
        reads: Arc::clone(&count),
        never_at: Some(0),
        never_blocks: false,
    };
    let dev = AsyncDevice::with_runtime(slow, rt.handle().clone());
    let (mut client, server_end) = UnixStream::pair().unwrap();
    let done = serve_in_background(dev, vec![server_end], 4 << 20);
    client.write_all(&reads(4)).unwrap();
    assert_eq!(settled(&count), 3);
    rt.shutdown_background();
    client
        .write_all(&Request::new(Command::Disc, Cookie(9), 0, 0).encode())
        .unwrap();
    assert_eq!(
        replies(&mut client, 4),
        vec![(0, Some(Errno::EIO)), (1, None), (2, None), (3, None)]
    );
    disc_and_eof(&mut client, true);
    ended(&done).unwrap();
}
