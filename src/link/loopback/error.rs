//! What an operation through the fake kernel can end with: [`LoopbackError`], the protocol
//! [`Violation`]s it reports, and the [`StuckRequest`]s it names when it gives up on a server.

use std::fmt;
use std::io;
use std::time::Duration;

use crate::proto::{Command, Errno, Request};
use crate::server::ServerError;

/// A server reply that the kernel would reject; it kills the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The connection.
    pub conn: usize,
    /// What was wrong, naming the request concerned.
    pub what: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "connection {}: {}", self.conn, self.what)
    }
}

/// A request that never got its reply, as named when the fake kernel gives up on a server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StuckRequest {
    /// The command.
    pub command: Command,
    /// Its offset.
    pub offset: u64,
    /// Its length.
    pub len: u32,
    /// How long it had been in flight.
    pub in_flight: Duration,
}

impl StuckRequest {
    pub(super) fn new(req: &Request, in_flight: Duration) -> StuckRequest {
        StuckRequest {
            command: req.command,
            offset: req.offset,
            len: req.len,
            in_flight,
        }
    }
}

impl fmt::Display for StuckRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at offset {}, {} bytes, in flight for {}",
            self.command,
            self.offset,
            self.len,
            secs(self.in_flight)
        )
    }
}

/// `12.3 s`, `0.25 s`: durations in the messages, in seconds.
pub(super) fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 10.0 || s == s.trunc() {
        format!("{s:.1} s").replace(".0 s", " s")
    } else if s >= 1.0 {
        format!("{s:.1} s")
    } else {
        format!("{s:.2} s")
    }
}

fn list(requests: &[StuckRequest]) -> String {
    if requests.is_empty() {
        return "none known to the kernel (a device call outlived its request)".into();
    }
    requests
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// What a block operation through the fake kernel can end with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoopbackError {
    /// The server answered the request with an error. (The real block layer turns any of these
    /// into EIO for the application; the wire value is kept here for tests.)
    #[error("{command} at offset {offset}, {len} bytes: server replied {errno}")]
    Reply {
        /// The command.
        command: Command,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u32,
        /// The errno in the reply.
        errno: Errno,
    },
    /// The kernel would refuse the operation without sending anything.
    #[error("refused by the block layer ({}): {reason}", Errno(*errno as u32))]
    Refused {
        /// The errno the application would see (e.g. 95, EOPNOTSUPP).
        errno: i32,
        /// Why.
        reason: &'static str,
    },
    /// The server broke the protocol; the connection was killed.
    #[error("protocol violation: {0}")]
    Violation(Violation),
    /// The connection is closed.
    #[error("connection {conn} closed by the server")]
    Disconnected {
        /// The connection.
        conn: usize,
    },
    /// The kernel's own timeout ([`LoopbackOptions::timeout`](super::LoopbackOptions::timeout))
    /// expired and no live connection was left to send the request again on; the block layer
    /// fails it with EIO.
    #[error(
        "{command} at offset {offset}, {len} bytes: timed out after {} (kernel timeout), \
         no connection left to retry on",
        secs(*after)
    )]
    TimedOut {
        /// The command.
        command: Command,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u32,
        /// How long it had been in flight, over every connection it was sent on.
        after: Duration,
    },
    /// The kernel shut the connection down (a request on it timed out, or a send failed) and no
    /// other is alive: nothing more can be sent. The block layer fails requests with EIO.
    #[error("connection {conn} was shut down by the kernel: {reason}")]
    ShutDown {
        /// The connection.
        conn: usize,
        /// Why.
        reason: String,
    },
    /// The stall watchdog ([`LoopbackOptions::stall_limit`](super::LoopbackOptions)): the
    /// request has been in flight longer than the limit. The kernel would still be waiting;
    /// the operation gives up so that a test fails instead of hanging. The request keeps its
    /// tag until a reply comes.
    #[error(
        "stall: {command} at offset {offset}, {len} bytes, in flight for {} (limit {})",
        secs(*in_flight),
        secs(*limit)
    )]
    Stalled {
        /// The command.
        command: Command,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u32,
        /// How long it has been in flight.
        in_flight: Duration,
        /// The stall limit.
        limit: Duration,
    },
    /// The server did not stop within the grace period after DISC; its thread was abandoned
    /// (not joined), with these requests unanswered.
    #[error(
        "the server did not stop within {} of DISC and was abandoned; requests unanswered: {}",
        secs(*grace),
        list(requests)
    )]
    Stuck {
        /// How long the fake kernel waited.
        grace: Duration,
        /// The requests still in flight (and those failed by a timeout whose reply never came).
        requests: Vec<StuckRequest>,
    },
    /// The server could not be started or stopped with an error.
    #[error("server: {0}")]
    Server(#[from] ServerError),
    /// A socket operation failed.
    #[error("loopback socket: {0}")]
    Io(#[from] io::Error),
}

impl LoopbackError {
    /// The errno carried: the reply's, the block layer's for a refusal, EIO for a kernel
    /// timeout or a connection the kernel shut down.
    pub fn errno(&self) -> Option<i32> {
        match self {
            LoopbackError::Reply { errno, .. } => Some(errno.0 as i32),
            LoopbackError::Refused { errno, .. } => Some(*errno),
            LoopbackError::TimedOut { .. } | LoopbackError::ShutDown { .. } => Some(5),
            _ => None,
        }
    }

    /// A copy, for an error that must reach several waiters (errors that hold an
    /// `io::Error` are copied as their message).
    pub(super) fn duplicate(&self) -> LoopbackError {
        match self {
            LoopbackError::Reply {
                command,
                offset,
                len,
                errno,
            } => LoopbackError::Reply {
                command: *command,
                offset: *offset,
                len: *len,
                errno: *errno,
            },
            LoopbackError::Refused { errno, reason } => LoopbackError::Refused {
                errno: *errno,
                reason,
            },
            LoopbackError::Violation(v) => LoopbackError::Violation(v.clone()),
            LoopbackError::Disconnected { conn } => LoopbackError::Disconnected { conn: *conn },
            LoopbackError::TimedOut {
                command,
                offset,
                len,
                after,
            } => LoopbackError::TimedOut {
                command: *command,
                offset: *offset,
                len: *len,
                after: *after,
            },
            LoopbackError::ShutDown { conn, reason } => LoopbackError::ShutDown {
                conn: *conn,
                reason: reason.clone(),
            },
            LoopbackError::Stalled {
                command,
                offset,
                len,
                in_flight,
                limit,
            } => LoopbackError::Stalled {
                command: *command,
                offset: *offset,
                len: *len,
                in_flight: *in_flight,
                limit: *limit,
            },
            LoopbackError::Stuck { grace, requests } => LoopbackError::Stuck {
                grace: *grace,
                requests: requests.clone(),
            },
            other => LoopbackError::Io(io::Error::other(other.to_string())),
        }
    }

    pub(super) fn stalled(req: &Request, in_flight: Duration, limit: Duration) -> LoopbackError {
        LoopbackError::Stalled {
            command: req.command,
            offset: req.offset,
            len: req.len,
            in_flight,
            limit,
        }
    }
}

impl From<LoopbackError> for io::Error {
    fn from(e: LoopbackError) -> io::Error {
        match e.errno() {
            Some(errno) => io::Error::from_raw_os_error(errno),
            None => match e {
                LoopbackError::Stalled { .. } | LoopbackError::Stuck { .. } => {
                    io::Error::new(io::ErrorKind::TimedOut, e)
                }
                e => io::Error::other(e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_says_so_in_words() {
        let e = LoopbackError::Stalled {
            command: Command::Read,
            offset: 4096,
            len: 512,
            in_flight: Duration::from_millis(12_345),
            limit: Duration::from_secs(10),
        };
        assert_eq!(
            e.to_string(),
            "stall: READ at offset 4096, 512 bytes, in flight for 12.3 s (limit 10 s)"
        );
        assert_eq!(io::Error::from(e).kind(), io::ErrorKind::TimedOut);
        assert_eq!(secs(Duration::from_millis(250)), "0.25 s");
        assert_eq!(secs(Duration::from_millis(1500)), "1.5 s");
    }
}
