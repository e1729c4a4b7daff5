//! The NBD handshake's wire format (fixed newstyle, `doc/proto.md` "Handshake" and "Values"), and
//! the structured reply chunks of the transmission phase: magics, option and reply numbers,
//! information types, and pure encoders and parsers shared by the server here and the client in
//! the harness. Nothing here does I/O; parsing never panics, whatever the bytes.

use std::fmt;

use crate::proto::{CommandFlags, TransmissionFlags};

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: after [`NBD_MAGIC`] in the greeting, and at the start of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic at the start of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Length of the server's greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Length of an option header: IHAVEOPT, option, data length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of an option reply header: magic, option, reply type, data length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Length of a structured reply chunk header: magic, flags, type, cookie, length.
pub const CHUNK_HEADER_LEN: usize = 20;
/// The longest string the protocol allows (export names, queries, messages).
pub const MAX_STRING: usize = 4096;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: `NBD_CMD_FLAG_DF` is understood on READ (structured replies only).
pub const FLAG_SEND_DF: TransmissionFlags = TransmissionFlags(1 << 7);
/// Transmission flag: `NBD_CMD_FLAG_FAST_ZERO` is understood on WRITE_ZEROES.
pub const FLAG_SEND_FAST_ZERO: TransmissionFlags = TransmissionFlags(1 << 11);

/// Command flag: "don't fragment" a structured READ reply.
pub const CMD_FLAG_DF: CommandFlags = CommandFlags(1 << 2);
/// Command flag: one extent per context in a BLOCK_STATUS reply.
pub const CMD_FLAG_REQ_ONE: CommandFlags = CommandFlags(1 << 3);
/// Command flag: fail WRITE_ZEROES with ENOTSUP unless it is fast.
pub const CMD_FLAG_FAST_ZERO: CommandFlags = CommandFlags(1 << 4);

/// The name of the only metadata context served.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` flag: the extent is a hole (not allocated).
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

/// Structured reply flag: the last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;

/// An option a client sends during the handshake (`NBD_OPT_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Opt(pub u32);

impl Opt {
    /// Choose an export and enter transmission, without a way to report errors.
    pub const EXPORT_NAME: Opt = Opt(1);
    /// End the handshake (soft disconnect).
    pub const ABORT: Opt = Opt(2);
    /// List the exports.
    pub const LIST: Opt = Opt(3);
    /// Upgrade the connection to TLS.
    pub const STARTTLS: Opt = Opt(5);
    /// Describe an export.
    pub const INFO: Opt = Opt(6);
    /// Describe an export and enter transmission.
    pub const GO: Opt = Opt(7);
    /// Use structured replies in transmission.
    pub const STRUCTURED_REPLY: Opt = Opt(8);
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: Opt = Opt(9);
    /// Select metadata contexts for BLOCK_STATUS.
    pub const SET_META_CONTEXT: Opt = Opt(10);

    /// The protocol's name, as in `NBD_OPT_GO`, or `"unknown"`.
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "NBD_OPT_EXPORT_NAME",
            2 => "NBD_OPT_ABORT",
            3 => "NBD_OPT_LIST",
            4 => "NBD_OPT_PEEK_EXPORT",
            5 => "NBD_OPT_STARTTLS",
            6 => "NBD_OPT_INFO",
            7 => "NBD_OPT_GO",
            8 => "NBD_OPT_STRUCTURED_REPLY",
            9 => "NBD_OPT_LIST_META_CONTEXT",
            10 => "NBD_OPT_SET_META_CONTEXT",
            11 => "NBD_OPT_EXTENDED_HEADERS",
            _ => "unknown",
        }
    }
}

impl fmt::Display for Opt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

/// The type of an option reply (`NBD_REP_*`); errors have bit 31 set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rep(pub u32);

impl Rep {
    /// Success; the last reply to an option.
    pub const ACK: Rep = Rep(1);
    /// An export, in reply to `NBD_OPT_LIST`.
    pub const SERVER: Rep = Rep(2);
    /// An information item, in reply to `NBD_OPT_INFO` and `NBD_OPT_GO`.
    pub const INFO: Rep = Rep(3);
    /// A metadata context.
    pub const META_CONTEXT: Rep = Rep(4);
    /// The option is not supported.
    pub const ERR_UNSUP: Rep = Rep(0x8000_0001);
    /// Policy forbids the option.
    pub const ERR_POLICY: Rep = Rep(0x8000_0002);
    /// The option is malformed or not valid now.
    pub const ERR_INVALID: Rep = Rep(0x8000_0003);
    /// Not supported on this platform.
    pub const ERR_PLATFORM: Rep = Rep(0x8000_0004);
    /// TLS must be started first.
    pub const ERR_TLS_REQD: Rep = Rep(0x8000_0005);
    /// No such export.
    pub const ERR_UNKNOWN: Rep = Rep(0x8000_0006);
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: Rep = Rep(0x8000_0007);
    /// The client must ask for `NBD_INFO_BLOCK_SIZE`.
    pub const ERR_BLOCK_SIZE_REQD: Rep = Rep(0x8000_0008);
    /// The request or reply is too large.
    pub const ERR_TOO_BIG: Rep = Rep(0x8000_0009);

    /// Whether this is an error reply (bit 31).
    pub fn is_error(self) -> bool {
        self.0 & 0x8000_0000 != 0
    }

    /// The protocol's name, as in `NBD_REP_ERR_UNSUP`, or `"unknown"`.
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "NBD_REP_ACK",
            2 => "NBD_REP_SERVER",
            3 => "NBD_REP_INFO",
            4 => "NBD_REP_META_CONTEXT",
            0x8000_0001 => "NBD_REP_ERR_UNSUP",
            0x8000_0002 => "NBD_REP_ERR_POLICY",
            0x8000_0003 => "NBD_REP_ERR_INVALID",
            0x8000_0004 => "NBD_REP_ERR_PLATFORM",
            0x8000_0005 => "NBD_REP_ERR_TLS_REQD",
            0x8000_0006 => "NBD_REP_ERR_UNKNOWN",
            0x8000_0007 => "NBD_REP_ERR_SHUTDOWN",
            0x8000_0008 => "NBD_REP_ERR_BLOCK_SIZE_REQD",
            0x8000_0009 => "NBD_REP_ERR_TOO_BIG",
            _ => "unknown",
        }
    }
}

impl fmt::Display for Rep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:#x})", self.name(), self.0)
    }
}

/// Information types in `NBD_REP_INFO` replies (`NBD_INFO_*`).
pub mod info {
    /// Size and transmission flags (mandatory before `NBD_REP_ACK`).
    pub const EXPORT: u16 = 0;
    /// The export's canonical name.
    pub const NAME: u16 = 1;
    /// A description for humans.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Structured reply chunk types (`NBD_REPLY_TYPE_*`).
pub mod chunk {
    /// No payload; only as the last chunk.
    pub const NONE: u16 = 0;
    /// Offset, then data.
    pub const OFFSET_DATA: u16 = 1;
    /// Offset and length of a range that reads as zeroes.
    pub const OFFSET_HOLE: u16 = 2;
    /// Metadata context id, then (length, flags) descriptors.
    pub const BLOCK_STATUS: u16 = 5;
    /// Error, message.
    pub const ERROR: u16 = 0x8001;
    /// Error, message, offset.
    pub const ERROR_OFFSET: u16 = 0x8002;
}

/// The server's greeting: NBDMAGIC, IHAVEOPT and its handshake flags.
pub fn encode_greeting(flags: u16) -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&flags.to_be_bytes());
    out
}

/// What was wrong with bytes that should have been a greeting, an option or a reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A magic number other than the one expected: the other side speaks something else.
    #[error("bad {what} magic {found:#018x} (expected {expected:#018x})")]
    BadMagic {
        /// Which magic.
        what: &'static str,
        /// The value found.
        found: u64,
        /// The value expected.
        expected: u64,
    },
    /// Fewer bytes than the structure needs.
    #[error("{what}: {len} bytes, at least {need} needed")]
    Short {
        /// Which structure.
        what: &'static str,
        /// Bytes there were.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// A field whose value contradicts the rest of the message.
    #[error("{0}")]
    Invalid(String),
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn expect_magic(what: &'static str, found: u64, expected: u64) -> Result<(), WireError> {
    if found != expected {
        return Err(WireError::BadMagic {
            what,
            found,
            expected,
        });
    }
    Ok(())
}

fn need(what: &'static str, b: &[u8], need: usize) -> Result<(), WireError> {
    if b.len() < need {
        return Err(WireError::Short {
            what,
            len: b.len(),
            need,
        });
    }
    Ok(())
}

/// Parses the server's greeting; returns its handshake flags.
pub fn parse_greeting(b: &[u8]) -> Result<u16, WireError> {
    need("greeting", b, GREETING_LEN)?;
    for (at, expected, what) in [(0, NBD_MAGIC, "NBDMAGIC"), (8, IHAVEOPT, "IHAVEOPT")] {
        expect_magic(what, be64(b, at), expected)?;
    }
    Ok(be16(b, 16))
}

/// An option header: which option, and how many data bytes follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option.
    pub option: Opt,
    /// Length of the data that follows.
    pub len: u32,
}

impl OptionHeader {
    /// Parses the 16-byte header.
    pub fn parse(b: &[u8]) -> Result<OptionHeader, WireError> {
        need("option header", b, OPTION_HEADER_LEN)?;
        expect_magic("option", be64(b, 0), IHAVEOPT)?;
        Ok(OptionHeader {
            option: Opt(be32(b, 8)),
            len: be32(b, 12),
        })
    }

    /// The header's wire bytes.
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut out = [0u8; OPTION_HEADER_LEN];
        out[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.0.to_be_bytes());
        out[12..].copy_from_slice(&self.len.to_be_bytes());
        out
    }
}

/// An option with its data, as a client sends it.
pub fn encode_option(option: Opt, data: &[u8]) -> Vec<u8> {
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    let mut out = OptionHeader { option, len }.encode().to_vec();
    out.extend_from_slice(data);
    out
}

/// An option reply header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option answered.
    pub option: Opt,
    /// The reply type.
    pub reply: Rep,
    /// Length of the data that follows.
    pub len: u32,
}

impl OptionReplyHeader {
    /// Parses the 20-byte header.
    pub fn parse(b: &[u8]) -> Result<OptionReplyHeader, WireError> {
        need("option reply header", b, OPTION_REPLY_HEADER_LEN)?;
        expect_magic("option reply", be64(b, 0), REPLY_MAGIC)?;
        Ok(OptionReplyHeader {
            option: Opt(be32(b, 8)),
            reply: Rep(be32(b, 12)),
            len: be32(b, 16),
        })
    }
}

/// An option reply with its data, as the server sends it.
pub fn encode_option_reply(option: Opt, reply: Rep, data: &[u8]) -> Vec<u8> {
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + data.len());
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.0.to_be_bytes());
    out.extend_from_slice(&reply.0.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`: an export name and the information asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export's name (empty: the default export).
    pub name: String,
    /// `NBD_INFO_*` types asked for.
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Parses the option data: name length, name, count, that many 16-bit types, nothing more.
    pub fn parse(b: &[u8]) -> Result<InfoRequest, WireError> {
        need("NBD_OPT_INFO/GO data", b, 6)?;
        let name_len = be32(b, 0) as usize;
        if name_len > b.len() - 6 {
            return Err(WireError::Invalid(format!(
                "export name of {name_len} bytes in {} bytes of option data",
                b.len()
            )));
        }
        let name = parse_string(&b[4..4 + name_len], "export name")?;
        let n = be16(b, 4 + name_len) as usize;
        if b.len() != 6 + name_len + 2 * n {
            return Err(WireError::Invalid(format!(
                "{n} information requests do not fill {} bytes of option data",
                b.len()
            )));
        }
        let at = 6 + name_len;
        let requests = (0..n).map(|i| be16(b, at + 2 * i)).collect();
        Ok(InfoRequest { name, requests })
    }

    /// The option data.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for r in &self.requests {
            out.extend_from_slice(&r.to_be_bytes());
        }
        out
    }
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// The export's name.
    pub name: String,
    /// The queries, e.g. `base:allocation`.
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    /// Parses the option data: name length, name, query count, then (length, query) pairs, and
    /// nothing more.
    pub fn parse(b: &[u8]) -> Result<MetaContextRequest, WireError> {
        need("meta context data", b, 8)?;
        let name_len = be32(b, 0) as usize;
        if name_len > b.len() - 8 {
            return Err(WireError::Invalid(format!(
                "export name of {name_len} bytes in {} bytes of option data",
                b.len()
            )));
        }
        let name = parse_string(&b[4..4 + name_len], "export name")?;
        let mut at = 4 + name_len;
        let count = be32(b, at);
        at += 4;
        let mut queries = Vec::new();
        for i in 0..count {
            if b.len() - at < 4 {
                return Err(WireError::Invalid(format!(
                    "query {i} of {count} starts past the option data"
                )));
            }
            let len = be32(b, at) as usize;
            at += 4;
            if len > b.len() - at {
                return Err(WireError::Invalid(format!(
                    "query {i} of {len} bytes runs past the option data"
                )));
            }
            queries.push(parse_string(&b[at..at + len], "meta context query")?);
            at += len;
        }
        if at != b.len() {
            return Err(WireError::Invalid(format!(
                "{} bytes after the last query",
                b.len() - at
            )));
        }
        Ok(MetaContextRequest { name, queries })
    }

    /// The option data.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            out.extend_from_slice(&(q.len() as u32).to_be_bytes());
            out.extend_from_slice(q.as_bytes());
        }
        out
    }
}

/// A protocol string: UTF-8, no NUL, at most [`MAX_STRING`] bytes.
pub fn parse_string(b: &[u8], what: &str) -> Result<String, WireError> {
    if b.len() > MAX_STRING {
        return Err(WireError::Invalid(format!(
            "{what} of {} bytes is longer than {MAX_STRING}",
            b.len()
        )));
    }
    if b.contains(&0) {
        return Err(WireError::Invalid(format!("{what} contains a NUL byte")));
    }
    String::from_utf8(b.to_vec())
        .map_err(|_| WireError::Invalid(format!("{what} is not valid UTF-8")))
}

/// Size and transmission flags: the payload of `NBD_INFO_EXPORT` and of the reply to
/// `NBD_OPT_EXPORT_NAME`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportData {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: TransmissionFlags,
}

/// Minimum, preferred and maximum block sizes (`NBD_INFO_BLOCK_SIZE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    /// Smallest addressable length and alignment.
    pub minimum: u32,
    /// The size from which aligned requests are efficient.
    pub preferred: u32,
    /// Largest payload accepted.
    pub maximum: u32,
}

/// One `NBD_REP_INFO` item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`.
    Export(ExportData),
    /// `NBD_INFO_NAME`.
    Name(String),
    /// `NBD_INFO_DESCRIPTION`.
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize(BlockSizes),
    /// A type this parser does not know (the client must ignore it).
    Other(u16),
}

impl Info {
    /// The `NBD_REP_INFO` data for this item.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Info::Export(e) => {
                out.extend_from_slice(&info::EXPORT.to_be_bytes());
                out.extend_from_slice(&e.size.to_be_bytes());
                out.extend_from_slice(&e.flags.0.to_be_bytes());
            }
            Info::Name(s) | Info::Description(s) => {
                let t = if matches!(self, Info::Name(_)) {
                    info::NAME
                } else {
                    info::DESCRIPTION
                };
                out.extend_from_slice(&t.to_be_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            Info::BlockSize(b) => {
                out.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
                out.extend_from_slice(&b.minimum.to_be_bytes());
                out.extend_from_slice(&b.preferred.to_be_bytes());
                out.extend_from_slice(&b.maximum.to_be_bytes());
            }
            Info::Other(t) => out.extend_from_slice(&t.to_be_bytes()),
        }
        out
    }

    /// Parses `NBD_REP_INFO` data; a known type with the wrong length is an error.
    pub fn parse(b: &[u8]) -> Result<Info, WireError> {
        need("NBD_REP_INFO data", b, 2)?;
        let t = be16(b, 0);
        let exact = |len: usize| {
            if b.len() == len {
                Ok(())
            } else {
                Err(WireError::Invalid(format!(
                    "NBD_REP_INFO type {t} with {} bytes (expected {len})",
                    b.len()
                )))
            }
        };
        Ok(match t {
            info::EXPORT => {
                exact(12)?;
                Info::Export(ExportData {
                    size: be64(b, 2),
                    flags: TransmissionFlags(be16(b, 10)),
                })
            }
            info::NAME => Info::Name(parse_string(&b[2..], "export name")?),
            info::DESCRIPTION => Info::Description(parse_string(&b[2..], "description")?),
            info::BLOCK_SIZE => {
                exact(14)?;
                Info::BlockSize(BlockSizes {
                    minimum: be32(b, 2),
                    preferred: be32(b, 6),
                    maximum: be32(b, 10),
                })
            }
            other => Info::Other(other),
        })
    }
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zeroes unless the client asked for
/// none.
pub fn encode_export_name_reply(export: ExportData, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(134);
    out.extend_from_slice(&export.size.to_be_bytes());
    out.extend_from_slice(&export.flags.0.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    out
}

/// The data of an `NBD_REP_SERVER` reply: the export's name, then its description.
pub fn encode_server_reply(name: &str, description: &str) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(description.as_bytes());
    out
}

/// Parses `NBD_REP_SERVER` data into (name, description).
pub fn parse_server_reply(b: &[u8]) -> Result<(String, String), WireError> {
    need("NBD_REP_SERVER data", b, 4)?;
    let len = be32(b, 0) as usize;
    if len > b.len() - 4 {
        return Err(WireError::Invalid(format!(
            "export name of {len} bytes in {} bytes of NBD_REP_SERVER data",
            b.len()
        )));
    }
    let name = parse_string(&b[4..4 + len], "export name")?;
    let description = parse_string(&b[4 + len..], "description")?;
    Ok((name, description))
}

/// The data of an `NBD_REP_META_CONTEXT` reply: context id, then name.
pub fn encode_meta_context_reply(id: u32, name: &str) -> Vec<u8> {
    let mut out = id.to_be_bytes().to_vec();
    out.extend_from_slice(name.as_bytes());
    out
}

/// Parses `NBD_REP_META_CONTEXT` data into (id, name).
pub fn parse_meta_context_reply(b: &[u8]) -> Result<(u32, String), WireError> {
    need("NBD_REP_META_CONTEXT data", b, 4)?;
    Ok((be32(b, 0), parse_string(&b[4..], "context name")?))
}

/// A structured reply chunk header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// `REPLY_FLAG_DONE` and friends.
    pub flags: u16,
    /// One of [`chunk`].
    pub kind: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// Payload length.
    pub len: u32,
}

impl ChunkHeader {
    /// The header's wire bytes.
    pub fn encode(&self) -> [u8; CHUNK_HEADER_LEN] {
        let mut out = [0u8; CHUNK_HEADER_LEN];
        out[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.kind.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// Parses the 20 bytes after checking the magic (a client that reads replies looks at the
    /// first 4 bytes first: simple and structured replies start alike).
    pub fn parse(b: &[u8]) -> Result<ChunkHeader, WireError> {
        need("structured reply chunk", b, CHUNK_HEADER_LEN)?;
        expect_magic(
            "structured reply",
            u64::from(be32(b, 0)),
            u64::from(STRUCTURED_REPLY_MAGIC),
        )?;
        Ok(ChunkHeader {
            flags: be16(b, 4),
            kind: be16(b, 6),
            cookie: be64(b, 8),
            len: be32(b, 16),
        })
    }
}

/// The payload of an error chunk: errno, message length, message.
pub fn encode_error_chunk(errno: u32, message: &str) -> Vec<u8> {
    let message = &message.as_bytes()[..message.len().min(MAX_STRING)];
    let mut out = errno.to_be_bytes().to_vec();
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message);
    out
}

#[cfg(test)]
mod tests;
