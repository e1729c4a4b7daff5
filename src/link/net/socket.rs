//! [`Socket`]: one accepted client connection, TCP or Unix, behind one type; and [`ListenAddr`],
//! where a server listens (`unix:PATH`, `HOST:PORT`, `[IPv6]:PORT`).
//!
//! The handshake's deadline lives here: [`Socket::set_deadline`] makes every later read and write
//! fail with `TimedOut` once the deadline has passed, however the client dribbles its bytes.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::server::ConnStream;

/// Where a server listens.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    /// A TCP address: `127.0.0.1:10809`, `[::1]:10809`, `localhost:0` (port 0: any free port).
    Tcp(SocketAddr),
    /// A Unix socket path, written `unix:PATH`.
    Unix(PathBuf),
}

/// Why an address could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad listen address {given:?}: {why} (expected unix:PATH, HOST:PORT or [IPv6]:PORT)")]
pub struct AddrError {
    /// What was given.
    pub given: String,
    /// What is wrong with it.
    pub why: String,
}

impl FromStr for ListenAddr {
    type Err = AddrError;
    fn from_str(s: &str) -> Result<ListenAddr, AddrError> {
        let err = |why: &str| AddrError {
            given: s.to_string(),
            why: why.to_string(),
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(err("empty socket path"));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if s.contains('/') {
            return Err(err("a path needs the unix: prefix"));
        }
        let mut addrs = s
            .to_socket_addrs()
            .map_err(|e| err(&format!("cannot resolve: {e}")))?;
        addrs
            .next()
            .map(ListenAddr::Tcp)
            .ok_or_else(|| err("resolves to no address"))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl ListenAddr {
    /// Whether only this machine can connect: a Unix socket or a loopback address.
    pub fn is_local(&self) -> bool {
        match self {
            ListenAddr::Tcp(a) => a.ip().is_loopback(),
            ListenAddr::Unix(_) => true,
        }
    }
}

#[derive(Debug)]
enum Inner {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// An accepted connection.
#[derive(Debug)]
pub struct Socket {
    inner: Inner,
    deadline: Option<Instant>,
}

impl Socket {
    /// A TCP connection (Nagle's algorithm off, as the protocol asks).
    pub fn tcp(s: TcpStream) -> Socket {
        let _ = s.set_nodelay(true);
        Socket {
            inner: Inner::Tcp(s),
            deadline: None,
        }
    }

    /// A Unix socket connection.
    pub fn unix(s: UnixStream) -> Socket {
        Socket {
            inner: Inner::Unix(s),
            deadline: None,
        }
    }

    /// Every later read and write fails with `TimedOut` past `deadline`; `None` lifts it.
    pub fn set_deadline(&mut self, deadline: Option<Instant>) -> io::Result<()> {
        self.deadline = deadline;
        if deadline.is_none() {
            self.set_timeouts(None)?;
        }
        Ok(())
    }

    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match &self.inner {
            Inner::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Inner::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }

    /// Arms the socket's timeouts with what is left before the deadline.
    fn arm(&self) -> io::Result<()> {
        let Some(deadline) = self.deadline else {
            return Ok(());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.set_timeouts(Some(left))
    }

    /// Another handle on the same connection (no deadline).
    pub fn try_clone(&self) -> io::Result<Socket> {
        Ok(Socket {
            inner: match &self.inner {
                Inner::Tcp(s) => Inner::Tcp(s.try_clone()?),
                Inner::Unix(s) => Inner::Unix(s.try_clone()?),
            },
            deadline: None,
        })
    }

    /// Shuts down one or both directions.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match &self.inner {
            Inner::Tcp(s) => s.shutdown(how),
            Inner::Unix(s) => s.shutdown(how),
        }
    }

    /// The peer, for logs: `tcp 127.0.0.1:51234` or `unix`.
    pub fn peer(&self) -> String {
        match &self.inner {
            Inner::Tcp(s) => s
                .peer_addr()
                .map_or_else(|_| "tcp ?".into(), |a| format!("tcp {a}")),
            Inner::Unix(_) => "unix".into(),
        }
    }
}

/// The transmission phase reads and writes the client's socket itself (no deadline by then).
impl ConnStream for Socket {
    fn try_clone(&self) -> io::Result<Socket> {
        Socket::try_clone(self)
    }
    fn shutdown(&self) -> io::Result<()> {
        Socket::shutdown(self, Shutdown::Both)
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.inner {
            Inner::Tcp(s) => s.as_fd(),
            Inner::Unix(s) => s.as_fd(),
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm()?;
        match &mut self.inner {
            Inner::Tcp(s) => s.read(buf),
            Inner::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm()?;
        match &mut self.inner {
            Inner::Tcp(s) => s.write(buf),
            Inner::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.arm()?;
        match &mut self.inner {
            Inner::Tcp(s) => s.write_vectored(bufs),
            Inner::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            "unix:/tmp/x.sock".parse(),
            Ok(ListenAddr::Unix("/tmp/x.sock".into()))
        );
        assert_eq!(
            "127.0.0.1:10809".parse(),
            Ok(ListenAddr::Tcp("127.0.0.1:10809".parse().unwrap()))
        );
        assert_eq!(
            "[::1]:0".parse(),
            Ok(ListenAddr::Tcp("[::1]:0".parse().unwrap()))
        );
        assert!("unix:".parse::<ListenAddr>().is_err());
        assert!("/tmp/x.sock".parse::<ListenAddr>().is_err());
        assert!("127.0.0.1".parse::<ListenAddr>().is_err());
        assert!("127.0.0.1:99999".parse::<ListenAddr>().is_err());
        let a: ListenAddr = "[::1]:10809".parse().unwrap();
        assert_eq!(a.to_string(), "[::1]:10809");
        assert!(a.is_local());
        assert!(!"0.0.0.0:10809".parse::<ListenAddr>().unwrap().is_local());
    }

    #[test]
    fn deadline_times_out_a_silent_peer() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut s = Socket::unix(a);
        s.set_deadline(Some(Instant::now() + Duration::from_millis(50)))
            .unwrap();
        let err = s.read(&mut [0u8; 4]).unwrap_err();
        assert!(matches!(
            err.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ));
        // Past the deadline nothing waits at all.
        assert_eq!(
            s.read(&mut [0u8; 4]).unwrap_err().kind(),
            io::ErrorKind::TimedOut
        );
    }
}
