//! [`KernelLink`]: what the [`Server`](crate::Server) needs from a transport. A link sets up the
//! kernel side of an export, hands the server its end of each connection (a Unix socket), and
//! releases the kernel side when serving ends.
//!
//! Two links exist: [`loopback`], an in-process fake kernel for tests, and `nbd`, the real
//! `/dev/nbdX` driver configured by ioctl or generic netlink. [`net`] serves NBD clients over
//! TCP and Unix sockets: a handshake first, then the same server on each client's socket.

use std::io;
use std::os::unix::net::UnixStream;

use crate::proto::TransmissionFlags;

pub mod loopback;
pub mod nbd;
pub mod net;
mod signals;
pub mod ublk;

/// An export's geometry and flags: what the server asks a link for, and what the link reports the
/// kernel took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Export {
    /// Size in bytes, a multiple of `block_size`.
    pub size: u64,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// What the server supports, derived from the device's capabilities.
    pub flags: TransmissionFlags,
}

impl Export {
    /// What requests are checked against when the server asked for `self` and the kernel took
    /// `got`: the stricter of the two on every point, so that the device never sees a request
    /// outside either (the smaller size, the larger block size, read-only if either is) and
    /// only commands both sides advertise. The other flags (ROTATIONAL, CAN_MULTI_CONN) are
    /// `got`'s.
    ///
    /// ```
    /// use userblk::proto::TransmissionFlags as F;
    /// use userblk::Export;
    ///
    /// let asked = Export { size: 1 << 20, block_size: 512, flags: F::SEND_FLUSH | F::SEND_TRIM };
    /// let got = Export { size: 1 << 19, block_size: 4096, flags: F::READ_ONLY | F::SEND_FLUSH };
    /// let served = asked.narrowed_by(&got);
    /// assert_eq!((served.size, served.block_size), (1 << 19, 4096));
    /// assert_eq!(served.flags, F::READ_ONLY | F::SEND_FLUSH);
    /// ```
    pub fn narrowed_by(&self, got: &Export) -> Export {
        const COMMANDS: u16 = TransmissionFlags::SEND_FLUSH.0
            | TransmissionFlags::SEND_FUA.0
            | TransmissionFlags::SEND_TRIM.0
            | TransmissionFlags::SEND_WRITE_ZEROES.0;
        let commands = got.flags.0 & self.flags.0 & COMMANDS;
        let read_only = (got.flags.0 | self.flags.0) & TransmissionFlags::READ_ONLY.0;
        Export {
            size: self.size.min(got.size),
            block_size: self.block_size.max(got.block_size),
            flags: TransmissionFlags((got.flags.0 & !COMMANDS) | commands | read_only),
        }
    }
}

/// What [`KernelLink::start`] hands the server.
#[derive(Debug)]
pub struct Started {
    /// The export as the kernel actually took it: it may differ from what was asked (a kernel
    /// may force read-only, round the size, or use a larger block size). The server checks
    /// requests against [`Export::narrowed_by`] this.
    pub export: Export,
    /// The server's end of each connection.
    pub conns: Vec<UnixStream>,
}

/// The transport a [`Server`](crate::Server) is generic over.
///
/// The server calls [`start`](Self::start) once, serves the returned sockets until each has sent
/// DISC or reached EOF, then calls [`finish`](Self::finish) once. How a disconnect is requested
/// (Ctrl+C, a handle, a fake kernel's shutdown) is the link's business: the kernel answers it by
/// sending DISC on every connection.
pub trait KernelLink: Send {
    /// Sets up the kernel side for `export` and returns the export as the kernel took it, with
    /// the server's end of each connection. Requests may arrive as soon as this returns.
    fn start(&mut self, export: &Export) -> Result<Started, LinkError>;

    /// Releases the kernel side once the server has stopped reading every connection.
    fn finish(&mut self) -> Result<(), LinkError> {
        Ok(())
    }
}

impl<L: KernelLink + ?Sized> KernelLink for Box<L> {
    fn start(&mut self, export: &Export) -> Result<Started, LinkError> {
        (**self).start(export)
    }
    fn finish(&mut self) -> Result<(), LinkError> {
        (**self).finish()
    }
}

/// Why a link could not set up, serve or release the kernel side. Each variant says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The NBD driver is not available.
    #[error("the nbd kernel module is not loaded: run `modprobe nbd` as root")]
    ModuleNotLoaded,
    /// The caller lacks CAP_SYS_ADMIN.
    #[error(
        "permission denied configuring {device}: NBD set-up needs CAP_SYS_ADMIN (run as root)"
    )]
    PermissionDenied {
        /// The device, or "nbd" when none was chosen yet.
        device: String,
    },
    /// The device is in use, or being set up by someone else.
    #[error("{device} is busy: it is already connected or being set up (pick another with --nbd, or disconnect it)")]
    Busy {
        /// The device.
        device: String,
    },
    /// The kernel rejects the block size.
    #[error("invalid block size {block_size}: must be a power of two from 512 to the page size")]
    InvalidBlockSize {
        /// The block size asked for.
        block_size: u32,
    },
    /// The device path does not name an NBD device.
    #[error("{device} is not an NBD device (expected /dev/nbdN)")]
    NotNbdDevice {
        /// The path given.
        device: String,
    },
    /// The device is not being served (not started yet, or already unmounted).
    #[error("{device} is not connected: it was never started or is already unmounted")]
    NotConnected {
        /// The device, or "nbd" when none was chosen.
        device: String,
    },
    /// The link was started twice.
    #[error("the link was already started")]
    AlreadyStarted,
    /// The ublk link failed: see [`ublk::UblkError`].
    #[error(transparent)]
    Ublk(#[from] ublk::UblkError),
    /// Any other system call failure, with the operation that failed.
    #[error("{op} failed: {source}")]
    Io {
        /// The operation, e.g. "SET_SOCK ioctl" or "socketpair".
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl LinkError {
    /// Wraps an `io::Error` from `op`.
    pub fn io(op: &'static str, source: io::Error) -> LinkError {
        LinkError::Io { op, source }
    }
}
