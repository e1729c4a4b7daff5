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

use std::path::PathBuf;

use userblk::link::nbd::{MountOptions, Mounted, Setup};
use userblk::BlockDevice;

pub(crate) use crate::node_target::settle_udev;
use crate::node_target::{running_export, server_error, NodeTarget};
use crate::target::{Attached, OpError, Rig};

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

/// A device served on `/dev/nbdN`, driven through its node: the node's own methods
/// ([`NodeTarget::path`], [`NodeTarget::kernel_size`], ...) come through `Deref`.
#[derive(Debug)]
pub struct NbdTarget {
    // Declared before `mounted`: the descriptors close before the device is unmounted on drop,
    // so the node is free when serving ends.
    node: NodeTarget,
    mounted: Mounted,
}

impl NbdTarget {
    /// Opens the node of a mounted device (from the calling thread).
    pub fn open(mounted: Mounted) -> Result<NbdTarget, OpError> {
        let export = running_export(mounted.handle().export())?;
        let node = NodeTarget::open(mounted.device(), export)?;
        Ok(NbdTarget { node, mounted })
    }

    /// The mounted device (its handle says how it was set up).
    pub fn mounted(&self) -> &Mounted {
        &self.mounted
    }

    fn detach_inner(self) -> Result<(), OpError> {
        let NbdTarget { node, mounted } = self;
        drop(node);
        mounted.unmount().map_err(server_error)
    }
}

crate::node_target::forward_to_node!(NbdTarget, node);

impl Attached for NbdTarget {
    fn detach(self: Box<Self>) -> Result<(), OpError> {
        (*self).detach_inner()
    }
}
