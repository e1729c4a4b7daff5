//! Seeded bug: 32-bit sector arithmetic. A store of 4 KiB pages keyed by sector number, with
//! the sector computed as `(offset >> 9) as u32`: right below 2 TiB, and from there every page
//! lands on the page 2^41 bytes below it, so a write at 2 TiB + X and a write at X share one
//! page and the earlier one is lost. `huge_offsets` catches it with the defaults; the same store
//! keeping sectors in a `u64` passes the whole suite.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use userblk::{BlockDevice, Capabilities};
use userblk_harness::conformance::{self, Outcome};
use userblk_harness::factory::Reopen;
use userblk_harness::target::LoopbackRig;

const PAGE: usize = 4096;
const TIB: u64 = 1 << 40;

/// Sectors as many drivers (and on-disk formats) keep them: in 32 bits.
fn sector_u32(offset: u64) -> u64 {
    u64::from((offset >> 9) as u32)
}

fn sector_u64(offset: u64) -> u64 {
    offset >> 9
}

/// A sparse store of 4 KiB pages, keyed by the sector number of their first byte.
struct PageStore {
    pages: Mutex<HashMap<u64, Box<[u8; PAGE]>>>,
    size: u64,
    sector: fn(u64) -> u64,
}

impl PageStore {
    fn new(size: u64, sector: fn(u64) -> u64) -> PageStore {
        PageStore {
            pages: Mutex::new(HashMap::new()),
            size,
            sector,
        }
    }

    fn check(&self, offset: u64, len: usize) -> io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::from_raw_os_error(22)),
        }
    }

    /// Each page-bounded piece of a request: (page key, offset in the page, offset in the
    /// buffer, length).
    fn pieces(&self, offset: u64, len: usize) -> Vec<(u64, usize, usize, usize)> {
        let mut out = Vec::new();
        let mut done = 0;
        while done < len {
            let pos = offset + done as u64;
            let within = (pos % PAGE as u64) as usize;
            let n = (PAGE - within).min(len - done);
            out.push(((self.sector)(pos - within as u64), within, done, n));
            done += n;
        }
        out
    }
}

impl BlockDevice for PageStore {
    fn blocks(&self) -> u64 {
        self.size / 512
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            flush: true,
            ..Capabilities::default()
        }
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len())?;
        let pages = self.pages.lock().unwrap_or_else(PoisonError::into_inner);
        for (key, within, at, n) in self.pieces(offset, buf.len()) {
            match pages.get(&key) {
                Some(p) => buf[at..at + n].copy_from_slice(&p[within..within + n]),
                None => buf[at..at + n].fill(0),
            }
        }
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check(offset, data.len())?;
        let mut pages = self.pages.lock().unwrap_or_else(PoisonError::into_inner);
        for (key, within, at, n) in self.pieces(offset, data.len()) {
            let page = pages.entry(key).or_insert_with(|| Box::new([0; PAGE]));
            page[within..within + n].copy_from_slice(&data[at..at + n]);
        }
        Ok(())
    }
}

#[test]
fn thirty_two_bit_sectors_lose_the_write_at_2_tib_plus_x() {
    let buggy = PageStore::new(3 * TIB, sector_u32);
    buggy.write(2 * TIB + 4096, &[0xaa; 4096]).unwrap();
    buggy.write(4096, &[0x55; 4096]).unwrap();
    let mut back = [0u8; 4096];
    buggy.read(2 * TIB + 4096, &mut back).unwrap();
    // The data written at 2 TiB + 4096 is gone: it reads as what was written at 4096.
    assert_eq!(back, [0x55; 4096]);

    let correct = PageStore::new(3 * TIB, sector_u64);
    correct.write(2 * TIB + 4096, &[0xaa; 4096]).unwrap();
    correct.write(4096, &[0x55; 4096]).unwrap();
    correct.read(2 * TIB + 4096, &mut back).unwrap();
    assert_eq!(back, [0xaa; 4096]);
}

#[test]
fn thirty_two_bit_sectors_are_caught_by_huge_offsets() {
    let factory = || PageStore::new(3 * TIB, sector_u32);
    let caps = factory().capabilities();
    let report = conformance::run_all(&LoopbackRig::default(), &factory, caps);
    println!("{report}");
    assert!(!report.all_passed());
    let Outcome::Fail(msg) = &report.case("huge_offsets").unwrap().outcome else {
        panic!("huge_offsets missed 32-bit sector arithmetic:\n{report}");
    };
    let first = msg.lines().next().unwrap();
    assert!(first.starts_with("lost write: data written at "), "{msg}");
    assert!(first.contains(" was overwritten by a write at "), "{msg}");
    assert!(
        first.ends_with("(offsets differing by 2^41 alias)"),
        "{msg}"
    );
    // Every pair of X and 2 TiB + X is listed.
    assert!(
        msg.contains("data written at 2 TiB + 4096 was overwritten by a write at 4096 (offsets differing by 2^41 alias)"),
        "{msg}"
    );
    // The cases that do not go near 2 TiB pass: only huge_offsets sees this bug.
    for case in ["read_after_write", "request_sizes", "in_flight_disjoint"] {
        assert_eq!(
            report.case(case).unwrap().outcome,
            Outcome::Pass,
            "{case}\n{report}"
        );
    }
}

#[test]
fn sixty_four_bit_sectors_pass_the_whole_suite() {
    // Re-openable (the same store served again), for the durability cases.
    let factory = Reopen::new(
        || Ok(Arc::new(PageStore::new(3 * TIB, sector_u64))),
        |store: &Arc<PageStore>| Ok(Arc::clone(store)),
    );
    let caps = PageStore::new(3 * TIB, sector_u64).capabilities();
    let report = conformance::run_all(&LoopbackRig::default(), &factory, caps);
    assert!(report.all_passed(), "{report}");
}
