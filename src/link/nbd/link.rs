//! [`NbdLink`]: the [`KernelLink`] for `/dev/nbdN`.
//!
//! `start` makes one socketpair per connection, hands the kernel one end of each (netlink
//! CONNECT, or the ioctls on their own thread) and gives the server the others; a reattach
//! hands them to a running device instead (see [`recovery`]). `finish` leaves the device free
//! for the next user: netlink DISCONNECT if nobody sent it yet, or the end of DO_IT and
//! CLEAR_SOCK, and the last descriptor on the device node closed. The state the link shares
//! with its [`MountHandle`]s is in [`handle`](super::handle).

use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::handle::{send_disconnect, Control, MountHandle, Phase};
use super::ioctl::{self, IoctlConfig, SetupError};
use super::mount::MountOptions;
use super::netlink::{ConnectRequest, NbdNetlink, RequestError};
use super::recovery;
use super::served_by;
use super::sys::{self, NbdIoctl, NbdNode};
use super::{
    block_size_ok, classify, context, device_connected, device_index, device_path, driver_loaded,
    io_error, request_error, sysfs_u64, wait_until_free, whole_seconds, Context, Setup, Step,
    EBUSY,
};
use crate::link::{Export, KernelLink, LinkError, Started};
use crate::proto::TransmissionFlags;

/// How long a device may stay busy before it is reported so. A device keeps its configuration
/// (and its `pid` attribute, and CONNECT's EBUSY) until its last opener closes it, and udev
/// probes a device after every change: right after one user leaves, the next may have to wait.
const BUSY_GRACE: Duration = Duration::from_secs(5);
/// How long the kernel may take to start a device after DO_IT was called.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// What a started link holds until it finishes.
#[derive(Debug)]
enum Running {
    Netlink {
        index: u32,
    },
    Ioctl {
        index: u32,
        thread: JoinHandle<io::Result<()>>,
    },
}

/// The [`KernelLink`] for a real `/dev/nbdN`. Build one with [`MountOptions::link`] (or use
/// [`MountOptions::mount`], which does it all) and serve it with
/// [`Server`](crate::Server); [`handle`](Self::handle) gives the remote control.
///
/// Dropping a started link disconnects the device and waits for the kernel to let it go.
#[derive(Debug)]
pub struct NbdLink {
    options: MountOptions,
    control: Arc<Control>,
    /// Clones of the server's ends: shutting them down is how `finish` makes sure the kernel
    /// sees the connections end even while the server still holds its descriptors.
    server_ends: Vec<UnixStream>,
    running: Option<Running>,
    /// Started by a reattach, and so recorded as the device's server (see `served_by`).
    reattached: bool,
}

impl NbdLink {
    /// A link with these options; nothing happens until the server starts it.
    pub fn new(options: &MountOptions) -> NbdLink {
        NbdLink {
            options: options.clone(),
            control: Arc::new(Control::default()),
            server_ends: Vec::new(),
            running: None,
            reattached: false,
        }
    }

    /// The handle that unmounts the device or changes its timeout, from any thread.
    pub fn handle(&self) -> MountHandle {
        MountHandle {
            control: Arc::clone(&self.control),
        }
    }

    /// What the kernel is told for `export`: the override block size, READ_ONLY, CAN_MULTI_CONN.
    fn kernel_export(&self, export: &Export) -> Result<Export, LinkError> {
        let o = &self.options;
        let block_size = o.block_size_override().unwrap_or(export.block_size);
        // A larger block size keeps every request aligned for the device; a smaller one would not.
        if !block_size.is_power_of_two() || block_size < 512 || block_size % export.block_size != 0
        {
            return Err(LinkError::InvalidBlockSize { block_size });
        }
        let mut flags = export.flags;
        if o.is_read_only() {
            flags = TransmissionFlags(
                (flags.0 | TransmissionFlags::READ_ONLY.0)
                    & !(TransmissionFlags::SEND_TRIM.0 | TransmissionFlags::SEND_WRITE_ZEROES.0),
            );
        }
        if o.connection_count() > 1 {
            // Every connection serves the same device, so a FLUSH on one covers writes done on
            // any: what CAN_MULTI_CONN promises.
            flags |= TransmissionFlags::CAN_MULTI_CONN;
        }
        Ok(Export {
            size: export.size - export.size % u64::from(block_size),
            block_size,
            flags,
        })
    }

    fn start_inner(&mut self, export: &Export) -> Result<Started, LinkError> {
        let export = self.kernel_export(export)?;
        // Protect the serving threads (created after this, from this thread) from the reclaim
        // deadlock; not permitted everywhere, and then only reported by `io_flusher()`.
        if self.options.wants_io_flusher() {
            let ok = sys::set_io_flusher().is_ok();
            self.control.lock().io_flusher = ok;
        }
        if self.options.wants_mlock() {
            use nix::sys::mman::{mlockall, MlockAllFlags};
            mlockall(MlockAllFlags::MCL_CURRENT | MlockAllFlags::MCL_FUTURE)
                .map_err(|e| LinkError::io("mlockall", e.into()))?;
        }
        if self.options.is_reattach() {
            return self.start_reattach(&export);
        }
        let wanted = match self.options.device_path() {
            Some(p) => Some(device_index(p)?),
            None => None,
        };
        let setup = match self.options.setup_method() {
            Setup::Auto => match NbdNetlink::open() {
                Ok(nl) => SetupWith::Netlink(nl),
                Err(RequestError::Errno(_) | RequestError::Io(_)) if driver_loaded() => {
                    SetupWith::Ioctl
                }
                Err(e) => {
                    return Err(request_error(
                        Step::Family,
                        e,
                        &context(wanted, export.block_size),
                    ))
                }
            },
            Setup::Netlink => SetupWith::Netlink(NbdNetlink::open().map_err(|e| {
                request_error(Step::Family, e, &context(wanted, export.block_size))
            })?),
            Setup::Ioctl => SetupWith::Ioctl,
        };
        let (server_ends, kernel_ends) = socket_pairs(self.options.connection_count())?;
        let clones = clone_all(&server_ends)?;
        let (index, setup, running) = match setup {
            SetupWith::Netlink(mut nl) => {
                let index = self.connect_netlink(&mut nl, wanted, &export, kernel_ends)?;
                wait_ready(index, &export, || false);
                (index, Setup::Netlink, Running::Netlink { index })
            }
            SetupWith::Ioctl => {
                let (index, doit) = self.connect_ioctl(wanted, &export, kernel_ends)?;
                self.control.lock().ioctl_fd = Some(doit.fd);
                (
                    index,
                    Setup::Ioctl,
                    Running::Ioctl {
                        index,
                        thread: doit.thread,
                    },
                )
            }
        };
        self.server_ends = clones;
        self.running = Some(running);
        if self.control.set_running(index, setup, export) {
            // Asked for before the device existed: nothing can have been written yet.
            self.handle().disconnect()?;
        }
        Ok(Started {
            export,
            conns: server_ends,
        })
    }

    fn connect_netlink(
        &self,
        nl: &mut NbdNetlink,
        wanted: Option<u32>,
        export: &Export,
        kernel_ends: Vec<UnixStream>,
    ) -> Result<u32, LinkError> {
        let cx = context(wanted, export.block_size);
        if !block_size_ok(export.block_size, 65536) {
            return Err(LinkError::InvalidBlockSize {
                block_size: export.block_size,
            });
        }
        let fds = raw_fds(&kernel_ends);
        let req = ConnectRequest {
            index: wanted,
            size: export.size,
            block_size: u64::from(export.block_size),
            flags: u64::from(export.flags.0),
            timeout: self.options.timeout_value().map(whole_seconds),
            dead_conn_timeout: self.options.dead_conn_timeout_value().map(whole_seconds),
            fds,
        };
        let deadline = Instant::now() + BUSY_GRACE;
        let result = loop {
            match nl.connect(&req) {
                // The kernel cannot tell a device in use from one that udev holds open for a
                // moment after its last user left: give it the grace period.
                Err(RequestError::Errno(EBUSY))
                    if wanted.is_some() && Instant::now() < deadline =>
                {
                    thread::sleep(Duration::from_millis(50));
                }
                other => break other,
            }
        };
        // The kernel holds its own references to the sockets now (or none, on failure).
        drop(kernel_ends);
        result.map_err(|e| match (e, wanted) {
            (RequestError::Errno(EBUSY), Some(index)) => busy_error(index, &cx),
            (e, _) => request_error(Step::Connect, e, &cx),
        })
    }

    /// New connections for a running device whose server is gone: see [`recovery::reattach`].
    fn start_reattach(&mut self, export: &Export) -> Result<Started, LinkError> {
        let reattached = recovery::reattach(&self.options, export)?;
        let index = reattached.index;
        self.server_ends = clone_all(&reattached.conns)?;
        // The kernel's pid attribute still names the first server: say who serves it now, so
        // that `serve` and `disconnect` do not take the device for orphaned. Best effort (a
        // record that cannot be written only makes those more cautious than needed).
        let _ = served_by::record_self(index);
        self.reattached = true;
        self.running = Some(Running::Netlink { index });
        if self
            .control
            .set_running(index, Setup::Netlink, reattached.export)
        {
            // Asked for while the reattach was starting: the device is served again, so the
            // kernel's DISCONNECT ends it the usual way (in-flight requests answered first).
            self.handle().disconnect()?;
        }
        Ok(Started {
            export: reattached.export,
            conns: reattached.conns,
        })
    }

    fn connect_ioctl(
        &self,
        wanted: Option<u32>,
        export: &Export,
        kernel_ends: Vec<UnixStream>,
    ) -> Result<(u32, ioctl::DoIt), LinkError> {
        let config = IoctlConfig {
            block_size: export.block_size,
            size: export.size,
            flags: u64::from(export.flags.0),
            timeout: self.options.timeout_value().map_or(0, whole_seconds),
        };
        let candidates = match wanted {
            Some(i) => vec![i],
            None => free_devices(),
        };
        if candidates.is_empty() {
            return Err(if driver_loaded() {
                LinkError::Busy {
                    device: "every /dev/nbdN".into(),
                }
            } else {
                LinkError::ModuleNotLoaded
            });
        }
        let deadline = Instant::now() + BUSY_GRACE;
        let mut last = None;
        for index in candidates {
            let cx = context(Some(index), export.block_size);
            // Never try a device that has a server. One that only lingers, held open by udev,
            // frees up soon; with auto-pick, one taken since the listing is skipped. (The check
            // is only a courtesy: the set-up's first SET_SOCK is what claims the device, and it
            // fails with EBUSY rather than disturb a device another task holds.)
            if wanted.is_some() && !wait_until_free(index, deadline) {
                return Err(busy_error(index, &cx));
            }
            if wanted.is_none() && device_connected(index) {
                last = Some(classify(Step::Other("NBD_SET_SOCK"), EBUSY, &cx));
                continue;
            }
            loop {
                match try_ioctl(index, config, export, &kernel_ends, &cx) {
                    Ok(doit) => return Ok((index, doit)),
                    Err(LinkError::Busy { .. })
                        if wanted.is_some() && Instant::now() < deadline =>
                    {
                        thread::sleep(Duration::from_millis(50));
                    }
                    // With auto-pick, a device taken meanwhile is no reason to give up.
                    Err(e @ LinkError::Busy { .. }) if wanted.is_none() => {
                        last = Some(e);
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Err(last.unwrap_or(LinkError::ModuleNotLoaded))
    }

    /// Releases the kernel side; idempotent.
    fn release(&mut self) -> Result<(), LinkError> {
        let Some(running) = self.running.take() else {
            return Ok(());
        };
        let result = match running {
            Running::Netlink { index } => {
                if std::mem::take(&mut self.reattached) {
                    served_by::forget_self(index);
                }
                let already = std::mem::replace(&mut self.control.lock().disconnect_sent, true);
                let r = if already {
                    Ok(())
                } else {
                    send_disconnect(index, Setup::Netlink, None)
                };
                self.shutdown_server_ends();
                r
            }
            Running::Ioctl { index, thread } => {
                let requested = self.control.lock().disconnect_sent;
                // DO_IT returns once the kernel sees every connection end.
                self.shutdown_server_ends();
                let r = match thread.join() {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(_)) if requested => Ok(()),
                    Ok(Err(e)) => Err(io_error(
                        Step::Other(NbdIoctl::DoIt.name()),
                        e,
                        &context(Some(index), 512),
                    )),
                    Err(_) => Err(LinkError::io(
                        NbdIoctl::DoIt.name(),
                        io::Error::other("the DO_IT thread panicked"),
                    )),
                };
                let fd = self.control.lock().ioctl_fd.take();
                close_last(fd);
                r
            }
        };
        // Leave the device free for the next user: the kernel lets it go once udev, which
        // probes it after every change, closes it too.
        let index = self.control.lock().index;
        if let Some(index) = index {
            wait_until_free(index, Instant::now() + BUSY_GRACE);
        }
        self.control.set_phase(Phase::Ended);
        result
    }

    fn shutdown_server_ends(&mut self) {
        for s in self.server_ends.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// A device found busy: [`LinkError::Orphaned`] when the process that started it is gone,
/// [`LinkError::Busy`] otherwise.
fn busy_error(index: u32, cx: &Context) -> LinkError {
    match served_by::orphaned_by(index) {
        Some(pid) => LinkError::Orphaned {
            device: device_path(index).display().to_string(),
            pid,
        },
        None => classify(Step::Connect, EBUSY, cx),
    }
}

enum SetupWith {
    Netlink(NbdNetlink),
    Ioctl,
}

fn setup_error(e: SetupError, cx: &Context) -> LinkError {
    let step = match e.ioctl {
        None => Step::Open,
        Some(i @ (NbdIoctl::SetBlksize | NbdIoctl::SetSizeBlocks)) => Step::SetSize(i.name()),
        Some(i) => Step::Other(i.name()),
    };
    io_error(step, e.source, cx)
}

/// NBD devices that exist and are not connected, lowest index first.
fn free_devices() -> Vec<u32> {
    let mut out: Vec<u32> = std::fs::read_dir("/sys/block")
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|e| device_index(Path::new(&e.file_name())).ok())
                .filter(|&i| !device_connected(i))
                .collect()
        })
        .unwrap_or_default();
    out.sort_unstable();
    out
}

/// One attempt at the ioctl set-up of `/dev/nbd{index}`, up to the device running.
fn try_ioctl(
    index: u32,
    config: IoctlConfig,
    export: &Export,
    kernel_ends: &[UnixStream],
    cx: &Context,
) -> Result<ioctl::DoIt, LinkError> {
    let ends = clone_all(kernel_ends)?;
    let doit = ioctl::start(&device_path(index), config, ends).map_err(|e| setup_error(e, cx))?;
    if wait_ready(index, export, || doit.thread.is_finished()) {
        return Ok(doit);
    }
    Err(match doit.thread.join() {
        Ok(Err(e)) => io_error(Step::Other(NbdIoctl::DoIt.name()), e, cx),
        _ => LinkError::io(
            NbdIoctl::DoIt.name(),
            io::Error::other("the device stopped as soon as it started"),
        ),
    })
}

/// Waits until the kernel shows the device running with the export's size and block size (it
/// applies them after it publishes the `pid` attribute), or `stopped()`. After
/// [`START_TIMEOUT`] it gives up waiting and lets I/O find out.
fn wait_ready(index: u32, export: &Export, stopped: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if stopped() {
            return false;
        }
        let ready = device_connected(index)
            && sysfs_u64(index, "size") == Some(export.size / 512)
            && sysfs_u64(index, "queue/logical_block_size") == Some(u64::from(export.block_size));
        if ready || Instant::now() >= deadline {
            return true;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// One socketpair a connection: the server's ends and the kernel's.
pub(super) fn socket_pairs(count: usize) -> Result<(Vec<UnixStream>, Vec<UnixStream>), LinkError> {
    let mut server_ends = Vec::new();
    let mut kernel_ends = Vec::new();
    for _ in 0..count {
        let (server, kernel) = UnixStream::pair().map_err(|e| LinkError::io("socketpair", e))?;
        server_ends.push(server);
        kernel_ends.push(kernel);
    }
    Ok((server_ends, kernel_ends))
}

/// A second descriptor for each socket.
fn clone_all(sockets: &[UnixStream]) -> Result<Vec<UnixStream>, LinkError> {
    sockets
        .iter()
        .map(UnixStream::try_clone)
        .collect::<io::Result<Vec<_>>>()
        .map_err(|e| LinkError::io("duplicating a socket", e))
}

/// The descriptors the kernel is given in a netlink request.
pub(super) fn raw_fds(kernel_ends: &[UnixStream]) -> Vec<u32> {
    kernel_ends
        .iter()
        .map(|s| u32::try_from(s.as_raw_fd()).unwrap_or(u32::MAX))
        .collect()
}

/// Closes the device node once no handle still uses it (a flush or timeout change in flight
/// holds a reference for the length of one call).
fn close_last(fd: Option<Arc<NbdNode>>) {
    let Some(mut fd) = fd else { return };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Arc::try_unwrap(fd) {
            Ok(owned) => return drop(owned),
            Err(shared) if Instant::now() < deadline => {
                fd = shared;
                thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return,
        }
    }
}

impl KernelLink for NbdLink {
    fn start(&mut self, export: &Export) -> Result<Started, LinkError> {
        {
            let mut st = self.control.lock();
            if st.phase != Phase::Idle {
                return Err(LinkError::AlreadyStarted);
            }
            st.phase = Phase::Starting;
        }
        let result = self.start_inner(export);
        if result.is_err() {
            self.control.set_phase(Phase::Failed);
        }
        result
    }

    fn finish(&mut self) -> Result<(), LinkError> {
        self.release()
    }
}

impl Drop for NbdLink {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(block_size: u32, flags: u16) -> Export {
        Export {
            size: (64 << 20) + 512,
            block_size,
            flags: TransmissionFlags(flags),
        }
    }

    #[test]
    fn kernel_export_applies_options() {
        let link = NbdLink::new(
            &MountOptions::new()
                .read_only(true)
                .connections(2)
                .block_size(4096),
        );
        let e = link.kernel_export(&export(512, 0b110_0101)).unwrap();
        assert_eq!(e.block_size, 4096);
        assert_eq!(e.size, 64 << 20, "rounded down to the block size");
        let f = e.flags;
        assert!(f.contains(TransmissionFlags::READ_ONLY));
        assert!(f.contains(TransmissionFlags::CAN_MULTI_CONN));
        assert!(!f.contains(TransmissionFlags::SEND_TRIM));
        assert!(!f.contains(TransmissionFlags::SEND_WRITE_ZEROES));
        assert!(f.contains(TransmissionFlags::SEND_FLUSH));
    }

    #[test]
    fn block_size_below_the_devices_is_invalid() {
        let link = NbdLink::new(&MountOptions::new().block_size(512));
        let e = link.kernel_export(&export(4096, 1)).unwrap_err();
        assert!(
            matches!(e, LinkError::InvalidBlockSize { block_size: 512 }),
            "{e:?}"
        );
        let link = NbdLink::new(&MountOptions::new().block_size(3000));
        assert!(matches!(
            link.kernel_export(&export(512, 1)),
            Err(LinkError::InvalidBlockSize { block_size: 3000 })
        ));
    }

    #[test]
    fn a_handle_before_start_knows_nothing_and_does_nothing() {
        let link = NbdLink::new(&MountOptions::new());
        let h = link.handle();
        assert_eq!(h.index(), None);
        assert!(!h.is_mounted());
        h.unmount().unwrap();
        assert!(matches!(
            h.set_timeout(Duration::from_secs(1)),
            Err(LinkError::NotConnected { .. })
        ));
    }
}
