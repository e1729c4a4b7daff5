//! The ublk kernel interface, and every `unsafe` block of the ublk link: the uapi layout of
//! `include/uapi/linux/ublk_cmd.h` (as in Linux 6.12), the control ring (`IORING_SETUP_SQE128`,
//! the 32-byte `ublksrv_ctrl_cmd` in the SQE's 80-byte command area), a queue's ring (plain
//! 64-byte SQEs: the 16-byte `ublksrv_io_cmd` fits the SQE's own command area), the read-only
//! mapping of a queue's I/O descriptors from `/dev/ublkcN`, and the queue's data buffers.
//!
//! Facts checked against the 6.12 driver (`drivers/block/ublk_drv.c`): control commands are
//! refused without `IO_URING_F_SQE128`; `FETCH_REQ` and `COMMIT_AND_FETCH_REQ` must carry the
//! buffer address (no `UBLK_F_USER_COPY`, no `NEED_GET_DATA`); all commands of a queue must come
//! from one task; the descriptor array of queue `q` is mapped at
//! `q * round_up(UBLK_MAX_QUEUE_DEPTH * 24, PAGE_SIZE)` with length
//! `round_up(depth * 24, PAGE_SIZE)`, read-only.

use std::ffi::c_void;
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use nix::sys::mman::{mmap, mmap_anonymous, munmap, MapFlags, ProtFlags};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `_IOC(dir, 'u', nr, size)` as `<asm-generic/ioctl.h>` encodes it.
const fn ioc(dir: u32, nr: u32, size: u32) -> u32 {
    (dir << 30) | (size << 16) | ((b'u' as u32) << 8) | nr
}
const IOC_READ: u32 = 2;
const IOC_READ_WRITE: u32 = 3;
const CTRL_CMD_SIZE: u32 = std::mem::size_of::<CtrlCmd>() as u32;
const IO_CMD_SIZE: u32 = std::mem::size_of::<IoCmd>() as u32;

/// `UBLK_U_CMD_GET_DEV_INFO`.
pub(crate) const CMD_GET_DEV_INFO: u32 = ioc(IOC_READ, 0x02, CTRL_CMD_SIZE);
/// `UBLK_U_CMD_ADD_DEV`.
pub(crate) const CMD_ADD_DEV: u32 = ioc(IOC_READ_WRITE, 0x04, CTRL_CMD_SIZE);
/// `UBLK_U_CMD_DEL_DEV`.
pub(crate) const CMD_DEL_DEV: u32 = ioc(IOC_READ_WRITE, 0x05, CTRL_CMD_SIZE);
/// `UBLK_U_CMD_START_DEV`.
pub(crate) const CMD_START_DEV: u32 = ioc(IOC_READ_WRITE, 0x06, CTRL_CMD_SIZE);
/// `UBLK_U_CMD_STOP_DEV`.
pub(crate) const CMD_STOP_DEV: u32 = ioc(IOC_READ_WRITE, 0x07, CTRL_CMD_SIZE);
/// `UBLK_U_CMD_SET_PARAMS`.
pub(crate) const CMD_SET_PARAMS: u32 = ioc(IOC_READ_WRITE, 0x08, CTRL_CMD_SIZE);
/// `UBLK_U_CMD_DEL_DEV_ASYNC` (Linux 6.9+): DEL_DEV without waiting for the last user of
/// the block device to close it.
pub(crate) const CMD_DEL_DEV_ASYNC: u32 = ioc(IOC_READ, 0x14, CTRL_CMD_SIZE);
/// `UBLK_U_CMD_START_USER_RECOVERY`.
pub(crate) const CMD_START_USER_RECOVERY: u32 = ioc(IOC_READ_WRITE, 0x10, CTRL_CMD_SIZE);
/// `UBLK_U_CMD_END_USER_RECOVERY`.
pub(crate) const CMD_END_USER_RECOVERY: u32 = ioc(IOC_READ_WRITE, 0x11, CTRL_CMD_SIZE);
/// `UBLK_U_CMD_GET_FEATURES` (Linux 6.5+).
pub(crate) const CMD_GET_FEATURES: u32 = ioc(IOC_READ, 0x13, CTRL_CMD_SIZE);
/// `UBLK_U_CMD_GET_DEV_INFO2` (Linux 6.3+): GET_DEV_INFO whose buffer starts with the char
/// device's path, whether or not the device is unprivileged.
pub(crate) const CMD_GET_DEV_INFO2: u32 = ioc(IOC_READ, 0x12, CTRL_CMD_SIZE);
/// `UBLK_F_UNPRIVILEGED_DEV` (Linux 6.3+): a device a user other than root adds and owns.
pub(crate) const F_UNPRIVILEGED_DEV: u64 = 1 << 5;
/// `UBLK_F_SUPPORT_ZERO_COPY` and `UBLK_F_USER_COPY`: refused for unprivileged devices.
pub(crate) const F_SUPPORT_ZERO_COPY: u64 = 1 << 0;
pub(crate) const F_USER_COPY: u64 = 1 << 7;
/// `UBLK_U_IO_FETCH_REQ`.
pub(crate) const IO_FETCH_REQ: u32 = ioc(IOC_READ_WRITE, 0x20, IO_CMD_SIZE);
/// `UBLK_U_IO_COMMIT_AND_FETCH_REQ`.
pub(crate) const IO_COMMIT_AND_FETCH_REQ: u32 = ioc(IOC_READ_WRITE, 0x21, IO_CMD_SIZE);

/// `UBLK_IO_RES_ABORT`: a fetch ended because the device stopped or the queue is torn down.
pub(crate) const IO_RES_ABORT: i32 = -nix::libc::ENODEV;
/// `UBLK_F_USER_RECOVERY`: a server that dies leaves the device quiesced, for another to
/// take over.
pub(crate) const F_USER_RECOVERY: u64 = 1 << 3;
/// `UBLK_F_USER_RECOVERY_REISSUE`: requests in flight when the server died are re-issued to
/// the next one.
pub(crate) const F_USER_RECOVERY_REISSUE: u64 = 1 << 4;
/// `UBLK_S_DEV_QUIESCED`, in [`DevInfo::state`].
pub(crate) const DEV_QUIESCED: u16 = 2;
/// `UBLK_MAX_QUEUE_DEPTH`.
pub(crate) const MAX_QUEUE_DEPTH: u16 = 4096;

/// `UBLK_IO_OP_*`.
pub(crate) const OP_READ: u8 = 0;
pub(crate) const OP_WRITE: u8 = 1;
pub(crate) const OP_FLUSH: u8 = 2;
pub(crate) const OP_DISCARD: u8 = 3;
pub(crate) const OP_WRITE_SAME: u8 = 4;
pub(crate) const OP_WRITE_ZEROES: u8 = 5;
/// `UBLK_IO_F_FUA`, `UBLK_IO_F_NOUNMAP`, in `op_flags`.
pub(crate) const IO_F_FUA: u32 = 1 << 13;
pub(crate) const IO_F_NOUNMAP: u32 = 1 << 15;

/// `UBLK_ATTR_*` in [`ParamBasic::attrs`].
pub(crate) const ATTR_READ_ONLY: u32 = 1 << 0;
pub(crate) const ATTR_ROTATIONAL: u32 = 1 << 1;
pub(crate) const ATTR_VOLATILE_CACHE: u32 = 1 << 2;
pub(crate) const ATTR_FUA: u32 = 1 << 3;
/// `UBLK_PARAM_TYPE_*`.
pub(crate) const PARAM_TYPE_BASIC: u32 = 1 << 0;
pub(crate) const PARAM_TYPE_DISCARD: u32 = 1 << 1;

/// `struct ublksrv_ctrl_cmd`: the command area of a control SQE.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub(crate) struct CtrlCmd {
    pub(crate) dev_id: u32,
    /// `u16::MAX` unless the command is for one queue.
    pub(crate) queue_id: u16,
    pub(crate) len: u16,
    pub(crate) addr: u64,
    pub(crate) data: u64,
    pub(crate) dev_path_len: u16,
    pub(crate) pad: u16,
    pub(crate) reserved: u32,
}

/// `struct ublksrv_ctrl_dev_info`.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub(crate) struct DevInfo {
    pub(crate) nr_hw_queues: u16,
    pub(crate) queue_depth: u16,
    pub(crate) state: u16,
    pub(crate) pad0: u16,
    pub(crate) max_io_buf_bytes: u32,
    pub(crate) dev_id: u32,
    pub(crate) ublksrv_pid: i32,
    pub(crate) pad1: u32,
    pub(crate) flags: u64,
    pub(crate) ublksrv_flags: u64,
    pub(crate) owner_uid: u32,
    pub(crate) owner_gid: u32,
    pub(crate) reserved1: u64,
    pub(crate) reserved2: u64,
}

/// `struct ublk_param_basic`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub(crate) struct ParamBasic {
    pub(crate) attrs: u32,
    pub(crate) logical_bs_shift: u8,
    pub(crate) physical_bs_shift: u8,
    pub(crate) io_opt_shift: u8,
    pub(crate) io_min_shift: u8,
    pub(crate) max_sectors: u32,
    pub(crate) chunk_sectors: u32,
    pub(crate) dev_sectors: u64,
    pub(crate) virt_boundary_mask: u64,
}

/// `struct ublk_param_discard`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub(crate) struct ParamDiscard {
    pub(crate) discard_alignment: u32,
    pub(crate) discard_granularity: u32,
    pub(crate) max_discard_sectors: u32,
    pub(crate) max_write_zeroes_sectors: u32,
    pub(crate) max_discard_segments: u16,
    pub(crate) reserved0: u16,
}

/// `struct ublk_params` of Linux 6.12 (basic, discard, devt, zoned), padded as C pads it.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub(crate) struct Params {
    pub(crate) len: u32,
    pub(crate) types: u32,
    pub(crate) basic: ParamBasic,
    pub(crate) discard: ParamDiscard,
    /// `struct ublk_param_devt`: read-only, filled by GET_PARAMS.
    pub(crate) devt: [u32; 4],
    /// `struct ublk_param_zoned`: unused.
    pub(crate) zoned: [u32; 8],
    pub(crate) tail_pad: u32,
}

/// `struct ublksrv_io_desc`: what the kernel asks of the server for one tag.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub(crate) struct IoDesc {
    /// Op in bits 0-7, `UBLK_IO_F_*` flags above.
    pub(crate) op_flags: u32,
    pub(crate) nr_sectors: u32,
    pub(crate) start_sector: u64,
    pub(crate) addr: u64,
}

/// `struct ublksrv_io_cmd`: the command area of a queue SQE.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub(crate) struct IoCmd {
    pub(crate) q_id: u16,
    pub(crate) tag: u16,
    pub(crate) result: i32,
    pub(crate) addr: u64,
}

const PAGE: usize = 4096;

fn page_size() -> usize {
    // SAFETY: sysconf takes an integer and returns one; it has no memory-safety preconditions.
    let size = unsafe { nix::libc::sysconf(nix::libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(PAGE).max(PAGE)
}

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

/// The control ring on `/dev/ublk-control`: one command at a time, waited for. Not `Sync`;
/// every thread that sends control commands opens its own (libublk-rs#40 is what sharing one
/// across threads leads to).
pub(crate) struct CtrlRing {
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
}

impl std::fmt::Debug for CtrlRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CtrlRing").finish_non_exhaustive()
    }
}

impl CtrlRing {
    pub(crate) fn new() -> io::Result<CtrlRing> {
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(4)?;
        Ok(CtrlRing { ring })
    }

    /// Sends `cmd` (with `buf`, which the kernel may read and write, as its `addr`/`len`) and
    /// waits for the result: the CQE's value, a negative errno on failure.
    ///
    /// The buffer is owned for the command's life: were the ring to fail while the command is
    /// in flight, the buffer is leaked rather than freed under the kernel.
    pub(crate) fn command(
        &mut self,
        control: BorrowedFd<'_>,
        op: u32,
        mut cmd: CtrlCmd,
        buf: Option<Vec<u8>>,
    ) -> io::Result<(i32, Option<Vec<u8>>)> {
        let mut buf = buf;
        if let Some(b) = buf.as_mut() {
            cmd.addr = b.as_mut_ptr() as u64;
            cmd.len = u16::try_from(b.len()).map_err(|_| io::Error::from_raw_os_error(22))?;
        }
        let mut area = [0u8; 80];
        area[..32].copy_from_slice(cmd.as_bytes());
        let entry = opcode::UringCmd80::new(types::Fd(control.as_raw_fd()), op)
            .cmd(area)
            .build()
            .user_data(1);
        // SAFETY: the entry refers to `buf` (its address went into `cmd.addr`), which is owned
        // by this function and lives until the command's completion has been reaped below, or
        // is leaked if waiting fails; the fd is borrowed for the call and outlives it.
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| io::Error::other("the ublk control ring is full"))?;
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(nix::libc::EINTR | nix::libc::EBUSY)) => {
                }
                Err(e) => {
                    std::mem::forget(buf);
                    return Err(e);
                }
            }
            if let Some(cqe) = self.ring.completion().next() {
                return Ok((cqe.result(), buf));
            }
        }
    }
}

/// The I/O descriptors of one queue, mapped read-only from `/dev/ublkcN`.
#[derive(Debug)]
pub(crate) struct IoDescs {
    base: NonNull<c_void>,
    len: usize,
    depth: u16,
}

// SAFETY: the mapping is plain shared memory the kernel writes; reading it from another thread
// than the one that mapped it is as sound as from that one.
unsafe impl Send for IoDescs {}

impl IoDescs {
    /// Maps queue `q_id`'s descriptors (`depth` of them) from the char device.
    pub(crate) fn map(cdev: BorrowedFd<'_>, q_id: u16, depth: u16) -> io::Result<IoDescs> {
        let page = page_size();
        let stride = round_up(usize::from(MAX_QUEUE_DEPTH) * size_of::<IoDesc>(), page);
        let len = round_up(usize::from(depth) * size_of::<IoDesc>(), page);
        let offset = i64::try_from(usize::from(q_id) * stride)
            .map_err(|_| io::Error::from_raw_os_error(nix::libc::EINVAL))?;
        let length = NonZeroUsize::new(len).ok_or_else(|| io::Error::from_raw_os_error(22))?;
        // SAFETY: a new shared read-only mapping of the device at a fresh address (no hint), so
        // no existing memory is affected; the kernel checks offset and length.
        let base = unsafe {
            mmap(
                None,
                length,
                ProtFlags::PROT_READ,
                MapFlags::MAP_SHARED | MapFlags::MAP_POPULATE,
                cdev,
                offset,
            )
        }?;
        Ok(IoDescs { base, len, depth })
    }

    /// The descriptor of `tag`, read once (the kernel wrote it before completing the fetch of
    /// `tag`, and does not touch it again until the server commits `tag`).
    pub(crate) fn get(&self, tag: u16) -> Option<IoDesc> {
        if tag >= self.depth {
            return None;
        }
        let ptr = self.base.as_ptr().cast::<IoDesc>();
        // SAFETY: `tag < depth`, so the descriptor lies inside the mapping (`len` covers `depth`
        // descriptors); the mapping is page-aligned and `IoDesc` needs 8; a volatile read of a
        // plain-data struct the kernel shares with us.
        Some(unsafe { ptr.add(usize::from(tag)).read_volatile() })
    }
}

impl Drop for IoDescs {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly the mapping made in `map`, and no reference into it
        // outlives `self` (`get` returns copies).
        let _ = unsafe { munmap(self.base, self.len) };
    }
}

/// The data buffers of one queue: `depth` buffers of `buf_len` bytes, anonymous memory whose
/// pages are only backed once touched. The kernel copies a WRITE's data into a tag's buffer
/// before completing its fetch, and a READ's data out of it when the server commits; in between
/// the buffer is the server's alone.
#[derive(Debug)]
pub(crate) struct IoBufs {
    base: NonNull<c_void>,
    len: usize,
    buf_len: usize,
    depth: u16,
    /// A command using these buffers may still be in flight: never unmap them.
    leak: bool,
}

// SAFETY: anonymous private memory owned by this value.
unsafe impl Send for IoBufs {}

impl IoBufs {
    pub(crate) fn new(depth: u16, buf_len: usize) -> io::Result<IoBufs> {
        let len = usize::from(depth)
            .checked_mul(buf_len)
            .filter(|&n| n > 0)
            .ok_or_else(|| io::Error::from_raw_os_error(nix::libc::EINVAL))?;
        let length = NonZeroUsize::new(len).ok_or_else(|| io::Error::from_raw_os_error(22))?;
        // SAFETY: a new private anonymous mapping at an address of the kernel's choice.
        let base = unsafe {
            mmap_anonymous(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE,
            )
        }?;
        Ok(IoBufs {
            base,
            len,
            buf_len,
            depth,
            leak: false,
        })
    }

    /// The address of `tag`'s buffer, for the kernel.
    pub(crate) fn addr(&self, tag: u16) -> u64 {
        self.base.as_ptr() as u64 + u64::from(tag) * self.buf_len as u64
    }

    /// `tag`'s buffer, while the server owns it (between its fetch's completion and its commit).
    pub(crate) fn get_mut(&mut self, tag: u16) -> &mut [u8] {
        let tag = tag.min(self.depth.saturating_sub(1));
        // SAFETY: `tag < depth` (clamped), so the slice lies inside the mapping; `&mut self`
        // makes it the only reference; the kernel does not access a tag's buffer while the
        // server owns the tag (see the type's documentation), and the queue loop only asks for
        // the buffer of a tag whose fetch completed and that it has not committed yet.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.base
                    .as_ptr()
                    .cast::<u8>()
                    .add(usize::from(tag) * self.buf_len),
                self.buf_len,
            )
        }
    }
}

impl Drop for IoBufs {
    fn drop(&mut self) {
        if self.leak {
            return;
        }
        // SAFETY: exactly the mapping made in `new`; a queue drops its buffers after its ring
        // (fields drop in declaration order in `QueueIo`), and marks them `leak` when a command
        // using them may still be in flight.
        let _ = unsafe { munmap(self.base, self.len) };
    }
}

/// The io_uring of one queue. Commands carry a tag's buffer address: [`QueueIo`] keeps ring and
/// buffers together and drops the ring first.
pub(crate) struct QueueRing {
    ring: IoUring<squeue::Entry, cqueue::Entry>,
}

impl std::fmt::Debug for QueueRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueRing").finish_non_exhaustive()
    }
}

/// One completion of a queue's ring: the tag (from `user_data`) and the result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Completion {
    pub(crate) tag: u16,
    pub(crate) result: i32,
}

/// A queue's ring, descriptors and buffers, in the order they must be dropped (the ring's close
/// cancels the commands still in flight before the buffers go).
#[derive(Debug)]
pub(crate) struct QueueIo {
    ring: QueueRing,
    pub(crate) descs: IoDescs,
    pub(crate) bufs: IoBufs,
    cdev: i32,
    q_id: u16,
}

impl QueueIo {
    /// Sets up queue `q_id` of the device whose char device is `cdev` (kept open by the caller
    /// for as long as this value lives).
    pub(crate) fn new(
        cdev: BorrowedFd<'_>,
        q_id: u16,
        depth: u16,
        buf_len: usize,
    ) -> io::Result<QueueIo> {
        let entries = u32::from(depth).next_power_of_two().max(4);
        let ring = IoUring::<squeue::Entry, cqueue::Entry>::builder()
            .setup_cqsize(entries * 2)
            .build(entries)?;
        let descs = IoDescs::map(cdev.as_fd(), q_id, depth)?;
        let bufs = IoBufs::new(depth, buf_len)?;
        Ok(QueueIo {
            ring: QueueRing { ring },
            descs,
            bufs,
            cdev: cdev.as_raw_fd(),
            q_id,
        })
    }

    /// Queues FETCH_REQ (`result: None`) or COMMIT_AND_FETCH_REQ with `result` for `tag`; sent
    /// with the next [`wait`](Self::wait).
    pub(crate) fn queue_cmd(&mut self, tag: u16, result: Option<i32>) -> io::Result<()> {
        let cmd = IoCmd {
            q_id: self.q_id,
            tag,
            result: result.unwrap_or(0),
            addr: self.bufs.addr(tag),
        };
        let op = if result.is_some() {
            IO_COMMIT_AND_FETCH_REQ
        } else {
            IO_FETCH_REQ
        };
        let mut area = [0u8; 16];
        area.copy_from_slice(cmd.as_bytes());
        let entry = opcode::UringCmd16::new(types::Fd(self.cdev), op)
            .cmd(area)
            .build()
            .user_data(u64::from(tag));
        loop {
            // SAFETY: the command refers to `tag`'s buffer in `self.bufs`, which outlives the
            // ring (dropped first, see `Drop`), and to `self.cdev`, which the caller keeps open
            // while `self` lives.
            if unsafe { self.ring.ring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            // Full: hand what is queued to the kernel first.
            self.submit(0)?;
        }
    }

    fn submit(&mut self, want: usize) -> io::Result<()> {
        loop {
            match self.ring.ring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) if matches!(e.raw_os_error(), Some(nix::libc::EINTR)) => continue,
                Err(e) if matches!(e.raw_os_error(), Some(nix::libc::EBUSY)) && want > 0 => {
                    return Ok(())
                }
                Err(e) => {
                    self.poison();
                    return Err(e);
                }
            }
        }
    }

    /// Hands every queued command to the kernel (a FETCH_REQ is registered by the time this
    /// returns).
    pub(crate) fn submit_queued(&mut self) -> io::Result<()> {
        self.submit(0)
    }

    /// Submits what is queued, waits for at least one completion, and appends every completion
    /// available to `out`.
    pub(crate) fn wait(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        self.submit(1)?;
        out.extend(self.ring.ring.completion().map(|cqe| Completion {
            tag: u16::try_from(cqe.user_data()).unwrap_or(u16::MAX),
            result: cqe.result(),
        }));
        Ok(())
    }

    /// Marks that a command may still be in flight (the loop ended with tags not aborted):
    /// the buffers are then leaked rather than unmapped.
    pub(crate) fn poison(&mut self) {
        self.bufs.leak = true;
    }
}

/// `PR_SET_IO_FLUSHER` (linux/prctl.h; not in the libc crate).
const PR_SET_IO_FLUSHER: nix::libc::c_int = 57;

/// Marks the calling thread as an I/O flusher, so that memory reclaim in it does not recurse
/// into I/O that could need this very server (Linux 5.6+, CAP_SYS_RESOURCE).
pub(crate) fn set_io_flusher() -> io::Result<()> {
    // SAFETY: PR_SET_IO_FLUSHER takes integer arguments only (1 = set) and touches no memory of
    // ours.
    let rc = unsafe { nix::libc::prctl(PR_SET_IO_FLUSHER, 1 as nix::libc::c_ulong, 0, 0, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The effective user and group ids of this process.
pub(crate) fn effective_ids() -> (u32, u32) {
    // SAFETY: geteuid and getegid take no arguments, cannot fail and touch no memory of ours.
    unsafe { (nix::libc::geteuid(), nix::libc::getegid()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ioctl-encoded opcodes, as `_IOR`/`_IOWR('u', nr, struct ...)` give them in C.
    #[test]
    fn opcodes_match_the_uapi_header() {
        assert_eq!(size_of::<CtrlCmd>(), 32);
        assert_eq!(size_of::<IoCmd>(), 16);
        assert_eq!(size_of::<IoDesc>(), 24);
        assert_eq!(size_of::<DevInfo>(), 64);
        assert_eq!(size_of::<ParamBasic>(), 32);
        assert_eq!(size_of::<ParamDiscard>(), 20);
        assert_eq!(size_of::<Params>(), 112);
        assert_eq!(CMD_ADD_DEV, 0xc020_7504);
        assert_eq!(CMD_DEL_DEV, 0xc020_7505);
        assert_eq!(CMD_START_DEV, 0xc020_7506);
        assert_eq!(CMD_STOP_DEV, 0xc020_7507);
        assert_eq!(CMD_SET_PARAMS, 0xc020_7508);
        assert_eq!(CMD_GET_FEATURES, 0x8020_7513);
        assert_eq!(CMD_GET_DEV_INFO, 0x8020_7502);
        assert_eq!(CMD_DEL_DEV_ASYNC, 0x8020_7514);
        assert_eq!(CMD_START_USER_RECOVERY, 0xc020_7510);
        assert_eq!(CMD_END_USER_RECOVERY, 0xc020_7511);
        assert_eq!(IO_FETCH_REQ, 0xc010_7520);
        assert_eq!(IO_COMMIT_AND_FETCH_REQ, 0xc010_7521);
        // The legacy number is the low byte, which is what the driver switches on.
        assert_eq!(IO_COMMIT_AND_FETCH_REQ & 0xff, 0x21);
    }

    #[test]
    fn buffers_are_distinct_and_writable() {
        let mut bufs = IoBufs::new(4, 8192).unwrap();
        assert_eq!(bufs.addr(1) - bufs.addr(0), 8192);
        bufs.get_mut(3).fill(7);
        assert!(bufs.get_mut(2).iter().all(|&b| b == 0));
        assert!(bufs.get_mut(3).iter().all(|&b| b == 7));
        assert!(IoBufs::new(0, 4096).is_err());
    }
}
