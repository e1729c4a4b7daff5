//! [`UblkOptions`], [`mount`] and [`Mounted`]: a device served as `/dev/ublkbN`, and the
//! supervisor that owns its life: ADD_DEV, SET_PARAMS, the queue threads, START_DEV, then (on
//! [`UblkHandle::unmount`], SIGINT/SIGTERM, a queue ending, a panic or a drop) STOP_DEV, the
//! queues' end, DEL_DEV, and the device's `unmount()`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::panic;
use std::path::PathBuf;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::ctrl::Control;
use super::frame;
pub use super::handle::UblkHandle;
use super::queue::{run_queue, QueueConfig};
use super::serving::How;
use super::sys::{self, DevInfo};
use super::unpriv;
use super::UblkError;
use crate::device::BlockDevice;
use crate::link::signals::SignalWatch;
use crate::link::{Export, LinkError};
use crate::proto::TransmissionFlags;
use crate::server::{export_of, Dispatcher, ServerError, ServerOptions};

/// Queue depth when none is given: libublk's and rublk's default.
pub const DEFAULT_QUEUE_DEPTH: u16 = 64;
/// The largest request when none is given (libublk's default buffer size).
pub const DEFAULT_MAX_IO_BYTES: u32 = 512 << 10;

/// `/dev/ublkb{id}`, the block device.
pub fn block_device_path(id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkb{id}"))
}

/// `/dev/ublkc{id}`, the server's char device.
pub fn char_device_path(id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkc{id}"))
}

/// How to serve a device through ublk: a builder, like
/// [`nbd::MountOptions`](crate::link::nbd::MountOptions).
///
/// ```no_run
/// use userblk::link::ublk::UblkOptions;
/// use userblk::MemDevice;
///
/// let mounted = UblkOptions::new().queues(2).spawn(MemDevice::new(64 << 20))?;
/// println!("serving on {}", mounted.device().display());
/// mounted.unmount()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UblkOptions {
    id: Option<u32>,
    queues: u16,
    depth: u16,
    read_only: bool,
    block_size: Option<u32>,
    max_io_bytes: u32,
    unmount_on_signals: bool,
    recoverable: bool,
    recover: Option<u32>,
    unprivileged: Option<bool>,
    server: ServerOptions,
}

impl Default for UblkOptions {
    fn default() -> UblkOptions {
        UblkOptions::new()
    }
}

impl UblkOptions {
    /// The defaults: an id chosen by the kernel, one queue of depth 64, requests up to 512 KiB,
    /// the device's own block size and read-only flag, signals left alone.
    pub fn new() -> UblkOptions {
        UblkOptions {
            id: None,
            queues: 1,
            depth: DEFAULT_QUEUE_DEPTH,
            read_only: false,
            block_size: None,
            max_io_bytes: DEFAULT_MAX_IO_BYTES,
            unmount_on_signals: false,
            recoverable: false,
            recover: None,
            unprivileged: None,
            server: ServerOptions::default(),
        }
    }

    /// Ask for device id `id` (`/dev/ublkb{id}`); `None` lets the kernel choose.
    pub fn id(mut self, id: Option<u32>) -> UblkOptions {
        self.id = id;
        self
    }

    /// Hardware queues, each served by a thread of its own (the kernel caps them at the number
    /// of CPUs). Default 1; 0 counts as 1.
    pub fn queues(mut self, n: u16) -> UblkOptions {
        self.queues = n.max(1);
        self
    }

    /// Requests each queue may have in flight, 1 to 4096. Default 64.
    pub fn queue_depth(mut self, depth: u16) -> UblkOptions {
        self.depth = depth;
        self
    }

    /// Export read-only whatever the device's capabilities say: the kernel fails writes itself.
    pub fn read_only(mut self, read_only: bool) -> UblkOptions {
        self.read_only = read_only;
        self
    }

    /// The logical block size the kernel sees: a power of two, a multiple of the device's own,
    /// at most the page size. The size is rounded down to a multiple.
    pub fn block_size(mut self, block_size: u32) -> UblkOptions {
        self.block_size = Some(block_size);
        self
    }

    /// The largest request the kernel sends (each tag has a buffer this large): a multiple of
    /// the page size. Default 512 KiB.
    pub fn max_io_bytes(mut self, bytes: u32) -> UblkOptions {
        self.max_io_bytes = bytes;
        self
    }

    /// With [`mount`](Self::mount) only: stop cleanly on SIGINT or SIGTERM. The signals are
    /// blocked in the calling thread for the mount's duration, so call it from `main` before
    /// starting other threads.
    pub fn unmount_on_signals(mut self, on: bool) -> UblkOptions {
        self.unmount_on_signals = on;
        self
    }

    /// Create the device recoverable (`UBLK_F_USER_RECOVERY` with re-issue): if this server
    /// dies without stopping it (kill -9, a crash), `/dev/ublkbN` stays, its requests wait, and
    /// another server takes it over with [`recover`](Self::recover). A clean stop still
    /// deletes it. Default: false (a server that dies takes its device with it).
    pub fn recoverable(mut self, on: bool) -> UblkOptions {
        self.recoverable = on;
        self
    }

    /// Take over recoverable device `id` whose server died, instead of adding a device: the
    /// requests that were in flight are re-issued to this server, and a file system on it stays
    /// mounted. Serve the same content (the same file) as the server that died.
    pub fn recover(mut self, id: u32) -> UblkOptions {
        self.recover = Some(id);
        self
    }

    /// Ask for an unprivileged device (`UBLK_F_UNPRIVILEGED_DEV`, Linux 6.3+), owned by this
    /// process's user and group. Default: when not running as root. Root gets a privileged
    /// device whatever this says (the kernel clears the flag for CAP_SYS_ADMIN).
    ///
    /// Needs the one-time set-up `sudo userblk ublk-setup`: `/dev/ublk-control` open to the
    /// user, and a udev rule that hands the new `/dev/ublkcN` and `/dev/ublkbN` to their owner
    /// (waited for up to [`NODE_HANDOVER_TIMEOUT`](super::NODE_HANDOVER_TIMEOUT); without it the
    /// device is deleted and the error says what to run). Such a device cannot be
    /// [`recoverable`](Self::recoverable), and only its owner (or root) may open `/dev/ublkbN`.
    pub fn unprivileged(mut self, on: bool) -> UblkOptions {
        self.unprivileged = Some(on);
        self
    }

    /// The server's tuning: `workers`, `batch_never_blocks`, `poison_reads` and `max_io_len`
    /// apply (ublk has no connections, and its memory is each tag's buffer).
    pub fn server_options(mut self, options: ServerOptions) -> UblkOptions {
        self.server = options;
        self
    }

    /// Threads serving each queue of a sync device, each calling the device for one request
    /// at a time, up to the queue depth: what [`ServerOptions::workers`] is for NBD, and the
    /// same default (twice the CPUs, between 4 and 16). `0` or `1`: the queue's own thread
    /// serves its requests one at a time. A device that
    /// [never blocks](crate::Capabilities::never_blocks) is served on the queue's thread, its
    /// requests batched, and an async device ([`AsyncDevice`](crate::AsyncDevice)) as tasks on
    /// its runtime, whatever this says.
    pub fn workers(mut self, n: usize) -> UblkOptions {
        self.server.workers = n;
        self
    }

    /// The export the kernel is asked for, from the device's own.
    fn export_for(&self, device: Export) -> Result<Export, UblkError> {
        let mut export = device;
        if self.read_only {
            export.flags |= TransmissionFlags::READ_ONLY;
        }
        if let Some(bs) = self.block_size {
            if !bs.is_power_of_two() || bs < device.block_size || bs > 4096 {
                return Err(UblkError::InvalidOption(format!(
                    "block size {bs}: must be a power of two from the device's {} to 4096",
                    device.block_size
                )));
            }
            export.block_size = bs;
            export.size -= export.size % u64::from(bs);
        }
        if export.size < u64::from(export.block_size) {
            return Err(UblkError::InvalidOption(format!(
                "the device has {} bytes: not one {}-byte block",
                export.size, export.block_size
            )));
        }
        Ok(export)
    }

    fn dev_info(&self) -> Result<DevInfo, UblkError> {
        if self.depth == 0 || self.depth > sys::MAX_QUEUE_DEPTH {
            return Err(UblkError::InvalidOption(format!(
                "queue depth {}: must be from 1 to {}",
                self.depth,
                sys::MAX_QUEUE_DEPTH
            )));
        }
        if self.max_io_bytes < 4096 || self.max_io_bytes % 4096 != 0 {
            return Err(UblkError::InvalidOption(format!(
                "largest request {} bytes: must be a nonzero multiple of 4096",
                self.max_io_bytes
            )));
        }
        let mut flags = if self.recoverable {
            sys::F_USER_RECOVERY | sys::F_USER_RECOVERY_REISSUE
        } else {
            0
        };
        // No user copy or zero copy is ever asked: the kernel refuses them unprivileged.
        if unpriv::wants_unprivileged(self.unprivileged, sys::effective_ids().0) {
            if self.recoverable || self.recover.is_some() {
                return Err(UblkError::InvalidOption(
                    "a recoverable device needs root: the kernel does not let an unprivileged \
                     ublk device (one a user other than root adds) recover"
                        .into(),
                ));
            }
            flags |= sys::F_UNPRIVILEGED_DEV;
            flags &= !(sys::F_USER_COPY | sys::F_SUPPORT_ZERO_COPY);
        }
        Ok(DevInfo {
            flags,
            nr_hw_queues: self.queues.max(1),
            queue_depth: self.depth,
            max_io_buf_bytes: self.max_io_bytes,
            dev_id: self.id.unwrap_or(u32::MAX),
            ublksrv_pid: i32::try_from(std::process::id()).unwrap_or(0),
            ..DevInfo::default()
        })
    }

    /// Serves `device` until it is unmounted. Once `/dev/ublkbN` exists, `on_mount` runs on
    /// the calling thread with a [`UblkHandle`]; requests are served on the queue threads
    /// meanwhile. When it returns, serving goes on until the device is unmounted (by a handle,
    /// a signal, or the device going away); then `mount` returns `on_mount`'s value.
    ///
    /// If `on_mount` panics, the device is stopped and deleted before the panic goes on.
    pub fn mount<D, R>(
        &self,
        device: D,
        on_mount: impl FnOnce(&UblkHandle) -> R,
    ) -> Result<R, ServerError>
    where
        D: BlockDevice,
    {
        let handle = UblkHandle::new();
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
                .name("userblk-ublk".into())
                .spawn_scoped(s, || serve(&device, self, &handle))
                .map_err(|e| LinkError::io("spawning the ublk supervisor thread", e))?;
            // A panic in `on_mount` unwinds through this guard, which stops the device, so
            // that the scope's join of the supervisor ends.
            let guard = StopOnDrop(&handle);
            if !handle.wait_started(|| serving.is_finished()) {
                drop(guard);
                return join(serving.join()).and_then(|()| Err(not_started()));
            }
            let value = on_mount(&handle);
            let served = join(serving.join());
            std::mem::forget(guard);
            served.map(|()| value)
        });
        if let Some(w) = watch {
            w.stop();
        }
        result
    }

    /// Serves `device` on threads of its own and returns once `/dev/ublkbN` exists.
    pub fn spawn<D>(&self, device: D) -> Result<Mounted, ServerError>
    where
        D: BlockDevice + 'static,
    {
        let handle = UblkHandle::new();
        let options = self.clone();
        let h = handle.clone();
        let thread = thread::Builder::new()
            .name("userblk-ublk".into())
            .spawn(move || serve(&device, &options, &h))
            .map_err(|e| LinkError::io("spawning the ublk supervisor thread", e))?;
        if !handle.wait_started(|| thread.is_finished()) {
            join(thread.join())?;
            return Err(not_started());
        }
        Ok(Mounted {
            handle,
            thread: Some(thread),
        })
    }
}

fn not_started() -> ServerError {
    ServerError::Link(LinkError::Ublk(UblkError::NotStarted))
}

fn join(r: thread::Result<Result<(), ServerError>>) -> Result<(), ServerError> {
    match r {
        Ok(r) => r,
        Err(payload) => panic::resume_unwind(payload),
    }
}

/// Serves `device` through ublk with the default options until it is unmounted: see
/// [`UblkOptions::mount`].
///
/// ```no_run
/// use userblk::link::ublk::mount;
/// use userblk::MemDevice;
///
/// mount(MemDevice::new(1 << 30), |handle| {
///     println!("{} is ready", handle.device().display());
///     handle.unmount();
/// })?;
/// # Ok::<(), userblk::ServerError>(())
/// ```
pub fn mount<D, R>(device: D, on_mount: impl FnOnce(&UblkHandle) -> R) -> Result<R, ServerError>
where
    D: BlockDevice,
{
    UblkOptions::new().mount(device, on_mount)
}

struct StopOnDrop<'a>(&'a UblkHandle);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.unmount();
    }
}

/// A device served in the background by [`UblkOptions::spawn`]. Dropping it stops and
/// deletes the device and waits for serving to end.
#[derive(Debug)]
pub struct Mounted {
    handle: UblkHandle,
    thread: Option<JoinHandle<Result<(), ServerError>>>,
}

impl Mounted {
    /// The remote control.
    pub fn handle(&self) -> &UblkHandle {
        &self.handle
    }

    /// The block device, e.g. `/dev/ublkb0`.
    pub fn device(&self) -> PathBuf {
        self.handle.device()
    }

    /// The device id.
    pub fn id(&self) -> u32 {
        // Known: `spawn` returns only once the device started.
        self.handle.id().unwrap_or_default()
    }

    /// Stops and deletes the device, waits for serving to end, and returns how it ended.
    pub fn unmount(mut self) -> Result<(), ServerError> {
        self.handle.unmount();
        self.join()
    }

    /// Waits until someone else unmounts the device, and returns how serving ended.
    pub fn wait(mut self) -> Result<(), ServerError> {
        self.join()
    }

    fn join(&mut self) -> Result<(), ServerError> {
        match self.thread.take().map(JoinHandle::join) {
            None => Ok(()),
            Some(r) => join(r),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.handle.unmount();
            let _ = t.join();
        }
    }
}

/// The device between ADD_DEV and DEL_DEV: dropping it (an error, a panic) deletes it, which
/// stops it first if it started, so that no `/dev/ublkbN` or `/dev/ublkcN` is left behind.
struct Added {
    ctrl: Control,
    id: u32,
    /// Deleted already, or not ours to delete (a recovery that has not taken over yet leaves
    /// the device quiesced for another attempt).
    deleted: bool,
}

impl Added {
    fn delete(&mut self) -> Result<(), UblkError> {
        self.deleted = true;
        self.ctrl.delete(self.id)
    }
}

impl Drop for Added {
    fn drop(&mut self) {
        if !self.deleted {
            let _ = self.ctrl.delete(self.id);
        }
    }
}

/// START_USER_RECOVERY on device `id`, once its dead server is gone: the kernel answers EBUSY
/// until the old process has closed the char device and the device is quiesced, which follows
/// the death by a moment. Returns the device's information.
fn take_over(ctrl: &mut Control, id: u32) -> Result<DevInfo, UblkError> {
    let info = ctrl.dev_info(id)?;
    if info.flags & sys::F_USER_RECOVERY == 0 {
        return Err(UblkError::InvalidOption(format!(
            "ublk device {id} was not created recoverable: only a device served with \
             --recoverable (UBLK_F_USER_RECOVERY) can be recovered"
        )));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match ctrl.start_recovery(id) {
            Ok(()) => return Ok(info),
            Err(UblkError::Command { source, .. })
                if source.raw_os_error() == Some(nix::libc::EBUSY) && Instant::now() < deadline =>
            {
                thread::sleep(Duration::from_millis(100));
            }
            Err(UblkError::Command { source, .. })
                if source.raw_os_error() == Some(nix::libc::EBUSY) =>
            {
                let state = ctrl.dev_info(id).map(|i| i.state).unwrap_or(u16::MAX);
                return Err(UblkError::InvalidOption(format!(
                    "ublk device {id} is not waiting for a new server (state {state}, quiesced is \
                     {}): its server is still running, or the device is being stopped",
                    sys::DEV_QUIESCED
                )));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Opens `/dev/ublkc{id}`, giving udev a moment to create it where devtmpfs does not.
fn open_char_device(id: u32) -> Result<File, UblkError> {
    let path = char_device_path(id);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(UblkError::PermissionDenied {
                    what: path.display().to_string(),
                })
            }
            Err(source) => {
                return Err(UblkError::Io {
                    op: "opening the ublk char device",
                    source,
                })
            }
        }
    }
}

/// The supervisor: sets the device up, serves it on one thread per queue until it is asked to
/// stop (or a queue ends), then stops and deletes it and unmounts the device. Always marks the
/// handle ended.
fn serve<D: BlockDevice + ?Sized>(
    device: &D,
    options: &UblkOptions,
    handle: &UblkHandle,
) -> Result<(), ServerError> {
    let result = serve_inner(device, options, handle);
    handle.update(|s| s.ended = true);
    result
}

fn serve_inner<D: BlockDevice + ?Sized>(
    device: &D,
    options: &UblkOptions,
    handle: &UblkHandle,
) -> Result<(), ServerError> {
    let ublk = |e: UblkError| ServerError::Link(LinkError::Ublk(e));
    let export = options.export_for(export_of(device)?).map_err(ublk)?;
    let asked = options.dev_info().map_err(ublk)?;
    let mut ctrl = Control::open().map_err(ublk)?;
    let features = ctrl.features();
    handle.update(|s| s.features = features);
    let recovering = options.recover.is_some();
    let info = match options.recover {
        Some(id) => take_over(&mut ctrl, id).map_err(ublk)?,
        None => {
            if asked.flags & sys::F_USER_RECOVERY != 0
                && features.is_some_and(|f| f & sys::F_USER_RECOVERY == 0)
            {
                return Err(ublk(UblkError::Unsupported {
                    feature: "UBLK_F_USER_RECOVERY",
                    since: "6.1",
                }));
            }
            if asked.flags & sys::F_UNPRIVILEGED_DEV != 0
                && features.is_some_and(|f| f & sys::F_UNPRIVILEGED_DEV == 0)
            {
                return Err(ublk(UblkError::UnprivilegedUnsupported {
                    release: unpriv::kernel_release(),
                }));
            }
            ctrl.add(&asked).map_err(ublk)?
        }
    };
    let unprivileged = info.flags & sys::F_UNPRIVILEGED_DEV != 0;
    let mut added = Added {
        ctrl,
        id: info.dev_id,
        deleted: recovering,
    };
    let id = info.dev_id;
    let buf_len = info.max_io_buf_bytes;
    handle.update(|s| {
        s.id = Some(id);
        s.queues = info.nr_hw_queues;
        s.depth = info.queue_depth;
    });
    if unprivileged {
        // The kernel checks every later command against the char device's permissions: it must
        // be this user's first (udev's doing), else the device is deleted, if this user can.
        let node = char_device_path(id);
        if let Err(e) = unpriv::wait_usable(&node, unpriv::NODE_HANDOVER_TIMEOUT) {
            return Err(ublk(unpriv::deleted(e, added.delete().is_ok())));
        }
    }
    if !recovering {
        let params = frame::params(&export, buf_len);
        added.ctrl.set_params(id, &params).map_err(ublk)?;
    }
    let cdev = open_char_device(id).map_err(ublk)?;
    let dispatcher = Dispatcher::new(device).poison_reads(options.server.poison_reads);
    let max_io_len = options.server.max_io_len.min(buf_len);
    let queues = info.nr_hw_queues;
    let how = How::for_device(device, &options.server, info.queue_depth);
    let how = &how;
    let served: Result<(), UblkError> = thread::scope(|s| {
        let mut threads = Vec::with_capacity(usize::from(queues));
        let mut first_error = None;
        for q in 0..queues {
            let cfg = QueueConfig {
                q_id: q,
                depth: info.queue_depth,
                buf_len: buf_len as usize,
                export,
                max_io_len,
            };
            let cdev = cdev.as_fd();
            let spawned = thread::Builder::new()
                .name(format!("userblk-ublk-q{q}"))
                .spawn_scoped(s, move || {
                    let mut was_ready = false;
                    let ready = || {
                        was_ready = true;
                        handle.update(|s| {
                            s.queues_ready += 1;
                            s.queues_settled += 1;
                        });
                    };
                    let r = run_queue(cdev, &cfg, dispatcher, how, ready);
                    handle.update(|s| {
                        s.queue_ended = true;
                        if !was_ready {
                            s.queues_settled += 1;
                        }
                    });
                    r
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(source) => {
                    first_error = Some(UblkError::Io {
                        op: "spawning a ublk queue thread",
                        source,
                    });
                    break;
                }
            }
        }
        // Every queue has its fetches in the kernel, or has failed: only then can STOP_DEV
        // below abort every fetch (a queue still setting up would fetch after it and wait for
        // ever).
        let spawned = threads.len() as u16;
        handle.wait_until(|s| s.queues_settled == spawned);
        let ready = first_error.is_none() && handle.lock().queues_ready == queues;
        if ready && !handle.lock().stop {
            let started = if recovering {
                added.ctrl.end_recovery(id)
            } else {
                added.ctrl.start(id)
            };
            match started {
                Ok(()) => {
                    // From here the device is this server's to delete.
                    added.deleted = false;
                    // An unprivileged device's user needs /dev/ublkbN handed over too.
                    let usable = match unprivileged {
                        true => unpriv::wait_usable(
                            &block_device_path(id),
                            unpriv::NODE_HANDOVER_TIMEOUT,
                        ),
                        false => Ok(()),
                    };
                    match usable {
                        Ok(()) => {
                            handle.update(|s| {
                                s.export = Some(export);
                                s.live = true;
                            });
                            handle.wait_until(|s| s.stop || s.queue_ended);
                        }
                        Err(e) => first_error = Some(e),
                    }
                }
                Err(e) => first_error = Some(e),
            }
        }
        // STOP_DEV removes /dev/ublkbN once what is in flight is answered, then aborts every
        // fetch: the queues end. A device never started is stopped all the same, which aborts
        // the fetches of the queues that got them.
        if let Err(e) = added.ctrl.stop(id) {
            first_error.get_or_insert(e);
        }
        for t in threads {
            match t.join() {
                Ok(Ok(_stats)) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(payload) => panic::resume_unwind(payload),
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    });
    // The char device must be closed before DEL_DEV, which waits for the last user to go.
    drop(cdev);
    let deleted = added.delete();
    let unmounted = dispatcher.unmount();
    served
        .map_err(|e| unpriv::deleted(e, deleted.is_ok()))
        .map_err(ublk)?;
    deleted.map_err(ublk)?;
    unmounted
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::TransmissionFlags as F;

    const DEV: Export = Export {
        size: (1 << 20) + 512,
        block_size: 512,
        flags: F(F::SEND_FLUSH.0 | F::SEND_TRIM.0),
    };

    #[test]
    fn options_shape_the_export() {
        let e = UblkOptions::new().export_for(DEV).unwrap();
        assert_eq!(e, DEV);
        let e = UblkOptions::new()
            .read_only(true)
            .block_size(4096)
            .export_for(DEV)
            .unwrap();
        assert_eq!(e.size, 1 << 20);
        assert_eq!(e.block_size, 4096);
        assert!(e.flags.contains(F::READ_ONLY));
        for bad in [1000, 256, 8192] {
            let err = UblkOptions::new()
                .block_size(bad)
                .export_for(DEV)
                .unwrap_err();
            assert!(
                err.to_string().contains(&format!("block size {bad}")),
                "{err}"
            );
        }
        let tiny = Export { size: 512, ..DEV };
        let err = UblkOptions::new()
            .block_size(4096)
            .export_for(tiny)
            .unwrap_err();
        assert!(err.to_string().contains("not one 4096-byte block"), "{err}");
    }

    #[test]
    fn options_shape_add_dev() {
        let info = UblkOptions::new().dev_info().unwrap();
        assert_eq!((info.nr_hw_queues, info.queue_depth), (1, 64));
        assert_eq!(info.dev_id, u32::MAX);
        assert_eq!(info.max_io_buf_bytes, 512 << 10);
        let info = UblkOptions::new()
            .id(Some(7))
            .queues(0)
            .queue_depth(128)
            .dev_info()
            .unwrap();
        assert_eq!(
            (info.dev_id, info.nr_hw_queues, info.queue_depth),
            (7, 1, 128)
        );
        let err = UblkOptions::new().queue_depth(0).dev_info().unwrap_err();
        assert!(err.to_string().contains("queue depth 0"), "{err}");
        let err = UblkOptions::new().queue_depth(5000).dev_info().unwrap_err();
        assert!(err.to_string().contains("from 1 to 4096"), "{err}");
        let err = UblkOptions::new()
            .max_io_bytes(1000)
            .dev_info()
            .unwrap_err();
        assert!(err.to_string().contains("multiple of 4096"), "{err}");
    }

    #[test]
    fn unprivileged_add_dev() {
        let info = UblkOptions::new().unprivileged(true).dev_info().unwrap();
        assert_eq!(info.flags, sys::F_UNPRIVILEGED_DEV);
        let info = UblkOptions::new().unprivileged(false).dev_info().unwrap();
        assert_eq!(info.flags & sys::F_UNPRIVILEGED_DEV, 0);
        let info = UblkOptions::new()
            .unprivileged(false)
            .recoverable(true)
            .dev_info()
            .unwrap();
        assert_eq!(
            info.flags,
            sys::F_USER_RECOVERY | sys::F_USER_RECOVERY_REISSUE
        );
        for options in [
            UblkOptions::new().unprivileged(true).recoverable(true),
            UblkOptions::new().unprivileged(true).recover(3),
        ] {
            let err = options.dev_info().unwrap_err().to_string();
            assert!(err.contains("a recoverable device needs root"), "{err}");
        }
    }

    /// Where the kernel has no ublk (this machine's tests, 6.1), mounting fails with an error
    /// that says what to do, and nothing hangs.
    #[test]
    fn mounting_without_the_driver_says_what_to_do() {
        if std::path::Path::new(super::super::ctrl::CONTROL_PATH).exists() {
            return; // a machine with ublk: the VM suite covers it
        }
        let err = UblkOptions::new()
            .spawn(crate::MemDevice::new(1 << 20))
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("modprobe ublk_drv") || text.contains("mknod"),
            "{text}"
        );
    }
}
