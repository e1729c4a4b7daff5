//! The kernel profiles reach the wire: request sizes, WRITE_ZEROES or its fallback, discard
//! limits, tags per connection and the cookie's byte order, each observed at the device or on
//! the socket.

use std::io::{self, Read, Write};
use std::sync::{Arc, Condvar, Mutex};

use rstest::rstest;
use userblk::link::loopback::{KernelProfile, LoopbackLink, Op};
use userblk::proto::{Command, Reply, Request, REQUEST_LEN};
use userblk::server::export_of;
use userblk::{
    BlockDevice, Capabilities, KernelLink, LoopbackKernel, LoopbackOptions, MemDevice, ServerError,
    ServerOptions,
};

/// One call the device received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    Read(u64, usize),
    Write(u64, usize, bool),
    WriteZeroes(u64, u64, bool),
    Trim(u64, u64),
}

/// A MemDevice that logs every call (and says it never blocks, so the server serves it in
/// wire order).
struct Counting {
    mem: MemDevice,
    calls: Mutex<Vec<Call>>,
}

impl Counting {
    fn new(size: u64) -> Arc<Counting> {
        Arc::new(Counting {
            mem: MemDevice::new(size),
            calls: Mutex::new(Vec::new()),
        })
    }

    fn take(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

impl BlockDevice for Counting {
    fn blocks(&self) -> u64 {
        self.mem.blocks()
    }
    fn capabilities(&self) -> Capabilities {
        self.mem.capabilities()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.calls
            .lock()
            .unwrap()
            .push(Call::Read(offset, buf.len()));
        self.mem.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let zero = data.iter().all(|&b| b == 0);
        self.calls
            .lock()
            .unwrap()
            .push(Call::Write(offset, data.len(), zero));
        self.mem.write(offset, data)
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.calls.lock().unwrap().push(Call::Trim(offset, len));
        self.mem.trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.calls
            .lock()
            .unwrap()
            .push(Call::WriteZeroes(offset, len, may_trim));
        self.mem.write_zeroes(offset, len, may_trim)
    }
}

fn kernel(dev: &Arc<Counting>, profile: &str) -> LoopbackKernel {
    let profile = KernelProfile::by_name(profile).unwrap();
    // One serving thread: the device sees requests in the order the kernel sent them, which
    // these tests compare.
    let options = LoopbackOptions {
        server: ServerOptions {
            workers: 1,
            batch_never_blocks: false,
            ..ServerOptions::default()
        },
        ..LoopbackOptions::for_profile(profile)
    };
    LoopbackKernel::with_options(Arc::clone(dev), options).unwrap()
}

#[rstest]
#[case::linux_6_1("linux-6.1", vec![128 << 10; 16])]
#[case::linux_6_12("linux-6.12", vec![1280 << 10, 768 << 10])]
fn a_2_mib_read_and_write_arrive_in_the_kernels_request_size(
    #[case] profile: &str,
    #[case] sizes: Vec<usize>,
) {
    let dev = Counting::new(8 << 20);
    let k = kernel(&dev, profile);
    let data: Vec<u8> = (0..2 << 20).map(|i| (i % 253) as u8).collect();
    k.write(1 << 20, &data).unwrap();
    let writes: Vec<usize> = dev
        .take()
        .iter()
        .map(|c| match c {
            Call::Write(_, len, _) => *len,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    // Requests in flight together may reach the device in any order (two serving threads).
    let sorted = |mut v: Vec<usize>| {
        v.sort_unstable();
        v
    };
    let sizes = sorted(sizes);
    assert_eq!(sorted(writes), sizes);
    assert_eq!(k.read(1 << 20, data.len()).unwrap(), data);
    let reads: Vec<usize> = dev
        .take()
        .iter()
        .map(|c| match c {
            Call::Read(_, len) => *len,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(sorted(reads), sizes);
    assert_eq!(k.profile().name, profile);
    k.shutdown().unwrap();
}

#[rstest]
#[case::linux_6_1("linux-6.1", false)]
#[case::linux_6_12("linux-6.12", true)]
fn write_zeroes_is_sent_only_by_kernels_that_send_it(#[case] profile: &str, #[case] sent: bool) {
    let dev = Counting::new(8 << 20);
    let k = kernel(&dev, profile);
    k.write(0, &[0x5a; 4096]).unwrap();
    dev.take();
    k.write_zeroes(0, 1 << 20, true).unwrap();
    let calls = dev.take();
    if sent {
        assert_eq!(calls, vec![Call::WriteZeroes(0, 1 << 20, false)]);
    } else {
        // The block layer's fallback: zero-filled WRITEs, split like any WRITE.
        let want: Vec<Call> = (0..8)
            .map(|i| Call::Write(i * (128 << 10), 128 << 10, true))
            .collect();
        assert_eq!(calls, want);
    }
    assert_eq!(k.read(0, 4096).unwrap(), vec![0; 4096]);
    k.shutdown().unwrap();
}

#[rstest]
#[case::linux_6_1("linux-6.1")]
#[case::linux_6_12("linux-6.12")]
fn trims_split_just_below_4_gib(#[case] profile: &str) {
    let dev = Counting::new(8 << 30);
    let k = kernel(&dev, profile);
    k.trim(0, 5 << 30).unwrap();
    // UINT_MAX bytes rounded down to the 512-byte block: the u32 length field is the limit.
    let first = 0xffff_fe00;
    assert_eq!(
        dev.take(),
        vec![Call::Trim(0, first), Call::Trim(first, (5 << 30) - first)]
    );
    k.shutdown().unwrap();
}

/// Reads wait until the test opens the gate.
struct Gate {
    mem: MemDevice,
    open: Mutex<bool>,
    changed: Condvar,
}

impl BlockDevice for Gate {
    fn blocks(&self) -> u64 {
        self.mem.blocks()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.changed.wait(open).unwrap();
        }
        self.mem.read(offset, buf)
    }
}

#[rstest]
#[case::one_connection(1)]
#[case::two_connections(2)]
fn each_connection_has_128_tags(#[case] connections: usize) {
    let dev = Arc::new(Gate {
        mem: MemDevice::new(4 << 20),
        open: Mutex::new(false),
        changed: Condvar::new(),
    });
    let options = LoopbackOptions {
        connections,
        profile: KernelProfile::linux_6_1(),
        ..LoopbackOptions::default()
    };
    let k = LoopbackKernel::with_options(Arc::clone(&dev), options).unwrap();
    let mut tickets = Vec::new();
    while let Some(t) = k
        .try_submit(Op::read(tickets.len() as u64 * 512, 512))
        .unwrap()
    {
        tickets.push(t);
    }
    assert_eq!(tickets.len(), 128 * connections);
    *dev.open.lock().unwrap() = true;
    dev.changed.notify_all();
    for t in tickets {
        assert_eq!(k.wait(t).unwrap(), vec![0; 512]);
    }
    assert_eq!(k.stats().max_in_flight, 128);
    k.shutdown().unwrap();
}

/// A server that records the raw header of every request and echoes its cookie bytes back:
/// whatever their order, the kernel must recognise its own cookies.
fn echo_server(
    mut link: LoopbackLink,
    seen: Arc<Mutex<Vec<[u8; REQUEST_LEN]>>>,
) -> Result<(), ServerError> {
    let export = export_of(&MemDevice::new(1 << 20))?;
    let mut s = link.start(&export)?.conns.remove(0);
    let mut header = [0u8; REQUEST_LEN];
    while s.read_exact(&mut header).is_ok() {
        let Ok(req) = Request::parse(&header) else {
            break;
        };
        if req.command == Command::Disc {
            break;
        }
        seen.lock().unwrap().push(header);
        let _ = s.write_all(&Reply::ok(req.cookie).encode());
        if req.command == Command::Read {
            let _ = s.write_all(&vec![0; req.len as usize]);
        }
    }
    Ok(())
}

#[rstest]
#[case::linux_6_1("linux-6.1")]
#[case::linux_6_12("linux-6.12")]
fn cookies_are_laid_out_as_each_kernel_lays_them_out(#[case] profile: &str) {
    let profile = KernelProfile::by_name(profile).unwrap();
    let export = export_of(&MemDevice::new(1 << 20)).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = Arc::clone(&seen);
    let k = LoopbackKernel::with_server(export, LoopbackOptions::for_profile(profile), move |l| {
        echo_server(l, s2)
    })
    .unwrap();
    // Three in flight at once take tags 0, 1 and 2; then tag 0 goes out a second time.
    let tickets: Vec<_> = (0..3)
        .map(|i| k.submit(Op::read(i * 512, 512)).unwrap())
        .collect();
    for t in tickets {
        k.wait(t).unwrap();
    }
    k.read(0, 512).unwrap();
    k.shutdown().unwrap();
    let cookies: Vec<[u8; 8]> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|h| h[8..16].try_into().unwrap())
        .collect();
    // cmd_cookie << 32 | hwq << 16 | tag, in the kernel's byte order.
    let handles = [1u64 << 32, 1 << 32 | 1, 1 << 32 | 2, 2 << 32];
    let want: Vec<[u8; 8]> = handles
        .iter()
        .map(|h| match profile.name {
            "linux-6.1" => h.to_le_bytes(),
            _ => h.to_be_bytes(),
        })
        .collect();
    assert_eq!(cookies, want);
}

#[test]
fn profiles_are_found_by_name_and_options_override_them() {
    let names: Vec<&str> = KernelProfile::all().iter().map(|p| p.name).collect();
    assert_eq!(names, ["linux-6.1", "linux-6.12", "ublk-6.12"]);
    assert!(KernelProfile::by_name("linux-4.19").is_none());
    let default = LoopbackOptions::default();
    assert_eq!(default.profile, KernelProfile::linux_6_12());
    let resolved = LoopbackOptions {
        max_request: 4096,
        queue_depth: 4,
        send_write_zeroes: false,
        ..LoopbackOptions::for_profile(KernelProfile::linux_6_12())
    }
    .resolved_profile();
    assert_eq!(
        (
            resolved.max_request,
            resolved.queue_depth,
            resolved.write_zeroes
        ),
        (4096, 4, false)
    );
    let dev = Counting::new(1 << 20);
    let k = LoopbackKernel::with_options(
        Arc::clone(&dev),
        LoopbackOptions {
            max_request: 4096,
            ..LoopbackOptions::default()
        },
    )
    .unwrap();
    k.read(0, 16384).unwrap();
    assert_eq!(dev.take().len(), 4);
    k.shutdown().unwrap();
}
