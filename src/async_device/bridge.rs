//! [`AsyncDevice`]: an [`AsyncBlockDevice`] wherever a [`BlockDevice`] goes. The NBD loop finds
//! the async device behind it ([`BlockDevice::asynchronous`]) and runs its requests as tasks on
//! its tokio runtime; anything else calls it as a `BlockDevice`, blocking on that runtime.
//! [`BlockingDevice`] is that blocking bridge alone. [`runtime`] is the runtime userblk starts
//! for devices not given one.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use nix::sys::signal::{SigSet, Signal};
use tokio::runtime::{Handle, Runtime, RuntimeFlavor};

use super::{AsyncBlockDevice, IoBuf};
use crate::device::{BlockDevice, Capabilities, Extent};
use crate::proto::Errno;
use crate::server::{dispatch_async, IoRequest, IoResult};

/// A boxed `Send` future.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An async device with its type erased, as the server drives it.
pub(crate) trait DynAsync: Send + Sync {
    /// The runtime its futures run on.
    fn runtime(&self) -> io::Result<Handle>;
    /// [`dispatch_async`] on the device.
    fn dispatch(
        &self,
        req: IoRequest,
        buf: IoBuf,
        poison: bool,
    ) -> BoxFuture<'_, (IoResult, Option<IoBuf>)>;
    /// The device's block status, errors mapped and panics caught.
    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Vec<Extent>, Errno>>;
}

/// The async device behind a [`BlockDevice`], for the server to run its requests as tasks: what
/// [`BlockDevice::asynchronous`] returns. Only [`AsyncDevice`] makes one; a wrapper device passes
/// on its inner device's.
#[derive(Clone)]
pub struct AsyncServing(pub(crate) Arc<dyn DynAsync>);

impl fmt::Debug for AsyncServing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncServing").finish_non_exhaustive()
    }
}

/// The multi-threaded runtime userblk starts (once, on first use, one worker per CPU, SIGINT
/// and SIGTERM blocked in its threads) for async devices made outside any runtime. Use it to make such a device's clients:
/// `userblk::async_device::runtime()?.block_on(MyDisk::connect(..))`.
pub fn runtime() -> io::Result<Handle> {
    static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();
    let rt = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .thread_name("userblk-async")
            // SIGINT and SIGTERM are for the thread that waits for them (`unmount_on_signals`):
            // a worker that left them unblocked would take them, and an ignored SIGINT (a
            // background job of a shell) would then vanish.
            .on_thread_start(|| {
                let mut set = SigSet::empty();
                set.add(Signal::SIGINT);
                set.add(Signal::SIGTERM);
                let _ = set.thread_block();
            })
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    });
    match rt {
        Ok(rt) => Ok(rt.handle().clone()),
        Err(e) => Err(io::Error::other(format!(
            "starting userblk's tokio runtime: {e}"
        ))),
    }
}

struct Shared<D> {
    device: D,
    /// `None`: userblk's [`runtime`].
    runtime: Option<Handle>,
}

impl<D: AsyncBlockDevice + 'static> DynAsync for Shared<D> {
    fn runtime(&self) -> io::Result<Handle> {
        match &self.runtime {
            Some(h) => Ok(h.clone()),
            None => runtime(),
        }
    }

    fn dispatch(
        &self,
        req: IoRequest,
        buf: IoBuf,
        poison: bool,
    ) -> BoxFuture<'_, (IoResult, Option<IoBuf>)> {
        Box::pin(dispatch_async(&self.device, req, buf, poison))
    }

    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Vec<Extent>, Errno>> {
        Box::pin(crate::server::block_status_async(&self.device, offset, len))
    }
}

/// An [`AsyncBlockDevice`] as a [`BlockDevice`]: pass it wherever a device goes (every link,
/// the harness). The NBD loop (kernel link, network export, fake kernel) runs its requests as
/// tasks on its runtime, as many in flight as the kernel queues and the byte bound allows;
/// called directly as a `BlockDevice`, it blocks on the runtime (with a copy of the data).
///
/// Cheap to clone: clones share the device.
pub struct AsyncDevice<D> {
    shared: Arc<Shared<D>>,
}

impl<D> Clone for AsyncDevice<D> {
    fn clone(&self) -> Self {
        AsyncDevice {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<D> fmt::Debug for AsyncDevice<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncDevice")
            .field("runtime", &self.shared.runtime.as_ref().map(|h| h.id()))
            .finish_non_exhaustive()
    }
}

impl<D: AsyncBlockDevice + 'static> AsyncDevice<D> {
    /// `device`, run on the tokio runtime this is called from, or else on userblk's
    /// ([`runtime`]). A device whose sockets were made on a runtime must run there.
    pub fn new(device: D) -> AsyncDevice<D> {
        AsyncDevice::on(device, Handle::try_current().ok())
    }

    /// `device`, run on the runtime of `handle` (the user's own).
    pub fn with_runtime(device: D, handle: Handle) -> AsyncDevice<D> {
        AsyncDevice::on(device, Some(handle))
    }

    fn on(device: D, runtime: Option<Handle>) -> AsyncDevice<D> {
        AsyncDevice {
            shared: Arc::new(Shared { device, runtime }),
        }
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.shared.device
    }

    /// The runtime its futures run on.
    pub fn runtime(&self) -> io::Result<Handle> {
        self.shared.runtime()
    }

    /// Runs `f` to completion on the device's runtime from synchronous code. Inside a
    /// multi-threaded runtime the calling worker steps aside first (`block_in_place`); inside a
    /// current-thread runtime it would deadlock, and fails instead.
    pub fn block_on<T>(&self, f: impl Future<Output = T>) -> io::Result<T> {
        let rt = self.runtime()?;
        match Handle::try_current() {
            Err(_) => Ok(rt.block_on(f)),
            Ok(here) if here.runtime_flavor() == RuntimeFlavor::MultiThread => {
                Ok(tokio::task::block_in_place(|| rt.block_on(f)))
            }
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "a blocking call on an async device from inside a current-thread tokio runtime \
                 would deadlock: await the device's own methods there",
            )),
        }
    }

    /// The same device served by threads, each call blocking on the runtime (a sync device).
    pub fn blocking(self) -> BlockingDevice<D> {
        BlockingDevice(self)
    }
}

/// A READ through the bridge: a zeroed buffer lent, the result copied into `buf`.
fn copy_back(buf: &mut [u8], (result, back): (io::Result<()>, IoBuf)) -> io::Result<()> {
    result?;
    if back.len() != buf.len() {
        return Err(io::Error::other(format!(
            "the device returned a {}-byte buffer for a {}-byte read",
            back.len(),
            buf.len()
        )));
    }
    buf.copy_from_slice(&back);
    Ok(())
}

impl<D: AsyncBlockDevice + 'static> BlockDevice for AsyncDevice<D> {
    fn block_size(&self) -> u32 {
        self.shared.device.block_size()
    }
    fn blocks(&self) -> u64 {
        self.shared.device.blocks()
    }
    fn capabilities(&self) -> Capabilities {
        self.shared.device.capabilities()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let done = self.block_on(self.device().read(offset, IoBuf::zeroed(buf.len())))?;
        copy_back(buf, done)
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.block_on(self.device().write(offset, IoBuf::from(data.to_vec())))?
            .0
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.block_on(self.device().write_fua(offset, IoBuf::from(data.to_vec())))?
            .0
    }
    fn flush(&self) -> io::Result<()> {
        self.block_on(self.device().flush())?
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.block_on(self.device().trim(offset, len))?
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.block_on(self.device().write_zeroes(offset, len, may_trim))?
    }
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.block_on(self.device().block_status(offset, len))?
    }
    fn unmount(&self) {
        // A runtime that cannot start has nothing to unmount on: the device never ran.
        let _ = self.block_on(self.device().unmount());
    }
    fn asynchronous(&self) -> Option<AsyncServing> {
        Some(AsyncServing(self.shared.clone()))
    }
}

/// An [`AsyncBlockDevice`] as a plain, synchronous [`BlockDevice`]: every call blocks its thread
/// on the device's runtime, and the server serves it with threads (as many requests in flight
/// as it has threads). The baseline [`AsyncDevice`] is measured against; also for a transport
/// that only takes sync devices. Made by [`AsyncDevice::blocking`].
pub struct BlockingDevice<D>(AsyncDevice<D>);

impl<D> fmt::Debug for BlockingDevice<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("BlockingDevice").field(&self.0).finish()
    }
}

impl<D: AsyncBlockDevice + 'static> BlockDevice for BlockingDevice<D> {
    fn block_size(&self) -> u32 {
        BlockDevice::block_size(&self.0)
    }
    fn blocks(&self) -> u64 {
        BlockDevice::blocks(&self.0)
    }
    fn capabilities(&self) -> Capabilities {
        BlockDevice::capabilities(&self.0)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        BlockDevice::read(&self.0, offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        BlockDevice::write(&self.0, offset, data)
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        BlockDevice::write_fua(&self.0, offset, data)
    }
    fn flush(&self) -> io::Result<()> {
        BlockDevice::flush(&self.0)
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        BlockDevice::trim(&self.0, offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        BlockDevice::write_zeroes(&self.0, offset, len, may_trim)
    }
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        BlockDevice::block_status(&self.0, offset, len)
    }
    fn unmount(&self) {
        BlockDevice::unmount(&self.0)
    }
}
