//! Seeded concurrency bugs, each caught by the concurrent random test **with its defaults**
//! (`RandomConfig::default()`): three realistic drivers in front of a slow backing store, each
//! with its race, and the correct driver of the same shape.
//!
//! - [`ReadCache`]: a write-around read cache with the classic stale fill: a read misses and
//!   fetches the old data, a write lands and invalidates the block, then the read caches the old
//!   data it fetched. Fixed with a per-block generation: a fill is dropped when the block was
//!   invalidated since the miss.
//! - [`WriteBack`]: a write-back cache whose flush marks pages clean after sending them to
//!   storage, so a write that lands while a page is on its way is never written (unmount writes
//!   dirty pages only). Fixed with a per-page generation checked before marking clean, and one
//!   write-back at a time (else an older copy can land after a newer one).
//! - [`Rmw`]: 512-byte sectors over 4 KiB pages by read-modify-write without a lock: two
//!   writes to different sectors of one page each read the page, and the second page write
//!   undoes the first. Fixed with a lock per page.
//!
//! For each, a direct test forces the losing interleaving with a [`Gate`] in the backing store
//! and shows the buggy driver losing an acknowledged write (and the correct one not).

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use userblk::{BlockDevice, Capabilities, MemDevice};
use userblk_harness::factory::{DeviceFactory, Reopen};
use userblk_harness::random::{
    loopback_rig, random_test, FailureKind, RandomConfig, RandomFailure,
};

const SIZE: u64 = 8 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Which store call a gate stops.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Call {
    Read,
    Write,
}

/// A one-shot stop in the backing store, for direct tests: the first matching call does its
/// work, says so on `reached`, and waits for `go` before returning.
type Armed = (Call, u64, SyncSender<()>, Receiver<()>);

/// A backing store with the latency of a disk or a network: each call reaches the data at once
/// and then takes a varying 20 to 200 µs to answer, so two calls may overtake each other.
struct Store {
    mem: MemDevice,
    calls: AtomicU64,
    gate: Mutex<Option<Armed>>,
}

impl Store {
    fn new(block_size: u32) -> Arc<Store> {
        Arc::new(Store {
            mem: MemDevice::with_block_size(SIZE, block_size),
            calls: AtomicU64::new(0),
            gate: Mutex::new(None),
        })
    }

    fn latency(&self) {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        let mut z = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z ^= z >> 29;
        thread::sleep(Duration::from_micros(20 + z % 180));
    }

    /// Stops the next `call` at `offset` after its data is read or written.
    fn arm(&self, call: Call, offset: u64) -> (Receiver<()>, SyncSender<()>) {
        let (reached_tx, reached_rx) = mpsc::sync_channel(1);
        let (go_tx, go_rx) = mpsc::sync_channel(1);
        *lock(&self.gate) = Some((call, offset, reached_tx, go_rx));
        (reached_rx, go_tx)
    }

    fn pause(&self, call: Call, offset: u64) {
        let armed = {
            let mut g = lock(&self.gate);
            match &*g {
                Some((c, o, _, _)) if *c == call && *o == offset => g.take(),
                _ => None,
            }
        };
        if let Some((_, _, reached, go)) = armed {
            let _ = reached.send(());
            // Never hang a test: a gate nobody opens lets go after a while.
            let _ = go.recv_timeout(Duration::from_secs(10));
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.mem.read(offset, buf)?;
        self.pause(Call::Read, offset);
        self.latency();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.mem.write(offset, data)?;
        self.pause(Call::Write, offset);
        self.latency();
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        self.mem.write_zeroes(offset, len, true)?;
        self.latency();
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// (a) A write-around read cache.

const SECTOR: u64 = 512;

/// Reads are cached per 512-byte block; writes go to the store and invalidate the cache.
struct ReadCache {
    store: Arc<Store>,
    fixed: bool,
    cache: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    blocks: HashMap<u64, Box<[u8]>>,
    /// Bumped by every invalidation (used by the fixed driver only).
    generation: HashMap<u64, u64>,
}

impl ReadCache {
    fn new(store: Arc<Store>, fixed: bool) -> ReadCache {
        ReadCache {
            store,
            fixed,
            cache: Mutex::new(CacheState::default()),
        }
    }

    fn invalidate(&self, offset: u64, len: u64) {
        let mut c = lock(&self.cache);
        for b in offset / SECTOR..(offset + len) / SECTOR {
            c.blocks.remove(&b);
            *c.generation.entry(b).or_default() += 1;
        }
    }
}

impl BlockDevice for ReadCache {
    fn blocks(&self) -> u64 {
        SIZE / SECTOR
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            trim: true,
            trim_zeroes: true,
            write_zeroes: true,
            ..Capabilities::default()
        }
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let first = offset / SECTOR;
        // Cached blocks from the cache; each run of missing ones fetched from the store
        // (without holding the lock: the store is slow) and then filled in.
        let missing: Vec<(u64, u64)> = {
            let c = lock(&self.cache);
            let mut missing = Vec::new();
            for (i, chunk) in buf.chunks_mut(SECTOR as usize).enumerate() {
                let b = first + i as u64;
                match c.blocks.get(&b) {
                    Some(data) => chunk.copy_from_slice(data),
                    None => missing.push((b, c.generation.get(&b).copied().unwrap_or(0))),
                }
            }
            missing
        };
        for run in missing.chunk_by(|x, y| x.0 + 1 == y.0) {
            let at = ((run[0].0 - first) * SECTOR) as usize;
            let part = &mut buf[at..at + run.len() * SECTOR as usize];
            self.store.read(run[0].0 * SECTOR, part)?;
            let mut c = lock(&self.cache);
            for (k, &(b, seen)) in run.iter().enumerate() {
                if self.fixed && c.generation.get(&b).copied().unwrap_or(0) != seen {
                    continue; // invalidated since the miss: what we fetched may be old
                }
                let at = k * SECTOR as usize;
                c.blocks.insert(b, part[at..at + SECTOR as usize].into());
            }
        }
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.store.write(offset, data)?;
        self.invalidate(offset, data.len() as u64);
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.store.zero(offset, len)?;
        self.invalidate(offset, len);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool) -> io::Result<()> {
        self.trim(offset, len)
    }
}

// ---------------------------------------------------------------------------------------------
// (b) A write-back cache.

const PAGE: u64 = 4096;

struct Page {
    data: Box<[u8]>,
    dirty: bool,
    generation: u64,
}

/// 4 KiB blocks held in memory; flush writes dirty pages back (FUA, those of the write);
/// unmount writes dirty pages only.
struct WriteBack {
    store: Arc<Store>,
    fixed: bool,
    pages: Mutex<HashMap<u64, Page>>,
    /// One write-back at a time (fixed driver only).
    writing_back: Mutex<()>,
}

impl WriteBack {
    fn new(store: Arc<Store>, fixed: bool) -> WriteBack {
        WriteBack {
            store,
            fixed,
            pages: Mutex::new(HashMap::new()),
            writing_back: Mutex::new(()),
        }
    }

    /// Writes the dirty pages among `pages` (all when `None`) to the store.
    fn write_back(&self, pages: Option<std::ops::Range<u64>>) -> io::Result<()> {
        let _one = self.fixed.then(|| lock(&self.writing_back));
        let mut dirty: Vec<(u64, Box<[u8]>, u64)> = lock(&self.pages)
            .iter()
            .filter(|(n, p)| p.dirty && pages.as_ref().is_none_or(|r| r.contains(n)))
            .map(|(&n, p)| (n, p.data.clone(), p.generation))
            .collect();
        dirty.sort_by_key(|d| d.0);
        // Neighbouring pages go to the store in one write.
        for run in dirty.chunk_by(|a, b| a.0 + 1 == b.0) {
            let data: Vec<u8> = run.iter().flat_map(|d| d.1.iter().copied()).collect();
            self.store.write(run[0].0 * PAGE, &data)?;
            let mut pages = lock(&self.pages);
            for (n, _, generation) in run {
                if let Some(p) = pages.get_mut(n) {
                    // The bug: a write that landed while the page was on its way made it dirty
                    // again, and this forgets it.
                    if !self.fixed || p.generation == *generation {
                        p.dirty = false;
                    }
                }
            }
        }
        Ok(())
    }
}

impl BlockDevice for WriteBack {
    fn block_size(&self) -> u32 {
        PAGE as u32
    }
    fn blocks(&self) -> u64 {
        SIZE / PAGE
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        // Cached pages from the cache, each run of the others from the store in one read.
        let first = offset / PAGE;
        let missing: Vec<u64> = {
            let pages = lock(&self.pages);
            let mut missing = Vec::new();
            for (i, chunk) in buf.chunks_mut(PAGE as usize).enumerate() {
                match pages.get(&(first + i as u64)) {
                    Some(p) => chunk.copy_from_slice(&p.data),
                    None => missing.push(first + i as u64),
                }
            }
            missing
        };
        for run in missing.chunk_by(|a, b| a + 1 == *b) {
            let at = ((run[0] - first) * PAGE) as usize;
            let part = &mut buf[at..at + run.len() * PAGE as usize];
            self.store.read(run[0] * PAGE, part)?;
        }
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut pages = lock(&self.pages);
        for (i, chunk) in data.chunks(PAGE as usize).enumerate() {
            let n = offset / PAGE + i as u64;
            let p = pages.entry(n).or_insert_with(|| Page {
                data: vec![0; PAGE as usize].into(),
                dirty: false,
                generation: 0,
            });
            p.data.copy_from_slice(chunk);
            p.dirty = true;
            p.generation += 1;
        }
        Ok(())
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write(offset, data)?;
        self.write_back(Some(
            offset / PAGE..(offset + data.len() as u64).div_ceil(PAGE),
        ))
    }
    fn flush(&self) -> io::Result<()> {
        self.write_back(None)
    }
    fn unmount(&self) {
        // Dirty pages only: clean ones are on the store already, or so the cache believes.
        let pages = lock(&self.pages);
        let mut dirty: Vec<(&u64, &Page)> = pages.iter().filter(|(_, p)| p.dirty).collect();
        dirty.sort_by_key(|d| *d.0);
        for run in dirty.chunk_by(|a, b| a.0 + 1 == *b.0) {
            let data: Vec<u8> = run.iter().flat_map(|d| d.1.data.iter().copied()).collect();
            let _ = self.store.write(run[0].0 * PAGE, &data);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (c) Read-modify-write of 4 KiB pages for 512-byte sectors.

/// Page locks, by page number modulo their count (fixed driver only).
const STRIPES: usize = 64;

struct Rmw {
    pages: Arc<Store>,
    fixed: bool,
    locks: Vec<Mutex<()>>,
}

impl Rmw {
    fn new(pages: Arc<Store>, fixed: bool) -> Rmw {
        Rmw {
            pages,
            fixed,
            locks: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }
}

impl BlockDevice for Rmw {
    fn blocks(&self) -> u64 {
        SIZE / SECTOR
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let first = offset / PAGE;
        let last = (offset + buf.len() as u64).div_ceil(PAGE);
        let mut pages = vec![0u8; ((last - first) * PAGE) as usize];
        self.pages.read(first * PAGE, &mut pages)?;
        let at = (offset - first * PAGE) as usize;
        buf.copy_from_slice(&pages[at..at + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset + data.len() as u64;
        for n in offset / PAGE..end.div_ceil(PAGE) {
            let (from, to) = ((n * PAGE).max(offset), ((n + 1) * PAGE).min(end));
            let src = &data[(from - offset) as usize..(to - offset) as usize];
            let _page_lock = self.fixed.then(|| lock(&self.locks[n as usize % STRIPES]));
            if to - from == PAGE {
                self.pages.write(n * PAGE, src)?;
            } else {
                let mut page = vec![0u8; PAGE as usize];
                self.pages.read(n * PAGE, &mut page)?;
                let at = (from - n * PAGE) as usize;
                page[at..at + src.len()].copy_from_slice(src);
                self.pages.write(n * PAGE, &page)?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The random test with its defaults.

/// Runs `random_test` with the defaults and returns the failure, printing it and the time.
fn default_run(name: &str, factory: &dyn DeviceFactory) -> Result<(), Box<RandomFailure>> {
    let caps = factory.create().expect("factory").capabilities();
    let t = Instant::now();
    let r = random_test(
        &loopback_rig(),
        factory,
        caps,
        &RandomConfig::default(),
        &mut |_| {},
    );
    println!(
        "{name}: default random test took {:.1} s",
        t.elapsed().as_secs_f64()
    );
    match &r {
        Ok(s) => println!("{name}: passed {s:?}"),
        Err(f) => println!("{name}:\n{f}"),
    }
    r.map(drop)
}

fn read_cache(fixed: bool) -> impl DeviceFactory {
    move || ReadCache::new(Store::new(512), fixed)
}

fn write_back(fixed: bool) -> impl DeviceFactory {
    Reopen::new(
        || Ok(Store::new(4096)),
        move |s: &Arc<Store>| Ok(WriteBack::new(Arc::clone(s), fixed)),
    )
}

fn rmw(fixed: bool) -> impl DeviceFactory {
    move || Rmw::new(Store::new(4096), fixed)
}

/// A stale value read after the write was acknowledged: reported as a stale read, or as a lost
/// write when the block still held it at the end.
fn assert_missed_write(f: &RandomFailure) {
    let text = f.to_string();
    assert!(
        matches!(f.kind, FailureKind::StaleRead | FailureKind::LostWrite),
        "{text}"
    );
    let first = text.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("stale read: block ") || first.starts_with("lost write: block "),
        "{first}"
    );
    assert!(first.contains("had replaced (acknowledged at #"), "{first}");
    assert!(text.contains("seed"), "{text}");
    assert!(text.contains("operations on block"), "{text}");
    assert!(text.contains("first difference"), "{text}");
}

#[test]
fn stale_read_cache_fill_is_caught_by_the_default_random_test() {
    let f = default_run("read cache", &read_cache(false)).expect_err("missed the stale fill");
    assert_missed_write(&f);
}

#[test]
fn read_cache_with_fill_generations_passes_the_default_random_test() {
    default_run("fixed read cache", &read_cache(true)).unwrap_or_else(|f| panic!("{f}"));
}

#[test]
fn write_racing_write_back_is_caught_by_the_default_random_test() {
    let f = default_run("write-back", &write_back(false)).expect_err("missed the lost write");
    let text = f.to_string();
    assert_eq!(f.kind, FailureKind::LostAcrossDisconnect, "{text}");
    assert!(text.starts_with("lost across disconnect: block "), "{text}");
    assert!(text.contains("before the disconnect"), "{text}");
    assert!(text.contains("after re-opening the storage"), "{text}");
    assert!(text.contains("flush"), "{text}");
}

#[test]
fn write_back_with_generations_passes_the_default_random_test() {
    default_run("fixed write-back", &write_back(true)).unwrap_or_else(|f| panic!("{f}"));
}

#[test]
fn rmw_lost_update_is_caught_by_the_default_random_test() {
    let f = default_run("rmw", &rmw(false)).expect_err("missed the lost update");
    assert_missed_write(&f);
}

#[test]
fn rmw_with_page_locks_passes_the_default_random_test() {
    default_run("fixed rmw", &rmw(true)).unwrap_or_else(|f| panic!("{f}"));
}

// ---------------------------------------------------------------------------------------------
// Direct tests: the losing interleaving, forced.

fn sectors(byte: u8, n: u64) -> Vec<u8> {
    vec![byte; (n * SECTOR) as usize]
}

/// Read-cache round on block `b`: a read misses and is stopped after fetching; a write lands;
/// then the read fills the cache. Returns what a read after both returns.
fn stale_fill_round(dev: &Arc<ReadCache>, b: u64) -> Vec<u8> {
    let at = b * SECTOR;
    dev.write(at, &sectors(1, 1)).unwrap();
    let (reached, go) = dev.store.arm(Call::Read, at);
    let reader = {
        let dev = Arc::clone(dev);
        thread::spawn(move || {
            let mut buf = sectors(0, 1);
            dev.read(at, &mut buf).map(|()| buf)
        })
    };
    reached.recv_timeout(Duration::from_secs(10)).unwrap();
    dev.write(at, &sectors(2, 1)).unwrap(); // acknowledged
    go.send(()).unwrap();
    // The racing read may return either value.
    let raced = reader.join().unwrap().unwrap();
    assert!(raced == sectors(1, 1) || raced == sectors(2, 1));
    let mut after = sectors(0, 1);
    dev.read(at, &mut after).unwrap();
    after
}

#[test]
fn stale_read_cache_fill_really_loses_acknowledged_writes() {
    for fixed in [false, true] {
        let dev = Arc::new(ReadCache::new(Store::new(512), fixed));
        let lost = (0..20)
            .filter(|&b| stale_fill_round(&dev, b) != sectors(2, 1))
            .count();
        assert_eq!(lost, if fixed { 0 } else { 20 }, "fixed: {fixed}");
    }
}

/// Write-back round on page `n`: a flush sends the page and is stopped there; a write lands;
/// the flush completes; unmount; the storage is opened again. Returns the page as re-opened.
fn write_back_round(store: &Arc<Store>, fixed: bool, n: u64) -> Vec<u8> {
    let dev = Arc::new(WriteBack::new(Arc::clone(store), fixed));
    let at = n * PAGE;
    dev.write(at, &sectors(1, 8)).unwrap();
    let (reached, go) = store.arm(Call::Write, at);
    let flusher = {
        let dev = Arc::clone(&dev);
        thread::spawn(move || dev.flush())
    };
    reached.recv_timeout(Duration::from_secs(10)).unwrap();
    dev.write(at, &sectors(2, 8)).unwrap(); // acknowledged
    go.send(()).unwrap();
    flusher.join().unwrap().unwrap();
    let mut before = sectors(0, 8);
    dev.read(at, &mut before).unwrap();
    assert_eq!(before, sectors(2, 8), "the cache itself holds the write");
    dev.unmount();
    drop(dev);
    let reopened = WriteBack::new(Arc::clone(store), fixed);
    let mut after = sectors(0, 8);
    reopened.read(at, &mut after).unwrap();
    after
}

#[test]
fn write_racing_write_back_really_loses_acknowledged_writes() {
    for fixed in [false, true] {
        let store = Store::new(4096);
        let lost = (0..20)
            .filter(|&n| write_back_round(&store, fixed, n) != sectors(2, 8))
            .count();
        assert_eq!(lost, if fixed { 0 } else { 20 }, "fixed: {fixed}");
    }
}

/// RMW round on page `n`: a write to sector 0 reads the page and is stopped there; a write to
/// sector 1 of the same page is started and given time to finish (the fixed driver makes it
/// wait for the page lock); then both complete. Returns sector 1.
fn rmw_round(dev: &Arc<Rmw>, n: u64) -> Vec<u8> {
    let at = n * PAGE;
    let (reached, go) = dev.pages.arm(Call::Read, at);
    let first = {
        let dev = Arc::clone(dev);
        thread::spawn(move || dev.write(at, &sectors(1, 1)))
    };
    reached.recv_timeout(Duration::from_secs(10)).unwrap();
    let (done_tx, done_rx) = mpsc::channel();
    let second = {
        let dev = Arc::clone(dev);
        thread::spawn(move || {
            let r = dev.write(at + SECTOR, &sectors(2, 1));
            let _ = done_tx.send(());
            r
        })
    };
    // The buggy driver finishes the second write at once; the fixed one holds it on the page
    // lock, so give up waiting after a while and let the first one go.
    let wait = if dev.fixed { 300 } else { 10_000 };
    let _ = done_rx.recv_timeout(Duration::from_millis(wait));
    go.send(()).unwrap();
    first.join().unwrap().unwrap();
    second.join().unwrap().unwrap();
    let mut got = sectors(0, 1);
    dev.read(at + SECTOR, &mut got).unwrap();
    got
}

#[test]
fn rmw_without_a_lock_really_loses_acknowledged_writes() {
    for fixed in [false, true] {
        let dev = Arc::new(Rmw::new(Store::new(4096), fixed));
        let lost = (0..20)
            .filter(|&n| rmw_round(&dev, n) != sectors(2, 1))
            .count();
        assert_eq!(lost, if fixed { 0 } else { 20 }, "fixed: {fixed}");
    }
}
