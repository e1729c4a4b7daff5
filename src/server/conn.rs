//! The NBD transmission loop: [`serve`] answers the requests of one export's connections with a
//! [`Dispatcher`], whatever carries the stream (the kernel's socket, a network client after its
//! handshake).
//!
//! Each connection has threads of its own (as nbdkit does) that take turns reading it: the one
//! whose turn it is reads the next request, checks it, takes memory for it from the pool, and
//! lets go, so that another reads while it calls the device. Replies therefore go out of order,
//! many requests are in flight, and no request waits for a hand-off between threads. A device
//! that never blocks gets two threads that write replies in batches, and the one calling the
//! device keeps its turn unless another request is already waiting (see [`serve`]).
//!
//! # The completion path
//!
//! A request read from the wire becomes an [`InFlight`]: its cookie, its buffer and a handle on
//! its connection's [`Outbox`]. Completing it, from any thread, queues its reply there; whoever
//! finds the connection's writer free writes every queued reply in one `writev`. An `InFlight`
//! dropped without being completed replies EIO, so every request gets exactly one reply
//! whichever way its handling ends.
//!
//! # Where an asynchronous device plugs in
//!
//! For a device whose [`asynchronous`](crate::BlockDevice::asynchronous) is `Some` (an
//! [`AsyncDevice`](crate::AsyncDevice)), [`serve`] hands the connections to `conn_async`: one
//! thread per connection reads and checks requests exactly as here, lends each request's buffer
//! to a task on the device's runtime and goes back to reading; the task completes the
//! `InFlight`, which only queues the reply for the connection's writer thread (a tokio worker
//! never waits on a socket). A device that never blocks has its futures polled by the reader
//! itself, which writes the replies of those ready in batches. Validation, the pool's byte
//! bound, reply batching and the exactly-one-reply rule are this file's; serving returns once
//! every task has finished and every reply is written.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use crate::async_device::IoBuf;
use crate::device::BlockDevice;
use crate::link::net::wire::{CMD_FLAG_DF, CMD_FLAG_FAST_ZERO, CMD_FLAG_REQ_ONE};
use crate::link::Export;
use crate::proto::Request;
use crate::proto::{Command, Cookie, Errno};
use crate::server::conn_async::{serve_async, Calls};
use crate::server::dispatch::{Dispatcher, IoResult};
use crate::server::pool::{lock, Buffer, BufferPool};
use crate::server::reader::{Incoming, RequestReader};
use crate::server::replies::{encode_extents, peer_gone, Done, Outbox, REPLIES_PER_WRITE};
use crate::server::request::{IoOp, IoRequest};
use crate::server::validate::{validate, validate_block_status};
use crate::server::{Features, ServerError, ServerOptions};

/// A byte stream the NBD loop can serve: it is read by one thread at a time, written by another,
/// and shut down from any, through clones of the same connection.
pub trait ConnStream: Read + Write + Send + Sync + Sized + 'static {
    /// Another handle on the same connection.
    fn try_clone(&self) -> io::Result<Self>;
    /// Ends the connection in both directions, waking a thread blocked reading it.
    fn shutdown(&self) -> io::Result<()>;
}

impl ConnStream for UnixStream {
    fn try_clone(&self) -> io::Result<UnixStream> {
        UnixStream::try_clone(self)
    }
    fn shutdown(&self) -> io::Result<()> {
        UnixStream::shutdown(self, Shutdown::Both)
    }
}

impl ConnStream for TcpStream {
    fn try_clone(&self) -> io::Result<TcpStream> {
        TcpStream::try_clone(self)
    }
    fn shutdown(&self) -> io::Result<()> {
        TcpStream::shutdown(self, Shutdown::Both)
    }
}

/// How the threads of a connection serve it.
#[derive(Clone, Copy, Debug)]
pub(super) struct ConnParams {
    export: Export,
    max_io: u32,
    /// Replies are held back while the connection has more requests buffered, and written
    /// together when the thread whose turn it is to read would wait, or `batch` are queued.
    /// Only for devices that never block: a reply held behind a slow device call would wait.
    hold_replies: bool,
    batch: usize,
    /// What a network client negotiated (nothing for the kernel).
    pub(super) features: Features,
    /// A thread keeps its turn at reading while it calls the device, unless another request is
    /// already buffered for another thread to take: for a device that never blocks, handing the
    /// turn over with nothing to read costs a wake-up and gains nothing, while calls still
    /// overlap whenever requests queue up.
    keep_idle_turn: bool,
}

/// State shared by every thread (and every [`InFlight`]) of one [`serve`].
#[derive(Debug)]
pub(super) struct Group<S> {
    outboxes: Vec<Outbox<S>>,
    /// Each connection's replies are written by a writer thread of its own (an async device:
    /// whoever completes a request only queues its reply); otherwise by whoever has one.
    writer_threads: bool,
    /// Clones of the connections, to shut them down without waiting for a writer.
    closers: Vec<S>,
    pub(super) pool: BufferPool,
    /// Set when serving must stop early (a fatal error on any connection).
    stop: AtomicBool,
    pub(super) error: Mutex<Option<ServerError>>,
}

impl<S: ConnStream> Group<S> {
    /// The group for `streams`, and the reading side of each; with `writer_threads`, replies
    /// are only queued for each connection's writer thread (see [`Outbox`]).
    #[allow(clippy::type_complexity)]
    pub(super) fn new(
        streams: &[S],
        max_in_flight_bytes: usize,
        writer_threads: bool,
    ) -> Result<(Arc<Group<S>>, Vec<Mutex<Reading<S>>>), ServerError> {
        let n = streams.len();
        let mut readers = Vec::with_capacity(n);
        let mut outboxes = Vec::with_capacity(n);
        let mut closers = Vec::with_capacity(n);
        for (conn, s) in streams.iter().enumerate() {
            let clone = || {
                s.try_clone()
                    .map_err(|source| ServerError::Io { conn, source })
            };
            readers.push(Mutex::new(Reading {
                r: RequestReader::new(clone()?),
                finished: false,
            }));
            outboxes.push(Outbox::new(clone()?));
            closers.push(clone()?);
        }
        let group = Group {
            outboxes,
            writer_threads,
            closers,
            pool: BufferPool::new(max_in_flight_bytes),
            stop: AtomicBool::new(false),
            error: Mutex::new(None),
        };
        Ok((Arc::new(group), readers))
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
            let _ = s.shutdown();
        }
    }

    fn fail_unless_stopping(&self, err: ServerError) {
        // Once another connection failed, this one's read error is only the shutdown's echo.
        if !self.stop.load(Ordering::SeqCst) {
            self.fail(err);
        }
    }

    /// Writes the connection's pending replies (and `own` first); see [`Outbox::flush`].
    pub(super) fn flush(&self, conn: usize, own: Option<Done>) {
        if let Err(e) = self.outboxes[conn].flush(&self.pool, own) {
            if !peer_gone(&e) {
                self.fail(ServerError::Io { conn, source: e });
            }
        }
    }

    /// Holds a reply back for the next [`flush`](Self::flush) (the thread holding it writes it,
    /// or waits for memory only after flushing); returns how many are held.
    pub(super) fn hold(&self, conn: usize, done: Done) -> usize {
        self.outboxes[conn].defer(done)
    }

    /// A connection's writer thread (with writer threads): writes its replies until
    /// [`close_writers`](Self::close_writers) and none is left. A write error other than the
    /// client's going away ends every connection, as on the threaded path.
    pub(super) fn write_replies(&self, conn: usize) {
        self.outboxes[conn].write_until_closed(&self.pool, |e| {
            if !peer_gone(&e) {
                self.fail(ServerError::Io { conn, source: e });
            }
        });
    }

    /// Tells every writer thread that no more replies will come: each ends once it has written
    /// what is queued.
    pub(super) fn close_writers(&self) {
        for outbox in &self.outboxes {
            outbox.close();
        }
    }

    /// Queues a reply and writes what is pending unless another thread is at it. Large READ
    /// data is written by the thread that produced it, from its warm cache. With writer
    /// threads, only queues it for the connection's writer: this never waits for a socket.
    pub(super) fn reply(&self, conn: usize, done: Done) {
        if self.writer_threads {
            self.outboxes[conn].queue(done);
        } else if done.is_large() {
            self.flush(conn, Some(done));
        } else {
            self.outboxes[conn].defer(done);
            self.flush(conn, None);
        }
    }
}

/// A request read from a connection and not yet answered: the handle its result is completed
/// through, from any thread. Dropped without [`complete`](Self::complete), it replies EIO.
#[derive(Debug)]
pub(crate) struct InFlight<S: ConnStream> {
    group: Arc<Group<S>>,
    conn: usize,
    cookie: Cookie,
    /// A successful reply carries the buffer as READ data.
    read: bool,
    /// Replies go out as structured chunks (a network client asked for them).
    structured: bool,
    /// The request's offset (a structured READ reply names it).
    offset: u64,
    /// `None` once answered, or while lent to an async device.
    buf: Option<Buffer>,
    /// The pool's charge for a buffer lent to an async device (it goes back with the reply
    /// whether or not the buffer does).
    lent: usize,
}

impl<S: ConnStream> InFlight<S> {
    /// The request's data buffer: a WRITE's payload, or where a READ's data goes.
    pub(crate) fn data(&mut self) -> &mut [u8] {
        match &mut self.buf {
            Some(b) => b.as_mut_slice(),
            None => &mut [],
        }
    }

    /// The request's buffer, lent to an async device; its charge stays here.
    pub(super) fn lend(&mut self) -> IoBuf {
        let mut buf = self.buf.take().unwrap_or_else(|| Buffer::lost(0));
        self.lent += buf.take_charge();
        IoBuf::from_buffer(buf)
    }

    /// Completes a request whose buffer was lent: `buf` is what came back (`None`: lost with a
    /// panicking future), whose data a successful READ replies with.
    pub(super) fn complete_lent(mut self, result: IoResult, buf: Option<IoBuf>) {
        if let Some(b) = buf {
            self.buf = Some(b.into_buffer());
        }
        self.complete(result);
    }

    /// The reply to a request whose buffer was lent (see [`complete_lent`](Self::complete_lent)),
    /// for the thread that has it to hold back.
    pub(super) fn into_lent_done(mut self, result: IoResult, buf: Option<IoBuf>) -> Option<Done> {
        if let Some(b) = buf {
            self.buf = Some(b.into_buffer());
        }
        self.into_done(result)
    }

    /// Completes a BLOCK_STATUS request with its descriptors for `context`, or an error.
    pub(super) fn complete_status(self, result: Result<Vec<u8>, Errno>, context: u32) {
        let (group, conn) = (Arc::clone(&self.group), self.conn);
        if let Some(done) = self.into_status(result, context) {
            group.reply(conn, done);
        }
    }

    /// The buffer to reply with, carrying the request's whole charge; `None` once answered.
    fn take_buffer(&mut self) -> Option<Buffer> {
        let lent = std::mem::take(&mut self.lent);
        match self.buf.take() {
            Some(mut b) => {
                b.add_charge(lent);
                Some(b)
            }
            None if lent > 0 => Some(Buffer::lost(lent)),
            None => None,
        }
    }

    /// Sends the reply for `result` on the request's connection (or queues it for the thread
    /// writing there). Any thread may call this.
    pub(crate) fn complete(self, result: IoResult) {
        let (group, conn) = (Arc::clone(&self.group), self.conn);
        if let Some(done) = self.into_done(result) {
            group.reply(conn, done);
        }
    }

    /// The reply for `result`, for the connection's own threads to write or hold back. (`None`
    /// only if already answered, which ownership rules out: the buffer is taken only by what
    /// consumes `self`.)
    fn into_done(mut self, result: IoResult) -> Option<Done> {
        let buf = self.take_buffer()?;
        let structured = self.structured;
        Some(match result {
            Ok(n) if self.read && n != buf.as_slice().len() => {
                // A READ must bring all its bytes: the protocol has no short read.
                Done::error_in(structured, self.cookie, Errno::EIO, buf)
            }
            Ok(_) if self.read && structured => Done::read_chunk(self.cookie, self.offset, buf),
            Ok(_) => Done::ok(self.cookie, self.read, buf),
            Err(errno) => Done::error_in(structured, self.cookie, errno, buf),
        })
    }

    /// The reply to a BLOCK_STATUS request: its descriptors for `context`, or an error chunk.
    fn into_status(mut self, result: Result<Vec<u8>, Errno>, context: u32) -> Option<Done> {
        let buf = self.take_buffer()?;
        Some(match result {
            Ok(descriptors) => Done::block_status(self.cookie, context, descriptors, buf),
            Err(errno) => Done::error_in(true, self.cookie, errno, buf),
        })
    }

    /// Gives the memory back without a reply, for a request whose stream broke before it was
    /// whole (a truncated WRITE payload): there is nobody left to reply to.
    fn abandon(mut self) {
        if let Some(b) = self.take_buffer() {
            self.group.pool.give(std::iter::once(b));
        }
    }
}

impl<S: ConnStream> Drop for InFlight<S> {
    fn drop(&mut self) {
        if let Some(buf) = self.take_buffer() {
            let done = Done::error_in(self.structured, self.cookie, Errno::EIO, buf);
            self.group.reply(self.conn, done);
        }
    }
}

/// What a thread got from its turn at reading a connection.
pub(super) enum Next<S: ConnStream> {
    /// A valid request for the device, its buffer in the `InFlight` (a WRITE's payload in it).
    Request(InFlight<S>, IoRequest),
    /// A request answered without the device.
    Rejected(InFlight<S>, Errno),
    /// A valid BLOCK_STATUS request, for the device's extents.
    Status(InFlight<S>, Request),
    /// DISC, EOF, a fatal error, or serving is stopping.
    Stop,
}

/// The reading side of one connection: one thread at a time reads the next request, then lets
/// go, so that another reads while it calls the device.
pub(super) struct Reading<S> {
    pub(super) r: RequestReader<S>,
    /// The stream has ended for every thread of this connection.
    pub(super) finished: bool,
}

/// Serves `streams`, the connections of one export already past any handshake, until each has
/// sent DISC or reached EOF, or one fails: a corrupt stream or a write error closes every one of
/// them and is returned. Requests are checked against `export` and `options.max_io_len`, and
/// what passes goes to `dispatcher`; in-flight memory is bounded by
/// `options.max_in_flight_bytes`.
///
/// Threads per connection: two that hold replies back and write them in batches for a device
/// whose capabilities say [`never_blocks`](crate::Capabilities::never_blocks) (unless
/// `options.batch_never_blocks` is off), the one calling the device keeping its turn at reading
/// unless another request is waiting, so that calls overlap whenever requests queue up and a
/// lone request costs no hand-off; `options.workers` otherwise (one, holding replies back, for
/// `0` or `1`). An async device's connections get a reader and a writer thread each, its
/// requests running as tasks on its runtime (see `conn_async`).
///
/// ```
/// use std::io::{Read, Write};
/// use std::os::unix::net::UnixStream;
/// use userblk::proto::{Command, Cookie, Reply, Request, REPLY_LEN};
/// use userblk::server::{export_of, serve, Dispatcher};
/// use userblk::{MemDevice, ServerOptions};
///
/// let dev = MemDevice::new(1 << 20);
/// let export = export_of(&dev)?;
/// let (mut client, server_end) = UnixStream::pair()?;
/// std::thread::scope(|s| {
///     let server = s.spawn(|| {
///         serve(Dispatcher::new(&dev), &export, &[server_end], &ServerOptions::default())
///     });
///     client.write_all(&Request::new(Command::Read, Cookie(7), 0, 512).encode())?;
///     let mut reply = [0u8; REPLY_LEN + 512];
///     client.read_exact(&mut reply)?;
///     assert_eq!(Reply::parse(&reply)?, Reply::ok(Cookie(7)));
///     client.write_all(&Request::new(Command::Disc, Cookie(8), 0, 0).encode())?;
///     server.join().unwrap()?;
///     Ok::<(), Box<dyn std::error::Error>>(())
/// })?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn serve<D: BlockDevice + ?Sized, S: ConnStream>(
    dispatcher: Dispatcher<'_, D>,
    export: &Export,
    streams: &[S],
    options: &ServerOptions,
) -> Result<(), ServerError> {
    serve_with(dispatcher, export, streams, options, Features::default())
}

/// [`serve`], with what a network client negotiated in its handshake.
pub(crate) fn serve_with<D: BlockDevice + ?Sized, S: ConnStream>(
    dispatcher: Dispatcher<'_, D>,
    export: &Export,
    streams: &[S],
    options: &ServerOptions,
    features: Features,
) -> Result<(), ServerError> {
    let asynchronous = dispatcher.device().asynchronous();
    let (group, readers) =
        Group::new(streams, options.max_in_flight_bytes, asynchronous.is_some())?;
    if let Some(device) = asynchronous {
        let params = ConnParams {
            export: *export,
            max_io: options.max_io_len,
            hold_replies: false,
            batch: REPLIES_PER_WRITE,
            features,
            keep_idle_turn: false,
        };
        let calls = Calls {
            poison_reads: options.poison_reads,
            inline: options.batch_never_blocks && dispatcher.device().capabilities().never_blocks,
        };
        return serve_async(device, &group, &readers, params, calls);
    }
    let never_blocks = dispatcher.device().capabilities().never_blocks;
    let (per_conn, hold_replies) = if options.batch_never_blocks && never_blocks {
        // Two threads: calls may overlap, and neither waits long for the other's turn.
        (2, true)
    } else {
        let workers = options.workers.max(1);
        (workers, workers == 1)
    };
    let params = ConnParams {
        export: *export,
        max_io: options.max_io_len,
        hold_replies,
        batch: REPLIES_PER_WRITE,
        features,
        keep_idle_turn: hold_replies,
    };
    thread::scope(|s| {
        'spawn: for (conn, reading) in readers.iter().enumerate() {
            for _ in 0..per_conn {
                let group = &group;
                let spawned = thread::Builder::new()
                    .name(format!("userblk-conn{conn}"))
                    .spawn_scoped(s, move || {
                        serve_turns(group, reading, conn, dispatcher, params);
                    });
                if let Err(source) = spawned {
                    // Closing every connection makes the threads already running stop too.
                    group.fail(ServerError::Io { conn, source });
                    break 'spawn;
                }
            }
        }
    });
    debug_assert_eq!(group.pool.in_flight(), 0, "a request was never answered");
    let error = lock(&group.error).take();
    match error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// One thread's share of serving a connection, until DISC, EOF or a fatal error: take a turn at
/// reading the next request, let go, call the device, reply; again.
fn serve_turns<D: BlockDevice + ?Sized, S: ConnStream>(
    group: &Arc<Group<S>>,
    reading: &Mutex<Reading<S>>,
    conn: usize,
    dispatcher: Dispatcher<'_, D>,
    params: ConnParams,
) {
    let outbox = &group.outboxes[conn];
    // About to wait (for the socket or for memory): what is held back must go out first, and
    // whoever completes a request meanwhile writes its reply itself.
    let before_wait = || {
        outbox.reader_waiting.store(true, Ordering::SeqCst);
        group.flush(conn, None);
    };
    let mut kept = None;
    loop {
        let mut turn = kept.take().unwrap_or_else(|| lock(reading));
        if turn.finished {
            break;
        }
        if params.hold_replies && !turn.r.has_header() {
            before_wait();
        }
        let next = next(group, conn, &mut turn.r, &params, before_wait);
        outbox.reader_waiting.store(false, Ordering::SeqCst);
        if matches!(next, Next::Stop) {
            turn.finished = true;
        }
        if params.keep_idle_turn && !turn.finished && !turn.r.has_header() {
            kept = Some(turn);
        } else {
            drop(turn);
        }
        let done = match next {
            Next::Stop => break,
            Next::Rejected(inflight, errno) => inflight.into_done(Err(errno)),
            Next::Request(mut inflight, io) => {
                let result = dispatcher.dispatch(&io, inflight.data());
                if !params.hold_replies {
                    inflight.complete(result);
                    continue;
                }
                inflight.into_done(result)
            }
            Next::Status(inflight, req) => {
                let result = dispatcher
                    .block_status(req.offset, u64::from(req.len))
                    .map(|e| encode_extents(&e, req.len, req.flags.contains(CMD_FLAG_REQ_ONE)));
                let context = params.features.block_status.unwrap_or_default();
                inflight.into_status(result, context)
            }
        };
        let Some(done) = done else {
            continue;
        };
        if !params.hold_replies {
            group.reply(conn, done);
            continue;
        }
        if done.is_large() {
            group.flush(conn, Some(done));
        } else if outbox.defer(done) >= params.batch || outbox.reader_waiting.load(Ordering::SeqCst)
        {
            group.flush(conn, None);
        }
    }
    group.flush(conn, None);
}

/// Reads the next request of a connection (the caller holds its turn) and checks it.
/// `before_wait` runs before waiting for memory.
pub(super) fn next<S: ConnStream>(
    group: &Arc<Group<S>>,
    conn: usize,
    r: &mut RequestReader<S>,
    params: &ConnParams,
    before_wait: impl FnOnce(),
) -> Next<S> {
    if group.stop.load(Ordering::Relaxed) {
        return Next::Stop;
    }
    let structured = params.features.structured;
    let in_flight = |cookie: Cookie, read: bool, offset: u64, buf: Buffer| InFlight {
        group: Arc::clone(group),
        conn,
        cookie,
        read,
        structured,
        offset,
        buf: Some(buf),
        lent: 0,
    };
    let mut req = match r.next_header(conn) {
        Ok(Incoming::Eof) => return Next::Stop,
        Ok(Incoming::Unknown { cookie }) => {
            return match group.pool.take(0, before_wait) {
                Some(buf) => Next::Rejected(in_flight(cookie, false, 0, buf), Errno::EINVAL),
                None => Next::Stop,
            };
        }
        Ok(Incoming::Request(req)) => req,
        Err(e) => {
            group.fail_unless_stopping(e);
            return Next::Stop;
        }
    };
    if req.command == Command::Disc {
        return Next::Stop;
    }
    if req.command == Command::BlockStatus && params.features.block_status.is_some() {
        let checked = validate_block_status(&req, &params.export);
        let Some(buf) = group.pool.take(0, before_wait) else {
            return Next::Stop;
        };
        let inflight = in_flight(req.cookie, false, req.offset, buf);
        return match checked {
            Ok(()) => Next::Status(inflight, req),
            Err(errno) => Next::Rejected(inflight, errno),
        };
    }
    // Flags a network client may send once they were advertised, with nothing left to do: the
    // device's write-zeroes is the fast one, and a READ is always one content chunk.
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
                group.fail_unless_stopping(e);
                return Next::Stop;
            }
            return match group.pool.take(0, before_wait) {
                Some(buf) => Next::Rejected(in_flight(req.cookie, false, 0, buf), errno),
                None => Next::Stop,
            };
        }
    };
    let Some(buf) = group.pool.take(io.data_len(), before_wait) else {
        return Next::Stop;
    };
    let mut inflight = in_flight(req.cookie, io.op == IoOp::Read, req.offset, buf);
    if io.op == IoOp::Write {
        if let Err(e) = r.payload(conn, &req, inflight.data()) {
            inflight.abandon();
            group.fail_unless_stopping(e);
            return Next::Stop;
        }
    }
    Next::Request(inflight, io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Request;
    use rstest::rstest;

    /// A pipelined burst: errors get no payload, every request one reply, in either mode.
    #[rstest]
    #[case::workers(4, 1 << 20)]
    #[case::one_thread(0, 1 << 20)]
    #[case::one_thread_one_request_at_a_time(0, 1)]
    #[case::workers_one_request_at_a_time(3, 1)]
    fn burst_of_good_and_bad_requests(#[case] workers: usize, #[case] max_in_flight_bytes: usize) {
        use crate::link::loopback::RawKernel;
        use crate::proto::encode_request;
        use crate::MemDevice;

        let options = ServerOptions {
            workers,
            max_in_flight_bytes,
            batch_never_blocks: false,
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

    /// Little memory shared by connections whose threads hold replies back: whoever runs short
    /// writes what it holds before waiting, so nobody waits for memory it holds itself. With a
    /// limit of one byte every request goes alone.
    #[rstest]
    #[case::one_thread(0, false)]
    #[case::threads(3, false)]
    #[case::never_blocks_pair(0, true)]
    fn scarce_memory_over_several_connections(#[case] workers: usize, #[case] batch: bool) {
        use crate::link::loopback::LoopbackKernel;
        use crate::{LoopbackOptions, MemDevice};

        let options = LoopbackOptions {
            connections: 3,
            max_request: 4096,
            server: ServerOptions {
                workers,
                max_in_flight_bytes: 1,
                batch_never_blocks: batch,
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

    /// The completion path: any thread completes a request into its connection, a dropped
    /// `InFlight` replies EIO, a short READ becomes EIO with no data, and every buffer goes back.
    #[test]
    fn requests_complete_from_any_thread_with_exactly_one_reply_each() {
        use crate::proto::{Reply, REPLY_LEN};
        use std::io::Read;

        let (mut kernel, server) = UnixStream::pair().unwrap();
        let (group, _readers) = Group::new(&[server], 1 << 20, false).unwrap();
        let take = |cookie: u64, read: bool, len: usize| InFlight {
            group: Arc::clone(&group),
            conn: 0,
            cookie: Cookie(cookie),
            read,
            structured: false,
            offset: 0,
            buf: Some(group.pool.take(len, || {}).unwrap()),
            lent: 0,
        };
        let mut read = take(1, true, 512);
        read.data().fill(9);
        let flush = take(2, false, 0);
        let short = take(3, true, 512);
        let forgotten = take(4, false, 0);
        std::thread::spawn(move || read.complete(Ok(512)))
            .join()
            .unwrap();
        std::thread::spawn(move || flush.complete(Err(Errno::ENOSPC)))
            .join()
            .unwrap();
        std::thread::spawn(move || short.complete(Ok(100)))
            .join()
            .unwrap();
        drop(forgotten);
        let reply = |kernel: &mut UnixStream, want: Reply| {
            let mut header = [0u8; REPLY_LEN];
            kernel.read_exact(&mut header).unwrap();
            assert_eq!(Reply::parse(&header).unwrap(), want);
        };
        reply(&mut kernel, Reply::ok(Cookie(1)));
        let mut data = [0u8; 512];
        kernel.read_exact(&mut data).unwrap();
        assert_eq!(data, [9; 512]);
        reply(&mut kernel, Reply::error(Cookie(2), Errno::ENOSPC));
        reply(&mut kernel, Reply::error(Cookie(3), Errno::EIO));
        reply(&mut kernel, Reply::error(Cookie(4), Errno::EIO));
        assert_eq!(group.pool.in_flight(), 0);
        // Nothing else was sent: no data after the error replies.
        drop(group);
        drop(_readers);
        let mut rest = Vec::new();
        kernel.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{} stray bytes", rest.len());
    }
}
