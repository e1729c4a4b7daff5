//! The queue loop against a fake kernel: descriptors in, commits out, without `/dev/ublkcN`.
//! The fake keeps the driver's rules that matter here: a tag takes one command at a time (a
//! second one while the first is in flight is recorded as a violation), every command carries a
//! buffer address, a commit re-arms the tag's fetch, and a stopping device aborts each fetch
//! (at once, or when the tag's request is committed, as STOP_DEV does after del_gendisk).

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::async_device::{AsyncBlockDevice, AsyncDevice, IoBuf};
use crate::link::Export;
use crate::proto::TransmissionFlags as F;
use crate::server::Dispatcher;
use crate::{BlockDevice, MemDevice};

use super::queue::{serve_queue, QueueConfig, QueueStats, Ring};
use super::serving::How;
use super::sys::{self, Completion, IoDesc};

const DEPTH: u16 = 16;
const PATIENCE: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Kernel {
    descs: Vec<IoDesc>,
    /// A command of the tag's is in the kernel.
    fetched: Vec<bool>,
    addrs: Vec<u64>,
    pending: VecDeque<Completion>,
    commits: Vec<(u16, i32)>,
    /// Commands handed over by each submission.
    batches: Vec<usize>,
    woken: bool,
    stopping: bool,
    violations: Vec<String>,
}

#[derive(Clone, Default)]
struct FakeKernel(Arc<(Mutex<Kernel>, Condvar)>);

impl FakeKernel {
    fn new() -> FakeKernel {
        let k = FakeKernel::default();
        {
            let mut s = k.lock();
            s.descs = vec![IoDesc::default(); usize::from(DEPTH)];
            s.fetched = vec![false; usize::from(DEPTH)];
            s.addrs = vec![0; usize::from(DEPTH)];
        }
        k
    }

    fn lock(&self) -> MutexGuard<'_, Kernel> {
        self.0 .0.lock().unwrap()
    }

    /// Waits until `ok` holds (a test failure after [`PATIENCE`]).
    fn wait_for(&self, what: &str, ok: impl Fn(&Kernel) -> bool) -> MutexGuard<'_, Kernel> {
        let deadline = Instant::now() + PATIENCE;
        let mut s = self.lock();
        while !ok(&s) {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("fake kernel: no {what} after {PATIENCE:?}"));
            s = self.0 .1.wait_timeout(s, left).unwrap().0;
        }
        s
    }

    /// The kernel's side of a request: `desc` on a free `tag`, its fetch completed.
    fn request(&self, tag: u16, desc: IoDesc) {
        let t = usize::from(tag);
        let mut s = self.wait_for("free tag", |s| s.fetched[t]);
        s.descs[t] = desc;
        s.fetched[t] = false;
        s.pending.push_back(Completion { tag, result: 0 });
        self.0 .1.notify_all();
    }

    /// Several requests completed together (one wake-up of the queue thread).
    fn requests(&self, reqs: &[(u16, IoDesc)]) {
        let mut s = self.wait_for("free tags", |s| {
            reqs.iter().all(|&(t, _)| s.fetched[usize::from(t)])
        });
        for &(tag, desc) in reqs {
            s.descs[usize::from(tag)] = desc;
            s.fetched[usize::from(tag)] = false;
            s.pending.push_back(Completion { tag, result: 0 });
        }
        self.0 .1.notify_all();
    }

    /// A tag with a fetch in the kernel, waiting for one if none is.
    fn free_tag(&self, from: u16) -> u16 {
        let s = self.wait_for("free tag", |s| s.fetched.iter().any(|&f| f));
        (0..DEPTH)
            .map(|i| (from + i) % DEPTH)
            .find(|&t| s.fetched[usize::from(t)])
            .unwrap_or(0)
    }

    /// STOP_DEV: every fetch in the kernel aborted, and each one a commit re-arms from now on.
    fn stop(&self) {
        let mut s = self.lock();
        s.stopping = true;
        for t in 0..DEPTH {
            if std::mem::take(&mut s.fetched[usize::from(t)]) {
                s.pending.push_back(Completion {
                    tag: t,
                    result: sys::IO_RES_ABORT,
                });
            }
        }
        self.0 .1.notify_all();
    }

    fn wait_commits(&self, n: usize) -> Vec<(u16, i32)> {
        self.wait_for("commits", |s| s.commits.len() >= n)
            .commits
            .clone()
    }

    fn wait_ready(&self) {
        drop(self.wait_for("fetch of every tag", |s| s.fetched.iter().all(|&f| f)));
    }
}

struct FakeRing {
    kernel: FakeKernel,
    queued: Vec<(u16, Option<i32>, u64)>,
}

impl FakeRing {
    fn hand_over(&mut self) {
        if self.queued.is_empty() {
            return;
        }
        let mut s = self.kernel.lock();
        s.batches.push(self.queued.len());
        for (tag, result, addr) in self.queued.drain(..) {
            let t = usize::from(tag);
            if s.fetched[t] {
                s.violations
                    .push(format!("tag {tag}: a command while one is in flight"));
            }
            if addr == 0 {
                s.violations
                    .push(format!("tag {tag}: a command without a buffer"));
            }
            if let Some(r) = result {
                s.commits.push((tag, r));
            }
            s.addrs[t] = addr;
            if s.stopping {
                s.pending.push_back(Completion {
                    tag,
                    result: sys::IO_RES_ABORT,
                });
            } else {
                s.fetched[t] = true;
            }
        }
        self.kernel.0 .1.notify_all();
    }
}

impl Ring for FakeRing {
    fn desc(&self, tag: u16) -> Option<IoDesc> {
        self.kernel.lock().descs.get(usize::from(tag)).copied()
    }
    fn queue_cmd(&mut self, tag: u16, result: Option<i32>, addr: u64) -> io::Result<()> {
        self.queued.push((tag, result, addr));
        Ok(())
    }
    fn submit_queued(&mut self) -> io::Result<()> {
        self.hand_over();
        Ok(())
    }
    fn wait(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        self.hand_over();
        let deadline = Instant::now() + PATIENCE;
        let mut s = self.kernel.lock();
        while s.pending.is_empty() && !s.woken {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return Err(io::Error::other(
                    "fake kernel: the queue waited 10 s for nothing",
                ));
            };
            s = self.kernel.0 .1.wait_timeout(s, left).unwrap().0;
        }
        s.woken = false;
        out.extend(s.pending.drain(..));
        Ok(())
    }
    fn waker(&self) -> Box<dyn Fn() + Send + Sync> {
        let k = self.kernel.clone();
        Box::new(move || {
            k.lock().woken = true;
            k.0 .1.notify_all();
        })
    }
}

fn cfg() -> QueueConfig {
    QueueConfig {
        q_id: 0,
        depth: DEPTH,
        buf_len: 64 << 10,
        export: Export {
            size: 1 << 20,
            block_size: 512,
            flags: F::SEND_FLUSH,
        },
        max_io_len: 64 << 10,
    }
}

fn read(sector: u64) -> IoDesc {
    IoDesc {
        op_flags: u32::from(sys::OP_READ),
        nr_sectors: 8,
        start_sector: sector,
        addr: 0,
    }
}

fn write(sector: u64) -> IoDesc {
    IoDesc {
        op_flags: u32::from(sys::OP_WRITE),
        ..read(sector)
    }
}

/// The queue loop for `device` served as `how`, on a thread, its fetches all in.
fn start<D: BlockDevice + 'static>(
    device: D,
    how: impl FnOnce(&D) -> How,
) -> (FakeKernel, JoinHandle<io::Result<QueueStats>>) {
    let kernel = FakeKernel::new();
    let k = kernel.clone();
    let how = how(&device);
    let t = thread::spawn(move || {
        let mut ring = FakeRing {
            kernel: k,
            queued: Vec::new(),
        };
        serve_queue(&mut ring, &cfg(), Dispatcher::new(&device), &how, || {})
    });
    kernel.wait_ready();
    (kernel, t)
}

/// A gate the device's reads at sector 0 wait behind.
#[derive(Default)]
struct Gate(Mutex<bool>, Condvar);

impl Gate {
    fn open(&self) {
        *self.0.lock().unwrap() = true;
        self.1.notify_all();
    }
    fn pass(&self) {
        drop(self.1.wait_while(self.0.lock().unwrap(), |open| !*open));
    }
}

/// A RAM disk whose reads at sector 0 wait for the gate and whose reads at sector 16 panic;
/// counts the calls in progress.
struct Slow {
    mem: MemDevice,
    gate: Arc<Gate>,
    now: AtomicUsize,
}

impl Slow {
    fn new(gate: &Arc<Gate>) -> Slow {
        Slow {
            mem: MemDevice::new(1 << 20),
            gate: Arc::clone(gate),
            now: AtomicUsize::new(0),
        }
    }
}

impl BlockDevice for Slow {
    fn blocks(&self) -> u64 {
        BlockDevice::blocks(&self.mem)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.now.fetch_add(1, Ordering::SeqCst);
        if offset == 0 {
            self.gate.pass();
        }
        self.now.fetch_sub(1, Ordering::SeqCst);
        assert_ne!(offset, 16 * 512, "the device panics");
        BlockDevice::read(&self.mem, offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        BlockDevice::write(&self.mem, offset, data)
    }
}

/// [`Slow`] as an async device: reads at sector 0 await a semaphore instead.
struct SlowAsync {
    mem: MemDevice,
    gate: Arc<tokio::sync::Semaphore>,
}

impl AsyncBlockDevice for SlowAsync {
    fn blocks(&self) -> u64 {
        BlockDevice::blocks(&self.mem)
    }
    async fn read(&self, offset: u64, mut buf: IoBuf) -> (io::Result<()>, IoBuf) {
        if offset == 0 {
            let _pass = self.gate.acquire().await;
        }
        assert_ne!(offset, 16 * 512, "the device panics");
        (BlockDevice::read(&self.mem, offset, &mut buf), buf)
    }
    async fn write(&self, offset: u64, data: IoBuf) -> (io::Result<()>, IoBuf) {
        (BlockDevice::write(&self.mem, offset, &data), data)
    }
}

/// A device served two ways for the same test: by workers (`Slow`) or as tasks (`SlowAsync`).
enum Kind {
    Workers,
    Async,
}

/// A queue served on a thread of its own.
type Serving = JoinHandle<io::Result<QueueStats>>;

/// The queue for a slow device of `kind`, and what opens its gate.
fn slow(kind: Kind) -> (FakeKernel, Serving, Box<dyn Fn()>) {
    match kind {
        Kind::Workers => {
            let gate = Arc::new(Gate::default());
            let (k, t) = start(Slow::new(&gate), |_| How::Workers(4));
            (k, t, Box::new(move || gate.open()))
        }
        Kind::Async => {
            let gate = Arc::new(tokio::sync::Semaphore::new(0));
            let dev = AsyncDevice::new(SlowAsync {
                mem: MemDevice::new(1 << 20),
                gate: Arc::clone(&gate),
            });
            let (k, t) = start(dev, |d| {
                How::for_device(d, &crate::server::ServerOptions::default(), DEPTH)
            });
            (
                k,
                t,
                Box::new(move || gate.add_permits(tokio::sync::Semaphore::MAX_PERMITS >> 1)),
            )
        }
    }
}

fn finish(kernel: &FakeKernel, t: JoinHandle<io::Result<QueueStats>>) -> QueueStats {
    kernel.stop();
    let stats = t.join().unwrap().unwrap();
    let s = kernel.lock();
    assert_eq!(s.violations, Vec::<String>::new());
    assert!(s.fetched.iter().all(|&f| !f), "a fetch was never aborted");
    stats
}

#[rstest::rstest]
#[case::workers(Kind::Workers)]
#[case::tasks(Kind::Async)]
fn a_slow_request_does_not_hold_up_the_others(#[case] kind: Kind) {
    let (kernel, t, open) = slow(kind);
    kernel.request(0, read(0));
    kernel.request(1, read(8));
    kernel.request(2, write(24));
    // Tags 1 and 2 are answered while tag 0 still waits in the device.
    let first = kernel.wait_commits(2);
    assert_eq!(
        {
            let mut f = first.clone();
            f.sort();
            f
        },
        [(1, 4096), (2, 4096)]
    );
    open();
    assert_eq!(kernel.wait_commits(3)[2], (0, 4096));
    let stats = finish(&kernel, t);
    assert_eq!(stats.served, 3);
    assert!(stats.max_in_flight >= 2, "{stats:?}");
}

#[rstest::rstest]
#[case::workers(Kind::Workers)]
#[case::tasks(Kind::Async)]
fn a_panic_is_eio_and_the_tag_serves_on(#[case] kind: Kind) {
    let (kernel, t, open) = slow(kind);
    open();
    kernel.request(3, read(16));
    assert_eq!(kernel.wait_commits(1), [(3, -5)]);
    let addr = kernel.lock().addrs[3];
    assert_ne!(addr, 0);
    kernel.request(3, write(16));
    kernel.request(3, read(8));
    assert_eq!(kernel.wait_commits(3), [(3, -5), (3, 4096), (3, 4096)]);
    assert_eq!(finish(&kernel, t).served, 3);
}

#[rstest::rstest]
#[case::workers(Kind::Workers)]
#[case::tasks(Kind::Async)]
fn stopping_waits_for_the_requests_in_flight(#[case] kind: Kind) {
    let (kernel, t, open) = slow(kind);
    for tag in 0..4 {
        kernel.request(tag, read(0));
    }
    // Every other fetch is aborted at once; the four in the device keep the queue serving.
    kernel.stop();
    thread::sleep(Duration::from_millis(200));
    assert!(
        !t.is_finished(),
        "the queue ended with requests in the device"
    );
    assert!(kernel.lock().commits.is_empty());
    open();
    let stats = t.join().unwrap().unwrap();
    assert_eq!(stats.served, 4);
    let s = kernel.lock();
    let mut commits = s.commits.clone();
    commits.sort();
    assert_eq!(commits, [(0, 4096), (1, 4096), (2, 4096), (3, 4096)]);
    assert_eq!(s.violations, Vec::<String>::new());
}

/// A RAM disk that takes a little while, different each time, for each call.
struct Jittery(MemDevice, AtomicUsize);

impl BlockDevice for Jittery {
    fn blocks(&self) -> u64 {
        BlockDevice::blocks(&self.0)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let n = self.1.fetch_add(1, Ordering::Relaxed);
        thread::sleep(Duration::from_micros((n * 7919 % 300) as u64));
        BlockDevice::read(&self.0, offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        BlockDevice::write(&self.0, offset, data)
    }
}

#[rstest::rstest]
#[case::inline(0)]
#[case::workers(1)]
#[case::tasks(2)]
fn every_request_is_committed_exactly_once(#[case] how: usize) {
    let dev = Jittery(MemDevice::new(1 << 20), AtomicUsize::new(0));
    let (kernel, t) = match how {
        0 => start(dev, |_| How::Inline),
        1 => start(dev, |_| How::Workers(6)),
        _ => start(AsyncDevice::new(dev), |d| {
            How::for_device(d, &crate::server::ServerOptions::default(), DEPTH)
        }),
    };
    const N: usize = 1500;
    let mut tag = 0;
    for i in 0..N as u64 {
        tag = kernel.free_tag(tag + 1);
        let sector = (i * 7) % 2040;
        kernel.request(
            tag,
            if i % 3 == 0 {
                write(sector)
            } else {
                read(sector)
            },
        );
    }
    let commits = kernel.wait_commits(N);
    let stats = finish(&kernel, t);
    assert_eq!(commits.len(), N);
    assert!(commits.iter().all(|&(_, v)| v == 4096), "{commits:?}");
    assert_eq!(stats.served, N as u64);
    if how > 0 {
        assert!(stats.max_in_flight > 1, "{stats:?}");
    }
}

/// Requests that complete together are served together and committed in one submission.
#[test]
fn a_device_that_never_blocks_is_served_in_batches() {
    let (kernel, t) = start(MemDevice::new(1 << 20), |_| How::Inline);
    let reqs: Vec<_> = (0..8).map(|tag| (tag, read(u64::from(tag) * 8))).collect();
    kernel.requests(&reqs);
    assert_eq!(kernel.wait_commits(8).len(), 8);
    // The fetches of every tag, then the eight commits in one go.
    assert_eq!(kernel.lock().batches, [usize::from(DEPTH), 8]);
    // A request outside the device is refused without a call.
    kernel.request(9, read(4096));
    assert_eq!(kernel.wait_commits(9)[8], (9, -22));
    assert_eq!(finish(&kernel, t).served, 9);
}
