//! [`dispatch_async`]: a validated [`IoRequest`] to an [`AsyncBlockDevice`], the async twin of
//! [`Dispatcher::dispatch`](crate::server::Dispatcher::dispatch) with the same rules: READ
//! buffers zeroed (or poisoned) before the device sees them, FUA honoured, the device's error
//! mapped to the protocol's errno set, and a panic in the device's future answered EIO. Shared by
//! every transport that runs an async device (the NBD loop; a ublk queue can await it per tag).

use std::future::Future;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::async_device::{AsyncBlockDevice, IoBuf};
use crate::device::Extent;
use crate::proto::Errno;
use crate::server::request::{IoFlags, IoOp, IoRequest};
use crate::server::unfilled::poison;
use crate::server::IoResult;

/// Polls a future, turning a panic into `None` (the future is then dropped).
struct CatchUnwind<F>(Option<Pin<Box<F>>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Option<F::Output>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<F::Output>> {
        let Some(f) = self.0.as_mut() else {
            return Poll::Ready(None);
        };
        match panic::catch_unwind(AssertUnwindSafe(|| f.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(out)) => {
                self.0 = None;
                Poll::Ready(Some(out))
            }
            Err(_) => {
                self.0 = None;
                Poll::Ready(None)
            }
        }
    }
}

/// `f`'s output, or `None` if polling it panicked.
pub(crate) async fn catch_unwind<F: Future>(f: F) -> Option<F::Output> {
    CatchUnwind(Some(Box::pin(f))).await
}

fn errno(result: io::Result<()>) -> Result<(), Errno> {
    result.map_err(|e| Errno::from_io_error(&e))
}

/// Calls `device` for `req`, which must have passed [`validate_io`](crate::server::validate_io),
/// lending it `buf` (at least [`req.data_len()`](IoRequest::data_len) bytes: a WRITE's payload,
/// or where a READ's data goes; a shorter one gets EINVAL). Returns the result and the buffer
/// the device gave back: `None` if its future panicked (then the result is EIO). A READ whose
/// returned buffer is shorter than the request fails with EIO.
///
/// ```
/// use userblk::async_device::IoBuf;
/// use userblk::server::{dispatch_async, IoOp, IoRequest};
/// use userblk::MemDevice;
///
/// let dev = MemDevice::new(1 << 20); // a sync device is an async one too
/// let rt = tokio::runtime::Builder::new_current_thread().build()?;
/// let write = IoRequest::new(IoOp::Write, 4096, 512);
/// let (result, _) = rt.block_on(dispatch_async(&dev, write, IoBuf::from(vec![7; 512]), false));
/// assert_eq!(result, Ok(512));
/// let read = IoRequest::new(IoOp::Read, 4096, 512);
/// let (result, buf) = rt.block_on(dispatch_async(&dev, read, IoBuf::zeroed(512), false));
/// assert_eq!((result, &buf.unwrap()[..]), (Ok(512), &[7u8; 512][..]));
/// # Ok::<(), std::io::Error>(())
/// ```
pub async fn dispatch_async<D: AsyncBlockDevice + ?Sized>(
    device: &D,
    req: IoRequest,
    mut buf: IoBuf,
    poison_reads: bool,
) -> (IoResult, Option<IoBuf>) {
    let len = req.data_len();
    if buf.len() < len {
        return (Err(Errno::EINVAL), Some(buf));
    }
    buf.truncate(len);
    let fua = req.flags.contains(IoFlags::FUA);
    let off = req.offset;
    if req.op == IoOp::Read {
        if poison_reads {
            poison(&mut buf, off);
        } else {
            buf.fill(0);
        }
    }
    let call = async move {
        match req.op {
            IoOp::Read => {
                let (r, back) = device.read(off, buf).await;
                let r = errno(r).and_then(|()| {
                    if back.len() == len {
                        Ok(len)
                    } else {
                        Err(Errno::EIO)
                    }
                });
                (r, back)
            }
            IoOp::Write if fua => {
                let (r, back) = device.write_fua(off, buf).await;
                (errno(r).map(|()| len), back)
            }
            IoOp::Write => {
                let (r, back) = device.write(off, buf).await;
                (errno(r).map(|()| len), back)
            }
            IoOp::Flush => (errno(device.flush().await).map(|()| 0), buf),
            IoOp::Trim => {
                let mut r = errno(device.trim(off, req.len).await);
                if r.is_ok() && fua {
                    r = errno(device.flush().await);
                }
                (r.map(|()| 0), buf)
            }
            IoOp::WriteZeroes => {
                let may_trim = !req.flags.contains(IoFlags::NO_HOLE);
                let mut r = errno(device.write_zeroes(off, req.len, may_trim).await);
                if r.is_ok() && fua {
                    r = errno(device.flush().await);
                }
                (r.map(|()| 0), buf)
            }
        }
    };
    match catch_unwind(call).await {
        Some((result, back)) => (result, Some(back)),
        None => (Err(Errno::EIO), None),
    }
}

/// The device's allocation status of a validated range; errors and panics as for
/// [`dispatch_async`].
pub async fn block_status_async<D: AsyncBlockDevice + ?Sized>(
    device: &D,
    offset: u64,
    len: u64,
) -> Result<Vec<Extent>, Errno> {
    match catch_unwind(device.block_status(offset, len)).await {
        Some(Ok(extents)) => Ok(extents),
        Some(Err(e)) => Err(Errno::from_io_error(&e)),
        None => Err(Errno::EIO),
    }
}
