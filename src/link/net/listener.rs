//! The listener: binds, accepts clients (up to the maximum), runs each client's session on a
//! thread of its own, and stops cleanly: no more accepting, handshakes cut, transmissions left to
//! finish what is in flight (their sockets' read side is shut, so each server sees EOF, answers
//! what it has, and ends), then one flush and one unmount of the device.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener};
use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle, Scope};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::handshake::Offer;
use super::session::{self, emit, Exported, Handshaken};
use super::socket::{ListenAddr, Socket};
use super::{NetError, NetEvent, NetOptions, TlsMode};
use crate::device::BlockDevice;
use crate::link::signals::{OnSignal, SignalWatch};
use crate::link::Export;

/// Counters of a listener's clients.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Connections accepted (refused ones not counted).
    pub accepted: u64,
    /// Connections closed on arrival (too many clients, or stopping).
    pub refused: u64,
    /// Handshakes that failed.
    pub handshake_failures: u64,
    /// Clients that entered transmission.
    pub served: u64,
    /// Transmissions that ended with an error.
    pub transmission_errors: u64,
    /// Clients connected now.
    pub active: usize,
}

#[derive(Debug)]
struct Entry {
    /// Another handle on the client's socket, to shut it down when stopping.
    sock: Socket,
    transmitting: bool,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    handshake_failures: AtomicU64,
    served: AtomicU64,
    transmission_errors: AtomicU64,
}

#[derive(Debug)]
struct Control {
    stopping: AtomicBool,
    waker: UnixStream,
    local: ListenAddr,
    clients: Mutex<HashMap<u64, Entry>>,
    active: AtomicUsize,
    counters: Counters,
    signal: Mutex<Option<&'static str>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The remote control of a listener: its address, its counters, and a way to stop it.
#[derive(Clone, Debug)]
pub struct NetHandle {
    control: Arc<Control>,
}

impl NetHandle {
    /// Where it listens (with the port the system picked when asked for port 0).
    pub fn local_addr(&self) -> &ListenAddr {
        &self.control.local
    }

    /// Stops: no more clients; a client in the handshake gets `NBD_REP_ERR_SHUTDOWN` for the
    /// options it has already sent, then its connection ends; transmissions finish what is in
    /// flight and end (a handshaking client that does not read its replies holds the end back
    /// for at most the handshake timeout; [`stop_now`](Self::stop_now) does not wait). Returns at
    /// once; [`NetOptions::listen`] returns when everything has ended.
    pub fn stop(&self) {
        let c = &self.control;
        if c.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        let _ = (&c.waker).write_all(&[1]);
        for entry in lock(&c.clients).values() {
            // The server of a transmitting client sees EOF, answers what it has read and ends.
            // A handshaking client's options already received are answered
            // NBD_REP_ERR_SHUTDOWN (the write side stays open for that), then it sees EOF.
            let _ = entry.sock.shutdown(Shutdown::Read);
        }
    }

    /// Stops without waiting for requests in flight: every connection is closed at once.
    pub fn stop_now(&self) {
        self.stop();
        for entry in lock(&self.control.clients).values() {
            let _ = entry.sock.shutdown(Shutdown::Both);
        }
    }

    /// Whether [`stop`](Self::stop) was called (or a signal came).
    pub fn is_stopping(&self) -> bool {
        self.control.stopping.load(Ordering::SeqCst)
    }

    /// The counters so far.
    pub fn stats(&self) -> NetStats {
        let c = &self.control.counters;
        NetStats {
            accepted: c.accepted.load(Ordering::SeqCst),
            refused: c.refused.load(Ordering::SeqCst),
            handshake_failures: c.handshake_failures.load(Ordering::SeqCst),
            served: c.served.load(Ordering::SeqCst),
            transmission_errors: c.transmission_errors.load(Ordering::SeqCst),
            active: self.control.active.load(Ordering::SeqCst),
        }
    }

    /// The signal that stopped serving, if one did.
    pub fn signal(&self) -> Option<&'static str> {
        *lock(&self.control.signal)
    }
}

/// With [`NetOptions::stop_on_signals`]: the first signal stops cleanly, a second closes every
/// connection at once. The last signal is kept.
impl OnSignal for NetHandle {
    fn record(&self, name: &'static str) {
        *lock(&self.control.signal) = Some(name);
    }

    fn stop(&self) {
        NetHandle::stop(self);
    }

    fn stop_now(&self) {
        NetHandle::stop_now(self);
    }
}

enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Bound {
    fn bind(addr: &ListenAddr) -> Result<(Bound, ListenAddr), NetError> {
        let err = |source| NetError::Bind {
            addr: addr.clone(),
            source,
        };
        let bound = match addr {
            ListenAddr::Tcp(a) => {
                let l = TcpListener::bind(a).map_err(err)?;
                let local = l.local_addr().map_err(err)?;
                l.set_nonblocking(true).map_err(err)?;
                (Bound::Tcp(l), ListenAddr::Tcp(local))
            }
            ListenAddr::Unix(p) => {
                remove_stale_socket(p).map_err(err)?;
                let l = UnixListener::bind(p).map_err(err)?;
                l.set_nonblocking(true).map_err(err)?;
                (Bound::Unix(l, p.clone()), addr.clone())
            }
        };
        Ok(bound)
    }

    fn accept(&self) -> io::Result<Socket> {
        Ok(match self {
            Bound::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                Socket::tcp(s)
            }
            Bound::Unix(l, _) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                Socket::unix(s)
            }
        })
    }

    fn poll_fd(&self) -> PollFd<'_> {
        let fd = match self {
            Bound::Tcp(l) => l.as_fd(),
            Bound::Unix(l, _) => l.as_fd(),
        };
        PollFd::new(fd, PollFlags::POLLIN)
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        if let Bound::Unix(_, path) = self {
            let _ = fs::remove_file(path);
        }
    }
}

/// A socket file left by a server that is gone (connecting is refused) is removed; a live one
/// is left alone, and binding then fails with "address in use".
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => fs::remove_file(path),
            _ => Ok(()),
        },
        _ => Ok(()),
    }
}

/// Everything a client's thread needs.
struct Ctx<'a, D: ?Sized> {
    device: &'a D,
    offer: Offer,
    export: Export,
    options: &'a NetOptions,
    control: &'a Control,
}

pub(super) fn listen<D, R>(
    options: &NetOptions,
    device: D,
    addr: &ListenAddr,
    on_ready: impl FnOnce(&NetHandle) -> R,
) -> Result<R, NetError>
where
    D: BlockDevice,
{
    if options.tls_mode != TlsMode::Off && options.tls.is_none() {
        return Err(NetError::Config(
            "TLS is allowed or required but no certificate and key were given".into(),
        ));
    }
    let probe = Exported {
        device: &device,
        read_only: options.read_only,
    };
    let (offer, export) = session::offer(&probe, options)?;
    let (bound, local) = Bound::bind(addr)?;
    let (waker_r, waker) = UnixStream::pair().map_err(|source| NetError::Io {
        op: "socketpair",
        source,
    })?;
    waker_r
        .set_nonblocking(true)
        .map_err(|source| NetError::Io {
            op: "fcntl",
            source,
        })?;
    let control = Arc::new(Control {
        stopping: AtomicBool::new(false),
        waker,
        local,
        clients: Mutex::new(HashMap::new()),
        active: AtomicUsize::new(0),
        counters: Counters::default(),
        signal: Mutex::new(None),
    });
    let handle = NetHandle {
        control: Arc::clone(&control),
    };
    let watch = if options.stop_on_signals {
        Some(
            SignalWatch::start(handle.clone()).map_err(|source| NetError::Io {
                op: "blocking SIGINT and SIGTERM",
                source,
            })?,
        )
    } else {
        None
    };
    let ctx = Ctx {
        device: &device,
        offer,
        export,
        options,
        control: &control,
    };
    let value = thread::scope(|s| {
        let ctx = &ctx;
        let bound = &bound;
        let waker_r = &waker_r;
        let accepting = thread::Builder::new()
            .name("userblk-accept".into())
            .spawn_scoped(s, move || accept_loop(s, bound, waker_r, ctx));
        let accepting = match accepting {
            Ok(t) => t,
            Err(source) => {
                handle.stop();
                return Err(NetError::Io {
                    op: "spawning the accept thread",
                    source,
                });
            }
        };
        // A panic in `on_ready` unwinds through this guard, which stops serving, so that the
        // scope's join of every thread ends.
        let guard = StopOnDrop(&handle);
        let value = on_ready(&handle);
        std::mem::forget(guard);
        if let Err(payload) = accepting.join() {
            handle.stop_now();
            panic::resume_unwind(payload);
        }
        Ok(value)
    });
    if let Some(w) = watch {
        w.stop();
    }
    drop(bound);
    let value = value?;
    // Every client has ended: one flush for whatever any of them wrote, then one unmount.
    let flushed = device.flush();
    device.unmount();
    flushed.map_err(NetError::Flush)?;
    Ok(value)
}

struct StopOnDrop<'a>(&'a NetHandle);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stop_now();
    }
}

fn accept_loop<'scope, D: BlockDevice + ?Sized>(
    s: &'scope Scope<'scope, '_>,
    bound: &Bound,
    waker: &UnixStream,
    ctx: &'scope Ctx<'scope, D>,
) {
    let control = ctx.control;
    let mut next_id = 0u64;
    loop {
        let mut fds = [
            bound.poll_fd(),
            PollFd::new(waker.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => {
                // Never seen in practice; avoid a busy loop all the same.
                thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        if control.stopping.load(Ordering::SeqCst) {
            let mut drain = [0u8; 16];
            let _ = (&*waker).read(&mut drain);
            return;
        }
        let sock = match bound.accept() {
            Ok(sock) => sock,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // A client that left before accept (ECONNABORTED), or out of descriptors
                // (EMFILE): go on after a pause, rather than spin.
                emit(
                    ctx.options,
                    NetEvent::Refused {
                        peer: "?",
                        reason: &format!("accept failed: {e}"),
                    },
                );
                thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        let peer = sock.peer();
        if control.active.load(Ordering::SeqCst) >= ctx.options.max_clients {
            control.counters.refused.fetch_add(1, Ordering::SeqCst);
            let reason = format!("{} clients already connected", ctx.options.max_clients);
            emit(
                ctx.options,
                NetEvent::Refused {
                    peer: &peer,
                    reason: &reason,
                },
            );
            continue;
        }
        let id = next_id;
        next_id += 1;
        let shutter = match sock.try_clone() {
            Ok(c) => c,
            Err(e) => {
                control.counters.refused.fetch_add(1, Ordering::SeqCst);
                emit(
                    ctx.options,
                    NetEvent::Refused {
                        peer: &peer,
                        reason: &e.to_string(),
                    },
                );
                continue;
            }
        };
        {
            let mut clients = lock(&control.clients);
            if control.stopping.load(Ordering::SeqCst) {
                return;
            }
            clients.insert(
                id,
                Entry {
                    sock: shutter,
                    transmitting: false,
                },
            );
        }
        control.active.fetch_add(1, Ordering::SeqCst);
        control.counters.accepted.fetch_add(1, Ordering::SeqCst);
        emit(
            ctx.options,
            NetEvent::Accepted {
                client: id,
                peer: &peer,
            },
        );
        let spawned = thread::Builder::new()
            .name(format!("userblk-client{id}"))
            .spawn_scoped(s, move || {
                serve_client(ctx, id, sock);
                lock(&control.clients).remove(&id);
                control.active.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            lock(&control.clients).remove(&id);
            control.active.fetch_sub(1, Ordering::SeqCst);
            emit(
                ctx.options,
                NetEvent::Refused {
                    peer: &peer,
                    reason: &e.to_string(),
                },
            );
        }
    }
}

fn serve_client<D: BlockDevice + ?Sized>(ctx: &Ctx<'_, D>, id: u64, sock: Socket) {
    let control = ctx.control;
    let options = ctx.options;
    let result = session::handshake(sock, &ctx.offer, options, &control.stopping);
    let (conn, negotiated) = match result {
        Err(_) if control.stopping.load(Ordering::SeqCst) => {
            // Cut short by the stop (EOF after the read side was shut, or EXPORT_NAME refused):
            // not the client's failure.
            emit(
                options,
                NetEvent::Refused {
                    peer: &format!("client {id}"),
                    reason: "the server is stopping",
                },
            );
            return;
        }
        Err(error) => {
            control
                .counters
                .handshake_failures
                .fetch_add(1, Ordering::SeqCst);
            emit(
                options,
                NetEvent::HandshakeFailed {
                    client: id,
                    error: &error,
                },
            );
            return;
        }
        Ok(Handshaken::Aborted) => {
            emit(options, NetEvent::Aborted { client: id });
            return;
        }
        Ok(Handshaken::Plain(sock, n)) => (Conn::Plain(sock), n),
        Ok(Handshaken::Tls(mut bridge, n)) => match bridge.take_stream() {
            Some(stream) => (Conn::Tls(stream, bridge), n),
            None => return,
        },
    };
    {
        let mut clients = lock(&control.clients);
        if control.stopping.load(Ordering::SeqCst) {
            return;
        }
        if let Some(e) = clients.get_mut(&id) {
            e.transmitting = true;
        }
    }
    control.counters.served.fetch_add(1, Ordering::SeqCst);
    emit(
        options,
        NetEvent::Serving {
            client: id,
            tls: matches!(conn, Conn::Tls(..)),
            structured_replies: negotiated.structured_replies,
        },
    );
    let device = Exported {
        device: ctx.device,
        read_only: options.read_only,
    };
    let export = &ctx.export;
    let (result, bridge) = match conn {
        Conn::Plain(sock) => (
            session::transmission(&device, export, sock, &negotiated, options),
            None,
        ),
        Conn::Tls(stream, bridge) => (
            session::transmission(&device, export, stream, &negotiated, options),
            Some(bridge),
        ),
    };
    if let Some(bridge) = bridge {
        // The server has closed its end: the pumps send close_notify and end.
        let _ = bridge.join();
    }
    if result.is_err() {
        control
            .counters
            .transmission_errors
            .fetch_add(1, Ordering::SeqCst);
    }
    emit(
        options,
        NetEvent::Finished {
            client: id,
            result: result.as_ref().map(|_| ()),
        },
    );
}

/// A client's connection once its handshake is done.
enum Conn {
    /// Requests straight from the socket.
    Plain(Socket),
    /// Requests through the TLS pumps, from the plaintext end of their socket pair.
    Tls(UnixStream, super::tls::TlsBridge),
}

/// A listener serving in the background ([`NetOptions::spawn`]). Dropping it stops serving and
/// waits for the end.
#[derive(Debug)]
pub struct Listening {
    handle: NetHandle,
    thread: Option<JoinHandle<Result<(), NetError>>>,
}

impl Listening {
    /// The remote control.
    pub fn handle(&self) -> &NetHandle {
        &self.handle
    }

    /// Where it listens.
    pub fn local_addr(&self) -> &ListenAddr {
        self.handle.local_addr()
    }

    /// Stops (see [`NetHandle::stop`]) and waits until every client has ended and the device
    /// is flushed and unmounted.
    pub fn stop(mut self) -> Result<(), NetError> {
        self.handle.stop();
        self.join()
    }

    /// Waits until someone else stops it.
    pub fn wait(mut self) -> Result<(), NetError> {
        self.join()
    }

    fn join(&mut self) -> Result<(), NetError> {
        match self.thread.take().map(JoinHandle::join) {
            None => Ok(()),
            Some(Ok(r)) => r,
            Some(Err(payload)) => panic::resume_unwind(payload),
        }
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.handle.stop();
            let _ = t.join();
        }
    }
}

pub(super) fn spawn<D>(
    options: &NetOptions,
    device: D,
    addr: &ListenAddr,
) -> Result<Listening, NetError>
where
    D: BlockDevice + 'static,
{
    // Signals are the business of `listen` from `main`; a background listener leaves them be.
    let options = options.clone().stop_on_signals(false);
    let addr = addr.clone();
    let (tx, rx) = mpsc::channel();
    let thread = thread::Builder::new()
        .name("userblk-listen".into())
        .spawn(move || {
            options.listen(device, &addr, |h| {
                let _ = tx.send(h.clone());
            })
        })
        .map_err(|source| NetError::Io {
            op: "spawning the listener thread",
            source,
        })?;
    match rx.recv() {
        Ok(handle) => Ok(Listening {
            handle,
            thread: Some(thread),
        }),
        // It never got to listen: its result says why.
        Err(_) => match thread.join() {
            Ok(Err(e)) => Err(e),
            Ok(Ok(())) => Err(NetError::Io {
                op: "starting the listener",
                source: io::Error::other("the listener stopped before it was ready"),
            }),
            Err(payload) => panic::resume_unwind(payload),
        },
    }
}
