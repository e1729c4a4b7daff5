//! [`AsyncBlockDevice`]: a block device whose operations are futures, for devices that wait on
//! the network (object stores, replicated services, remote disks) and already have an async
//! client. The server keeps up to the queue depth of requests of each connection in flight as
//! tasks, instead of a thread each.
//!
//! It is [`BlockDevice`] as futures: the same operations, defaults, capabilities and guarantees
//! (requests validated before the device sees them, errors mapped to the protocol's errnos, a
//! panic answered EIO for that request alone). The defaults that do work (FUA as write + flush,
//! write-zeroes as zero-filled writes) are the same code for both traits ([`zero_chunks`]).
//!
//! Buffers are owned: a READ or WRITE hands the device the request's [`IoBuf`] (a buffer from
//! the server's byte-bounded pool, zeroed for a READ) and the device hands it back with the
//! result, so a future is `'static`-friendly and may pass the buffer to another task (a
//! connection task that reads a reply straight into it) without copying.
//!
//! Where each kind of device goes:
//! - a [`BlockDevice`] is an `AsyncBlockDevice` too (a blanket impl whose futures call it
//!   inline), so code written for async devices takes sync ones;
//! - an `AsyncBlockDevice` goes wherever a `BlockDevice` goes (every link, the harness) as an
//!   [`AsyncDevice`]: served by the NBD loop as tasks on a tokio runtime, and callable as a
//!   `BlockDevice` by blocking on that runtime. [`BlockingDevice`] is the bridge alone: served by
//!   threads, as a sync device, each call blocking its thread.
//!
//! ```
//! use std::io;
//! use userblk::async_device::{AsyncBlockDevice, AsyncDevice, IoBuf};
//! use userblk::LoopbackKernel;
//!
//! /// Every byte reads as 42, after a pause (a network round trip, say).
//! struct Slow;
//!
//! impl AsyncBlockDevice for Slow {
//!     fn blocks(&self) -> u64 { 2048 }
//!     async fn read(&self, _offset: u64, mut buf: IoBuf) -> (io::Result<()>, IoBuf) {
//!         std::thread::yield_now();
//!         buf.fill(42);
//!         (Ok(()), buf)
//!     }
//! }
//!
//! let kernel = LoopbackKernel::start(AsyncDevice::new(Slow))?;
//! assert_eq!(kernel.read(4096, 512)?, vec![42; 512]);
//! kernel.shutdown()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::future::Future;
use std::io;
use std::ops::{Deref, DerefMut};

use nix::libc::{ENOTSUP, EPERM};

use crate::device::{BlockDevice, Capabilities, Extent};
use crate::server::Buffer;

mod bridge;

pub(crate) use bridge::DynAsync;
pub use bridge::{runtime, AsyncDevice, AsyncServing, BlockingDevice};

/// How big the default write-zeroes writes at a time (both traits).
pub(crate) const ZERO_CHUNK: usize = 64 << 10;

/// The writes the default write-zeroes makes for `len` bytes at `offset`: `(offset, len)` pieces
/// of at most 64 KiB, in order. Shared by [`BlockDevice::write_zeroes`] and
/// [`AsyncBlockDevice::write_zeroes`].
pub fn zero_chunks(offset: u64, len: u64) -> impl Iterator<Item = (u64, usize)> {
    let chunk = ZERO_CHUNK as u64;
    (0..len.div_ceil(chunk)).map(move |i| {
        let at = i * chunk;
        (offset + at, (len - at).min(chunk) as usize)
    })
}

/// A request's data buffer, owned by whoever holds it: lent to an [`AsyncBlockDevice`] for a
/// READ (zeroed, to fill) or a WRITE (the payload) and handed back with the result.
///
/// Its length is the request's. A device may keep it across await points, send it to another
/// task, or return another buffer of the same length instead; a READ whose returned buffer is
/// not as long as the request fails with EIO. Server buffers come from a byte-bounded pool and
/// go back to it when the reply is written.
pub struct IoBuf(Buffer);

impl IoBuf {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> IoBuf {
        IoBuf(Buffer::from_vec(vec![0; len]))
    }

    /// Shortens the buffer to `len` bytes (no-op if it is not longer).
    pub fn truncate(&mut self, len: usize) {
        self.0.truncate(len);
    }

    /// The bytes, as a vector (no copy unless the buffer is longer than its contents).
    pub fn into_vec(self) -> Vec<u8> {
        let (mut data, len) = self.0.into_parts();
        data.truncate(len);
        data
    }

    pub(crate) fn from_buffer(buf: Buffer) -> IoBuf {
        IoBuf(buf)
    }

    pub(crate) fn into_buffer(self) -> Buffer {
        self.0
    }
}

impl From<Vec<u8>> for IoBuf {
    fn from(data: Vec<u8>) -> IoBuf {
        IoBuf(Buffer::from_vec(data))
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.0.as_mut_slice()
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuf").field("len", &self.len()).finish()
    }
}

/// A block device whose operations are futures: [`BlockDevice`] for devices that wait on I/O.
///
/// The methods, their defaults and their guarantees are [`BlockDevice`]'s: offsets and lengths
/// are multiples of the block size and within the device, errors are `io::Error`s mapped to the
/// protocol's errnos, only [`read`](Self::read) and [`blocks`](Self::blocks) are required.
/// The futures must be `Send` (they run on a multi-threaded runtime); write `async fn` in the
/// impl. READ and WRITE take the request's [`IoBuf`] and give it back with their result.
///
/// Serve one with [`AsyncDevice::new`] wherever a `BlockDevice` goes; a closure returning one is
/// a harness device factory as it is.
pub trait AsyncBlockDevice: Send + Sync {
    /// Logical block size in bytes: a power of two from 512 to 65536. Default: 512.
    fn block_size(&self) -> u32 {
        512
    }

    /// Number of blocks. The size is fixed for the device's life.
    fn blocks(&self) -> u64;

    /// What the device supports. Default: [`Capabilities::default`]. `never_blocks` here says
    /// that polling a future never waits (its work is a quick copy; most are ready at their
    /// first poll): the server then polls each request's future on the connection's reader
    /// thread and writes the replies of those ready in batches, spawning a task only for a
    /// future that is not ready (unless [`ServerOptions::batch_never_blocks`] is off).
    ///
    /// [`ServerOptions::batch_never_blocks`]: crate::ServerOptions::batch_never_blocks
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// Fills `buf` (zeroed, as long as the request) from `offset`, and gives it back.
    fn read(&self, offset: u64, buf: IoBuf)
        -> impl Future<Output = (io::Result<()>, IoBuf)> + Send;

    /// Writes `data` at `offset`, and gives it back. Default: fails with EPERM.
    fn write(
        &self,
        offset: u64,
        data: IoBuf,
    ) -> impl Future<Output = (io::Result<()>, IoBuf)> + Send {
        let _ = offset;
        async move { (Err(io::Error::from_raw_os_error(EPERM)), data) }
    }

    /// Writes `data` at `offset`, durable when the future completes (FUA).
    /// Default: [`write`](Self::write) then [`flush`](Self::flush).
    fn write_fua(
        &self,
        offset: u64,
        data: IoBuf,
    ) -> impl Future<Output = (io::Result<()>, IoBuf)> + Send {
        async move {
            let (result, data) = self.write(offset, data).await;
            match result {
                Ok(()) => (self.flush().await, data),
                Err(e) => (Err(e), data),
            }
        }
    }

    /// Makes every completed write durable. Default: nothing to do.
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send {
        async { Ok(()) }
    }

    /// Discards `len` bytes at `offset`. Default: fails with ENOTSUP.
    fn trim(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<()>> + Send {
        let _ = (offset, len);
        async { Err(io::Error::from_raw_os_error(ENOTSUP)) }
    }

    /// Makes `len` bytes at `offset` read back as zeroes; `may_trim` says a hole may be punched.
    /// Default: zero-filled writes of [`zero_chunks`], one at a time.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
    ) -> impl Future<Output = io::Result<()>> + Send {
        let _ = may_trim;
        async move {
            let mut zeroes = IoBuf::zeroed(ZERO_CHUNK.min(len as usize));
            for (at, n) in zero_chunks(offset, len) {
                zeroes.truncate(n);
                let (result, back) = self.write(at, zeroes).await;
                result?;
                zeroes = back;
                if zeroes.len() < n || zeroes.iter().any(|&b| b != 0) {
                    // The device kept or changed our buffer: start from clean zeroes again.
                    zeroes = IoBuf::zeroed(ZERO_CHUNK.min(len as usize));
                }
            }
            Ok(())
        }
    }

    /// The allocation status of `len` bytes at `offset` (see [`BlockDevice::block_status`]).
    /// Default: all of it allocated data.
    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = io::Result<Vec<Extent>>> + Send {
        let _ = offset;
        async move { Ok(vec![Extent::data(len)]) }
    }

    /// Called once when the kernel disconnects, after every request has been answered.
    fn unmount(&self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// This device as a [`BlockDevice`] to serve or test: an [`AsyncDevice`] (on the current
    /// tokio runtime, or userblk's), or, for a device that is a `BlockDevice` already, itself.
    /// What the harness's device factories call on what a closure returns.
    fn into_block_device(self) -> Box<dyn BlockDevice>
    where
        Self: Sized + 'static,
    {
        Box::new(AsyncDevice::new(self))
    }
}

/// Every [`BlockDevice`] is an [`AsyncBlockDevice`] whose futures make the sync call when
/// polled, on the polling thread: code written for async devices takes sync ones as they are.
/// (The NBD server still serves a sync device with its own threads, where a blocking call
/// holds up nothing else.)
impl<T: BlockDevice> AsyncBlockDevice for T {
    fn block_size(&self) -> u32 {
        BlockDevice::block_size(self)
    }
    fn blocks(&self) -> u64 {
        BlockDevice::blocks(self)
    }
    fn capabilities(&self) -> Capabilities {
        BlockDevice::capabilities(self)
    }
    async fn read(&self, offset: u64, mut buf: IoBuf) -> (io::Result<()>, IoBuf) {
        (BlockDevice::read(self, offset, &mut buf), buf)
    }
    async fn write(&self, offset: u64, data: IoBuf) -> (io::Result<()>, IoBuf) {
        (BlockDevice::write(self, offset, &data), data)
    }
    async fn write_fua(&self, offset: u64, data: IoBuf) -> (io::Result<()>, IoBuf) {
        (BlockDevice::write_fua(self, offset, &data), data)
    }
    async fn flush(&self) -> io::Result<()> {
        BlockDevice::flush(self)
    }
    async fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        BlockDevice::trim(self, offset, len)
    }
    async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        BlockDevice::write_zeroes(self, offset, len, may_trim)
    }
    async fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        BlockDevice::block_status(self, offset, len)
    }
    async fn unmount(&self) {
        BlockDevice::unmount(self)
    }
    fn into_block_device(self) -> Box<dyn BlockDevice>
    where
        Self: Sized + 'static,
    {
        Box::new(self)
    }
}

#[cfg(test)]
mod tests;
