//! The harness as an NBD client: the same conformance cases, random tests and trace replays, over
//! TCP or a Unix socket, against userblk's own network server or any other NBD server.
//!
//! - [`NetRig`] serves each device with [`userblk::link::net`] on a loopback address or a Unix
//!   socket of its own, and drives it through [`NbdClient`]: the whole network path, handshake
//!   included, for every case.
//! - [`ExternalRig`] connects to a server that is already running (nbdkit, qemu-nbd, another
//!   userblk), from a URI (`nbd://HOST:PORT/NAME`, `nbd+unix:///NAME?socket=PATH`). Such a
//!   server serves its own disk: the device a case hands to [`Rig::attach`] is **dropped
//!   unused**, and it says so ([`Rig::serves_given_device`] is `false`): cases that need a device
//!   of their own (device errors, read-only wrappers, flush counts, unmount counts) skip.
//!   [`NbdClientTarget::connect`] gives one target without a rig.
//!
//! Requests go out as they are: what a server does with a request past the end, misaligned or
//! on a read-only export is the server's to answer. Only what the client must not send at all
//! (TRIM and WRITE_ZEROES the server did not advertise, FLUSH without `SEND_FLUSH`, FUA without
//! `SEND_FUA`) is handled as the kernel does: trim fails with EOPNOTSUPP, zeroes are written as
//! zero-filled WRITEs, flush does nothing, FUA becomes WRITE + FLUSH.

mod client;
mod replies;
mod uri;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

pub use client::{ClientError, ClientOptions, ExportInfo, Extent, NbdClient};
pub use uri::{NbdAddr, NbdUri, UriError, DEFAULT_PORT};

use userblk::link::net::{ListenAddr, Listening, NetOptions};
use userblk::proto::TransmissionFlags;
use userblk::BlockDevice;

use crate::target::{Attached, OpError, RawRequests, Rig, Target};
use userblk::link::loopback::Op;

impl From<ClientError> for OpError {
    fn from(e: ClientError) -> OpError {
        let errno = match &e {
            ClientError::Errno { errno, .. } => Some(*errno as i32),
            ClientError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        };
        OpError {
            errno,
            message: e.to_string(),
        }
    }
}

/// A device behind an NBD server, driven through an [`NbdClient`].
#[derive(Debug)]
pub struct NbdClientTarget {
    client: Option<NbdClient>,
    /// Our own server, when the rig started one (stopped on detach).
    listening: Option<Listening>,
    /// The Unix socket's directory, removed last.
    _dir: Option<tempfile::TempDir>,
}

impl NbdClientTarget {
    /// Connects to the server at `uri` (TLS as the URI says).
    pub fn connect(uri: &str) -> Result<NbdClientTarget, OpError> {
        let uri: NbdUri = uri.parse().map_err(|e: UriError| OpError {
            errno: None,
            message: e.to_string(),
        })?;
        Ok(NbdClientTarget {
            client: Some(NbdClient::connect(&uri)?),
            listening: None,
            _dir: None,
        })
    }

    /// The client.
    pub fn client(&self) -> &NbdClient {
        // Present until detach consumes the target.
        self.client
            .as_ref()
            .unwrap_or_else(|| unreachable!("client taken before detach"))
    }

    fn closed() -> OpError {
        OpError {
            errno: None,
            message: "the target is detached".into(),
        }
    }

    fn c(&self) -> Result<&NbdClient, OpError> {
        self.client.as_ref().ok_or_else(Self::closed)
    }
}

impl Target for NbdClientTarget {
    fn size(&self) -> u64 {
        self.client.as_ref().map_or(0, |c| c.info().size)
    }
    fn block_size(&self) -> u32 {
        // The server's minimum, but never below 512: what clients desiring interoperability use
        // (and what the cases' alignment assumes).
        self.client
            .as_ref()
            .and_then(|c| c.info().block_sizes)
            .map_or(512, |b| b.minimum.max(512))
    }
    fn min_block_size(&self) -> u32 {
        // Without a NBD_INFO_BLOCK_SIZE the protocol's default minimum is 1: a server SHOULD
        // then accept any byte offset and length.
        self.client
            .as_ref()
            .and_then(|c| c.info().block_sizes)
            .map_or(1, |b| b.minimum.max(1))
    }
    fn max_request(&self) -> u32 {
        self.client
            .as_ref()
            .and_then(|c| c.info().block_sizes)
            .map_or(u32::MAX, |b| b.maximum)
    }
    fn flags(&self) -> TransmissionFlags {
        self.client
            .as_ref()
            .map_or(TransmissionFlags(0), |c| c.info().flags)
    }
    fn sees_device_errno(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, OpError> {
        Ok(self.c()?.read(offset, len)?)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), OpError> {
        Ok(self.c()?.write(offset, data, false)?)
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> Result<(), OpError> {
        let c = self.c()?;
        let flags = c.info().flags;
        if flags.contains(TransmissionFlags::SEND_FLUSH | TransmissionFlags::SEND_FUA) {
            return Ok(c.write(offset, data, true)?);
        }
        c.write(offset, data, false)?;
        self.flush()
    }
    fn flush(&self) -> Result<(), OpError> {
        let c = self.c()?;
        if !c.info().flags.contains(TransmissionFlags::SEND_FLUSH) {
            return Ok(());
        }
        Ok(c.flush()?)
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), OpError> {
        let c = self.c()?;
        if !c.info().flags.contains(TransmissionFlags::SEND_TRIM) {
            return Err(OpError {
                errno: Some(95),
                message: "the server does not advertise TRIM".into(),
            });
        }
        Ok(c.trim(offset, len)?)
    }
    fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> Result<(), OpError> {
        let c = self.c()?;
        if c.info()
            .flags
            .contains(TransmissionFlags::SEND_WRITE_ZEROES)
        {
            return Ok(c.write_zeroes(offset, len, no_hole)?);
        }
        // As the block layer does without WRITE_ZEROES: zero-filled writes.
        let max = c.max_payload();
        let zeroes = vec![0u8; max.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(max);
            c.write(offset + done, &zeroes[..n as usize], false)?;
            done += n;
        }
        Ok(())
    }
    fn raw(&self) -> Option<&dyn RawRequests> {
        Some(self)
    }
}

/// The conformance suite's server checks go straight to the server: an NBD client sends what it
/// is given.
impl RawRequests for NbdClientTarget {
    fn request(&self, op: Op<'_>) -> Result<Vec<u8>, OpError> {
        Ok(self
            .c()?
            .raw_request(op.command, op.flags, op.offset, op.len, op.data)?)
    }
}

impl Attached for NbdClientTarget {
    fn detach(mut self: Box<Self>) -> Result<(), OpError> {
        let disconnected = match self.client.take() {
            Some(c) => c.disconnect().map_err(OpError::from),
            None => Ok(()),
        };
        let stopped = match self.listening.take() {
            Some(l) => l.stop().map_err(|e| OpError {
                errno: None,
                message: e.to_string(),
            }),
            None => Ok(()),
        };
        disconnected.and(stopped)
    }
}

/// Where a [`NetRig`] listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetTransport {
    /// TCP on 127.0.0.1, a port the system picks.
    Tcp,
    /// TCP on the IPv6 loopback address `::1`, a port the system picks.
    Tcp6,
    /// A Unix socket in a temporary directory.
    Unix,
}

/// Serves each device with userblk's network server and drives it as an NBD client.
#[derive(Clone, Debug)]
pub struct NetRig {
    /// Where to listen.
    pub transport: NetTransport,
    /// How to serve (export name, TLS, ...). Events go nowhere unless set.
    pub server: NetOptions,
    /// How the client negotiates.
    pub client: ClientOptions,
}

impl NetRig {
    /// A rig over `transport`, with the default server (silent) and client options.
    pub fn new(transport: NetTransport) -> NetRig {
        NetRig {
            transport,
            server: NetOptions::new().on_event(|_| {}),
            client: ClientOptions::default(),
        }
    }
}

impl Rig for NetRig {
    fn name(&self) -> String {
        let t = match self.transport {
            NetTransport::Tcp => "tcp 127.0.0.1",
            NetTransport::Tcp6 => "tcp [::1]",
            NetTransport::Unix => "unix socket",
        };
        format!("userblk net ({t})")
    }

    fn attach(&self, device: Box<dyn BlockDevice>) -> Result<Box<dyn Attached>, OpError> {
        static N: AtomicU64 = AtomicU64::new(0);
        let fail = |message: String| OpError {
            errno: None,
            message,
        };
        let (addr, dir) = match self.transport {
            NetTransport::Tcp => (ListenAddr::Tcp(([127, 0, 0, 1], 0).into()), None),
            NetTransport::Tcp6 => (
                ListenAddr::Tcp((std::net::Ipv6Addr::LOCALHOST, 0).into()),
                None,
            ),
            NetTransport::Unix => {
                let dir = tempfile::tempdir().map_err(|e| fail(format!("tempdir: {e}")))?;
                let n = N.fetch_add(1, Ordering::Relaxed);
                let path: PathBuf = dir.path().join(format!("nbd{n}.sock"));
                (ListenAddr::Unix(path), Some(dir))
            }
        };
        let listening = self
            .server
            .spawn(device, &addr)
            .map_err(|e| fail(e.to_string()))?;
        let uri = NbdUri {
            addr: match listening.local_addr() {
                ListenAddr::Tcp(a) => NbdAddr::Tcp {
                    host: a.ip().to_string(),
                    port: a.port(),
                },
                ListenAddr::Unix(p) => NbdAddr::Unix(p.clone()),
            },
            export: String::new(),
            tls: self.client.tls.is_some(),
            tls_certificates: None,
        };
        let client = NbdClient::connect_with(&uri, &self.client)?;
        Ok(Box::new(NbdClientTarget {
            client: Some(client),
            listening: Some(listening),
            _dir: dir,
        }))
    }
}

/// Connects to a server that is already running. The device given to [`Rig::attach`] is
/// dropped: the server serves its own disk (see the module's documentation).
#[derive(Clone, Debug)]
pub struct ExternalRig {
    uri: NbdUri,
    client: ClientOptions,
}

impl ExternalRig {
    /// A rig for the server at `uri` (`nbd://HOST:PORT/NAME`, `nbd+unix:///NAME?socket=PATH`,
    /// `nbds://...?tls-certificates=DIR`).
    pub fn new(uri: &str) -> Result<ExternalRig, OpError> {
        let uri: NbdUri = uri.parse().map_err(|e: UriError| OpError {
            errno: None,
            message: e.to_string(),
        })?;
        let client = ClientOptions::for_uri(&uri)?;
        Ok(ExternalRig { uri, client })
    }

    /// The same rig with other client options.
    pub fn with_client(mut self, client: ClientOptions) -> ExternalRig {
        self.client = client;
        self
    }

    /// The server's URI.
    pub fn uri(&self) -> &NbdUri {
        &self.uri
    }
}

impl Rig for ExternalRig {
    fn name(&self) -> String {
        self.uri.to_string()
    }

    fn serves_given_device(&self) -> bool {
        false
    }

    fn attach(&self, device: Box<dyn BlockDevice>) -> Result<Box<dyn Attached>, OpError> {
        drop(device);
        Ok(Box::new(NbdClientTarget {
            client: Some(NbdClient::connect_with(&self.uri, &self.client)?),
            listening: None,
            _dir: None,
        }))
    }
}
