//! [`LoopbackKernel`]: an in-process fake kernel that serves a device through a real [`Server`]
//! over socketpairs, so a driver's tests run in plain `cargo test` without root.
//!
//! It plays the Linux 6.x NBD driver on the other end of the socket:
//! - block operations (read, write with or without FUA, flush, trim, write-zeroes) become NBD
//!   requests the way the kernel makes them: cookies built as `cmd_cookie << 32 | hwq << 16 | tag`,
//!   at most `queue_depth` (128) in flight per connection, reads and writes split at
//!   `max_sectors_kb` (128 KiB), only commands the export's flags allow (a trim on a device without
//!   trim fails locally with EOPNOTSUPP, as in the block layer), DISC at shutdown;
//! - every reply is checked as the kernel checks it: magic, a cookie that is in flight, one reply
//!   per cookie, payload only after a successful READ. A violation kills that connection, as in
//!   the kernel, and is reported as a [`Violation`] naming the request.
//!
//! [`RawKernel`] hands the test the kernel's socket itself, for malformed input.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, BufReader, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};

use crate::device::BlockDevice;
use crate::link::{Export, KernelLink, LinkError, Started};
use crate::proto::{
    Command, CommandFlags, Cookie, Errno, Reply, ReplyParseError, Request, TransmissionFlags,
    REPLY_LEN,
};
use crate::server::{export_of, Server, ServerError, ServerOptions};
use crate::stream::{read_full, write_all_vectored};

/// A [`KernelLink`] whose kernel side is a set of sockets held in-process.
#[derive(Debug)]
pub struct LoopbackLink {
    server_ends: Vec<UnixStream>,
}

impl LoopbackLink {
    /// `connections` socketpairs: the link (server ends) and the kernel ends.
    pub fn new(connections: usize) -> io::Result<(LoopbackLink, Vec<UnixStream>)> {
        let mut server_ends = Vec::with_capacity(connections);
        let mut kernel_ends = Vec::with_capacity(connections);
        for _ in 0..connections.max(1) {
            let (k, s) = UnixStream::pair()?;
            kernel_ends.push(k);
            server_ends.push(s);
        }
        Ok((LoopbackLink { server_ends }, kernel_ends))
    }
}

impl KernelLink for LoopbackLink {
    fn start(&mut self, export: &Export) -> Result<Started, LinkError> {
        if self.server_ends.is_empty() {
            return Err(LinkError::AlreadyStarted);
        }
        let conns = std::mem::take(&mut self.server_ends);
        Ok(Started {
            export: *export,
            conns,
        })
    }
}

/// How the fake kernel behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoopbackOptions {
    /// Connections (sockets, hardware queues). Default: 1.
    pub connections: usize,
    /// Requests in flight per connection, as the kernel's tag set. Default: 128.
    pub queue_depth: u16,
    /// Reads and writes are split into requests of at most this many bytes (`max_sectors_kb`).
    /// Default: 128 KiB.
    pub max_request: u32,
    /// Whether the kernel sends WRITE_ZEROES when advertised (6.12 and later). When false, or
    /// when the export does not advertise it, write-zeroes is done with zero-filled WRITEs, as
    /// the block layer's fallback does. Default: true.
    pub send_write_zeroes: bool,
    /// The server's options.
    pub server: ServerOptions,
}

impl Default for LoopbackOptions {
    fn default() -> LoopbackOptions {
        LoopbackOptions {
            connections: 1,
            queue_depth: 128,
            max_request: 128 << 10,
            send_write_zeroes: true,
            server: ServerOptions::default(),
        }
    }
}

/// A server reply that the kernel would reject; it kills the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The connection.
    pub conn: usize,
    /// What was wrong, naming the request concerned.
    pub what: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "connection {}: {}", self.conn, self.what)
    }
}

/// What a block operation through the fake kernel can end with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoopbackError {
    /// The server answered the request with an error. (The real block layer turns any of these
    /// into EIO for the application; the wire value is kept here for tests.)
    #[error("{command} at offset {offset}, {len} bytes: server replied {errno}")]
    Reply {
        /// The command.
        command: Command,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u32,
        /// The errno in the reply.
        errno: Errno,
    },
    /// The kernel would refuse the operation without sending anything.
    #[error("refused by the block layer ({}): {reason}", Errno(*errno as u32))]
    Refused {
        /// The errno the application would see (e.g. 95, EOPNOTSUPP).
        errno: i32,
        /// Why.
        reason: &'static str,
    },
    /// The server broke the protocol; the connection was killed.
    #[error("protocol violation: {0}")]
    Violation(Violation),
    /// The connection is closed.
    #[error("connection {conn} closed by the server")]
    Disconnected {
        /// The connection.
        conn: usize,
    },
    /// The server could not be started or stopped with an error.
    #[error("server: {0}")]
    Server(#[from] ServerError),
    /// A socket operation failed.
    #[error("loopback socket: {0}")]
    Io(#[from] io::Error),
}

impl LoopbackError {
    /// The errno carried: the reply's, or the block layer's for a refusal.
    pub fn errno(&self) -> Option<i32> {
        match self {
            LoopbackError::Reply { errno, .. } => Some(errno.0 as i32),
            LoopbackError::Refused { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

impl From<LoopbackError> for io::Error {
    fn from(e: LoopbackError) -> io::Error {
        match e.errno() {
            Some(errno) => io::Error::from_raw_os_error(errno),
            None => io::Error::other(e),
        }
    }
}

/// Counters kept by the fake kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoopbackStats {
    /// Requests sent (DISC excluded).
    pub requests: u64,
    /// Replies received.
    pub replies: u64,
    /// Most requests in flight at once on one connection.
    pub max_in_flight: usize,
    /// Replies that overtook an older request still in flight on the same connection.
    pub overtaken: u64,
}

/// A request in flight, identified as the kernel identifies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    conn: usize,
    tag: u16,
    cookie: Cookie,
}

impl Ticket {
    /// The cookie sent.
    pub fn cookie(&self) -> Cookie {
        self.cookie
    }
}

/// One request of a block operation, before it gets its cookie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op<'a> {
    /// The command.
    pub command: Command,
    /// Command flags (FUA, NO_HOLE).
    pub flags: CommandFlags,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
    /// A WRITE's payload (`len` bytes).
    pub data: &'a [u8],
}

impl Op<'_> {
    /// A READ.
    pub fn read(offset: u64, len: u32) -> Op<'static> {
        Op {
            command: Command::Read,
            flags: CommandFlags::NONE,
            offset,
            len,
            data: &[],
        }
    }

    /// A WRITE of `data`.
    pub fn write(offset: u64, data: &[u8]) -> Op<'_> {
        Op {
            command: Command::Write,
            flags: CommandFlags::NONE,
            offset,
            len: data.len() as u32,
            data,
        }
    }

    /// A FLUSH.
    pub fn flush() -> Op<'static> {
        Op {
            command: Command::Flush,
            flags: CommandFlags::NONE,
            offset: 0,
            len: 0,
            data: &[],
        }
    }
}

struct Slot {
    req: Request,
    seq: u64,
    result: Option<Result<Vec<u8>, LoopbackError>>,
    /// Someone sleeps in `wait` for this slot: only then does its reply cost a wake-up.
    waited: bool,
}

struct ConnState {
    slots: Vec<Option<Slot>>,
    /// Per tag, bumped each time the tag is sent, as `nbd_cmd->cmd_cookie`.
    cmd_cookies: Vec<u32>,
    in_flight: usize,
    dead: Option<LoopbackError>,
}

struct State {
    conns: Vec<ConnState>,
    next_seq: u64,
    next_conn: usize,
    stats: LoopbackStats,
    violations: Vec<Violation>,
    /// Threads asleep in `submit` until a tag is free.
    submitters_waiting: usize,
}

struct Inner {
    state: Mutex<State>,
    changed: Condvar,
    writers: Vec<Mutex<UnixStream>>,
    /// Buffers handed back with [`LoopbackKernel::recycle`], for READ data.
    spare: Mutex<Vec<Vec<u8>>>,
}

/// Most buffers kept by [`LoopbackKernel::recycle`].
const KEEP_SPARE: usize = 256;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn clone_error(e: &LoopbackError) -> LoopbackError {
    match e {
        LoopbackError::Violation(v) => LoopbackError::Violation(v.clone()),
        LoopbackError::Disconnected { conn } => LoopbackError::Disconnected { conn: *conn },
        other => LoopbackError::Io(io::Error::other(other.to_string())),
    }
}

impl Inner {
    /// Marks a connection dead and fails everything waiting on it.
    fn kill(&self, conn: usize, why: LoopbackError) {
        let mut st = lock(&self.state);
        if let LoopbackError::Violation(v) = &why {
            st.violations.push(v.clone());
        }
        let c = &mut st.conns[conn];
        for slot in c.slots.iter_mut().flatten() {
            if slot.result.is_none() {
                slot.result = Some(Err(clone_error(&why)));
            }
        }
        if c.dead.is_none() {
            c.dead = Some(why);
        }
        drop(st);
        let _ = lock(&self.writers[conn]).shutdown(Shutdown::Both);
        self.changed.notify_all();
    }

    /// Reads replies on one connection until EOF or a violation.
    fn read_replies(&self, conn: usize, sock: UnixStream) {
        // Buffered: replies that arrive together cost one `read`; large READ data bypasses the
        // buffer and goes straight into its `Vec`.
        let mut sock = BufReader::with_capacity(64 << 10, sock);
        let mut last: Option<(Request, u32)> = None;
        loop {
            let mut header = [0u8; REPLY_LEN];
            let got = match read_full(&mut sock, &mut header) {
                Ok(n) => n,
                Err(e) => return self.kill(conn, LoopbackError::Io(e)),
            };
            if got == 0 {
                return self.kill(conn, LoopbackError::Disconnected { conn });
            }
            let reply = match Reply::parse(&header[..got]) {
                Ok(r) => r,
                Err(e) => {
                    let after = match last {
                        Some((req, error)) if error != 0 => format!(
                            " (it follows the error reply {} to {} {}; a server that sends payload after an error reply desyncs the stream like this)",
                            Errno(error), req.command, req.cookie
                        ),
                        Some((req, _)) => format!(" (after the reply to {} {})", req.command, req.cookie),
                        None => " (first reply)".to_string(),
                    };
                    let what = match e {
                        ReplyParseError::ShortHeader { len } => format!("stream ended inside a reply header ({len} of {REPLY_LEN} bytes){after}"),
                        ReplyParseError::BadMagic { magic } => format!("bad reply magic {magic:#010x}{after}"),
                    };
                    return self.kill(conn, LoopbackError::Violation(Violation { conn, what }));
                }
            };
            let tag = (reply.cookie.0 & 0xffff) as usize;
            let hwq = ((reply.cookie.0 >> 16) & 0xffff) as usize;
            let mut st = lock(&self.state);
            let known = hwq == conn
                && st.conns[conn]
                    .slots
                    .get(tag)
                    .and_then(Option::as_ref)
                    .is_some_and(|s| s.req.cookie == reply.cookie && s.result.is_none());
            if !known {
                drop(st);
                let what = format!(
                    "reply for cookie {} (error {}) matches no request in flight: unknown or duplicate cookie",
                    reply.cookie, reply.error
                );
                return self.kill(conn, LoopbackError::Violation(Violation { conn, what }));
            }
            let (req, seq) = match &st.conns[conn].slots[tag] {
                Some(s) => (s.req, s.seq),
                None => return,
            };
            let overtook = st.conns[conn]
                .slots
                .iter()
                .flatten()
                .any(|s| s.result.is_none() && s.seq < seq);
            st.stats.replies += 1;
            if overtook {
                st.stats.overtaken += 1;
            }
            drop(st);
            let result = match reply.errno() {
                Some(errno) => Err(LoopbackError::Reply {
                    command: req.command,
                    offset: req.offset,
                    len: req.len,
                    errno,
                }),
                None if req.command == Command::Read => {
                    let mut data = lock(&self.spare).pop().unwrap_or_default();
                    data.resize(req.len as usize, 0);
                    match read_full(&mut sock, &mut data) {
                        Ok(n) if n == data.len() => Ok(data),
                        Ok(n) => {
                            let what = format!(
                                "stream ended after {n} of {} data bytes of READ {} at {}",
                                req.len, req.cookie, req.offset
                            );
                            return self
                                .kill(conn, LoopbackError::Violation(Violation { conn, what }));
                        }
                        Err(e) => return self.kill(conn, LoopbackError::Io(e)),
                    }
                }
                None => Ok(Vec::new()),
            };
            last = Some((req, reply.error));
            let mut st = lock(&self.state);
            let mut wake = false;
            if let Some(slot) = st.conns[conn].slots[tag].as_mut() {
                slot.result = Some(result);
                wake = slot.waited;
            }
            drop(st);
            if wake {
                self.changed.notify_all();
            }
        }
    }
}

/// The fake kernel. Block operations may be called from several threads at once.
///
/// ```
/// use userblk::{LoopbackKernel, MemDevice};
///
/// let kernel = LoopbackKernel::start(MemDevice::new(8 << 20))?;
/// let data = vec![0xabu8; 256 << 10]; // split into two 128 KiB WRITEs
/// kernel.write(1 << 20, &data)?;
/// kernel.flush()?;
/// assert_eq!(kernel.read(1 << 20, data.len())?, data);
/// kernel.shutdown()?; // DISC; the server unmounts the device and stops
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct LoopbackKernel {
    inner: Arc<Inner>,
    export: Export,
    options: LoopbackOptions,
    server: Option<JoinHandle<Result<(), ServerError>>>,
    readers: Vec<JoinHandle<()>>,
}

impl fmt::Debug for LoopbackKernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoopbackKernel")
            .field("export", &self.export)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl LoopbackKernel {
    /// Starts a [`Server`] for `device` in a thread, with default options.
    pub fn start<D: BlockDevice + 'static>(device: D) -> Result<LoopbackKernel, LoopbackError> {
        LoopbackKernel::with_options(device, LoopbackOptions::default())
    }

    /// Starts a [`Server`] for `device` in a thread.
    pub fn with_options<D: BlockDevice + 'static>(
        device: D,
        options: LoopbackOptions,
    ) -> Result<LoopbackKernel, LoopbackError> {
        let export = export_of(&device)?;
        let server_options = options.server;
        LoopbackKernel::with_server(export, options, move |link| {
            Server::with_options(device, link, server_options)?.run()
        })
    }

    /// Starts the fake kernel in front of a server of the caller's own: `serve` runs in a thread
    /// with the link (whose [`KernelLink::start`] hands over the server ends of the connections)
    /// and returns when it has stopped serving. `export` is what the kernel side assumes was
    /// advertised. This puts another NBD server behind exactly the same kernel side, to check it
    /// or to compare its speed with [`Server`]'s. (`options.server` is not used.)
    pub fn with_server<F>(
        export: Export,
        options: LoopbackOptions,
        serve: F,
    ) -> Result<LoopbackKernel, LoopbackError>
    where
        F: FnOnce(LoopbackLink) -> Result<(), ServerError> + Send + 'static,
    {
        let (link, kernel_ends) = LoopbackLink::new(options.connections)?;
        let server = thread::Builder::new()
            .name("userblk-loopback-server".into())
            .spawn(move || serve(link))?;
        let depth = usize::from(options.queue_depth.max(1));
        let mut writers = Vec::new();
        let mut reader_socks = Vec::new();
        for s in kernel_ends {
            reader_socks.push(s.try_clone()?);
            writers.push(Mutex::new(s));
        }
        let conns = (0..writers.len())
            .map(|_| ConnState {
                slots: (0..depth).map(|_| None).collect(),
                cmd_cookies: vec![0; depth],
                in_flight: 0,
                dead: None,
            })
            .collect();
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                conns,
                next_seq: 0,
                next_conn: 0,
                stats: LoopbackStats::default(),
                violations: Vec::new(),
                submitters_waiting: 0,
            }),
            changed: Condvar::new(),
            writers,
            spare: Mutex::new(Vec::new()),
        });
        let mut readers = Vec::new();
        for (conn, sock) in reader_socks.into_iter().enumerate() {
            let inner = Arc::clone(&inner);
            readers.push(
                thread::Builder::new()
                    .name(format!("userblk-loopback-reply{conn}"))
                    .spawn(move || inner.read_replies(conn, sock))?,
            );
        }
        Ok(LoopbackKernel {
            inner,
            export,
            options,
            server: Some(server),
            readers,
        })
    }

    /// What the server advertised.
    pub fn export(&self) -> &Export {
        &self.export
    }

    /// The device size in bytes.
    pub fn size(&self) -> u64 {
        self.export.size
    }

    /// Counters so far.
    pub fn stats(&self) -> LoopbackStats {
        lock(&self.inner.state).stats
    }

    /// Protocol violations seen so far.
    pub fn violations(&self) -> Vec<Violation> {
        lock(&self.inner.state).violations.clone()
    }

    /// Sends one request as the kernel would, without the block layer's checks or splitting,
    /// and returns its ticket. Waits while every tag of every connection is in flight.
    pub fn submit(&self, op: Op<'_>) -> Result<Ticket, LoopbackError> {
        self.send(op, true)?
            .ok_or_else(|| LoopbackError::Io(io::Error::other("no tag free")))
    }

    /// Sends one request if a tag is free (`Ok(None)` if not and `block` is false).
    fn send(&self, op: Op<'_>, block: bool) -> Result<Option<Ticket>, LoopbackError> {
        let mut st = lock(&self.inner.state);
        let (conn, tag) = loop {
            let n = st.conns.len();
            let mut found = None;
            let mut all_dead = true;
            for i in 0..n {
                let conn = (st.next_conn + i) % n;
                let c = &st.conns[conn];
                if c.dead.is_some() {
                    continue;
                }
                all_dead = false;
                if let Some(tag) = c.slots.iter().position(Option::is_none) {
                    found = Some((conn, tag));
                    break;
                }
            }
            if let Some(f) = found {
                break f;
            }
            if all_dead {
                let why = st.conns[0]
                    .dead
                    .as_ref()
                    .map_or(LoopbackError::Disconnected { conn: 0 }, clone_error);
                return Err(why);
            }
            if !block {
                return Ok(None);
            }
            st.submitters_waiting += 1;
            st = self
                .inner
                .changed
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
            st.submitters_waiting -= 1;
        };
        st.next_conn = (conn + 1) % st.conns.len();
        let seq = st.next_seq;
        st.next_seq += 1;
        let c = &mut st.conns[conn];
        c.cmd_cookies[tag] = c.cmd_cookies[tag].wrapping_add(1);
        let cookie = Cookie(u64::from(c.cmd_cookies[tag]) << 32 | (conn as u64) << 16 | tag as u64);
        let req = Request {
            command: op.command,
            flags: op.flags,
            cookie,
            offset: op.offset,
            len: op.len,
        };
        c.slots[tag] = Some(Slot {
            req,
            seq,
            result: None,
            waited: false,
        });
        c.in_flight += 1;
        let in_flight = c.in_flight;
        st.stats.requests += 1;
        st.stats.max_in_flight = st.stats.max_in_flight.max(in_flight);
        drop(st);
        let header = req.encode();
        let data = if op.command == Command::Write {
            op.data
        } else {
            &[]
        };
        let sent = write_all_vectored(
            &mut *lock(&self.inner.writers[conn]),
            &mut [IoSlice::new(&header), IoSlice::new(data)],
        );
        let ticket = Ticket {
            conn,
            tag: tag as u16,
            cookie,
        };
        if let Err(e) = sent {
            let mut st = lock(&self.inner.state);
            if let Some(slot) = st.conns[conn].slots[tag].as_mut() {
                slot.result.get_or_insert(Err(LoopbackError::Io(e)));
            }
        }
        Ok(Some(ticket))
    }

    /// Hands back a buffer returned by [`wait`](Self::wait) (or any `Vec`), to hold a later READ's
    /// data. Optional: it spares a benchmark from measuring the allocator.
    pub fn recycle(&self, buf: Vec<u8>) {
        let mut spare = lock(&self.inner.spare);
        if spare.len() < KEEP_SPARE && buf.capacity() > 0 {
            spare.push(buf);
        }
    }

    /// Waits for a request's reply: its data (empty but for READ) or its error.
    pub fn wait(&self, ticket: Ticket) -> Result<Vec<u8>, LoopbackError> {
        let mut st = lock(&self.inner.state);
        loop {
            let c = &mut st.conns[ticket.conn];
            let slot = &mut c.slots[usize::from(ticket.tag)];
            match slot {
                Some(s) if s.req.cookie == ticket.cookie && s.result.is_some() => {
                    let result = s.result.take().unwrap_or(Ok(Vec::new()));
                    *slot = None;
                    c.in_flight -= 1;
                    let wake = st.submitters_waiting > 0;
                    drop(st);
                    if wake {
                        self.inner.changed.notify_all();
                    }
                    return result;
                }
                Some(s) if s.req.cookie == ticket.cookie => s.waited = true,
                _ => {
                    return Err(LoopbackError::Io(io::Error::other(
                        "ticket already waited for",
                    )))
                }
            }
            st = self
                .inner
                .changed
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Submits every op (waiting for tags as needed), waits for all, and returns their data in
    /// order, or the first error.
    fn all<'a>(
        &self,
        ops: impl IntoIterator<Item = Op<'a>>,
    ) -> Result<Vec<Vec<u8>>, LoopbackError> {
        let mut pending = VecDeque::new();
        let mut out = Vec::new();
        let mut first_err = None;
        let reap =
            |t, out: &mut Vec<Vec<u8>>, first_err: &mut Option<LoopbackError>| match self.wait(t) {
                Ok(d) => out.push(d),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            };
        // When every tag is taken, complete our oldest request before sending more: blocking for
        // a tag while holding unreaped tickets deadlocks once an operation needs more requests
        // than there are tags (over 16 MiB with the defaults).
        'ops: for op in ops {
            loop {
                match self.send(op, pending.is_empty()) {
                    Ok(Some(t)) => {
                        pending.push_back(t);
                        continue 'ops;
                    }
                    Ok(None) => {
                        if let Some(t) = pending.pop_front() {
                            reap(t, &mut out, &mut first_err);
                        }
                    }
                    Err(e) => {
                        first_err = Some(e);
                        break 'ops;
                    }
                }
            }
        }
        for t in pending {
            reap(t, &mut out, &mut first_err);
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), LoopbackError> {
        let bs = u64::from(self.export.block_size);
        if offset % bs != 0 || len % bs != 0 {
            return Err(LoopbackError::Refused {
                errno: 22,
                reason: "offset or length not a multiple of the logical block size",
            });
        }
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.export.size)
        {
            return Err(LoopbackError::Refused {
                errno: 5,
                reason: "beyond the end of the device",
            });
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<(), LoopbackError> {
        if self.export.flags.contains(TransmissionFlags::READ_ONLY) {
            return Err(LoopbackError::Refused {
                errno: 5,
                reason: "the device is read-only",
            });
        }
        Ok(())
    }

    /// Splits `offset..offset+len` into pieces of at most `max` bytes.
    fn pieces(offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u32)> {
        (0..len.div_ceil(max)).map(move |i| {
            let start = i * max;
            (offset + start, (len - start).min(max) as u32)
        })
    }

    /// Reads `len` bytes at `offset`, split into requests of at most `max_request` bytes.
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, LoopbackError> {
        self.check_range(offset, len as u64)?;
        let max = u64::from(self.options.max_request.max(self.export.block_size));
        let parts = self.all(Self::pieces(offset, len as u64, max).map(|(o, l)| Op::read(o, l)))?;
        Ok(parts.concat())
    }

    fn write_with(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), LoopbackError> {
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        let flags = self.export.flags;
        let send_fua =
            fua && flags.contains(TransmissionFlags::SEND_FLUSH | TransmissionFlags::SEND_FUA);
        let max = u64::from(self.options.max_request.max(self.export.block_size));
        self.all(Self::pieces(offset, data.len() as u64, max).map(|(o, l)| {
            let start = (o - offset) as usize;
            Op {
                flags: if send_fua {
                    CommandFlags::FUA
                } else {
                    CommandFlags::NONE
                },
                ..Op::write(o, &data[start..start + l as usize])
            }
        }))?;
        // With a write cache but no FUA support, the block layer follows the write with a flush.
        if fua && !send_fua && flags.contains(TransmissionFlags::SEND_FLUSH) {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes `data` at `offset`, split into requests of at most `max_request` bytes.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), LoopbackError> {
        self.write_with(offset, data, false)
    }

    /// Writes with FUA: as FUA requests when the export supports it, else as WRITE then FLUSH.
    pub fn write_fua(&self, offset: u64, data: &[u8]) -> Result<(), LoopbackError> {
        self.write_with(offset, data, true)
    }

    /// Flushes; without `SEND_FLUSH` the device has no write cache and nothing is sent.
    pub fn flush(&self) -> Result<(), LoopbackError> {
        if !self.export.flags.contains(TransmissionFlags::SEND_FLUSH) {
            return Ok(());
        }
        self.all([Op::flush()]).map(drop)
    }

    /// Largest TRIM or WRITE_ZEROES request, as the kernel's `max_discard_sectors`.
    fn max_discard(&self) -> u64 {
        let bs = u64::from(self.export.block_size);
        u64::from(u32::MAX) / bs * bs
    }

    /// Discards a range; EOPNOTSUPP without `SEND_TRIM`, as the block layer does.
    pub fn trim(&self, offset: u64, len: u64) -> Result<(), LoopbackError> {
        self.check_writable()?;
        if !self.export.flags.contains(TransmissionFlags::SEND_TRIM) {
            return Err(LoopbackError::Refused {
                errno: 95,
                reason: "the device does not support discard",
            });
        }
        self.check_range(offset, len)?;
        self.all(
            Self::pieces(offset, len, self.max_discard()).map(|(o, l)| Op {
                command: Command::Trim,
                flags: CommandFlags::NONE,
                offset: o,
                len: l,
                data: &[],
            }),
        )
        .map(drop)
    }

    /// Zeroes a range: WRITE_ZEROES (with NO_HOLE when `no_hole`) when the export supports it
    /// and `send_write_zeroes` is set, else zero-filled WRITEs as the block layer's fallback.
    pub fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> Result<(), LoopbackError> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if !(self.options.send_write_zeroes
            && self
                .export
                .flags
                .contains(TransmissionFlags::SEND_WRITE_ZEROES))
        {
            let max = u64::from(self.options.max_request.max(self.export.block_size));
            let zeroes = vec![0u8; max.min(len) as usize];
            return self
                .all(
                    Self::pieces(offset, len, max)
                        .map(|(o, l)| Op::write(o, &zeroes[..l as usize])),
                )
                .map(drop);
        }
        let flags = if no_hole {
            CommandFlags::NO_HOLE
        } else {
            CommandFlags::NONE
        };
        self.all(
            Self::pieces(offset, len, self.max_discard()).map(|(o, l)| Op {
                command: Command::WriteZeroes,
                flags,
                offset: o,
                len: l,
                data: &[],
            }),
        )
        .map(drop)
    }

    /// Sends DISC on every connection, waits for the server to answer what is in flight and
    /// stop, and returns its result; a protocol violation seen at any time is an error too.
    pub fn shutdown(mut self) -> Result<(), LoopbackError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), LoopbackError> {
        let Some(server) = self.server.take() else {
            return Ok(());
        };
        // Like the kernel, wait for nothing: DISC goes out at once, behind what was sent.
        let disc = Request::new(Command::Disc, Cookie(0), 0, 0).encode();
        for w in &self.inner.writers {
            let mut w = lock(w);
            let _ = w.write_all(&disc);
            let _ = w.shutdown(Shutdown::Write);
        }
        let result = server.join().unwrap_or_else(|_| {
            Err(ServerError::Io {
                conn: 0,
                source: io::Error::other("server thread panicked"),
            })
        });
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        result?;
        if let Some(v) = self.violations().into_iter().next() {
            return Err(LoopbackError::Violation(v));
        }
        Ok(())
    }
}

impl Drop for LoopbackKernel {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The kernel's socket, handed to the test: send any bytes, read replies one by one.
///
/// ```
/// use userblk::link::loopback::RawKernel;
/// use userblk::proto::{Command, Cookie, Errno, Request};
/// use userblk::MemDevice;
///
/// let mut raw = RawKernel::start(MemDevice::new(1 << 20))?;
/// raw.send_request(&Request::new(Command::Read, Cookie(7), 1 << 20, 512), &[])?;
/// let reply = raw.recv_reply()?;
/// assert_eq!((reply.cookie, reply.errno()), (Cookie(7), Some(Errno::EINVAL)));
/// raw.finish()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct RawKernel {
    sock: UnixStream,
    export: Export,
    server: Option<JoinHandle<Result<(), ServerError>>>,
}

impl RawKernel {
    /// Starts a server for `device` with one connection whose other end the test holds.
    pub fn start<D: BlockDevice + 'static>(device: D) -> Result<RawKernel, LoopbackError> {
        RawKernel::with_options(device, ServerOptions::default())
    }

    /// Same, with server options.
    pub fn with_options<D: BlockDevice + 'static>(
        device: D,
        options: ServerOptions,
    ) -> Result<RawKernel, LoopbackError> {
        let export = export_of(&device)?;
        let (link, mut ends) = LoopbackLink::new(1)?;
        let mut server = Server::with_options(device, link, options)?;
        let server = thread::Builder::new()
            .name("userblk-raw-server".into())
            .spawn(move || server.run())?;
        let sock = ends.pop().ok_or_else(|| io::Error::other("no socket"))?;
        Ok(RawKernel {
            sock,
            export,
            server: Some(server),
        })
    }

    /// What the server advertised.
    pub fn export(&self) -> &Export {
        &self.export
    }

    /// Sends raw bytes.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.sock.write_all(bytes)
    }

    /// Sends a request header and its payload.
    pub fn send_request(&mut self, req: &Request, payload: &[u8]) -> io::Result<()> {
        write_all_vectored(
            &mut self.sock,
            &mut [IoSlice::new(&req.encode()), IoSlice::new(payload)],
        )
    }

    /// Reads one reply header; EOF is `Disconnected`.
    pub fn recv_reply(&mut self) -> Result<Reply, LoopbackError> {
        let mut header = [0u8; REPLY_LEN];
        let got = read_full(&mut self.sock, &mut header)?;
        if got == 0 {
            return Err(LoopbackError::Disconnected { conn: 0 });
        }
        Reply::parse(&header[..got]).map_err(|e| {
            LoopbackError::Violation(Violation {
                conn: 0,
                what: e.to_string(),
            })
        })
    }

    /// Reads exactly `len` bytes of reply data.
    pub fn recv_data(&mut self, len: usize) -> Result<Vec<u8>, LoopbackError> {
        let mut data = vec![0u8; len];
        let got = read_full(&mut self.sock, &mut data)?;
        if got < len {
            return Err(LoopbackError::Disconnected { conn: 0 });
        }
        Ok(data)
    }

    /// Reads until the server closes the connection; returns the bytes that came first.
    pub fn recv_to_eof(&mut self) -> io::Result<Vec<u8>> {
        let mut rest = Vec::new();
        self.sock.read_to_end(&mut rest)?;
        Ok(rest)
    }

    /// Sends DISC and returns the server's result.
    pub fn disconnect(mut self) -> Result<(), ServerError> {
        let _ = self.send(&Request::new(Command::Disc, Cookie(0), 0, 0).encode());
        self.join()
    }

    /// Closes the kernel's side (EOF for the server) and returns the server's result.
    pub fn finish(mut self) -> Result<(), ServerError> {
        let _ = self.sock.shutdown(Shutdown::Write);
        self.join()
    }

    fn join(&mut self) -> Result<(), ServerError> {
        match self.server.take() {
            Some(h) => h.join().unwrap_or_else(|_| {
                Err(ServerError::Io {
                    conn: 0,
                    source: io::Error::other("server thread panicked"),
                })
            }),
            None => Ok(()),
        }
    }
}

impl Drop for RawKernel {
    fn drop(&mut self) {
        let _ = self.sock.shutdown(Shutdown::Both);
        let _ = self.join();
    }
}
