//! [`MountHandle`], the remote control of an [`NbdLink`](super::NbdLink): the state a link
//! shares with its handles, and what a handle does with it (flush, unmount, disconnect, change
//! the timeout) from any thread.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

use super::netlink::NbdNetlink;
use super::sys::{nbd_ioctl, NbdIoctl, NbdNode};
use super::{context, device_path, io_error, request_error, whole_seconds, Setup, Step};
use crate::link::signals::OnSignal;
use crate::link::{Export, LinkError};

/// Where a link is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum Phase {
    #[default]
    Idle,
    Starting,
    Running,
    Failed,
    Ended,
}

/// What a link and its handles know of the device.
#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) phase: Phase,
    pub(super) index: Option<u32>,
    pub(super) setup: Option<Setup>,
    /// What the kernel was told.
    pub(super) export: Option<Export>,
    /// The device node, open while DO_IT runs (ioctl set-up only).
    pub(super) ioctl_fd: Option<Arc<NbdNode>>,
    pub(super) disconnect_sent: bool,
    unmount_requested: bool,
    pub(super) io_flusher: bool,
    signal: Option<&'static str>,
}

/// State shared by a link and its handles.
#[derive(Debug, Default)]
pub(crate) struct Control {
    state: Mutex<State>,
    changed: Condvar,
}

impl Control {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn set_phase(&self, phase: Phase) {
        self.lock().phase = phase;
        self.changed.notify_all();
    }

    /// Records a started device and wakes whoever waits for it; true if an unmount was asked
    /// for before it ran.
    pub(super) fn set_running(&self, index: u32, setup: Setup, export: Export) -> bool {
        let pending_unmount = {
            let mut st = self.lock();
            st.index = Some(index);
            st.setup = Some(setup);
            st.export = Some(export);
            st.phase = Phase::Running;
            st.unmount_requested
        };
        self.changed.notify_all();
        pending_unmount
    }
}

/// A handle on a served NBD device: which device it is, and a way to unmount it or change its
/// timeout from any thread. Cloning is cheap; dropping a clone does nothing.
///
/// Never call [`unmount`](Self::unmount) or [`flush`](Self::flush) from inside a
/// [`BlockDevice`](crate::BlockDevice) method: they do I/O on the device, which needs the server.
#[derive(Clone, Debug)]
pub struct MountHandle {
    pub(super) control: Arc<Control>,
}

impl MountHandle {
    /// The device's index (`N` in `/dev/nbdN`), once the kernel has it.
    pub fn index(&self) -> Option<u32> {
        self.control.lock().index
    }

    /// The device node, e.g. `/dev/nbd0`; empty before the kernel has the device.
    pub fn device(&self) -> PathBuf {
        self.index().map(device_path).unwrap_or_default()
    }

    /// How the driver was configured (netlink or ioctl), once it was.
    pub fn setup(&self) -> Option<Setup> {
        self.control.lock().setup
    }

    /// What the kernel was told: size, block size and transmission flags.
    pub fn export(&self) -> Option<Export> {
        self.control.lock().export
    }

    /// Whether the device is being served.
    pub fn is_mounted(&self) -> bool {
        self.control.lock().phase == Phase::Running
    }

    /// Whether the serving threads run with `PR_SET_IO_FLUSHER` (false where not permitted:
    /// without CAP_SYS_RESOURCE, or before Linux 5.6).
    pub fn io_flusher(&self) -> bool {
        self.control.lock().io_flusher
    }

    /// The signal that asked for the unmount, when
    /// [`unmount_on_signals`](super::MountOptions::unmount_on_signals) did: `"SIGINT"` or `"SIGTERM"`.
    pub fn signal(&self) -> Option<&'static str> {
        self.control.lock().signal
    }

    /// Blocks until the link has started or failed to; true if it is running.
    pub(crate) fn wait_started(&self, give_up: impl Fn() -> bool) -> bool {
        let mut st = self.control.lock();
        loop {
            match st.phase {
                Phase::Running => return true,
                Phase::Failed | Phase::Ended => return false,
                Phase::Idle | Phase::Starting if give_up() => return false,
                Phase::Idle | Phase::Starting => {}
            }
            st = self
                .control
                .changed
                .wait_timeout(st, Duration::from_millis(50))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Makes every completed write durable: fsync on the device node, which sends FLUSH when
    /// the device advertises it. Opens the node (netlink set-up) from the calling thread.
    pub fn flush(&self) -> Result<(), LinkError> {
        let (index, fd) = {
            let st = self.control.lock();
            if st.phase != Phase::Running || st.disconnect_sent {
                return Ok(());
            }
            match st.index {
                Some(i) => (i, st.ioctl_fd.clone()),
                None => return Ok(()),
            }
        };
        let op = "flushing the device (fsync)";
        match fd {
            Some(fd) => nix::unistd::fsync(fd.as_fd()).map_err(|e| LinkError::io(op, e.into())),
            None => File::open(device_path(index))
                .and_then(|f| f.sync_all())
                .map_err(|e| LinkError::io(op, e)),
        }
    }

    /// Unmounts cleanly: [`flush`](Self::flush), then [`disconnect`](Self::disconnect). The
    /// server then sees DISC, answers what is in flight, calls the device's `unmount` and
    /// returns; the device node is free again once it has. Disconnects even when the flush
    /// fails, and returns the flush's error then. Unmounting twice is harmless.
    ///
    /// # Requests still in flight
    ///
    /// With netlink set-up (the default), the kernel's DISCONNECT sends DISC and then shuts the
    /// sockets down at once, failing every request still in flight with EIO: drivers/block/nbd.c,
    /// `nbd_genl_disconnect` -> `nbd_disconnect_and_put` -> `nbd_disconnect` (DISC) then
    /// `nbd_clear_sock` -> `sock_shutdown` and `nbd_clear_que` (each pending request completed
    /// with `BLK_STS_IOERR`); read in mainline 5.x, and the same in the 5.15–6.17 sources this
    /// project checked (`NBD-KERNEL.md`). The server may nevertheless already have the request
    /// and still apply it to the device: a write the application saw fail with EIO can be on the
    /// device after the unmount. So stop writers (unmount the file system, close the node) before
    /// unmounting if that matters; the flush only covers writes that completed before it. The
    /// ioctl set-up's DISCONNECT only sends DISC, and DO_IT returns once the server has answered
    /// and closed, so nothing is failed there.
    pub fn unmount(&self) -> Result<(), LinkError> {
        let flushed = self.flush();
        self.disconnect()?;
        flushed
    }

    /// Asks the kernel to disconnect at once, without flushing: it sends DISC on every
    /// connection (netlink DISCONNECT also shuts them down, failing requests still in flight
    /// with EIO while the device may still apply them: see [`unmount`](Self::unmount)).
    /// Before the link has started, the disconnect happens as soon as it has.
    pub fn disconnect(&self) -> Result<(), LinkError> {
        let (index, setup, fd) = {
            let mut st = self.control.lock();
            match st.phase {
                Phase::Idle | Phase::Starting => {
                    st.unmount_requested = true;
                    return Ok(());
                }
                Phase::Failed | Phase::Ended => return Ok(()),
                Phase::Running if st.disconnect_sent => return Ok(()),
                Phase::Running => {}
            }
            let (Some(index), Some(setup)) = (st.index, st.setup) else {
                return Ok(());
            };
            st.disconnect_sent = true;
            (index, setup, st.ioctl_fd.clone())
        };
        let result = send_disconnect(index, setup, fd.as_deref());
        if result.is_err() {
            self.control.lock().disconnect_sent = false;
        }
        result
    }

    /// Changes the request timeout of the running device (0: none). The kernel counts whole
    /// seconds; a fraction rounds up.
    pub fn set_timeout(&self, timeout: Duration) -> Result<(), LinkError> {
        let (index, setup, fd) = {
            let st = self.control.lock();
            match (st.phase, st.index, st.setup) {
                (Phase::Running, Some(i), Some(s)) => (i, s, st.ioctl_fd.clone()),
                _ => {
                    return Err(LinkError::NotConnected {
                        device: st
                            .index
                            .map_or("nbd".into(), |i| device_path(i).display().to_string()),
                    })
                }
            }
        };
        let secs = whole_seconds(timeout);
        let cx = context(Some(index), 512);
        match (setup, fd) {
            (Setup::Ioctl, Some(fd)) => nbd_ioctl(&fd, NbdIoctl::SetTimeout, secs)
                .map_err(|e| io_error(Step::Other(NbdIoctl::SetTimeout.name()), e, &cx)),
            _ => NbdNetlink::open()
                .and_then(|mut nl| nl.set_timeout(index, secs))
                .map_err(|e| request_error(Step::Other("netlink NBD_CMD_RECONFIGURE"), e, &cx)),
        }
    }
}

pub(super) fn send_disconnect(
    index: u32,
    setup: Setup,
    fd: Option<&NbdNode>,
) -> Result<(), LinkError> {
    let cx = context(Some(index), 512);
    match (setup, fd) {
        (Setup::Ioctl, Some(fd)) => nbd_ioctl(fd, NbdIoctl::Disconnect, 0)
            .map_err(|e| io_error(Step::Other(NbdIoctl::Disconnect.name()), e, &cx)),
        _ => NbdNetlink::open()
            .and_then(|mut nl| nl.disconnect(index))
            .map_err(|e| request_error(Step::Other("netlink NBD_CMD_DISCONNECT"), e, &cx)),
    }
}

/// With [`unmount_on_signals`](super::MountOptions::unmount_on_signals): the first signal unmounts
/// (flush, then DISC), a second disconnects at once. The first signal is kept.
impl OnSignal for MountHandle {
    fn record(&self, name: &'static str) {
        self.control.lock().signal.get_or_insert(name);
    }

    fn stop(&self) {
        let handle = self.clone();
        // The flush may take a while, and the next signal must still be heard: the unmount
        // runs on a thread of its own.
        let _ = thread::Builder::new()
            .name("userblk-unmount".into())
            .spawn(move || {
                let _ = handle.unmount();
            });
    }

    fn stop_now(&self) {
        let _ = self.disconnect();
    }
}
