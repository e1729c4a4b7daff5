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

/// What the kernel is told about the export when a link starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Export {
    /// Size in bytes, a multiple of `block_size`.
    pub size: u64,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// What the server supports, derived from the device's capabilities.
    pub flags: TransmissionFlags,
}

/// The transport a [`Server`](crate::Server) is generic over.
///
/// The server calls [`start`](Self::start) once, serves the returned sockets until each has sent
/// DISC or reached EOF, then calls [`finish`](Self::finish) once. How a disconnect is requested
/// (Ctrl+C, a handle, a fake kernel's shutdown) is the link's business: the kernel answers it by
/// sending DISC on every connection.
pub trait KernelLink: Send {
    /// Sets up the kernel side for `export` and returns the server's end of each connection.
    /// Requests may arrive as soon as this returns.
    fn start(&mut self, export: &Export) -> Result<Vec<UnixStream>, LinkError>;

    /// Releases the kernel side once the server has stopped reading every connection.
    fn finish(&mut self) -> Result<(), LinkError> {
        Ok(())
    }
}

impl<L: KernelLink + ?Sized> KernelLink for Box<L> {
    fn start(&mut self, export: &Export) -> Result<Vec<UnixStream>, LinkError> {
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
