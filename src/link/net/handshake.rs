//! The server side of the fixed newstyle handshake (`doc/proto.md`, "Handshake"): the greeting,
//! then one option at a time until the client enters transmission (`NBD_OPT_GO`,
//! `NBD_OPT_EXPORT_NAME`), aborts, or asks for TLS, which the caller starts before it calls
//! [`Handshake::options`] again on the encrypted stream.
//!
//! Bounded against hostile clients: option data is read only up to [`MAX_OPTION_LEN`], at most
//! [`MAX_OPTIONS`] options are answered, every read is exact (nothing is read ahead of what the
//! protocol needs, so the transmission phase starts on a clean stream), and every failure is a
//! typed [`HandshakeError`]. The deadline is the socket's business (see `socket.rs`): a read that
//! times out is [`HandshakeError::Timeout`].
//!
//! Behaviour follows the protocol document; where it leaves a choice, what nbdkit's
//! `protocol-handshake-newstyle.c` does (the facts real clients expect): `NBD_INFO_EXPORT` is sent
//! whether asked for or not (qemu does not ask, and fails without it), a client without
//! `NBD_FLAG_C_FIXED_NEWSTYLE` gets `NBD_REP_ERR_INVALID` for anything but
//! `NBD_OPT_EXPORT_NAME`, and in `require` mode every option before TLS but `NBD_OPT_STARTTLS` and
//! `NBD_OPT_ABORT` gets `NBD_REP_ERR_TLS_REQD`.
//!
//! Once the server is stopping ([`Handshake::stop_flag`]), every option but `NBD_OPT_ABORT` is
//! answered `NBD_REP_ERR_SHUTDOWN`, as the protocol asks ("SHOULD error further options received
//! (other than an `NBD_OPT_ABORT`) with `NBD_REP_ERR_SHUTDOWN`"); the client is then expected to
//! send `NBD_OPT_ABORT`, and the handshake goes on answering until it does or hangs up.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::proto::TransmissionFlags;

use super::wire::{
    self, encode_export_name_reply, encode_meta_context_reply, encode_option_reply,
    encode_server_reply, info, BlockSizes, ExportData, Info, InfoRequest, MetaContextRequest, Opt,
    OptionHeader, Rep, WireError, BASE_ALLOCATION, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, OPTION_HEADER_LEN,
};
use crate::stream::read_full;

/// The longest option data accepted. The longest legitimate option is a meta-context request
/// with a few 4 KiB strings; anything longer ends the connection (nothing is skipped unread).
pub const MAX_OPTION_LEN: u32 = 64 << 10;

/// Options answered before the client must have chosen an export (nbdkit allows 32).
pub const MAX_OPTIONS: usize = 64;

/// The metadata context id given to `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Whether TLS is offered, and whether it is required.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TlsMode {
    /// No TLS: `NBD_OPT_STARTTLS` is refused with `NBD_REP_ERR_POLICY`.
    #[default]
    Off,
    /// TLS at the client's choice; the export is reachable either way (the protocol's
    /// SELECTIVETLS mode with no TLS-only export).
    Allow,
    /// Nothing but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` before TLS (FORCEDTLS): every other
    /// option gets `NBD_REP_ERR_TLS_REQD`, and `NBD_OPT_EXPORT_NAME` ends the connection.
    Require,
}

/// The export as the handshake presents it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    /// Its name; the empty name (the default export) reaches it too.
    pub name: String,
    /// Shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION` (empty: none).
    pub description: String,
    /// Size and transmission flags.
    pub export: ExportData,
    /// The block sizes of `NBD_INFO_BLOCK_SIZE`.
    pub block_sizes: BlockSizes,
    /// Whether structured replies (and so `base:allocation`) are offered.
    pub structured_replies: bool,
}

impl Offer {
    /// Whether `name` names this export.
    fn is(&self, name: &str) -> bool {
        name.is_empty() || name == self.name
    }
}

/// What the client chose, for the transmission phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// Structured replies were negotiated.
    pub structured_replies: bool,
    /// `base:allocation` was selected for this export: BLOCK_STATUS is allowed.
    pub base_allocation: bool,
    /// The client entered with `NBD_OPT_EXPORT_NAME` (old style) rather than `NBD_OPT_GO`.
    pub export_name: bool,
    /// The transmission flags the client was given.
    pub flags: TransmissionFlags,
}

/// How option haggling ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The client entered transmission.
    Transmission(Negotiated),
    /// `NBD_OPT_STARTTLS` was acknowledged: the caller starts TLS, calls
    /// [`Handshake::tls_started`], and continues with [`Handshake::options`] over TLS.
    StartTls,
    /// The client sent `NBD_OPT_ABORT` (acknowledged).
    Aborted,
}

/// Why a handshake failed. The connection is closed; nothing else is affected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The client closed the connection (`got` bytes into a `stage` of `expected`).
    #[error("client hung up during the {stage} ({got} of {expected} bytes)")]
    Eof {
        /// What was being read.
        stage: &'static str,
        /// Bytes of it received.
        got: usize,
        /// Bytes it has.
        expected: usize,
    },
    /// The handshake did not finish in time.
    #[error("handshake timed out during the {stage}")]
    Timeout {
        /// What was being read or written.
        stage: &'static str,
    },
    /// Reading or writing failed.
    #[error("i/o error during the {stage}: {source}")]
    Io {
        /// What was being read or written.
        stage: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Bytes that are not the protocol (a bad magic: not an NBD client, or out of sync).
    #[error("malformed {stage}: {source}")]
    Wire {
        /// What was being parsed.
        stage: &'static str,
        /// What was wrong.
        #[source]
        source: WireError,
    },
    /// Client flags the server did not offer: the protocol says to drop the connection.
    #[error("client flags {flags:#x} include bits the server did not offer")]
    ClientFlags {
        /// The flags received.
        flags: u32,
    },
    /// Option data longer than [`MAX_OPTION_LEN`].
    #[error("{option} carries {len} bytes of data, more than the {MAX_OPTION_LEN}-byte limit")]
    OptionTooLong {
        /// The option.
        option: Opt,
        /// Its announced length.
        len: u32,
    },
    /// More than [`MAX_OPTIONS`] options without choosing an export.
    #[error("client sent {MAX_OPTIONS} options without choosing an export")]
    TooManyOptions,
    /// `NBD_OPT_EXPORT_NAME` for an export that does not exist (it cannot be answered with an
    /// error, so the connection ends).
    #[error("client asked for unknown export {name:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport {
        /// The name asked for.
        name: String,
    },
    /// `NBD_OPT_EXPORT_NAME` without TLS when TLS is required.
    #[error("client tried to reach the export without TLS, which is required")]
    TlsRequired,
    /// The TLS handshake failed (a client certificate missing or not trusted, a protocol error).
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// `NBD_OPT_EXPORT_NAME` while the server is stopping (it cannot be answered with
    /// `NBD_REP_ERR_SHUTDOWN`, so the connection ends).
    #[error("client asked for the export with NBD_OPT_EXPORT_NAME while the server is stopping")]
    ShuttingDown,
}

impl HandshakeError {
    fn io(stage: &'static str, e: io::Error) -> HandshakeError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                HandshakeError::Timeout { stage }
            }
            _ => HandshakeError::Io { stage, source: e },
        }
    }
}

/// Reads exactly `buf.len()` bytes.
fn read_exact(
    s: &mut impl Read,
    buf: &mut [u8],
    stage: &'static str,
) -> Result<(), HandshakeError> {
    let got = read_full(s, buf).map_err(|e| HandshakeError::io(stage, e))?;
    if got < buf.len() {
        return Err(HandshakeError::Eof {
            stage,
            got,
            expected: buf.len(),
        });
    }
    Ok(())
}

fn send(s: &mut impl Write, bytes: &[u8], stage: &'static str) -> Result<(), HandshakeError> {
    s.write_all(bytes)
        .and_then(|()| s.flush())
        .map_err(|e| HandshakeError::io(stage, e))
}

/// Answers `option` with `rep` and its data.
fn reply(s: &mut impl Write, option: Opt, rep: Rep, data: &[u8]) -> Result<(), HandshakeError> {
    send(s, &encode_option_reply(option, rep, data), "option reply")
}

/// The handshake flags this server offers.
pub const SERVER_FLAGS: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;

/// The state of one connection's option haggling.
#[derive(Debug)]
pub struct Handshake<'a> {
    offer: &'a Offer,
    tls: TlsMode,
    tls_active: bool,
    client_flags: u32,
    structured: bool,
    /// `base:allocation` selected by the last `NBD_OPT_SET_META_CONTEXT`.
    base_allocation: bool,
    options: usize,
    /// Set when the server is stopping: options get `NBD_REP_ERR_SHUTDOWN`.
    stopping: Option<&'a AtomicBool>,
}

impl<'a> Handshake<'a> {
    /// Sends the greeting and reads the client's flags.
    pub fn greet<S: Read + Write>(
        s: &mut S,
        offer: &'a Offer,
        tls: TlsMode,
    ) -> Result<Handshake<'a>, HandshakeError> {
        send(s, &wire::encode_greeting(SERVER_FLAGS), "greeting")?;
        let mut flags = [0u8; 4];
        read_exact(s, &mut flags, "client flags")?;
        let client_flags = u32::from_be_bytes(flags);
        if client_flags & !u32::from(SERVER_FLAGS) != 0 {
            return Err(HandshakeError::ClientFlags {
                flags: client_flags,
            });
        }
        Ok(Handshake {
            offer,
            tls,
            tls_active: false,
            client_flags,
            structured: false,
            base_allocation: false,
            options: 0,
            stopping: None,
        })
    }

    /// From now on, every option read once `stopping` is set is answered
    /// `NBD_REP_ERR_SHUTDOWN` (`NBD_OPT_ABORT` is still acknowledged, and `NBD_OPT_EXPORT_NAME`,
    /// which has no error reply, ends the handshake with [`HandshakeError::ShuttingDown`]).
    pub fn stop_flag(&mut self, stopping: &'a AtomicBool) {
        self.stopping = Some(stopping);
    }

    fn is_stopping(&self) -> bool {
        self.stopping.is_some_and(|s| s.load(Ordering::SeqCst))
    }

    /// Whether TLS is running on this connection.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// TLS is now running: state negotiated before it is forgotten, as the protocol requires.
    pub fn tls_started(&mut self) {
        self.tls_active = true;
        self.structured = false;
        self.base_allocation = false;
    }

    /// Size and flags as this client is told them: `NBD_FLAG_SEND_DF` only with structured
    /// replies, as the protocol requires.
    fn export_data(&self) -> ExportData {
        let mut e = self.offer.export;
        if self.structured {
            e.flags |= wire::FLAG_SEND_DF;
        }
        e
    }

    fn negotiated(&self, export_name: bool) -> Negotiated {
        Negotiated {
            structured_replies: self.structured,
            base_allocation: self.structured && self.base_allocation,
            export_name,
            flags: self.export_data().flags,
        }
    }

    /// Answers options until the client enters transmission, aborts or starts TLS.
    pub fn options<S: Read + Write>(&mut self, s: &mut S) -> Result<Outcome, HandshakeError> {
        loop {
            if self.options >= MAX_OPTIONS {
                return Err(HandshakeError::TooManyOptions);
            }
            self.options += 1;
            let mut header = [0u8; OPTION_HEADER_LEN];
            read_exact(s, &mut header, "option header")?;
            let h = OptionHeader::parse(&header).map_err(|source| HandshakeError::Wire {
                stage: "option header",
                source,
            })?;
            if h.len > MAX_OPTION_LEN {
                return Err(HandshakeError::OptionTooLong {
                    option: h.option,
                    len: h.len,
                });
            }
            let mut data = vec![0u8; h.len as usize];
            read_exact(s, &mut data, "option data")?;
            if let Some(outcome) = self.option(s, h.option, &data)? {
                return Ok(outcome);
            }
        }
    }

    /// Answers one option; `Some` when haggling ends.
    fn option<S: Write>(
        &mut self,
        s: &mut S,
        option: Opt,
        data: &[u8],
    ) -> Result<Option<Outcome>, HandshakeError> {
        if self.is_stopping() && option != Opt::ABORT {
            if option == Opt::EXPORT_NAME {
                return Err(HandshakeError::ShuttingDown);
            }
            reply(s, option, Rep::ERR_SHUTDOWN, b"the server is shutting down")?;
            return Ok(None);
        }
        if self.client_flags & FLAG_C_FIXED_NEWSTYLE == 0 && option != Opt::EXPORT_NAME {
            reply(
                s,
                option,
                Rep::ERR_INVALID,
                b"fixed newstyle was not negotiated",
            )?;
            return Ok(None);
        }
        if self.tls == TlsMode::Require
            && !self.tls_active
            && !matches!(option, Opt::STARTTLS | Opt::ABORT)
        {
            if option == Opt::EXPORT_NAME {
                return Err(HandshakeError::TlsRequired);
            }
            reply(
                s,
                option,
                Rep::ERR_TLS_REQD,
                b"TLS is required: send NBD_OPT_STARTTLS",
            )?;
            return Ok(None);
        }
        match option {
            Opt::EXPORT_NAME => {
                let name = wire::parse_string(data, "export name").map_err(|source| {
                    HandshakeError::Wire {
                        stage: "NBD_OPT_EXPORT_NAME",
                        source,
                    }
                })?;
                if !self.offer.is(&name) {
                    return Err(HandshakeError::UnknownExport { name });
                }
                let no_zeroes = self.client_flags & FLAG_C_NO_ZEROES != 0;
                send(
                    s,
                    &encode_export_name_reply(self.export_data(), no_zeroes),
                    "export reply",
                )?;
                Ok(Some(Outcome::Transmission(self.negotiated(true))))
            }
            Opt::ABORT => {
                // The client may hang up without reading the ACK.
                let _ = reply(s, option, Rep::ACK, &[]);
                Ok(Some(Outcome::Aborted))
            }
            Opt::LIST => {
                if !data.is_empty() {
                    reply(s, option, Rep::ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                } else {
                    let server = encode_server_reply(&self.offer.name, &self.offer.description);
                    reply(s, option, Rep::SERVER, &server)?;
                    reply(s, option, Rep::ACK, &[])?;
                }
                Ok(None)
            }
            Opt::STARTTLS => {
                if !data.is_empty() {
                    reply(
                        s,
                        option,
                        Rep::ERR_INVALID,
                        b"NBD_OPT_STARTTLS takes no data",
                    )?;
                    Ok(None)
                } else if self.tls == TlsMode::Off {
                    reply(
                        s,
                        option,
                        Rep::ERR_POLICY,
                        b"TLS is not configured on this server",
                    )?;
                    Ok(None)
                } else if self.tls_active {
                    reply(s, option, Rep::ERR_INVALID, b"TLS is already running")?;
                    Ok(None)
                } else {
                    reply(s, option, Rep::ACK, &[])?;
                    Ok(Some(Outcome::StartTls))
                }
            }
            Opt::INFO | Opt::GO => self.info_or_go(s, option, data),
            Opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(
                        s,
                        option,
                        Rep::ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    )?;
                } else if !self.offer.structured_replies {
                    reply(s, option, Rep::ERR_UNSUP, &[])?;
                } else if self.structured {
                    reply(
                        s,
                        option,
                        Rep::ERR_INVALID,
                        b"structured replies already negotiated",
                    )?;
                } else {
                    self.structured = true;
                    reply(s, option, Rep::ACK, &[])?;
                }
                Ok(None)
            }
            Opt::LIST_META_CONTEXT | Opt::SET_META_CONTEXT => {
                self.meta_context(s, option, data)?;
                Ok(None)
            }
            _ => {
                reply(s, option, Rep::ERR_UNSUP, &[])?;
                Ok(None)
            }
        }
    }

    fn info_or_go<S: Write>(
        &mut self,
        s: &mut S,
        option: Opt,
        data: &[u8],
    ) -> Result<Option<Outcome>, HandshakeError> {
        let req = match InfoRequest::parse(data) {
            Ok(r) => r,
            Err(e) => {
                reply(s, option, Rep::ERR_INVALID, e.to_string().as_bytes())?;
                return Ok(None);
            }
        };
        if !self.offer.is(&req.name) {
            reply(s, option, Rep::ERR_UNKNOWN, b"no such export")?;
            return Ok(None);
        }
        let offer = self.offer;
        reply(
            s,
            option,
            Rep::INFO,
            &Info::Export(self.export_data()).encode(),
        )?;
        // Block sizes go out whether asked for or not: the server enforces its minimum, and a
        // client ignores an item it did not ask for.
        reply(
            s,
            option,
            Rep::INFO,
            &Info::BlockSize(offer.block_sizes).encode(),
        )?;
        let mut sent = Vec::new();
        for &item in &req.requests {
            if sent.contains(&item) {
                continue;
            }
            sent.push(item);
            match item {
                info::NAME => reply(
                    s,
                    option,
                    Rep::INFO,
                    &Info::Name(offer.name.clone()).encode(),
                )?,
                info::DESCRIPTION if !offer.description.is_empty() => reply(
                    s,
                    option,
                    Rep::INFO,
                    &Info::Description(offer.description.clone()).encode(),
                )?,
                // EXPORT and BLOCK_SIZE were sent above; others are ignored, as the protocol asks.
                _ => {}
            }
        }
        reply(s, option, Rep::ACK, &[])?;
        if option == Opt::GO {
            return Ok(Some(Outcome::Transmission(self.negotiated(false))));
        }
        Ok(None)
    }

    fn meta_context<S: Write>(
        &mut self,
        s: &mut S,
        option: Opt,
        data: &[u8],
    ) -> Result<(), HandshakeError> {
        let set = option == Opt::SET_META_CONTEXT;
        if set {
            // Replaced by every SET, failed or not.
            self.base_allocation = false;
            if !self.structured {
                reply(
                    s,
                    option,
                    Rep::ERR_INVALID,
                    b"negotiate structured replies before NBD_OPT_SET_META_CONTEXT",
                )?;
                return Ok(());
            }
        }
        if !self.offer.structured_replies {
            reply(s, option, Rep::ERR_UNSUP, &[])?;
            return Ok(());
        }
        let req = match MetaContextRequest::parse(data) {
            Ok(r) => r,
            Err(e) => {
                reply(s, option, Rep::ERR_INVALID, e.to_string().as_bytes())?;
                return Ok(());
            }
        };
        if !self.offer.is(&req.name) {
            reply(s, option, Rep::ERR_UNKNOWN, b"no such export")?;
            return Ok(());
        }
        let id = if set { BASE_ALLOCATION_ID } else { 0 };
        let matches = |q: &str| q == BASE_ALLOCATION || (!set && q == "base:");
        let selected = if req.queries.is_empty() {
            // LIST with no query lists everything; SET with none selects nothing.
            !set
        } else {
            req.queries.iter().any(|q| matches(q))
        };
        if selected {
            reply(
                s,
                option,
                Rep::META_CONTEXT,
                &encode_meta_context_reply(id, BASE_ALLOCATION),
            )?;
            if set {
                self.base_allocation = true;
            }
        }
        reply(s, option, Rep::ACK, &[])
    }
}

#[cfg(test)]
mod tests;
