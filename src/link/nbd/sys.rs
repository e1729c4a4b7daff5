//! The raw system calls of the NBD link. Every `unsafe` block in userblk is in this file; each
//! wraps one call whose arguments are plain integers or pointers to locals that outlive it, and
//! says why in its `SAFETY` comment. Everything above this file is safe Rust.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;

use nix::libc;
use nix::sys::ioctl::ioctl_num_type;

use super::blk::{block_metadata, BlockNode, NodeError};

/// The NBD driver's block major number (include/uapi/linux/major.h, `NBD_MAJOR`).
pub(crate) const NBD_MAJOR: u64 = 43;

/// An open NBD device node: a block device with NBD's major number, checked with `fstat` when
/// it was made. The NBD ioctls are only issued on one of these: on another file their numbers
/// could mean another driver's ioctls.
#[derive(Debug)]
pub(crate) struct NbdNode(File);

impl NbdNode {
    /// Checks that `file` is an NBD device node.
    pub(crate) fn new(file: File) -> Result<NbdNode, NodeError> {
        let meta = block_metadata(&file)?;
        let (major, minor) = (
            nix::sys::stat::major(meta.rdev()),
            nix::sys::stat::minor(meta.rdev()),
        );
        if major != NBD_MAJOR {
            return Err(NodeError::NotNbd { major, minor });
        }
        Ok(NbdNode(file))
    }
}

impl AsFd for NbdNode {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// The NBD driver's ioctls (`_IO(0xab, n)`, include/uapi/linux/nbd.h). All take their argument
/// by value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NbdIoctl {
    /// Hands the kernel a connected socket (argument: the descriptor).
    SetSock = 0,
    /// Logical block size in bytes.
    SetBlksize = 1,
    /// Starts the device and blocks until it is disconnected.
    DoIt = 3,
    /// Shuts down the sockets and fails what is in flight.
    ClearSock = 4,
    /// Size in blocks of the current block size.
    SetSizeBlocks = 7,
    /// Sends DISC on every socket.
    Disconnect = 8,
    /// Request timeout in seconds (0: none).
    SetTimeout = 9,
    /// Transmission flags.
    SetFlags = 10,
}

impl NbdIoctl {
    /// The ioctl's name as in nbd.h, for error messages.
    pub(crate) fn name(self) -> &'static str {
        match self {
            NbdIoctl::SetSock => "NBD_SET_SOCK",
            NbdIoctl::SetBlksize => "NBD_SET_BLKSIZE",
            NbdIoctl::DoIt => "NBD_DO_IT",
            NbdIoctl::ClearSock => "NBD_CLEAR_SOCK",
            NbdIoctl::SetSizeBlocks => "NBD_SET_SIZE_BLOCKS",
            NbdIoctl::Disconnect => "NBD_DISCONNECT",
            NbdIoctl::SetTimeout => "NBD_SET_TIMEOUT",
            NbdIoctl::SetFlags => "NBD_SET_FLAGS",
        }
    }

    fn request(self) -> ioctl_num_type {
        nix::request_code_none!(0xab, self as u8)
    }
}

/// Issues an NBD ioctl on an NBD device node.
pub(crate) fn nbd_ioctl(node: &NbdNode, cmd: NbdIoctl, arg: u64) -> io::Result<()> {
    let arg =
        libc::c_ulong::try_from(arg).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: `node` is open for the whole call (it is borrowed), and is an NBD device node
    // (checked when it was made), so the request number means the NBD driver's ioctl, which
    // takes its argument by value: the kernel never dereferences it, so no memory of ours is
    // read or written whatever the value.
    let rc = unsafe { libc::ioctl(node.as_fd().as_raw_fd(), cmd.request(), arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

const BLK: u8 = 0x12;

/// BLKGETSIZE64: the device's size in bytes.
pub(crate) fn blk_get_size64(dev: &BlockNode) -> io::Result<u64> {
    let fd = dev.as_fd();
    let mut size: u64 = 0;
    let req: ioctl_num_type = nix::request_code_read!(BLK, 114, size_of::<usize>());
    // SAFETY: `dev` is a block device (checked when the BlockNode was made), so the request is
    // the block layer's BLKGETSIZE64, which writes one u64 (size_t on 64-bit Linux; the request
    // encodes that size) through the pointer, which points to `size`, a live local of that type.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut size as *mut u64) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// BLKSSZGET: the logical block size.
pub(crate) fn blk_ssz_get(dev: &BlockNode) -> io::Result<u32> {
    let fd = dev.as_fd();
    let mut size: libc::c_int = 0;
    let req: ioctl_num_type = nix::request_code_none!(BLK, 104);
    // SAFETY: `dev` is a block device, so this is the block layer's BLKSSZGET, which writes one
    // int through the pointer, which points to `size`, a live local c_int.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut size as *mut libc::c_int) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

/// BLKFLSBUF: writes back and drops the device's buffer cache.
pub(crate) fn blk_flsbuf(dev: &BlockNode) -> io::Result<()> {
    let fd = dev.as_fd();
    let req: ioctl_num_type = nix::request_code_none!(BLK, 97);
    // SAFETY: `dev` is a block device, so this is the block layer's BLKFLSBUF, which ignores
    // its argument; 0 is passed and nothing of ours is touched.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req, 0 as libc::c_ulong) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The range ioctls that take `uint64_t range[2]` = {start, length} in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RangeIoctl {
    /// BLKDISCARD: discard (TRIM) the range.
    Discard = 119,
    /// BLKZEROOUT: zero the range, keeping it allocated.
    ZeroOut = 127,
}

/// BLKDISCARD or BLKZEROOUT on `offset..offset + len`.
pub(crate) fn blk_range(dev: &BlockNode, cmd: RangeIoctl, offset: u64, len: u64) -> io::Result<()> {
    let fd = dev.as_fd();
    let range: [u64; 2] = [offset, len];
    let req: ioctl_num_type = nix::request_code_none!(BLK, cmd as u8);
    // SAFETY: `dev` is a block device, so these are the block layer's BLKDISCARD/BLKZEROOUT,
    // which read exactly two u64 through the pointer, which points to `range`, a live local
    // [u64; 2]; they do not write through it.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req, range.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `PR_SET_IO_FLUSHER` (linux/prctl.h; not in the libc crate).
const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// Marks the calling thread, and the threads it creates afterwards, as an I/O flusher: memory
/// reclaim in them does not recurse into I/O (which could need this very server). Linux 5.6+,
/// needs CAP_SYS_RESOURCE.
pub(crate) fn set_io_flusher() -> io::Result<()> {
    // SAFETY: PR_SET_IO_FLUSHER takes integer arguments only (1 = set) and touches no memory of
    // ours.
    let rc = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1 as libc::c_ulong, 0, 0, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The page size: the kernel's upper bound for an NBD block size before Linux 6.15.
pub(crate) fn page_size() -> u64 {
    // SAFETY: sysconf takes an integer and returns one; it has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096).max(4096)
}
