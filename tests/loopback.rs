//! Every command through the fake kernel, on the three built-in devices, plus concurrency,
//! multi-connection and `&mut self` devices.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use rstest::rstest;
use tempfile::NamedTempFile;
use userblk::link::loopback::{KernelProfile, LoopbackLink, Op, RawKernel};
use userblk::proto::{Command, Cookie, Request, TransmissionFlags};
use userblk::{
    BlockDevice, BlockDeviceMut, Capabilities, Export, FileDevice, KernelLink, LinkError,
    LoopbackError, LoopbackKernel, LoopbackOptions, MemDevice, PatternDevice, Server, ServerError,
    ServerOptions, Started,
};

const SIZE: u64 = 4 << 20;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A device under test plus whatever keeps it alive (the temp file).
struct Subject {
    device: Box<dyn BlockDevice>,
    _file: Option<NamedTempFile>,
}

fn mem() -> Subject {
    Subject {
        device: Box::new(MemDevice::new(SIZE)),
        _file: None,
    }
}

fn file() -> Subject {
    let f = NamedTempFile::new().unwrap();
    let dev = FileDevice::create(f.path(), SIZE).unwrap();
    Subject {
        device: Box::new(dev),
        _file: Some(f),
    }
}

#[rstest]
#[case::mem(mem())]
#[case::file(file())]
fn every_command_round_trips(#[case] subject: Subject) {
    let k = LoopbackKernel::start(subject.device).unwrap();
    let flags = k.export().flags;
    assert!(flags.contains(TransmissionFlags::SEND_FLUSH | TransmissionFlags::SEND_TRIM));
    assert!(flags.contains(TransmissionFlags::SEND_WRITE_ZEROES));

    // Never-written blocks read as zeroes on both.
    assert_eq!(k.read(0, 8192).unwrap(), vec![0; 8192]);

    // WRITE, split as 6.12 splits (1,280 KiB), then READ back at the first, a middle and the
    // last block.
    let big = pattern(1, 300 << 10);
    k.write(4096, &big).unwrap();
    assert_eq!(k.read(4096, big.len()).unwrap(), big);
    let last = pattern(2, 512);
    k.write(SIZE - 512, &last).unwrap();
    assert_eq!(k.read(SIZE - 512, 512).unwrap(), last);
    k.write(0, &last).unwrap();
    assert_eq!(k.read(0, 512).unwrap(), last);

    // FUA and FLUSH.
    let fua = pattern(3, 8192);
    k.write_fua(1 << 20, &fua).unwrap();
    k.flush().unwrap();
    assert_eq!(k.read(1 << 20, 8192).unwrap(), fua);

    // TRIM reads back as zeroes (both devices promise it).
    k.trim(4096 + 4096, 65536).unwrap();
    let back = k.read(4096, big.len()).unwrap();
    assert_eq!(back[..4096], big[..4096]);
    assert!(back[4096..4096 + 65536].iter().all(|&b| b == 0));
    assert_eq!(back[4096 + 65536..], big[4096 + 65536..]);

    // WRITE_ZEROES with and without NO_HOLE.
    k.write_zeroes(1 << 20, 4096, true).unwrap();
    k.write_zeroes((1 << 20) + 4096, 4096, false).unwrap();
    assert_eq!(k.read(1 << 20, 8192).unwrap(), vec![0; 8192]);

    let stats = k.stats();
    assert_eq!(stats.requests, stats.replies);
    k.shutdown().unwrap();
}

#[test]
fn read_only_pattern_device() {
    let dev = PatternDevice::new(1 << 20);
    let k = LoopbackKernel::start(dev).unwrap();
    let flags = k.export().flags;
    assert!(flags.contains(TransmissionFlags::READ_ONLY));
    assert!(!flags.contains(TransmissionFlags::SEND_FLUSH));
    assert_eq!(
        k.read(4096 + 512, 1024).unwrap(),
        dev.expected(4096 + 512, 1024)
    );
    assert_eq!(
        k.read(0, 256 << 10).unwrap(),
        dev.expected(0, 256 << 10),
        "split reads reassemble in order"
    );
    // The kernel refuses writes to a read-only device without sending them.
    let before = k.stats().requests;
    assert!(matches!(
        k.write(0, &[0; 512]),
        Err(LoopbackError::Refused { errno: 5, .. })
    ));
    assert!(matches!(k.trim(0, 512), Err(LoopbackError::Refused { .. })));
    assert_eq!(k.stats().requests, before);
    // Flush without a write cache completes without a request.
    k.flush().unwrap();
    assert_eq!(k.stats().requests, before);
    k.shutdown().unwrap();
}

#[test]
fn trim_without_capability_fails_locally_with_eopnotsupp() {
    struct NoTrim(MemDevice);
    impl BlockDevice for NoTrim {
        fn blocks(&self) -> u64 {
            self.0.blocks()
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            self.0.read(offset, buf)
        }
        fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            self.0.write(offset, data)
        }
    }
    let k = LoopbackKernel::start(NoTrim(MemDevice::new(1 << 20))).unwrap();
    let err = k.trim(0, 4096).unwrap_err();
    assert_eq!(err.errno(), Some(95));
    assert_eq!(k.stats().requests, 0);
    // Write-zeroes falls back to zero-filled WRITEs, as the block layer does.
    k.write(0, &[9; 4096]).unwrap();
    k.write_zeroes(0, 4096, false).unwrap();
    assert_eq!(k.read(0, 4096).unwrap(), vec![0; 4096]);
    k.shutdown().unwrap();
}

/// A device whose reads wait until the test opens their gate, to control reply order.
struct Gated {
    inner: MemDevice,
    open: Mutex<Vec<u64>>,
    changed: Condvar,
    arrived: AtomicUsize,
}

impl BlockDevice for Gated {
    fn blocks(&self) -> u64 {
        self.inner.blocks()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.arrived.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_all();
        let mut open = self.open.lock().unwrap();
        while !open.contains(&offset) {
            open = self.changed.wait(open).unwrap();
        }
        drop(open);
        self.inner.read(offset, buf)
    }
}

#[test]
fn hundred_twenty_eight_requests_in_flight_answered_out_of_order() {
    let dev = Arc::new(Gated {
        inner: MemDevice::new(1 << 20),
        open: Mutex::new(Vec::new()),
        changed: Condvar::new(),
        arrived: AtomicUsize::new(0),
    });
    for i in 0..128u64 {
        dev.inner.write(i * 4096, &[i as u8; 4096]).unwrap();
    }
    let options = LoopbackOptions {
        server: ServerOptions {
            workers: 128,
            ..ServerOptions::default()
        },
        ..LoopbackOptions::default()
    };
    let k = LoopbackKernel::with_options(Arc::clone(&dev), options).unwrap();
    let tickets: Vec<_> = (0..128u64)
        .map(|i| k.submit(Op::read(i * 4096, 4096)).unwrap())
        .collect();
    // All 128 reach the device before any is answered.
    {
        let mut open = dev.open.lock().unwrap();
        while dev.arrived.load(Ordering::SeqCst) < 128 {
            open = dev.changed.wait(open).unwrap();
        }
    }
    // Release them newest first: every reply but the last overtakes an older request.
    for (i, t) in tickets.into_iter().enumerate().rev() {
        dev.open.lock().unwrap().push(i as u64 * 4096);
        dev.changed.notify_all();
        assert_eq!(k.wait(t).unwrap(), vec![i as u8; 4096]);
    }
    let stats = k.stats();
    assert_eq!(stats.max_in_flight, 128);
    assert_eq!(stats.overtaken, 127);
    k.shutdown().unwrap();
}

#[test]
fn several_connections_share_one_device() {
    let options = LoopbackOptions {
        connections: 4,
        ..LoopbackOptions::default()
    };
    let dev = Arc::new(MemDevice::new(SIZE));
    let k = Arc::new(LoopbackKernel::with_options(Arc::clone(&dev), options).unwrap());
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let k = Arc::clone(&k);
            s.spawn(move || {
                for i in 0..32u64 {
                    let off = (u64::from(t) * 32 + i) * 8192;
                    let data = pattern(t ^ i as u8, 8192);
                    k.write(off, &data).unwrap();
                    assert_eq!(k.read(off, 8192).unwrap(), data);
                }
            });
        }
    });
    let k = Arc::into_inner(k).unwrap();
    assert_eq!(k.stats().requests, 4 * 32 * 2);
    k.shutdown().unwrap();
    let mut buf = vec![0u8; 8192];
    dev.read(3 * 32 * 8192, &mut buf).unwrap();
    assert_eq!(buf, pattern(3, 8192));
}

/// A `&mut self` device, as the seed crate's examples are written.
struct Counter {
    data: Vec<u8>,
    unmounts: Arc<AtomicUsize>,
}

impl BlockDeviceMut for Counter {
    fn blocks(&self) -> u64 {
        self.data.len() as u64 / 512
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            flush: false,
            ..Capabilities::default()
        }
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let o = offset as usize;
        buf.copy_from_slice(&self.data[o..o + buf.len()]);
        Ok(())
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let o = offset as usize;
        self.data[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn unmount(&mut self) {
        self.unmounts.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn mut_device_through_mutex_and_unmount_once() {
    let unmounts = Arc::new(AtomicUsize::new(0));
    let dev = Mutex::new(Counter {
        data: vec![0; 64 << 10],
        unmounts: Arc::clone(&unmounts),
    });
    let k = LoopbackKernel::start(dev).unwrap();
    assert!(!k.export().flags.contains(TransmissionFlags::SEND_FLUSH));
    k.write(512, &[5; 1024]).unwrap();
    // FUA without a write cache is a plain write.
    k.write_fua(4096, &[6; 512]).unwrap();
    assert_eq!(k.read(512, 1024).unwrap(), vec![5; 1024]);
    assert_eq!(k.read(4096, 512).unwrap(), vec![6; 512]);
    assert_eq!(unmounts.load(Ordering::SeqCst), 0);
    k.shutdown().unwrap();
    assert_eq!(unmounts.load(Ordering::SeqCst), 1);
}

#[test]
fn dropping_the_kernel_disconnects_and_unmounts() {
    let unmounts = Arc::new(AtomicUsize::new(0));
    let dev = Mutex::new(Counter {
        data: vec![0; 4096],
        unmounts: Arc::clone(&unmounts),
    });
    drop(LoopbackKernel::start(dev).unwrap());
    assert_eq!(unmounts.load(Ordering::SeqCst), 1);
}

#[test]
fn device_errors_reach_the_caller_as_their_errno() {
    struct Failing;
    impl BlockDevice for Failing {
        fn blocks(&self) -> u64 {
            16
        }
        fn read(&self, offset: u64, _: &mut [u8]) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(if offset == 0 {
                28
            } else {
                2
            }))
        }
        fn write(&self, _: u64, _: &[u8]) -> io::Result<()> {
            Err(io::Error::other("no errno"))
        }
        fn flush(&self) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(122)) // EDQUOT
        }
    }
    let k = LoopbackKernel::start(Failing).unwrap();
    assert_eq!(k.read(0, 512).unwrap_err().errno(), Some(28));
    assert_eq!(
        k.read(512, 512).unwrap_err().errno(),
        Some(5),
        "ENOENT maps to EIO"
    );
    assert_eq!(k.write(0, &[0; 512]).unwrap_err().errno(), Some(5));
    assert_eq!(
        k.flush().unwrap_err().errno(),
        Some(28),
        "EDQUOT maps to ENOSPC"
    );
    // The connection survived every error.
    assert_eq!(k.read(0, 512).unwrap_err().errno(), Some(28));
    assert!(k.violations().is_empty());
    k.shutdown().unwrap();
}

#[test]
fn a_panicking_device_gets_eio_and_the_server_goes_on() {
    struct Panics;
    impl BlockDevice for Panics {
        fn blocks(&self) -> u64 {
            16
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            assert!(offset != 0, "driver bug");
            buf.fill(1);
            Ok(())
        }
    }
    let k = LoopbackKernel::start(Panics).unwrap();
    assert_eq!(k.read(0, 512).unwrap_err().errno(), Some(5));
    assert_eq!(k.read(512, 512).unwrap(), vec![1; 512]);
    k.shutdown().unwrap();
}

#[test]
fn operations_larger_than_all_tags_complete() {
    // 4 tags × 128 KiB (6.1's split): a 2 MiB write needs 16 requests, four times what can be
    // in flight. Sending them all before reaping any deadlocked here once.
    let options = LoopbackOptions {
        profile: KernelProfile::linux_6_1(),
        queue_depth: 4,
        ..LoopbackOptions::default()
    };
    let k = LoopbackKernel::with_options(MemDevice::new(SIZE), options).unwrap();
    let data = pattern(9, 2 << 20);
    k.write(0, &data).unwrap();
    assert_eq!(k.read(0, data.len()).unwrap(), data);
    let stats = k.stats();
    assert_eq!(stats.requests, 32);
    assert!(stats.max_in_flight <= 4, "{stats:?}");
    k.shutdown().unwrap();
}

/// Records how many calls are inside the device at once; with `wait_for_company`, a call waits
/// (up to a few seconds) for a second one to arrive, to prove calls can overlap.
struct Overlap {
    caps: Capabilities,
    wait_for_company: bool,
    inside: Mutex<usize>,
    most: AtomicUsize,
    changed: Condvar,
}

impl BlockDevice for Overlap {
    fn blocks(&self) -> u64 {
        2048
    }
    fn capabilities(&self) -> Capabilities {
        self.caps
    }
    fn read(&self, _: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut inside = self.inside.lock().unwrap();
        *inside += 1;
        self.most.fetch_max(*inside, Ordering::SeqCst);
        self.changed.notify_all();
        if self.wait_for_company {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while self.most.load(Ordering::SeqCst) < 2 && std::time::Instant::now() < deadline {
                inside = self
                    .changed
                    .wait_timeout(inside, std::time::Duration::from_millis(50))
                    .unwrap()
                    .0;
            }
        }
        *inside -= 1;
        buf.fill(0);
        Ok(())
    }
}

/// Device calls overlap on one connection whatever the device says: a device that never blocks
/// is served by two threads taking turns (cheaper than `workers`, still concurrent). Only an
/// explicit single thread per connection serves one call at a time.
#[rstest]
#[case::never_blocks(true, ServerOptions::default(), 2)]
#[case::may_block(false, ServerOptions::default(), 2)]
#[case::one_thread(true, ServerOptions { workers: 1, batch_never_blocks: false, ..ServerOptions::default() }, 1)]
fn calls_overlap_on_one_connection_unless_one_thread_is_asked_for(
    #[case] never_blocks: bool,
    #[case] server: ServerOptions,
    #[case] most: usize,
) {
    let dev = Arc::new(Overlap {
        caps: Capabilities {
            never_blocks,
            ..Capabilities::default()
        },
        // One thread would wait for company that cannot come.
        wait_for_company: most > 1,
        inside: Mutex::new(0),
        most: AtomicUsize::new(0),
        changed: Condvar::new(),
    });
    // All 32 requests in one write: the server finds them queued together.
    let mut raw = RawKernel::with_options(Arc::clone(&dev), server).unwrap();
    let burst: Vec<u8> = (0..32u64)
        .flat_map(|i| Request::new(Command::Read, Cookie(i), i * 512, 512).encode())
        .collect();
    raw.send(&burst).unwrap();
    for _ in 0..32 {
        assert_eq!(raw.recv_reply().unwrap().errno(), None);
        assert_eq!(raw.recv_data(512).unwrap(), vec![0; 512]);
    }
    raw.disconnect().unwrap();
    assert_eq!(dev.most.load(Ordering::SeqCst), most);
}

/// Panics in `unmount`, as a device whose final flush fails might.
struct PanicsOnUnmount;

impl BlockDevice for PanicsOnUnmount {
    fn blocks(&self) -> u64 {
        8
    }
    fn read(&self, _: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn unmount(&self) {
        panic!("final flush failed");
    }
}

/// A link that records whether `finish` was called.
struct Finishes {
    inner: LoopbackLink,
    finished: Arc<AtomicUsize>,
}

impl KernelLink for Finishes {
    fn start(&mut self, export: &Export) -> Result<Started, LinkError> {
        self.inner.start(export)
    }
    fn finish(&mut self) -> Result<(), LinkError> {
        self.finished.fetch_add(1, Ordering::SeqCst);
        self.inner.finish()
    }
}

#[test]
fn a_panic_in_unmount_is_a_typed_error_and_the_link_still_finishes() {
    use std::io::Write;
    let (inner, mut ends) = LoopbackLink::new(1).unwrap();
    let finished = Arc::new(AtomicUsize::new(0));
    let link = Finishes {
        inner,
        finished: Arc::clone(&finished),
    };
    let mut server = Server::new(PanicsOnUnmount, link).unwrap();
    let disc = Request::new(Command::Disc, Cookie(1), 0, 0).encode();
    ends[0].write_all(&disc).unwrap();
    match server.handle_one() {
        Err(ServerError::UnmountPanicked { message }) => assert_eq!(message, "final flush failed"),
        other => panic!("{other:?}"),
    }
    assert_eq!(finished.load(Ordering::SeqCst), 1);
    // Through `run`, the error reaches whoever stops the kernel.
    let k = LoopbackKernel::start(PanicsOnUnmount).unwrap();
    assert_eq!(k.read(0, 512).unwrap(), vec![0; 512]);
    let err = k.shutdown().unwrap_err().to_string();
    assert!(
        err.contains("unmount() panicked: final flush failed"),
        "{err}"
    );
}

/// Fills reads below 64 KiB completely with 0xab, and only the first half of any other read.
struct HalfFills;

impl BlockDevice for HalfFills {
    fn blocks(&self) -> u64 {
        1024
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if offset < 64 << 10 {
            buf.fill(0xab);
        } else {
            let half = buf.len() / 2;
            buf[..half].fill(0xcd);
        }
        Ok(())
    }
}

/// Buffers are recycled: a device that fills only half a read gets zeroes in the other half,
/// never the bytes an earlier READ left in that buffer.
#[test]
fn bytes_the_device_did_not_write_read_as_zeroes_never_as_old_data() {
    let k = LoopbackKernel::start(HalfFills).unwrap();
    for _ in 0..4 {
        assert_eq!(k.read(0, 4096).unwrap(), vec![0xab; 4096]);
        let got = k.read(64 << 10, 4096).unwrap();
        assert_eq!(got[..2048], [0xcd; 2048]);
        let leaked = got[2048..].iter().filter(|&&b| b != 0).count();
        assert_eq!(leaked, 0, "bytes of an earlier request sent as data");
    }
    k.shutdown().unwrap();
}

/// With `poison_reads`, what the device did not write holds a marker that `unfilled_ranges`
/// finds, naming the byte range.
#[test]
fn poisoned_reads_show_what_the_device_did_not_write() {
    use userblk::server::unfilled_ranges;
    let options = LoopbackOptions {
        server: ServerOptions {
            poison_reads: true,
            ..ServerOptions::default()
        },
        // 6.1 splits reads at 128 KiB (the last part below checks each request's half).
        profile: KernelProfile::linux_6_1(),
        ..LoopbackOptions::default()
    };
    let k = LoopbackKernel::with_options(HalfFills, options).unwrap();
    assert!(unfilled_ranges(&k.read(0, 8192).unwrap()).is_empty());
    let got = k.read(64 << 10, 8192).unwrap();
    assert_eq!(got[..4096], [0xcd; 4096]);
    assert_eq!(unfilled_ranges(&got), vec![4096..8192]);
    // Split by the kernel into 128 KiB requests, each half filled.
    let got = k.read(0, 256 << 10).unwrap();
    assert_eq!(unfilled_ranges(&got), vec![(192 << 10)..(256 << 10)]);
    k.shutdown().unwrap();
}
