//! [`Server`]: serves a [`BlockDevice`] over a [`KernelLink`], and the pieces every transport
//! shares.
//!
//! One idea per file:
//! - `request`: [`IoRequest`], what a transport asks of a device whatever its framing;
//! - `validate`: [`validate_io`] (and [`validate`] for an NBD header) checks a request against
//!   the export, so the device never sees one outside its size, misaligned, empty, or for a
//!   command it did not advertise;
//! - `dispatch`: [`Dispatcher`] calls the device for a validated request (FUA, errno mapping,
//!   panics caught) and is shared by every transport (the NBD loop, a ublk queue);
//!   `dispatch_async`: [`dispatch_async`], the same for an
//!   [`AsyncBlockDevice`](crate::AsyncBlockDevice), awaited per request;
//! - `unfilled`: the marker READ buffers can be poisoned with, and [`unfilled_ranges`], which
//!   finds what a device left unwritten;
//! - `pool`: the memory of requests in flight, bounded in bytes and recycled;
//! - `reader` and `replies`: reading NBD requests from a stream, and writing replies in batches;
//! - `conn`: [`serve`], the NBD transmission loop over the connections of one export, and its
//!   per-connection completion path; `conn_async`: the same loop for an async device, each
//!   request a task on its runtime.
//!
//! [`Server::run`] starts the link, [`serve`]s its connections, then unmounts the device and
//! finishes the link. [`Server::handle_one`] does exactly one request, synchronously, for tests
//! that drive the protocol step by step.
//!
//! The hot path, per request in steady state: no heap allocation (request buffers are recycled;
//! the bytes in flight are bounded, after which reading stops and the kernel waits); no copy but
//! the device's own (WRITE payloads go from the socket straight into the buffer the device gets,
//! READ data from that buffer to the socket); one `read` takes every request that has arrived;
//! replies that complete together leave in one `writev`, header and READ data side by side, and
//! no thread waits for another's `writev` unless it has large data of its own to send.
//!
//! The rules it keeps: the device never sees a request outside its size, misaligned, empty, or
//! for a command it did not advertise; every request gets exactly one reply; no payload follows an
//! error reply; nothing the socket brings makes it panic.

use std::io;
use std::os::unix::net::UnixStream;
use std::thread;

use crate::device::{BlockDevice, Capabilities};
use crate::link::{Export, KernelLink, LinkError};
use crate::proto::{Command, Cookie, Errno, ParseError, Reply, MAX_IO_LEN};

mod conn;
mod conn_async;
mod dispatch;
mod dispatch_async;
mod pool;
mod reader;
mod replies;
mod request;
mod unfilled;
mod validate;

pub(crate) use conn::serve_with;
pub use conn::{serve, ConnStream};
pub use dispatch::{Dispatcher, IoResult};
pub use dispatch_async::{block_status_async, dispatch_async};
pub(crate) use pool::Buffer;
use reader::{read_header, read_payload, skip_payload, Incoming};
use replies::send_reply;
pub use request::{IoFlags, IoOp, IoRequest};
pub use unfilled::{unfilled_ranges, unfilled_record, UNFILLED_RECORD};
pub use validate::{validate, validate_block_status, validate_io};

/// Tuning for a [`Server`] (and for [`serve`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerOptions {
    /// Threads serving each connection, each calling the device for one request at a time.
    /// Default: twice the CPUs, between 4 and 16.
    ///
    /// `0` or `1`: one thread per connection, which also holds replies back while more requests
    /// are already buffered and writes them together; device calls on a connection then never
    /// overlap, and concurrency comes from the connections alone.
    pub workers: usize,
    /// The memory requests in flight may hold, over all connections of one server (on the
    /// network link, each client has a server of its own), in bytes: each request's
    /// data buffer (a power of two from 512 bytes) plus a little for its reply, from its header
    /// until its reply is written, and the free buffers kept for reuse. When the next request
    /// does not fit, reading stops until replies have gone out (back-pressure), so memory stays
    /// bounded however long the run. A request larger than this is served alone. Default:
    /// 64 MiB, two requests of the largest size ([`MAX_IO_LEN`]).
    pub max_in_flight_bytes: usize,
    /// The largest READ or WRITE accepted; larger ones get EINVAL. Default: [`MAX_IO_LEN`].
    pub max_io_len: u32,
    /// Serve a device whose capabilities say [`never_blocks`](Capabilities::never_blocks) with
    /// two threads per connection that take turns reading and hold replies back to write them
    /// in batches, whatever `workers` says: the least overhead per request, with device calls
    /// still free to overlap. For an async device that says `never_blocks`: poll each request's
    /// future on the connection's reader thread, a task only for one that is not ready.
    /// Default: `true`.
    pub batch_never_blocks: bool,
    /// Fill READ buffers with the public unfilled marker instead of zeroes before the device
    /// sees them, so that a test can find bytes a device did not write with
    /// [`unfilled_ranges`]. Either way no READ ever carries bytes of an earlier request.
    /// Default: `false`.
    pub poison_reads: bool,
}

impl Default for ServerOptions {
    fn default() -> ServerOptions {
        let cpus = thread::available_parallelism().map_or(2, |n| n.get());
        ServerOptions {
            workers: (2 * cpus).clamp(4, 16),
            max_in_flight_bytes: 2 * MAX_IO_LEN as usize,
            max_io_len: MAX_IO_LEN,
            batch_never_blocks: true,
            poison_reads: false,
        }
    }
}

/// Why serving stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The device's geometry cannot be served.
    #[error("invalid device geometry: {0}")]
    InvalidGeometry(String),
    /// The link could not start or finish.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// A request header was corrupt: the stream is out of sync and the connection was closed.
    #[error("corrupt request stream on connection {conn}: {source}")]
    Protocol {
        /// Index of the connection.
        conn: usize,
        /// What was wrong.
        #[source]
        source: ParseError,
    },
    /// The stream ended inside a WRITE's payload.
    #[error("connection {conn} ended after {got} of {expected} payload bytes of WRITE {cookie}")]
    TruncatedPayload {
        /// Index of the connection.
        conn: usize,
        /// The WRITE's cookie.
        cookie: Cookie,
        /// Payload length announced.
        expected: u32,
        /// Bytes received.
        got: usize,
    },
    /// Reading or writing a connection failed.
    #[error("i/o error on connection {conn}: {source}")]
    Io {
        /// Index of the connection.
        conn: usize,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The device's [`unmount`](BlockDevice::unmount) panicked. The link was finished all the
    /// same; whatever unmount had left to do (a final flush, say) may not have happened.
    #[error("the device's unmount() panicked: {message}")]
    UnmountPanicked {
        /// The panic's message, when it had one.
        message: String,
    },
}

/// What [`Server::handle_one`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// A request was answered, successfully (`error: None`) or not.
    Replied {
        /// The request's cookie.
        cookie: Cookie,
        /// Its command, `None` for an unknown command number.
        command: Option<Command>,
        /// The errno sent, if any.
        error: Option<Errno>,
    },
    /// DISC arrived: the device was unmounted and the link finished.
    Disconnected,
    /// The link reached EOF: the device was unmounted and the link finished.
    Eof,
}

/// Serves a [`BlockDevice`] over a [`KernelLink`].
///
/// ```
/// use userblk::{LoopbackKernel, MemDevice};
///
/// let kernel = LoopbackKernel::start(MemDevice::new(1 << 20))?;
/// kernel.write(4096, &[7u8; 4096])?;
/// assert_eq!(kernel.read(4096, 4096)?, vec![7u8; 4096]);
/// kernel.shutdown()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Server<D, L> {
    device: D,
    link: L,
    options: ServerOptions,
    export: Export,
    conns: Vec<UnixStream>,
    started: bool,
    finished: bool,
}

impl<D: BlockDevice, L: KernelLink> Server<D, L> {
    /// A server for `device` over `link`, with default options.
    pub fn new(device: D, link: L) -> Result<Server<D, L>, ServerError> {
        Server::with_options(device, link, ServerOptions::default())
    }

    /// A server with explicit options. Fails if the device's geometry cannot be served.
    pub fn with_options(
        device: D,
        link: L,
        options: ServerOptions,
    ) -> Result<Server<D, L>, ServerError> {
        let export = export_of(&device)?;
        Ok(Server {
            device,
            link,
            options,
            export,
            conns: Vec::new(),
            started: false,
            finished: false,
        })
    }

    /// Before the link starts, what the kernel is asked for (size, block size, and the flags
    /// derived from the capabilities); once it has, what requests are checked against: that,
    /// [narrowed by](Export::narrowed_by) what the kernel took.
    pub fn export(&self) -> &Export {
        &self.export
    }

    /// The device served.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The link.
    pub fn link(&self) -> &L {
        &self.link
    }

    fn ensure_started(&mut self) -> Result<(), ServerError> {
        if !self.started {
            self.started = true;
            let started = self.link.start(&self.export)?;
            let got = started.export.block_size;
            if !got.is_power_of_two() || got < 512 {
                // Nothing can be served: release the kernel side without unmounting a device
                // that was never served.
                self.finished = true;
                drop(started.conns);
                let _ = self.link.finish();
                return Err(ServerError::InvalidGeometry(format!(
                    "the link reports block size {got}, not a power of two from 512"
                )));
            }
            self.export = self.export.narrowed_by(&started.export);
            self.conns = started.conns;
        }
        Ok(())
    }

    /// Unmounts the device and finishes the link, once.
    fn end(&mut self) -> Result<(), ServerError> {
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        let unmounted = Dispatcher::new(&self.device).unmount();
        self.conns.clear();
        let finished = self.link.finish();
        unmounted?;
        Ok(finished?)
    }

    /// Reads, executes and answers exactly one request from the first connection.
    ///
    /// Starts the link on first use. After DISC or EOF the device is unmounted and the link
    /// finished; later calls return the same step again.
    pub fn handle_one(&mut self) -> Result<Step, ServerError> {
        self.ensure_started()?;
        if self.finished || self.conns.is_empty() {
            return Ok(Step::Eof);
        }
        let conn = 0;
        let mut r = self.conns[0]
            .try_clone()
            .map_err(|source| ServerError::Io { conn, source })?;
        let req = match read_header(&mut r, conn)? {
            Incoming::Eof => {
                self.end()?;
                return Ok(Step::Eof);
            }
            Incoming::Unknown { cookie } => {
                send_reply(&mut r, Reply::error(cookie, Errno::EINVAL), &[])
                    .map_err(|source| ServerError::Io { conn, source })?;
                return Ok(Step::Replied {
                    cookie,
                    command: None,
                    error: Some(Errno::EINVAL),
                });
            }
            Incoming::Request(req) => req,
        };
        if req.command == Command::Disc {
            self.end()?;
            return Ok(Step::Disconnected);
        }
        let result = match validate(&req, &self.export, self.options.max_io_len) {
            Err(errno) => {
                skip_payload(&mut r, conn, &req)?;
                Err(errno)
            }
            Ok(io) => {
                let mut buf = vec![0u8; io.data_len()];
                if io.op == IoOp::Write {
                    read_payload(&mut r, conn, &req, &mut buf)?;
                }
                Dispatcher::new(&self.device)
                    .poison_reads(self.options.poison_reads)
                    .dispatch(&io, &mut buf)
                    .map(|_| (io.op, buf))
            }
        };
        let (reply, data) = match &result {
            Ok((IoOp::Read, buf)) => (Reply::ok(req.cookie), &buf[..]),
            Ok(_) => (Reply::ok(req.cookie), &[][..]),
            Err(errno) => (Reply::error(req.cookie, *errno), &[][..]),
        };
        send_reply(&mut r, reply, data).map_err(|source| ServerError::Io { conn, source })?;
        Ok(Step::Replied {
            cookie: req.cookie,
            command: Some(req.command),
            error: result.err(),
        })
    }

    /// Serves every connection until each has sent DISC or reached EOF, with requests in flight
    /// concurrently. Then answers what is in flight, unmounts the device (exactly once) and
    /// finishes the link. A corrupt stream closes every connection and returns the error.
    pub fn run(&mut self) -> Result<(), ServerError> {
        self.ensure_started()?;
        if self.finished {
            return Ok(());
        }
        let dispatcher = Dispatcher::new(&self.device).poison_reads(self.options.poison_reads);
        let error = serve(dispatcher, &self.export, &self.conns, &self.options).err();
        let ended = self.end();
        match error {
            Some(e) => Err(e),
            None => ended,
        }
    }
}

impl<D, L> Drop for Server<D, L> {
    fn drop(&mut self) {
        // Closing our ends is what tells the kernel side we are gone; `end()` has done the rest
        // when serving finished normally.
        for s in &self.conns {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// What a network client negotiated beyond what the kernel speaks (none of it for the kernel).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Features {
    /// Structured replies: READ data, holes and errors as chunks.
    pub(crate) structured: bool,
    /// `base:allocation` selected, with this context id: BLOCK_STATUS is served.
    pub(crate) block_status: Option<u32>,
    /// `NBD_FLAG_SEND_FAST_ZERO` was advertised: `NBD_CMD_FLAG_FAST_ZERO` is accepted (the
    /// device's write-zeroes is the fast path, so the request is served as it is).
    pub(crate) fast_zero: bool,
    /// `NBD_FLAG_SEND_DF` was advertised: `NBD_CMD_FLAG_DF` is accepted on READ (a READ is
    /// always one content chunk).
    pub(crate) df: bool,
}

/// The export for a device, or why it cannot be served.
pub fn export_of<D: BlockDevice + ?Sized>(device: &D) -> Result<Export, ServerError> {
    let block_size = device.block_size();
    if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
        return Err(ServerError::InvalidGeometry(format!(
            "block size {block_size} is not a power of two from 512 to 65536"
        )));
    }
    let size = device
        .blocks()
        .checked_mul(u64::from(block_size))
        .ok_or_else(|| ServerError::InvalidGeometry("blocks × block size overflows".into()))?;
    let caps: Capabilities = device.capabilities();
    Ok(Export {
        size,
        block_size,
        flags: caps.transmission_flags(),
    })
}
