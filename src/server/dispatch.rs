//! [`Dispatcher`]: a validated [`IoRequest`] to the device, shared by every transport. It picks the
//! device method, honours FUA (write + flush where the method has no FUA of its own), maps the
//! device's error to the protocol's errno set, and turns a panic in the device into EIO.
//!
//! It knows nothing of framing: the NBD loop, a ublk queue and a test hand it an `IoRequest` and
//! the request's buffer, and get back an [`IoResult`].

use std::fmt;
use std::io;
use std::panic::{self, AssertUnwindSafe};

use crate::device::{BlockDevice, Extent};
use crate::proto::Errno;
use crate::server::request::{IoFlags, IoOp, IoRequest};
use crate::server::unfilled::poison;
use crate::server::ServerError;

/// What a request came to: the bytes moved through its buffer (`len` for READ and WRITE, 0
/// otherwise), or the errno to report.
pub type IoResult = Result<usize, Errno>;

/// Calls a [`BlockDevice`] for validated requests. Cheap to copy: one per thread is fine.
///
/// ```
/// use userblk::server::{Dispatcher, IoOp, IoRequest};
/// use userblk::MemDevice;
///
/// let dev = MemDevice::new(1 << 20);
/// let d = Dispatcher::new(&dev);
/// let mut buf = vec![7u8; 4096];
/// assert_eq!(d.dispatch(&IoRequest::new(IoOp::Write, 8192, 4096), &mut buf), Ok(4096));
/// let mut back = vec![0u8; 4096];
/// assert_eq!(d.dispatch(&IoRequest::new(IoOp::Read, 8192, 4096), &mut back), Ok(4096));
/// assert_eq!(back, buf);
/// ```
pub struct Dispatcher<'d, D: ?Sized> {
    device: &'d D,
    poison_reads: bool,
}

impl<D: ?Sized> Clone for Dispatcher<'_, D> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<D: ?Sized> Copy for Dispatcher<'_, D> {}

impl<D: ?Sized> fmt::Debug for Dispatcher<'_, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatcher")
            .field("poison_reads", &self.poison_reads)
            .finish_non_exhaustive()
    }
}

impl<'d, D: BlockDevice + ?Sized> Dispatcher<'d, D> {
    /// A dispatcher for `device`. READ buffers are zeroed before the device sees them.
    pub fn new(device: &'d D) -> Dispatcher<'d, D> {
        Dispatcher {
            device,
            poison_reads: false,
        }
    }

    /// With `true`, READ buffers are filled with the unfilled marker instead of zeroes before
    /// the device sees them, so that [`unfilled_ranges`](crate::server::unfilled_ranges) finds
    /// in the data read whatever the device did not write.
    pub fn poison_reads(mut self, poison: bool) -> Dispatcher<'d, D> {
        self.poison_reads = poison;
        self
    }

    /// The device.
    pub fn device(&self) -> &'d D {
        self.device
    }

    /// Calls the device for `req`, which must have passed
    /// [`validate_io`](crate::server::validate_io) (or [`validate`](crate::server::validate)).
    /// `buf` holds a WRITE's payload, or receives a READ's data: its first
    /// [`req.data_len()`](IoRequest::data_len) bytes are used, and a shorter one gets EINVAL.
    /// A panic in the device becomes EIO.
    ///
    /// A READ buffer is zeroed (or poisoned) first: buffers are recycled, and a device that
    /// fills only part of one must not hand another request's data to the kernel.
    pub fn dispatch(&self, req: &IoRequest, buf: &mut [u8]) -> IoResult {
        let len = req.data_len();
        let Some(buf) = buf.get_mut(..len) else {
            return Err(Errno::EINVAL);
        };
        let device = self.device;
        let fua = req.flags.contains(IoFlags::FUA);
        let off = req.offset;
        if req.op == IoOp::Read {
            if self.poison_reads {
                poison(buf, off);
            } else {
                buf.fill(0);
            }
        }
        let result = panic::catch_unwind(AssertUnwindSafe(|| match req.op {
            IoOp::Read => device.read(off, buf),
            IoOp::Write if fua => device.write_fua(off, buf),
            IoOp::Write => device.write(off, buf),
            IoOp::Flush => device.flush(),
            IoOp::Trim => device
                .trim(off, req.len)
                .and_then(|()| flush_if(device, fua)),
            IoOp::WriteZeroes => {
                let may_trim = !req.flags.contains(IoFlags::NO_HOLE);
                device
                    .write_zeroes(off, req.len, may_trim)
                    .and_then(|()| flush_if(device, fua))
            }
        }));
        match result {
            Ok(Ok(())) => Ok(len),
            Ok(Err(e)) => Err(Errno::from_io_error(&e)),
            Err(_) => Err(Errno::EIO),
        }
    }

    /// Asks the device for the allocation status of a validated range (see
    /// [`validate_block_status`](crate::server::validate_block_status)); errors and panics as
    /// for [`dispatch`](Self::dispatch).
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, Errno> {
        let device = self.device;
        match panic::catch_unwind(AssertUnwindSafe(|| device.block_status(offset, len))) {
            Ok(Ok(extents)) => Ok(extents),
            Ok(Err(e)) => Err(Errno::from_io_error(&e)),
            Err(_) => Err(Errno::EIO),
        }
    }

    /// Calls the device's [`unmount`](BlockDevice::unmount), catching a panic: serving ends
    /// with [`ServerError::UnmountPanicked`] rather than unwinding through the caller, which
    /// still has a link to finish.
    pub fn unmount(&self) -> Result<(), ServerError> {
        let device = self.device;
        panic::catch_unwind(AssertUnwindSafe(|| device.unmount())).map_err(|payload| {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_owned());
            ServerError::UnmountPanicked { message }
        })
    }
}

/// TRIM and WRITE_ZEROES have no FUA method of their own: a flush after them makes them durable.
fn flush_if<D: BlockDevice + ?Sized>(device: &D, fua: bool) -> io::Result<()> {
    if fua {
        device.flush()
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records the calls it gets; fails writes past 4 KiB with EFBIG, panics on a read at 0.
    #[derive(Default)]
    struct Calls(Mutex<Vec<String>>);

    impl BlockDevice for Calls {
        fn blocks(&self) -> u64 {
            64
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            assert_ne!(offset, 0, "the device panics");
            self.0
                .lock()
                .unwrap()
                .push(format!("read {offset} {}", buf.len()));
            buf.fill(1);
            Ok(())
        }
        fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            self.0
                .lock()
                .unwrap()
                .push(format!("write {offset} {}", data.len()));
            if offset >= 4096 {
                return Err(io::Error::from_raw_os_error(nix::libc::EFBIG));
            }
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            self.0.lock().unwrap().push("flush".into());
            Ok(())
        }
        fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
            self.0.lock().unwrap().push(format!("trim {offset} {len}"));
            Ok(())
        }
        fn unmount(&self) {
            panic!("unmount {}", "failed");
        }
    }

    #[test]
    fn requests_reach_their_method_with_fua_errno_and_panic_handling() {
        let dev = Calls::default();
        let d = Dispatcher::new(&dev);
        let mut buf = vec![0u8; 8192];
        let write = IoRequest::new(IoOp::Write, 512, 1024).with(IoFlags::FUA);
        assert_eq!(d.dispatch(&write, &mut buf), Ok(1024));
        let trim = IoRequest::new(IoOp::Trim, 0, 8 << 30).with(IoFlags::FUA);
        assert_eq!(d.dispatch(&trim, &mut []), Ok(0));
        // EFBIG is not in the protocol's set: it goes out as ENOSPC.
        let far = IoRequest::new(IoOp::Write, 4096, 512);
        assert_eq!(d.dispatch(&far, &mut buf), Err(Errno::ENOSPC));
        assert_eq!(
            d.dispatch(&IoRequest::new(IoOp::Read, 512, 4096), &mut buf),
            Ok(4096)
        );
        assert!(buf[..4096].iter().all(|&b| b == 1));
        // A buffer shorter than the request never reaches the device.
        let long = IoRequest::new(IoOp::Read, 512, 16384);
        assert_eq!(d.dispatch(&long, &mut buf), Err(Errno::EINVAL));
        assert_eq!(
            d.dispatch(&IoRequest::new(IoOp::Read, 0, 512), &mut buf),
            Err(Errno::EIO)
        );
        let calls = dev.0.lock().unwrap().clone();
        // write_fua's default is write then flush; TRIM with FUA is followed by a flush.
        let want = [
            "write 512 1024",
            "flush",
            "trim 0 8589934592",
            "flush",
            "write 4096 512",
            "read 512 4096",
        ];
        assert_eq!(calls, want);
    }

    #[test]
    fn a_panic_in_unmount_is_a_typed_error() {
        let dev = Calls::default();
        match Dispatcher::new(&dev).unmount() {
            Err(ServerError::UnmountPanicked { message }) => assert_eq!(message, "unmount failed"),
            other => panic!("{other:?}"),
        }
    }
}
