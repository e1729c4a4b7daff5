//! One ublk queue, served by one thread: FETCH_REQ for every tag, then for each completed
//! fetch the request its descriptor describes, validated and dispatched by the server core
//! exactly as an NBD request is, and COMMIT_AND_FETCH_REQ with the outcome. The loop ends when
//! every tag's fetch has been aborted by the kernel (STOP_DEV, or the device going away).
//!
//! Serving a tag ([`serve_tag`]) and completing it ([`QueueIo::queue_cmd`] with the value)
//! are separate steps, as in the NBD loop's completion path: a device that completes later
//! would keep the tag and commit it when done (from this thread, woken through the ring),
//! without anything else here changing.

use std::os::fd::BorrowedFd;

use crate::device::BlockDevice;
use crate::link::Export;
use crate::server::{validate_io, Dispatcher};

use super::frame::{commit_value, io_request};
use super::sys::{self, Completion, IoDesc, QueueIo};
use super::UblkError;

/// What a queue thread needs besides the device.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QueueConfig {
    pub(crate) q_id: u16,
    pub(crate) depth: u16,
    /// Each tag's buffer: the device's largest request.
    pub(crate) buf_len: usize,
    /// What requests are checked against.
    pub(crate) export: Export,
    /// The largest READ or WRITE served.
    pub(crate) max_io_len: u32,
}

/// What one queue did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct QueueStats {
    /// Requests served (answered with success or an errno).
    pub(crate) served: u64,
}

/// The value to commit for `tag`: see [`serve_request`].
fn serve_tag<D: BlockDevice + ?Sized>(
    io: &mut QueueIo,
    cfg: &QueueConfig,
    dispatcher: &Dispatcher<'_, D>,
    tag: u16,
) -> i32 {
    let Some(desc) = io.descs.get(tag) else {
        return -nix::libc::EINVAL;
    };
    serve_request(&desc, io.bufs.get_mut(tag), cfg, dispatcher)
}

/// The value to commit for the request `desc` describes, whose data is (or goes) in `buf`:
/// validated against the export and dispatched to the device exactly as an NBD request is, or
/// the errno that stopped it on the way.
fn serve_request<D: BlockDevice + ?Sized>(
    desc: &IoDesc,
    buf: &mut [u8],
    cfg: &QueueConfig,
    dispatcher: &Dispatcher<'_, D>,
) -> i32 {
    let req = match io_request(desc) {
        Ok(req) => req,
        Err(e) => return commit_value(None, Err(e)),
    };
    if let Err(e) = validate_io(&req, &cfg.export, cfg.max_io_len) {
        return commit_value(Some(req.op), Err(e));
    }
    commit_value(Some(req.op), dispatcher.dispatch(&req, buf))
}

/// Sets up queue `cfg.q_id` on the char device `cdev`, fetches every tag, calls `ready` once
/// the kernel has every fetch (START_DEV may then be sent), and serves until every fetch is
/// aborted.
pub(crate) fn run_queue<D: BlockDevice + ?Sized>(
    cdev: BorrowedFd<'_>,
    cfg: &QueueConfig,
    dispatcher: Dispatcher<'_, D>,
    ready: impl FnOnce(),
) -> Result<QueueStats, UblkError> {
    let q = cfg.q_id;
    let fail = |source| UblkError::Queue { queue: q, source };
    let _ = sys::set_io_flusher();
    let mut io = QueueIo::new(cdev, q, cfg.depth, cfg.buf_len).map_err(fail)?;
    for tag in 0..cfg.depth {
        io.queue_cmd(tag, None).map_err(fail)?;
    }
    io.submit_queued().map_err(fail)?;
    ready();
    let mut live = cfg.depth;
    let mut stats = QueueStats::default();
    let mut first_error: Option<std::io::Error> = None;
    let mut done: Vec<Completion> = Vec::with_capacity(usize::from(cfg.depth));
    let served = loop {
        if live == 0 {
            break Ok(());
        }
        done.clear();
        if let Err(e) = io.wait(&mut done) {
            break Err(e);
        }
        let mut ring_error = None;
        for c in &done {
            match c.result {
                0 if c.tag < cfg.depth => {
                    let value = serve_tag(&mut io, cfg, &dispatcher, c.tag);
                    stats.served += 1;
                    if let Err(e) = io.queue_cmd(c.tag, Some(value)) {
                        ring_error = Some(e);
                        break;
                    }
                }
                sys::IO_RES_ABORT => live = live.saturating_sub(1),
                res => {
                    // A command the kernel refused (or a result this server never asks for):
                    // that tag is no longer fetched.
                    live = live.saturating_sub(1);
                    first_error.get_or_insert_with(|| {
                        if res < 0 {
                            std::io::Error::from_raw_os_error(-res)
                        } else {
                            std::io::Error::other(format!(
                                "unexpected result {res} for tag {}",
                                c.tag
                            ))
                        }
                    });
                }
            }
        }
        if let Some(e) = ring_error {
            break Err(e);
        }
    };
    if served.is_err() {
        // Fetches may still be outstanding: their buffers must never be reused for anything
        // else, whatever the kernel still does with them.
        io.poison();
    }
    match served.err().or(first_error) {
        Some(e) => Err(fail(e)),
        None => Ok(stats),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::TransmissionFlags as F;
    use crate::MemDevice;
    use std::io;
    use std::sync::Mutex;

    /// A RAM disk that records its calls and panics on a read at 0.
    struct Recorder(MemDevice, Mutex<Vec<String>>);

    impl BlockDevice for Recorder {
        fn blocks(&self) -> u64 {
            self.0.blocks()
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            assert_ne!(offset, 0, "the device panics");
            self.1.lock().unwrap().push(format!("read {offset}"));
            self.0.read(offset, buf)
        }
        fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            self.1.lock().unwrap().push(format!("write {offset}"));
            self.0.write(offset, data)
        }
        fn flush(&self) -> io::Result<()> {
            self.1.lock().unwrap().push("flush".into());
            Ok(())
        }
    }

    fn desc(op: u8, flags: u32, sector: u64, sectors: u32) -> IoDesc {
        IoDesc {
            op_flags: u32::from(op) | flags,
            nr_sectors: sectors,
            start_sector: sector,
            addr: 0,
        }
    }

    /// What a queue commits for each descriptor: the shared validation and dispatch decide,
    /// the framing only translates.
    #[test]
    fn descriptors_are_validated_and_dispatched_like_nbd_requests() {
        let dev = Recorder(MemDevice::new(1 << 20), Mutex::default());
        let cfg = QueueConfig {
            q_id: 0,
            depth: 1,
            buf_len: 64 << 10,
            export: Export {
                size: 1 << 20,
                block_size: 512,
                flags: F::SEND_FLUSH,
            },
            max_io_len: 64 << 10,
        };
        let d = Dispatcher::new(&dev);
        let mut buf = vec![7u8; 64 << 10];
        let serve = |desc: IoDesc, buf: &mut [u8]| serve_request(&desc, buf, &cfg, &d);
        assert_eq!(
            serve(desc(sys::OP_WRITE, sys::IO_F_FUA, 8, 8), &mut buf),
            4096
        );
        assert_eq!(serve(desc(sys::OP_READ, 0, 8, 8), &mut buf), 4096);
        assert_eq!(serve(desc(sys::OP_FLUSH, 0, 0, 0), &mut buf), 0);
        // Past the end, too long, not advertised, unknown: refused before the device.
        assert_eq!(serve(desc(sys::OP_READ, 0, 2048, 8), &mut buf), -22);
        assert_eq!(serve(desc(sys::OP_WRITE, 0, 2047, 2), &mut buf), -28);
        assert_eq!(serve(desc(sys::OP_READ, 0, 0, 256), &mut buf), -22);
        assert_eq!(serve(desc(sys::OP_DISCARD, 0, 0, 8), &mut buf), -22);
        assert_eq!(serve(desc(sys::OP_WRITE_SAME, 0, 0, 8), &mut buf), -95);
        // A panic in the device is an EIO for that request.
        assert_eq!(serve(desc(sys::OP_READ, 0, 0, 1), &mut buf), -5);
        let calls = dev.1.lock().unwrap().clone();
        assert_eq!(calls, ["write 4096", "flush", "read 4096", "flush"]);
        // Read-only: writes are refused with EPERM, reads go on.
        let ro = QueueConfig {
            export: Export {
                flags: F::READ_ONLY,
                ..cfg.export
            },
            ..cfg
        };
        assert_eq!(
            serve_request(&desc(sys::OP_WRITE, 0, 0, 1), &mut buf, &ro, &d),
            -1
        );
    }
}
