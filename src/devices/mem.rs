//! [`MemDevice`]: a RAM disk, allocated lazily in chunks so that a large one costs only what is
//! written, with per-chunk locks so that concurrent requests to different places do not contend.

use std::io;
use std::sync::{PoisonError, RwLock};

use crate::device::{BlockDevice, Capabilities};

/// Allocation and locking granule.
const CHUNK: usize = 64 << 10;

/// A sparse in-memory block device. Never-written and trimmed ranges read as zeroes.
#[derive(Debug)]
pub struct MemDevice {
    chunks: Vec<RwLock<Option<Box<[u8]>>>>,
    size: u64,
    block_size: u32,
}

impl MemDevice {
    /// A RAM disk of `size` bytes (rounded down to whole 512-byte blocks).
    pub fn new(size: u64) -> MemDevice {
        MemDevice::with_block_size(size, 512)
    }

    /// A RAM disk of `size` bytes (rounded down to whole blocks) with the given logical block
    /// size. A block size the server cannot serve is reported when serving starts.
    pub fn with_block_size(size: u64, block_size: u32) -> MemDevice {
        let bs = u64::from(block_size.max(1));
        let size = size / bs * bs;
        let n = size.div_ceil(CHUNK as u64) as usize;
        MemDevice {
            chunks: (0..n).map(|_| RwLock::new(None)).collect(),
            size,
            block_size,
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes of memory holding data (written and not since trimmed), in whole chunks.
    pub fn allocated(&self) -> u64 {
        let n = self
            .chunks
            .iter()
            .filter(|c| c.read().unwrap_or_else(PoisonError::into_inner).is_some())
            .count();
        (n * CHUNK) as u64
    }

    /// Visits each chunk-bounded piece of `offset..offset+len`: (chunk index, offset in chunk,
    /// offset in the caller's buffer, length).
    fn pieces(
        &self,
        offset: u64,
        len: usize,
    ) -> impl Iterator<Item = (usize, usize, usize, usize)> {
        let mut done = 0usize;
        std::iter::from_fn(move || {
            if done >= len {
                return None;
            }
            let pos = offset + done as u64;
            let idx = (pos / CHUNK as u64) as usize;
            let within = (pos % CHUNK as u64) as usize;
            let n = (CHUNK - within).min(len - done);
            let piece = (idx, within, done, n);
            done += n;
            Some(piece)
        })
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::from_raw_os_error(22)),
        }
    }

    /// Sets a range to zeroes, freeing whole chunks.
    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        for (idx, within, _, n) in self.pieces(offset, len as usize) {
            let mut chunk = self.chunks[idx]
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            if n == CHUNK {
                *chunk = None;
            } else if let Some(data) = chunk.as_mut() {
                data[within..within + n].fill(0);
            }
        }
        Ok(())
    }
}

impl BlockDevice for MemDevice {
    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn blocks(&self) -> u64 {
        self.size / u64::from(self.block_size.max(1))
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            flush: true,
            fua: true,
            trim: true,
            trim_zeroes: true,
            write_zeroes: true,
            never_blocks: true,
            ..Capabilities::default()
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        for (idx, within, at, n) in self.pieces(offset, buf.len()) {
            let chunk = self.chunks[idx]
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            match chunk.as_ref() {
                Some(data) => buf[at..at + n].copy_from_slice(&data[within..within + n]),
                None => buf[at..at + n].fill(0),
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check(offset, data.len() as u64)?;
        for (idx, within, at, n) in self.pieces(offset, data.len()) {
            let mut chunk = self.chunks[idx]
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let dst = chunk.get_or_insert_with(|| vec![0u8; CHUNK].into_boxed_slice());
            dst[within..within + n].copy_from_slice(&data[at..at + n]);
        }
        Ok(())
    }

    fn write_fua(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        // Memory has no cache to bypass.
        self.write(offset, data)
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.zero(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool) -> io::Result<()> {
        self.zero(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_back_across_chunks_and_frees_on_trim() {
        let dev = MemDevice::new(4 * CHUNK as u64);
        let data: Vec<u8> = (0..CHUNK + 1024).map(|i| (i % 251) as u8).collect();
        dev.write(CHUNK as u64 - 512, &data).unwrap();
        let mut back = vec![0u8; data.len()];
        dev.read(CHUNK as u64 - 512, &mut back).unwrap();
        assert_eq!(back, data);
        assert_eq!(dev.allocated(), 3 * CHUNK as u64);
        dev.trim(CHUNK as u64, CHUNK as u64).unwrap();
        assert_eq!(dev.allocated(), 2 * CHUNK as u64);
        dev.read(CHUNK as u64 - 512, &mut back).unwrap();
        assert_eq!(back[..512], data[..512]);
        assert!(back[512..512 + CHUNK].iter().all(|&b| b == 0));
        assert_eq!(back[512 + CHUNK..], data[512 + CHUNK..]);
    }

    #[test]
    fn out_of_range_is_einval_not_panic() {
        let dev = MemDevice::new(8192);
        let mut buf = [0u8; 1024];
        assert_eq!(
            dev.read(7680, &mut buf).unwrap_err().raw_os_error(),
            Some(22)
        );
        assert_eq!(
            dev.write(u64::MAX - 10, &buf).unwrap_err().raw_os_error(),
            Some(22)
        );
    }

    #[test]
    fn size_rounds_down_to_blocks() {
        assert_eq!(MemDevice::new(1000).blocks(), 1);
        assert_eq!(MemDevice::with_block_size(10_000, 4096).size(), 8192);
    }
}
