//! The kernel's ublk driver (Linux 6.0+): serve a [`BlockDevice`](crate::BlockDevice) as
//! `/dev/ublkbN`, with requests arriving as io_uring commands on `/dev/ublkcN` instead of over a
//! socket: no socket, no NBD framing, one copy each way (the kernel's, between the request's
//! pages and the queue's buffers).
//!
//! - [`mount`] / [`UblkOptions::mount`]: serve until unmounted, with a [`UblkHandle`];
//!   [`UblkOptions::spawn`] serves in the background and returns a [`Mounted`]. They mirror
//!   [`nbd::mount`](crate::link::nbd::mount).
//! - Each request is checked by the same [`validate_io`](crate::server::validate_io) and
//!   dispatched by the same [`Dispatcher`](crate::server::Dispatcher) as NBD's: FUA, errno
//!   mapping and caught panics are the same on both transports; only the framing differs.
//! - One thread per hardware queue (default 1 queue of depth 64, as libublk and rublk), with
//!   every request of the queue in flight together: served inline on that thread for a device
//!   that never blocks (RAM), by a pool of worker threads per queue for any other sync device
//!   ([`UblkOptions::workers`]), as tasks on its runtime for an async device
//!   ([`AsyncDevice`](crate::AsyncDevice)).
//! - The device's life: ADD_DEV, SET_PARAMS (block size, size, read-only, volatile cache and
//!   FUA, discard and write-zeroes limits, all from the device's capabilities), the queues'
//!   FETCH_REQ, START_DEV; then STOP_DEV and DEL_DEV on [`UblkHandle::unmount`], on SIGINT or
//!   SIGTERM (with [`UblkOptions::unmount_on_signals`]), when the server's value is dropped or
//!   a panic unwinds through it. A server killed outright loses its rings, which makes the
//!   kernel stop `/dev/ublkbN` itself.
//!
//! Built on the `io-uring` crate rather than `libublk`: the dispatch core, the handling of
//! panics and the teardown order stay the server's own, and libublk's known pitfalls (a
//! per-thread control ring behind a `Send` type, dropped completions) do not apply.
//!
//! Set-up failures are typed [`UblkError`]s that say what to do: `ModuleNotLoaded`
//! (`modprobe ublk_drv`), `ControlMissing`, `PermissionDenied`, `IdTaken`, `Unsupported`.
//!
//! A user other than root gets an unprivileged device (`UBLK_F_UNPRIVILEGED_DEV`, Linux 6.3+;
//! [`UblkOptions::unprivileged`]) once root has run `userblk ublk-setup` (a udev rule opening
//! `/dev/ublk-control` and handing each device's nodes to its owner, with [`device_owner`]);
//! without it the errors say so (`ControlNotAccessible`, `NodeNotHandedOver`,
//! `UnprivilegedUnsupported`).

mod ctrl;
mod error;
pub(crate) mod frame;
mod handle;
mod mount;
mod queue;
#[cfg(test)]
mod queue_tests;
mod serving;
mod sys;
mod unpriv;

pub use ctrl::CONTROL_PATH;
pub use error::UblkError;
pub use mount::{
    block_device_path, char_device_path, mount, Mounted, UblkHandle, UblkOptions,
    DEFAULT_MAX_IO_BYTES, DEFAULT_QUEUE_DEPTH,
};
pub use unpriv::{device_owner, remove_abandoned, Abandoned, NODE_HANDOVER_TIMEOUT};

/// Whether the ublk driver can be used here: `/dev/ublk-control` exists (after trying
/// `modprobe ublk_drv` when `load` is set and it does not).
pub fn available(load: bool) -> bool {
    let control = std::path::Path::new(CONTROL_PATH);
    if !control.exists() && load {
        let _ = std::process::Command::new("modprobe")
            .arg("ublk_drv")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
    control.exists()
}
