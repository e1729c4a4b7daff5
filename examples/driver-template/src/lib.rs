//! A small block device to start from: a RAM disk kept in 4 KiB pages that are allocated on first
//! write, with flush, trim and write-zeroes. Replace the storage with yours; the tests in
//! `tests/` stay as they are.

use std::collections::HashMap;
use std::io;
use std::sync::Mutex;

use userblk::{BlockDevice, Capabilities};

/// Bytes per page of storage.
const PAGE: u64 = 4096;

/// A sparse RAM disk: pages never written read as zeroes and cost nothing.
#[derive(Debug)]
pub struct PageDisk {
    size: u64,
    pages: Mutex<HashMap<u64, Box<[u8; PAGE as usize]>>>,
}

impl PageDisk {
    /// A disk of `size` bytes (rounded down to whole 512-byte blocks).
    pub fn new(size: u64) -> PageDisk {
        PageDisk {
            size: size / 512 * 512,
            pages: Mutex::new(HashMap::new()),
        }
    }

    /// How many pages hold data.
    pub fn allocated_pages(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Box<[u8; PAGE as usize]>>> {
        // A panic while holding the lock cannot leave a page half-updated in a way later readers
        // could not cope with: take the data as it is.
        self.pages.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Calls `f(page, offset in page, range in the caller's buffer)` for each page `offset..+len`
    /// touches.
    fn each_page(offset: u64, len: usize, mut f: impl FnMut(u64, usize, std::ops::Range<usize>)) {
        let mut done = 0;
        while done < len {
            let at = offset + done as u64;
            let in_page = (at % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(len - done);
            f(at / PAGE, in_page, done..done + n);
            done += n;
        }
    }
}

impl BlockDevice for PageDisk {
    fn blocks(&self) -> u64 {
        self.size / 512
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            flush: true,
            trim: true,
            trim_zeroes: true,
            write_zeroes: true,
            ..Capabilities::default()
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let pages = self.lock();
        PageDisk::each_page(offset, buf.len(), |p, at, r| {
            let n = r.len();
            match pages.get(&p) {
                Some(page) => buf[r].copy_from_slice(&page[at..at + n]),
                None => buf[r].fill(0),
            }
        });
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut pages = self.lock();
        PageDisk::each_page(offset, data.len(), |p, at, r| {
            let n = r.len();
            let page = pages
                .entry(p)
                .or_insert_with(|| Box::new([0; PAGE as usize]));
            page[at..at + n].copy_from_slice(&data[r]);
        });
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        // Nothing is cached on the way to the pages: every write is already "durable".
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool) -> io::Result<()> {
        let mut pages = self.lock();
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(22))?;
        PageDisk::each_page(offset, len, |p, at, r| {
            if r.len() == PAGE as usize {
                // A whole page: free it (it reads as zeroes).
                pages.remove(&p);
            } else if let Some(page) = pages.get_mut(&p) {
                page[at..at + r.len()].fill(0);
            }
        });
        Ok(())
    }
}
