//! [`Server`]: reads NBD requests from a [`KernelLink`]'s sockets, validates them, calls the
//! [`BlockDevice`] and writes the replies.
//!
//! [`Server::run`] serves every connection at once, each with threads of its own (as nbdkit
//! does): the threads of a connection take turns reading the next request; the one that read it
//! lets go, so that another reads while it calls the device, and replies as soon as the device
//! answers. So replies go out of order, many requests are in flight, and no request waits for a
//! hand-off between threads. [`Server::handle_one`] does exactly one request, synchronously, for
//! tests that drive the protocol step by step.
//!
//! The hot path, per request in steady state: no heap allocation (request buffers are recycled
//! and bounded by permits: at most `queue_depth` plus one per thread between their header and
//! their reply, after which reading stops and the kernel waits); no copy but the device's own
//! (WRITE payloads go from the socket straight into the buffer the device gets, READ data from
//! that buffer to the socket); one `read` takes every request that has arrived; replies that
//! complete together leave in one `writev`, header and READ data side by side, and no thread
//! waits for another's `writev` unless it has large data of its own to send.
//!
//! The rules it keeps: the device never sees a request outside its size, misaligned, empty, or
//! for a command it did not advertise; every request gets exactly one reply; no payload follows an
//! error reply; nothing the socket brings makes it panic.

use std::io::{self, IoSlice, Read};
use std::os::unix::net::UnixStream;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError, TryLockError};
use std::thread;

use crate::device::{BlockDevice, Capabilities};
use crate::link::{Export, KernelLink, LinkError};
use crate::proto::{
    Command, CommandFlags, Cookie, Errno, ParseError, Reply, Request, TransmissionFlags,
    MAX_IO_LEN, REPLY_LEN, REQUEST_LEN,
};
use crate::stream::{read_full, write_all_vectored};

/// Tuning for a [`Server`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerOptions {
    /// Threads serving each connection, each calling the device for one request at a time.
    /// Default: twice the CPUs, between 4 and 16.
    ///
    /// `0` or `1`: one thread per connection, which also holds replies back while more requests
    /// are already buffered and writes them together. The least overhead per request for a
    /// device that never blocks (RAM); concurrency then comes from the connections alone.
    pub workers: usize,
    /// Replies that may wait to be written, over all connections. At most this many requests
    /// plus one per thread are between their header and their reply (each holding its data
    /// buffer); then reading stops until replies have gone out (back-pressure), so memory stays
    /// bounded however long the run. Default: 256.
    pub queue_depth: usize,
    /// The largest READ or WRITE accepted; larger ones get EINVAL. Default: [`MAX_IO_LEN`].
    pub max_io_len: u32,
    /// Serve a device whose capabilities say [`never_blocks`](Capabilities::never_blocks) with
    /// one thread per connection, whatever `workers` says. Default: `true`.
    pub inline_never_blocks: bool,
}

impl Default for ServerOptions {
    fn default() -> ServerOptions {
        let cpus = thread::available_parallelism().map_or(2, |n| n.get());
        ServerOptions {
            workers: (2 * cpus).clamp(4, 16),
            queue_depth: 256,
            max_io_len: MAX_IO_LEN,
            inline_never_blocks: true,
        }
    }
}

/// Why serving stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The device's geometry cannot be served.
    #[error("invalid device geometry: {0}")]
    InvalidGeometry(String),
    /// The link could not start or finish.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// A request header was corrupt: the stream is out of sync and the connection was closed.
    #[error("corrupt request stream on connection {conn}: {source}")]
    Protocol {
        /// Index of the connection.
        conn: usize,
        /// What was wrong.
        #[source]
        source: ParseError,
    },
    /// The stream ended inside a WRITE's payload.
    #[error("connection {conn} ended after {got} of {expected} payload bytes of WRITE {cookie}")]
    TruncatedPayload {
        /// Index of the connection.
        conn: usize,
        /// The WRITE's cookie.
        cookie: Cookie,
        /// Payload length announced.
        expected: u32,
        /// Bytes received.
        got: usize,
    },
    /// Reading or writing a connection failed.
    #[error("i/o error on connection {conn}: {source}")]
    Io {
        /// Index of the connection.
        conn: usize,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// What [`Server::handle_one`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// A request was answered, successfully (`error: None`) or not.
    Replied {
        /// The request's cookie.
        cookie: Cookie,
        /// Its command, `None` for an unknown command number.
        command: Option<Command>,
        /// The errno sent, if any.
        error: Option<Errno>,
    },
    /// DISC arrived: the device was unmounted and the link finished.
    Disconnected,
    /// The link reached EOF: the device was unmounted and the link finished.
    Eof,
}

/// Checks a request against the export before the device sees it; `Err` is the errno to reply.
///
/// Errors follow the NBD protocol document: EPERM for any write on a read-only export, ENOSPC
/// for a write past the end, EINVAL for a read or trim past the end, a misaligned or empty
/// request, a command that was not advertised, or unknown flags.
pub fn validate(req: &Request, export: &Export, max_io_len: u32) -> Result<(), Errno> {
    let flags = export.flags;
    if req.flags.unknown() != 0 {
        return Err(Errno::EINVAL);
    }
    if req.flags.contains(CommandFlags::NO_HOLE) && req.command != Command::WriteZeroes {
        return Err(Errno::EINVAL);
    }
    let is_write = matches!(
        req.command,
        Command::Write | Command::Trim | Command::WriteZeroes
    );
    if is_write && flags.contains(TransmissionFlags::READ_ONLY) {
        return Err(Errno::EPERM);
    }
    let advertised = match req.command {
        Command::Read | Command::Write | Command::Disc => true,
        Command::Flush => flags.contains(TransmissionFlags::SEND_FLUSH),
        Command::Trim => flags.contains(TransmissionFlags::SEND_TRIM),
        Command::WriteZeroes => flags.contains(TransmissionFlags::SEND_WRITE_ZEROES),
        Command::Cache | Command::BlockStatus => false,
    };
    if !advertised {
        return Err(Errno::EINVAL);
    }
    if matches!(req.command, Command::Disc | Command::Flush) {
        return Ok(());
    }
    let bs = u64::from(export.block_size);
    if req.len == 0 || req.offset % bs != 0 || u64::from(req.len) % bs != 0 {
        return Err(Errno::EINVAL);
    }
    if matches!(req.command, Command::Read | Command::Write) && req.len > max_io_len {
        return Err(Errno::EINVAL);
    }
    if req.exceeds(export.size) {
        return Err(match req.command {
            Command::Write | Command::WriteZeroes => Errno::ENOSPC,
            _ => Errno::EINVAL,
        });
    }
    Ok(())
}

/// Calls the device for a validated request. `buf` holds a WRITE's payload, or receives a READ's
/// data (it is `req.len` long). A panic in the device becomes EIO.
fn execute<D: BlockDevice + ?Sized>(
    device: &D,
    req: &Request,
    buf: &mut [u8],
) -> Result<(), Errno> {
    let fua = req.flags.contains(CommandFlags::FUA);
    let off = req.offset;
    let len = u64::from(req.len);
    let result = panic::catch_unwind(AssertUnwindSafe(|| match req.command {
        Command::Read => device.read(off, buf),
        Command::Write if fua => device.write_fua(off, buf),
        Command::Write => device.write(off, buf),
        Command::Flush => device.flush(),
        Command::Trim => device.trim(off, len).and_then(|()| flush_if(device, fua)),
        Command::WriteZeroes => {
            let may_trim = !req.flags.contains(CommandFlags::NO_HOLE);
            device
                .write_zeroes(off, len, may_trim)
                .and_then(|()| flush_if(device, fua))
        }
        // Rejected by `validate`; never reaches here.
        Command::Disc | Command::Cache | Command::BlockStatus => {
            Err(io::Error::from_raw_os_error(22))
        }
    }));
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Errno::from_io_error(&e)),
        Err(_) => Err(Errno::EIO),
    }
}

fn flush_if<D: BlockDevice + ?Sized>(device: &D, fua: bool) -> io::Result<()> {
    if fua {
        device.flush()
    } else {
        Ok(())
    }
}

/// Writes a reply header and, on success, its data, in one `writev` where the socket allows.
fn send_reply(w: &mut UnixStream, reply: Reply, data: &[u8]) -> io::Result<()> {
    let header = reply.encode();
    let data = if reply.error == 0 { data } else { &[] };
    write_all_vectored(w, &mut [IoSlice::new(&header), IoSlice::new(data)])
}

/// A reply write that failed because the kernel side went away: nothing is left to tell it.
fn peer_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected
    )
}

/// What the reader found next on a connection.
enum Incoming {
    /// A clean EOF before any header byte.
    Eof,
    /// A request header (payload not yet read).
    Request(Request),
    /// A sound header with an unknown command: reply EINVAL and go on.
    Unknown { cookie: Cookie },
}

/// Reads exactly one request header, unbuffered (for [`Server::handle_one`]).
fn read_header(r: &mut UnixStream, conn: usize) -> Result<Incoming, ServerError> {
    let mut header = [0u8; REQUEST_LEN];
    let got = read_full(r, &mut header).map_err(|source| ServerError::Io { conn, source })?;
    if got == 0 {
        return Ok(Incoming::Eof);
    }
    parse_header(&header[..got], conn)
}

fn parse_header(header: &[u8], conn: usize) -> Result<Incoming, ServerError> {
    match Request::parse(header) {
        Ok(req) => Ok(Incoming::Request(req)),
        Err(ParseError::UnknownCommand { cookie, .. }) => Ok(Incoming::Unknown { cookie }),
        Err(source) => Err(ServerError::Protocol { conn, source }),
    }
}

/// Reads a WRITE's payload into `buf`, or fails with `TruncatedPayload`.
fn read_payload(
    r: &mut UnixStream,
    conn: usize,
    req: &Request,
    buf: &mut [u8],
) -> Result<(), ServerError> {
    let got = read_full(r, buf).map_err(|source| ServerError::Io { conn, source })?;
    if got < buf.len() {
        return Err(ServerError::TruncatedPayload {
            conn,
            cookie: req.cookie,
            expected: req.len,
            got,
        });
    }
    Ok(())
}

/// Reads and discards the payload of a rejected WRITE, to keep the stream in sync.
fn skip_payload(r: &mut UnixStream, conn: usize, req: &Request) -> Result<(), ServerError> {
    let mut scratch = [0u8; 64 << 10];
    let mut left = req.payload_len();
    while left > 0 {
        let n = left.min(scratch.len());
        let got =
            read_full(r, &mut scratch[..n]).map_err(|source| ServerError::Io { conn, source })?;
        if got < n {
            return Err(ServerError::TruncatedPayload {
                conn,
                cookie: req.cookie,
                expected: req.len,
                got: req.payload_len() - left + got,
            });
        }
        left -= n;
    }
    Ok(())
}

/// How many request bytes a reader takes from the socket at once: every header (and small
/// payload) that has arrived, so that a deep queue costs one `read` for many requests.
const READ_AHEAD: usize = 64 << 10;

/// Free buffers kept for reuse beyond those in flight, in bytes: enough for a queue of 128 KiB
/// requests (the kernel's default split) without allocating, and a bound on idle memory.
const KEEP_FREE_BYTES: usize = 32 << 20;

/// READ data from this size on is written by the thread that read it, not gathered with others.
const WRITE_OWN_REPLY: usize = 64 << 10;

/// Replies gathered into one `writev` (two slices each: header and READ data).
const REPLIES_PER_WRITE: usize = 32;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The permits that bound how many requests are in flight, and the recycled buffers they carry.
///
/// A reader takes a permit (with a buffer for READ or WRITE data) for every request it reads,
/// and the permit comes back once the reply is written. So the memory held is at most `limit`
/// requests' data whatever the length of the run, a reader out of permits waits (back-pressure:
/// further requests stay in the socket), and buffers are reused, so steady-state serving does not
/// allocate.
struct BufferPool {
    state: Mutex<PoolState>,
    freed: Condvar,
    limit: usize,
    keep_bytes: usize,
}

struct PoolState {
    free: Vec<Vec<u8>>,
    free_bytes: usize,
    in_use: usize,
    /// Readers waiting for a permit: only then does `give` pay for a wake-up.
    waiting: usize,
    closed: bool,
}

impl BufferPool {
    fn new(limit: usize, keep_bytes: usize) -> BufferPool {
        BufferPool {
            state: Mutex::new(PoolState {
                free: Vec::with_capacity(limit),
                free_bytes: 0,
                in_use: 0,
                waiting: 0,
                closed: false,
            }),
            freed: Condvar::new(),
            limit: limit.max(1),
            keep_bytes,
        }
    }

    /// Waits for a permit, then returns a buffer of exactly `len` bytes (contents unspecified).
    /// `None` once the pool is closed. `before_wait` runs (once, without the pool's lock) before
    /// waiting: the caller writes the replies it holds back, whose permits may be the ones
    /// missing.
    fn take(&self, len: usize, before_wait: impl FnOnce()) -> Option<Vec<u8>> {
        let mut st = lock(&self.state);
        if st.in_use >= self.limit && !st.closed {
            drop(st);
            before_wait();
            st = lock(&self.state);
        }
        while st.in_use >= self.limit && !st.closed {
            st.waiting += 1;
            st = self.freed.wait(st).unwrap_or_else(PoisonError::into_inner);
            st.waiting -= 1;
        }
        if st.closed {
            return None;
        }
        st.in_use += 1;
        let mut buf = Vec::new();
        if len > 0 {
            // The most recently returned buffer that fits: the same size in a steady workload,
            // and still warm in the cache.
            if let Some(i) = st.free.iter().rposition(|b| b.capacity() >= len) {
                buf = st.free.swap_remove(i);
                st.free_bytes -= buf.capacity();
            }
        }
        drop(st);
        buf.resize(len, 0);
        Some(buf)
    }

    /// Returns the permits (and buffers) of finished requests.
    fn give(&self, bufs: impl Iterator<Item = Vec<u8>>) {
        // A buffer beyond `keep_bytes` (rare: sizes changed) is freed after the lock is released.
        let mut surplus = None;
        let mut st = lock(&self.state);
        for buf in bufs {
            st.in_use -= 1;
            let cap = buf.capacity();
            if cap == 0 {
                continue;
            }
            if st.free_bytes + cap <= self.keep_bytes {
                st.free_bytes += cap;
                st.free.push(buf);
            } else {
                surplus = Some(buf);
            }
        }
        let wake = st.waiting > 0;
        drop(st);
        if wake {
            self.freed.notify_one();
        }
        drop(surplus);
    }

    /// Refuses further permits and wakes the readers waiting for one.
    fn close(&self) {
        lock(&self.state).closed = true;
        self.freed.notify_all();
    }
}

/// How the threads of a connection serve it.
#[derive(Clone, Copy)]
struct ConnParams {
    export: Export,
    max_io: u32,
    /// One thread per connection: it holds replies back while more requests are buffered, and
    /// writes them together before it waits on the socket again. (With several threads a held
    /// reply could wait behind a thread blocked reading, so they never hold one back.)
    hold_replies: bool,
    /// Most replies held back before writing them; below the permits, so that a thread never
    /// waits for a permit it holds itself.
    batch: usize,
}

/// What a thread got from its turn at reading a connection.
enum Next {
    /// A valid request, with its permit and buffer (a WRITE's payload in it).
    Request(Request, Vec<u8>),
    /// A request answered without the device: an error reply.
    Answered(Done),
    /// DISC, EOF, a fatal error, or serving is stopping.
    Stop,
}

/// The reading side of one connection: one thread at a time reads the next request, then lets
/// go, so that another reads while it calls the device.
struct Inbox {
    reading: Mutex<Reading>,
}

struct Reading {
    r: RequestReader,
    /// The stream has ended for every thread of this connection.
    finished: bool,
}

/// A reply ready to go out, with the permit (and buffer) of its request.
struct Done {
    header: [u8; REPLY_LEN],
    /// Whether `buf` is the READ data that follows the header. Never after an error.
    with_data: bool,
    buf: Vec<u8>,
}

impl Done {
    fn error(cookie: Cookie, errno: Errno, buf: Vec<u8>) -> Done {
        Done {
            header: Reply::error(cookie, errno).encode(),
            with_data: false,
            buf,
        }
    }
}

/// Writes replies in as few `writev` calls as the slices allow.
fn write_replies(w: &mut UnixStream, replies: &[Done]) -> io::Result<()> {
    let mut iov = [IoSlice::new(&[]); 2 * REPLIES_PER_WRITE];
    for group in replies.chunks(REPLIES_PER_WRITE) {
        let mut n = 0;
        for d in group {
            iov[n] = IoSlice::new(&d.header);
            n += 1;
            if d.with_data && !d.buf.is_empty() {
                iov[n] = IoSlice::new(&d.buf);
                n += 1;
            }
        }
        write_all_vectored(w, &mut iov[..n])?;
    }
    Ok(())
}

/// The sending side of one connection.
///
/// Whoever has a reply puts it in `pending` and, if `writer` is free, writes everything pending
/// in one go; if `writer` is busy its holder writes the new reply too before it lets go. So no
/// thread waits for another's `writev`, and replies that complete together leave together.
struct Outbox {
    writer: Mutex<UnixStream>,
    pending: Mutex<Vec<Done>>,
}

/// Reads one connection's requests through a buffer, so that a queue of small requests costs
/// one `read` for many; large payloads go straight from the socket into their request's buffer.
struct RequestReader {
    sock: UnixStream,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl RequestReader {
    fn new(sock: UnixStream) -> RequestReader {
        RequestReader {
            sock,
            buf: vec![0u8; READ_AHEAD].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Reads whatever the socket has (at least one byte, or 0 at EOF) after the buffered bytes.
    fn fill(&mut self, conn: usize) -> Result<usize, ServerError> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        loop {
            match self.sock.read(&mut self.buf[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(ServerError::Io { conn, source }),
            }
        }
    }

    /// Whether a whole request header is buffered (the next one needs no `read`).
    fn has_header(&self) -> bool {
        self.end - self.start >= REQUEST_LEN
    }

    fn next_header(&mut self, conn: usize) -> Result<Incoming, ServerError> {
        while self.end - self.start < REQUEST_LEN {
            if self.fill(conn)? == 0 {
                if self.start == self.end {
                    return Ok(Incoming::Eof);
                }
                let source = ParseError::ShortHeader {
                    len: self.end - self.start,
                };
                return Err(ServerError::Protocol { conn, source });
            }
        }
        let header = &self.buf[self.start..self.start + REQUEST_LEN];
        self.start += REQUEST_LEN;
        parse_header(header, conn)
    }

    /// Fills `out` with a WRITE's payload: what is buffered, then straight from the socket.
    fn payload(&mut self, conn: usize, req: &Request, out: &mut [u8]) -> Result<(), ServerError> {
        let have = (self.end - self.start).min(out.len());
        out[..have].copy_from_slice(&self.buf[self.start..self.start + have]);
        self.start += have;
        let got = read_full(&mut self.sock, &mut out[have..])
            .map_err(|source| ServerError::Io { conn, source })?;
        if have + got < out.len() {
            return Err(ServerError::TruncatedPayload {
                conn,
                cookie: req.cookie,
                expected: req.len,
                got: have + got,
            });
        }
        Ok(())
    }

    /// Discards the payload of a rejected WRITE, to keep the stream in sync.
    fn skip(&mut self, conn: usize, req: &Request) -> Result<(), ServerError> {
        let len = req.payload_len();
        let mut done = 0;
        while done < len {
            if self.start == self.end && self.fill(conn)? == 0 {
                return Err(ServerError::TruncatedPayload {
                    conn,
                    cookie: req.cookie,
                    expected: req.len,
                    got: done,
                });
            }
            let n = (self.end - self.start).min(len - done);
            self.start += n;
            done += n;
        }
        Ok(())
    }
}

/// State shared by the threads of one [`Server::run`].
struct Shared<'a, D: ?Sized> {
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
    fn reply(&self, conn: usize, done: Done, spare: &mut Vec<Done>) {
        if done.with_data && done.buf.len() >= WRITE_OWN_REPLY {
            // Large data is written by the thread that just produced it, from its warm cache.
            self.flush(conn, Some(done), spare);
        } else {
            self.defer(conn, done);
            self.flush(conn, None, spare);
        }
    }

    /// Queues a reply on its connection for the next [`flush`](Self::flush).
    fn defer(&self, conn: usize, done: Done) {
        lock(&self.outboxes[conn].pending).push(done);
    }

    /// Writes the connection's pending replies (and `own`, first) unless another thread is at it
    /// (then that thread writes them); waits for the writer only when there is `own` to write.
    fn flush(&self, conn: usize, mut own: Option<Done>, spare: &mut Vec<Done>) {
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
    fn fail(&self, err: ServerError) {
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
    fn complete(&self, req: &Request, mut buf: Vec<u8>) -> Done {
        match execute(self.device, req, &mut buf) {
            Ok(()) => Done {
                header: Reply::ok(req.cookie).encode(),
                with_data: req.command == Command::Read,
                buf,
            },
            Err(errno) => Done::error(req.cookie, errno, buf),
        }
    }

    /// One thread's share of serving a connection, until DISC, EOF or a fatal error: take a turn
    /// at reading the next request, let go, call the device, reply; again.
    fn serve(&self, conn: usize, params: ConnParams) {
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
                Next::Request(req, buf) => self.complete(&req, buf),
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
    fn next(
        &self,
        conn: usize,
        r: &mut RequestReader,
        params: &ConnParams,
        flush_held: impl FnOnce(),
    ) -> Next {
        if self.stop.load(Ordering::Relaxed) {
            return Next::Stop;
        }
        let req = match r.next_header(conn) {
            Ok(Incoming::Eof) => return Next::Stop,
            Ok(Incoming::Unknown { cookie }) => {
                return match self.pool.take(0, flush_held) {
                    Some(buf) => Next::Answered(Done::error(cookie, Errno::EINVAL, buf)),
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
        if let Err(errno) = validate(&req, &params.export, params.max_io) {
            if let Err(e) = r.skip(conn, &req) {
                self.fail_unless_stopping(e);
                return Next::Stop;
            }
            return match self.pool.take(0, flush_held) {
                Some(buf) => Next::Answered(Done::error(req.cookie, errno, buf)),
                None => Next::Stop,
            };
        }
        let len = match req.command {
            Command::Read | Command::Write => req.len as usize,
            _ => 0,
        };
        let Some(mut buf) = self.pool.take(len, flush_held) else {
            return Next::Stop;
        };
        if req.command == Command::Write {
            if let Err(e) = r.payload(conn, &req, &mut buf) {
                self.pool.give(std::iter::once(buf));
                self.fail_unless_stopping(e);
                return Next::Stop;
            }
        }
        Next::Request(req, buf)
    }

    fn fail_unless_stopping(&self, err: ServerError) {
        // Once another connection failed, this one's read error is only the shutdown's echo.
        if !self.stop.load(Ordering::SeqCst) {
            self.fail(err);
        }
    }
}

/// Serves a [`BlockDevice`] over a [`KernelLink`].
///
/// ```
/// use userblk::{LoopbackKernel, MemDevice};
///
/// let kernel = LoopbackKernel::start(MemDevice::new(1 << 20))?;
/// kernel.write(4096, &[7u8; 4096])?;
/// assert_eq!(kernel.read(4096, 4096)?, vec![7u8; 4096]);
/// kernel.shutdown()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Server<D, L> {
    device: D,
    link: L,
    options: ServerOptions,
    export: Export,
    conns: Vec<UnixStream>,
    started: bool,
    finished: bool,
}

impl<D: BlockDevice, L: KernelLink> Server<D, L> {
    /// A server for `device` over `link`, with default options.
    pub fn new(device: D, link: L) -> Result<Server<D, L>, ServerError> {
        Server::with_options(device, link, ServerOptions::default())
    }

    /// A server with explicit options. Fails if the device's geometry cannot be served.
    pub fn with_options(
        device: D,
        link: L,
        options: ServerOptions,
    ) -> Result<Server<D, L>, ServerError> {
        let export = export_of(&device)?;
        Ok(Server {
            device,
            link,
            options,
            export,
            conns: Vec::new(),
            started: false,
            finished: false,
        })
    }

    /// What the kernel is told: size, block size, and the flags derived from the capabilities.
    pub fn export(&self) -> &Export {
        &self.export
    }

    /// The device served.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The link.
    pub fn link(&self) -> &L {
        &self.link
    }

    fn ensure_started(&mut self) -> Result<(), ServerError> {
        if !self.started {
            self.started = true;
            self.conns = self.link.start(&self.export)?;
        }
        Ok(())
    }

    /// Unmounts the device and finishes the link, once.
    fn end(&mut self) -> Result<(), ServerError> {
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        self.device.unmount();
        self.conns.clear();
        self.link.finish()?;
        Ok(())
    }

    /// Reads, executes and answers exactly one request from the first connection.
    ///
    /// Starts the link on first use. After DISC or EOF the device is unmounted and the link
    /// finished; later calls return the same step again.
    pub fn handle_one(&mut self) -> Result<Step, ServerError> {
        self.ensure_started()?;
        if self.finished || self.conns.is_empty() {
            return Ok(Step::Eof);
        }
        let conn = 0;
        let mut r = self.conns[0]
            .try_clone()
            .map_err(|source| ServerError::Io { conn, source })?;
        let req = match read_header(&mut r, conn)? {
            Incoming::Eof => {
                self.end()?;
                return Ok(Step::Eof);
            }
            Incoming::Unknown { cookie } => {
                send_reply(&mut r, Reply::error(cookie, Errno::EINVAL), &[])
                    .map_err(|source| ServerError::Io { conn, source })?;
                return Ok(Step::Replied {
                    cookie,
                    command: None,
                    error: Some(Errno::EINVAL),
                });
            }
            Incoming::Request(req) => req,
        };
        if req.command == Command::Disc {
            self.end()?;
            return Ok(Step::Disconnected);
        }
        let result = match validate(&req, &self.export, self.options.max_io_len) {
            Err(errno) => {
                skip_payload(&mut r, conn, &req)?;
                Err(errno)
            }
            Ok(()) => {
                let len = match req.command {
                    Command::Read | Command::Write => req.len as usize,
                    _ => 0,
                };
                let mut buf = vec![0u8; len];
                if req.command == Command::Write {
                    read_payload(&mut r, conn, &req, &mut buf)?;
                }
                execute(&self.device, &req, &mut buf).map(|()| buf)
            }
        };
        let (reply, data) = match &result {
            Ok(buf) if req.command == Command::Read => (Reply::ok(req.cookie), &buf[..]),
            Ok(_) => (Reply::ok(req.cookie), &[][..]),
            Err(errno) => (Reply::error(req.cookie, *errno), &[][..]),
        };
        send_reply(&mut r, reply, data).map_err(|source| ServerError::Io { conn, source })?;
        Ok(Step::Replied {
            cookie: req.cookie,
            command: Some(req.command),
            error: result.err(),
        })
    }

    /// Serves every connection until each has sent DISC or reached EOF, with requests in flight
    /// concurrently. Then answers what is in flight, unmounts the device (exactly once) and
    /// finishes the link. A corrupt stream closes every connection and returns the error.
    pub fn run(&mut self) -> Result<(), ServerError> {
        self.ensure_started()?;
        if self.finished {
            return Ok(());
        }
        let n = self.conns.len();
        let mut inboxes = Vec::with_capacity(n);
        let mut outboxes = Vec::with_capacity(n);
        let mut closers = Vec::with_capacity(n);
        for (conn, s) in self.conns.iter().enumerate() {
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
        let inline = self.options.inline_never_blocks && self.device.capabilities().never_blocks;
        let per_conn = if inline {
            1
        } else {
            self.options.workers.max(1)
        };
        // Every request between its header and its reply holds a permit: one per thread, and
        // `queue_depth` more for replies waiting to be written.
        let in_flight = self.options.queue_depth.max(1) + n * per_conn;
        let params = ConnParams {
            export: self.export,
            max_io: self.options.max_io_len,
            hold_replies: per_conn == 1,
            batch: REPLIES_PER_WRITE.min(in_flight),
        };
        let shared = Shared {
            device: &self.device,
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
        let ended = self.end();
        match error {
            Some(e) => Err(e),
            None => ended,
        }
    }
}

impl<D, L> Drop for Server<D, L> {
    fn drop(&mut self) {
        // Closing our ends is what tells the kernel side we are gone; `end()` has done the rest
        // when serving finished normally.
        for s in &self.conns {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The export for a device, or why it cannot be served.
pub fn export_of<D: BlockDevice + ?Sized>(device: &D) -> Result<Export, ServerError> {
    let block_size = device.block_size();
    if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
        return Err(ServerError::InvalidGeometry(format!(
            "block size {block_size} is not a power of two from 512 to 65536"
        )));
    }
    let size = device
        .blocks()
        .checked_mul(u64::from(block_size))
        .ok_or_else(|| ServerError::InvalidGeometry("blocks × block size overflows".into()))?;
    let caps: Capabilities = device.capabilities();
    Ok(Export {
        size,
        block_size,
        flags: caps.transmission_flags(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;
    use std::io::Write;

    const RW: Export = Export {
        size: 1 << 20,
        block_size: 512,
        flags: TransmissionFlags(1 | 1 << 2 | 1 << 5 | 1 << 6),
    };
    const RO: Export = Export {
        size: 1 << 20,
        block_size: 512,
        flags: TransmissionFlags(1 | 1 << 1 | 1 << 2),
    };
    const NO_EXTRAS: Export = Export {
        size: 1 << 20,
        block_size: 4096,
        flags: TransmissionFlags(1),
    };

    fn req(command: Command, offset: u64, len: u32) -> Request {
        Request::new(command, Cookie(1), offset, len)
    }

    #[rstest]
    #[case::read_ok(RW, req(Command::Read, 0, 4096), Ok(()))]
    #[case::read_last_block(RW, req(Command::Read, (1 << 20) - 512, 512), Ok(()))]
    #[case::read_past_end(RW, req(Command::Read, (1 << 20) - 512, 1024), Err(Errno::EINVAL))]
    #[case::read_offset_overflow(RW, req(Command::Read, u64::MAX - 511, 512), Err(Errno::EINVAL))]
    #[case::write_past_end(RW, req(Command::Write, 1 << 20, 512), Err(Errno::ENOSPC))]
    #[case::zeroes_past_end(RW, req(Command::WriteZeroes, 1 << 20, 512), Err(Errno::ENOSPC))]
    #[case::trim_past_end(RW, req(Command::Trim, 1 << 20, 512), Err(Errno::EINVAL))]
    #[case::misaligned_offset(RW, req(Command::Read, 100, 512), Err(Errno::EINVAL))]
    #[case::misaligned_len(RW, req(Command::Write, 0, 100), Err(Errno::EINVAL))]
    #[case::misaligned_4k(NO_EXTRAS, req(Command::Read, 512, 4096), Err(Errno::EINVAL))]
    #[case::empty_read(RW, req(Command::Read, 0, 0), Err(Errno::EINVAL))]
    #[case::too_large(Export { size: 1 << 40, ..RW }, req(Command::Read, 0, MAX_IO_LEN + 512), Err(Errno::EINVAL))]
    #[case::max_size(Export { size: 1 << 40, ..RW }, req(Command::Read, 0, MAX_IO_LEN), Ok(()))]
    #[case::big_trim(Export { size: 1 << 40, ..RW }, req(Command::Trim, 0, 0xffff_fe00), Ok(()))]
    #[case::read_only_write(RO, req(Command::Write, 0, 512), Err(Errno::EPERM))]
    #[case::read_only_write_past_end(RO, req(Command::Write, 1 << 30, 512), Err(Errno::EPERM))]
    #[case::read_only_trim(RO, req(Command::Trim, 0, 512), Err(Errno::EPERM))]
    #[case::read_only_read(RO, req(Command::Read, 0, 512), Ok(()))]
    #[case::flush_not_advertised(NO_EXTRAS, req(Command::Flush, 0, 0), Err(Errno::EINVAL))]
    #[case::trim_not_advertised(NO_EXTRAS, req(Command::Trim, 0, 4096), Err(Errno::EINVAL))]
    #[case::zeroes_not_advertised(
        NO_EXTRAS,
        req(Command::WriteZeroes, 0, 4096),
        Err(Errno::EINVAL)
    )]
    #[case::cache_never(RW, req(Command::Cache, 0, 512), Err(Errno::EINVAL))]
    #[case::block_status_never(RW, req(Command::BlockStatus, 0, 512), Err(Errno::EINVAL))]
    #[case::flush_ok(RW, req(Command::Flush, 0, 0), Ok(()))]
    fn validation(#[case] export: Export, #[case] req: Request, #[case] want: Result<(), Errno>) {
        assert_eq!(validate(&req, &export, MAX_IO_LEN), want);
    }

    #[test]
    fn flags_are_checked() {
        let mut r = req(Command::Write, 0, 512);
        r.flags = CommandFlags::FUA;
        assert_eq!(validate(&r, &RW, MAX_IO_LEN), Ok(()));
        r.flags = CommandFlags::NO_HOLE;
        assert_eq!(validate(&r, &RW, MAX_IO_LEN), Err(Errno::EINVAL));
        r.flags = CommandFlags(1 << 7);
        assert_eq!(validate(&r, &RW, MAX_IO_LEN), Err(Errno::EINVAL));
        let mut z = req(Command::WriteZeroes, 0, 512);
        z.flags = CommandFlags::NO_HOLE | CommandFlags::FUA;
        assert_eq!(validate(&z, &RW, MAX_IO_LEN), Ok(()));
    }

    #[test]
    fn buffer_pool_reuses() {
        let pool = BufferPool::new(2, 1 << 20);
        let b = pool.take(4096, || {}).unwrap();
        let ptr = b.as_ptr();
        pool.give(std::iter::once(b));
        let b = pool.take(1024, || {}).unwrap();
        assert_eq!(b.as_ptr(), ptr);
        assert_eq!(b.len(), 1024);
    }

    #[test]
    fn buffer_pool_bounds_permits_and_closes() {
        let pool = BufferPool::new(1, 0);
        let b = pool.take(512, || {}).unwrap();
        std::thread::scope(|s| {
            let waiter = s.spawn(|| pool.take(512, || {}).map(|b| b.len()));
            // The waiter has no permit until `b` comes back.
            pool.give(std::iter::once(b));
            assert_eq!(waiter.join().unwrap(), Some(512));
        });
        pool.close();
        assert!(pool.take(0, || {}).is_none());
    }

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

    #[test]
    fn reader_handles_headers_and_payloads_split_anywhere() {
        let (mut kernel, server) = UnixStream::pair().unwrap();
        let mut r = RequestReader::new(server);
        let mut bytes = Vec::new();
        bytes.extend(Request::new(Command::Write, Cookie(1), 0, 4096).encode());
        bytes.extend((0..4096).map(|i| i as u8));
        bytes.extend(Request::new(Command::Read, Cookie(2), 0, 512).encode());
        // Header and payload arrive in pieces that cut both.
        let cuts = [0, 10, 30, 1000, 4124, 4130, bytes.len()];
        let writer = std::thread::spawn(move || {
            for w in cuts.windows(2) {
                kernel.write_all(&bytes[w[0]..w[1]]).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            kernel
        });
        let Incoming::Request(write) = r.next_header(0).unwrap() else {
            panic!("expected a request")
        };
        assert_eq!((write.command, write.cookie), (Command::Write, Cookie(1)));
        let mut payload = vec![0u8; 4096];
        r.payload(0, &write, &mut payload).unwrap();
        assert!(payload.iter().enumerate().all(|(i, &b)| b == i as u8));
        let Incoming::Request(read) = r.next_header(0).unwrap() else {
            panic!("expected a request")
        };
        assert_eq!((read.command, read.cookie), (Command::Read, Cookie(2)));
        assert!(!r.has_header());
        drop(writer.join().unwrap());
        assert!(matches!(r.next_header(0), Ok(Incoming::Eof)));
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
