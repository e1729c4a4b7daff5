//! Raw byte streams at the server: invalid requests get the protocol's errno and leave the device
//! untouched; a corrupt stream ends with a typed error; nothing ever follows an error reply.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use userblk::link::loopback::{LoopbackLink, RawKernel};
use userblk::proto::{
    encode_request, Command, CommandFlags, Cookie, Errno, Reply, Request, TransmissionFlags,
    MAX_IO_LEN, REPLY_LEN,
};
use userblk::server::Step;
use userblk::{
    BlockDevice, Capabilities, Export, KernelLink, LinkError, MemDevice, PatternDevice, Server,
    ServerError, Started,
};

/// Counts every call that could change or reveal the device.
struct Watched {
    inner: MemDevice,
    caps: Capabilities,
    calls: AtomicUsize,
}

impl Watched {
    fn new(size: u64) -> Arc<Watched> {
        Watched::with(size, MemDevice::new(1).capabilities())
    }
    fn with(size: u64, caps: Capabilities) -> Arc<Watched> {
        let inner = MemDevice::new(size);
        inner.write(0, &vec![0xaa; size as usize]).unwrap();
        Arc::new(Watched {
            inner,
            caps,
            calls: AtomicUsize::new(0),
        })
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    fn untouched(&self) -> bool {
        let mut buf = vec![0u8; self.inner.size() as usize];
        self.inner.read(0, &mut buf).unwrap();
        buf.iter().all(|&b| b == 0xaa)
    }
}

impl BlockDevice for Watched {
    fn blocks(&self) -> u64 {
        self.inner.blocks()
    }
    fn capabilities(&self) -> Capabilities {
        self.caps
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.write(offset, data)
    }
    fn flush(&self) -> io::Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.write_zeroes(offset, len, may_trim)
    }
}

fn req(command: Command, cookie: u64, offset: u64, len: u32) -> Request {
    Request::new(command, Cookie(cookie), offset, len)
}

/// Sends each request (with a zero payload for writes) and expects its error reply, in order,
/// then proves the stream is still in sync with a valid read.
fn expect_rejected(dev: Arc<Watched>, cases: &[(Request, Errno)]) {
    let mut raw = RawKernel::start(Arc::clone(&dev)).unwrap();
    for (i, (r, errno)) in cases.iter().enumerate() {
        raw.send_request(r, &vec![0u8; r.payload_len()]).unwrap();
        let reply = raw.recv_reply().unwrap();
        assert_eq!(reply.cookie, r.cookie, "case {i}: {r:?}");
        assert_eq!(reply.errno(), Some(*errno), "case {i}: {r:?}");
    }
    raw.send_request(&req(Command::Read, 99, 0, 512), &[])
        .unwrap();
    let reply = raw.recv_reply().unwrap();
    assert_eq!((reply.cookie, reply.errno()), (Cookie(99), None));
    assert_eq!(raw.recv_data(512).unwrap(), vec![0xaa; 512]);
    raw.finish().unwrap();
    assert_eq!(dev.calls(), 1, "only the final read reached the device");
    assert!(dev.untouched());
}

#[test]
fn out_of_range_requests_get_the_protocol_errno() {
    let size = 64 << 10;
    expect_rejected(
        Watched::new(size),
        &[
            (req(Command::Read, 1, size - 512, 1024), Errno::EINVAL),
            (req(Command::Read, 2, size, 512), Errno::EINVAL),
            (req(Command::Read, 3, u64::MAX - 511, 512), Errno::EINVAL),
            (req(Command::Write, 4, size - 512, 1024), Errno::ENOSPC),
            (req(Command::Write, 5, 1 << 40, 512), Errno::ENOSPC),
            (req(Command::Trim, 6, size, 512), Errno::EINVAL),
            (
                req(Command::WriteZeroes, 7, size - 512, 4096),
                Errno::ENOSPC,
            ),
            (req(Command::Read, 8, 100, 512), Errno::EINVAL),
            (req(Command::Write, 9, 0, 100), Errno::EINVAL),
            (req(Command::Read, 10, 0, 0), Errno::EINVAL),
        ],
    );
}

#[test]
fn read_only_device_rejects_writes_with_eperm() {
    let caps = Capabilities {
        read_only: true,
        ..Capabilities::default()
    };
    expect_rejected(
        Watched::with(64 << 10, caps),
        &[
            (req(Command::Write, 1, 0, 4096), Errno::EPERM),
            (req(Command::Trim, 2, 0, 4096), Errno::EPERM),
            (req(Command::WriteZeroes, 3, 0, 4096), Errno::EPERM),
            // Past the end too: read-only takes precedence, as the protocol asks.
            (req(Command::Write, 4, 1 << 30, 512), Errno::EPERM),
        ],
    );
}

#[test]
fn commands_not_advertised_get_einval() {
    let caps = Capabilities {
        flush: false,
        trim: false,
        write_zeroes: false,
        ..Capabilities::default()
    };
    let mut nohole = req(Command::Write, 6, 0, 512);
    nohole.flags = CommandFlags::NO_HOLE;
    let mut unknown_flag = req(Command::Read, 7, 0, 512);
    unknown_flag.flags = CommandFlags(1 << 9);
    expect_rejected(
        Watched::with(64 << 10, caps),
        &[
            (req(Command::Flush, 1, 0, 0), Errno::EINVAL),
            (req(Command::Trim, 2, 0, 512), Errno::EINVAL),
            (req(Command::WriteZeroes, 3, 0, 512), Errno::EINVAL),
            (req(Command::Cache, 4, 0, 512), Errno::EINVAL),
            (req(Command::BlockStatus, 5, 0, 512), Errno::EINVAL),
            (nohole, Errno::EINVAL),
            (unknown_flag, Errno::EINVAL),
        ],
    );
}

#[test]
fn unknown_command_gets_einval_and_the_stream_stays_in_sync() {
    let dev = Watched::new(64 << 10);
    let mut raw = RawKernel::start(Arc::clone(&dev)).unwrap();
    #[rustfmt::skip]
    let unknown: [u8; 28] = [
        0x25, 0x60, 0x95, 0x13,                         // magic
        0x00, 0x00, 0x00, 0x2a,                         // command 42
        0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, // cookie
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // offset
        0x00, 0x00, 0x02, 0x00,                         // len 512
    ];
    raw.send(&unknown).unwrap();
    let reply = raw.recv_reply().unwrap();
    assert_eq!(reply.cookie, Cookie(0x0102_0304_0506_0708));
    assert_eq!(reply.errno(), Some(Errno::EINVAL));
    raw.send_request(&req(Command::Read, 2, 512, 512), &[])
        .unwrap();
    assert_eq!(raw.recv_reply().unwrap().errno(), None);
    assert_eq!(raw.recv_data(512).unwrap(), vec![0xaa; 512]);
    raw.finish().unwrap();
    assert_eq!(dev.calls(), 1);
}

#[test]
fn oversized_write_is_drained_and_rejected() {
    let dev = Watched::new(64 << 20);
    let mut raw = RawKernel::start(Arc::clone(&dev)).unwrap();
    let len = MAX_IO_LEN + 4096;
    let payload = vec![0x55u8; len as usize];
    // The server reads the whole payload while we send it, from another thread.
    let header = req(Command::Write, 1, 0, len);
    std::thread::scope(|s| {
        let sock = &mut raw;
        s.spawn(move || sock.send_request(&header, &payload).unwrap());
    });
    let reply = raw.recv_reply().unwrap();
    assert_eq!(
        (reply.cookie, reply.errno()),
        (Cookie(1), Some(Errno::EINVAL))
    );
    raw.send_request(&req(Command::Read, 2, 0, 512), &[])
        .unwrap();
    assert_eq!(raw.recv_reply().unwrap().errno(), None);
    assert_eq!(raw.recv_data(512).unwrap(), vec![0xaa; 512]);
    raw.finish().unwrap();
    assert_eq!(dev.calls(), 1);
    assert!(dev.untouched());
}

#[test]
fn bad_magic_ends_the_connection_with_a_typed_error() {
    let dev = Watched::new(64 << 10);
    let mut raw = RawKernel::start(Arc::clone(&dev)).unwrap();
    let bytes = encode_request(0x1234_5678, 1, Cookie(1), 0, 512);
    raw.send(&bytes).unwrap();
    raw.send(&[0u8; 512]).unwrap();
    // The server closes the connection without replying...
    assert_eq!(raw.recv_to_eof().unwrap(), Vec::<u8>::new());
    // ...and says why.
    let err = raw.finish().unwrap_err();
    match &err {
        ServerError::Protocol { conn: 0, source } => {
            assert_eq!(
                *source,
                userblk::proto::ParseError::BadMagic { magic: 0x1234_5678 }
            )
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(err.to_string().contains("0x12345678"), "{err}");
    assert_eq!(dev.calls(), 0);
    assert!(dev.untouched());
}

#[test]
fn truncated_write_payload_is_a_typed_error_and_writes_nothing() {
    let dev = Watched::new(64 << 10);
    let mut raw = RawKernel::start(Arc::clone(&dev)).unwrap();
    raw.send_request(&req(Command::Write, 7, 0, 4096), &[0u8; 1000])
        .unwrap();
    let err = raw.finish().unwrap_err();
    assert!(
        matches!(
            err,
            ServerError::TruncatedPayload {
                cookie: Cookie(7),
                expected: 4096,
                got: 1000,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(dev.calls(), 0);
    assert!(dev.untouched());
}

#[test]
fn truncated_header_is_a_typed_error() {
    let mut raw = RawKernel::start(MemDevice::new(4096)).unwrap();
    raw.send(&req(Command::Read, 1, 0, 512).encode()[..20])
        .unwrap();
    let err = raw.finish().unwrap_err();
    assert!(
        matches!(
            err,
            ServerError::Protocol {
                source: userblk::proto::ParseError::ShortHeader { len: 20 },
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn read_error_sends_the_errno_and_no_payload() {
    struct BadSector;
    impl BlockDevice for BadSector {
        fn blocks(&self) -> u64 {
            64
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            buf.fill(0xee); // garbage a buggy server might send anyway
            if offset == 4096 {
                Err(io::Error::from_raw_os_error(5))
            } else {
                Ok(())
            }
        }
    }
    let mut raw = RawKernel::start(BadSector).unwrap();
    raw.send_request(&req(Command::Read, 1, 4096, 4096), &[])
        .unwrap();
    let reply = raw.recv_reply().unwrap();
    assert_eq!((reply.cookie, reply.errno()), (Cookie(1), Some(Errno::EIO)));
    // The very next bytes are the next reply's header, not 4096 bytes of data.
    raw.send_request(&req(Command::Read, 2, 0, 512), &[])
        .unwrap();
    let reply = raw.recv_reply().unwrap();
    assert_eq!((reply.cookie, reply.errno()), (Cookie(2), None));
    assert_eq!(raw.recv_data(512).unwrap(), vec![0xee; 512]);
    raw.disconnect().unwrap();
}

#[test]
fn disc_finishes_and_returns_ok_and_eof_returns_ok() {
    let raw = RawKernel::start(PatternDevice::new(4096)).unwrap();
    raw.disconnect().unwrap();
    let raw = RawKernel::start(PatternDevice::new(4096)).unwrap();
    raw.finish().unwrap();
}

#[test]
fn random_garbage_never_panics_the_server() {
    // A fixed pseudo-random stream: the server must end with an error or Ok, never hang or panic.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for round in 0..50 {
        let mut bytes = Vec::new();
        // Sometimes a valid magic so parsing gets past the first check.
        if round % 2 == 0 {
            bytes.extend(0x2560_9513u32.to_be_bytes());
        }
        for _ in 0..200 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bytes.push(x as u8);
        }
        let dev = Watched::new(64 << 10);
        let mut raw = RawKernel::start(Arc::clone(&dev)).unwrap();
        raw.send(&bytes).unwrap();
        let _ = raw.finish();
        assert!(dev.untouched() || dev.calls() > 0);
    }
}

/// A kernel that takes less than it is offered: read-only, 4 KiB blocks, half the size.
struct TakesLess(LoopbackLink);

impl KernelLink for TakesLess {
    fn start(&mut self, export: &Export) -> Result<Started, LinkError> {
        let mut started = self.0.start(export)?;
        started.export = Export {
            size: export.size / 2,
            block_size: 4096,
            flags: export.flags | TransmissionFlags::READ_ONLY,
        };
        Ok(started)
    }
}

#[test]
fn requests_are_checked_against_the_export_the_kernel_took() {
    use std::io::{Read, Write};
    let size = 64 << 10;
    let dev = Watched::new(size);
    let (link, mut ends) = LoopbackLink::new(1).unwrap();
    let mut kernel = ends.remove(0);
    let mut server = Server::new(Arc::clone(&dev), TakesLess(link)).unwrap();
    assert_eq!(
        server.export().block_size,
        512,
        "before start: what is asked for"
    );
    let cases = [
        // Writable for the device, read-only for the kernel.
        (req(Command::Write, 1, 0, 4096), Some(Errno::EPERM)),
        // Aligned for the device's 512-byte blocks, not for the kernel's 4 KiB ones.
        (req(Command::Read, 2, 512, 4096), Some(Errno::EINVAL)),
        // Inside the device, past the size the kernel took.
        (req(Command::Read, 3, size / 2, 4096), Some(Errno::EINVAL)),
        (req(Command::Read, 4, size / 2 - 4096, 4096), None),
    ];
    for (r, want) in cases {
        kernel.write_all(&r.encode()).unwrap();
        kernel.write_all(&vec![0u8; r.payload_len()]).unwrap();
        let step = server.handle_one().unwrap();
        let replied = Step::Replied {
            cookie: r.cookie,
            command: Some(r.command),
            error: want,
        };
        assert_eq!(step, replied, "{r:?}");
        let mut header = [0u8; REPLY_LEN];
        kernel.read_exact(&mut header).unwrap();
        assert_eq!(Reply::parse(&header).unwrap().errno(), want, "{r:?}");
    }
    let mut data = vec![0u8; 4096];
    kernel.read_exact(&mut data).unwrap();
    assert_eq!(data, vec![0xaa; 4096]);
    let served = server.export();
    assert_eq!((served.size, served.block_size), (size / 2, 4096));
    assert!(served.flags.contains(TransmissionFlags::READ_ONLY));
    drop(kernel);
    assert_eq!(server.handle_one().unwrap(), Step::Eof);
    assert_eq!(dev.calls(), 1, "only the valid read reached the device");
    assert!(dev.untouched());
}

/// A link reporting a block size no device can be served with.
struct Nonsense(LoopbackLink);

impl KernelLink for Nonsense {
    fn start(&mut self, export: &Export) -> Result<Started, LinkError> {
        let mut started = self.0.start(export)?;
        started.export.block_size = 1000;
        Ok(started)
    }
}

#[test]
fn a_link_reporting_an_impossible_block_size_is_a_typed_error() {
    let (link, _ends) = LoopbackLink::new(1).unwrap();
    let dev = Watched::new(4096);
    let mut server = Server::new(Arc::clone(&dev), Nonsense(link)).unwrap();
    let err = server.run().unwrap_err();
    assert!(matches!(err, ServerError::InvalidGeometry(_)), "{err}");
    assert!(err.to_string().contains("block size 1000"), "{err}");
    // Nothing is served afterwards.
    assert_eq!(server.handle_one().unwrap(), Step::Eof);
    assert_eq!(dev.calls(), 0);
}
