//! [`NodeTarget`]: a block device node driven the way programs drive one, shared by the
//! real-kernel rigs (`/dev/nbdN`, `/dev/ublkbN`): `O_DIRECT` pread/pwrite with aligned buffers,
//! fsync for flush, an `O_DSYNC` descriptor for FUA writes, BLKDISCARD for trim, BLKZEROOUT (or
//! a punched hole) for write-zeroes.
//!
//! A write that runs past the end is refused whole (ENOSPC), a read EINVAL; the kernel itself
//! would do the part inside the device and stop there. Device errors arrive as EIO through NBD;
//! through ublk the block layer keeps some errnos ([`NodeTarget::with_device_errno`]).
//!
//! The rigs' targets ([`NbdTarget`](crate::nbd_rig::NbdTarget),
//! [`UblkTarget`](crate::ublk_rig::UblkTarget)) are a `NodeTarget` and the device that keeps
//! it served: they dereference to it for the node's own methods (`path`, `kernel_size`, ...)
//! and forward [`Target`] to it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use userblk::link::nbd::blk;
use userblk::proto::TransmissionFlags;
use userblk::{Export, ServerError};

use crate::target::{OpError, Target};

/// Waits until udev has handled a new device: on connect it probes the device (blkid reads
/// blocks near the end for RAID and GPT signatures), and those reads, arriving in the middle of
/// a case, would be taken for the case's own requests. Without udevadm there is nothing to wait
/// for.
pub(crate) fn settle_udev() {
    let _ = std::process::Command::new("udevadm")
        .args(["settle", "--timeout=10"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

pub(crate) fn io_error(what: &str, e: io::Error) -> OpError {
    OpError {
        errno: e.raw_os_error(),
        message: format!("{what}: {e}"),
    }
}

/// A server's failure, as a target reports it.
pub(crate) fn server_error(e: ServerError) -> OpError {
    OpError {
        errno: None,
        message: e.to_string(),
    }
}

/// The export of a served device, or an error if it does not run.
pub(crate) fn running_export(export: Option<Export>) -> Result<Export, OpError> {
    export.ok_or_else(|| OpError {
        errno: None,
        message: "the device is not running".into(),
    })
}

/// A block device node, opened by the calling thread (never by one that serves it).
#[derive(Debug)]
pub struct NodeTarget {
    direct: blk::BlockNode,
    dsync: blk::BlockNode,
    export: Export,
    path: PathBuf,
    device_errno: bool,
}

impl NodeTarget {
    /// Opens `path`, served with `export`. Read-write even when the export is read-only, as a
    /// program would: the kernel then refuses each write itself (EPERM). Read-only only if the
    /// open itself is refused.
    pub fn open(path: PathBuf, export: Export) -> Result<NodeTarget, OpError> {
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
        Ok(NodeTarget {
            direct,
            dsync,
            export,
            path,
            device_errno: false,
        })
    }

    /// Says whether device errors reach the caller with their own errno (see
    /// [`Target::sees_device_errno`]): not through NBD, where the kernel fails every errored
    /// request with EIO; through ublk, the block layer keeps those it has a status for
    /// (ENOSPC, ENOMEM, EINVAL, EOPNOTSUPP) and turns the others into EIO.
    pub fn with_device_errno(mut self, on: bool) -> NodeTarget {
        self.device_errno = on;
        self
    }

    /// The device node.
    pub fn path(&self) -> &PathBuf {
        &self.path
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
}

impl Target for NodeTarget {
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
        self.device_errno
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

/// `impl Target for $ty` by forwarding every operation to its `$field: NodeTarget`, and
/// `Deref<Target = NodeTarget>` to it for the node's own methods.
macro_rules! forward_to_node {
    ($ty:ty, $field:ident) => {
        impl std::ops::Deref for $ty {
            type Target = $crate::node_target::NodeTarget;
            fn deref(&self) -> &$crate::node_target::NodeTarget {
                &self.$field
            }
        }

        impl $crate::target::Target for $ty {
            fn size(&self) -> u64 {
                self.$field.size()
            }
            fn block_size(&self) -> u32 {
                self.$field.block_size()
            }
            fn flags(&self) -> userblk::proto::TransmissionFlags {
                self.$field.flags()
            }
            fn sees_device_errno(&self) -> bool {
                self.$field.sees_device_errno()
            }
            fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, $crate::target::OpError> {
                self.$field.read(offset, len)
            }
            fn write(&self, offset: u64, data: &[u8]) -> Result<(), $crate::target::OpError> {
                self.$field.write(offset, data)
            }
            fn write_fua(&self, offset: u64, data: &[u8]) -> Result<(), $crate::target::OpError> {
                self.$field.write_fua(offset, data)
            }
            fn flush(&self) -> Result<(), $crate::target::OpError> {
                self.$field.flush()
            }
            fn trim(&self, offset: u64, len: u64) -> Result<(), $crate::target::OpError> {
                self.$field.trim(offset, len)
            }
            fn write_zeroes(
                &self,
                offset: u64,
                len: u64,
                no_hole: bool,
            ) -> Result<(), $crate::target::OpError> {
                self.$field.write_zeroes(offset, len, no_hole)
            }
        }
    };
}
pub(crate) use forward_to_node;
