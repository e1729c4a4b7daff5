//! [`IoRequest`]: what a transport asks of a device, whatever its framing. The NBD loop builds one
//! from a request header, a ublk queue from an I/O descriptor; validation and dispatch take only
//! this.

use std::fmt;

use crate::proto::{Command, CommandFlags, Errno, Request};

/// The operation of an [`IoRequest`]: one per [`BlockDevice`](crate::BlockDevice) method that
/// serves requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IoOp {
    /// Read `len` bytes at `offset` into the request's buffer.
    Read,
    /// Write the request's buffer (`len` bytes) at `offset`.
    Write,
    /// Make every completed write durable.
    Flush,
    /// Discard `len` bytes at `offset`.
    Trim,
    /// Make `len` bytes at `offset` read back as zeroes.
    WriteZeroes,
}

impl IoOp {
    /// Whether the operation changes the device's content (refused on a read-only export).
    pub fn is_write(self) -> bool {
        matches!(self, IoOp::Write | IoOp::Trim | IoOp::WriteZeroes)
    }

    /// Whether the operation moves data through the request's buffer (READ and WRITE).
    pub fn has_data(self) -> bool {
        matches!(self, IoOp::Read | IoOp::Write)
    }
}

impl fmt::Display for IoOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoOp::Read => "READ",
            IoOp::Write => "WRITE",
            IoOp::Flush => "FLUSH",
            IoOp::Trim => "TRIM",
            IoOp::WriteZeroes => "WRITE_ZEROES",
        })
    }
}

/// Modifiers of an [`IoRequest`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IoFlags(u8);

impl IoFlags {
    /// No flags.
    pub const NONE: IoFlags = IoFlags(0);
    /// Force unit access: the data is durable when the request completes (NBD's FUA, the block
    /// layer's `REQ_FUA`).
    pub const FUA: IoFlags = IoFlags(1 << 0);
    /// On WRITE_ZEROES: keep the range allocated, punch no hole (NBD's NO_HOLE, ublk's
    /// `UBLK_IO_F_NOUNMAP`).
    pub const NO_HOLE: IoFlags = IoFlags(1 << 1);

    /// Whether every flag of `other` is set.
    pub fn contains(self, other: IoFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for IoFlags {
    type Output = IoFlags;
    fn bitor(self, rhs: IoFlags) -> IoFlags {
        IoFlags(self.0 | rhs.0)
    }
}

/// One request for the device, in bytes, before or after
/// [`validate_io`](crate::server::validate_io).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IoRequest {
    /// What to do.
    pub op: IoOp,
    /// Byte offset into the device (unused by FLUSH).
    pub offset: u64,
    /// Byte length (0 for FLUSH).
    pub len: u64,
    /// Modifiers.
    pub flags: IoFlags,
}

impl IoRequest {
    /// A request without flags.
    pub fn new(op: IoOp, offset: u64, len: u64) -> IoRequest {
        IoRequest {
            op,
            offset,
            len,
            flags: IoFlags::NONE,
        }
    }

    /// The same request with `flags` added.
    pub fn with(mut self, flags: IoFlags) -> IoRequest {
        self.flags = self.flags | flags;
        self
    }

    /// How long the buffer the request needs is: `len` for READ and WRITE, 0 otherwise.
    /// (Meaningful once validated: `len` is then at most the server's `max_io_len`.)
    pub fn data_len(&self) -> usize {
        if self.op.has_data() {
            usize::try_from(self.len).unwrap_or(usize::MAX)
        } else {
            0
        }
    }

    /// Whether `offset + len` overflows or ends past `size`.
    pub fn exceeds(&self, size: u64) -> bool {
        self.offset
            .checked_add(self.len)
            .is_none_or(|end| end > size)
    }

    /// The request an NBD header asks for, or the errno to reply: EINVAL for flags the protocol
    /// does not define or that do not apply (NO_HOLE off WRITE_ZEROES), and for commands that
    /// are never served (CACHE, BLOCK_STATUS; DISC is the connection's business, not the
    /// device's).
    pub fn from_nbd(req: &Request) -> Result<IoRequest, Errno> {
        if req.flags.unknown() != 0 {
            return Err(Errno::EINVAL);
        }
        if req.flags.contains(CommandFlags::NO_HOLE) && req.command != Command::WriteZeroes {
            return Err(Errno::EINVAL);
        }
        let op = match req.command {
            Command::Read => IoOp::Read,
            Command::Write => IoOp::Write,
            Command::Flush => IoOp::Flush,
            Command::Trim => IoOp::Trim,
            Command::WriteZeroes => IoOp::WriteZeroes,
            Command::Disc | Command::Cache | Command::BlockStatus => return Err(Errno::EINVAL),
        };
        let mut flags = IoFlags::NONE;
        if req.flags.contains(CommandFlags::FUA) {
            flags = flags | IoFlags::FUA;
        }
        if req.flags.contains(CommandFlags::NO_HOLE) {
            flags = flags | IoFlags::NO_HOLE;
        }
        Ok(IoRequest {
            op,
            offset: req.offset,
            len: u64::from(req.len),
            flags,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Cookie;

    #[test]
    fn nbd_headers_map_to_io_requests() {
        let mut r = Request::new(Command::WriteZeroes, Cookie(9), 4096, 8192);
        r.flags = CommandFlags::FUA | CommandFlags::NO_HOLE;
        let io = IoRequest::from_nbd(&r).unwrap();
        assert_eq!(
            io,
            IoRequest::new(IoOp::WriteZeroes, 4096, 8192).with(IoFlags::FUA | IoFlags::NO_HOLE)
        );
        assert_eq!(io.data_len(), 0);
        let read = Request::new(Command::Read, Cookie(1), 0, 512);
        assert_eq!(IoRequest::from_nbd(&read).unwrap().data_len(), 512);
        for command in [Command::Disc, Command::Cache, Command::BlockStatus] {
            let r = Request::new(command, Cookie(1), 0, 512);
            assert_eq!(IoRequest::from_nbd(&r), Err(Errno::EINVAL), "{command}");
        }
    }

    #[test]
    fn exceeds_handles_overflow() {
        let req = IoRequest::new(IoOp::Read, u64::MAX - 10, 4096);
        assert!(req.exceeds(u64::MAX));
        let req = IoRequest::new(IoOp::Trim, 4096, 4096);
        assert!(!req.exceeds(8192));
        assert!(req.exceeds(8191));
    }
}
