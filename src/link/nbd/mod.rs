//! The real kernel: serve a [`BlockDevice`](crate::BlockDevice) as `/dev/nbdN` through the Linux
//! NBD driver.
//!
//! - [`mount`] / [`MountOptions::mount`]: serve until unmounted, vblk-style, with a
//!   [`MountHandle`] that unmounts or changes the timeout from any thread;
//!   [`MountOptions::spawn`] serves in the background and returns a [`Mounted`].
//! - [`NbdLink`]: the [`KernelLink`](crate::KernelLink) underneath, for `Server<D, NbdLink>`.
//!   It configures the driver by generic netlink (family "nbd"; the default) or, when netlink is
//!   unavailable or [`Setup::Ioctl`] is asked for, by the classic ioctls with `NBD_DO_IT` on a
//!   thread of its own.
//! - [`blk`]: safe wrappers of the block-device ioctls a test needs on `/dev/nbdN`.
//!
//! - [`MountOptions::reattach`]: new connections for a running device whose server died (kept
//!   by the dead-connection timeout), and [`disconnect`]: free a device whose server is gone.
//!
//! Set-up failures are typed [`LinkError`]s that say what to do: `ModuleNotLoaded`
//! (`modprobe nbd`), `PermissionDenied` (CAP_SYS_ADMIN), `Busy`, `InvalidBlockSize`.
//!
//! The serving process protects itself from the reclaim deadlock: the thread that starts the link
//! (and so every server thread) is marked `PR_SET_IO_FLUSHER` where permitted, `mlockall` is
//! optional, and no serving thread ever opens the device node.
//!
//! ```no_run
//! use userblk::link::nbd::mount;
//! use userblk::MemDevice;
//!
//! // Serves a 64 MiB RAM disk on /dev/nbd0 until another thread calls `handle.unmount()`.
//! mount(MemDevice::new(64 << 20), "/dev/nbd0", |handle| {
//!     println!("serving on {}", handle.device().display());
//!     let handle = handle.clone();
//!     std::thread::spawn(move || {
//!         std::thread::sleep(std::time::Duration::from_secs(10));
//!         let _ = handle.unmount();
//!     });
//! })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::link::LinkError;

pub mod blk;
#[doc(hidden)]
pub mod fuzzing;
mod handle;
mod ioctl;
mod link;
mod mount;
mod netlink;
mod recovery;
mod served_by;
mod sys;

pub use handle::MountHandle;
pub use link::NbdLink;
pub use mount::{mount, MountOptions, Mounted, DEFAULT_DEAD_CONN_TIMEOUT, DEFAULT_TIMEOUT};
pub use netlink::DeviceStatus;
pub use recovery::{disconnect, force_disconnect, Disconnected, ReattachError};

/// How the driver is configured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Setup {
    /// Generic netlink, falling back to ioctls when the kernel has no "nbd" netlink family but
    /// the driver is loaded.
    #[default]
    Auto,
    /// Generic netlink only (Linux 4.12+; what nbd-client uses by default).
    Netlink,
    /// The ioctls, with `NBD_DO_IT` blocking a thread of its own for the device's life.
    Ioctl,
}

impl Setup {
    /// `"netlink"`, `"ioctl"` or `"auto"`.
    pub fn name(self) -> &'static str {
        match self {
            Setup::Auto => "auto",
            Setup::Netlink => "netlink",
            Setup::Ioctl => "ioctl",
        }
    }
}

/// `/dev/nbd{index}`.
pub fn device_path(index: u32) -> PathBuf {
    PathBuf::from(format!("/dev/nbd{index}"))
}

/// The index of an NBD device path: `/dev/nbd3` (or any path whose last component is `nbd3`)
/// is 3. Anything else is [`LinkError::NotNbdDevice`].
pub fn device_index(path: &Path) -> Result<u32, LinkError> {
    let not_nbd = || LinkError::NotNbdDevice {
        device: path.display().to_string(),
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(not_nbd)?;
    let digits = name.strip_prefix("nbd").ok_or_else(not_nbd)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(not_nbd());
    }
    digits.parse().map_err(|_| not_nbd())
}

/// Whether the kernel has the NBD driver (built in or loaded).
pub fn driver_loaded() -> bool {
    Path::new("/sys/module/nbd").exists() || Path::new("/sys/block/nbd0").exists()
}

/// Whether `/dev/nbd{index}` is connected to a server right now (its `pid` attribute exists).
/// A device that is merely held open (by udev, blkid) is not.
pub fn device_connected(index: u32) -> bool {
    Path::new(&format!("/sys/block/nbd{index}/pid")).exists()
}

/// Waits until `/dev/nbd{index}` has no configuration left (no `pid` attribute); false if it
/// still has one at `deadline`.
pub(crate) fn wait_until_free(index: u32, deadline: Instant) -> bool {
    while device_connected(index) {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
    true
}

/// The attribute `attr` of `/sys/block/nbd{index}`, trimmed.
pub(crate) fn sysfs(index: u32, attr: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/block/nbd{index}/{attr}"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// The attribute `attr` of `/sys/block/nbd{index}` as a number.
pub(crate) fn sysfs_u64(index: u32, attr: &str) -> Option<u64> {
    sysfs(index, attr)?.parse().ok()
}

/// A timeout in the kernel's whole seconds, rounding a fraction up.
pub(crate) fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The kernel's view of NBD devices (netlink STATUS): one device, or all of them. `connected`
/// there counts any opener; see [`DeviceStatus`]. Needs no privilege.
pub fn status(index: Option<u32>) -> Result<Vec<DeviceStatus>, LinkError> {
    let mut nl = netlink::NbdNetlink::open()
        .map_err(|e| request_error(Step::Family, e, &context(None, 512)))?;
    nl.status(index).map_err(|e| {
        request_error(
            Step::Other(netlink::NbdCmd::Status.name()),
            e,
            &context(None, 512),
        )
    })
}

/// The set-up step a kernel error came from, which decides what it means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Resolving the generic netlink family "nbd".
    Family,
    /// Opening `/dev/nbdN`.
    Open,
    /// Netlink CONNECT (size, block size, flags and sockets in one go).
    Connect,
    /// `NBD_SET_BLKSIZE` or `NBD_SET_SIZE_BLOCKS`.
    SetSize(&'static str),
    /// Any other call.
    Other(&'static str),
}

impl Step {
    fn op(self) -> &'static str {
        match self {
            Step::Family => "resolving the \"nbd\" generic netlink family",
            Step::Open => "opening the NBD device",
            Step::Connect => "netlink NBD_CMD_CONNECT",
            Step::SetSize(op) | Step::Other(op) => op,
        }
    }
}

/// What an error is about: the device, the block size asked for, and facts of this machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Context {
    /// The device, or "nbd" before one is chosen.
    pub(crate) device: String,
    pub(crate) block_size: u32,
    pub(crate) page_size: u64,
    pub(crate) driver_loaded: bool,
}

/// The context of an error about `/dev/nbd{index}` (or "nbd" before one is chosen).
pub(crate) fn context(index: Option<u32>, block_size: u32) -> Context {
    Context {
        device: index.map_or_else(|| "nbd".into(), |i| device_path(i).display().to_string()),
        block_size,
        page_size: sys::page_size(),
        driver_loaded: driver_loaded(),
    }
}

/// Whether the kernel's NBD driver accepts `block_size` (Linux before 6.15: a power of two from
/// 512 to the page size).
pub(crate) fn block_size_ok(block_size: u32, page_size: u64) -> bool {
    block_size.is_power_of_two() && block_size >= 512 && u64::from(block_size) <= page_size
}

pub(crate) use nix::libc::EBUSY;
use nix::libc::{EACCES, EINVAL, ENODEV, ENOENT, ENXIO, EPERM};

/// Maps an errno from a set-up step to the [`LinkError`] that says what to do.
pub(crate) fn classify(step: Step, errno: i32, cx: &Context) -> LinkError {
    let device = cx.device.clone();
    match (step, errno) {
        (_, EPERM | EACCES) => LinkError::PermissionDenied { device },
        (_, EBUSY) => LinkError::Busy { device },
        (Step::Family, ENOENT) => LinkError::ModuleNotLoaded,
        (Step::Open, ENOENT | ENXIO | ENODEV) if !cx.driver_loaded => LinkError::ModuleNotLoaded,
        (Step::Open, ENOENT | ENXIO | ENODEV) => LinkError::NotNbdDevice { device },
        (Step::SetSize("NBD_SET_BLKSIZE"), EINVAL) => LinkError::InvalidBlockSize {
            block_size: cx.block_size,
        },
        // CONNECT's EINVAL has several causes; the block size is the one a caller controls.
        (Step::Connect, EINVAL) if !block_size_ok(cx.block_size, cx.page_size) => {
            LinkError::InvalidBlockSize {
                block_size: cx.block_size,
            }
        }
        _ => LinkError::io(step.op(), io::Error::from_raw_os_error(errno)),
    }
}

/// Maps a netlink request failure.
pub(crate) fn request_error(step: Step, e: netlink::RequestError, cx: &Context) -> LinkError {
    match e {
        netlink::RequestError::Errno(errno) => classify(step, errno, cx),
        netlink::RequestError::Io(source) => match source.raw_os_error() {
            Some(errno @ (EPERM | EACCES)) => classify(step, errno, cx),
            _ => LinkError::io(step.op(), source),
        },
    }
}

/// Maps an `io::Error` from a set-up step.
pub(crate) fn io_error(step: Step, e: io::Error, cx: &Context) -> LinkError {
    match e.raw_os_error() {
        Some(errno) => classify(step, errno, cx),
        None => LinkError::io(step.op(), e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx(block_size: u32) -> Context {
        Context {
            device: "/dev/nbd0".into(),
            block_size,
            page_size: 4096,
            driver_loaded: true,
        }
    }

    #[test]
    fn timeouts_round_up_to_seconds() {
        assert_eq!(whole_seconds(Duration::ZERO), 0);
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_secs(30)), 30);
        assert_eq!(whole_seconds(Duration::from_millis(30_001)), 31);
    }

    #[test]
    fn parses_device_paths() {
        assert_eq!(device_index(Path::new("/dev/nbd0")).unwrap(), 0);
        assert_eq!(device_index(Path::new("/dev/nbd15")).unwrap(), 15);
        assert_eq!(device_index(Path::new("nbd7")).unwrap(), 7);
        for bad in [
            "/dev/sda",
            "/dev/nbd",
            "/dev/nbd1p1",
            "/dev/nbd-1",
            "/",
            "/dev/nbd99999999999",
        ] {
            let e = device_index(Path::new(bad)).unwrap_err();
            assert!(matches!(e, LinkError::NotNbdDevice { .. }), "{bad}: {e:?}");
            assert_eq!(
                e.to_string(),
                format!("{bad} is not an NBD device (expected /dev/nbdN)")
            );
        }
        assert_eq!(device_path(3), PathBuf::from("/dev/nbd3"));
    }

    #[test]
    fn eperm_is_permission_denied() {
        for step in [Step::Connect, Step::Open, Step::Other("NBD_SET_SOCK")] {
            let e = classify(step, EPERM, &cx(512));
            assert!(matches!(e, LinkError::PermissionDenied { .. }), "{e:?}");
            assert_eq!(
                e.to_string(),
                "permission denied configuring /dev/nbd0: NBD set-up needs CAP_SYS_ADMIN (run as root)"
            );
        }
        assert!(matches!(
            classify(Step::Open, EACCES, &cx(512)),
            LinkError::PermissionDenied { .. }
        ));
    }

    #[test]
    fn ebusy_is_busy() {
        for step in [
            Step::Connect,
            Step::Other("NBD_SET_SOCK"),
            Step::Other("NBD_DO_IT"),
        ] {
            let e = classify(step, EBUSY, &cx(512));
            assert!(matches!(e, LinkError::Busy { .. }), "{e:?}");
            assert!(e.to_string().starts_with("/dev/nbd0 is busy: "), "{e}");
        }
    }

    #[test]
    fn missing_family_or_node_is_module_not_loaded() {
        let e = classify(Step::Family, ENOENT, &cx(512));
        assert!(matches!(e, LinkError::ModuleNotLoaded));
        assert_eq!(
            e.to_string(),
            "the nbd kernel module is not loaded: run `modprobe nbd` as root"
        );
        let unloaded = Context {
            driver_loaded: false,
            ..cx(512)
        };
        assert!(matches!(
            classify(Step::Open, ENOENT, &unloaded),
            LinkError::ModuleNotLoaded
        ));
        // With the driver loaded, a missing node is a wrong path.
        assert!(matches!(
            classify(Step::Open, ENOENT, &cx(512)),
            LinkError::NotNbdDevice { .. }
        ));
    }

    #[test]
    fn einval_on_block_size_is_invalid_block_size() {
        let e = classify(Step::SetSize("NBD_SET_BLKSIZE"), EINVAL, &cx(8192));
        assert!(matches!(
            e,
            LinkError::InvalidBlockSize { block_size: 8192 }
        ));
        assert_eq!(
            e.to_string(),
            "invalid block size 8192: must be a power of two from 512 to the page size"
        );
        assert!(matches!(
            classify(Step::Connect, EINVAL, &cx(65536)),
            LinkError::InvalidBlockSize { block_size: 65536 }
        ));
        // A valid block size: CONNECT's EINVAL is about something else and says which call.
        let e = classify(Step::Connect, EINVAL, &cx(4096));
        assert!(matches!(e, LinkError::Io { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("netlink NBD_CMD_CONNECT failed: "),
            "{e}"
        );
    }

    /// On a machine without the driver (this project's build hosts), set-up fails for real with
    /// the message that says what to do, by either method.
    #[test]
    fn without_the_driver_mounting_says_modprobe() {
        if driver_loaded() {
            println!("skipped: the nbd driver is loaded here, so ModuleNotLoaded cannot be shown");
            return;
        }
        for setup in [Setup::Auto, Setup::Netlink, Setup::Ioctl] {
            let err = MountOptions::new()
                .setup(setup)
                .device("/dev/nbd0")
                .spawn(crate::MemDevice::new(1 << 20))
                .unwrap_err();
            assert!(
                matches!(err, crate::ServerError::Link(LinkError::ModuleNotLoaded)),
                "{setup:?}: {err:?}"
            );
            assert_eq!(
                err.to_string(),
                "the nbd kernel module is not loaded: run `modprobe nbd` as root"
            );
        }
        assert!(matches!(status(None), Err(LinkError::ModuleNotLoaded)));
    }

    #[test]
    fn block_size_limits() {
        assert!(block_size_ok(512, 4096));
        assert!(block_size_ok(4096, 4096));
        assert!(!block_size_ok(8192, 4096));
        assert!(block_size_ok(65536, 65536));
        assert!(!block_size_ok(256, 4096));
        assert!(!block_size_ok(1536, 4096));
    }
}
