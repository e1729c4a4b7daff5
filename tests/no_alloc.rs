//! Once warm, the server serves requests without touching the heap: a counting global allocator
//! sees no allocation while a burst of reads and writes (4 KiB to 1 MiB, many in flight) goes
//! through, in every threading mode. (In a binary of its own, one case at a time: the count is
//! process-wide; the client side allocates nothing once its threads run.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use rstest::rstest;
use userblk::link::loopback::LoopbackLink;
use userblk::proto::{Command, Cookie, Reply, Request, REPLY_LEN};
use userblk::{BlockDevice, Capabilities, Server, ServerOptions};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; counting has no effect on
// the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        // SAFETY: forwarded with the caller's layout, whose contract the caller upholds.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        // SAFETY: `ptr` was allocated by `System` with `layout` (every allocation goes there).
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// RAM behind a lock: allocation-free itself.
struct Ram {
    data: Mutex<Vec<u8>>,
    never_blocks: bool,
}

impl BlockDevice for Ram {
    fn blocks(&self) -> u64 {
        self.data.lock().unwrap().len() as u64 / 512
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            never_blocks: self.never_blocks,
            ..Capabilities::default()
        }
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let o = offset as usize;
        buf.copy_from_slice(&self.data.lock().unwrap()[o..o + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let o = offset as usize;
        self.data.lock().unwrap()[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
}

const SIZE: usize = 16 << 20;
const SIZES: [u32; 4] = [4096, 4096, 128 << 10, 1 << 20];

const ROUNDS: u64 = 40;
const DEPTH: u64 = 64;

/// The `i`-th request: WRITEs and READs alternating, of the sizes above, spread over the device.
fn request(i: u64) -> Request {
    let len = SIZES[(i % 4) as usize];
    let offset = i * (1 << 20) % (SIZE as u64 - (1 << 20));
    let command = if i % 2 == 0 {
        Command::Write
    } else {
        Command::Read
    };
    Request::new(command, Cookie(i), offset, len)
}

/// Sends every request, `DEPTH` at a time ahead of the replies `answered` counts.
fn send_all(mut sock: UnixStream, answered: &AtomicUsize, payload: &[u8]) {
    for i in 0..ROUNDS * DEPTH {
        while (i as usize) >= answered.load(Ordering::SeqCst) + DEPTH as usize {
            std::thread::yield_now();
        }
        let req = request(i);
        sock.write_all(&req.encode()).unwrap();
        if req.command == Command::Write {
            sock.write_all(&payload[..req.len as usize]).unwrap();
        }
    }
}

/// Reads the replies to requests `from..to`, checking each.
fn receive(sock: &mut UnixStream, answered: &AtomicUsize, from: u64, to: u64, sink: &mut [u8]) {
    for _ in from..to {
        let mut header = [0u8; REPLY_LEN];
        sock.read_exact(&mut header).unwrap();
        let reply = Reply::parse(&header).unwrap();
        assert_eq!(reply.errno(), None);
        let req = request(reply.cookie.0);
        if req.command == Command::Read {
            sock.read_exact(&mut sink[..req.len as usize]).unwrap();
        }
        answered.fetch_add(1, Ordering::SeqCst);
    }
}

#[rstest]
#[case::never_blocks_pair(true, ServerOptions::default())]
#[case::workers(false, ServerOptions { workers: 4, ..ServerOptions::default() })]
#[case::one_thread(false, ServerOptions { workers: 1, ..ServerOptions::default() })]
fn warm_serving_allocates_nothing(#[case] never_blocks: bool, #[case] options: ServerOptions) {
    // The count is process-wide: one case at a time.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dev = Ram {
        data: Mutex::new(vec![0x11; SIZE]),
        never_blocks,
    };
    let (link, mut ends) = LoopbackLink::new(1).unwrap();
    let mut sock = ends.remove(0);
    let mut server = Server::with_options(dev, link, options).unwrap();
    let payload = vec![0x5a; 1 << 20];
    let mut sink = vec![0u8; 1 << 20];
    let answered = AtomicUsize::new(0);
    let during = std::thread::scope(|s| {
        let serving = s.spawn(|| server.run());
        let sender = sock.try_clone().unwrap();
        let (answered, payload) = (&answered, &payload);
        let sending = s.spawn(move || send_all(sender, answered, payload));
        // Half the requests warm the server up; the other half are counted.
        let half = ROUNDS * DEPTH / 2;
        receive(&mut sock, answered, 0, half, &mut sink);
        let before = ALLOCATIONS.load(Ordering::SeqCst);
        receive(&mut sock, answered, half, 2 * half, &mut sink);
        let during = ALLOCATIONS.load(Ordering::SeqCst) - before;
        sending.join().unwrap();
        sock.write_all(&Request::new(Command::Disc, Cookie(0), 0, 0).encode())
            .unwrap();
        serving.join().unwrap().unwrap();
        during
    });
    // The pool may still grow a little when scheduling (a loaded machine) puts more requests in
    // flight at once than during the warm-up; what must not happen is an allocation per request
    // (without buffer reuse this counts one or more per request: 1280 and up).
    assert!(
        during <= 8,
        "{during} allocations while serving 1280 warm requests"
    );
}
