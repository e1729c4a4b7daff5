//! [`mount`] and [`MountOptions`]: serving a device on `/dev/nbdN` in one call, and
//! [`Mounted`], a device served in the background.

use std::panic;
use std::path::{Path, PathBuf};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::handle::MountHandle;
use super::link::NbdLink;
use super::Setup;
use crate::device::BlockDevice;
use crate::link::signals::SignalWatch;
use crate::link::LinkError;
use crate::server::{Server, ServerError, ServerOptions};

/// The default request timeout: long enough for any sane device, short enough that the requests
/// of a dead server are taken back well before the hung-task detector's 120 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The default dead-connection timeout (netlink): how long requests wait for a reattach.
pub const DEFAULT_DEAD_CONN_TIMEOUT: Duration = Duration::from_secs(30);

/// How to serve a device on `/dev/nbdN`: a builder.
///
/// ```no_run
/// use std::time::Duration;
/// use userblk::link::nbd::MountOptions;
/// use userblk::MemDevice;
///
/// let mounted = MountOptions::new()
///     .device("/dev/nbd1")
///     .connections(2)
///     .timeout(Duration::from_secs(30))
///     .spawn(MemDevice::new(64 << 20))?;
/// println!("serving on {}", mounted.device().display());
/// mounted.unmount()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountOptions {
    device: Option<PathBuf>,
    setup: Setup,
    connections: usize,
    timeout: Option<Duration>,
    dead_conn_timeout: Option<Duration>,
    reattach: bool,
    read_only: bool,
    block_size: Option<u32>,
    io_flusher: bool,
    mlock: bool,
    unmount_on_signals: bool,
    server: ServerOptions,
}

impl Default for MountOptions {
    fn default() -> MountOptions {
        MountOptions::new()
    }
}

impl MountOptions {
    /// The defaults: a free device chosen by the kernel, netlink set-up with ioctl fallback, one
    /// connection, a request timeout of [`DEFAULT_TIMEOUT`] and a dead-connection timeout of
    /// [`DEFAULT_DEAD_CONN_TIMEOUT`], the device's own block size and read-only flag,
    /// `PR_SET_IO_FLUSHER` where permitted, no `mlockall`, signals left alone.
    ///
    /// With these, a server that dies leaves no task blocked for good: requests it had are
    /// requeued after at most the request timeout, then wait up to the dead-connection
    /// timeout for a [`reattach`](Self::reattach)ed server, then fail with EIO. (With no
    /// request timeout the kernel waits for them forever.)
    pub fn new() -> MountOptions {
        MountOptions {
            device: None,
            setup: Setup::Auto,
            connections: 1,
            timeout: Some(DEFAULT_TIMEOUT),
            dead_conn_timeout: Some(DEFAULT_DEAD_CONN_TIMEOUT),
            reattach: false,
            read_only: false,
            block_size: None,
            io_flusher: true,
            mlock: false,
            unmount_on_signals: false,
            server: ServerOptions::default(),
        }
    }

    /// Serve on this device node, e.g. `/dev/nbd0`. The path `auto` means
    /// [`auto_device`](Self::auto_device).
    pub fn device(mut self, path: impl Into<PathBuf>) -> MountOptions {
        let path = path.into();
        self.device = (path != Path::new("auto")).then_some(path);
        self
    }

    /// Let the kernel pick a free device (netlink creates one if none is free; ioctl set-up
    /// takes the first existing one that is not connected). [`MountHandle::device`] says which.
    pub fn auto_device(mut self) -> MountOptions {
        self.device = None;
        self
    }

    /// Netlink, ioctl, or netlink with ioctl fallback (the default).
    pub fn setup(mut self, setup: Setup) -> MountOptions {
        self.setup = setup;
        self
    }

    /// Connections (sockets, hardware queues) the kernel uses; more than one advertises
    /// CAN_MULTI_CONN. Default 1; 0 counts as 1.
    pub fn connections(mut self, n: usize) -> MountOptions {
        self.connections = n.max(1);
        self
    }

    /// A request that gets no answer in this time is taken back by the kernel (whole seconds;
    /// default [`DEFAULT_TIMEOUT`]): its connection is marked dead and the request requeued, to
    /// wait up to the [dead-connection timeout](Self::dead_conn_timeout) for a new connection,
    /// then fail with EIO. Zero waits forever: a server that dies then leaves its requests, and
    /// the tasks waiting on them, stuck until someone runs [`disconnect`](super::disconnect).
    ///
    /// With [`Setup::Ioctl`] and no timeout, the kernel still gives up sending on a connection
    /// whose server has read nothing for 30 s (a send timeout on the socket, without which a
    /// killed server's process could hang in the kernel for good: see `ioctl.rs`).
    pub fn timeout(mut self, timeout: Duration) -> MountOptions {
        self.timeout = (!timeout.is_zero()).then_some(timeout);
        self
    }

    /// How long requests wait for a dead connection to be replaced by a
    /// [`reattach`](Self::reattach) before failing with EIO (netlink only; default
    /// [`DEFAULT_DEAD_CONN_TIMEOUT`]; zero fails them at once). The wait is uninterruptible, so
    /// keep it, with the request timeout, under the hung-task detector's 120 s.
    pub fn dead_conn_timeout(mut self, timeout: Duration) -> MountOptions {
        self.dead_conn_timeout = Some(timeout);
        self
    }

    /// Instead of setting a device up, give a running one new connections: the
    /// [`device`](Self::device) must be connected, set up by netlink, and its server gone
    /// (killed, crashed): netlink RECONFIGURE with the new sockets. The requests that wait then
    /// resume, those the dead server had included (sent again). Requests whose wait (the
    /// dead-connection timeout) ran out have failed by then, but the device still takes the new
    /// server. The new server must export the same size, block size and
    /// commands; otherwise, or when the device has no dead connection, a typed
    /// [`LinkError::Reattach`] says why. The request and dead-connection timeouts are set
    /// again when given.
    ///
    /// # What a driver must guarantee for this to be safe
    ///
    /// - A request may be applied twice: the kernel resends what it had sent the dead server,
    ///   which may have applied it. Writes, trims and zeroes of a range are idempotent as long
    ///   as the device does not turn them into something else (an append log must not).
    /// - A write the dead server acknowledged is not sent again: it must have outlived the
    ///   process. A device that writes to a file or a block device before answering
    ///   ([`FileDevice`](crate::FileDevice)) has it in the host's page cache, which survives the
    ///   process (durability against power loss still needs the FLUSH it answered); one that
    ///   keeps acknowledged writes in its own memory until FLUSH loses them with the process, and
    ///   the file system above is corrupted. A RAM disk cannot be reattached meaningfully.
    pub fn reattach(mut self, on: bool) -> MountOptions {
        self.reattach = on;
        self
    }

    /// Export read-only whatever the device's capabilities say: the kernel fails writes itself.
    pub fn read_only(mut self, read_only: bool) -> MountOptions {
        self.read_only = read_only;
        self
    }

    /// The logical block size the kernel sees: a power of two, a multiple of the device's own,
    /// at most the page size (64 KiB from Linux 6.15). The size is rounded down to a multiple.
    pub fn block_size(mut self, block_size: u32) -> MountOptions {
        self.block_size = Some(block_size);
        self
    }

    /// Mark the serving threads `PR_SET_IO_FLUSHER` where permitted (default: true).
    pub fn io_flusher(mut self, on: bool) -> MountOptions {
        self.io_flusher = on;
        self
    }

    /// Lock the process's memory (`mlockall`), for devices that may back swap. Default: false.
    pub fn mlock(mut self, on: bool) -> MountOptions {
        self.mlock = on;
        self
    }

    /// With [`mount`](Self::mount) only: unmount cleanly on SIGINT or SIGTERM (a second one
    /// disconnects without waiting for the flush). The signals are blocked in the calling thread
    /// for the mount's duration, so call it from `main` before starting other threads.
    pub fn unmount_on_signals(mut self, on: bool) -> MountOptions {
        self.unmount_on_signals = on;
        self
    }

    /// The server's tuning.
    pub fn server_options(mut self, options: ServerOptions) -> MountOptions {
        self.server = options;
        self
    }

    /// The device node asked for; `None` lets the kernel pick.
    pub fn device_path(&self) -> Option<&Path> {
        self.device.as_deref()
    }
    pub(crate) fn setup_method(&self) -> Setup {
        self.setup
    }
    pub(crate) fn connection_count(&self) -> usize {
        self.connections
    }
    pub(crate) fn timeout_value(&self) -> Option<Duration> {
        self.timeout
    }
    pub(crate) fn dead_conn_timeout_value(&self) -> Option<Duration> {
        self.dead_conn_timeout
    }
    pub(crate) fn is_reattach(&self) -> bool {
        self.reattach
    }
    pub(crate) fn is_read_only(&self) -> bool {
        self.read_only
    }
    pub(crate) fn block_size_override(&self) -> Option<u32> {
        self.block_size
    }
    pub(crate) fn wants_io_flusher(&self) -> bool {
        self.io_flusher
    }
    pub(crate) fn wants_mlock(&self) -> bool {
        self.mlock
    }

    /// The link these options describe, for serving with [`Server`] yourself.
    pub fn link(&self) -> NbdLink {
        NbdLink::new(self)
    }

    /// Serves `device` until it is unmounted, vblk-style. Once the kernel has the device,
    /// `on_mount` runs on the calling thread with a [`MountHandle`] (keep a clone to unmount from
    /// elsewhere, or unmount from `on_mount` itself); requests are served on other threads
    /// meanwhile, so `on_mount` may use the device. When it returns, serving goes on until the
    /// device is unmounted; then `mount` returns `on_mount`'s value.
    ///
    /// If `on_mount` panics, the device is disconnected before the panic goes on.
    pub fn mount<D, R>(
        &self,
        device: D,
        on_mount: impl FnOnce(&MountHandle) -> R,
    ) -> Result<R, ServerError>
    where
        D: BlockDevice,
    {
        let link = self.link();
        let handle = link.handle();
        let mut server = Server::with_options(device, link, self.server)?;
        let watch = if self.unmount_on_signals {
            Some(
                SignalWatch::start(handle.clone())
                    .map_err(|e| LinkError::io("blocking SIGINT and SIGTERM", e))?,
            )
        } else {
            None
        };
        let result = thread::scope(|s| {
            let serving = thread::Builder::new()
                .name("userblk-serve".into())
                .spawn_scoped(s, || server.run())
                .map_err(|e| LinkError::io("spawning the server thread", e))?;
            // A panic in `on_mount` unwinds through this guard, which disconnects, so that the
            // scope's join of the server thread ends.
            let guard = DisconnectOnDrop(&handle);
            if !handle.wait_started(|| serving.is_finished()) {
                drop(guard);
                return join(serving).and_then(|()| {
                    Err(LinkError::io(
                        "starting the NBD device",
                        std::io::Error::other("the server stopped before the device started"),
                    )
                    .into())
                });
            }
            let value = on_mount(&handle);
            let served = join(serving);
            std::mem::forget(guard);
            served.map(|()| value)
        });
        if let Some(w) = watch {
            w.stop();
        }
        result
    }

    /// Serves `device` on threads of its own and returns once the kernel has it.
    pub fn spawn<D>(&self, device: D) -> Result<Mounted, ServerError>
    where
        D: BlockDevice + 'static,
    {
        let link = self.link();
        let handle = link.handle();
        let mut server = Server::with_options(device, link, self.server)?;
        let thread = thread::Builder::new()
            .name("userblk-serve".into())
            .spawn(move || server.run())
            .map_err(|e| LinkError::io("spawning the server thread", e))?;
        if !handle.wait_started(|| thread.is_finished()) {
            match thread.join() {
                Ok(r) => r?,
                Err(payload) => panic::resume_unwind(payload),
            }
            return Err(LinkError::io(
                "starting the NBD device",
                std::io::Error::other("the server stopped before the device started"),
            )
            .into());
        }
        Ok(Mounted {
            handle,
            thread: Some(thread),
        })
    }
}

/// Serves `device` on `nbd` (`/dev/nbdN`, or `auto` for a free one) until it is unmounted: see
/// [`MountOptions::mount`]. Other options are the defaults.
///
/// ```no_run
/// use userblk::link::nbd::mount;
/// use userblk::MemDevice;
///
/// mount(MemDevice::new(1 << 30), "/dev/nbd0", |handle| {
///     println!("{} is ready", handle.device().display());
/// })?;
/// # Ok::<(), userblk::ServerError>(())
/// ```
pub fn mount<D, R>(
    device: D,
    nbd: impl AsRef<Path>,
    on_mount: impl FnOnce(&MountHandle) -> R,
) -> Result<R, ServerError>
where
    D: BlockDevice,
{
    MountOptions::new()
        .device(nbd.as_ref())
        .mount(device, on_mount)
}

struct DisconnectOnDrop<'a>(&'a MountHandle);

impl Drop for DisconnectOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.disconnect();
    }
}

fn join(t: thread::ScopedJoinHandle<'_, Result<(), ServerError>>) -> Result<(), ServerError> {
    match t.join() {
        Ok(r) => r,
        Err(payload) => panic::resume_unwind(payload),
    }
}

/// A device served in the background by [`MountOptions::spawn`].
///
/// Dropping it unmounts the device and waits for serving to end.
#[derive(Debug)]
pub struct Mounted {
    handle: MountHandle,
    thread: Option<JoinHandle<Result<(), ServerError>>>,
}

impl Mounted {
    /// The remote control.
    pub fn handle(&self) -> &MountHandle {
        &self.handle
    }

    /// The device node, e.g. `/dev/nbd0`.
    pub fn device(&self) -> PathBuf {
        self.handle.device()
    }

    /// The device's index.
    pub fn index(&self) -> u32 {
        // Known: `spawn` returns only once the device started.
        self.handle.index().unwrap_or_default()
    }

    /// Unmounts (flush, DISC) and waits for the server; returns how serving ended, or the
    /// flush's error. Requests still in flight when the kernel disconnects fail with EIO and
    /// may still reach the device: see [`MountHandle::unmount`].
    pub fn unmount(mut self) -> Result<(), ServerError> {
        let flushed = self.handle.unmount();
        let served = self.join();
        served?;
        flushed.map_err(ServerError::from)
    }

    /// Waits until someone else unmounts the device, and returns how serving ended.
    pub fn wait(mut self) -> Result<(), ServerError> {
        self.join()
    }

    fn join(&mut self) -> Result<(), ServerError> {
        match self.thread.take().map(JoinHandle::join) {
            None => Ok(()),
            Some(Ok(r)) => r,
            Some(Err(payload)) => panic::resume_unwind(payload),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.handle.unmount();
            let _ = t.join();
        }
    }
}
