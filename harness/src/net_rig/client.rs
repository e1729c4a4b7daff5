//! [`NbdClient`]: the client side of NBD, strict about what the server sends, so that the harness
//! checks servers as much as devices. The handshake (fixed newstyle, STARTTLS, structured
//! replies, `base:allocation`, `NBD_OPT_GO` with `NBD_OPT_EXPORT_NAME` as fallback), then requests
//! from any number of threads at once, matched to replies by cookie by one reader thread.
//!
//! Every reply is checked: a known cookie, the right magic, no data after a simple error reply,
//! structured chunks of a type valid for the request, inside its range, not overlapping, covering
//! all of a READ before the final chunk, one block-status chunk per context. A server that breaks
//! any of these gets a [`ClientError::Protocol`] naming what it did, and the connection is closed.

use std::collections::HashMap;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use userblk::link::net::tls::{self, TlsBridge, TlsError};
use userblk::link::net::wire::{
    self, chunk, BlockSizes, Info, InfoRequest, MetaContextRequest, Opt, OptionReplyHeader, Rep,
    WireError, BASE_ALLOCATION, CHUNK_HEADER_LEN, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, GREETING_LEN, OPTION_REPLY_HEADER_LEN, REPLY_FLAG_DONE,
    STRUCTURED_REPLY_MAGIC,
};
use userblk::link::net::Socket;
use userblk::proto::{
    Command, CommandFlags, Cookie, Reply, Request, TransmissionFlags, REPLY_LEN, REPLY_MAGIC,
};

use super::uri::{NbdAddr, NbdUri};

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Connecting or talking failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The server refused an option with an error reply.
    #[error("the server answered {option} with {reply}{}", if .message.is_empty() { String::new() } else { format!(": {}", .message) })]
    Refused {
        /// The option.
        option: Opt,
        /// The error reply.
        reply: Rep,
        /// Its message, if any.
        message: String,
    },
    /// The server broke the protocol; the connection is closed.
    #[error("protocol violation by the server: {0}")]
    Protocol(String),
    /// The request failed with this errno.
    #[error("the server replied errno {errno}{}", if .message.is_empty() { String::new() } else { format!(": {}", .message) })]
    Errno {
        /// The NBD errno.
        errno: u32,
        /// An error chunk's message, if any.
        message: String,
    },
    /// No reply in time; the connection is closed.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The connection is closed (after an earlier error, or a disconnect).
    #[error("the connection is closed: {0}")]
    Closed(String),
}

impl From<WireError> for ClientError {
    fn from(e: WireError) -> ClientError {
        ClientError::Protocol(e.to_string())
    }
}

fn io_err(what: &'static str) -> impl Fn(io::Error) -> ClientError {
    move |source| ClientError::Io { what, source }
}

/// How a client negotiates.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Ask for structured replies. Default: true.
    pub structured_replies: bool,
    /// Ask for `base:allocation` (needs structured replies). Default: true.
    pub block_status: bool,
    /// How long to wait for the handshake, and for each reply. Default: 60 s.
    pub timeout: Duration,
    /// TLS: the client configuration and the name the server's certificate must carry. Set from
    /// the URI's `tls-certificates` by [`ClientOptions::for_uri`].
    pub tls: Option<(Arc<rustls::ClientConfig>, String)>,
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        ClientOptions {
            structured_replies: true,
            block_status: true,
            timeout: Duration::from_secs(60),
            tls: None,
        }
    }
}

impl ClientOptions {
    /// The defaults, with TLS from `uri` when it asks for it: `tls-certificates=DIR` holds
    /// `ca-cert.pem` and optionally `client-cert.pem` + `client-key.pem`.
    pub fn for_uri(uri: &NbdUri) -> Result<ClientOptions, ClientError> {
        let mut o = ClientOptions::default();
        if uri.tls {
            let dir = uri.tls_certificates.as_deref().ok_or_else(|| {
                ClientError::Tls(TlsError::Config(
                    "an nbds URI needs tls-certificates=DIR (with ca-cert.pem)".into(),
                ))
            })?;
            let cert = dir.join("client-cert.pem");
            let key = dir.join("client-key.pem");
            let identity =
                (cert.exists() && key.exists()).then_some((cert.as_path(), key.as_path()));
            let config = tls::client_config(&dir.join("ca-cert.pem"), identity)?;
            let name = match &uri.addr {
                NbdAddr::Tcp { host, .. } => host.clone(),
                NbdAddr::Unix(_) => "localhost".into(),
            };
            o.tls = Some((config, name));
        }
        Ok(o)
    }
}

/// What the handshake learnt about the export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: TransmissionFlags,
    /// `NBD_INFO_BLOCK_SIZE`, if the server sent it.
    pub block_sizes: Option<BlockSizes>,
    /// `NBD_INFO_NAME`, if sent.
    pub name: Option<String>,
    /// `NBD_INFO_DESCRIPTION`, if sent.
    pub description: Option<String>,
    /// Structured replies are on.
    pub structured_replies: bool,
    /// The context id of `base:allocation`, if selected.
    pub base_allocation: Option<u32>,
    /// The session runs over TLS.
    pub tls: bool,
}

/// One extent of a block-status reply: its length and `base:allocation` flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub len: u32,
    /// `STATE_HOLE`, `STATE_ZERO`.
    pub flags: u32,
}

/// What a reply carried.
#[derive(Debug)]
enum Answer {
    Done,
    Data(Vec<u8>),
    Extents(Vec<Extent>),
}

/// A request waiting for its reply, as the reader thread sees it.
struct Slot {
    command: Command,
    offset: u64,
    len: u32,
    tx: mpsc::Sender<Result<Answer, ClientError>>,
    /// READ: the data so far, and the ranges (relative) covered by chunks.
    data: Vec<u8>,
    covered: Vec<(u64, u64)>,
    extents: Option<Vec<Extent>>,
    error: Option<(u32, String)>,
}

struct Shared {
    writer: Mutex<Socket>,
    slots: Mutex<Slots>,
    cookies: AtomicU64,
    structured: bool,
    context: Option<u32>,
}

#[derive(Default)]
struct Slots {
    waiting: HashMap<u64, Slot>,
    /// Why the connection is closed, once it is.
    closed: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A connected NBD client in the transmission phase.
pub struct NbdClient {
    shared: Arc<Shared>,
    info: ExportInfo,
    timeout: Duration,
    reader: Option<JoinHandle<()>>,
    bridge: Option<TlsBridge>,
    closer: Socket,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// Bound on option reply data read from a server (its longest legitimate reply is a few KiB).
const MAX_OPTION_REPLY: u32 = 1 << 20;

fn read_exact(s: &mut impl Read, buf: &mut [u8], what: &'static str) -> Result<(), ClientError> {
    s.read_exact(buf).map_err(io_err(what))
}

fn read_option_reply(
    s: &mut impl Read,
    option: Opt,
) -> Result<(OptionReplyHeader, Vec<u8>), ClientError> {
    let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
    read_exact(s, &mut h, "reading an option reply")?;
    let h = OptionReplyHeader::parse(&h)?;
    if h.option != option {
        return Err(ClientError::Protocol(format!(
            "reply for {} while waiting for {option}",
            h.option
        )));
    }
    if h.len > MAX_OPTION_REPLY {
        return Err(ClientError::Protocol(format!(
            "{} bytes of option reply data",
            h.len
        )));
    }
    let mut data = vec![0u8; h.len as usize];
    read_exact(s, &mut data, "reading option reply data")?;
    Ok((h, data))
}

fn refused(option: Opt, reply: Rep, data: &[u8]) -> ClientError {
    ClientError::Refused {
        option,
        reply,
        message: String::from_utf8_lossy(data).into_owned(),
    }
}

/// Sends an option and expects a lone ACK; `Ok(false)` for `NBD_REP_ERR_UNSUP`.
fn simple_option(s: &mut (impl Read + Write), option: Opt) -> Result<bool, ClientError> {
    s.write_all(&wire::encode_option(option, &[]))
        .map_err(io_err("sending an option"))?;
    let (h, data) = read_option_reply(s, option)?;
    match h.reply {
        Rep::ACK => Ok(true),
        Rep::ERR_UNSUP => Ok(false),
        r => Err(refused(option, r, &data)),
    }
}

/// The options after the greeting (and TLS): structured replies, meta context, GO.
fn negotiate(
    s: &mut (impl Read + Write),
    export: &str,
    options: &ClientOptions,
    no_zeroes: bool,
) -> Result<ExportInfo, ClientError> {
    let structured = options.structured_replies && simple_option(s, Opt::STRUCTURED_REPLY)?;
    let mut base_allocation = None;
    if structured && options.block_status {
        let req = MetaContextRequest {
            name: export.to_string(),
            queries: vec![BASE_ALLOCATION.to_string()],
        };
        s.write_all(&wire::encode_option(Opt::SET_META_CONTEXT, &req.encode()))
            .map_err(io_err("sending NBD_OPT_SET_META_CONTEXT"))?;
        loop {
            let (h, data) = read_option_reply(s, Opt::SET_META_CONTEXT)?;
            match h.reply {
                Rep::META_CONTEXT => {
                    let (id, name) = wire::parse_meta_context_reply(&data)?;
                    if name != BASE_ALLOCATION {
                        return Err(ClientError::Protocol(format!(
                            "context {name:?} selected, only {BASE_ALLOCATION} asked for"
                        )));
                    }
                    base_allocation = Some(id);
                }
                Rep::ACK => break,
                // Not supported: no block status, which is allowed.
                r if r.is_error() => {
                    base_allocation = None;
                    break;
                }
                r => {
                    return Err(ClientError::Protocol(format!(
                        "{r} in reply to NBD_OPT_SET_META_CONTEXT"
                    )))
                }
            }
        }
    }
    let go = InfoRequest {
        name: export.to_string(),
        requests: vec![
            wire::info::BLOCK_SIZE,
            wire::info::NAME,
            wire::info::DESCRIPTION,
        ],
    };
    s.write_all(&wire::encode_option(Opt::GO, &go.encode()))
        .map_err(io_err("sending NBD_OPT_GO"))?;
    let mut info = ExportInfo {
        size: 0,
        flags: TransmissionFlags(0),
        block_sizes: None,
        name: None,
        description: None,
        structured_replies: structured,
        base_allocation,
        tls: false,
    };
    let mut have_export = false;
    loop {
        let (h, data) = read_option_reply(s, Opt::GO)?;
        match h.reply {
            Rep::INFO => match Info::parse(&data)? {
                Info::Export(e) => {
                    info.size = e.size;
                    info.flags = e.flags;
                    have_export = true;
                }
                Info::BlockSize(b) => info.block_sizes = Some(b),
                Info::Name(n) => info.name = Some(n),
                Info::Description(d) => info.description = Some(d),
                Info::Other(_) => {}
            },
            Rep::ACK if have_export => return Ok(info),
            Rep::ACK => {
                return Err(ClientError::Protocol(
                    "NBD_REP_ACK to NBD_OPT_GO without NBD_INFO_EXPORT".into(),
                ))
            }
            // An old server: fall back to NBD_OPT_EXPORT_NAME, which cannot carry errors.
            Rep::ERR_UNSUP => {
                s.write_all(&wire::encode_option(Opt::EXPORT_NAME, export.as_bytes()))
                    .map_err(io_err("sending NBD_OPT_EXPORT_NAME"))?;
                let mut reply = vec![0u8; if no_zeroes { 10 } else { 134 }];
                read_exact(s, &mut reply, "reading the export")?;
                info.size = u64::from_be_bytes(reply[..8].try_into().unwrap_or_default());
                info.flags = TransmissionFlags(u16::from_be_bytes([reply[8], reply[9]]));
                return Ok(info);
            }
            r if r.is_error() => return Err(refused(Opt::GO, r, &data)),
            r => return Err(ClientError::Protocol(format!("{r} in reply to NBD_OPT_GO"))),
        }
    }
}

impl NbdClient {
    /// Connects to `uri` and negotiates (TLS from the URI when it asks for it).
    pub fn connect(uri: &NbdUri) -> Result<NbdClient, ClientError> {
        NbdClient::connect_with(uri, &ClientOptions::for_uri(uri)?)
    }

    /// Connects with explicit options.
    pub fn connect_with(uri: &NbdUri, options: &ClientOptions) -> Result<NbdClient, ClientError> {
        let mut sock = match &uri.addr {
            NbdAddr::Tcp { host, port } => Socket::tcp(
                TcpStream::connect((host.as_str(), *port)).map_err(io_err("connecting"))?,
            ),
            NbdAddr::Unix(p) => Socket::unix(UnixStream::connect(p).map_err(io_err("connecting"))?),
        };
        sock.set_deadline(Some(Instant::now() + options.timeout))
            .map_err(io_err("setting a deadline"))?;
        let mut greeting = [0u8; GREETING_LEN];
        read_exact(&mut sock, &mut greeting, "reading the greeting")?;
        let server_flags = wire::parse_greeting(&greeting)?;
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(ClientError::Protocol(
                "the server does not speak fixed newstyle".into(),
            ));
        }
        let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
        let flags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        sock.write_all(&flags.to_be_bytes())
            .map_err(io_err("sending client flags"))?;
        let (info, stream, bridge) = match (&options.tls, uri.tls) {
            (Some((config, name)), true) => {
                if !simple_option(&mut sock, Opt::STARTTLS)? {
                    return Err(refused(Opt::STARTTLS, Rep::ERR_UNSUP, &[]));
                }
                let mut conn = tls::client_session(Arc::clone(config), name)?;
                tls::complete_handshake(&mut conn, &mut sock).map_err(io_err("TLS handshake"))?;
                let mut info = negotiate(
                    &mut rustls::Stream::new(&mut conn, &mut sock),
                    &uri.export,
                    options,
                    no_zeroes,
                )?;
                info.tls = true;
                sock.set_deadline(None)
                    .map_err(io_err("clearing the deadline"))?;
                let mut bridge = TlsBridge::start(rustls::Connection::Client(conn), sock)
                    .map_err(io_err("starting the TLS pumps"))?;
                let stream = bridge
                    .take_stream()
                    .map(Socket::unix)
                    .ok_or_else(|| ClientError::Closed("no TLS stream".into()))?;
                (info, stream, Some(bridge))
            }
            (None, true) => {
                return Err(ClientError::Tls(TlsError::Config(
                    "TLS asked for but no client configuration".into(),
                )))
            }
            (_, false) => {
                let info = negotiate(&mut sock, &uri.export, options, no_zeroes)?;
                sock.set_deadline(None)
                    .map_err(io_err("clearing the deadline"))?;
                (info, sock, None)
            }
        };
        let reader_stream = stream.try_clone().map_err(io_err("dup"))?;
        let closer = stream.try_clone().map_err(io_err("dup"))?;
        let shared = Arc::new(Shared {
            writer: Mutex::new(stream),
            slots: Mutex::new(Slots::default()),
            cookies: AtomicU64::new(1),
            structured: info.structured_replies,
            context: info.base_allocation,
        });
        let s2 = Arc::clone(&shared);
        let reader = thread::Builder::new()
            .name("nbd-client-reader".into())
            .spawn(move || read_replies(&s2, reader_stream))
            .map_err(io_err("spawning the reply reader"))?;
        Ok(NbdClient {
            shared,
            info,
            timeout: options.timeout,
            reader: Some(reader),
            bridge,
            closer,
        })
    }

    /// What the handshake learnt.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    fn request(
        &self,
        command: Command,
        flags: CommandFlags,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<Answer, ClientError> {
        let cookie = self.shared.cookies.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        {
            let mut slots = lock(&self.shared.slots);
            if let Some(why) = &slots.closed {
                return Err(ClientError::Closed(why.clone()));
            }
            slots.waiting.insert(
                cookie,
                Slot {
                    command,
                    offset,
                    len,
                    tx,
                    // Allocated when the first data chunk comes: a request the server refuses
                    // (a 4 GiB READ, say) costs nothing.
                    data: Vec::new(),
                    covered: Vec::new(),
                    extents: None,
                    error: None,
                },
            );
        }
        let mut req = Request::new(command, Cookie(cookie), offset, len);
        req.flags = flags;
        {
            let mut w = lock(&self.shared.writer);
            let sent = w
                .write_all(&req.encode())
                .and_then(|()| w.write_all(payload));
            if let Err(e) = sent {
                drop(w);
                lock(&self.shared.slots).waiting.remove(&cookie);
                return Err(ClientError::Io {
                    what: "sending a request",
                    source: e,
                });
            }
        }
        match rx.recv_timeout(self.timeout) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // A server that does not answer: the connection is of no further use.
                close(
                    &self.shared,
                    format!("no reply to {command} within {:?}", self.timeout),
                );
                let _ = self.closer.shutdown(Shutdown::Both);
                Err(ClientError::Timeout(self.timeout))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(ClientError::Closed(
                lock(&self.shared.slots)
                    .closed
                    .clone()
                    .unwrap_or_else(|| "the reader stopped".into()),
            )),
        }
    }

    /// The largest READ or WRITE sent as one request: the server's maximum payload, at most
    /// 32 MiB (what the protocol says every server takes).
    pub fn max_payload(&self) -> u64 {
        let max = self.info.block_sizes.map_or(32 << 20, |b| b.maximum);
        u64::from(max.clamp(4096, 32 << 20))
    }

    /// Reads `len` bytes at `offset` (in pieces of at most [`max_payload`](Self::max_payload)).
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::with_capacity(len);
        for (o, l) in pieces(offset, len as u64, self.max_payload()) {
            match self.request(Command::Read, CommandFlags::NONE, o, l as u32, &[])? {
                Answer::Data(d) => out.extend_from_slice(&d),
                other => {
                    return Err(ClientError::Protocol(format!(
                        "READ answered with {other:?}"
                    )))
                }
            }
        }
        Ok(out)
    }

    /// Writes `data` at `offset`, with FUA when `fua`.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        let flags = if fua {
            CommandFlags::FUA
        } else {
            CommandFlags::NONE
        };
        let mut at = 0usize;
        for (o, l) in pieces(offset, data.len() as u64, self.max_payload()) {
            let l = l as usize;
            self.request(Command::Write, flags, o, l as u32, &data[at..at + l])?;
            at += l;
        }
        Ok(())
    }

    /// Sends FLUSH.
    pub fn flush(&self) -> Result<(), ClientError> {
        self.request(Command::Flush, CommandFlags::NONE, 0, 0, &[])
            .map(drop)
    }

    /// Sends TRIM (in pieces below 4 GiB).
    pub fn trim(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        for (o, l) in pieces(offset, len, max_effect(self.info.block_sizes)) {
            self.request(Command::Trim, CommandFlags::NONE, o, l as u32, &[])?;
        }
        Ok(())
    }

    /// Sends WRITE_ZEROES (NO_HOLE when `no_hole`; in pieces below 4 GiB).
    pub fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> Result<(), ClientError> {
        let flags = if no_hole {
            CommandFlags::NO_HOLE
        } else {
            CommandFlags::NONE
        };
        for (o, l) in pieces(offset, len, max_effect(self.info.block_sizes)) {
            self.request(Command::WriteZeroes, flags, o, l as u32, &[])?;
        }
        Ok(())
    }

    /// Asks for `base:allocation` extents from `offset` (one with `req_one`).
    pub fn block_status(
        &self,
        offset: u64,
        len: u32,
        req_one: bool,
    ) -> Result<Vec<Extent>, ClientError> {
        if self.info.base_allocation.is_none() {
            return Err(ClientError::Closed(
                "base:allocation was not negotiated".into(),
            ));
        }
        let flags = if req_one {
            wire::CMD_FLAG_REQ_ONE
        } else {
            CommandFlags::NONE
        };
        match self.request(Command::BlockStatus, flags, offset, len, &[])? {
            Answer::Extents(e) => Ok(e),
            other => Err(ClientError::Protocol(format!(
                "BLOCK_STATUS answered with {other:?}"
            ))),
        }
    }

    /// Sends one request exactly as given (no bounds, alignment or read-only checks, no
    /// splitting) and waits for its reply: a READ's data, nothing for other commands.
    pub fn raw_request(
        &self,
        command: Command,
        flags: CommandFlags,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<Vec<u8>, ClientError> {
        match self.request(command, flags, offset, len, payload)? {
            Answer::Data(d) => Ok(d),
            Answer::Done | Answer::Extents(_) => Ok(Vec::new()),
        }
    }

    /// Sends raw bytes (a hand-made request, garbage) as they are, for tests of servers.
    pub fn send_raw(&self, bytes: &[u8]) -> Result<(), ClientError> {
        lock(&self.shared.writer)
            .write_all(bytes)
            .map_err(io_err("sending raw bytes"))
    }

    /// Sends DISC and waits until the server has closed the connection.
    pub fn disconnect(mut self) -> Result<(), ClientError> {
        self.disconnect_inner()
    }

    fn disconnect_inner(&mut self) -> Result<(), ClientError> {
        let Some(reader) = self.reader.take() else {
            return Ok(());
        };
        let disc = Request::new(Command::Disc, Cookie(0), 0, 0).encode();
        let sent = lock(&self.shared.writer).write_all(&disc);
        let _ = self.closer.shutdown(Shutdown::Write);
        // The server closes after DISC; a server that does not is cut off after the timeout.
        let deadline = Instant::now() + self.timeout;
        while !reader.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        let _ = self.closer.shutdown(Shutdown::Both);
        let _ = reader.join();
        if let Some(b) = self.bridge.take() {
            let _ = b.join();
        }
        let closed = lock(&self.shared.slots).closed.clone();
        match closed {
            Some(why) if why.starts_with("protocol violation") => Err(ClientError::Protocol(why)),
            _ => sent.map_err(io_err("sending DISC")),
        }
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        let _ = self.disconnect_inner();
    }
}

/// Splits `offset..offset+len` into pieces of at most `max`.
fn pieces(offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
    let mut done = 0;
    std::iter::from_fn(move || {
        if done >= len && !(len == 0 && done == 0) {
            return None;
        }
        let l = (len - done).min(max);
        let piece = (offset.wrapping_add(done), l);
        done += l.max(1);
        Some(piece)
    })
}

/// The longest TRIM or WRITE_ZEROES sent at once: the largest multiple of the minimum block
/// size that fits the 32-bit length.
fn max_effect(b: Option<BlockSizes>) -> u64 {
    let bs = u64::from(b.map_or(512, |b| b.minimum.max(1)));
    u64::from(u32::MAX) / bs * bs
}

/// Marks the connection closed and fails every waiting request.
fn close(shared: &Shared, why: String) {
    let mut slots = lock(&shared.slots);
    if slots.closed.is_none() {
        slots.closed = Some(why.clone());
    }
    for (_, slot) in slots.waiting.drain() {
        let err = if why.starts_with("protocol violation") {
            ClientError::Protocol(why.clone())
        } else {
            ClientError::Closed(why.clone())
        };
        let _ = slot.tx.send(Err(err));
    }
}

/// The reader thread: every reply, checked, to its waiting request.
fn read_replies(shared: &Shared, stream: Socket) {
    let mut r = BufReader::with_capacity(256 << 10, stream);
    let why = match read_loop(shared, &mut r) {
        Ok(()) => "the server closed the connection".to_string(),
        Err(ClientError::Protocol(m)) => format!("protocol violation: {m}"),
        Err(e) => e.to_string(),
    };
    close(shared, why);
}

fn violation<T>(msg: String) -> Result<T, ClientError> {
    Err(ClientError::Protocol(msg))
}

fn read_loop(shared: &Shared, r: &mut impl Read) -> Result<(), ClientError> {
    loop {
        let mut magic = [0u8; 4];
        match r.read(&mut magic[..1]) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("reading a reply")(e)),
        }
        read_exact(r, &mut magic[1..], "reading a reply")?;
        match u32::from_be_bytes(magic) {
            REPLY_MAGIC => simple_reply(shared, r, magic)?,
            STRUCTURED_REPLY_MAGIC => structured_chunk(shared, r, magic)?,
            other => return violation(format!("reply magic {other:#010x}")),
        }
    }
}

fn take_slot(shared: &Shared, cookie: u64, what: &str) -> Result<Slot, ClientError> {
    lock(&shared.slots).waiting.remove(&cookie).map_or_else(
        || {
            violation(format!(
                "{what} for cookie {cookie:#x}, which is not in flight"
            ))
        },
        Ok,
    )
}

fn simple_reply(shared: &Shared, r: &mut impl Read, magic: [u8; 4]) -> Result<(), ClientError> {
    let mut h = [0u8; REPLY_LEN];
    h[..4].copy_from_slice(&magic);
    read_exact(r, &mut h[4..], "reading a reply")?;
    let reply = Reply::parse(&h)?;
    let slot = take_slot(shared, reply.cookie.0, "a simple reply")?;
    if let Some(errno) = reply.errno() {
        let _ = slot.tx.send(Err(ClientError::Errno {
            errno: errno.0,
            message: String::new(),
        }));
        return Ok(());
    }
    let answer = match slot.command {
        Command::Read if shared.structured => {
            let _ = slot.tx.send(Err(ClientError::Protocol(
                "simple reply to READ after structured replies were negotiated".into(),
            )));
            return violation(
                "simple reply to READ after structured replies were negotiated".into(),
            );
        }
        Command::Read => {
            let mut data = vec![0u8; slot.len as usize];
            read_exact(r, &mut data, "reading READ data")?;
            Answer::Data(data)
        }
        Command::BlockStatus => {
            return violation("simple success reply to BLOCK_STATUS".into());
        }
        _ => Answer::Done,
    };
    let _ = slot.tx.send(Ok(answer));
    Ok(())
}

impl From<userblk::proto::ReplyParseError> for ClientError {
    fn from(e: userblk::proto::ReplyParseError) -> ClientError {
        ClientError::Protocol(e.to_string())
    }
}

/// The largest chunk payload accepted: a 32 MiB READ plus its offset, or a block-status chunk
/// of 2^20 extents.
const MAX_CHUNK: u32 = (32 << 20) + 8;

fn structured_chunk(shared: &Shared, r: &mut impl Read, magic: [u8; 4]) -> Result<(), ClientError> {
    if !shared.structured {
        return violation("structured reply chunk without structured replies negotiated".into());
    }
    let mut h = [0u8; CHUNK_HEADER_LEN];
    h[..4].copy_from_slice(&magic);
    read_exact(r, &mut h[4..], "reading a reply chunk")?;
    let h = wire::ChunkHeader::parse(&h)?;
    // A READ's data chunk may be as long as what was asked for (a server that advertised no
    // maximum may serve more than 32 MiB at once); anything else stays small.
    let read_len = lock(&shared.slots)
        .waiting
        .get(&h.cookie)
        .filter(|s| s.command == Command::Read)
        .map_or(0, |s| s.len.saturating_add(8));
    if h.len > MAX_CHUNK.max(read_len) {
        return violation(format!("chunk of {} bytes", h.len));
    }
    let mut payload = vec![0u8; h.len as usize];
    read_exact(r, &mut payload, "reading a chunk payload")?;
    let mut slots = lock(&shared.slots);
    let Some(slot) = slots.waiting.get_mut(&h.cookie) else {
        return violation(format!(
            "chunk for cookie {:#x}, which is not in flight",
            h.cookie
        ));
    };
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let be64 = |b: &[u8], at: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[at..at + 8]);
        u64::from_be_bytes(a)
    };
    let is_read = slot.command == Command::Read;
    match h.kind {
        chunk::NONE => {
            if h.len != 0 || h.flags & REPLY_FLAG_DONE == 0 {
                return violation("NBD_REPLY_TYPE_NONE with a payload or without DONE".into());
            }
        }
        chunk::OFFSET_DATA | chunk::OFFSET_HOLE if is_read => {
            let (off, len) = if h.kind == chunk::OFFSET_DATA {
                if h.len < 9 {
                    return violation(format!("OFFSET_DATA chunk of {} bytes", h.len));
                }
                (be64(&payload, 0), u64::from(h.len) - 8)
            } else {
                if h.len != 12 {
                    return violation(format!("OFFSET_HOLE chunk of {} bytes", h.len));
                }
                let l = u64::from(be32(&payload, 8));
                if l == 0 {
                    return violation("OFFSET_HOLE of 0 bytes".into());
                }
                (be64(&payload, 0), l)
            };
            let start = off.wrapping_sub(slot.offset);
            if off < slot.offset || start + len > u64::from(slot.len) {
                return violation(format!(
                    "content chunk {off}+{len} outside the READ {}+{}",
                    slot.offset, slot.len
                ));
            }
            if slot
                .covered
                .iter()
                .any(|&(s, l)| start < s + l && s < start + len)
            {
                return violation(format!("content chunk {off}+{len} overlaps an earlier one"));
            }
            slot.covered.push((start, len));
            if h.kind == chunk::OFFSET_DATA {
                if slot.data.is_empty() {
                    slot.data = vec![0u8; slot.len as usize];
                }
                slot.data[start as usize..(start + len) as usize].copy_from_slice(&payload[8..]);
            }
        }
        chunk::BLOCK_STATUS if slot.command == Command::BlockStatus => {
            if h.len < 12 || (h.len - 4) % 8 != 0 {
                return violation(format!("BLOCK_STATUS chunk of {} bytes", h.len));
            }
            if Some(be32(&payload, 0)) != shared.context {
                return violation(format!("block status for context {}", be32(&payload, 0)));
            }
            if slot.extents.is_some() {
                return violation("two BLOCK_STATUS chunks for one context".into());
            }
            let extents: Vec<Extent> = payload[4..]
                .chunks(8)
                .map(|d| Extent {
                    len: be32(d, 0),
                    flags: be32(d, 4),
                })
                .collect();
            if extents.iter().any(|e| e.len == 0) {
                return violation("an extent of length 0".into());
            }
            slot.extents = Some(extents);
        }
        chunk::ERROR | chunk::ERROR_OFFSET => {
            let fixed = if h.kind == chunk::ERROR { 6 } else { 14 };
            if h.len < fixed {
                return violation(format!("error chunk of {} bytes", h.len));
            }
            let errno = be32(&payload, 0);
            let mlen = usize::from(u16::from_be_bytes([payload[4], payload[5]]));
            if errno == 0 || mlen > h.len as usize - fixed as usize {
                return violation(format!(
                    "error chunk with errno {errno}, message {mlen} bytes"
                ));
            }
            let message = String::from_utf8_lossy(&payload[6..6 + mlen]).into_owned();
            slot.error.get_or_insert((errno, message));
        }
        other if other & 0x8000 != 0 => {
            slot.error
                .get_or_insert((5, format!("unknown error chunk type {other:#x}")));
        }
        other => return violation(format!("chunk type {other} in reply to {}", slot.command)),
    }
    if h.flags & REPLY_FLAG_DONE == 0 {
        return Ok(());
    }
    let Some(slot) = slots.waiting.remove(&h.cookie) else {
        return Ok(());
    };
    drop(slots);
    let result = if let Some((errno, message)) = slot.error {
        Err(ClientError::Errno { errno, message })
    } else {
        match slot.command {
            Command::Read => {
                let covered: u64 = slot.covered.iter().map(|c| c.1).sum();
                if covered != u64::from(slot.len) {
                    let msg = format!(
                        "READ {}+{} done after {covered} bytes of content",
                        slot.offset, slot.len
                    );
                    let _ = slot.tx.send(Err(ClientError::Protocol(msg.clone())));
                    return violation(msg);
                }
                let mut data = slot.data;
                // All holes: zeroes, made only now.
                data.resize(slot.len as usize, 0);
                Ok(Answer::Data(data))
            }
            Command::BlockStatus => match slot.extents {
                Some(e) => Ok(Answer::Extents(e)),
                None => {
                    let msg = "BLOCK_STATUS done without a status chunk".to_string();
                    let _ = slot.tx.send(Err(ClientError::Protocol(msg.clone())));
                    return violation(msg);
                }
            },
            _ => Ok(Answer::Done),
        }
    };
    let _ = slot.tx.send(result);
    Ok(())
}
