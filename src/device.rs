//! The block device a program implements: [`BlockDevice`] for concurrent devices (`&self`), its
//! `&mut self` twin [`BlockDeviceMut`] for simple ones, and [`Capabilities`], from which the server
//! derives what it advertises to the kernel.
//!
//! The server guarantees a device never sees a request outside `0..size()`, a zero length, or a
//! command its capabilities do not allow: it answers those itself.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use nix::libc::{ENOTSUP, EPERM};

use crate::async_device::{zero_chunks, AsyncServing, ZERO_CHUNK};
use crate::proto::TransmissionFlags;

/// What a device supports. The defaults are cautious: only what every device can do correctly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// The device refuses writes; the kernel fails them itself and the server answers EPERM.
    /// Default: `false`.
    pub read_only: bool,
    /// The device has a volatile write cache that [`BlockDevice::flush`] makes durable. The
    /// kernel then sends FLUSH (and FUA, below). Default: `true`, so that a device which caches
    /// without saying so still gets its flushes.
    pub flush: bool,
    /// The device implements [`BlockDevice::write_fua`] better than write + flush (advertised only
    /// together with `flush`). Default: `false`; FUA requests are honoured either way.
    pub fua: bool,
    /// [`BlockDevice::trim`] is implemented. Default: `false` (the kernel sends no TRIM).
    pub trim: bool,
    /// A trimmed range reads back as zeroes (a promise the conformance suite checks).
    /// Default: `false`: trimmed data is unspecified.
    pub trim_zeroes: bool,
    /// [`BlockDevice::write_zeroes`] is worth sending (kernel 6.12+). Default: `false`; the kernel
    /// then writes zero-filled buffers instead.
    pub write_zeroes: bool,
    /// The device is rotational (the I/O scheduler may merge more). Default: `false`.
    pub rotational: bool,
    /// Every call returns quickly and never waits for another request (RAM, a memory-mapped
    /// cache): the server then serves each connection with two threads taking turns and replies
    /// written in batches, the cheapest path per request that still lets calls overlap.
    /// Default: `false`, for devices that do I/O or wait.
    pub never_blocks: bool,
}

impl Default for Capabilities {
    fn default() -> Capabilities {
        Capabilities {
            read_only: false,
            flush: true,
            fua: false,
            trim: false,
            trim_zeroes: false,
            write_zeroes: false,
            rotational: false,
            never_blocks: false,
        }
    }
}

impl Capabilities {
    /// The transmission flags a server advertises for these capabilities.
    pub fn transmission_flags(&self) -> TransmissionFlags {
        let mut flags = TransmissionFlags::HAS_FLAGS;
        if self.read_only {
            flags |= TransmissionFlags::READ_ONLY;
        }
        if self.flush {
            flags |= TransmissionFlags::SEND_FLUSH;
            if self.fua {
                flags |= TransmissionFlags::SEND_FUA;
            }
        }
        if self.trim && !self.read_only {
            flags |= TransmissionFlags::SEND_TRIM;
        }
        if self.write_zeroes && !self.read_only {
            flags |= TransmissionFlags::SEND_WRITE_ZEROES;
        }
        if self.rotational {
            flags |= TransmissionFlags::ROTATIONAL;
        }
        flags
    }
}

/// A run of bytes with one allocation status, as [`BlockDevice::block_status`] reports it (NBD's
/// `base:allocation` context: `NBD_STATE_HOLE`, `NBD_STATE_ZERO`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Extent {
    /// Length in bytes.
    pub len: u64,
    /// Not allocated in the backing store (a hole).
    pub hole: bool,
    /// Reads as zeroes.
    pub zero: bool,
}

impl Extent {
    /// Allocated data of unknown content: what any range may be reported as.
    pub fn data(len: u64) -> Extent {
        Extent {
            len,
            hole: false,
            zero: false,
        }
    }

    /// An unallocated range that reads as zeroes.
    pub fn hole(len: u64) -> Extent {
        Extent {
            len,
            hole: true,
            zero: true,
        }
    }
}

/// A block device served to the kernel, for devices that handle requests concurrently.
///
/// Offsets and lengths are in bytes and always multiples of [`block_size`](Self::block_size);
/// every range lies within `0..blocks() * block_size()`. Errors are `io::Error`s; their raw OS
/// error goes on the wire mapped to the protocol's set ([`crate::proto::Errno::from_io_error`]),
/// and an error without one becomes EIO.
///
/// Only [`read`](Self::read) and [`blocks`](Self::blocks) are required. A device that does not
/// implement [`write`](Self::write) is read-only in effect: writes fail with EPERM.
pub trait BlockDevice: Send + Sync {
    /// Logical block size in bytes: a power of two from 512 to 65536. Default: 512.
    fn block_size(&self) -> u32 {
        512
    }

    /// Number of blocks. The size is fixed for the device's life.
    fn blocks(&self) -> u64;

    /// What the device supports. Default: [`Capabilities::default`].
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// Fills `buf` from `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Writes `data` at `offset`. Default: fails with EPERM (not writable).
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let _ = (offset, data);
        Err(io::Error::from_raw_os_error(EPERM))
    }

    /// Writes `data` at `offset` and makes it durable before returning (FUA).
    /// Default: [`write`](Self::write) then [`flush`](Self::flush).
    fn write_fua(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write(offset, data)?;
        self.flush()
    }

    /// Makes every completed write durable. Default: nothing to do (no volatile cache).
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    /// Discards `len` bytes at `offset`. Default: fails with ENOTSUP (not advertised unless
    /// [`Capabilities::trim`] is set).
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Err(io::Error::from_raw_os_error(ENOTSUP))
    }

    /// Makes `len` bytes at `offset` read back as zeroes; `may_trim` says a hole may be punched
    /// (the request had no NO_HOLE flag). Default: writes zero-filled buffers.
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        let _ = may_trim;
        let zeroes = vec![0u8; ZERO_CHUNK.min(len as usize)];
        for (at, n) in zero_chunks(offset, len) {
            self.write(at, &zeroes[..n])?;
        }
        Ok(())
    }

    /// The allocation status of `len` bytes at `offset`: consecutive extents from `offset`.
    /// They may cover less than `len` (the caller asks again for the rest) but not more, and
    /// need not be merged. Served to network clients as `NBD_CMD_BLOCK_STATUS`
    /// (`base:allocation`; `nbdinfo --map`, `qemu-img map`, sparse copies). Default: all of it
    /// allocated data, which is always a correct answer.
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let _ = offset;
        Ok(vec![Extent::data(len)])
    }

    /// Called once when the kernel disconnects, after every request has been answered.
    fn unmount(&self) {}

    /// The asynchronous device this one is, for the server to run its requests as tasks:
    /// `Some` for an [`AsyncDevice`](crate::async_device::AsyncDevice) only (and for a wrapper
    /// that passes its inner device's on, calls and all). Default: `None`, served by threads.
    /// Not for implementing otherwise: [`AsyncServing`] cannot be made outside userblk.
    fn asynchronous(&self) -> Option<AsyncServing> {
        None
    }
}

/// The `&mut self` twin of [`BlockDevice`], for devices that handle one request at a time.
/// Serve one by wrapping it in a [`Mutex`] (`Mutex::new(dev)`) or [`Exclusive::new`].
///
/// The methods and defaults are those of [`BlockDevice`].
#[allow(missing_docs)]
pub trait BlockDeviceMut: Send {
    fn block_size(&self) -> u32 {
        512
    }
    fn blocks(&self) -> u64;
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let _ = (offset, data);
        Err(io::Error::from_raw_os_error(EPERM))
    }
    fn write_fua(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write(offset, data)?;
        self.flush()
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn trim(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Err(io::Error::from_raw_os_error(ENOTSUP))
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        let _ = may_trim;
        let zeroes = vec![0u8; ZERO_CHUNK.min(len as usize)];
        for (at, n) in zero_chunks(offset, len) {
            self.write(at, &zeroes[..n])?;
        }
        Ok(())
    }
    fn block_status(&mut self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let _ = offset;
        Ok(vec![Extent::data(len)])
    }
    fn unmount(&mut self) {}
}

/// A poisoned lock means a device method panicked mid-request: the device's state is unknown,
/// so every later request fails with EIO rather than touch it.
fn lock<T>(m: &Mutex<T>) -> io::Result<MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| io::Error::other("device poisoned by an earlier panic"))
}

impl<T: BlockDeviceMut> BlockDevice for Mutex<T> {
    fn block_size(&self) -> u32 {
        match self.lock() {
            Ok(d) => d.block_size(),
            Err(p) => p.get_ref().block_size(),
        }
    }
    fn blocks(&self) -> u64 {
        match self.lock() {
            Ok(d) => d.blocks(),
            Err(p) => p.get_ref().blocks(),
        }
    }
    fn capabilities(&self) -> Capabilities {
        match self.lock() {
            Ok(d) => d.capabilities(),
            Err(p) => p.get_ref().capabilities(),
        }
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        lock(self)?.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        lock(self)?.write(offset, data)
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        lock(self)?.write_fua(offset, data)
    }
    fn flush(&self) -> io::Result<()> {
        lock(self)?.flush()
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        lock(self)?.trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        lock(self)?.write_zeroes(offset, len, may_trim)
    }
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        lock(self)?.block_status(offset, len)
    }
    fn unmount(&self) {
        if let Ok(mut d) = self.lock() {
            d.unmount();
        }
    }
}

/// A [`BlockDeviceMut`] served one request at a time: `Exclusive::new(dev)` is `Mutex::new(dev)`.
pub type Exclusive<T> = Mutex<T>;

macro_rules! forward_block_device {
    ($($ty:ty),*) => {$(
        impl<T: BlockDevice + ?Sized> BlockDevice for $ty {
            fn block_size(&self) -> u32 { (**self).block_size() }
            fn blocks(&self) -> u64 { (**self).blocks() }
            fn capabilities(&self) -> Capabilities { (**self).capabilities() }
            fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> { (**self).read(offset, buf) }
            fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> { (**self).write(offset, data) }
            fn write_fua(&self, offset: u64, data: &[u8]) -> io::Result<()> { (**self).write_fua(offset, data) }
            fn flush(&self) -> io::Result<()> { (**self).flush() }
            fn trim(&self, offset: u64, len: u64) -> io::Result<()> { (**self).trim(offset, len) }
            fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
                (**self).write_zeroes(offset, len, may_trim)
            }
            fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
                (**self).block_status(offset, len)
            }
            fn unmount(&self) { (**self).unmount() }
            fn asynchronous(&self) -> Option<AsyncServing> { (**self).asynchronous() }
        }
    )*};
}

// Sharing a device (`Arc<D>`) lets a test keep a handle to inspect it while a server runs it.
forward_block_device!(Arc<T>, Box<T>);

#[cfg(test)]
mod tests {
    use super::*;

    struct Plain(Vec<u8>);

    impl BlockDeviceMut for Plain {
        fn blocks(&self) -> u64 {
            self.0.len() as u64 / 512
        }
        fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            let o = offset as usize;
            buf.copy_from_slice(&self.0[o..o + buf.len()]);
            Ok(())
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
            let o = offset as usize;
            self.0[o..o + data.len()].copy_from_slice(data);
            Ok(())
        }
    }

    #[test]
    fn default_capabilities_advertise_flush_only() {
        let flags = Capabilities::default().transmission_flags();
        assert_eq!(
            flags,
            TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_FLUSH
        );
    }

    #[test]
    fn read_only_never_advertises_trim_or_zeroes() {
        let caps = Capabilities {
            read_only: true,
            trim: true,
            write_zeroes: true,
            ..Capabilities::default()
        };
        let flags = caps.transmission_flags();
        assert!(flags.contains(TransmissionFlags::READ_ONLY));
        assert!(!flags.contains(TransmissionFlags::SEND_TRIM));
        assert!(!flags.contains(TransmissionFlags::SEND_WRITE_ZEROES));
    }

    #[test]
    fn fua_needs_flush() {
        let caps = Capabilities {
            flush: false,
            fua: true,
            ..Capabilities::default()
        };
        assert!(!caps
            .transmission_flags()
            .contains(TransmissionFlags::SEND_FUA));
    }

    #[test]
    fn mutex_adapter_serves_a_mut_device_and_default_zeroes_write() {
        let dev = Mutex::new(Plain(vec![0xff; 200 << 10]));
        dev.write_zeroes(512, 130 << 10, true).unwrap();
        let mut buf = vec![1u8; 131 << 10];
        dev.read(0, &mut buf).unwrap();
        assert!(buf[..512].iter().all(|&b| b == 0xff));
        assert!(buf[512..512 + (130 << 10)].iter().all(|&b| b == 0));
        assert!(buf[512 + (130 << 10)..].iter().all(|&b| b == 0xff));
    }

    #[test]
    fn defaults_fail_with_the_documented_errno() {
        struct ReadOnly;
        impl BlockDevice for ReadOnly {
            fn blocks(&self) -> u64 {
                1
            }
            fn read(&self, _: u64, _: &mut [u8]) -> io::Result<()> {
                Ok(())
            }
        }
        assert_eq!(
            ReadOnly.write(0, &[0; 512]).unwrap_err().raw_os_error(),
            Some(EPERM)
        );
        assert_eq!(
            ReadOnly.trim(0, 512).unwrap_err().raw_os_error(),
            Some(ENOTSUP)
        );
    }
}
