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
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use userblk::link::net::tls::{self, TlsBridge, TlsError};
use userblk::link::net::wire::{
    self, BlockSizes, Info, InfoRequest, MetaContextRequest, Opt, OptionReplyHeader, Rep,
    WireError, BASE_ALLOCATION, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES, GREETING_LEN, OPTION_REPLY_HEADER_LEN,
};
use userblk::link::net::Socket;
use userblk::proto::{Command, CommandFlags, Cookie, Request, TransmissionFlags};
use userblk::Capabilities;

use super::replies::{close, read_replies};
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

pub(super) fn io_err(what: &'static str) -> impl Fn(io::Error) -> ClientError {
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

impl ExportInfo {
    /// The capabilities the server advertises: what a device served like this would say. TRIM
    /// is never taken to read back zeroes: the protocol does not promise it.
    pub fn capabilities(&self) -> Capabilities {
        let f = self.flags;
        Capabilities {
            read_only: f.contains(TransmissionFlags::READ_ONLY),
            flush: f.contains(TransmissionFlags::SEND_FLUSH),
            fua: f.contains(TransmissionFlags::SEND_FUA),
            trim: f.contains(TransmissionFlags::SEND_TRIM),
            trim_zeroes: false,
            write_zeroes: f.contains(TransmissionFlags::SEND_WRITE_ZEROES),
            ..Capabilities::default()
        }
    }
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
pub(super) enum Answer {
    Done,
    Data(Vec<u8>),
    Extents(Vec<Extent>),
}

/// A request waiting for its reply, as the reader thread sees it.
pub(super) struct Slot {
    pub(super) command: Command,
    pub(super) offset: u64,
    pub(super) len: u32,
    pub(super) tx: mpsc::Sender<Result<Answer, ClientError>>,
    /// READ: the data so far, and the ranges (relative) covered by chunks.
    pub(super) data: Vec<u8>,
    pub(super) covered: Vec<(u64, u64)>,
    pub(super) extents: Option<Vec<Extent>>,
    pub(super) error: Option<(u32, String)>,
}

pub(super) struct Shared {
    pub(super) writer: Mutex<Socket>,
    pub(super) slots: Mutex<Slots>,
    pub(super) cookies: AtomicU64,
    pub(super) structured: bool,
    pub(super) context: Option<u32>,
}

#[derive(Default)]
pub(super) struct Slots {
    pub(super) waiting: HashMap<u64, Slot>,
    /// Why the connection is closed, once it is.
    pub(super) closed: Option<String>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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

pub(super) fn read_exact(
    s: &mut impl Read,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), ClientError> {
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
