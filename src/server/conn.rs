//! The NBD transmission loop over the connections of one export: threads take turns reading a
//! connection, call the device, and reply.

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError, TryLockError};
use std::thread;

use crate::device::BlockDevice;
use crate::link::net::wire::{CMD_FLAG_DF, CMD_FLAG_FAST_ZERO, CMD_FLAG_REQ_ONE};
use crate::link::Export;
use crate::proto::{Command, Cookie, Errno, Request};
use crate::server::dispatch::Dispatcher;
use crate::server::pool::{lock, BufferPool, KEEP_FREE_BYTES};
use crate::server::reader::{Incoming, RequestReader};
use crate::server::replies::{
    encode_extents, peer_gone, write_replies, Done, Outbox, REPLIES_PER_WRITE, WRITE_OWN_REPLY,
};
use crate::server::request::{IoOp, IoRequest};
use crate::server::validate::{validate, validate_block_status};
use crate::server::{Features, ServerError, ServerOptions};

/// How the threads of a connection serve it.
#[derive(Clone, Copy)]
pub(super) struct ConnParams {
    export: Export,
    max_io: u32,
    /// One thread per connection: it holds replies back while more requests are buffered, and
    /// writes them together before it waits on the socket again. (With several threads a held
    /// reply could wait behind a thread blocked reading, so they never hold one back.)
    hold_replies: bool,
    /// Most replies held back before writing them; below the permits, so that a thread never
    /// waits for a permit it holds itself.
    batch: usize,
    /// What a network client negotiated (nothing for the kernel).
    features: Features,
}

/// What a thread got from its turn at reading a connection.
pub(super) enum Next {
    /// A valid request (its cookie, and what it asks of the device), with its permit and buffer
    /// (a WRITE's payload in it).
    Request(Cookie, IoRequest, Vec<u8>),
    /// A request answered without the device: an error reply.
    Answered(Done),
    /// A valid BLOCK_STATUS request (with its permit).
    Status(Request, Vec<u8>),
    /// DISC, EOF, a fatal error, or serving is stopping.
    Stop,
}

/// The reading side of one connection: one thread at a time reads the next request, then lets
/// go, so that another reads while it calls the device.
pub(super) struct Inbox {
    reading: Mutex<Reading>,
}

pub(super) struct Reading {
    r: RequestReader,
    /// The stream has ended for every thread of this connection.
    finished: bool,
}

/// State shared by the threads of one [`Server::run`].
pub(super) struct Shared<'a, D: ?Sized> {
    device: &'a D,
    inboxes: Vec<Inbox>,
    outboxes: Vec<Outbox>,
    /// Clones of the connections, to shut them down without waiting for a writer.
    closers: Vec<UnixStream>,
    pool: BufferPool,
    /// Set when serving must stop early (a fatal error on any connection).
    stop: AtomicBool,
    error: Mutex<Option<ServerError>>,
}

impl<D: BlockDevice + ?Sized> Shared<'_, D> {
    /// Queues a reply on its connection and writes what is pending unless another thread is at
    /// it. `spare` is the caller's own (empty) list, swapped with the pending one.
    pub(super) fn reply(&self, conn: usize, done: Done, spare: &mut Vec<Done>) {
        if done.with_data && done.buf.len() >= WRITE_OWN_REPLY {
            // Large data is written by the thread that just produced it, from its warm cache.
            self.flush(conn, Some(done), spare);
        } else {
            self.defer(conn, done);
            self.flush(conn, None, spare);
        }
    }

    /// Queues a reply on its connection for the next [`flush`](Self::flush).
    pub(super) fn defer(&self, conn: usize, done: Done) {
        lock(&self.outboxes[conn].pending).push(done);
    }

    /// Writes the connection's pending replies (and `own`, first) unless another thread is at it
    /// (then that thread writes them); waits for the writer only when there is `own` to write.
    pub(super) fn flush(&self, conn: usize, mut own: Option<Done>, spare: &mut Vec<Done>) {
        let outbox = &self.outboxes[conn];
        loop {
            let mut w = match own {
                Some(_) => lock(&outbox.writer),
                None => match outbox.writer.try_lock() {
                    Ok(w) => w,
                    Err(TryLockError::Poisoned(p)) => p.into_inner(),
                    // The holder writes our reply before it lets go (it checks `pending` after).
                    Err(TryLockError::WouldBlock) => return,
                },
            };
            let mut result = Ok(());
            if let Some(done) = own.take() {
                result = write_replies(&mut w, std::slice::from_ref(&done));
                self.pool.give(std::iter::once(done.buf));
            }
            loop {
                std::mem::swap(&mut *lock(&outbox.pending), spare);
                if spare.is_empty() {
                    break;
                }
                if result.is_ok() {
                    result = write_replies(&mut w, spare);
                }
                // After a failed write the rest are dropped: the connection is finished.
                self.pool.give(spare.drain(..).map(|d| d.buf));
            }
            drop(w);
            if let Err(e) = result {
                if !peer_gone(&e) {
                    self.fail(ServerError::Io { conn, source: e });
                }
            }
            // A reply queued while we were letting go would otherwise be stranded.
            if lock(&outbox.pending).is_empty() {
                return;
            }
        }
    }

    /// Records the first fatal error and closes every connection, so all readers stop.
    pub(super) fn fail(&self, err: ServerError) {
        let mut slot = lock(&self.error);
        if slot.is_none() {
            *slot = Some(err);
        }
        drop(slot);
        self.stop.store(true, Ordering::SeqCst);
        self.pool.close();
        for s in &self.closers {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Calls the device for a request and makes its reply.
    pub(super) fn complete(
        &self,
        cookie: Cookie,
        req: &IoRequest,
        mut buf: Vec<u8>,
        structured: bool,
    ) -> Done {
        match Dispatcher::new(self.device).dispatch(req, &mut buf) {
            Ok(_) if structured && req.op == IoOp::Read => {
                Done::read_chunk(cookie, req.offset, buf)
            }
            Ok(_) => Done::ok(cookie, req.op == IoOp::Read, buf),
            Err(errno) => Done::error(structured, cookie, errno, buf),
        }
    }

    /// Asks the device for a BLOCK_STATUS request's extents and makes its reply.
    fn status(&self, req: &Request, mut buf: Vec<u8>, features: Features) -> Done {
        let Some(context) = features.block_status else {
            return Done::error(features.structured, req.cookie, Errno::EINVAL, buf);
        };
        match Dispatcher::new(self.device).block_status(req.offset, u64::from(req.len)) {
            Ok(extents) => {
                let req_one = req.flags.contains(CMD_FLAG_REQ_ONE);
                encode_extents(&extents, req.len, req_one, &mut buf);
                Done::block_status(req.cookie, context, buf)
            }
            Err(errno) => Done::error(true, req.cookie, errno, buf),
        }
    }

    /// One thread's share of serving a connection, until DISC, EOF or a fatal error: take a turn
    /// at reading the next request, let go, call the device, reply; again.
    pub(super) fn serve(&self, conn: usize, params: ConnParams) {
        let mut spare = Vec::with_capacity(REPLIES_PER_WRITE);
        let mut held = 0;
        loop {
            let mut reading = lock(&self.inboxes[conn].reading);
            if held > 0 && (held >= params.batch || !reading.r.has_header()) {
                // About to wait on the socket, or enough gathered: out they go.
                self.flush(conn, None, &mut spare);
                held = 0;
            }
            let next = if reading.finished {
                Next::Stop
            } else {
                let spare = &mut spare;
                let flush_held = move || {
                    if held > 0 {
                        self.flush(conn, None, spare);
                    }
                };
                self.next(conn, &mut reading.r, &params, flush_held)
            };
            if matches!(next, Next::Stop) {
                reading.finished = true;
            }
            drop(reading);
            let done = match next {
                Next::Stop => break,
                Next::Answered(done) => done,
                Next::Request(cookie, req, buf) => {
                    self.complete(cookie, &req, buf, params.features.structured)
                }
                Next::Status(req, buf) => self.status(&req, buf, params.features),
            };
            if done.with_data && done.buf.len() >= WRITE_OWN_REPLY {
                self.flush(conn, Some(done), &mut spare);
                held = 0;
            } else if params.hold_replies {
                self.defer(conn, done);
                held += 1;
            } else {
                self.reply(conn, done, &mut spare);
            }
        }
        self.flush(conn, None, &mut spare);
    }

    /// Reads the next request of a connection (the caller holds its reading turn) and checks
    /// it. `flush_held` runs before waiting for a permit.
    pub(super) fn next(
        &self,
        conn: usize,
        r: &mut RequestReader,
        params: &ConnParams,
        flush_held: impl FnOnce(),
    ) -> Next {
        if self.stop.load(Ordering::Relaxed) {
            return Next::Stop;
        }
        let structured = params.features.structured;
        let mut req = match r.next_header(conn) {
            Ok(Incoming::Eof) => return Next::Stop,
            Ok(Incoming::Unknown { cookie }) => {
                return match self.pool.take(0, flush_held) {
                    Some(buf) => {
                        Next::Answered(Done::error(structured, cookie, Errno::EINVAL, buf))
                    }
                    None => Next::Stop,
                };
            }
            Ok(Incoming::Request(req)) => req,
            Err(e) => {
                self.fail_unless_stopping(e);
                return Next::Stop;
            }
        };
        if req.command == Command::Disc {
            return Next::Stop;
        }
        if req.command == Command::BlockStatus && params.features.block_status.is_some() {
            let checked = validate_block_status(&req, &params.export);
            let Some(buf) = self.pool.take(0, flush_held) else {
                return Next::Stop;
            };
            return match checked {
                Ok(()) => Next::Status(req, buf),
                Err(errno) => Next::Answered(Done::error(structured, req.cookie, errno, buf)),
            };
        }
        // Flags a network client may send once advertised, with nothing left to do for them:
        // the device's write-zeroes is the fast one, and a READ is always one chunk.
        if params.features.fast_zero && req.command == Command::WriteZeroes {
            req.flags.0 &= !CMD_FLAG_FAST_ZERO.0;
        }
        if params.features.df && req.command == Command::Read {
            req.flags.0 &= !CMD_FLAG_DF.0;
        }
        let io = match validate(&req, &params.export, params.max_io) {
            Ok(io) => io,
            Err(errno) => {
                if let Err(e) = r.skip(conn, &req) {
                    self.fail_unless_stopping(e);
                    return Next::Stop;
                }
                return match self.pool.take(0, flush_held) {
                    Some(buf) => Next::Answered(Done::error(structured, req.cookie, errno, buf)),
                    None => Next::Stop,
                };
            }
        };
        let Some(mut buf) = self.pool.take(io.data_len(), flush_held) else {
            return Next::Stop;
        };
        if req.command == Command::Write {
            if let Err(e) = r.payload(conn, &req, &mut buf) {
                self.pool.give(std::iter::once(buf));
                self.fail_unless_stopping(e);
                return Next::Stop;
            }
        }
        Next::Request(req.cookie, io, buf)
    }

    pub(super) fn fail_unless_stopping(&self, err: ServerError) {
        // Once another connection failed, this one's read error is only the shutdown's echo.
        if !self.stop.load(Ordering::SeqCst) {
            self.fail(err);
        }
    }
}

/// Serves `streams` (the connections of one export) until each has sent DISC or reached EOF, or
/// one fails; returns the first fatal error.
pub(super) fn serve<D: BlockDevice + ?Sized>(
    device: &D,
    export: &Export,
    streams: &[UnixStream],
    options: &ServerOptions,
    features: Features,
) -> Result<(), ServerError> {
    let n = streams.len();
    let mut inboxes = Vec::with_capacity(n);
    let mut outboxes = Vec::with_capacity(n);
    let mut closers = Vec::with_capacity(n);
    for (conn, s) in streams.iter().enumerate() {
        let clone = || {
            s.try_clone()
                .map_err(|source| ServerError::Io { conn, source })
        };
        inboxes.push(Inbox {
            reading: Mutex::new(Reading {
                r: RequestReader::new(clone()?),
                finished: false,
            }),
        });
        outboxes.push(Outbox {
            writer: Mutex::new(clone()?),
            pending: Mutex::new(Vec::with_capacity(REPLIES_PER_WRITE)),
        });
        closers.push(clone()?);
    }
    let inline = options.inline_never_blocks && device.capabilities().never_blocks;
    let per_conn = if inline { 1 } else { options.workers.max(1) };
    // Every request between its header and its reply holds a permit: one per thread, and
    // `queue_depth` more for replies waiting to be written.
    let in_flight = options.queue_depth.max(1) + n * per_conn;
    let params = ConnParams {
        export: *export,
        max_io: options.max_io_len,
        hold_replies: per_conn == 1,
        batch: REPLIES_PER_WRITE.min(in_flight),
        features,
    };
    let shared = Shared {
        device,
        inboxes,
        outboxes,
        closers,
        pool: BufferPool::new(in_flight, KEEP_FREE_BYTES),
        stop: AtomicBool::new(false),
        error: Mutex::new(None),
    };
    thread::scope(|s| {
        'spawn: for conn in 0..n {
            for _ in 0..per_conn {
                let shared = &shared;
                let spawned = thread::Builder::new()
                    .name(format!("userblk-conn{conn}"))
                    .spawn_scoped(s, move || shared.serve(conn, params));
                if let Err(source) = spawned {
                    // Closing every connection makes the threads already running stop too.
                    shared.fail(ServerError::Io { conn, source });
                    break 'spawn;
                }
            }
        }
    });
    let error = shared
        .error
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    match error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Cookie, Request};
    use rstest::rstest;

    /// A pipelined burst: errors get no payload, every request one reply, in either mode.
    #[rstest]
    #[case::workers(4, 256)]
    #[case::inline(0, 256)]
    #[case::inline_one_permit(0, 1)]
    fn burst_of_good_and_bad_requests(#[case] workers: usize, #[case] queue_depth: usize) {
        use crate::link::loopback::RawKernel;
        use crate::proto::encode_request;
        use crate::MemDevice;

        let options = ServerOptions {
            workers,
            queue_depth,
            ..ServerOptions::default()
        };
        let mut raw = RawKernel::with_options(MemDevice::new(1 << 20), options).unwrap();
        let mut burst = Vec::new();
        burst.extend(Request::new(Command::Read, Cookie(1), 1 << 20, 512).encode());
        burst.extend(encode_request(0x2560_9513, 42, Cookie(2), 0, 512));
        burst.extend(Request::new(Command::Write, Cookie(3), 4096, 512).encode());
        burst.extend([0x5a; 512]);
        burst.extend(Request::new(Command::Write, Cookie(4), 1 << 20, 512).encode());
        burst.extend([0xee; 512]);
        raw.send(&burst).unwrap();
        let mut got = std::collections::BTreeMap::new();
        for _ in 0..4 {
            let reply = raw.recv_reply().unwrap();
            got.insert(reply.cookie.0, reply.errno());
        }
        let want = [
            (1, Some(Errno::EINVAL)),
            (2, Some(Errno::EINVAL)),
            (3, None),
            (4, Some(Errno::ENOSPC)),
        ];
        assert_eq!(got.into_iter().collect::<Vec<_>>(), want);
        // The write landed, and a read returns it right behind its header.
        raw.send_request(&Request::new(Command::Read, Cookie(5), 4096, 512), &[])
            .unwrap();
        assert_eq!(raw.recv_reply().unwrap().errno(), None);
        assert_eq!(raw.recv_data(512).unwrap(), vec![0x5a; 512]);
        raw.disconnect().unwrap();
    }

    /// Few permits shared by connections whose threads hold replies back: whoever runs short
    /// writes what it holds before waiting, so nobody waits for permits it holds itself.
    #[rstest]
    #[case::inline(0)]
    #[case::threads(3)]
    fn scarce_permits_over_several_connections(#[case] workers: usize) {
        use crate::link::loopback::LoopbackKernel;
        use crate::{LoopbackOptions, MemDevice};

        let options = LoopbackOptions {
            connections: 3,
            max_request: 4096,
            server: ServerOptions {
                workers,
                queue_depth: 1,
                ..ServerOptions::default()
            },
            ..LoopbackOptions::default()
        };
        let k = LoopbackKernel::with_options(MemDevice::new(4 << 20), options).unwrap();
        let data: Vec<u8> = (0..2 << 20).map(|i| (i % 253) as u8).collect();
        k.write(0, &data).unwrap();
        assert_eq!(k.read(0, data.len()).unwrap(), data);
        k.shutdown().unwrap();
    }
}
