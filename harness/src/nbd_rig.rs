//! [`NbdRig`]: the real-kernel [`Rig`]. It serves each device on `/dev/nbdN` through
//! [`userblk::link::nbd`] and drives it the way programs do: `O_DIRECT` pread/pwrite with aligned
//! buffers, fsync for flush, an `O_DSYNC` descriptor for FUA writes, BLKDISCARD for trim,
//! BLKZEROOUT (or a punched hole) for write-zeroes.
//!
//! A write that runs past the end is refused whole (ENOSPC), a read EINVAL; the kernel itself
//! would do the part inside the device and stop there.
//!
//! The device node is opened only by the thread that calls [`Rig::attach`] (the test's), never by
//! a thread that serves it. Device errors arrive as EIO: the block layer keeps no other errno.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use userblk::link::nbd::{blk, MountOptions, Mounted, Setup};
use userblk::proto::TransmissionFlags;
use userblk::{BlockDevice, Export, ServerError};

use crate::target::{Attached, OpError, Rig, Target};

/// The environment variable that names the device the real-kernel tests use (`/dev/nbd0`, or
/// `auto`); unset, they are skipped. `USERBLK_TEST_NBD_SETUP=ioctl|netlink` picks the set-up.
pub const ENV_DEVICE: &str = "USERBLK_TEST_NBD";
/// See [`ENV_DEVICE`].
pub const ENV_SETUP: &str = "USERBLK_TEST_NBD_SETUP";

/// Attaches devices to a real `/dev/nbdN`.
#[derive(Clone, Debug, Default)]
pub struct NbdRig {
    /// How devices are served.
    pub options: MountOptions,
}

impl NbdRig {
    /// A rig serving on `device` (`/dev/nbdN`, or `auto`).
    pub fn new(device: impl Into<PathBuf>) -> NbdRig {
        NbdRig {
            options: MountOptions::new().device(device),
        }
    }

    /// The rig [`ENV_DEVICE`] and [`ENV_SETUP`] ask for, or why there is none (to print as
    /// "skipped: ...").
    pub fn from_env() -> Result<NbdRig, String> {
        let device = std::env::var(ENV_DEVICE).map_err(|_| {
            format!(
                "{ENV_DEVICE} is not set (vm/run.sh sets it to run these tests against /dev/nbdN)"
            )
        })?;
        let mut rig = NbdRig::new(device);
        match std::env::var(ENV_SETUP).as_deref() {
            Ok("ioctl") => rig.options = rig.options.setup(Setup::Ioctl),
            Ok("netlink") => rig.options = rig.options.setup(Setup::Netlink),
            _ => {}
        }
        Ok(rig)
    }

    fn serve(&self, device: Box<dyn BlockDevice>) -> Result<NbdTarget, OpError> {
        let mounted = self.options.spawn(device).map_err(server_error)?;
        settle_udev();
        NbdTarget::open(mounted)
    }
}

/// Waits until udev has handled the new device: on connect it probes the device (blkid reads
/// blocks near the end for RAID and GPT signatures), and those reads, arriving in the middle of
/// a case, would be taken for the case's own requests. Without udevadm there is nothing to wait
/// for.
fn settle_udev() {
    let _ = std::process::Command::new("udevadm")
        .args(["settle", "--timeout=10"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

fn server_error(e: ServerError) -> OpError {
    OpError {
        errno: None,
        message: e.to_string(),
    }
}

fn io_error(what: &str, e: io::Error) -> OpError {
    OpError {
        errno: e.raw_os_error(),
        message: format!("{what}: {e}"),
    }
}

impl Rig for NbdRig {
    fn name(&self) -> String {
        match self.options.device_path() {
            Some(p) => p.display().to_string(),
            None => "/dev/nbd (auto)".into(),
        }
    }

    fn attach(&self, device: Box<dyn BlockDevice>) -> Result<Box<dyn Attached>, OpError> {
        Ok(Box::new(self.serve(device)?))
    }
}

/// A device served on `/dev/nbdN`, driven through its node.
#[derive(Debug)]
pub struct NbdTarget {
    // Declared before `mounted`: the descriptors close before the device is unmounted on drop,
    // so the node is free when serving ends.
    direct: blk::BlockNode,
    dsync: blk::BlockNode,
    export: Export,
    path: PathBuf,
    mounted: Mounted,
}

impl NbdTarget {
    /// Opens the node of a mounted device (from the calling thread).
    pub fn open(mounted: Mounted) -> Result<NbdTarget, OpError> {
        let path = mounted.device();
        let export = mounted.handle().export().ok_or_else(|| OpError {
            errno: None,
            message: "the device is not running".into(),
        })?;
        // Read-write even when the export is read-only, as a program would: the kernel then
        // refuses each write itself (EPERM). Read-only only if the open itself is refused.
        let open = |dsync| {
            blk::open_direct(&path, true, dsync)
                .or_else(|e| match e.raw_os_error() {
                    Some(13 | 30) => blk::open_direct(&path, false, dsync),
                    _ => Err(e),
                })
                .map_err(|e| io_error(&format!("opening {}", path.display()), e))
        };
        let direct = open(false)?;
        let dsync = open(true)?;
        Ok(NbdTarget {
            direct,
            dsync,
            export,
            path,
            mounted,
        })
    }

    /// The device node.
    pub fn path(&self) -> &PathBuf {
        &self.path
    }

    /// The mounted device (its handle says how it was set up).
    pub fn mounted(&self) -> &Mounted {
        &self.mounted
    }

    /// The size the kernel reports (BLKGETSIZE64).
    pub fn kernel_size(&self) -> Result<u64, OpError> {
        blk::size(&self.direct).map_err(|e| io_error("BLKGETSIZE64", e))
    }

    /// The logical block size the kernel reports (BLKSSZGET).
    pub fn kernel_block_size(&self) -> Result<u32, OpError> {
        blk::logical_block_size(&self.direct).map_err(|e| io_error("BLKSSZGET", e))
    }

    fn write_with(&self, file: &File, offset: u64, data: &[u8], what: &str) -> Result<(), OpError> {
        if offset.saturating_add(data.len() as u64) > self.export.size {
            // The kernel would write the part inside the device and stop at the end; a
            // target's write succeeds or fails whole, so refuse it as the end refuses the rest.
            return Err(io_error(
                &format!("{what} of {} bytes at {offset}", data.len()),
                io::Error::from_raw_os_error(28),
            ));
        }
        let buf = blk::AlignedBuf::from_slice(data);
        file.write_all_at(&buf, offset)
            .map_err(|e| io_error(&format!("{what} of {} bytes at {offset}", data.len()), e))
    }

    fn detach_inner(self) -> Result<(), OpError> {
        let NbdTarget {
            direct,
            dsync,
            mounted,
            ..
        } = self;
        drop(direct);
        drop(dsync);
        mounted.unmount().map_err(server_error)
    }
}

impl Target for NbdTarget {
    fn size(&self) -> u64 {
        self.export.size
    }
    fn block_size(&self) -> u32 {
        self.export.block_size
    }
    fn flags(&self) -> TransmissionFlags {
        self.export.flags
    }
    fn sees_device_errno(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, OpError> {
        if offset.saturating_add(len as u64) > self.export.size {
            // The kernel would read the part inside the device and return a short count; a
            // target's read succeeds or fails whole, so refuse it without reaching the device,
            // as a server answers a read past the end (EINVAL).
            return Err(io_error(
                &format!("pread of {len} bytes at {offset}"),
                io::Error::from_raw_os_error(22),
            ));
        }
        let mut buf = blk::AlignedBuf::new(len);
        self.direct
            .read_exact_at(&mut buf, offset)
            .map_err(|e| io_error(&format!("pread of {len} bytes at {offset}"), e))?;
        Ok(buf.to_vec())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), OpError> {
        self.write_with(&self.direct, offset, data, "pwrite")
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> Result<(), OpError> {
        self.write_with(&self.dsync, offset, data, "O_DSYNC pwrite")
    }
    fn flush(&self) -> Result<(), OpError> {
        self.direct.sync_all().map_err(|e| io_error("fsync", e))
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), OpError> {
        blk::discard(&self.direct, offset, len)
            .map_err(|e| io_error(&format!("BLKDISCARD of {len} bytes at {offset}"), e))
    }
    fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> Result<(), OpError> {
        let what = |op: &str| format!("{op} of {len} bytes at {offset}");
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.export.size)
        {
            // fallocate clamps a range past the end (BLKZEROOUT refuses it): refuse it the same
            // way whichever call is used.
            return Err(io_error(
                &what("write-zeroes"),
                io::Error::from_raw_os_error(22),
            ));
        }
        if !no_hole {
            match blk::punch_hole(&self.direct, offset, len) {
                Ok(()) => return Ok(()),
                // No WRITE_ZEROES on this device or kernel: zero it the way that always works.
                Err(e) if e.raw_os_error() == Some(95) => {}
                Err(e) => return Err(io_error(&what("fallocate(PUNCH_HOLE)"), e)),
            }
        }
        blk::zero_out(&self.direct, offset, len).map_err(|e| io_error(&what("BLKZEROOUT"), e))
    }
}

impl Attached for NbdTarget {
    fn detach(self: Box<Self>) -> Result<(), OpError> {
        (*self).detach_inner()
    }
}
