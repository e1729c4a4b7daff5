//! The NBD loop for an asynchronous device: each connection has one thread that reads requests,
//! checks them and takes their memory from the pool as the threaded loop does, then hands each
//! one, with its [`InFlight`], to a task on the device's tokio runtime and goes back to reading;
//! and one thread that writes its replies. The task awaits the device
//! ([`dispatch_async`](crate::server::dispatch_async)) and completes the `InFlight`, which only
//! queues the reply and wakes the writer thread: a tokio worker never waits on a socket, so a
//! client that stops reading its replies stalls its own writer thread and nothing else on the
//! runtime. The writer writes everything queued in one `writev`, so replies that complete
//! together leave together.
//!
//! What bounds the requests in flight: the kernel's queue depth, and the pool's bytes (a reader
//! that finds the pool full waits, and the kernel with it; a reply's memory goes back once it is
//! written, so a client that does not read stops its own reader). A task that panics answers
//! EIO; a task the runtime drops (shut down under it) drops its `InFlight`, which answers EIO
//! too. Serving returns once every connection has stopped, every task has finished and every
//! reply has been written (or its connection has failed).

use std::future::Future;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::thread;

use tokio::runtime::Handle;

use crate::async_device::{AsyncServing, DynAsync, IoBuf};
use crate::link::net::wire::CMD_FLAG_REQ_ONE;
use crate::server::conn::{next, ConnParams, ConnStream, Group, InFlight, Next, Reading};
use crate::server::pool::lock;
use crate::server::replies::{encode_extents, REPLIES_PER_WRITE};
use crate::server::{IoResult, ServerError};

/// The tasks of one serve still running.
#[derive(Debug, Default)]
struct Tasks {
    running: Mutex<usize>,
    idle: Condvar,
}

impl Tasks {
    fn start(self: &Arc<Tasks>) -> Running {
        *lock(&self.running) += 1;
        Running(Arc::clone(self))
    }

    fn wait_idle(&self) {
        let mut n = lock(&self.running);
        while *n > 0 {
            n = self.idle.wait(n).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// One running task; counted until dropped.
struct Running(Arc<Tasks>);

impl Drop for Running {
    fn drop(&mut self) {
        let mut n = lock(&self.0.running);
        *n -= 1;
        if *n == 0 {
            self.0.idle.notify_all();
        }
    }
}

/// A request handed to a task: its `InFlight` is answered (dropped: EIO) before the task stops
/// counting (fields drop in order).
struct Task<S: ConnStream> {
    inflight: InFlight<S>,
    _running: Running,
}

/// How requests reach an async device.
#[derive(Clone, Copy, Debug)]
pub(super) struct Calls {
    /// READ buffers are poisoned, not zeroed, before the device sees them.
    pub(super) poison_reads: bool,
    /// The device never blocks: the reader polls each request's future once itself (most are
    /// ready at once, and cost no task and no hand-off to a worker), holds the replies of those
    /// that are ready back and writes them in batches before it waits (for the socket or for
    /// memory), and spawns a task only for a future that is not ready.
    pub(super) inline: bool,
}

/// Serves the connections of `group` with the async device behind `device` (see the module
/// documentation). Errors as for [`serve`](crate::server::serve).
pub(super) fn serve_async<S: ConnStream>(
    device: AsyncServing,
    group: &Arc<Group<S>>,
    readers: &[Mutex<Reading<S>>],
    params: ConnParams,
    calls: Calls,
) -> Result<(), ServerError> {
    let device = device.0;
    let rt = device
        .runtime()
        .map_err(|source| ServerError::Io { conn: 0, source })?;
    let tasks = Arc::new(Tasks::default());
    thread::scope(|s| {
        let mut reading_threads = Vec::with_capacity(readers.len());
        for (conn, reading) in readers.iter().enumerate() {
            let (device, rt, tasks) = (&device, &rt, &tasks);
            let writer = thread::Builder::new()
                .name(format!("userblk-reply{conn}"))
                .spawn_scoped(s, move || group.write_replies(conn));
            if let Err(source) = writer {
                group.fail(ServerError::Io { conn, source });
                break;
            }
            let spawned = thread::Builder::new()
                .name(format!("userblk-conn{conn}"))
                .spawn_scoped(s, move || {
                    let mut turn = lock(reading);
                    read_requests(group, &mut turn, conn, device, rt, tasks, params, calls);
                    turn.finished = true;
                });
            match spawned {
                Ok(t) => reading_threads.push(t),
                Err(source) => {
                    group.fail(ServerError::Io { conn, source });
                    break;
                }
            }
        }
        for t in reading_threads {
            let _ = t.join();
        }
        // Every reply is queued once every task has finished (a task's `InFlight` is answered
        // before it stops counting): the writers write what is left and end.
        tasks.wait_idle();
        group.close_writers();
    });
    debug_assert_eq!(
        group.pool.in_flight(),
        0,
        "a request's memory never came back"
    );
    let error = lock(&group.error).take();
    match error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Reads one connection until DISC, EOF or a fatal error, spawning a task per request.
#[allow(clippy::too_many_arguments)]
fn read_requests<S: ConnStream>(
    group: &Arc<Group<S>>,
    turn: &mut Reading<S>,
    conn: usize,
    device: &Arc<dyn DynAsync>,
    rt: &Handle,
    tasks: &Arc<Tasks>,
    params: ConnParams,
    calls: Calls,
) {
    // A future polled here may reach for the runtime (a timer, a socket).
    let _runtime = calls.inline.then(|| rt.enter());
    loop {
        // Replies held back (inline calls) go out before waiting for the socket or for memory
        // (their memory may be what is missing); the writer thread writes the tasks' replies.
        let flush_held = || {
            if calls.inline {
                group.flush(conn, None);
            }
        };
        if !turn.r.has_header() {
            flush_held();
        }
        match next(group, conn, &mut turn.r, &params, flush_held) {
            Next::Stop => break,
            Next::Rejected(inflight, errno) => inflight.complete(Err(errno)),
            Next::Request(mut inflight, io) if calls.inline => {
                let buf = inflight.lend();
                let device = Arc::clone(device);
                let poison = calls.poison_reads;
                let mut call = Box::pin(async move { device.dispatch(io, buf, poison).await });
                if let Poll::Ready((result, buf)) =
                    call.as_mut().poll(&mut Context::from_waker(Waker::noop()))
                {
                    // Held back and written in batches, as the threads of a sync device that
                    // never blocks do.
                    if let Some(done) = inflight.into_lent_done(result, buf) {
                        if group.hold(conn, done) >= REPLIES_PER_WRITE {
                            group.flush(conn, None);
                        }
                    }
                    continue;
                }
                // Not ready: a task polls it again (with a waker that works) from here on.
                let task = Task {
                    inflight,
                    _running: tasks.start(),
                };
                rt.spawn(async move {
                    let (result, buf) = call.await;
                    finish(task, result, buf);
                });
            }
            Next::Request(mut inflight, io) => {
                let buf = inflight.lend();
                let task = Task {
                    inflight,
                    _running: tasks.start(),
                };
                let device = Arc::clone(device);
                let poison = calls.poison_reads;
                rt.spawn(async move {
                    let (result, buf) = device.dispatch(io, buf, poison).await;
                    finish(task, result, buf);
                });
            }
            Next::Status(inflight, req) => {
                let task = Task {
                    inflight,
                    _running: tasks.start(),
                };
                let device = Arc::clone(device);
                let context = params.features.block_status.unwrap_or_default();
                rt.spawn(async move {
                    let result = device
                        .block_status(req.offset, u64::from(req.len))
                        .await
                        .map(|e| encode_extents(&e, req.len, req.flags.contains(CMD_FLAG_REQ_ONE)));
                    let Task { inflight, _running } = task;
                    inflight.complete_status(result, context);
                });
            }
        }
    }
    if calls.inline {
        group.flush(conn, None);
    }
}

fn finish<S: ConnStream>(task: Task<S>, result: IoResult, buf: Option<IoBuf>) {
    let Task { inflight, _running } = task;
    inflight.complete_lent(result, buf);
}

#[cfg(test)]
mod tests;
