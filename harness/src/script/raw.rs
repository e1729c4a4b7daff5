//! The harness as the kernel over a raw socket: it writes requests itself and checks every
//! reply (magic, cookie, no payload after an error reply, a READ's full data), one step at a
//! time, or a group's requests all written before their replies are read in any order.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use userblk::proto::{Command, Errno, Reply, ReplyParseError, Request, REPLY_LEN};
use userblk::ServerError;

use super::judge::Actual;
use super::replay::{Engine, Resolved};
use super::{Action, Expect, Step};

/// How long the raw replayer waits for a reply (or to write a request) before failing the step.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long it watches for bytes after an error reply (payload that must not be there).
const TRAILING_WINDOW: Duration = Duration::from_millis(50);

/// The harness as the kernel, over a socket it holds.
pub(super) struct Raw {
    sock: UnixStream,
    size: u64,
    block_size: u64,
    server: Option<JoinHandle<Result<(), ServerError>>>,
    /// The server was expected to close the connection, so an error it ends with is expected.
    closing_expected: bool,
    /// The last error reply, to explain a desynchronised stream.
    last_error: Option<(Request, u32)>,
}

fn read_full(sock: &mut UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match sock.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A request's bytes on the wire: header, then a WRITE's payload.
fn wire(r: &Resolved) -> Vec<u8> {
    let mut bytes = r.request.encode().to_vec();
    bytes.extend_from_slice(&r.payload);
    bytes
}

/// The outcome of a failed send.
fn send_failed(e: &io::Error) -> Actual {
    match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => Actual::Closed,
        _ => Actual::Failed(format!("sending: {e}")),
    }
}

impl Raw {
    /// Takes over `sock` (the server for a device of `size` bytes in `block_size`-byte blocks
    /// on its other end; `server` is that server's thread, when the harness started it).
    pub(super) fn new(
        sock: UnixStream,
        size: u64,
        block_size: u64,
        server: Option<JoinHandle<Result<(), ServerError>>>,
    ) -> io::Result<Raw> {
        sock.set_read_timeout(Some(REPLY_TIMEOUT))?;
        sock.set_write_timeout(Some(REPLY_TIMEOUT))?;
        Ok(Raw {
            sock,
            size,
            block_size,
            server,
            closing_expected: false,
            last_error: None,
        })
    }

    /// Reads and parses a reply header; `Err` is the outcome of every request still waiting.
    fn header(&mut self) -> Result<Reply, Actual> {
        let mut header = [0u8; REPLY_LEN];
        let got = match read_full(&mut self.sock, &mut header) {
            Ok(n) => n,
            Err(e) if timed_out(&e) => {
                return Err(Actual::Failed(format!(
                    "no reply within {} s",
                    REPLY_TIMEOUT.as_secs()
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Err(Actual::Closed),
            Err(e) => return Err(Actual::Failed(e.to_string())),
        };
        if got == 0 {
            return Err(Actual::Closed);
        }
        let after = match self.last_error {
            Some((r, e)) => format!(
                " (after the error reply {} to {} {})",
                Errno(e),
                r.command,
                r.cookie
            ),
            None => String::new(),
        };
        Reply::parse(&header[..got]).map_err(|e| match e {
            ReplyParseError::ShortHeader { len } => Actual::Violation(format!(
                "stream ended inside a reply header ({len} of {REPLY_LEN} bytes){after}"
            )),
            ReplyParseError::BadMagic { magic } => {
                Actual::Violation(format!("bad reply magic {magic:#010x}{after}"))
            }
        })
    }

    /// The rest of the reply to `req` whose header was `reply`: a READ's data, or for an error
    /// reply, when `last` (no other reply is due, so any byte after it is a payload that must
    /// not be there), a watch for trailing bytes.
    fn body(&mut self, req: Request, reply: Reply, last: bool) -> Actual {
        if let Some(errno) = reply.errno() {
            self.last_error = Some((req, reply.error));
            if !last {
                // The next reply's header follows; a stray payload shows as a bad header.
                return Actual::Errno(errno.0);
            }
            // Nothing may follow an error reply: the kernel would read it as the next header.
            let _ = self.sock.set_read_timeout(Some(TRAILING_WINDOW));
            let mut trailing = [0u8; 4096];
            let extra = self.sock.read(&mut trailing).unwrap_or(0);
            let _ = self.sock.set_read_timeout(Some(REPLY_TIMEOUT));
            if extra > 0 {
                return Actual::Violation(format!(
                    "{extra} byte(s) follow the error reply {errno} to {} {} at offset {}, {} bytes: \
                     no payload may follow an error reply (the kernel reads none, so the stream desyncs)",
                    req.command, req.cookie, req.offset, req.len
                ));
            }
            return Actual::Errno(errno.0);
        }
        self.last_error = None;
        if req.command != Command::Read {
            return Actual::Ok(Vec::new());
        }
        let mut data = vec![0u8; req.len as usize];
        match read_full(&mut self.sock, &mut data) {
            Ok(n) if n == data.len() => Actual::Ok(data),
            Ok(n) => Actual::Violation(format!(
                "stream ended after {n} of {} data bytes of READ {} at {}",
                req.len, req.cookie, req.offset
            )),
            Err(e) => Actual::Failed(e.to_string()),
        }
    }

    /// Reads the reply to `req` (cookie, command, offset, length as sent) and checks it; with
    /// no `req` (a DISC, a raw step that is no request), only its header.
    fn reply(&mut self, req: Option<Request>) -> Actual {
        let reply = match self.header() {
            Ok(r) => r,
            Err(a) => return a,
        };
        let Some(req) = req else {
            return match reply.errno() {
                Some(e) => Actual::Errno(e.0),
                None => Actual::Ok(Vec::new()),
            };
        };
        if reply.cookie != req.cookie {
            return Actual::Violation(format!(
                "reply cookie {} does not match the request's {} ({} at {})",
                reply.cookie, req.cookie, req.command, req.offset
            ));
        }
        self.body(req, reply, true)
    }

    /// Reads the replies to `reqs`, in whatever order they come, matched by cookie.
    fn replies(&mut self, reqs: &[Resolved]) -> Vec<Option<Actual>> {
        let mut outcomes: Vec<Option<Actual>> = reqs.iter().map(|_| None).collect();
        let mut pending = reqs.len();
        while pending > 0 {
            let broken = match self.header() {
                Err(a) => a,
                Ok(reply) => {
                    let waiting = (0..reqs.len())
                        .find(|&i| outcomes[i].is_none() && reqs[i].request.cookie == reply.cookie);
                    let Some(i) = waiting else {
                        let answered = reqs.iter().any(|r| r.request.cookie == reply.cookie);
                        let why = if answered {
                            "answers a request of the group already answered"
                        } else {
                            "matches no request of the group"
                        };
                        outcomes.iter_mut().filter(|o| o.is_none()).for_each(|o| {
                            *o = Some(Actual::Violation(format!(
                                "a reply with cookie {} {why}",
                                reply.cookie
                            )))
                        });
                        return outcomes;
                    };
                    pending -= 1;
                    let a = self.body(reqs[i].request, reply, pending == 0);
                    let broken = matches!(a, Actual::Violation(_) | Actual::Failed(_));
                    outcomes[i] = Some(a.clone());
                    if !broken {
                        continue;
                    }
                    // The stream is out of step: no later reply can be read.
                    Actual::Failed(format!(
                        "no reply read: the stream broke at the reply to {} {}",
                        reqs[i].request.command, reqs[i].request.cookie
                    ))
                }
            };
            outcomes
                .iter_mut()
                .filter(|o| o.is_none())
                .for_each(|o| *o = Some(broken.clone()));
            break;
        }
        outcomes
    }
}

impl Engine for Raw {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u64 {
        self.block_size
    }

    fn exec(&mut self, step: &Step, req: Option<Resolved>) -> Actual {
        if step.expect == Expect::Closed {
            self.closing_expected = true;
        }
        let (sent, req) = match (&step.action, req) {
            (Action::Eof, _) => {
                let _ = self.sock.shutdown(Shutdown::Write);
                (Ok(()), None)
            }
            (Action::Raw(bytes), _) => {
                // Expect the reply a well-formed header would get: its cookie and command.
                let parsed = Request::parse(bytes).ok();
                (self.sock.write_all(bytes), parsed)
            }
            (_, Some(r)) => (self.sock.write_all(&wire(&r)), Some(r.request)),
            (_, None) => return Actual::Failed("nothing to send".into()),
        };
        if let Err(e) = sent {
            return send_failed(&e);
        }
        if step.expect == Expect::Nothing {
            return Actual::Nothing;
        }
        if matches!(req, Some(r) if r.command == Command::Disc) {
            return self.reply(None);
        }
        self.reply(req)
    }

    fn exec_group(&mut self, reqs: Vec<Resolved>) -> Vec<Actual> {
        let failed = |why: String| reqs.iter().map(|_| Actual::Failed(why.clone())).collect();
        let mut writer = match self.sock.try_clone() {
            Ok(s) => s,
            Err(e) => return failed(format!("cloning the socket: {e}")),
        };
        let bytes: Vec<u8> = reqs.iter().flat_map(wire).collect();
        // Every request is written before any reply is waited for. A thread writes them while
        // this one reads: a server may reply to the first before reading the last, and with
        // large payloads neither side could finish if the replies were only read afterwards.
        let (outcomes, sent) = thread::scope(|s| {
            let sending = s.spawn(move || writer.write_all(&bytes));
            let outcomes = self.replies(&reqs);
            if outcomes
                .iter()
                .any(|o| !matches!(o, Some(Actual::Ok(_) | Actual::Errno(_))))
            {
                // The replay fails here; stop a writer that the server no longer reads from.
                let _ = self.sock.shutdown(Shutdown::Both);
            }
            let sent = sending.join();
            (outcomes, sent)
        });
        let unsent = match sent {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(send_failed(&e)),
            Err(_) => Some(Actual::Failed("the writing thread panicked".into())),
        };
        outcomes
            .into_iter()
            .map(|o| match (o, &unsent) {
                // A reply that never came is explained by the send that failed, if one did.
                (Some(Actual::Failed(_)) | None, Some(u)) => u.clone(),
                (Some(a), _) => a,
                (None, None) => Actual::Failed("no reply read".into()),
            })
            .collect()
    }

    fn finish(&mut self) -> Result<(), String> {
        let _ = self.sock.shutdown(Shutdown::Write);
        let Some(server) = self.server.take() else {
            return Ok(());
        };
        let result = server.join().unwrap_or_else(|_| {
            Err(ServerError::InvalidGeometry(
                "server thread panicked".into(),
            ))
        });
        match result {
            Err(e) if !self.closing_expected => Err(format!("the server ended with: {e}")),
            _ => Ok(()),
        }
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        let _ = self.sock.shutdown(Shutdown::Both);
        if let Some(s) = self.server.take() {
            let _ = s.join();
        }
    }
}
