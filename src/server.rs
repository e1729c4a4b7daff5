//! [`Server`]: reads NBD requests from a [`KernelLink`]'s sockets, validates them, calls the
//! [`BlockDevice`] and writes the replies.
//!
//! [`Server::run`] serves every connection at once: one reader thread per connection hands valid
//! requests to a pool of workers, which reply as soon as the device answers, so replies go out
//! of order and many requests are in flight. [`Server::handle_one`] does exactly one request,
//! synchronously, for tests that drive the protocol step by step.
//!
//! The rules it keeps: the device never sees a request outside its size, misaligned, empty, or
//! for a command it did not advertise; every request gets exactly one reply; no payload follows an
//! error reply; nothing the socket brings makes it panic.

use std::io::{self, IoSlice, Read, Write};
use std::os::unix::net::UnixStream;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Mutex, PoisonError};
use std::thread;

use crate::device::{BlockDevice, Capabilities};
use crate::link::{Export, KernelLink, LinkError};
use crate::proto::{
    Command, CommandFlags, Cookie, Errno, ParseError, Reply, Request, TransmissionFlags,
    MAX_IO_LEN, REQUEST_LEN,
};

/// Tuning for a [`Server`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerOptions {
    /// Worker threads calling the device. Default: twice the CPUs, between 4 and 16.
    pub workers: usize,
    /// Requests read ahead of the workers, over all connections; the reader stops reading when
    /// this many wait (back-pressure). Default: 256.
    pub queue_depth: usize,
    /// The largest READ or WRITE accepted; larger ones get EINVAL. Default: [`MAX_IO_LEN`].
    pub max_io_len: u32,
}

impl Default for ServerOptions {
    fn default() -> ServerOptions {
        let cpus = thread::available_parallelism().map_or(2, |n| n.get());
        ServerOptions {
            workers: (2 * cpus).clamp(4, 16),
            queue_depth: 256,
            max_io_len: MAX_IO_LEN,
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
    let mut bufs = [IoSlice::new(&header), IoSlice::new(data)];
    let mut bufs: &mut [IoSlice<'_>] = &mut bufs;
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
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

fn read_header(r: &mut UnixStream, conn: usize) -> Result<Incoming, ServerError> {
    let mut header = [0u8; REQUEST_LEN];
    let got = read_full(r, &mut header).map_err(|source| ServerError::Io { conn, source })?;
    if got == 0 {
        return Ok(Incoming::Eof);
    }
    match Request::parse(&header[..got]) {
        Ok(req) => Ok(Incoming::Request(req)),
        Err(ParseError::UnknownCommand { cookie, .. }) => Ok(Incoming::Unknown { cookie }),
        Err(source) => Err(ServerError::Protocol { conn, source }),
    }
}

/// Reads until `buf` is full or EOF; returns how many bytes were read.
fn read_full(r: &mut UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
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

/// Recycled request buffers, so that steady-state serving does not allocate per request.
struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
    keep: usize,
}

impl BufferPool {
    fn new(keep: usize) -> BufferPool {
        BufferPool {
            free: Mutex::new(Vec::new()),
            keep,
        }
    }

    /// A buffer of exactly `len` bytes (contents unspecified).
    fn take(&self, len: usize) -> Vec<u8> {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        let mut buf = match free.iter().position(|b| b.capacity() >= len) {
            Some(i) => free.swap_remove(i),
            None => free.pop().unwrap_or_default(),
        };
        drop(free);
        buf.resize(len, 0);
        buf
    }

    fn give(&self, buf: Vec<u8>) {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        if free.len() < self.keep {
            free.push(buf);
        }
    }
}

/// A validated request on its way to a worker.
struct Job {
    conn: usize,
    req: Request,
    buf: Vec<u8>,
}

/// State shared by the readers and workers of one [`Server::run`].
struct Shared<'a, D: ?Sized> {
    device: &'a D,
    writers: Vec<Mutex<UnixStream>>,
    pool: BufferPool,
    /// Set when serving must stop early (a fatal error on any connection).
    stop: AtomicBool,
    error: Mutex<Option<ServerError>>,
}

impl<D: BlockDevice + ?Sized> Shared<'_, D> {
    fn reply(&self, conn: usize, reply: Reply, data: &[u8]) {
        let mut w = self.writers[conn]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = send_reply(&mut w, reply, data) {
            if !peer_gone(&e) {
                self.fail(ServerError::Io { conn, source: e });
            }
        }
    }

    /// Records the first fatal error and closes every connection, so all readers stop.
    fn fail(&self, err: ServerError) {
        let mut slot = self.error.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(err);
        }
        drop(slot);
        self.stop.store(true, Ordering::SeqCst);
        for w in &self.writers {
            let w = w.lock().unwrap_or_else(PoisonError::into_inner);
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
    }

    fn work(&self, jobs: &Mutex<Receiver<Job>>) {
        loop {
            let job = {
                let rx = jobs.lock().unwrap_or_else(PoisonError::into_inner);
                rx.recv()
            };
            let Ok(mut job) = job else { return };
            let reply = match execute(self.device, &job.req, &mut job.buf) {
                Ok(()) => Reply::ok(job.req.cookie),
                Err(errno) => Reply::error(job.req.cookie, errno),
            };
            let data: &[u8] = if job.req.command == Command::Read {
                &job.buf
            } else {
                &[]
            };
            self.reply(job.conn, reply, data);
            self.pool.give(job.buf);
        }
    }

    /// Reads one connection until DISC, EOF or a fatal error.
    fn read_loop(
        &self,
        conn: usize,
        mut r: UnixStream,
        export: &Export,
        max_io: u32,
        jobs: &SyncSender<Job>,
    ) {
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            let req = match read_header(&mut r, conn) {
                Ok(Incoming::Eof) => return,
                Ok(Incoming::Unknown { cookie }) => {
                    self.reply(conn, Reply::error(cookie, Errno::EINVAL), &[]);
                    continue;
                }
                Ok(Incoming::Request(req)) => req,
                Err(e) => return self.fail_unless_stopping(e),
            };
            if req.command == Command::Disc {
                return;
            }
            if let Err(errno) = validate(&req, export, max_io) {
                if let Err(e) = skip_payload(&mut r, conn, &req) {
                    return self.fail_unless_stopping(e);
                }
                self.reply(conn, Reply::error(req.cookie, errno), &[]);
                continue;
            }
            let len = match req.command {
                Command::Read | Command::Write => req.len as usize,
                _ => 0,
            };
            let mut buf = self.pool.take(len);
            if req.command == Command::Write {
                if let Err(e) = read_payload(&mut r, conn, &req, &mut buf) {
                    return self.fail_unless_stopping(e);
                }
            }
            if jobs.send(Job { conn, req, buf }).is_err() {
                return;
            }
        }
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
        let mut readers = Vec::with_capacity(self.conns.len());
        let mut writers = Vec::with_capacity(self.conns.len());
        for (conn, s) in self.conns.iter().enumerate() {
            let w = s
                .try_clone()
                .map_err(|source| ServerError::Io { conn, source })?;
            readers.push(
                s.try_clone()
                    .map_err(|source| ServerError::Io { conn, source })?,
            );
            writers.push(Mutex::new(w));
        }
        let shared = Shared {
            device: &self.device,
            writers,
            pool: BufferPool::new(self.options.queue_depth + self.options.workers),
            stop: AtomicBool::new(false),
            error: Mutex::new(None),
        };
        let (tx, rx) = mpsc::sync_channel::<Job>(self.options.queue_depth.max(1));
        let rx = Mutex::new(rx);
        let export = self.export;
        let max_io = self.options.max_io_len;
        thread::scope(|s| {
            for _ in 0..self.options.workers.max(1) {
                let (shared, rx) = (&shared, &rx);
                let spawned = thread::Builder::new()
                    .name("userblk-worker".into())
                    .spawn_scoped(s, move || shared.work(rx));
                if let Err(source) = spawned {
                    shared.fail(ServerError::Io { conn: 0, source });
                    break;
                }
            }
            for (conn, r) in readers.into_iter().enumerate() {
                let (shared, tx, export) = (&shared, tx.clone(), &export);
                let spawned = thread::Builder::new()
                    .name(format!("userblk-conn{conn}"))
                    .spawn_scoped(s, move || shared.read_loop(conn, r, export, max_io, &tx));
                if let Err(source) = spawned {
                    // Closing every connection makes the readers already running stop too.
                    shared.fail(ServerError::Io { conn, source });
                    break;
                }
            }
            // Workers drain the queue and exit once every reader has dropped its sender.
            drop(tx);
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
        let pool = BufferPool::new(2);
        let b = pool.take(4096);
        let ptr = b.as_ptr();
        pool.give(b);
        let b = pool.take(1024);
        assert_eq!(b.as_ptr(), ptr);
        assert_eq!(b.len(), 1024);
    }
}
