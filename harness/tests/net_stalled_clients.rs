//! Network clients that send requests and never read a reply, against userblk's network server:
//! their replies fill the socket, and the server's write to them blocks. That must stall only
//! their own connections. For an async device it must not take the tokio runtime's workers
//! with it (a worker blocked writing a reply runs no other task: with as many stalled clients
//! as workers, every other client, and every other device on that runtime, would wait forever);
//! for a sync device each client has threads of its own. Each stalled client's memory stays
//! within its budget: the server stops reading its requests once its replies are not taken.
//! Every wait is bounded: a stall is a clear failure, not a hang.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use userblk::async_device::{AsyncBlockDevice, AsyncDevice, IoBuf};
use userblk::link::net::{wire, ListenAddr, Listening, NetOptions};
use userblk::proto::{Command, Cookie, Request};
use userblk::{BlockDevice, ServerOptions};
use userblk_harness::net_rig::{ClientOptions, NbdAddr, NbdClient, NbdUri};

const SIZE: usize = 8 << 20;
/// The stalled clients read the upper half, the good one works in the lower.
const HOG_AREA: u64 = SIZE as u64 / 2;
const HOG_READ: u32 = 256 << 10;
const HOG_READS: u64 = 256;
/// Each client's budget of memory in flight.
const BUDGET: usize = 1 << 20;

/// RAM with an await in every call (as a remote disk has), counting the READs of the stalled
/// clients' area.
struct Ram {
    data: Mutex<Vec<u8>>,
    hog_reads: Arc<AtomicU64>,
}

impl Ram {
    fn new(hog_reads: Arc<AtomicU64>) -> Ram {
        Ram {
            data: Mutex::new(vec![0; SIZE]),
            hog_reads,
        }
    }

    fn read_now(&self, offset: u64, buf: &mut [u8]) {
        if offset >= HOG_AREA {
            self.hog_reads.fetch_add(1, Ordering::SeqCst);
        }
        let o = offset as usize;
        buf.copy_from_slice(&self.data.lock().unwrap()[o..o + buf.len()]);
    }

    fn write_now(&self, offset: u64, data: &[u8]) {
        let o = offset as usize;
        self.data.lock().unwrap()[o..o + data.len()].copy_from_slice(data);
    }
}

impl AsyncBlockDevice for Ram {
    fn blocks(&self) -> u64 {
        SIZE as u64 / 512
    }
    async fn read(&self, offset: u64, mut buf: IoBuf) -> (io::Result<()>, IoBuf) {
        tokio::time::sleep(Duration::from_micros(100)).await;
        self.read_now(offset, &mut buf);
        (Ok(()), buf)
    }
    async fn write(&self, offset: u64, data: IoBuf) -> (io::Result<()>, IoBuf) {
        tokio::time::sleep(Duration::from_micros(100)).await;
        self.write_now(offset, &data);
        (Ok(()), data)
    }
}

/// The same RAM behind the sync trait, saying whether it never blocks.
struct SyncRam(Ram, bool);

impl BlockDevice for SyncRam {
    fn blocks(&self) -> u64 {
        SIZE as u64 / 512
    }
    fn capabilities(&self) -> userblk::Capabilities {
        userblk::Capabilities {
            never_blocks: self.1,
            ..userblk::Capabilities::default()
        }
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_now(offset, buf);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write_now(offset, data);
        Ok(())
    }
}

fn listen(device: impl BlockDevice + 'static) -> (Listening, NbdUri) {
    let server = ServerOptions {
        max_in_flight_bytes: BUDGET,
        ..ServerOptions::default()
    };
    let options = NetOptions::new()
        .on_event(|_| {})
        .server_options(server)
        .max_clients(64);
    let addr = ListenAddr::Tcp(([127, 0, 0, 1], 0).into());
    let listening = options.spawn(device, &addr).unwrap();
    let ListenAddr::Tcp(a) = listening.local_addr().clone() else {
        unreachable!()
    };
    let uri = NbdUri {
        addr: NbdAddr::Tcp {
            host: a.ip().to_string(),
            port: a.port(),
        },
        export: String::new(),
        tls: false,
        tls_certificates: None,
    };
    (listening, uri)
}

/// A client that shakes hands, pipelines 64 MiB of READs and never reads a byte back.
fn stalled_client(uri: &NbdUri) -> TcpStream {
    let NbdAddr::Tcp { host, port } = &uri.addr else {
        unreachable!()
    };
    let mut s = TcpStream::connect((host.as_str(), *port)).unwrap();
    let mut hello = wire::FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    let go = wire::InfoRequest {
        name: String::new(),
        requests: vec![],
    };
    hello.extend(wire::encode_option(wire::Opt::GO, &go.encode()));
    s.write_all(&hello).unwrap();
    // The server's greeting and GO replies are read, so the transmission phase has begun.
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut greeting = [0u8; wire::GREETING_LEN];
    s.read_exact(&mut greeting).unwrap();
    let mut reads = Vec::new();
    for i in 0..HOG_READS {
        let offset = HOG_AREA + i % 16 * u64::from(HOG_READ);
        reads.extend(Request::new(Command::Read, Cookie(i), offset, HOG_READ).encode());
    }
    // The server stops reading once this client's budget is spent: the rest of the requests
    // stay in the socket buffers, so writing them must not wait for the server.
    s.set_nonblocking(true).unwrap();
    let mut sent = 0;
    let until = Instant::now() + Duration::from_secs(5);
    while sent < reads.len() && Instant::now() < until {
        match s.write(&reads[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("sending the stalled client's requests: {e}"),
        }
    }
    s
}

/// How many of the stalled clients' READs the device has served, once that stops changing.
fn settled(hog_reads: &AtomicU64) -> u64 {
    let mut last = hog_reads.load(Ordering::SeqCst);
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = hog_reads.load(Ordering::SeqCst);
        if now == last || Instant::now() > until {
            return now;
        }
        last = now;
    }
}

/// `stalled` clients that never read, then one that does, on one server: the good client
/// must get every reply (within 20 s each), and the stalled clients' READs must stop short.
fn good_client_is_served_beside_stalled_ones(
    listening: Listening,
    uri: &NbdUri,
    hog_reads: &AtomicU64,
    stalled: usize,
) {
    let hogs: Vec<TcpStream> = (0..stalled).map(|_| stalled_client(uri)).collect();
    let served = settled(hog_reads);
    let options = ClientOptions {
        timeout: Duration::from_secs(20),
        ..ClientOptions::for_uri(uri).unwrap()
    };
    let checked = NbdClient::connect_with(uri, &options)
        .map_err(|e| e.to_string())
        .and_then(|good| {
            for round in 0..32u64 {
                let data = vec![(round % 251) as u8 + 1; 4096];
                let offset = round * 4096;
                good.write(offset, &data, false)
                    .map_err(|e| e.to_string())?;
                let back = good.read(offset, 4096).map_err(|e| e.to_string())?;
                if back != data {
                    return Err(format!("round {round}: read back other data"));
                }
            }
            good.disconnect().map_err(|e| e.to_string())
        });
    if let Err(e) = checked {
        // Unblock the server before failing, so that the listener can be dropped.
        listening.handle().stop_now();
        panic!(
            "a well-behaved client was not served beside {stalled} clients that do not read \
             their replies: {e}"
        );
    }
    // Each stalled client's server stopped reading its requests: its replies wait in the
    // socket buffers and in its budget, not in unbounded memory.
    let most = stalled as u64 * HOG_READS;
    assert!(
        served < most,
        "{served} of the stalled clients' {most} READs served: the server buffered replies \
         nobody reads"
    );
    drop(hogs);
    listening.stop().unwrap();
}

/// Async device, runtime of 2 workers, 4 clients that never read: the 2 workers must not be
/// the ones blocked writing their replies.
#[test]
fn async_device_stalled_clients_do_not_block_the_runtime() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let hog_reads = Arc::new(AtomicU64::new(0));
    let dev = AsyncDevice::with_runtime(Ram::new(Arc::clone(&hog_reads)), rt.handle().clone());
    let (listening, uri) = listen(dev);
    good_client_is_served_beside_stalled_ones(listening, &uri, &hog_reads, 4);
    // Every task finished: the runtime shuts down at once.
    rt.shutdown_timeout(Duration::from_secs(5));
}

/// An async device that never blocks: each connection's reader polls the futures itself and
/// writes their replies; a stalled client blocks its own reader, never a worker.
#[test]
fn async_never_blocks_device_stalled_clients_do_not_block_the_runtime() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let hog_reads = Arc::new(AtomicU64::new(0));
    let ram = SyncRam(Ram::new(Arc::clone(&hog_reads)), true);
    let dev = AsyncDevice::with_runtime(ram, rt.handle().clone());
    let (listening, uri) = listen(dev);
    good_client_is_served_beside_stalled_ones(listening, &uri, &hog_reads, 4);
    rt.shutdown_timeout(Duration::from_secs(5));
}

/// The same for a sync device, served by threads of each client's own.
#[test]
fn sync_device_stalled_clients_do_not_block_others() {
    let hog_reads = Arc::new(AtomicU64::new(0));
    let dev = SyncRam(Ram::new(Arc::clone(&hog_reads)), false);
    let (listening, uri) = listen(dev);
    good_client_is_served_beside_stalled_ones(listening, &uri, &hog_reads, 4);
}
