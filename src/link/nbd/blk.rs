//! Safe wrappers of the block-device ioctls a test needs on a device node such as `/dev/nbd0`:
//! size, logical block size, discard (TRIM), zero-out (WRITE_ZEROES) and flushing the buffer
//! cache. Offsets and lengths are in bytes and must be multiples of the logical block size.
//!
//! Never call these, or open the node at all, from a thread that serves the device: the kernel
//! may need that very thread to answer.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::fcntl::{fallocate, FallocateFlags};
use nix::libc;

use super::sys;

/// Opens a block device node for direct I/O (`O_DIRECT`: no page cache, so every read and write
/// reaches the device), read-write or read-only, with `O_DSYNC` if asked: then each write is
/// durable when it returns, which the kernel does with FUA when the device advertises it (else
/// WRITE then FLUSH). Buffers, offsets and lengths must be aligned to the logical block size:
/// see [`AlignedBuf`].
pub fn open_direct(path: &Path, write: bool, dsync: bool) -> io::Result<File> {
    let mut flags = libc::O_DIRECT | libc::O_CLOEXEC;
    if dsync {
        flags |= libc::O_DSYNC;
    }
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(flags)
        .open(path)
}

/// Deallocates `len` bytes at `offset` so that they read as zeroes
/// (`fallocate(PUNCH_HOLE | KEEP_SIZE)`): the kernel sends WRITE_ZEROES without NO_HOLE, and
/// fails with EOPNOTSUPP when the device does not advertise WRITE_ZEROES.
pub fn punch_hole(dev: impl AsFd, offset: u64, len: u64) -> io::Result<()> {
    let too_big = || io::Error::from_raw_os_error(libc::EOVERFLOW);
    let offset = libc::off_t::try_from(offset).map_err(|_| too_big())?;
    let len = libc::off_t::try_from(len).map_err(|_| too_big())?;
    fallocate(
        dev,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
    .map_err(io::Error::from)
}

/// A zeroed byte buffer whose start is aligned (to 4096 bytes by default), as `O_DIRECT` needs.
#[derive(Clone, Debug)]
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes starting at a 4096-byte boundary.
    pub fn new(len: usize) -> AlignedBuf {
        AlignedBuf::with_alignment(len, 4096)
    }

    /// `len` zero bytes starting at a multiple of `align` (a power of two).
    pub fn with_alignment(len: usize, align: usize) -> AlignedBuf {
        let align = align.max(1).next_power_of_two();
        let raw = vec![0u8; len + align];
        let start = raw.as_ptr().align_offset(align).min(align);
        AlignedBuf { raw, start, len }
    }

    /// A copy of `data`, aligned.
    pub fn from_slice(data: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::new(data.len());
        b.copy_from_slice(data);
        b
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// The device's size in bytes (`BLKGETSIZE64`).
pub fn size(dev: impl AsFd) -> io::Result<u64> {
    sys::blk_get_size64(dev.as_fd())
}

/// The logical block size in bytes (`BLKSSZGET`).
pub fn logical_block_size(dev: impl AsFd) -> io::Result<u32> {
    sys::blk_ssz_get(dev.as_fd())
}

/// Discards `len` bytes at `offset` (`BLKDISCARD`): the kernel sends TRIM, or fails with
/// EOPNOTSUPP when the device does not advertise it. The page cache of the range is dropped.
pub fn discard(dev: impl AsFd, offset: u64, len: u64) -> io::Result<()> {
    sys::blk_range(dev.as_fd(), sys::RangeIoctl::Discard, offset, len)
}

/// Makes `len` bytes at `offset` read as zeroes and stay allocated (`BLKZEROOUT`): the kernel
/// sends WRITE_ZEROES with NO_HOLE when the device advertises it (6.12+), else zero-filled WRITEs.
pub fn zero_out(dev: impl AsFd, offset: u64, len: u64) -> io::Result<()> {
    sys::blk_range(dev.as_fd(), sys::RangeIoctl::ZeroOut, offset, len)
}

/// Writes back and invalidates the device's buffer cache (`BLKFLSBUF`).
pub fn flush_buffers(dev: impl AsFd) -> io::Result<()> {
    sys::blk_flsbuf(dev.as_fd())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_is_not_a_block_device() {
        let f = tempfile::tempfile().unwrap();
        // ENOTTY: the ioctls are refused, not misread.
        assert_eq!(size(&f).unwrap_err().raw_os_error(), Some(25));
        assert_eq!(logical_block_size(&f).unwrap_err().raw_os_error(), Some(25));
        assert_eq!(discard(&f, 0, 512).unwrap_err().raw_os_error(), Some(25));
        assert_eq!(zero_out(&f, 0, 512).unwrap_err().raw_os_error(), Some(25));
        assert_eq!(flush_buffers(&f).unwrap_err().raw_os_error(), Some(25));
    }

    #[test]
    fn aligned_buffers_are_aligned() {
        for len in [0, 1, 512, 4096, 100_000] {
            let b = AlignedBuf::new(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % 4096, 0);
            assert!(b.iter().all(|&x| x == 0));
        }
        let b = AlignedBuf::from_slice(&[7; 1000]);
        assert_eq!(&b[..], &[7; 1000][..]);
        assert_eq!(
            AlignedBuf::with_alignment(10, 512).as_ptr() as usize % 512,
            0
        );
    }
}
