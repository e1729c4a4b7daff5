//! Safe wrappers of the block-device ioctls a test needs on a device node such as `/dev/nbd0`:
//! size, logical block size, discard (TRIM), zero-out (WRITE_ZEROES) and flushing the buffer
//! cache. Offsets and lengths are in bytes and must be multiples of the logical block size.
//!
//! They take a [`BlockNode`], a file checked to be a block device when it was made: the same
//! ioctl numbers on another kind of file could be another driver's ioctls, writing memory of
//! another size through the pointer.
//!
//! Never call these, or open the node at all, from a thread that serves the device: the kernel
//! may need that very thread to answer.

use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use nix::fcntl::{fallocate, FallocateFlags};
use nix::libc;

use super::sys;

/// Why a file was refused as a block device node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// `fstat` on the descriptor failed.
    #[error("fstat failed: {0}")]
    Stat(#[source] io::Error),
    /// The file is not a block device.
    #[error("not a block device: a {kind}")]
    NotBlockDevice {
        /// What it is instead: "regular file", "character device", "directory", ...
        kind: &'static str,
    },
    /// A block device, but not one of the NBD driver's (block major 43).
    #[error("block device {major}:{minor} is not an NBD device (major 43)")]
    NotNbd {
        /// Its major number.
        major: u64,
        /// Its minor number.
        minor: u64,
    },
}

impl From<NodeError> for io::Error {
    fn from(e: NodeError) -> io::Error {
        match e {
            NodeError::Stat(source) => source,
            other => io::Error::new(io::ErrorKind::InvalidInput, other),
        }
    }
}

/// The metadata of `file` if it is a block device.
pub(crate) fn block_metadata(file: &File) -> Result<Metadata, NodeError> {
    let meta = file.metadata().map_err(NodeError::Stat)?;
    let t = meta.file_type();
    if t.is_block_device() {
        return Ok(meta);
    }
    let kind = if t.is_file() {
        "regular file"
    } else if t.is_dir() {
        "directory"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else {
        "file of another type"
    };
    Err(NodeError::NotBlockDevice { kind })
}

/// An open block device node (`S_ISBLK`, checked with `fstat` when it was made): what the
/// ioctl wrappers of this module take. It reads and writes as the [`File`] it derefs to.
#[derive(Debug)]
pub struct BlockNode(File);

impl BlockNode {
    /// Checks that `file` is a block device; [`NodeError::NotBlockDevice`] otherwise.
    pub fn new(file: File) -> Result<BlockNode, NodeError> {
        block_metadata(&file)?;
        Ok(BlockNode(file))
    }

    /// The file back.
    pub fn into_file(self) -> File {
        self.0
    }
}

impl Deref for BlockNode {
    type Target = File;
    fn deref(&self) -> &File {
        &self.0
    }
}

impl AsFd for BlockNode {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// Opens a block device node for direct I/O (`O_DIRECT`: no page cache, so every read and write
/// reaches the device), read-write or read-only, with `O_DSYNC` if asked: then each write is
/// durable when it returns, which the kernel does with FUA when the device advertises it (else
/// WRITE then FLUSH). Buffers, offsets and lengths must be aligned to the logical block size:
/// see [`AlignedBuf`]. A path that is not a block device fails with `InvalidInput` carrying a
/// [`NodeError`].
pub fn open_direct(path: &Path, write: bool, dsync: bool) -> io::Result<BlockNode> {
    let mut flags = libc::O_DIRECT | libc::O_CLOEXEC;
    if dsync {
        flags |= libc::O_DSYNC;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(flags)
        .open(path)?;
    Ok(BlockNode::new(file)?)
}

/// Deallocates `len` bytes at `offset` so that they read as zeroes
/// (`fallocate(PUNCH_HOLE | KEEP_SIZE)`): the kernel sends WRITE_ZEROES without NO_HOLE, and
/// fails with EOPNOTSUPP when the device does not advertise WRITE_ZEROES. (`fallocate` means the
/// same on any file, so this one takes any descriptor.)
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
/// A clone is aligned too (a fresh allocation, aligned on its own).
#[derive(Debug)]
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
    align: usize,
}

impl AlignedBuf {
    /// `len` zero bytes starting at a 4096-byte boundary.
    pub fn new(len: usize) -> AlignedBuf {
        AlignedBuf::with_alignment(len, 4096)
    }

    /// `len` zero bytes starting at a multiple of `align` (rounded up to a power of two).
    pub fn with_alignment(len: usize, align: usize) -> AlignedBuf {
        let align = align.max(1).next_power_of_two();
        let raw = vec![0u8; len + align];
        let start = raw.as_ptr().align_offset(align).min(align);
        AlignedBuf {
            raw,
            start,
            len,
            align,
        }
    }

    /// A copy of `data`, aligned.
    pub fn from_slice(data: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::new(data.len());
        b.copy_from_slice(data);
        b
    }

    /// The alignment of its start.
    pub fn alignment(&self) -> usize {
        self.align
    }
}

impl Clone for AlignedBuf {
    /// A new buffer aligned on its own: a derived clone would copy the original's offset into
    /// an allocation that starts elsewhere, and `O_DIRECT` would then fail with EINVAL.
    fn clone(&self) -> AlignedBuf {
        let mut b = AlignedBuf::with_alignment(self.len, self.align);
        b.copy_from_slice(self);
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
pub fn size(dev: &BlockNode) -> io::Result<u64> {
    sys::blk_get_size64(dev)
}

/// The logical block size in bytes (`BLKSSZGET`).
pub fn logical_block_size(dev: &BlockNode) -> io::Result<u32> {
    sys::blk_ssz_get(dev)
}

/// Discards `len` bytes at `offset` (`BLKDISCARD`): the kernel sends TRIM, or fails with
/// EOPNOTSUPP when the device does not advertise it. The page cache of the range is dropped.
pub fn discard(dev: &BlockNode, offset: u64, len: u64) -> io::Result<()> {
    sys::blk_range(dev, sys::RangeIoctl::Discard, offset, len)
}

/// Makes `len` bytes at `offset` read as zeroes and stay allocated (`BLKZEROOUT`): the kernel
/// sends WRITE_ZEROES with NO_HOLE when the device advertises it (6.12+), else zero-filled WRITEs.
pub fn zero_out(dev: &BlockNode, offset: u64, len: u64) -> io::Result<()> {
    sys::blk_range(dev, sys::RangeIoctl::ZeroOut, offset, len)
}

/// Writes back and invalidates the device's buffer cache (`BLKFLSBUF`).
pub fn flush_buffers(dev: &BlockNode) -> io::Result<()> {
    sys::blk_flsbuf(dev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::nbd::sys::NbdNode;
    use std::os::unix::fs::MetadataExt;

    /// Each constructor refuses what is not its kind of node, with the reason, before any ioctl
    /// could be issued on it.
    #[test]
    fn a_regular_file_or_dev_null_is_refused_by_each_constructor() {
        let file = || tempfile::tempfile().unwrap();
        let null = || File::open("/dev/null").unwrap();
        for (what, f, kind) in [
            ("tempfile", file(), "regular file"),
            ("/dev/null", null(), "character device"),
        ] {
            let e = BlockNode::new(f).unwrap_err();
            assert!(
                matches!(e, NodeError::NotBlockDevice { kind: k } if k == kind),
                "{what}: {e:?}"
            );
            assert_eq!(e.to_string(), format!("not a block device: a {kind}"));
        }
        for (what, f, kind) in [
            ("tempfile", file(), "regular file"),
            ("/dev/null", null(), "character device"),
        ] {
            let e = NbdNode::new(f).unwrap_err();
            assert!(
                matches!(e, NodeError::NotBlockDevice { kind: k } if k == kind),
                "{what}: {e:?}"
            );
        }
        let dir = File::open("/").unwrap();
        assert!(matches!(
            BlockNode::new(dir),
            Err(NodeError::NotBlockDevice { kind: "directory" })
        ));
        // open_direct says so too, as an io::Error carrying the NodeError.
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let e = open_direct(tmp.path(), false, false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(matches!(
            e.get_ref().and_then(|e| e.downcast_ref::<NodeError>()),
            Some(NodeError::NotBlockDevice { .. })
        ));
    }

    /// A block device that is not NBD's passes BlockNode and fails NbdNode, where this machine
    /// has one that can be opened (a loop device, say).
    #[test]
    fn another_drivers_block_device_is_not_an_nbd_node() {
        let found = std::fs::read_dir("/dev")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_block_device()))
            .filter(|e| !e.file_name().to_string_lossy().starts_with("nbd"))
            .find_map(|e| File::open(e.path()).ok());
        let Some(dev) = found else {
            println!("skipped: no block device other than NBD's can be opened here");
            return;
        };
        let major = nix::sys::stat::major(dev.metadata().unwrap().rdev());
        let node = BlockNode::new(dev).unwrap();
        let e = NbdNode::new(node.into_file()).unwrap_err();
        assert!(
            matches!(e, NodeError::NotNbd { major: m, .. } if m == major),
            "{e:?}"
        );
        assert!(
            e.to_string().ends_with("is not an NBD device (major 43)"),
            "{e}"
        );
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

    /// A clone is a new allocation: it must be aligned on its own, not keep the original's
    /// offset. (The derived Clone did, and O_DIRECT I/O from a clone failed with EINVAL.)
    #[test]
    fn clones_are_aligned_and_equal() {
        let mut kept = Vec::new();
        for len in [1usize, 512, 1000, 4096, 8192, 65536] {
            for align in [512usize, 4096] {
                let mut b = AlignedBuf::with_alignment(len, align);
                b.iter_mut().enumerate().for_each(|(i, x)| *x = i as u8);
                // Many clones, kept alive, so that they land at many different addresses.
                for _ in 0..16 {
                    let c = b.clone();
                    assert_eq!(c.as_ptr() as usize % align, 0, "len {len}, align {align}");
                    assert_eq!(c.alignment(), align);
                    assert_eq!(&c[..], &b[..]);
                    kept.push(c);
                }
            }
        }
    }
}
