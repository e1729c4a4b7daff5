//! TLS for NBD (`NBD_OPT_STARTTLS`), with rustls: [`TlsConfig`] loads the server's certificate
//! and key (and the CA that client certificates must chain to, when they are required);
//! [`client_config`] builds the client side for tests and the harness; [`TlsBridge`] carries a
//! TLS session over a plain socket pair, so that the transmission phase reads and writes a socket
//! as it does without TLS (several threads read and write at once; a TLS session is one state
//! machine, so two pump threads own it and the server gets the other end of a socket pair).
//!
//! The pumps never hold the session while they wait on the network: a writer that blocks
//! because the peer is not reading must not stop this side from reading (both sides would
//! wait for each other). Records leave in order because whoever writes them holds the
//! socket's write lock from taking them out of the session to the end of the write.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::ops::DerefMut;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, Connection, ConnectionCommon, RootCertStore, ServerConfig};

use super::socket::Socket;

/// Why TLS could not be configured.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("cannot load {what} from {path}: {why}")]
    Pem {
        /// What the file should hold: "certificate", "private key", "CA certificate".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// rustls refused the configuration (a key that does not match the certificate, ...).
    #[error("invalid TLS configuration: {0}")]
    Config(String),
}

fn pem_error(what: &'static str, path: &Path, why: impl fmt::Display) -> TlsError {
    TlsError::Pem {
        what,
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM file (at least one).
pub fn load_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(what, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(what, path, e))?;
    if certs.is_empty() {
        return Err(pem_error(what, path, "no certificate in the file"));
    }
    Ok(certs)
}

/// The private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| pem_error("private key", path, e))
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path, "CA certificate")? {
        roots
            .add(cert)
            .map_err(|e| pem_error("CA certificate", path, e))?;
    }
    Ok(roots)
}

/// The server's TLS set-up.
#[derive(Clone, Debug)]
pub struct TlsConfig {
    config: Arc<ServerConfig>,
    client_certs: bool,
}

impl TlsConfig {
    /// Loads the certificate chain and key (PEM); with `client_ca`, clients must present a
    /// certificate that chains to it (`--tls-ca`), else the TLS handshake fails.
    pub fn from_pem_files(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<TlsConfig, TlsError> {
        let certs = load_certs(cert, "certificate")?;
        let key = load_key(key)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match client_ca {
            Some(ca) => {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                        .build()
                        .map_err(|e| TlsError::Config(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder
            .with_single_cert(certs, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(TlsConfig {
            config: Arc::new(config),
            client_certs: client_ca.is_some(),
        })
    }

    /// A configuration built with rustls directly.
    pub fn from_server_config(config: Arc<ServerConfig>) -> TlsConfig {
        TlsConfig {
            config,
            client_certs: false,
        }
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_certificates(&self) -> bool {
        self.client_certs
    }

    /// A new server session.
    pub(crate) fn session(&self) -> Result<rustls::ServerConnection, rustls::Error> {
        rustls::ServerConnection::new(Arc::clone(&self.config))
    }
}

/// A client configuration trusting `ca`, presenting `cert` and `key` when given.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(ca)?);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert, "certificate")?, load_key(key)?)
            .map_err(|e| TlsError::Config(e.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Starts a client session to `server_name` (a DNS name or an IP address in the certificate).
pub fn client_session(
    config: Arc<ClientConfig>,
    server_name: &str,
) -> Result<rustls::ClientConnection, TlsError> {
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| TlsError::Config(format!("server name {server_name:?}: {e}")))?;
    rustls::ClientConnection::new(config, name).map_err(|e| TlsError::Config(e.to_string()))
}

/// Runs a TLS handshake to completion on `sock` (which may carry a deadline).
pub fn complete_handshake<C, D>(conn: &mut C, sock: &mut Socket) -> io::Result<()>
where
    C: DerefMut<Target = ConnectionCommon<D>>,
{
    while conn.is_handshaking() {
        conn.complete_io(sock)?;
    }
    // A TLS 1.3 server sends its session tickets after the handshake: out with them now.
    while conn.wants_write() {
        conn.write_tls(sock)?;
    }
    Ok(())
}

/// A TLS session over a socket, as seen through `TLS stream <-> plain socket pair`: write
/// plaintext to [`take_stream`](Self::take_stream)'s socket and it leaves encrypted; what arrives comes out of it
/// decrypted. EOF on either side reaches the other (a close_notify goes out on the way).
#[derive(Debug)]
pub struct TlsBridge {
    stream: Option<UnixStream>,
    pumps: Vec<JoinHandle<io::Result<()>>>,
    sock: Socket,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl TlsBridge {
    /// Starts pumping `conn` (handshake done) over `sock`.
    pub fn start(conn: Connection, sock: Socket) -> io::Result<TlsBridge> {
        let (ours, theirs) = UnixStream::pair()?;
        let shared = Arc::new(Session {
            conn: Mutex::new(conn),
            out: Mutex::new(sock.try_clone()?),
        });
        let mut inbound = (Arc::clone(&shared), sock.try_clone()?, ours.try_clone()?);
        let mut outbound = (shared, ours);
        let pump_in = thread::Builder::new()
            .name("userblk-tls-in".into())
            .spawn(move || {
                let (session, r, plain) = &mut inbound;
                let result = pump_in(session, r, plain);
                // EOF (or an error) from the network: the reader of the plain side sees EOF.
                let _ = plain.shutdown(Shutdown::Write);
                result
            })?;
        let pump_out = thread::Builder::new()
            .name("userblk-tls-out".into())
            .spawn(move || {
                let (session, plain) = &mut outbound;
                let result = pump_out(session, plain);
                let _ = lock(&session.out).shutdown(Shutdown::Write);
                result
            });
        let pump_out = match pump_out {
            Ok(t) => t,
            Err(e) => {
                let _ = sock.shutdown(Shutdown::Both);
                return Err(e);
            }
        };
        Ok(TlsBridge {
            stream: Some(theirs),
            pumps: vec![pump_in, pump_out],
            sock,
        })
    }

    /// The plaintext end (taken once).
    pub fn take_stream(&mut self) -> Option<UnixStream> {
        self.stream.take()
    }

    /// Another handle on the network socket, to shut it down from elsewhere.
    pub fn socket(&self) -> io::Result<Socket> {
        self.sock.try_clone()
    }

    /// Waits for both pumps; returns the first error either met (a peer that vanished without
    /// close_notify is not one).
    ///
    /// Call it once the plaintext end is closed: the outgoing pump then sends close_notify and
    /// ends, and the connection is shut, so that the incoming pump ends too even if the peer
    /// never closes its side.
    pub fn join(mut self) -> io::Result<()> {
        let wait = |t: JoinHandle<io::Result<()>>| {
            t.join()
                .unwrap_or_else(|_| Err(io::Error::other("TLS pump panicked")))
        };
        let mut pumps = std::mem::take(&mut self.pumps);
        let outgoing = pumps.pop().map_or(Ok(()), wait);
        let _ = self.sock.shutdown(Shutdown::Both);
        let incoming = pumps.pop().map_or(Ok(()), wait);
        incoming.and(outgoing)
    }
}

impl Drop for TlsBridge {
    fn drop(&mut self) {
        if !self.pumps.is_empty() {
            let _ = self.sock.shutdown(Shutdown::Both);
        }
    }
}

/// A TLS session shared by the two pumps. Lock order: `out`, then `conn` (or `conn`, then a
/// `try_lock` of `out`, which never waits).
struct Session {
    conn: Mutex<Connection>,
    /// The network socket's sending side.
    out: Mutex<Socket>,
}

/// Sends the records the session has ready (and the plaintext of `rest`, encrypted), then lets
/// go of the socket while still holding the session, so that a record queued meanwhile is seen
/// by whoever holds the session next.
fn send_records<'a>(
    session: &'a Session,
    mut out: MutexGuard<'a, Socket>,
    mut conn: MutexGuard<'a, Connection>,
    mut rest: &[u8],
) -> io::Result<()> {
    loop {
        if !rest.is_empty() {
            let k = conn.writer().write(rest)?;
            rest = &rest[k..];
        }
        let mut records = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut records)?;
        }
        if records.is_empty() && rest.is_empty() {
            drop(out);
            return Ok(());
        }
        drop(conn);
        out.write_all(&records)?;
        conn = lock(&session.conn);
    }
}

/// Network to plaintext: reads records without holding the session, decrypts under it.
fn pump_in(session: &Session, r: &mut Socket, plain: &mut UnixStream) -> io::Result<()> {
    let mut net = vec![0u8; 64 << 10];
    let mut text = Vec::with_capacity(64 << 10);
    // Plaintext decrypted during the handshake but not yet read goes first.
    let mut closed = drain(&mut lock(&session.conn), &mut text)?;
    loop {
        if !text.is_empty() {
            plain.write_all(&text)?;
            text.clear();
        }
        if closed {
            return Ok(());
        }
        let n = match r.read(&mut net) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_gone(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut c = lock(&session.conn);
        let mut rest = &net[..n];
        let mut failed = None;
        while !rest.is_empty() {
            c.read_tls(&mut rest)?;
            if let Err(e) = c.process_new_packets() {
                // An alert goes out below; then give up.
                failed = Some(io::Error::new(io::ErrorKind::InvalidData, e));
                break;
            }
            closed |= drain(&mut c, &mut text)?;
        }
        // Key updates, alerts: out now if the socket is free, else its holder sends them
        // before letting go (it looks at the session while still holding the socket).
        if c.wants_write() {
            if let Ok(out) = session.out.try_lock() {
                let sent = send_records(session, out, c, &[]);
                if failed.is_none() {
                    sent?;
                }
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
    }
}

/// Moves the session's decrypted plaintext into `out`; `true` once the peer sent close_notify.
fn drain(c: &mut Connection, out: &mut Vec<u8>) -> io::Result<bool> {
    let mut buf = [0u8; 16 << 10];
    loop {
        match c.reader().read(&mut buf) {
            Ok(0) => return Ok(true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            // The peer closed without close_notify: the end of the stream all the same.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(true),
            Err(e) => return Err(e),
        }
    }
}

/// Plaintext to network: encrypts under the session, writes holding only the socket.
fn pump_out(session: &Session, plain: &mut UnixStream) -> io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match plain.read(&mut buf) {
            Ok(0) => {
                let out = lock(&session.out);
                let mut c = lock(&session.conn);
                c.send_close_notify();
                return match send_records(session, out, c, &[]) {
                    Err(e) if is_gone(&e) => Ok(()),
                    r => r,
                };
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let out = lock(&session.out);
        let c = lock(&session.conn);
        match send_records(session, out, c, &buf[..n]) {
            Ok(()) => {}
            Err(e) if is_gone(&e) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

fn is_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected
    )
}
