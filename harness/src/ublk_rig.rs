//! [`UblkRig`]: the real-kernel [`Rig`] through the ublk driver. It serves each device as
//! `/dev/ublkbN` through [`userblk::link::ublk`] and drives the node as the NBD rig does
//! ([`NodeTarget`]), so the conformance suite, the random tests and the traces run unchanged.

use userblk::link::ublk::{Mounted, UblkOptions};
use userblk::BlockDevice;

use crate::node_target::{running_export, server_error, settle_udev, NodeTarget};
use crate::target::{Attached, OpError, Rig};

/// The environment variable that turns the ublk kernel tests on (`1`, or a device id to use);
/// unset, they are skipped.
pub const ENV_UBLK: &str = "USERBLK_TEST_UBLK";

/// Attaches devices as `/dev/ublkbN`.
#[derive(Clone, Debug, Default)]
pub struct UblkRig {
    /// How devices are served.
    pub options: UblkOptions,
}

impl UblkRig {
    /// A rig with `options`.
    pub fn new(options: UblkOptions) -> UblkRig {
        UblkRig { options }
    }

    /// The rig [`ENV_UBLK`] asks for (an id when its value is a number, else the kernel's
    /// choice), or why there is none (to print as "skipped: ...").
    pub fn from_env() -> Result<UblkRig, String> {
        let value = std::env::var(ENV_UBLK).map_err(|_| {
            format!("{ENV_UBLK} is not set (vm/run.sh sets it to run these tests through /dev/ublkbN on 6.12)")
        })?;
        let id = value.parse::<u32>().ok().filter(|_| value != "1");
        Ok(UblkRig::new(UblkOptions::new().id(id)))
    }
}

impl Rig for UblkRig {
    fn name(&self) -> String {
        "/dev/ublkb (ublk)".into()
    }

    fn attach(&self, device: Box<dyn BlockDevice>) -> Result<Box<dyn Attached>, OpError> {
        let mounted = self.options.spawn(device).map_err(server_error)?;
        settle_udev();
        Ok(Box::new(UblkTarget::open(mounted)?))
    }
}

/// A device served as `/dev/ublkbN`, driven through its node: the node's own methods
/// ([`NodeTarget::path`], [`NodeTarget::kernel_size`], ...) come through `Deref`.
#[derive(Debug)]
pub struct UblkTarget {
    // Declared before `mounted`: the descriptors close before the device is stopped on drop.
    node: NodeTarget,
    mounted: Mounted,
}

impl UblkTarget {
    /// Opens the node of a served device (from the calling thread).
    pub fn open(mounted: Mounted) -> Result<UblkTarget, OpError> {
        let export = running_export(mounted.handle().export())?;
        // ublk commits the device's errno and the block layer keeps ENOSPC and ENOMEM (which
        // the conformance case checks) where NBD's driver fails every error with EIO.
        let node = NodeTarget::open(mounted.device(), export)?.with_device_errno(true);
        Ok(UblkTarget { node, mounted })
    }

    /// The served device.
    pub fn mounted(&self) -> &Mounted {
        &self.mounted
    }
}

crate::node_target::forward_to_node!(UblkTarget, node);

impl Attached for UblkTarget {
    fn detach(self: Box<Self>) -> Result<(), OpError> {
        let UblkTarget { node, mounted } = *self;
        drop(node);
        mounted.unmount().map_err(server_error)
    }
}
