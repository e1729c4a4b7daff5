//! One ublk queue: FETCH_REQ for every tag, then for each completed fetch the request its
//! descriptor describes, validated and dispatched by the server core exactly as an NBD request
//! is, and COMMIT_AND_FETCH_REQ with the outcome. The loop ends when every tag's fetch has been
//! aborted by the kernel (STOP_DEV, or the device going away).
//!
//! Requests of one queue are in flight together (see [`serving`](super::serving) for how each
//! kind of device is served): serving a tag and committing it are separate steps. The queue
//! thread alone talks to the kernel; it hands a request, with the tag's buffer, to a worker or a
//! task, and commits the tag when the outcome comes back (woken through its ring). Each tag is,
//! at any moment, the kernel's (a command in flight: its buffer untouched), the device's (the
//! buffer lent), or gone (aborted): every request is committed exactly once, and the loop ends
//! only when every tag is gone, so no buffer is freed while the kernel or a worker may use it.
//!
//! The loop is written against [`Ring`], the kernel's side of a queue: the real one is
//! [`QueueIo`]; the unit tests drive the loop with a fake kernel.

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::thread;

use crate::device::BlockDevice;
use crate::link::Export;
use crate::server::{validate_io, Dispatcher, IoRequest};

use super::frame::{commit_value, io_request};
use super::serving::{self, Done, How, Job, Jobs, Returns};
use super::sys::{self, Completion, IoDesc, QueueIo, RingFlags};
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
    /// The most requests the device had at once.
    pub(crate) max_in_flight: usize,
}

/// The kernel's side of a queue, as the loop uses it.
pub(crate) trait Ring {
    /// The descriptor of `tag`, whose fetch just completed.
    fn desc(&self, tag: u16) -> Option<IoDesc>;
    /// Queues FETCH_REQ (`result: None`) or COMMIT_AND_FETCH_REQ with `result` for `tag`, whose
    /// buffer is at `addr` (see [`QueueIo::queue_cmd`]).
    fn queue_cmd(&mut self, tag: u16, result: Option<i32>, addr: u64) -> io::Result<()>;
    /// Hands what is queued to the kernel.
    fn submit_queued(&mut self) -> io::Result<()>;
    /// Submits what is queued, waits for a completion or for the waker, and appends the
    /// completions to `out` (none if only woken).
    fn wait(&mut self, out: &mut Vec<Completion>) -> io::Result<()>;
    /// What wakes [`wait`](Self::wait) from another thread.
    fn waker(&self) -> Box<dyn Fn() + Send + Sync>;
}

impl Ring for QueueIo {
    fn desc(&self, tag: u16) -> Option<IoDesc> {
        self.descs.get(tag)
    }
    fn queue_cmd(&mut self, tag: u16, result: Option<i32>, addr: u64) -> io::Result<()> {
        QueueIo::queue_cmd(self, tag, result, addr)
    }
    fn submit_queued(&mut self) -> io::Result<()> {
        QueueIo::submit_queued(self)
    }
    fn wait(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        QueueIo::wait(self, out)
    }
    fn waker(&self) -> Box<dyn Fn() + Send + Sync> {
        let wake = self.wake();
        Box::new(move || wake.signal())
    }
}

/// The request `desc` describes, validated against the export: what the device is called for,
/// or the value to commit at once (the errno that stopped it on the way).
fn check(desc: Option<IoDesc>, cfg: &QueueConfig) -> Result<IoRequest, i32> {
    let desc = desc.ok_or(-nix::libc::EINVAL)?;
    let req = io_request(&desc).map_err(|e| commit_value(None, Err(e)))?;
    validate_io(&req, &cfg.export, cfg.max_io_len)
        .map_err(|e| commit_value(Some(req.op), Err(e)))?;
    Ok(req)
}

/// The value to commit for the request `desc` describes, whose data is (or goes) in `buf`:
/// validated against the export and dispatched to the device exactly as an NBD request is, or
/// the errno that stopped it on the way.
#[cfg(test)]
fn serve_request<D: BlockDevice + ?Sized>(
    desc: &IoDesc,
    buf: &mut [u8],
    cfg: &QueueConfig,
    dispatcher: &Dispatcher<'_, D>,
) -> i32 {
    match check(Some(*desc), cfg) {
        Ok(req) => commit_value(Some(req.op), dispatcher.dispatch(&req, buf)),
        Err(value) => value,
    }
}

/// Where a tag is.
#[derive(Debug)]
enum Tag {
    /// A command of the kernel's refers to the buffer: untouched until the tag's completion.
    Kernel(Vec<u8>),
    /// A worker or a task has the request and its buffer.
    Device,
    /// Aborted (or refused): nothing refers to it any more.
    Gone,
}

/// How requests reach the device, once the workers or the runtime are set up.
enum Serve<'a, 'd, D: ?Sized> {
    Inline(Dispatcher<'d, D>),
    Workers(&'a Jobs),
    Async {
        rt: tokio::runtime::Handle,
        device: &'a Arc<dyn crate::async_device::DynAsync>,
        poison_reads: bool,
    },
}

/// Sets up queue `cfg.q_id` on the char device `cdev`, fetches every tag, calls `ready` once
/// the kernel has every fetch (START_DEV may then be sent), and serves until every fetch is
/// aborted.
pub(crate) fn run_queue<D: BlockDevice + ?Sized>(
    cdev: BorrowedFd<'_>,
    cfg: &QueueConfig,
    dispatcher: Dispatcher<'_, D>,
    how: &How,
    ready: impl FnOnce(),
) -> Result<QueueStats, UblkError> {
    let q = cfg.q_id;
    let fail = |source| UblkError::Queue { queue: q, source };
    let _ = sys::set_io_flusher();
    let mut io = QueueIo::new(cdev, q, cfg.depth, RingFlags::wanted()).map_err(fail)?;
    serve_queue(&mut io, cfg, dispatcher, how, ready).map_err(fail)
}

/// [`run_queue`] on any [`Ring`]: starts the workers or finds the runtime `how` needs, then
/// serves until every tag is gone.
pub(crate) fn serve_queue<R: Ring, D: BlockDevice + ?Sized>(
    ring: &mut R,
    cfg: &QueueConfig,
    dispatcher: Dispatcher<'_, D>,
    how: &How,
    ready: impl FnOnce(),
) -> io::Result<QueueStats> {
    let returns = Arc::new(Returns::new(ring.waker()));
    match how {
        How::Inline => serve_tags(ring, cfg, &Serve::Inline(dispatcher), &returns, ready),
        How::Workers(n) => {
            let jobs = Jobs::default();
            thread::scope(|s| {
                serving::spawn_workers(s, *n, cfg.q_id, &jobs, &returns, dispatcher)?;
                let serve: Serve<'_, '_, D> = Serve::Workers(&jobs);
                let served = serve_tags(ring, cfg, &serve, &returns, ready);
                jobs.close();
                served
            })
        }
        How::Async {
            device,
            poison_reads,
        } => {
            let rt = device.runtime()?;
            let serve: Serve<'_, '_, D> = Serve::Async {
                rt,
                device,
                poison_reads: *poison_reads,
            };
            serve_tags(ring, cfg, &serve, &returns, ready)
        }
    }
}

fn abort_error(tag: u16, res: i32) -> io::Error {
    if res < 0 {
        io::Error::from_raw_os_error(-res)
    } else {
        io::Error::other(format!("unexpected result {res} for tag {tag}"))
    }
}

/// The loop: see the module documentation.
fn serve_tags<R: Ring, D: BlockDevice + ?Sized>(
    ring: &mut R,
    cfg: &QueueConfig,
    serve: &Serve<'_, '_, D>,
    returns: &Arc<Returns>,
    ready: impl FnOnce(),
) -> io::Result<QueueStats> {
    let depth = usize::from(cfg.depth);
    let mut tags: Vec<Tag> = Vec::with_capacity(depth);
    let mut stats = QueueStats::default();
    // Set below if a command may still be in flight when the loop ends.
    let mut ended: io::Result<()> = Ok(());
    for tag in 0..cfg.depth {
        let buf = vec![0u8; cfg.buf_len];
        let queued = ring.queue_cmd(tag, None, buf.as_ptr() as u64);
        tags.push(Tag::Kernel(buf));
        if let Err(e) = queued {
            ended = Err(e);
            break;
        }
    }
    if ended.is_ok() {
        ended = ring.submit_queued();
    }
    if ended.is_ok() {
        ready();
    }
    let mut live = if ended.is_ok() { depth } else { 0 };
    let mut lent = 0usize;
    let mut first_error: Option<io::Error> = None;
    let mut done: Vec<Completion> = Vec::with_capacity(depth);
    let mut back: Vec<Done> = Vec::with_capacity(depth);
    // Queues the commit of `tag` with `value` and its buffer: the tag is the kernel's again.
    let commit = |ring: &mut R, tags: &mut [Tag], tag: u16, value: i32, buf: Vec<u8>| {
        let queued = ring.queue_cmd(tag, Some(value), buf.as_ptr() as u64);
        tags[usize::from(tag)] = Tag::Kernel(buf);
        queued
    };
    while live > 0 && ended.is_ok() {
        done.clear();
        if let Err(e) = ring.wait(&mut done) {
            ended = Err(e);
            break;
        }
        for c in &done {
            let slot = tags.get_mut(usize::from(c.tag));
            let buf = match slot {
                Some(slot) if matches!(slot, Tag::Kernel(_)) => {
                    match std::mem::replace(slot, Tag::Gone) {
                        Tag::Kernel(buf) => buf,
                        _ => continue,
                    }
                }
                _ => {
                    // A completion for a tag the kernel does not hold: nothing to serve.
                    first_error.get_or_insert_with(|| {
                        io::Error::other(format!(
                            "completion {} for tag {} which had no command",
                            c.result, c.tag
                        ))
                    });
                    continue;
                }
            };
            if c.result != 0 {
                // Aborted (STOP_DEV, the device going away), or refused: the tag is gone, and
                // its buffer with it (no command refers to it now).
                live -= 1;
                if c.result != sys::IO_RES_ABORT {
                    first_error.get_or_insert_with(|| abort_error(c.tag, c.result));
                }
                continue;
            }
            stats.served += 1;
            let mut buf = buf;
            let req = match check(ring.desc(c.tag), cfg) {
                Ok(req) => req,
                Err(value) => {
                    if let Err(e) = commit(ring, &mut tags, c.tag, value, buf) {
                        ended = Err(e);
                        break;
                    }
                    continue;
                }
            };
            match serve {
                Serve::Inline(d) => {
                    let value = commit_value(Some(req.op), d.dispatch(&req, &mut buf));
                    if let Err(e) = commit(ring, &mut tags, c.tag, value, buf) {
                        ended = Err(e);
                        break;
                    }
                }
                Serve::Workers(jobs) => {
                    tags[usize::from(c.tag)] = Tag::Device;
                    lent += 1;
                    jobs.push(Job {
                        tag: c.tag,
                        req,
                        buf,
                    });
                }
                Serve::Async {
                    rt,
                    device,
                    poison_reads,
                } => {
                    tags[usize::from(c.tag)] = Tag::Device;
                    lent += 1;
                    serving::spawn_task(rt, device, *poison_reads, returns, c.tag, req, buf);
                }
            }
        }
        stats.max_in_flight = stats.max_in_flight.max(lent);
        if ended.is_err() {
            break;
        }
        back.clear();
        returns.take(&mut back);
        for d in back.drain(..) {
            lent -= 1;
            if let Err(e) = commit(ring, &mut tags, d.tag, d.value, d.buf) {
                ended = Err(e);
                break;
            }
        }
    }
    // On a ring error, what workers and tasks still hold comes back before the loop ends (it
    // cannot be committed: the kernel fails those requests when the ring closes).
    while lent > 0 {
        back.clear();
        returns.take_wait(&mut back);
        lent -= back.len().min(lent);
    }
    if ended.is_err() {
        // Commands may still be in flight: their buffers must never be freed.
        for tag in tags {
            if let Tag::Kernel(buf) = tag {
                std::mem::forget(buf);
            }
        }
    }
    match ended.err().or(first_error) {
        Some(e) => Err(e),
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
