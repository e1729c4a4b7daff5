//! The whole server (`userblk::Server`) fed an arbitrary byte stream on the kernel's socket, as
//! `RawKernel` does, with a device that checks every call it gets.
//!
//! The first two bytes choose the device's capabilities and the server's options; the rest is
//! the stream, with each header's cookie replaced by its index (so that replies can be matched;
//! the server treats cookies as opaque). A model walks the stream as the server must: it knows
//! which requests are answered, with which errno, and, when the server runs them one at a time,
//! what each READ returns. The target fails on a panic, a reply with a bad magic or an unknown or
//! repeated cookie, a payload after an error reply (seen as a desync), a wrong errno, wrong READ
//! data, a request left unanswered on a clean stream, a device call outside its size, misaligned,
//! empty or for a command it did not advertise, an unmount count other than one, or a server
//! result that does not match how the stream ended.
//!
//! `RawKernel` itself cannot close its sending side while still reading (its `finish` joins the
//! server first), so the target builds the same thing from the public `LoopbackLink` and `Server`.

#![no_main]

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::panic;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread;

use libfuzzer_sys::fuzz_target;
use userblk::link::loopback::LoopbackLink;
use userblk::proto::{
    Command, Errno, ParseError, Reply, Request, MAX_IO_LEN, REPLY_LEN, REQUEST_LEN,
};
use userblk::server::validate;
use userblk::{BlockDevice, Capabilities, MemDevice, Server, ServerError, ServerOptions, Step};

/// Device size: small, so that most ranges the fuzzer writes fall outside it.
const SIZE: u64 = 64 << 10;
/// A request touching these bytes fails with EIO.
const BAD: std::ops::Range<u64> = 3 * 4096..3 * 4096 + 512;
/// A request touching these bytes panics in the device (the server answers EIO).
const PANICS: std::ops::Range<u64> = 5 * 4096..5 * 4096 + 512;
/// Cookies are this plus the request's index in the stream.
const COOKIE_BASE: u64 = 0xc0de_0000_0000_0000;

/// The payload of the device's deliberate panics, which the panic hook lets through.
struct DevicePanic;

fn touches(r: &std::ops::Range<u64>, offset: u64, len: u64) -> bool {
    offset < r.end && offset.saturating_add(len) > r.start
}

#[derive(Default)]
struct Log {
    violations: Mutex<Vec<String>>,
    unmounts: AtomicUsize,
}

/// MemDevice behind checks of every call the server makes.
struct Checking {
    mem: MemDevice,
    caps: Capabilities,
    block_size: u32,
    log: Arc<Log>,
}

impl Checking {
    fn violation(&self, what: String) {
        self.log.violations.lock().unwrap().push(what);
    }

    fn range(&self, op: &str, offset: u64, len: u64) -> io::Result<()> {
        let bs = u64::from(self.block_size);
        if len == 0
            || !offset.is_multiple_of(bs)
            || !len.is_multiple_of(bs)
            || offset.saturating_add(len) > SIZE
        {
            self.violation(format!(
                "{op} of {len} bytes at {offset} reached the device"
            ));
        }
        if touches(&PANICS, offset, len) {
            panic::panic_any(DevicePanic);
        }
        if touches(&BAD, offset, len) {
            return Err(io::Error::from_raw_os_error(5));
        }
        Ok(())
    }

    fn writable(&self, op: &str) {
        if self.caps.read_only {
            self.violation(format!("{op} on a read-only device"));
        }
    }
}

impl BlockDevice for Checking {
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn blocks(&self) -> u64 {
        SIZE / u64::from(self.block_size)
    }
    fn capabilities(&self) -> Capabilities {
        self.caps
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.range("read", offset, buf.len() as u64)?;
        self.mem.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.writable("write");
        self.range("write", offset, data.len() as u64)?;
        self.mem.write(offset, data)
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write(offset, data)
    }
    fn flush(&self) -> io::Result<()> {
        // FUA may reach flush() on a device without the capability (the default write_fua is
        // write + flush), so flushes are always legitimate.
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.writable("trim");
        if !self.caps.trim {
            self.violation("trim on a device without trim".into());
        }
        self.range("trim", offset, len)?;
        self.mem.trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.writable("write_zeroes");
        if !self.caps.write_zeroes {
            self.violation("write_zeroes on a device without it".into());
        }
        self.range("write_zeroes", offset, len)?;
        self.mem.write_zeroes(offset, len, may_trim)
    }
    fn unmount(&self) {
        self.log.unmounts.fetch_add(1, Ordering::SeqCst);
    }
}

struct Config {
    caps: Capabilities,
    block_size: u32,
    options: ServerOptions,
    handle_one: bool,
}

impl Config {
    fn from(a: u8, b: u8) -> Config {
        let flush = a & 8 != 0;
        let caps = Capabilities {
            read_only: a & 1 != 0,
            trim: a & 2 != 0,
            trim_zeroes: true,
            write_zeroes: a & 4 != 0,
            flush,
            fua: flush && a & 16 != 0,
            rotational: false,
            never_blocks: a & 64 != 0,
        };
        let options = ServerOptions {
            workers: [1, 2, 4, 8][usize::from(b & 3)],
            // Tiny bounds too: a request larger than the bound goes alone.
            max_in_flight_bytes: [4096, 64 << 10, 1 << 20, 64 << 20][usize::from(b >> 2 & 3)],
            max_io_len: [4096, 16 << 10, 64 << 10, MAX_IO_LEN][usize::from(b >> 4 & 3)],
            batch_never_blocks: b & 64 != 0,
            poison_reads: false,
        };
        Config {
            caps,
            block_size: if a & 32 != 0 { 4096 } else { 512 },
            options,
            handle_one: a & 128 != 0,
        }
    }

    /// Whether requests run one at a time in stream order (so READ data is predictable).
    fn sequential(&self) -> bool {
        // A never-blocking device with batching gets two threads whatever `workers` says.
        let pair = self.options.batch_never_blocks && self.caps.never_blocks;
        self.handle_one || (self.options.workers <= 1 && !pair)
    }
}

/// How the stream ends, as the server must see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Eof,
    Disc,
    ShortHeader,
    BadMagic,
    Truncated,
}

/// A request the server must answer.
struct Sent {
    command: Option<Command>,
    len: u32,
    /// 0 or the errno.
    error: u32,
    /// What a successful READ returns, when predictable.
    data: Option<Vec<u8>>,
}

/// Walks the stream as the server reads it, giving each header its index as cookie.
fn walk(stream: &mut [u8], cfg: &Config, export: &userblk::Export) -> (Vec<Sent>, End) {
    let mut shadow = cfg.sequential().then(|| vec![0u8; SIZE as usize]);
    let mut sent = Vec::new();
    let mut pos = 0;
    loop {
        let rest = stream.len() - pos;
        if rest == 0 {
            return (sent, End::Eof);
        }
        if rest < REQUEST_LEN {
            return (sent, End::ShortHeader);
        }
        let cookie = COOKIE_BASE + sent.len() as u64;
        stream[pos + 8..pos + 16].copy_from_slice(&cookie.to_be_bytes());
        let req = match Request::parse(&stream[pos..]) {
            Err(ParseError::BadMagic { .. }) => return (sent, End::BadMagic),
            Err(ParseError::ShortHeader { .. }) => unreachable!("whole header"),
            Err(ParseError::UnknownCommand { .. }) => {
                pos += REQUEST_LEN;
                sent.push(Sent {
                    command: None,
                    len: 0,
                    error: Errno::EINVAL.0,
                    data: None,
                });
                continue;
            }
            Ok(req) => req,
        };
        if req.command == Command::Disc {
            return (sent, End::Disc);
        }
        pos += REQUEST_LEN;
        let payload_len = req.payload_len();
        if stream.len() - pos < payload_len {
            return (sent, End::Truncated);
        }
        let payload = &stream[pos..pos + payload_len];
        pos += payload_len;
        let error = match validate(&req, export, cfg.options.max_io_len) {
            Err(e) => e.0,
            Ok(_) if req.command == Command::Flush => 0,
            Ok(_) => {
                let len = u64::from(req.len);
                if touches(&BAD, req.offset, len) || touches(&PANICS, req.offset, len) {
                    Errno::EIO.0
                } else {
                    0
                }
            }
        };
        let mut data = None;
        if let (Some(shadow), 0) = (shadow.as_mut(), error) {
            let range = req.offset as usize..(req.offset + u64::from(req.len)) as usize;
            match req.command {
                Command::Read => data = Some(shadow[range].to_vec()),
                Command::Write => shadow[range].copy_from_slice(payload),
                Command::Trim | Command::WriteZeroes => shadow[range].fill(0),
                _ => {}
            }
        }
        sent.push(Sent {
            command: Some(req.command),
            len: req.len,
            error,
            data,
        });
    }
}

fn quiet_device_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        // libfuzzer-sys's hook aborts on every panic; the device's own are part of the test.
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !info.payload().is::<DevicePanic>() {
                previous(info);
            }
        }));
        // SAFETY: setting SIGPIPE's disposition to ignore, before any thread of this target
        // writes to a socket; a peer that closed early then gives EPIPE instead of killing us.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
    });
}

fn serve(mut server: Server<Checking, LoopbackLink>, handle_one: bool) -> Result<(), ServerError> {
    if !handle_one {
        return server.run();
    }
    loop {
        match server.handle_one()? {
            Step::Replied { .. } => {}
            Step::Disconnected | Step::Eof => return Ok(()),
        }
    }
}

fuzz_target!(|input: &[u8]| {
    quiet_device_panics();
    let [a, b, stream @ ..] = input else { return };
    let cfg = Config::from(*a, *b);
    let log = Arc::new(Log::default());
    let device = Checking {
        mem: MemDevice::with_block_size(SIZE, cfg.block_size),
        caps: cfg.caps,
        block_size: cfg.block_size,
        log: Arc::clone(&log),
    };
    let (link, mut ends) = LoopbackLink::new(1).unwrap();
    let server = Server::with_options(device, link, cfg.options).unwrap();
    let export = *server.export();
    let mut stream = stream.to_vec();
    let (sent, end) = walk(&mut stream, &cfg, &export);

    let handle_one = cfg.handle_one;
    let server = thread::spawn(move || serve(server, handle_one));
    let mut sock = ends.pop().unwrap();
    let mut writer = sock.try_clone().unwrap();
    let writing = thread::spawn(move || {
        // The server may stop reading early (DISC, a corrupt header): EPIPE is expected.
        let _ = writer.write_all(&stream);
        let _ = writer.shutdown(Shutdown::Write);
    });

    let mut answered = vec![false; sent.len()];
    loop {
        let mut header = [0u8; REPLY_LEN];
        let got = read_full(&mut sock, &mut header);
        if got == 0 {
            break;
        }
        assert_eq!(got, REPLY_LEN, "reply header cut short");
        let reply = Reply::parse(&header).unwrap_or_else(|e| {
            panic!(
                "{e}: a payload after an error reply, or a torn reply, desynchronised the stream"
            )
        });
        let i = reply
            .cookie
            .0
            .checked_sub(COOKIE_BASE)
            .filter(|&i| i < sent.len() as u64)
            .unwrap_or_else(|| panic!("reply for unknown cookie {}", reply.cookie))
            as usize;
        assert!(!answered[i], "second reply for request #{i}");
        answered[i] = true;
        let req = &sent[i];
        assert_eq!(
            reply.error, req.error,
            "request #{i} ({:?}, {} bytes): errno",
            req.command, req.len
        );
        if reply.error == 0 && req.command == Some(Command::Read) {
            let mut data = vec![0u8; req.len as usize];
            assert_eq!(
                read_full(&mut sock, &mut data),
                data.len(),
                "READ data cut short"
            );
            if let Some(want) = &req.data {
                assert!(data == *want, "request #{i}: READ returned wrong data");
            }
        }
    }
    writing.join().unwrap();
    let result = server.join().unwrap();

    let violations = log.violations.lock().unwrap();
    assert!(violations.is_empty(), "device misused: {violations:?}");
    match (end, &result) {
        (End::Eof | End::Disc, Ok(())) => {
            let missing: Vec<usize> = (0..sent.len()).filter(|&i| !answered[i]).collect();
            assert!(missing.is_empty(), "requests never answered: {missing:?}");
        }
        (End::ShortHeader | End::BadMagic, Err(ServerError::Protocol { .. }))
        | (End::Truncated, Err(ServerError::TruncatedPayload { .. })) => {}
        _ => panic!("stream ends with {end:?}, server returned {result:?}"),
    }
    let unmounts = log.unmounts.load(Ordering::SeqCst);
    if handle_one && result.is_err() {
        // handle_one returns the error at once; the device is dropped without an unmount.
        assert!(unmounts <= 1, "{unmounts} unmounts");
    } else {
        assert_eq!(unmounts, 1, "unmount must be called exactly once");
    }
});

/// Reads until `buf` is full or EOF; returns how much was read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A Unix socket closed with unread input (bytes after DISC or a corrupt header)
            // reports ECONNRESET once its queued replies are read: the end of the stream.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("reading replies: {e}"),
        }
    }
    n
}
