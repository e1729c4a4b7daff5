//! Hostile and broken clients against userblk's network server: a client that hangs up at every
//! byte of the handshake (and inside requests), one that sends random bytes, one that says
//! nothing, too many clients, and a stop with clients connected. Each gets a typed error in the
//! log; the client already connected goes on being served, and the device keeps its data.
//! Only loopback addresses and Unix sockets; every loop is bounded.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use userblk::link::net::wire::{self, InfoRequest, MetaContextRequest, Opt};
use userblk::link::net::{ListenAddr, Listening, NetEvent, NetOptions};
use userblk::proto::{Command, Cookie, Request};
use userblk::{BlockDevice, MemDevice};
use userblk_harness::net_rig::{NbdAddr, NbdClient, NbdUri};

/// Every event's text, and the kind of each failure.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn options(&self) -> NetOptions {
        let log = self.clone();
        NetOptions::new().on_event(move |e: &NetEvent<'_>| log.record(e))
    }

    fn record(&self, e: &NetEvent<'_>) {
        let kind = match e {
            NetEvent::HandshakeFailed { error, .. } => format!("handshake: {error}"),
            NetEvent::Finished { result: Err(e), .. } => format!("transmission: {e}"),
            NetEvent::Finished { result: Ok(()), .. } => "finished".into(),
            NetEvent::Refused { reason, .. } => format!("refused: {reason}"),
            NetEvent::Aborted { .. } => "aborted".into(),
            other => format!("{other}"),
        };
        self.0.lock().unwrap().push(kind);
    }

    fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    fn count(&self, prefix: &str) -> usize {
        self.lines()
            .iter()
            .filter(|l| l.starts_with(prefix))
            .count()
    }

    /// The count once it reaches `n`, or what it is after 10 s: a client's event is logged
    /// just after its socket closes, so a test that saw the close may be a little early.
    fn count_reaching(&self, prefix: &str, n: usize) -> usize {
        for _ in 0..1000 {
            if self.count(prefix) >= n {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.count(prefix)
    }
}

fn start(log: &Log, options: NetOptions) -> (Listening, NbdUri, Arc<MemDevice>) {
    let _ = log;
    let dev = Arc::new(MemDevice::new(4 << 20));
    let addr = ListenAddr::Tcp(([127, 0, 0, 1], 0).into());
    let listening = options.spawn(Arc::clone(&dev), &addr).unwrap();
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
    (listening, uri, dev)
}

fn connect(uri: &NbdUri) -> TcpStream {
    let NbdAddr::Tcp { host, port } = &uri.addr else {
        unreachable!()
    };
    let s = TcpStream::connect((host.as_str(), *port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// What a well-behaved client sends in the handshake, whole.
fn client_handshake() -> Vec<u8> {
    let mut b = wire::FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    b.extend(wire::encode_option(Opt::LIST, &[]));
    b.extend(wire::encode_option(Opt::STRUCTURED_REPLY, &[]));
    let meta = MetaContextRequest {
        name: String::new(),
        queries: vec![wire::BASE_ALLOCATION.into()],
    };
    b.extend(wire::encode_option(Opt::SET_META_CONTEXT, &meta.encode()));
    let go = InfoRequest {
        name: String::new(),
        requests: vec![wire::info::BLOCK_SIZE],
    };
    b.extend(wire::encode_option(Opt::GO, &go.encode()));
    b
}

/// Reads until the server closes (or 20 s pass): what a cut-off client waits for.
fn drain(s: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}

/// Writes and reads back through the long-lived client: it is still served, and still right.
fn check_good_client(good: &NbdClient, round: u64) {
    let data = vec![(round % 251) as u8; 4096];
    good.write(round * 4096 % (4 << 20), &data, false).unwrap();
    assert_eq!(good.read(round * 4096 % (4 << 20), 4096).unwrap(), data);
}

/// Waits (up to 10 s) until at most `n` clients are connected: a client's slot is given back
/// just after its socket closes, so the next cut client could otherwise find the slots of the
/// last few still taken (and be refused) on a loaded machine.
fn wait_active_at_most(listening: &Listening, n: usize) {
    for _ in 0..1000 {
        if listening.handle().stats().active <= n {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!(
        "{} clients still connected after 10 s",
        listening.handle().stats().active
    );
}

#[test]
fn hang_up_at_every_byte_of_the_handshake() {
    let log = Log::default();
    let (listening, uri, dev) = start(&log, log.options().max_clients(4));
    let good = NbdClient::connect(&uri).unwrap();
    let hs = client_handshake();
    for cut in 0..hs.len() {
        let mut s = connect(&uri);
        s.write_all(&hs[..cut]).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        drain(&mut s);
        wait_active_at_most(&listening, 1);
        check_good_client(&good, cut as u64);
    }
    // Each cut client failed its handshake with a typed error, none entered transmission.
    let failed = log.count_reaching("handshake: client hung up", hs.len());
    assert_eq!(failed, hs.len(), "{:#?}", log.lines());
    assert_eq!(
        listening.handle().stats().handshake_failures,
        hs.len() as u64
    );
    // The whole handshake, then a request cut at every byte: a typed transmission error each.
    let mut req = Request::new(Command::Write, Cookie(7), 0, 512)
        .encode()
        .to_vec();
    req.extend([0xee; 512]);
    for cut in [1, 10, 27, 28, 29, 300, 539] {
        let mut s = connect(&uri);
        s.write_all(&hs).unwrap();
        s.write_all(&req[..cut]).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        drain(&mut s);
        wait_active_at_most(&listening, 1);
    }
    assert_eq!(
        log.count_reaching("transmission: ", 7),
        7,
        "{:#?}",
        log.lines()
    );
    // The 28-byte cut is a whole WRITE header with no payload: truncated, not applied.
    let mut block = [0u8; 512];
    dev.read(0, &mut block).unwrap();
    assert_ne!(block, [0xee; 512]);
    check_good_client(&good, 999);
    good.disconnect().unwrap();
    listening.stop().unwrap();
}

#[test]
fn random_bytes_never_reach_the_device() {
    let log = Log::default();
    let (listening, uri, dev) = start(&log, log.options());
    let good = NbdClient::connect(&uri).unwrap();
    good.write(0, &[0x5a; 8192], false).unwrap();
    // xorshift64*: seeded, reproducible garbage.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let hs = client_handshake();
    for round in 0..150u64 {
        let len = (next() % 300) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // A third start with a valid handshake prefix, so the garbage lands deeper.
        if round % 3 == 0 {
            let keep = (next() as usize) % (hs.len() + 1);
            bytes.splice(0..0, hs[..keep].iter().copied());
        }
        let mut s = connect(&uri);
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(Shutdown::Write);
        drain(&mut s);
        if round % 25 == 0 {
            check_good_client(&good, round + 8);
        }
    }
    assert_eq!(good.read(0, 8192).unwrap(), vec![0x5a; 8192]);
    good.disconnect().unwrap();
    listening.stop().unwrap();
    let st = listening_stats_after(&log);
    assert!(st >= 100, "{st} typed failures in {:#?}", log.lines());
    // The device is whole: what the good client wrote is there, nothing else was written.
    let mut buf = vec![0u8; 8192];
    dev.read(0, &mut buf).unwrap();
    assert_eq!(buf, vec![0x5a; 8192]);
}

fn listening_stats_after(log: &Log) -> usize {
    log.count("handshake: ") + log.count("transmission: ")
}

#[test]
fn silent_client_times_out_and_extra_clients_are_refused() {
    let log = Log::default();
    let (listening, uri, _dev) = start(
        &log,
        log.options()
            .max_clients(2)
            .handshake_timeout(Duration::from_millis(300)),
    );
    let good = NbdClient::connect(&uri).unwrap();
    // The second slot: a client that never answers the greeting.
    let mut silent = connect(&uri);
    let mut greeting = [0u8; wire::GREETING_LEN];
    silent.read_exact(&mut greeting).unwrap();
    // The third is one too many: closed before any greeting.
    let mut extra = connect(&uri);
    let mut byte = [0u8; 1];
    assert_eq!(extra.read(&mut byte).unwrap_or(0), 0);
    // The silent one is cut off by the handshake deadline.
    drain(&mut silent);
    assert_eq!(
        log.count_reaching("refused: 2 clients", 1),
        1,
        "{:#?}",
        log.lines()
    );
    assert_eq!(
        log.count_reaching("handshake: handshake timed out", 1),
        1,
        "{:#?}",
        log.lines()
    );
    check_good_client(&good, 3);
    good.disconnect().unwrap();
    listening.stop().unwrap();
}

/// Counts flushes and unmounts, to see that stopping does each once, after the clients.
struct Counting {
    inner: MemDevice,
    flushes: Arc<Mutex<u32>>,
    unmounts: Arc<Mutex<u32>>,
}

impl BlockDevice for Counting {
    fn blocks(&self) -> u64 {
        self.inner.blocks()
    }
    fn capabilities(&self) -> userblk::Capabilities {
        self.inner.capabilities()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.inner.write(offset, data)
    }
    fn flush(&self) -> std::io::Result<()> {
        *self.flushes.lock().unwrap() += 1;
        Ok(())
    }
    fn unmount(&self) {
        *self.unmounts.lock().unwrap() += 1;
    }
}

#[test]
fn stop_lets_clients_finish_then_flushes_and_unmounts_once() {
    let unmounts = Arc::new(Mutex::new(0));
    let flushes = Arc::new(Mutex::new(0));
    let dev = Counting {
        inner: MemDevice::new(1 << 20),
        flushes: Arc::clone(&flushes),
        unmounts: Arc::clone(&unmounts),
    };
    let addr = ListenAddr::Tcp(([127, 0, 0, 1], 0).into());
    let listening = NetOptions::new()
        .on_event(|_| {})
        .spawn(dev, &addr)
        .unwrap();
    let ListenAddr::Tcp(a) = listening.local_addr().clone() else {
        unreachable!()
    };
    let uri: NbdUri = format!("nbd://{a}/").parse().unwrap();
    let clients: Vec<NbdClient> = (0..3).map(|_| NbdClient::connect(&uri).unwrap()).collect();
    for (i, c) in clients.iter().enumerate() {
        c.write(i as u64 * 4096, &[i as u8 + 1; 4096], false)
            .unwrap();
    }
    let handle = listening.handle().clone();
    listening.stop().unwrap();
    assert!(handle.is_stopping());
    // Each client's connection was ended by the server (EOF); requests now fail, typed.
    for c in &clients {
        assert!(c.read(0, 512).is_err());
    }
    assert_eq!(*unmounts.lock().unwrap(), 1);
    // No client flushed: the one flush is the listener's, after every client ended.
    assert_eq!(*flushes.lock().unwrap(), 1);
    drop(clients);
    assert_eq!(*unmounts.lock().unwrap(), 1);
}

/// A client still in the handshake when the server stops gets `NBD_REP_ERR_SHUTDOWN` for the
/// option it has sent (the protocol's SHOULD), not a bare hang-up, and the stop is not logged as
/// its failure. The client's bytes are in the socket before the listener's `Accepted` event
/// stops the server, so the order is fixed: stop first, then the server reads the option.
#[test]
fn a_client_in_the_handshake_when_the_server_stops_gets_err_shutdown() {
    use std::os::unix::net::UnixStream;
    use std::sync::{mpsc, OnceLock};
    use userblk::link::net::wire::{OptionReplyHeader, Rep};
    use userblk::link::net::NetHandle;

    let log = Log::default();
    let handle: Arc<OnceLock<NetHandle>> = Arc::new(OnceLock::new());
    let (sent, sent_rx) = mpsc::channel::<()>();
    let sent_rx = Mutex::new(sent_rx);
    let logged = log.clone();
    let stopper = Arc::clone(&handle);
    let options = NetOptions::new().on_event(move |e: &NetEvent<'_>| {
        if let NetEvent::Accepted { .. } = e {
            let _ = sent_rx
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(20));
            if let Some(h) = stopper.get() {
                h.stop();
            }
        }
        logged.record(e);
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listening = options
        .spawn(MemDevice::new(1 << 20), &ListenAddr::Unix(path.clone()))
        .unwrap();
    handle.set(listening.handle().clone()).unwrap();

    let mut c = UnixStream::connect(&path).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut hello = wire::FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    let go = InfoRequest {
        name: String::new(),
        requests: vec![],
    };
    hello.extend(wire::encode_option(Opt::GO, &go.encode()));
    c.write_all(&hello).unwrap();
    sent.send(()).unwrap();

    let mut greeting = [0u8; wire::GREETING_LEN];
    c.read_exact(&mut greeting).unwrap();
    let mut header = [0u8; wire::OPTION_REPLY_HEADER_LEN];
    c.read_exact(&mut header).unwrap();
    let h = OptionReplyHeader::parse(&header).unwrap();
    assert_eq!((h.option, h.reply), (Opt::GO, Rep::ERR_SHUTDOWN));
    let mut message = vec![0u8; h.len as usize];
    c.read_exact(&mut message).unwrap();
    // Then the server closes: nothing more comes.
    assert_eq!(c.read(&mut [0u8; 16]).unwrap(), 0);
    listening.stop().unwrap();
    assert_eq!(log.count_reaching("refused: the server is stopping", 1), 1);
    assert_eq!(log.count("handshake"), 0, "{:?}", log.lines());
}

/// Every network client is served by a server of its own, with its own budget of memory in
/// flight (`ServerOptions::max_in_flight_bytes` bounds one client here, not the listener): a
/// client that pipelines 64 MiB of READs and never reads a reply fills its own 1 MiB budget and
/// stalls only its own reader, while another client goes on being served.
#[test]
fn a_client_that_never_reads_replies_cannot_starve_another() {
    let log = Log::default();
    let server = userblk::ServerOptions {
        max_in_flight_bytes: 1 << 20,
        ..userblk::ServerOptions::default()
    };
    let (listening, uri, _dev) = start(&log, log.options().server_options(server));
    let mut hog = connect(&uri);
    hog.write_all(&client_handshake()).unwrap();
    let mut reads = Vec::new();
    for i in 0..256u64 {
        let len = 256 << 10;
        reads.extend(Request::new(Command::Read, Cookie(i), i % 16 * u64::from(len), len).encode());
    }
    hog.write_all(&reads).unwrap();
    // Long enough for the hog's server to fill its socket and its budget.
    std::thread::sleep(Duration::from_millis(300));
    let good = NbdClient::connect(&uri).unwrap();
    for round in 0..32 {
        check_good_client(&good, round);
    }
    good.disconnect().unwrap();
    drop(hog);
    listening.stop().unwrap();
}

/// A silent client in the handshake does not hold a stop back: the read side shut by the stop
/// ends its handshake at once, long before its (here ten-minute) handshake timeout.
#[test]
fn stop_ends_a_silent_handshake_at_once() {
    let log = Log::default();
    let (listening, uri, _dev) = start(
        &log,
        log.options().handshake_timeout(Duration::from_secs(600)),
    );
    let mut silent = connect(&uri);
    let mut greeting = [0u8; wire::GREETING_LEN];
    silent.read_exact(&mut greeting).unwrap();
    let (done, stopped) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(listening.stop());
    });
    let result = stopped
        .recv_timeout(Duration::from_secs(60))
        .expect("stop waited for the silent client's handshake timeout");
    result.unwrap();
    // The server closed the connection.
    assert_eq!(silent.read(&mut [0u8; 16]).unwrap(), 0);
    assert_eq!(log.count_reaching("refused: the server is stopping", 1), 1);
}
