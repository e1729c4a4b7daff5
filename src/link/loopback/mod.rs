//! [`LoopbackKernel`]: an in-process fake kernel that serves a device through a real
//! [`Server`](crate::Server) over socketpairs, so a driver's tests run in plain `cargo test`
//! without root.
//!
//! It plays a named Linux kernel's NBD driver ([`KernelProfile`]: `linux-6.1`, `linux-6.12`)
//! on the other end of the socket:
//! - block operations (read, write with or without FUA, flush, trim, write-zeroes) become NBD
//!   requests the way that kernel makes them: its request size limit (128 KiB on 6.1, 1,280 KiB
//!   on 6.12), its tags (128 per connection) and cookie layout, WRITE_ZEROES only where it sends
//!   them, only commands the export's flags allow (a trim on a device without trim fails
//!   locally with EOPNOTSUPP, as in the block layer), DISC at shutdown;
//! - every reply is checked as the kernel checks it: magic, a cookie that is in flight on that
//!   connection, one reply per cookie, payload only after a successful READ. A violation kills
//!   that connection, as in the kernel, and is reported as a [`Violation`] naming the request;
//! - time: the kernel's per-request timeout when one is set (the request is sent again on
//!   another connection, or fails with EIO), a stall watchdog that fails an operation whose
//!   request is in flight too long instead of hanging, and a shutdown that gives up on a stuck
//!   server after a grace period; per-command latency ([`LoopbackKernel::latency`]);
//! - optional seeded [`Jitter`]: delays before sending and shuffled dispatch.
//!
//! [`RawKernel`] hands the test the kernel's socket itself, for malformed input.
//!
//! Files: `profile` (the kernels), `kernel` (the block operations), `inflight` (tags, cookies,
//! sending, waiting), `replies` (the reply checker), `timeouts` (kernel timeout, stall
//! watchdog, bounded shutdown), `latency`, `jitter`, `error`, `raw`.

use std::io;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::link::{Export, KernelLink, LinkError, Started};
use crate::proto::{Command, CommandFlags, Cookie};
use crate::server::ServerOptions;

mod error;
mod inflight;
mod jitter;
mod kernel;
mod latency;
mod profile;
mod raw;
mod replies;
mod timeouts;

pub use error::{LoopbackError, StuckRequest, Violation};
pub use jitter::Jitter;
pub use kernel::LoopbackKernel;
pub use latency::{CommandLatency, LatencyHistogram, LatencyReport, SMALL_REQUEST};
pub use profile::{CookieOrder, KernelProfile, Transport};
pub use raw::RawKernel;

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

/// How the fake kernel behaves: which kernel it plays, and the knobs a test turns.
///
/// `queue_depth` and `max_request` override the profile's values when non-zero, so that
/// `LoopbackOptions { profile: KernelProfile::linux_6_1(), ..LoopbackOptions::default() }`
/// plays 6.1 whole, and `LoopbackOptions { max_request: 4096, ..LoopbackOptions::default() }`
/// plays 6.12 with 4 KiB requests.
///
/// ```
/// use std::time::Duration;
/// use userblk::link::loopback::{KernelProfile, LoopbackOptions};
///
/// let old = LoopbackOptions {
///     profile: KernelProfile::by_name("linux-6.1").expect("a known kernel"),
///     stall_limit: Some(Duration::from_secs(2)),
///     ..LoopbackOptions::default()
/// };
/// assert_eq!(old.resolved_profile().max_request, 128 << 10);
/// assert_eq!(LoopbackOptions::default().resolved_profile().max_request, 1280 << 10);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoopbackOptions {
    /// The kernel played. Default: [`KernelProfile::newest`] (`linux-6.12`).
    pub profile: KernelProfile,
    /// Connections (sockets, hardware queues). Default: 1.
    pub connections: usize,
    /// Requests in flight per connection (the kernel's tag set); `0` (the default): the
    /// profile's (128).
    pub queue_depth: u16,
    /// Reads and writes are split into requests of at most this many bytes (`max_sectors_kb`);
    /// `0` (the default): the profile's (128 KiB on 6.1, 1,280 KiB on 6.12).
    pub max_request: u32,
    /// Whether WRITE_ZEROES is sent when the export advertises it and the profile sends it
    /// (6.12 and later); when false, or when the export does not advertise it, write-zeroes is
    /// done with zero-filled WRITEs, as the block layer's fallback does. Default: true.
    pub send_write_zeroes: bool,
    /// The kernel's per-request timeout (`NBD_SET_TIMEOUT`, netlink `NBD_ATTR_TIMEOUT`).
    ///
    /// `None` (the default) is the kernel's 0 (and so is `Some(Duration::ZERO)`): it only logs "possible stuck request" every
    /// 30 s and waits (`nbd_xmit_timeout`, 6.1 and 6.12). `Some(t)`: a request in flight longer
    /// than `t` has its connection shut down, and is sent again, with its `cmd_cookie` bumped,
    /// on another live connection; with none left it fails with EIO
    /// ([`LoopbackError::TimedOut`]), and every later operation fails too (`nbd_xmit_timeout`
    /// requeues when `num_connections > 1 || (num_connections == 1 && tag_set.timeout)`;
    /// `nbd_handle_cmd` finds no fallback and calls `sock_shutdown`). The first sending may
    /// still reach the device after the second has completed: a timed-out write can land
    /// after later writes. A late reply on the shut-down connection is never read.
    pub timeout: Option<Duration>,
    /// The stall watchdog: an operation whose request has been in flight longer fails with
    /// [`LoopbackError::Stalled`] instead of waiting on; a submitter that waits that long for
    /// a free tag, and a send blocked that long, fail the same way; and shutdown waits this
    /// long for the server to stop after DISC before it abandons the server thread with
    /// [`LoopbackError::Stuck`]. `None` (or zero): wait forever, as the kernel does.
    /// Default: 10 s.
    pub stall_limit: Option<Duration>,
    /// Seeded delays before sending and shuffled dispatch. Default: off.
    pub jitter: Option<Jitter>,
    /// The server's options.
    pub server: ServerOptions,
}

impl LoopbackOptions {
    /// The default stall limit.
    pub const DEFAULT_STALL_LIMIT: Duration = Duration::from_secs(10);

    /// Options playing `profile`, the rest default.
    pub fn for_profile(profile: KernelProfile) -> LoopbackOptions {
        LoopbackOptions {
            profile,
            ..LoopbackOptions::default()
        }
    }

    /// The profile with this options' overrides applied: what the fake kernel plays.
    pub fn resolved_profile(&self) -> KernelProfile {
        let mut p = self.profile;
        if self.queue_depth != 0 {
            p.queue_depth = self.queue_depth;
        }
        if self.max_request != 0 {
            p.max_request = self.max_request;
            p.max_hw_request = p.max_hw_request.max(self.max_request);
        }
        p.write_zeroes &= self.send_write_zeroes;
        p
    }
}

impl Default for LoopbackOptions {
    fn default() -> LoopbackOptions {
        LoopbackOptions {
            profile: KernelProfile::newest(),
            connections: 1,
            queue_depth: 0,
            max_request: 0,
            send_write_zeroes: true,
            timeout: None,
            stall_limit: Some(LoopbackOptions::DEFAULT_STALL_LIMIT),
            jitter: None,
            server: ServerOptions::default(),
        }
    }
}

/// Counters kept by the fake kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoopbackStats {
    /// Requests sent (DISC excluded; a request sent again after a timeout counts again).
    pub requests: u64,
    /// Replies received.
    pub replies: u64,
    /// Most requests in flight at once on one connection.
    pub max_in_flight: usize,
    /// Replies that overtook an older request still in flight on the same connection.
    pub overtaken: u64,
    /// Requests whose kernel timeout expired.
    pub timeouts: u64,
    /// Requests sent again on another connection (after a timeout or a failed send).
    pub requeued: u64,
    /// Operations failed by the stall watchdog.
    pub stalls: u64,
}

/// A request in flight, identified as the kernel identifies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    hwq: usize,
    tag: u16,
    seq: u64,
    cookie: Cookie,
}

impl Ticket {
    /// The cookie sent (the first time: one sent again after a timeout gets another).
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

    /// A TRIM.
    pub fn trim(offset: u64, len: u32) -> Op<'static> {
        Op {
            command: Command::Trim,
            flags: CommandFlags::NONE,
            offset,
            len,
            data: &[],
        }
    }

    /// A WRITE_ZEROES, with NO_HOLE when `no_hole`.
    pub fn write_zeroes(offset: u64, len: u32, no_hole: bool) -> Op<'static> {
        Op {
            command: Command::WriteZeroes,
            flags: if no_hole {
                CommandFlags::NO_HOLE
            } else {
                CommandFlags::NONE
            },
            offset,
            len,
            data: &[],
        }
    }
}
