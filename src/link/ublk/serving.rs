//! How a ublk queue serves the requests it fetched, and how their outcomes come back to it.
//!
//! - [`How::Inline`]: on the queue thread, one after the other, for a device that never blocks
//!   (RAM): the completions of one wait are served together and committed in one submission.
//! - [`How::Workers`]: a pool of threads per queue for any other sync device; each takes a
//!   [`Job`] (the request and the tag's buffer) and sends the outcome back as a [`Done`].
//! - [`How::Async`]: each request a task on the async device's tokio runtime, the tag's buffer
//!   lent as an owned [`IoBuf`] and given back with the result.
//!
//! Only the queue thread sends commands to the kernel (ublk refuses a queue's commands from any
//! other task): outcomes go through [`Returns`], whose first push after the queue thread took
//! the last batch wakes it through its ring.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;

use tokio::runtime::Handle;

use crate::async_device::{AsyncServing, DynAsync, IoBuf};
use crate::device::BlockDevice;
use crate::proto::Errno;
use crate::server::{Dispatcher, IoRequest, ServerOptions};

use super::frame::commit_value;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How a queue serves its requests: see the module documentation.
#[derive(Clone)]
pub(crate) enum How {
    Inline,
    /// This many threads (at least 2).
    Workers(usize),
    Async {
        device: Arc<dyn DynAsync>,
        poison_reads: bool,
    },
}

impl std::fmt::Debug for How {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            How::Inline => f.write_str("Inline"),
            How::Workers(n) => f.debug_tuple("Workers").field(n).finish(),
            How::Async { .. } => f.write_str("Async"),
        }
    }
}

impl How {
    /// For `device`, served with `options` on queues of `depth` tags: an async device as tasks;
    /// a device that never blocks (unless `batch_never_blocks` is off), or `workers` of 0 or 1,
    /// inline; any other with `workers` threads (no more than the tags).
    pub(crate) fn for_device<D: BlockDevice + ?Sized>(
        device: &D,
        options: &ServerOptions,
        depth: u16,
    ) -> How {
        if let Some(AsyncServing(device)) = device.asynchronous() {
            return How::Async {
                device,
                poison_reads: options.poison_reads,
            };
        }
        let workers = options.workers.min(usize::from(depth));
        if (options.batch_never_blocks && device.capabilities().never_blocks) || workers <= 1 {
            How::Inline
        } else {
            How::Workers(workers)
        }
    }
}

/// A request handed to a worker: its tag, the validated request, the tag's buffer.
#[derive(Debug)]
pub(crate) struct Job {
    pub(crate) tag: u16,
    pub(crate) req: IoRequest,
    pub(crate) buf: Vec<u8>,
}

/// A request served: the value to commit and the tag's buffer, holding a READ's data.
#[derive(Debug)]
pub(crate) struct Done {
    pub(crate) tag: u16,
    pub(crate) value: i32,
    pub(crate) buf: Vec<u8>,
}

/// The outcomes on their way back to the queue thread.
pub(crate) struct Returns {
    done: Mutex<Vec<Done>>,
    /// For the queue thread's last wait, on an error, when its ring can no longer wake it.
    any: Condvar,
    wake: Box<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for Returns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Returns")
            .field("waiting", &lock(&self.done).len())
            .finish_non_exhaustive()
    }
}

impl Returns {
    /// Outcomes whose arrival calls `wake` (which must make the queue thread's wait return).
    pub(crate) fn new(wake: impl Fn() + Send + Sync + 'static) -> Returns {
        Returns {
            done: Mutex::new(Vec::new()),
            any: Condvar::new(),
            wake: Box::new(wake),
        }
    }

    /// Hands `done` to the queue thread, waking it if it may be waiting (the first outcome
    /// since it took the last batch: the ones after find it awake, or about to take them).
    pub(crate) fn push(&self, done: Done) {
        let mut q = lock(&self.done);
        let first = q.is_empty();
        q.push(done);
        drop(q);
        self.any.notify_all();
        if first {
            (self.wake)();
        }
    }

    /// Moves every outcome that arrived into `into`.
    pub(crate) fn take(&self, into: &mut Vec<Done>) {
        into.append(&mut lock(&self.done));
    }

    /// Like [`take`](Self::take), but waits for at least one outcome.
    pub(crate) fn take_wait(&self, into: &mut Vec<Done>) {
        let mut q = lock(&self.done);
        while q.is_empty() {
            q = self.any.wait(q).unwrap_or_else(PoisonError::into_inner);
        }
        into.append(&mut q);
    }
}

/// The requests waiting for a worker.
#[derive(Debug, Default)]
pub(crate) struct Jobs {
    queue: Mutex<(VecDeque<Job>, bool)>,
    ready: Condvar,
}

impl Jobs {
    pub(crate) fn push(&self, job: Job) {
        lock(&self.queue).0.push_back(job);
        self.ready.notify_one();
    }

    /// No more jobs: each worker ends once the queue is empty.
    pub(crate) fn close(&self) {
        lock(&self.queue).1 = true;
        self.ready.notify_all();
    }

    fn pop(&self) -> Option<Job> {
        let mut q = lock(&self.queue);
        loop {
            if let Some(job) = q.0.pop_front() {
                return Some(job);
            }
            if q.1 {
                return None;
            }
            q = self.ready.wait(q).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// A worker: serves jobs until [`Jobs::close`]. A panic in the device is EIO (the dispatcher
/// catches it), and the buffer always comes back.
pub(crate) fn work<D: BlockDevice + ?Sized>(
    jobs: &Jobs,
    returns: &Returns,
    dispatcher: Dispatcher<'_, D>,
) {
    let _ = super::sys::set_io_flusher();
    while let Some(Job { tag, req, mut buf }) = jobs.pop() {
        let value = commit_value(Some(req.op), dispatcher.dispatch(&req, &mut buf));
        returns.push(Done { tag, value, buf });
    }
}

/// Starts `n` workers in `scope`; fails if none could start (fewer serve all the same).
pub(crate) fn spawn_workers<'scope, 'env, D: BlockDevice + ?Sized>(
    scope: &'scope thread::Scope<'scope, 'env>,
    n: usize,
    q_id: u16,
    jobs: &'env Jobs,
    returns: &'env Returns,
    dispatcher: Dispatcher<'env, D>,
) -> io::Result<()> {
    let mut started = 0;
    for w in 0..n {
        let spawned = thread::Builder::new()
            .name(format!("userblk-ublk-q{q_id}w{w}"))
            .spawn_scoped(scope, move || work(jobs, returns, dispatcher));
        match spawned {
            Ok(_) => started += 1,
            Err(e) if started == 0 => return Err(e),
            Err(_) => break,
        }
    }
    Ok(())
}

/// A tag lent to a task: answered EIO, with a fresh buffer, if the task ends without answering
/// (its future panicked past the dispatcher, or the runtime dropped it).
struct Lent {
    tag: u16,
    buf_len: usize,
    returns: Arc<Returns>,
    answered: bool,
}

impl Lent {
    fn answer(mut self, value: i32, buf: Vec<u8>) {
        self.answered = true;
        self.returns.push(Done {
            tag: self.tag,
            value,
            buf,
        });
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if !self.answered {
            self.returns.push(Done {
                tag: self.tag,
                value: -(Errno::EIO.0 as i32),
                buf: vec![0; self.buf_len],
            });
        }
    }
}

/// The buffer a task gave back, as a tag's buffer again: `buf_len` bytes whose first `len` are
/// the request's. A device may answer with a buffer of its own (as long as the request): its
/// bytes are copied into a fresh one then. `None` (the future panicked): a fresh buffer.
fn tag_buffer(back: Option<IoBuf>, buf_len: usize) -> Vec<u8> {
    let Some(back) = back else {
        return vec![0; buf_len];
    };
    let (data, len) = back.into_buffer().into_parts();
    if data.len() >= buf_len {
        return data;
    }
    let mut fresh = vec![0; buf_len];
    let n = len.min(data.len());
    fresh[..n].copy_from_slice(&data[..n]);
    fresh
}

/// Runs the request of `tag` as a task on `rt`: [`dispatch_async`](crate::server::dispatch_async)
/// on the device, the tag's buffer lent to it; the outcome goes to `returns`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn spawn_task(
    rt: &Handle,
    device: &Arc<dyn DynAsync>,
    poison_reads: bool,
    returns: &Arc<Returns>,
    tag: u16,
    req: IoRequest,
    buf: Vec<u8>,
) {
    let buf_len = buf.len();
    let lent = Lent {
        tag,
        buf_len,
        returns: Arc::clone(returns),
        answered: false,
    };
    let device = Arc::clone(device);
    rt.spawn(async move {
        let (result, back) = device.dispatch(req, IoBuf::from(buf), poison_reads).await;
        let value = commit_value(Some(req.op), result);
        lent.answer(value, tag_buffer(back, buf_len));
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemDevice;

    #[test]
    fn each_device_is_served_its_way() {
        let opts = ServerOptions::default();
        let ram = MemDevice::new(1 << 20);
        assert!(matches!(How::for_device(&ram, &opts, 64), How::Inline));
        let no_batch = ServerOptions {
            batch_never_blocks: false,
            workers: 6,
            ..opts
        };
        assert!(matches!(
            How::for_device(&ram, &no_batch, 64),
            How::Workers(6)
        ));
        // No more workers than tags; one worker is the queue thread itself.
        assert!(matches!(
            How::for_device(&ram, &no_batch, 4),
            How::Workers(4)
        ));
        let one = ServerOptions {
            workers: 1,
            ..no_batch
        };
        assert!(matches!(How::for_device(&ram, &one, 64), How::Inline));
        let dir = tempfile::tempdir().unwrap();
        let file = crate::FileDevice::create(dir.path().join("disk"), 1 << 20).unwrap();
        assert!(matches!(How::for_device(&file, &opts, 64), How::Workers(_)));
        let asynchronous = crate::AsyncDevice::new(MemDevice::new(1 << 20));
        assert!(matches!(
            How::for_device(&asynchronous, &opts, 64),
            How::Async { .. }
        ));
    }

    #[test]
    fn a_returned_buffer_becomes_a_tag_buffer_again() {
        let mut own = IoBuf::from(vec![3u8; 8192]);
        own.truncate(512);
        let back = tag_buffer(Some(own), 8192);
        assert_eq!(back.len(), 8192);
        // The device's own, shorter buffer: its data copied into a full-size one.
        let back = tag_buffer(Some(IoBuf::from(vec![9u8; 512])), 8192);
        assert_eq!(back.len(), 8192);
        assert_eq!(&back[..512], &[9u8; 512][..]);
        assert!(back[512..].iter().all(|&b| b == 0));
        assert_eq!(tag_buffer(None, 4096), vec![0u8; 4096]);
    }
}
