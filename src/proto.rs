//! The NBD wire format spoken on the socket between the kernel and a server: the 28-byte request,
//! the 16-byte reply, commands, command flags, transmission flags and the protocol's errno values.
//!
//! Everything here is pure: bytes in, typed values out, and the other way round. Parsing never
//! panics, whatever the input; a malformed header is a [`ParseError`] naming the offending value.
//! There is no handshake: the kernel's NBD driver is handed an already negotiated socket.

use std::fmt;
use std::io;

use zerocopy::byteorder::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Magic number at the start of every request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic number at the start of every (simple) reply.
pub const REPLY_MAGIC: u32 = 0x6744_6698;
/// Size of a request header on the wire.
pub const REQUEST_LEN: usize = 28;
/// Size of a reply header on the wire.
pub const REPLY_LEN: usize = 16;
/// The largest READ or WRITE the kernel sends: `max_hw_sectors` is 65536 sectors of 512 bytes.
pub const MAX_IO_LEN: u32 = 32 << 20;

/// The request header exactly as it lies on the wire.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawRequest {
    magic: U32,
    kind: U32,
    cookie: U64,
    offset: U64,
    len: U32,
}

/// The reply header exactly as it lies on the wire.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawReply {
    magic: U32,
    error: U32,
    cookie: U64,
}

/// The opaque 8-byte request identifier, echoed verbatim in the reply.
///
/// The value is the big-endian reading of the wire bytes, so `Cookie(c)` encodes back to exactly
/// the bytes it was parsed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cookie(pub u64);

impl fmt::Display for Cookie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#018x}", self.0)
    }
}

/// A request's command: the low 16 bits of its `type` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    /// Read `len` bytes at `offset`; the reply carries them.
    Read,
    /// Write the `len` bytes that follow the header.
    Write,
    /// Disconnect: finish what is in flight, then close. Gets no reply.
    Disc,
    /// Make every completed write durable.
    Flush,
    /// Discard a range; what it reads back as afterwards is the device's business.
    Trim,
    /// Prefetch a range. Never sent by the kernel.
    Cache,
    /// Write zeroes over a range, possibly by punching a hole unless `NO_HOLE` is set.
    WriteZeroes,
    /// Query allocation status. Never sent by the kernel; needs structured replies.
    BlockStatus,
}

impl Command {
    /// Decodes a wire command number.
    pub fn from_wire(value: u16) -> Option<Command> {
        Some(match value {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            _ => return None,
        })
    }

    /// The wire command number.
    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
        }
    }

    /// The protocol's name for the command, as in `NBD_CMD_READ`.
    pub fn name(self) -> &'static str {
        match self {
            Command::Read => "READ",
            Command::Write => "WRITE",
            Command::Disc => "DISC",
            Command::Flush => "FLUSH",
            Command::Trim => "TRIM",
            Command::Cache => "CACHE",
            Command::WriteZeroes => "WRITE_ZEROES",
            Command::BlockStatus => "BLOCK_STATUS",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Command flags: the high 16 bits of a request's `type` field. Unknown bits are kept, so that
/// the server can reject them rather than silently drop them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CommandFlags(pub u16);

impl CommandFlags {
    /// No flags.
    pub const NONE: CommandFlags = CommandFlags(0);
    /// Force unit access: the write is durable before it is acknowledged.
    pub const FUA: CommandFlags = CommandFlags(1 << 0);
    /// On WRITE_ZEROES: the range must stay allocated (no hole punched).
    pub const NO_HOLE: CommandFlags = CommandFlags(1 << 1);
    /// Every bit the kernel may send.
    pub const KNOWN: CommandFlags = CommandFlags(Self::FUA.0 | Self::NO_HOLE.0);

    /// Whether every bit of `other` is set.
    pub fn contains(self, other: CommandFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// The bits that are not part of [`CommandFlags::KNOWN`].
    pub fn unknown(self) -> u16 {
        self.0 & !Self::KNOWN.0
    }
}

impl std::ops::BitOr for CommandFlags {
    type Output = CommandFlags;
    fn bitor(self, rhs: CommandFlags) -> CommandFlags {
        CommandFlags(self.0 | rhs.0)
    }
}

/// Transmission flags: what the server tells the kernel it supports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TransmissionFlags(pub u16);

impl TransmissionFlags {
    /// Always set by a server; ignored by the kernel.
    pub const HAS_FLAGS: TransmissionFlags = TransmissionFlags(1 << 0);
    /// The export is read-only: the kernel fails writes, trims and zeroes itself.
    pub const READ_ONLY: TransmissionFlags = TransmissionFlags(1 << 1);
    /// FLUSH is supported; the kernel turns on the device's write cache.
    pub const SEND_FLUSH: TransmissionFlags = TransmissionFlags(1 << 2);
    /// FUA on writes is supported (only used together with `SEND_FLUSH`).
    pub const SEND_FUA: TransmissionFlags = TransmissionFlags(1 << 3);
    /// The device is rotational (honoured from 6.12; no effect on the wire).
    pub const ROTATIONAL: TransmissionFlags = TransmissionFlags(1 << 4);
    /// TRIM is supported.
    pub const SEND_TRIM: TransmissionFlags = TransmissionFlags(1 << 5);
    /// WRITE_ZEROES is supported (sent by kernels 6.12 and later).
    pub const SEND_WRITE_ZEROES: TransmissionFlags = TransmissionFlags(1 << 6);
    /// Several connections may serve the same device.
    pub const CAN_MULTI_CONN: TransmissionFlags = TransmissionFlags(1 << 8);

    /// Whether every bit of `other` is set.
    pub fn contains(self, other: TransmissionFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for TransmissionFlags {
    type Output = TransmissionFlags;
    fn bitor(self, rhs: TransmissionFlags) -> TransmissionFlags {
        TransmissionFlags(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for TransmissionFlags {
    fn bitor_assign(&mut self, rhs: TransmissionFlags) {
        self.0 |= rhs.0;
    }
}

/// An error value in a reply. `0` means success and is not an `Errno`.
///
/// The protocol allows a fixed set (the associated constants); [`Errno::from_io_error`] maps any
/// host error into it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Errno(pub u32);

impl Errno {
    /// Operation not permitted: a write or trim on a read-only export.
    pub const EPERM: Errno = Errno(1);
    /// Input/output error: the catch-all.
    pub const EIO: Errno = Errno(5);
    /// Out of memory.
    pub const ENOMEM: Errno = Errno(12);
    /// Invalid argument: a read or trim past the end, a misaligned or malformed request.
    pub const EINVAL: Errno = Errno(22);
    /// No space: a write past the end, or the backing store is full.
    pub const ENOSPC: Errno = Errno(28);
    /// Value too large.
    pub const EOVERFLOW: Errno = Errno(75);
    /// Operation not supported.
    pub const ENOTSUP: Errno = Errno(95);
    /// The server is shutting down.
    pub const ESHUTDOWN: Errno = Errno(108);

    /// Maps a host errno to the protocol's set: the allowed values pass through, `EDQUOT` and
    /// `EFBIG` become `ENOSPC`, anything else `EIO`.
    pub fn from_raw_os_error(code: i32) -> Errno {
        match code {
            1 => Errno::EPERM,
            5 => Errno::EIO,
            12 => Errno::ENOMEM,
            22 => Errno::EINVAL,
            28 => Errno::ENOSPC,
            75 => Errno::EOVERFLOW,
            95 => Errno::ENOTSUP,
            108 => Errno::ESHUTDOWN,
            // EFBIG, EDQUOT
            27 | 122 => Errno::ENOSPC,
            _ => Errno::EIO,
        }
    }

    /// The errno a device error goes on the wire as: its raw OS error mapped by
    /// [`Errno::from_raw_os_error`], or `EIO` when it has none.
    pub fn from_io_error(err: &io::Error) -> Errno {
        err.raw_os_error()
            .map_or(Errno::EIO, Errno::from_raw_os_error)
    }

    /// The conventional name (`"EIO"`), or `"unknown"` outside the protocol's set.
    pub fn name(self) -> &'static str {
        match self {
            Errno::EPERM => "EPERM",
            Errno::EIO => "EIO",
            Errno::ENOMEM => "ENOMEM",
            Errno::EINVAL => "EINVAL",
            Errno::ENOSPC => "ENOSPC",
            Errno::EOVERFLOW => "EOVERFLOW",
            Errno::ENOTSUP => "ENOTSUP",
            Errno::ESHUTDOWN => "ESHUTDOWN",
            _ => "unknown",
        }
    }

    /// An `io::Error` carrying this errno, for callers that want one.
    pub fn to_io_error(self) -> io::Error {
        io::Error::from_raw_os_error(self.0 as i32)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

/// Why a request header could not be parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Fewer than [`REQUEST_LEN`] bytes.
    #[error("short request header: {len} of {REQUEST_LEN} bytes")]
    ShortHeader {
        /// How many bytes there were.
        len: usize,
    },
    /// The magic number is not [`REQUEST_MAGIC`]: the stream is out of sync.
    #[error("bad request magic {magic:#010x} (expected {REQUEST_MAGIC:#010x})")]
    BadMagic {
        /// The value found.
        magic: u32,
    },
    /// A command number the protocol does not define. The header is otherwise sound, so a server
    /// can reply to `cookie` with an error and go on.
    #[error("unknown command {command} (cookie {cookie})")]
    UnknownCommand {
        /// The command number found.
        command: u16,
        /// The request's cookie.
        cookie: Cookie,
    },
}

impl ParseError {
    /// Whether the stream cannot be trusted after this error (no reply can be sent).
    pub fn is_fatal(&self) -> bool {
        !matches!(self, ParseError::UnknownCommand { .. })
    }
}

/// Why a reply header could not be parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplyParseError {
    /// Fewer than [`REPLY_LEN`] bytes.
    #[error("short reply header: {len} of {REPLY_LEN} bytes")]
    ShortHeader {
        /// How many bytes there were.
        len: usize,
    },
    /// The magic number is not [`REPLY_MAGIC`].
    #[error("bad reply magic {magic:#010x} (expected {REPLY_MAGIC:#010x})")]
    BadMagic {
        /// The value found.
        magic: u32,
    },
}

/// A request header. A WRITE's `len` bytes of payload follow it on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Request {
    /// What to do.
    pub command: Command,
    /// Command flags, unknown bits included.
    pub flags: CommandFlags,
    /// Echoed in the reply.
    pub cookie: Cookie,
    /// Byte offset into the device.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
}

impl Request {
    /// A request with no flags.
    pub fn new(command: Command, cookie: Cookie, offset: u64, len: u32) -> Request {
        Request {
            command,
            flags: CommandFlags::NONE,
            cookie,
            offset,
            len,
        }
    }

    /// Parses the first [`REQUEST_LEN`] bytes of `bytes`; the rest is ignored.
    pub fn parse(bytes: &[u8]) -> Result<Request, ParseError> {
        let (raw, _) = RawRequest::read_from_prefix(bytes)
            .map_err(|_| ParseError::ShortHeader { len: bytes.len() })?;
        if raw.magic.get() != REQUEST_MAGIC {
            return Err(ParseError::BadMagic {
                magic: raw.magic.get(),
            });
        }
        let kind = raw.kind.get();
        let cookie = Cookie(raw.cookie.get());
        let command = (kind & 0xffff) as u16;
        let command =
            Command::from_wire(command).ok_or(ParseError::UnknownCommand { command, cookie })?;
        Ok(Request {
            command,
            flags: CommandFlags((kind >> 16) as u16),
            cookie,
            offset: raw.offset.get(),
            len: raw.len.get(),
        })
    }

    /// The header's wire bytes.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        encode_request(
            REQUEST_MAGIC,
            u32::from(self.command.to_wire()) | u32::from(self.flags.0) << 16,
            self.cookie,
            self.offset,
            self.len,
        )
    }

    /// How many payload bytes follow this header on the wire.
    pub fn payload_len(&self) -> usize {
        match self.command {
            Command::Write => self.len as usize,
            _ => 0,
        }
    }

    /// Whether `offset + len` overflows or ends past `size`.
    pub fn exceeds(&self, size: u64) -> bool {
        self.offset
            .checked_add(u64::from(self.len))
            .is_none_or(|end| end > size)
    }
}

impl TryFrom<&[u8]> for Request {
    type Error = ParseError;
    fn try_from(bytes: &[u8]) -> Result<Request, ParseError> {
        Request::parse(bytes)
    }
}

/// Encodes a request header from raw field values, for tests that need malformed ones.
pub fn encode_request(
    magic: u32,
    kind: u32,
    cookie: Cookie,
    offset: u64,
    len: u32,
) -> [u8; REQUEST_LEN] {
    let raw = RawRequest {
        magic: U32::new(magic),
        kind: U32::new(kind),
        cookie: U64::new(cookie.0),
        offset: U64::new(offset),
        len: U32::new(len),
    };
    let mut out = [0u8; REQUEST_LEN];
    out.copy_from_slice(raw.as_bytes());
    out
}

/// A reply header. A successful READ's data follows it; nothing ever follows an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Reply {
    /// `0` on success, else the errno value as sent (see [`Errno`]).
    pub error: u32,
    /// The cookie of the request answered.
    pub cookie: Cookie,
}

impl Reply {
    /// A success reply.
    pub fn ok(cookie: Cookie) -> Reply {
        Reply { error: 0, cookie }
    }

    /// An error reply.
    pub fn error(cookie: Cookie, errno: Errno) -> Reply {
        Reply {
            error: errno.0,
            cookie,
        }
    }

    /// `None` on success, else the errno.
    pub fn errno(&self) -> Option<Errno> {
        (self.error != 0).then_some(Errno(self.error))
    }

    /// Parses the first [`REPLY_LEN`] bytes of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Reply, ReplyParseError> {
        let (raw, _) = RawReply::read_from_prefix(bytes)
            .map_err(|_| ReplyParseError::ShortHeader { len: bytes.len() })?;
        if raw.magic.get() != REPLY_MAGIC {
            return Err(ReplyParseError::BadMagic {
                magic: raw.magic.get(),
            });
        }
        Ok(Reply {
            error: raw.error.get(),
            cookie: Cookie(raw.cookie.get()),
        })
    }

    /// The header's wire bytes.
    pub fn encode(&self) -> [u8; REPLY_LEN] {
        let raw = RawReply {
            magic: U32::new(REPLY_MAGIC),
            error: U32::new(self.error),
            cookie: U64::new(self.cookie.0),
        };
        let mut out = [0u8; REPLY_LEN];
        out.copy_from_slice(raw.as_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[rustfmt::skip]
    const WRITE_FUA: [u8; REQUEST_LEN] = [
        0x25, 0x60, 0x95, 0x13,                         // magic
        0x00, 0x01, 0x00, 0x01,                         // flags FUA, command WRITE
        0x00, 0x00, 0x00, 0x2a, 0x00, 0x00, 0x00, 0x07, // cookie: cmd_cookie 42, hwq 0, tag 7
        0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, // offset 1 MiB
        0x00, 0x00, 0x10, 0x00,                         // len 4096
    ];

    #[rustfmt::skip]
    const FLUSH: [u8; REQUEST_LEN] = [
        0x25, 0x60, 0x95, 0x13,                         // magic
        0x00, 0x00, 0x00, 0x03,                         // flags none, command FLUSH
        0xde, 0xad, 0xbe, 0xef, 0x01, 0x02, 0x03, 0x04, // cookie
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // offset 0
        0x00, 0x00, 0x00, 0x00,                         // len 0
    ];

    #[rustfmt::skip]
    const REPLY_EIO: [u8; REPLY_LEN] = [
        0x67, 0x44, 0x66, 0x98,                         // magic
        0x00, 0x00, 0x00, 0x05,                         // error EIO
        0x00, 0x00, 0x00, 0x2a, 0x00, 0x00, 0x00, 0x07, // cookie
    ];

    #[test]
    fn parses_write_with_fua() {
        let req = Request::parse(&WRITE_FUA).unwrap();
        assert_eq!(req.command, Command::Write);
        assert!(req.flags.contains(CommandFlags::FUA));
        assert_eq!(req.flags.unknown(), 0);
        assert_eq!(req.cookie, Cookie(42 << 32 | 7));
        assert_eq!(req.offset, 1 << 20);
        assert_eq!(req.len, 4096);
        assert_eq!(req.payload_len(), 4096);
        assert_eq!(req.encode(), WRITE_FUA);
    }

    #[test]
    fn parses_flush_and_keeps_cookie_bytes() {
        let req = Request::parse(&FLUSH).unwrap();
        assert_eq!(req.command, Command::Flush);
        assert_eq!(req.payload_len(), 0);
        assert_eq!(req.cookie.0.to_be_bytes(), FLUSH[8..16]);
        let reply = Reply::ok(req.cookie).encode();
        assert_eq!(reply[8..16], FLUSH[8..16]);
    }

    #[test]
    fn reply_fixture_round_trips() {
        let reply = Reply::parse(&REPLY_EIO).unwrap();
        assert_eq!(reply.errno(), Some(Errno::EIO));
        assert_eq!(reply.cookie, Cookie(42 << 32 | 7));
        assert_eq!(reply.encode(), REPLY_EIO);
        assert_eq!(Reply::ok(Cookie(1)).errno(), None);
    }

    #[test]
    fn short_header_is_an_error() {
        assert_eq!(
            Request::parse(&WRITE_FUA[..27]),
            Err(ParseError::ShortHeader { len: 27 })
        );
        assert_eq!(Request::parse(&[]), Err(ParseError::ShortHeader { len: 0 }));
        assert_eq!(
            Reply::parse(&REPLY_EIO[..3]),
            Err(ReplyParseError::ShortHeader { len: 3 })
        );
    }

    #[test]
    fn bad_magic_names_the_value() {
        let mut bytes = WRITE_FUA;
        bytes[0] = 0x52;
        let err = Request::parse(&bytes).unwrap_err();
        assert_eq!(err, ParseError::BadMagic { magic: 0x5260_9513 });
        assert!(err.is_fatal());
        assert!(err.to_string().contains("0x52609513"), "{err}");
        let mut reply = REPLY_EIO;
        reply[3] = 0;
        assert_eq!(
            Reply::parse(&reply),
            Err(ReplyParseError::BadMagic { magic: 0x6744_6600 })
        );
    }

    #[test]
    fn unknown_command_keeps_cookie() {
        let mut bytes = FLUSH;
        bytes[7] = 0x09;
        let err = Request::parse(&bytes).unwrap_err();
        assert_eq!(
            err,
            ParseError::UnknownCommand {
                command: 9,
                cookie: Cookie(0xdead_beef_0102_0304)
            }
        );
        assert!(!err.is_fatal());
    }

    #[test]
    fn unknown_flags_are_kept() {
        let mut bytes = WRITE_FUA;
        bytes[4] = 0x80;
        let req = Request::parse(&bytes).unwrap();
        assert_eq!(req.flags.unknown(), 0x8000);
    }

    #[test]
    fn errno_mapping_follows_the_protocol() {
        for (host, wire) in [
            (1, Errno::EPERM),
            (5, Errno::EIO),
            (12, Errno::ENOMEM),
            (22, Errno::EINVAL),
            (28, Errno::ENOSPC),
            (75, Errno::EOVERFLOW),
            (95, Errno::ENOTSUP),
            (108, Errno::ESHUTDOWN),
            (122, Errno::ENOSPC), // EDQUOT
            (27, Errno::ENOSPC),  // EFBIG
            (2, Errno::EIO),      // ENOENT
            (-1, Errno::EIO),
        ] {
            assert_eq!(Errno::from_raw_os_error(host), wire, "host errno {host}");
        }
        let custom = io::Error::other("no errno");
        assert_eq!(Errno::from_io_error(&custom), Errno::EIO);
        assert_eq!(Errno::EINVAL.to_string(), "EINVAL (22)");
    }

    #[test]
    fn exceeds_handles_overflow() {
        let req = Request::new(Command::Read, Cookie(0), u64::MAX - 10, 4096);
        assert!(req.exceeds(u64::MAX));
        let req = Request::new(Command::Read, Cookie(0), 4096, 4096);
        assert!(!req.exceeds(8192));
        assert!(req.exceeds(8191));
    }

    fn any_command() -> impl Strategy<Value = Command> {
        (0u16..8).prop_map(|c| Command::from_wire(c).unwrap())
    }

    proptest! {
        #[test]
        fn request_round_trips(command in any_command(), flags: u16, cookie: u64, offset: u64, len: u32) {
            let req = Request { command, flags: CommandFlags(flags), cookie: Cookie(cookie), offset, len };
            let bytes = req.encode();
            prop_assert_eq!(Request::parse(&bytes), Ok(req));
        }

        #[test]
        fn reply_round_trips(error: u32, cookie: u64) {
            let reply = Reply { error, cookie: Cookie(cookie) };
            prop_assert_eq!(Reply::parse(&reply.encode()), Ok(reply));
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            match Request::parse(&bytes) {
                Ok(req) => prop_assert_eq!(&req.encode()[..], &bytes[..REQUEST_LEN]),
                Err(ParseError::ShortHeader { len }) => prop_assert!(len < REQUEST_LEN),
                Err(ParseError::BadMagic { magic }) => prop_assert_ne!(magic, REQUEST_MAGIC),
                Err(ParseError::UnknownCommand { command, .. }) => prop_assert!(command > 7),
            }
            let _ = Reply::parse(&bytes);
        }

        #[test]
        fn magic_prefixed_bytes_parse_or_name_command(kind: u32, rest in proptest::array::uniform20(any::<u8>())) {
            let mut bytes = Vec::from(REQUEST_MAGIC.to_be_bytes());
            bytes.extend(kind.to_be_bytes());
            bytes.extend(rest);
            match Request::parse(&bytes) {
                Ok(req) => prop_assert_eq!(u32::from(req.command.to_wire()) | u32::from(req.flags.0) << 16, kind),
                Err(e) => prop_assert_eq!(e, ParseError::UnknownCommand { command: kind as u16, cookie: Cookie(u64::from_be_bytes(rest[..8].try_into().unwrap())) }),
            }
        }
    }
}
