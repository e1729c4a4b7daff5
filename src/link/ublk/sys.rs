//! The ublk kernel interface, and every `unsafe` block of the ublk link: the uapi layout of
//! `include/uapi/linux/ublk_cmd.h` (as in Linux 6.12), the control ring (`IORING_SETUP_SQE128`,
//! the 32-byte `ublksrv_ctrl_cmd` in the SQE's 80-byte command area), a queue's ring (plain
//! 64-byte SQEs: the 16-byte `ublksrv_io_cmd` fits the SQE's own command area), the read-only
//! mapping of a queue's I/O descriptors from `/dev/ublkcN`, and the eventfd that wakes a queue
//! thread.
//!
//! Facts checked against the 6.12 driver (`drivers/block/ublk_drv.c`): control commands are
//! refused without `IO_URING_F_SQE128`; `FETCH_REQ` and `COMMIT_AND_FETCH_REQ` must carry the
//! buffer address (no `UBLK_F_USER_COPY`, no `NEED_GET_DATA`), and COMMIT_AND_FETCH_REQ's
//! address replaces the tag's before the request completes (`ublk_fill_io_cmd` then
//! `ublk_commit_completion`), so a READ's data is copied from the address committed with it and
//! the next WRITE's data into that same address (`ublk_unmap_io`, `ublk_map_io`); all commands
//! of a queue must come from the task whose FETCH_REQs made it ready (`ubq_daemon`: others get
//! EINVAL); the descriptor array of queue `q` is mapped at
//! `q * round_up(UBLK_MAX_QUEUE_DEPTH * 24, PAGE_SIZE)` with length
//! `round_up(depth * 24, PAGE_SIZE)`, read-only.

use std::ffi::c_void;
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
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

/// An eventfd another thread signals to wake a queue thread waiting in its ring (a poll on it
/// is kept armed there): what a worker or a task that completed a request calls, so that the
/// queue thread commits it. Non-blocking: a signal never waits, and draining never blocks.
#[derive(Debug)]
pub(crate) struct EventFd(OwnedFd);

impl EventFd {
    pub(crate) fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes integer arguments only and returns a new descriptor or -1.
        let fd = unsafe { nix::libc::eventfd(0, nix::libc::EFD_NONBLOCK | nix::libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nothing else.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Adds 1 to the counter, which makes the fd readable (a full counter, after 2^64 - 2
    /// signals nobody drained, is readable already: the error is ignored).
    pub(crate) fn signal(&self) {
        let _ = nix::unistd::write(&self.0, &1u64.to_ne_bytes());
    }

    /// Resets the counter (nothing to do if it is zero).
    pub(crate) fn drain(&self) {
        let mut buf = [0u8; 8];
        let _ = nix::unistd::read(&self.0, &mut buf);
    }
}

/// The io_uring of one queue, its descriptors, and the eventfd that wakes it. Commands carry the
/// address of a buffer the queue loop owns; the loop keeps each buffer until the kernel is done
/// with it (the tag's next completion), and leaks the buffers of commands that may still be in
/// flight when it ends on an error.
pub(crate) struct QueueIo {
    ring: IoUring<squeue::Entry, cqueue::Entry>,
    pub(crate) descs: IoDescs,
    wake: Arc<EventFd>,
    /// The set-up flags the kernel took (see [`RingFlags`]).
    flags: RingFlags,
    cdev: i32,
    q_id: u16,
}

impl std::fmt::Debug for QueueIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueIo")
            .field("q_id", &self.q_id)
            .field("flags", &self.flags)
            .finish_non_exhaustive()
    }
}

/// One completion of a queue's ring: the tag (from `user_data`) and the result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Completion {
    pub(crate) tag: u16,
    pub(crate) result: i32,
}

/// The `user_data` of the poll on the wake eventfd (tags are below 2^16).
const WAKE: u64 = 1 << 32;

/// The set-up flags of a queue's ring that cut task-work wake-ups: with `Defer`,
/// `IORING_SETUP_DEFER_TASKRUN | SINGLE_ISSUER | COOP_TASKRUN` (6.1+; the kernel's work for the
/// ring, ublk's dispatch of a request included, runs when the queue thread waits in it, never
/// by interrupting it); `Coop`, `COOP_TASKRUN` alone (5.19+); `Plain`, none. The kernel
/// refusing a flag falls back to the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RingFlags {
    Plain,
    Coop,
    Defer,
}

impl RingFlags {
    /// What to ask for: `USERBLK_UBLK_RING=plain|coop|defer` (for measuring one against the
    /// other), `Defer` otherwise.
    pub(crate) fn wanted() -> RingFlags {
        match std::env::var("USERBLK_UBLK_RING").as_deref() {
            Ok("plain") => RingFlags::Plain,
            Ok("coop") => RingFlags::Coop,
            _ => RingFlags::Defer,
        }
    }

    fn build(self, entries: u32) -> io::Result<IoUring<squeue::Entry, cqueue::Entry>> {
        let mut b = IoUring::<squeue::Entry, cqueue::Entry>::builder();
        b.setup_cqsize(entries * 2);
        match self {
            RingFlags::Plain => {}
            RingFlags::Coop => {
                b.setup_coop_taskrun();
            }
            RingFlags::Defer => {
                b.setup_coop_taskrun()
                    .setup_single_issuer()
                    .setup_defer_taskrun();
            }
        }
        b.build(entries)
    }
}

impl QueueIo {
    /// Sets up queue `q_id` of the device whose char device is `cdev` (kept open by the caller
    /// for as long as this value lives), on the calling thread: the one that must send every
    /// command of the queue.
    pub(crate) fn new(
        cdev: BorrowedFd<'_>,
        q_id: u16,
        depth: u16,
        flags: RingFlags,
    ) -> io::Result<QueueIo> {
        // Every tag's command, and the poll on the wake eventfd.
        let entries = (u32::from(depth) + 1).next_power_of_two().max(4);
        let mut flags = flags;
        let ring = loop {
            match flags.build(entries) {
                Ok(ring) => break ring,
                Err(e)
                    if e.raw_os_error() == Some(nix::libc::EINVAL) && flags != RingFlags::Plain =>
                {
                    flags = if flags == RingFlags::Defer {
                        RingFlags::Coop
                    } else {
                        RingFlags::Plain
                    };
                }
                Err(e) => return Err(e),
            }
        };
        let descs = IoDescs::map(cdev.as_fd(), q_id, depth)?;
        let mut io = QueueIo {
            ring,
            descs,
            wake: Arc::new(EventFd::new()?),
            flags,
            cdev: cdev.as_raw_fd(),
            q_id,
        };
        io.arm_wake()?;
        Ok(io)
    }

    /// What another thread signals to wake [`wait`](Self::wait).
    pub(crate) fn wake(&self) -> Arc<EventFd> {
        Arc::clone(&self.wake)
    }

    fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every entry this queue pushes refers to no memory but a buffer its owner
            // keeps until the command completes (see `queue_cmd`), and to descriptors (the char
            // device, which the caller keeps open while `self` lives, and the eventfd, owned by
            // `self` and shared through an `Arc`).
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            // Full: hand what is queued to the kernel first.
            self.submit(0)?;
        }
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let entry =
            opcode::PollAdd::new(types::Fd(self.wake.0.as_raw_fd()), nix::libc::POLLIN as u32)
                .build()
                .user_data(WAKE);
        self.push(&entry)
    }

    /// Queues FETCH_REQ (`result: None`) or COMMIT_AND_FETCH_REQ with `result` for `tag`, with
    /// the tag's buffer at `addr`; sent with the next [`wait`](Self::wait).
    ///
    /// The kernel copies a committed READ's data from `addr`, and the next WRITE's data on this
    /// tag into it (6.12's `__ublk_ch_uring_cmd` stores the address before completing the
    /// request): the buffer must stay valid, and untouched, until the tag's next completion.
    pub(crate) fn queue_cmd(&mut self, tag: u16, result: Option<i32>, addr: u64) -> io::Result<()> {
        let cmd = IoCmd {
            q_id: self.q_id,
            tag,
            result: result.unwrap_or(0),
            addr,
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
        self.push(&entry)
    }

    fn submit(&mut self, want: usize) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) if matches!(e.raw_os_error(), Some(nix::libc::EINTR)) => continue,
                Err(e) if matches!(e.raw_os_error(), Some(nix::libc::EBUSY)) && want > 0 => {
                    return Ok(())
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Hands every queued command to the kernel (a FETCH_REQ is registered by the time this
    /// returns).
    pub(crate) fn submit_queued(&mut self) -> io::Result<()> {
        self.submit(0)
    }

    /// Submits what is queued, waits for at least one completion or a wake-up, and appends
    /// every completion available to `out` (a wake-up adds nothing: its poll is re-armed).
    pub(crate) fn wait(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        self.submit(1)?;
        let mut woken = false;
        for cqe in self.ring.completion() {
            if cqe.user_data() == WAKE {
                woken = true;
                continue;
            }
            out.push(Completion {
                tag: u16::try_from(cqe.user_data()).unwrap_or(u16::MAX),
                result: cqe.result(),
            });
        }
        if woken {
            // Drained before the poll is armed again: a signal after this fires the new poll.
            self.wake.drain();
            self.arm_wake()?;
        }
        Ok(())
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
    fn an_eventfd_signal_is_drained() {
        let e = EventFd::new().unwrap();
        let mut fds = [nix::poll::PollFd::new(
            e.0.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ready = |fds: &mut [nix::poll::PollFd]| nix::poll::poll(fds, 0u16).unwrap();
        assert_eq!(ready(&mut fds), 0);
        e.signal();
        e.signal();
        assert_eq!(ready(&mut fds), 1);
        e.drain();
        assert_eq!(ready(&mut fds), 0);
        e.drain(); // nothing to drain: no error, no wait
    }
}
