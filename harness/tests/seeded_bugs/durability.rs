//! Seeded durability bugs in a page write-back cache over a slow "disk" (the storage a factory
//! re-opens): (a) `unmount()` drops dirty pages, losing acknowledged writes on every clean
//! disconnect; (b) a flush marks the pages it wrote back clean even if a write changed them
//! meanwhile, so that write is lost behind the next flush. Each is shown losing data directly,
//! caught by the harness with its defaults, and the correct cache passes.

use std::collections::HashMap;
use std::io;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use userblk::{BlockDevice, Capabilities, LoopbackKernel, MemDevice};
use userblk_harness::conformance::{self, Outcome};
use userblk_harness::crash::{
    self, check_concurrent, ConcurrentOptions, CrashError, CrashOptions, Crashable, ViolationKind,
};
use userblk_harness::factory::{DeviceFactory, Reopen};
use userblk_harness::target::LoopbackRig;

const PAGE: usize = 4096;
const SIZE: u64 = 8 << 20;
/// What writing one page back to the disk costs.
const DISK_LATENCY: Duration = Duration::from_micros(50);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The durable store: pages that survive a power loss and outlive the cache.
#[derive(Default)]
struct Disk {
    pages: Mutex<HashMap<u64, Vec<u8>>>,
}

impl Disk {
    fn write_page(&self, page: u64, data: &[u8]) {
        std::thread::sleep(DISK_LATENCY);
        lock(&self.pages).insert(page, data.to_vec());
    }

    fn read_page(&self, page: u64) -> Vec<u8> {
        lock(&self.pages)
            .get(&page)
            .cloned()
            .unwrap_or_else(|| vec![0; PAGE])
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bug {
    None,
    /// (a) `unmount()` forgets the dirty pages instead of writing them back.
    UnmountDropsDirty,
    /// (b) A flush marks every page it sent clean, though a write may have changed one since.
    CleanAfterSend,
}

struct Page {
    data: Vec<u8>,
    dirty: bool,
    /// Bumped by every write, so that a flush knows whether the page changed since it sent it.
    version: u64,
}

/// Called by a flush between sending the dirty pages and marking them clean.
type Hook = Box<dyn FnOnce() + Send>;

/// A write-back cache of 4 KiB pages over a [`Disk`], with 512-byte blocks.
struct WriteBackCache {
    disk: Arc<Disk>,
    pages: Mutex<HashMap<u64, Page>>,
    /// One write-back at a time, so that an older copy of a page never lands after a newer.
    flushing: Mutex<()>,
    bug: Bug,
    after_send: Mutex<Option<Hook>>,
}

impl WriteBackCache {
    fn new(disk: Arc<Disk>, bug: Bug) -> WriteBackCache {
        WriteBackCache {
            disk,
            pages: Mutex::new(HashMap::new()),
            flushing: Mutex::new(()),
            bug,
            after_send: Mutex::new(None),
        }
    }
}

impl BlockDevice for WriteBackCache {
    fn blocks(&self) -> u64 {
        SIZE / 512
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            flush: true,
            ..Capabilities::default()
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let pages = lock(&self.pages);
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let (page, within) = (at / PAGE as u64, (at % PAGE as u64) as usize);
            let n = (PAGE - within).min(buf.len() - done);
            let src = match pages.get(&page) {
                Some(p) => p.data[within..within + n].to_vec(),
                None => self.disk.read_page(page)[within..within + n].to_vec(),
            };
            buf[done..done + n].copy_from_slice(&src);
            done += n;
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut pages = lock(&self.pages);
        let mut done = 0;
        while done < data.len() {
            let at = offset + done as u64;
            let (page, within) = (at / PAGE as u64, (at % PAGE as u64) as usize);
            let n = (PAGE - within).min(data.len() - done);
            let p = pages.entry(page).or_insert_with(|| Page {
                data: self.disk.read_page(page),
                dirty: false,
                version: 0,
            });
            p.data[within..within + n].copy_from_slice(&data[done..done + n]);
            p.dirty = true;
            p.version += 1;
            done += n;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let _one = lock(&self.flushing);
        let sent: Vec<(u64, u64, Vec<u8>)> = lock(&self.pages)
            .iter()
            .filter(|(_, p)| p.dirty)
            .map(|(n, p)| (*n, p.version, p.data.clone()))
            .collect();
        // The slow part, without holding the cache: writes go on meanwhile.
        for (page, _, data) in &sent {
            self.disk.write_page(*page, data);
        }
        if let Some(hook) = lock(&self.after_send).take() {
            hook();
        }
        let mut pages = lock(&self.pages);
        for (page, version, _) in sent {
            if let Some(p) = pages.get_mut(&page) {
                // The correct cache: clean only if no write changed the page since it was sent.
                if self.bug == Bug::CleanAfterSend || p.version == version {
                    p.dirty = false;
                }
            }
        }
        Ok(())
    }

    fn unmount(&self) {
        if self.bug == Bug::UnmountDropsDirty {
            lock(&self.pages).clear();
        } else {
            let _ = self.flush();
        }
    }
}

/// What survives a power loss: the disk, not the cache.
impl Crashable for WriteBackCache {
    fn crash(&self) -> io::Result<Box<dyn BlockDevice>> {
        let survivor = MemDevice::new(SIZE);
        for (page, data) in lock(&self.disk.pages).iter() {
            survivor.write(page * PAGE as u64, data)?;
        }
        Ok(Box::new(survivor))
    }
}

/// The factory a driver author would write: new storage is a new disk; opening one puts a
/// cache in front of it.
fn factory(bug: Bug) -> impl DeviceFactory {
    Reopen::new(
        || Ok(Arc::new(Disk::default())),
        move |disk: &Arc<Disk>| Ok(WriteBackCache::new(Arc::clone(disk), bug)),
    )
    .crashable()
}

fn page_of(fill: u8) -> Vec<u8> {
    vec![fill; PAGE]
}

// --- (a) unmount drops dirty pages ------------------------------------------------------------

/// Writes a page through the fake kernel, disconnects cleanly, re-opens the same storage and
/// returns what the page holds then.
fn across_disconnect(bug: Bug) -> Vec<u8> {
    let storage = factory(bug).storage().unwrap().unwrap();
    let kernel = LoopbackKernel::start(storage.open().unwrap()).unwrap();
    kernel.write(8192, &page_of(7)).unwrap();
    kernel.shutdown().unwrap(); // DISC: the server unmounts the device
    let mut back = vec![0; PAGE];
    storage.open().unwrap().read(8192, &mut back).unwrap();
    back
}

#[test]
fn an_unmount_that_drops_dirty_pages_loses_acknowledged_writes_across_a_disconnect() {
    assert_eq!(across_disconnect(Bug::UnmountDropsDirty), page_of(0));
    assert_eq!(across_disconnect(Bug::None), page_of(7));
}

#[test]
fn an_unmount_that_drops_dirty_pages_is_caught_by_the_durability_case() {
    let rig = LoopbackRig::default();
    let buggy = factory(Bug::UnmountDropsDirty);
    let caps = buggy.create().unwrap().capabilities();
    let report = conformance::run_all(&rig, &buggy, caps);
    let Outcome::Fail(msg) = &report.case("reopen_after_writes").unwrap().outcome else {
        panic!("not caught:\n{report}")
    };
    println!("{msg}");
    assert!(
        msg.starts_with("lost across disconnect: "),
        "first line: {msg}"
    );
    assert!(msg.contains("written without a flush"), "{msg}");
    assert!(msg.contains("eight blocks in the middle"), "{msg}");
    let correct = factory(Bug::None);
    let report = conformance::run_all(&rig, &correct, caps);
    assert!(report.all_passed(), "{report}");
}

// --- (b) a flush marks pages clean after sending them ----------------------------------------

/// Forces the race: a write lands on page 0 while a flush is writing it back; then a flush
/// that returns Ok, and a power loss. Returns what page 0 holds after it.
fn write_racing_a_write_back(bug: Bug) -> Vec<u8> {
    let dev = Arc::new(WriteBackCache::new(Arc::new(Disk::default()), bug));
    dev.write(0, &page_of(1)).unwrap();
    let (sent_tx, sent_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    *lock(&dev.after_send) = Some(Box::new(move || {
        sent_tx.send(()).unwrap();
        go_rx.recv().unwrap();
    }));
    let flusher = {
        let dev = Arc::clone(&dev);
        std::thread::spawn(move || dev.flush())
    };
    sent_rx.recv().unwrap(); // page 0 (fill 1) is on the disk; not yet marked clean
    dev.write(0, &page_of(2)).unwrap(); // completes before the next flush is sent
    go_tx.send(()).unwrap();
    flusher.join().unwrap().unwrap();
    dev.flush().unwrap(); // covers the write of fill 2
    let mut back = vec![0; PAGE];
    dev.crash().unwrap().read(0, &mut back).unwrap();
    back
}

#[test]
fn marking_pages_clean_after_sending_them_loses_a_write_behind_a_flush() {
    assert_eq!(write_racing_a_write_back(Bug::CleanAfterSend), page_of(1));
    assert_eq!(write_racing_a_write_back(Bug::None), page_of(2));
}

#[test]
fn marking_pages_clean_after_sending_them_is_caught_by_the_concurrent_crash_checker() {
    // One stream at a time never races a write-back: the sequential checker cannot see it.
    let ops = crash::random_ops(1, 1 << 20, 512, 300);
    crash::check(
        &factory(Bug::CleanAfterSend),
        &ops,
        &CrashOptions::default(),
    )
    .unwrap();
    let err = check_concurrent(&factory(Bug::CleanAfterSend), &ConcurrentOptions::default())
        .expect_err("the concurrent checker missed a write lost behind a flush");
    let CrashError::Violation(v) = &err else {
        panic!("expected a violation, got {err}")
    };
    assert_eq!(v.kind, ViolationKind::LostAfterFlush, "{v}");
    let text = err.to_string();
    println!("{text}");
    assert!(text.starts_with("lost after flush: block "), "{text}");
    assert!(text.contains("concurrent run: seed "), "{text}");
    check_concurrent(&factory(Bug::None), &ConcurrentOptions::default()).unwrap();
}

#[test]
fn a_factory_that_cannot_reopen_is_reported_as_not_run_with_how_to_fix_it() {
    let factory = || MemDevice::new(SIZE);
    let report = conformance::run_all(&LoopbackRig::default(), &factory, factory().capabilities());
    for case in [
        "reopen_after_writes",
        "reopen_after_flush",
        "reopen_after_fua",
    ] {
        let Outcome::NotRun(why) = &report.case(case).unwrap().outcome else {
            panic!("{case} ran without storage to re-open:\n{report}")
        };
        assert!(why.contains("factory::Reopen::new("), "{why}");
    }
    assert!(!report.all_passed(), "{report}");
    // Not Crashable: nothing to check, a skip.
    let crash = &report.case("crash_and_reopen").unwrap().outcome;
    assert!(matches!(crash, Outcome::Skip(_)), "{crash:?}");
}
