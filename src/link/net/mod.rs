//! NBD over the network: serve a [`BlockDevice`] to any NBD client (qemu, nbdinfo, nbdcopy,
//! nbd-client, fio's nbd engine) over TCP or a Unix socket, with the fixed newstyle handshake
//! and optional TLS, each client then served by the same transmission-phase server the kernel
//! link uses.
//!
//! - [`listen`] / [`NetOptions::listen`]: serve until stopped, mirroring
//!   [`link::nbd::mount`](crate::link::nbd::mount): `on_ready` runs on the calling thread with a
//!   [`NetHandle`] (its address, a way to stop) while clients are served on other threads.
//! - [`NetOptions::spawn`]: serve in the background; [`Listening`] stops on drop.
//! - [`wire`]: the handshake's wire format, shared with clients (the harness's NBD client rig).
//! - [`tls`]: certificates, and the TLS pump the transmission phase reads through.
//!
//! Several clients at once, up to [`NetOptions::max_clients`]; a client that sends garbage, stalls
//! in the handshake (past [`NetOptions::handshake_timeout`]) or hangs up at any byte gets a typed
//! error in the log ([`NetEvent`]) and affects no other client and not the device. Stopping (the
//! handle, or SIGINT/SIGTERM with [`NetOptions::stop_on_signals`]) stops accepting, ends
//! handshakes, lets every connected client's requests in flight finish, then flushes the device
//! and unmounts it once.
//!
//! ```
//! use std::io::{Read, Write};
//! use std::os::unix::net::UnixStream;
//! use userblk::link::net::{ListenAddr, NetOptions};
//! use userblk::MemDevice;
//!
//! let dir = tempfile::tempdir()?;
//! let addr = ListenAddr::Unix(dir.path().join("nbd.sock"));
//! let listening = NetOptions::new().export_name("disk").spawn(MemDevice::new(1 << 20), &addr)?;
//! // Any NBD client may connect now, e.g. `nbdinfo 'nbd+unix:///disk?socket=...'`.
//! let mut client = UnixStream::connect(dir.path().join("nbd.sock"))?;
//! let mut greeting = [0u8; 18];
//! client.read_exact(&mut greeting)?;
//! assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
//! drop(client);
//! listening.stop()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use crate::device::BlockDevice;
use crate::server::{ServerError, ServerOptions};

pub mod handshake;
mod listener;
mod session;
mod socket;
pub mod tls;
pub mod wire;

pub use handshake::{HandshakeError, TlsMode};
pub use listener::{Listening, NetHandle, NetStats};
pub use socket::{AddrError, ListenAddr, Socket};
pub use tls::{TlsConfig, TlsError};

/// Something that happened to a client, for the log.
#[derive(Debug)]
#[non_exhaustive]
pub enum NetEvent<'a> {
    /// A connection was accepted.
    Accepted {
        /// The client's number on this listener.
        client: u64,
        /// Who: `tcp ADDR:PORT` or `unix`.
        peer: &'a str,
    },
    /// A connection was closed at once: too many clients, or the server is stopping.
    Refused {
        /// Who.
        peer: &'a str,
        /// Why.
        reason: &'a str,
    },
    /// The handshake failed; the connection is closed.
    HandshakeFailed {
        /// The client.
        client: u64,
        /// Why.
        error: &'a HandshakeError,
    },
    /// The client ended the handshake with `NBD_OPT_ABORT`.
    Aborted {
        /// The client.
        client: u64,
    },
    /// The client entered the transmission phase.
    Serving {
        /// The client.
        client: u64,
        /// Over TLS.
        tls: bool,
        /// With structured replies.
        structured_replies: bool,
    },
    /// The transmission phase ended: cleanly (DISC or EOF), or with the error that closed it.
    Finished {
        /// The client.
        client: u64,
        /// How.
        result: Result<(), &'a ServerError>,
    },
}

impl fmt::Display for NetEvent<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetEvent::Accepted { client, peer } => write!(f, "client {client}: connected ({peer})"),
            NetEvent::Refused { peer, reason } => write!(f, "refused {peer}: {reason}"),
            NetEvent::HandshakeFailed { client, error } => {
                write!(f, "client {client}: handshake failed: {error}")
            }
            NetEvent::Aborted { client } => write!(f, "client {client}: aborted the handshake"),
            NetEvent::Serving {
                client,
                tls,
                structured_replies,
            } => write!(
                f,
                "client {client}: serving{}{}",
                if *tls { ", TLS" } else { "" },
                if *structured_replies {
                    ", structured replies"
                } else {
                    ""
                }
            ),
            NetEvent::Finished {
                client,
                result: Ok(()),
            } => write!(f, "client {client}: disconnected"),
            NetEvent::Finished {
                client,
                result: Err(e),
            } => write!(f, "client {client}: closed: {e}"),
        }
    }
}

/// Where [`NetEvent`]s go.
pub type EventSink = Arc<dyn Fn(&NetEvent<'_>) + Send + Sync>;

/// Why serving could not start or did not end cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: ListenAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The device's geometry cannot be served.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// TLS is required, or client certificates are, but no TLS configuration was given.
    #[error("{0}")]
    Config(String),
    /// The final flush of the device failed.
    #[error("flushing the device on stop failed: {0}")]
    Flush(#[source] io::Error),
    /// A system call the listener needs failed.
    #[error("{op} failed: {source}")]
    Io {
        /// What.
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// How to serve a device over the network: a builder.
#[derive(Clone)]
pub struct NetOptions {
    pub(crate) export_name: String,
    pub(crate) description: String,
    pub(crate) read_only: bool,
    pub(crate) max_clients: usize,
    pub(crate) handshake_timeout: Duration,
    pub(crate) tls: Option<TlsConfig>,
    pub(crate) tls_mode: TlsMode,
    pub(crate) stop_on_signals: bool,
    pub(crate) server: ServerOptions,
    pub(crate) events: EventSink,
}

impl fmt::Debug for NetOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetOptions")
            .field("export_name", &self.export_name)
            .field("description", &self.description)
            .field("read_only", &self.read_only)
            .field("max_clients", &self.max_clients)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("tls", &self.tls.is_some())
            .field("tls_mode", &self.tls_mode)
            .field("stop_on_signals", &self.stop_on_signals)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl Default for NetOptions {
    fn default() -> NetOptions {
        NetOptions::new()
    }
}

impl NetOptions {
    /// The defaults: the empty export name (the default export), no description, the device's
    /// own read-only flag, 16 clients, a 10-second handshake, no TLS, signals left alone, events
    /// printed to stderr.
    pub fn new() -> NetOptions {
        NetOptions {
            export_name: String::new(),
            description: String::new(),
            read_only: false,
            max_clients: 16,
            handshake_timeout: Duration::from_secs(10),
            tls: None,
            tls_mode: TlsMode::Off,
            stop_on_signals: false,
            server: ServerOptions::default(),
            events: Arc::new(|e: &NetEvent<'_>| eprintln!("userblk: {e}")),
        }
    }

    /// The export's name. Clients asking for the empty name (the default export) get it too.
    pub fn export_name(mut self, name: impl Into<String>) -> NetOptions {
        self.export_name = name.into();
        self
    }

    /// A description shown to clients (`NBD_OPT_LIST`, `NBD_INFO_DESCRIPTION`).
    pub fn description(mut self, text: impl Into<String>) -> NetOptions {
        self.description = text.into();
        self
    }

    /// Export read-only whatever the device's capabilities say: writes get EPERM.
    pub fn read_only(mut self, read_only: bool) -> NetOptions {
        self.read_only = read_only;
        self
    }

    /// Clients served at once (handshaking or transmitting); more are closed on arrival.
    /// Default 16; 0 counts as 1.
    pub fn max_clients(mut self, n: usize) -> NetOptions {
        self.max_clients = n.max(1);
        self
    }

    /// How long a client may take from connecting to entering transmission. Default 10 s.
    pub fn handshake_timeout(mut self, t: Duration) -> NetOptions {
        self.handshake_timeout = t;
        self
    }

    /// TLS: offered when `mode` is [`TlsMode::Allow`], required with [`TlsMode::Require`] (then
    /// no export is reachable without it). [`TlsMode::Off`] ignores `config`.
    pub fn tls(mut self, config: TlsConfig, mode: TlsMode) -> NetOptions {
        self.tls = Some(config);
        self.tls_mode = mode;
        self
    }

    /// With [`listen`](Self::listen) only: stop cleanly on SIGINT or SIGTERM (a second one closes
    /// every connection at once). The signals are blocked in the calling thread while serving,
    /// so call it from `main` before starting other threads.
    pub fn stop_on_signals(mut self, on: bool) -> NetOptions {
        self.stop_on_signals = on;
        self
    }

    /// The transmission-phase server's tuning, applied to each client: every client is served by
    /// a server of its own, so [`ServerOptions::max_in_flight_bytes`] bounds one client's memory
    /// in flight (a client that never reads its replies stalls only its own requests), and the
    /// listener holds at most [`max_clients`](Self::max_clients) times that.
    pub fn server_options(mut self, options: ServerOptions) -> NetOptions {
        self.server = options;
        self
    }

    /// Where events go (default: one line each on stderr).
    pub fn on_event(mut self, sink: impl Fn(&NetEvent<'_>) + Send + Sync + 'static) -> NetOptions {
        self.events = Arc::new(sink);
        self
    }

    /// Serves `device` on `addr` until stopped. Once listening, `on_ready` runs on the calling
    /// thread with a [`NetHandle`] (keep a clone to stop from elsewhere, or stop from `on_ready`
    /// itself); clients are served on other threads meanwhile. When it returns, serving goes on
    /// until stopped; then the device is flushed and unmounted, and `listen` returns
    /// `on_ready`'s value.
    ///
    /// If `on_ready` panics, serving stops before the panic goes on.
    pub fn listen<D, R>(
        &self,
        device: D,
        addr: &ListenAddr,
        on_ready: impl FnOnce(&NetHandle) -> R,
    ) -> Result<R, NetError>
    where
        D: BlockDevice,
    {
        listener::listen(self, device, addr, on_ready)
    }

    /// Serves `device` on threads of its own and returns once listening.
    pub fn spawn<D>(&self, device: D, addr: &ListenAddr) -> Result<Listening, NetError>
    where
        D: BlockDevice + 'static,
    {
        listener::spawn(self, device, addr)
    }
}

/// Serves `device` on `addr` until stopped: see [`NetOptions::listen`]. Other options are the
/// defaults (the empty export name, no TLS).
///
/// ```no_run
/// use userblk::link::net::{listen, ListenAddr};
/// use userblk::MemDevice;
///
/// let addr: ListenAddr = "127.0.0.1:10809".parse()?;
/// listen(MemDevice::new(1 << 30), &addr, |handle| {
///     println!("serving nbd://{}", handle.local_addr());
/// })?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn listen<D, R>(
    device: D,
    addr: &ListenAddr,
    on_ready: impl FnOnce(&NetHandle) -> R,
) -> Result<R, NetError>
where
    D: BlockDevice,
{
    NetOptions::new().listen(device, addr, on_ready)
}
