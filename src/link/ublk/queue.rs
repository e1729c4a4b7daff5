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
use super::sys::{self, Completion, QueueIo};
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

/// The value to commit for `tag`: the request in its descriptor validated against the export
/// and dispatched to the device, or the errno that stopped it on the way.
fn serve_tag<D: BlockDevice + ?Sized>(
    io: &mut QueueIo,
    cfg: &QueueConfig,
    dispatcher: &Dispatcher<'_, D>,
    tag: u16,
) -> i32 {
    let Some(desc) = io.descs.get(tag) else {
        return -nix::libc::EINVAL;
    };
    let req = match io_request(&desc) {
        Ok(req) => req,
        Err(e) => return commit_value(None, Err(e)),
    };
    if let Err(e) = validate_io(&req, &cfg.export, cfg.max_io_len) {
        return commit_value(Some(req.op), Err(e));
    }
    let result = dispatcher.dispatch(&req, io.bufs.get_mut(tag));
    commit_value(Some(req.op), result)
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
