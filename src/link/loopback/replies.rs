//! The reply checker: one thread per connection reads replies and checks each as
//! `nbd_read_reply` and `nbd_handle_reply` do (6.1 and 6.12 alike): the magic; a cookie whose
//! hardware queue and tag name a request in flight ("Unexpected reply"); not already answered
//! ("Suspicious reply"); on the connection it was sent on ("Unexpected reply ... from
//! different sock"); with the `cmd_cookie` of its last sending, not an earlier one ("Double
//! reply"); and after a successful READ exactly `len` bytes of data. The kernel answers any
//! violation by dropping that connection (`recv_work` ends, `nbd_mark_nsock_dead`); so does
//! the fake kernel, and it records the violation with the request it concerns.

use std::io::BufReader;
use std::os::unix::net::UnixStream;

use super::error::{LoopbackError, Violation};
use super::inflight::{lock, Inner};
use crate::proto::{Command, Errno, Reply, ReplyParseError, Request, REPLY_LEN};
use crate::stream::read_full;

/// What the reply header said, against the table of requests in flight.
enum Verdict {
    /// A request in flight: (hwq, tag, the request).
    Known(usize, usize, Request),
    /// The connection is already dead (shut down by the kernel): stop reading, silently.
    Dead,
    /// A violation, described.
    Bad(String),
}

impl Inner {
    /// Reads replies on one connection until EOF, a violation, or the connection's death.
    pub(super) fn read_replies(&self, conn: usize, sock: UnixStream) {
        // Buffered: replies that arrive together cost one `read`; large READ data bypasses the
        // buffer and goes straight into its `Vec`.
        let mut sock = BufReader::with_capacity(64 << 10, sock);
        let mut last: Option<(Request, u32)> = None;
        loop {
            let mut header = [0u8; REPLY_LEN];
            let got = match read_full(&mut sock, &mut header) {
                Ok(n) => n,
                Err(e) => return self.kill(conn, LoopbackError::Io(e)),
            };
            if got == 0 {
                return self.kill(conn, LoopbackError::Disconnected { conn });
            }
            let reply = match Reply::parse(&header[..got]) {
                Ok(r) => r,
                Err(e) => {
                    if self.is_dead(conn) {
                        return;
                    }
                    let what = format!("{}{}", bad_header(e), after(last));
                    return self.kill(conn, LoopbackError::Violation(Violation { conn, what }));
                }
            };
            let (hwq, tag, req) = match self.check(conn, &reply) {
                Verdict::Known(hwq, tag, req) => (hwq, tag, req),
                Verdict::Dead => return,
                Verdict::Bad(what) => {
                    return self.kill(conn, LoopbackError::Violation(Violation { conn, what }))
                }
            };
            let result = match reply.errno() {
                Some(errno) => Err(LoopbackError::Reply {
                    command: req.command,
                    offset: req.offset,
                    len: req.len,
                    errno,
                }),
                None if req.command == Command::Read => {
                    let mut data = lock(&self.spare).pop().unwrap_or_default();
                    data.resize(req.len as usize, 0);
                    match read_full(&mut sock, &mut data) {
                        Ok(n) if n == data.len() => Ok(data),
                        Ok(n) => {
                            let what = format!(
                                "stream ended after {n} of {} data bytes of READ {} at {}",
                                req.len, req.cookie, req.offset
                            );
                            return self
                                .kill(conn, LoopbackError::Violation(Violation { conn, what }));
                        }
                        Err(e) => return self.kill(conn, LoopbackError::Io(e)),
                    }
                }
                None => Ok(Vec::new()),
            };
            last = Some((req, reply.error));
            let mut st = lock(&self.state);
            // The request may have been sent again meanwhile (a timeout): then this reply is
            // for a sending the kernel no longer waits for.
            let current = st.conns[hwq].slots[tag]
                .as_ref()
                .is_some_and(|s| s.req.cookie == req.cookie && s.result.is_none());
            if st.conns[conn].dead.is_some() {
                return;
            }
            if !current {
                continue;
            }
            if let Some(s) = st.conns[hwq].slots[tag].as_ref() {
                let elapsed = s.first_sent.elapsed();
                st.latency.record(req.command, req.len, elapsed);
            }
            let wake = st.complete(hwq, tag, result);
            drop(st);
            if wake {
                self.changed.notify_all();
            }
        }
    }

    fn is_dead(&self, conn: usize) -> bool {
        lock(&self.state).conns[conn].dead.is_some()
    }

    /// Checks a reply header against the requests in flight, as `nbd_handle_reply` does.
    fn check(&self, conn: usize, reply: &Reply) -> Verdict {
        let handle = self.profile.cookie_order.from_wire(reply.cookie.0);
        let tag = (handle & 0xffff) as usize;
        let hwq = ((handle >> 16) & 0xffff) as usize;
        let cmd_cookie = (handle >> 32) as u32;
        let mut st = lock(&self.state);
        if st.conns[conn].dead.is_some() {
            return Verdict::Dead;
        }
        let what = |why: &str| {
            format!(
                "reply for cookie {} (error {}) {why}",
                reply.cookie, reply.error
            )
        };
        let Some(slot) = st
            .conns
            .get(hwq)
            .and_then(|c| c.slots.get(tag))
            .and_then(Option::as_ref)
        else {
            return Verdict::Bad(what(
                "matches no request in flight: unknown or duplicate cookie",
            ));
        };
        if slot.result.is_some() {
            return Verdict::Bad(what(&format!(
                "answers {} at {} a second time: duplicate reply",
                slot.req.command, slot.req.offset
            )));
        }
        if slot.sent_on != conn {
            return Verdict::Bad(what(&format!(
                "arrived on connection {conn}, but {} at {} was sent on connection {}",
                slot.req.command,
                slot.req.offset,
                if slot.sent_on == usize::MAX {
                    "none".to_string()
                } else {
                    slot.sent_on.to_string()
                }
            )));
        }
        if slot.cmd_cookie != cmd_cookie {
            return Verdict::Bad(what(&format!(
                "answers an earlier sending of {} at {} (cmd_cookie {cmd_cookie}; it was sent \
                 again as {}): stale cookie, a double reply",
                slot.req.command, slot.req.offset, slot.req.cookie
            )));
        }
        let req = slot.req;
        let seq = slot.seq;
        let overtook = st.conns[hwq]
            .slots
            .iter()
            .flatten()
            .any(|s| s.result.is_none() && s.sent_on == conn && s.seq < seq);
        st.stats.replies += 1;
        if overtook {
            st.stats.overtaken += 1;
        }
        Verdict::Known(hwq, tag, req)
    }
}

fn bad_header(e: ReplyParseError) -> String {
    match e {
        ReplyParseError::ShortHeader { len } => {
            format!("stream ended inside a reply header ({len} of {REPLY_LEN} bytes)")
        }
        ReplyParseError::BadMagic { magic } => format!("bad reply magic {magic:#010x}"),
    }
}

/// Where in the stream a bad header came, naming the reply before it.
fn after(last: Option<(Request, u32)>) -> String {
    match last {
        Some((req, error)) if error != 0 => format!(
            " (it follows the error reply {} to {} {}; a server that sends payload after an \
             error reply desyncs the stream like this)",
            Errno(error),
            req.command,
            req.cookie
        ),
        Some((req, _)) => format!(" (after the reply to {} {})", req.command, req.cookie),
        None => " (first reply)".to_string(),
    }
}
