//! One client, from its first byte to its last: the handshake (with TLS when asked for), then
//! the transmission phase through the same server the kernel link uses, on this client's
//! socket alone. Everything here happens on the client's own thread; nothing it meets can reach
//! another client or the device beyond the requests the server validates.

use std::io;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use super::handshake::{Handshake, HandshakeError, Negotiated, Offer, Outcome, BASE_ALLOCATION_ID};
use super::socket::Socket;
use super::tls::{complete_handshake, TlsBridge, TlsConfig};
use super::wire::{BlockSizes, ExportData, FLAG_SEND_DF, FLAG_SEND_FAST_ZERO};
use super::{NetEvent, NetOptions};
use crate::device::{BlockDevice, Capabilities, Extent};
use crate::link::Export;
use crate::proto::TransmissionFlags;
use crate::server::{export_of, serve_with, ConnStream, Dispatcher, Features, ServerError};

/// The device as every client sees it: `read_only` forced when asked, and `unmount` left to the
/// listener (each client's server ends on its own, but the device is unmounted once, at the end).
pub(crate) struct Exported<'a, D: ?Sized> {
    pub(crate) device: &'a D,
    pub(crate) read_only: bool,
}

impl<D: BlockDevice + ?Sized> BlockDevice for Exported<'_, D> {
    fn block_size(&self) -> u32 {
        self.device.block_size()
    }
    fn blocks(&self) -> u64 {
        self.device.blocks()
    }
    fn capabilities(&self) -> Capabilities {
        let mut caps = self.device.capabilities();
        if self.read_only {
            caps.read_only = true;
        }
        caps
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.device.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.device.write(offset, data)
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.device.write_fua(offset, data)
    }
    fn flush(&self) -> io::Result<()> {
        self.device.flush()
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.device.trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.device.write_zeroes(offset, len, may_trim)
    }
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.device.block_status(offset, len)
    }
    // Served as tasks when it is async: requests are validated against this wrapper's
    // capabilities (read-only forced) before the device sees them, and unmount is the
    // listener's either way.
    fn asynchronous(&self) -> Option<crate::async_device::AsyncServing> {
        self.device.asynchronous()
    }
    fn unmount(&self) {}
}

/// What the handshake offers for `device` under `options`, and the export the server enforces.
pub(crate) fn offer<D: BlockDevice + ?Sized>(
    device: &Exported<'_, D>,
    options: &NetOptions,
) -> Result<(Offer, Export), ServerError> {
    let export = export_of(device)?;
    // Every connection reaches the same device object, whose flush covers every write that
    // completed before it, whichever connection carried it: what CAN_MULTI_CONN promises.
    let mut flags = export.flags | TransmissionFlags::CAN_MULTI_CONN;
    // A device that says write-zeroes is worth sending has a write-zeroes faster than writing
    // zeroes: FAST_ZERO requests are served as they are, never refused with ENOTSUP.
    if flags.contains(TransmissionFlags::SEND_WRITE_ZEROES) {
        flags |= FLAG_SEND_FAST_ZERO;
    }
    let bs = export.block_size;
    let offer = Offer {
        name: options.export_name.clone(),
        description: options.description.clone(),
        export: ExportData {
            size: export.size,
            flags,
        },
        block_sizes: BlockSizes {
            minimum: bs,
            preferred: bs.max(4096),
            maximum: options.server.max_io_len.max(bs.max(4096)),
        },
        structured_replies: true,
    };
    Ok((offer, export))
}

/// How a session ended before transmission, or the stream to serve.
pub(crate) enum Handshaken {
    /// Plain connection, ready for requests.
    Plain(Socket, Negotiated),
    /// TLS through a bridge, ready for requests.
    Tls(TlsBridge, Negotiated),
    /// The client sent `NBD_OPT_ABORT`.
    Aborted,
}

/// Runs the handshake on `sock`, with the options' deadline and TLS; options read once
/// `stopping` is set get `NBD_REP_ERR_SHUTDOWN`.
pub(crate) fn handshake(
    mut sock: Socket,
    offer: &Offer,
    options: &NetOptions,
    stopping: &AtomicBool,
) -> Result<Handshaken, HandshakeError> {
    let io = |stage| move |e| HandshakeError::Io { stage, source: e };
    sock.set_deadline(Some(Instant::now() + options.handshake_timeout))
        .map_err(io("setting the handshake deadline"))?;
    let mode = if options.tls.is_some() {
        options.tls_mode
    } else {
        super::TlsMode::Off
    };
    let mut hs = Handshake::greet(&mut sock, offer, mode)?;
    hs.stop_flag(stopping);
    let mut tls: Option<rustls::ServerConnection> = None;
    let negotiated = loop {
        let outcome = match &mut tls {
            None => hs.options(&mut sock)?,
            Some(conn) => hs.options(&mut rustls::Stream::new(conn, &mut sock))?,
        };
        match outcome {
            Outcome::Aborted => return Ok(Handshaken::Aborted),
            Outcome::Transmission(n) => break n,
            Outcome::StartTls => {
                let config: &TlsConfig = options
                    .tls
                    .as_ref()
                    .ok_or_else(|| HandshakeError::Tls("TLS is not configured".into()))?;
                let mut conn = config
                    .session()
                    .map_err(|e| HandshakeError::Tls(e.to_string()))?;
                complete_handshake(&mut conn, &mut sock).map_err(|e| match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                        HandshakeError::Timeout {
                            stage: "TLS handshake",
                        }
                    }
                    _ => HandshakeError::Tls(e.to_string()),
                })?;
                hs.tls_started();
                tls = Some(conn);
            }
        }
    };
    sock.set_deadline(None)
        .map_err(io("clearing the handshake deadline"))?;
    Ok(match tls {
        None => Handshaken::Plain(sock, negotiated),
        Some(conn) => Handshaken::Tls(
            TlsBridge::start(rustls::Connection::Server(conn), sock)
                .map_err(io("starting the TLS pumps"))?,
            negotiated,
        ),
    })
}

/// Serves one client's transmission phase until DISC, EOF or a broken stream, through the same
/// NBD loop as the kernel's connections, with what the client negotiated.
pub(crate) fn transmission<D: BlockDevice + ?Sized, S: ConnStream>(
    device: &Exported<'_, D>,
    export: &Export,
    stream: S,
    negotiated: &Negotiated,
    options: &NetOptions,
) -> Result<(), ServerError> {
    let features = Features {
        structured: negotiated.structured_replies,
        block_status: negotiated.base_allocation.then_some(BASE_ALLOCATION_ID),
        fast_zero: negotiated.flags.contains(FLAG_SEND_FAST_ZERO),
        df: negotiated.flags.contains(FLAG_SEND_DF),
    };
    let streams = [stream];
    let result = serve_with(
        Dispatcher::new(device).poison_reads(options.server.poison_reads),
        export,
        &streams,
        &options.server,
        features,
    );
    // DISC or EOF: the server closes its side, as the protocol asks (with TLS, the pump
    // sends close_notify first).
    for s in &streams {
        let _ = s.shutdown();
    }
    result
}

/// Reports an event to the options' sink.
pub(crate) fn emit(options: &NetOptions, event: NetEvent<'_>) {
    (options.events)(&event);
}
