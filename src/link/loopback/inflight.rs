//! The kernel side's bookkeeping of requests in flight, as blk-mq and nbd.c keep it: tags per
//! hardware queue (one queue per connection), a `cmd_cookie` per tag bumped at every sending,
//! the connection each request was sent on, and which connections are dead. Sending a request
//! (`Inner::send`) and waiting for its reply (`Inner::wait`) live here; the reply reader is in
//! `replies`, the clocks in `timeouts`.

use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::error::{LoopbackError, StuckRequest, Violation};
use super::jitter::JitterSource;
use super::latency::Latencies;
use super::profile::KernelProfile;
use super::{LoopbackStats, Op, Ticket};
use crate::proto::{Command, Cookie, Request};
use crate::stream::write_all_vectored;

/// One request in flight on a tag.
pub(super) struct Slot {
    /// As last sent (its cookie is the wire value).
    pub(super) req: Request,
    /// The `cmd_cookie` of the last sending.
    pub(super) cmd_cookie: u32,
    /// Order of submission, over all connections.
    pub(super) seq: u64,
    /// The connection (socket) it was last sent on; after a requeue not its hardware queue.
    pub(super) sent_on: usize,
    /// When it was first sent (latency and the stall watchdog count from here).
    pub(super) first_sent: Instant,
    /// When it was last sent (the kernel timeout counts from here).
    pub(super) sent_at: Instant,
    pub(super) result: Option<Result<Vec<u8>, LoopbackError>>,
    /// Someone sleeps in `wait` for this slot: only then does its reply cost a wake-up.
    pub(super) waited: bool,
    /// The waiter gave up (stall): whoever completes the request frees the tag.
    pub(super) abandoned: bool,
    /// A WRITE's payload, kept to send it again after a timeout (only when a timeout is set).
    pub(super) payload: Option<Vec<u8>>,
}

/// A hardware queue (its tags) and the connection of the same index.
pub(super) struct ConnState {
    pub(super) slots: Vec<Option<Slot>>,
    /// Per tag, bumped each time the tag is sent, as `nbd_cmd->cmd_cookie`.
    pub(super) cmd_cookies: Vec<u32>,
    pub(super) in_flight: usize,
    /// Why the connection is dead; then nothing is sent on it and its replies are not read.
    pub(super) dead: Option<LoopbackError>,
}

pub(super) struct State {
    pub(super) conns: Vec<ConnState>,
    pub(super) next_seq: u64,
    pub(super) next_conn: usize,
    pub(super) stats: LoopbackStats,
    pub(super) violations: Vec<Violation>,
    /// Threads asleep in `send` until a tag is free.
    pub(super) submitters_waiting: usize,
    pub(super) latency: Latencies,
    /// Requests failed by the kernel timeout whose reply never came (for `Stuck`), bounded.
    pub(super) lost: Vec<StuckRequest>,
    /// Shutting down: the timer thread stops.
    pub(super) stopping: bool,
}

/// Most entries kept in `State::lost`.
const KEEP_LOST: usize = 64;

/// Most buffers kept by `recycle`.
const KEEP_SPARE: usize = 256;

pub(super) struct Inner {
    pub(super) state: Mutex<State>,
    /// Replies, free tags, dead connections.
    pub(super) changed: Condvar,
    /// Wakes the timer thread (shutdown).
    pub(super) timer: Condvar,
    pub(super) writers: Vec<Mutex<UnixStream>>,
    /// Clones of the kernel ends, to shut one down without waiting for its writer.
    pub(super) closers: Vec<UnixStream>,
    /// Buffers handed back with `recycle`, for READ data.
    pub(super) spare: Mutex<Vec<Vec<u8>>>,
    /// The kernel played, overrides applied.
    pub(super) profile: KernelProfile,
    pub(super) timeout: Option<Duration>,
    pub(super) stall_limit: Option<Duration>,
    pub(super) jitter: Option<JitterSource>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why `Inner::sleep` did not sleep: the stall limit is used up.
struct Stalled<'a> {
    st: MutexGuard<'a, State>,
    /// How long since the wait began.
    waited: Duration,
    limit: Duration,
}

/// What `Inner::send` found for a request: the tag it got, or why it got none.
enum Claim {
    Tag { hwq: usize, tag: usize, sock: usize },
    Busy,
}

impl State {
    pub(super) fn new(connections: usize, depth: usize) -> State {
        State {
            conns: (0..connections)
                .map(|_| ConnState {
                    slots: (0..depth).map(|_| None).collect(),
                    cmd_cookies: vec![0; depth],
                    in_flight: 0,
                    dead: None,
                })
                .collect(),
            next_seq: 0,
            next_conn: 0,
            stats: LoopbackStats::default(),
            violations: Vec::new(),
            submitters_waiting: 0,
            latency: Latencies::default(),
            lost: Vec::new(),
            stopping: false,
        }
    }

    /// A live connection to send on for hardware queue `hwq`: its own, else the next live
    /// one (`find_fallback` in nbd.c), else `None`.
    pub(super) fn live_socket(&self, hwq: usize) -> Option<usize> {
        let n = self.conns.len();
        (0..n)
            .map(|i| (hwq + i) % n)
            .find(|&c| self.conns[c].dead.is_none())
    }

    /// Why nothing can be sent: the first dead connection's reason.
    fn all_dead_error(&self) -> LoopbackError {
        self.conns
            .iter()
            .find_map(|c| c.dead.as_ref())
            .map_or(LoopbackError::Disconnected { conn: 0 }, |e| e.duplicate())
    }

    /// A free tag on some hardware queue, taking queues in turn.
    fn claim(&self) -> Result<Claim, LoopbackError> {
        let n = self.conns.len();
        for i in 0..n {
            let hwq = (self.next_conn + i) % n;
            let Some(sock) = self.live_socket(hwq) else {
                return Err(self.all_dead_error());
            };
            if let Some(tag) = self.conns[hwq].slots.iter().position(Option::is_none) {
                return Ok(Claim::Tag { hwq, tag, sock });
            }
        }
        Ok(Claim::Busy)
    }

    /// The request in flight longest (for a submitter that waited too long for a tag).
    fn oldest(&self) -> Option<(Request, Instant)> {
        self.conns
            .iter()
            .flat_map(|c| c.slots.iter().flatten())
            .filter(|s| s.result.is_none())
            .min_by_key(|s| s.first_sent)
            .map(|s| (s.req, s.first_sent))
    }

    /// Requests without their reply (for `Stuck`).
    pub(super) fn unanswered(&self, now: Instant) -> Vec<StuckRequest> {
        let mut v: Vec<StuckRequest> = self
            .conns
            .iter()
            .flat_map(|c| c.slots.iter().flatten())
            .filter(|s| s.result.is_none() || s.abandoned)
            .map(|s| StuckRequest::new(&s.req, now.saturating_duration_since(s.first_sent)))
            .collect();
        v.extend(self.lost.iter().copied());
        v
    }

    /// Records a request failed by the kernel timeout, for `Stuck`.
    pub(super) fn lose(&mut self, req: &Request, in_flight: Duration) {
        if self.lost.len() < KEEP_LOST {
            self.lost.push(StuckRequest::new(req, in_flight));
        }
    }

    /// Stores a request's result; frees its tag at once if its waiter gave up. Returns whether
    /// a waiter must be woken.
    pub(super) fn complete(
        &mut self,
        hwq: usize,
        tag: usize,
        result: Result<Vec<u8>, LoopbackError>,
    ) -> bool {
        let c = &mut self.conns[hwq];
        let Some(slot) = c.slots[tag].as_mut() else {
            return false;
        };
        if slot.abandoned {
            c.slots[tag] = None;
            c.in_flight -= 1;
            return self.submitters_waiting > 0;
        }
        slot.result = Some(result);
        slot.waited
    }
}

impl Inner {
    pub(super) fn cookie(&self, cmd_cookie: u32, hwq: usize, tag: usize) -> Cookie {
        let handle = u64::from(cmd_cookie) << 32 | (hwq as u64 & 0xffff) << 16 | tag as u64;
        Cookie(self.profile.cookie_order.to_wire(handle))
    }

    /// Marks a connection dead, shuts its socket, and (without a kernel timeout) fails what
    /// was sent on it. With a timeout those requests stay in flight: at their deadline they
    /// are sent again on a live connection or fail, as `nbd_xmit_timeout` does. (Without one
    /// the kernel would leave them until the device is cleared, then fail them with EIO; the
    /// fake kernel fails them now, with the reason.)
    pub(super) fn kill(&self, conn: usize, why: LoopbackError) {
        let mut st = lock(&self.state);
        if let LoopbackError::Violation(v) = &why {
            st.violations.push(v.clone());
        }
        if self.timeout.is_none() {
            for hwq in 0..st.conns.len() {
                for tag in 0..st.conns[hwq].slots.len() {
                    let hit = st.conns[hwq].slots[tag]
                        .as_ref()
                        .is_some_and(|s| s.sent_on == conn && s.result.is_none());
                    if hit {
                        st.complete(hwq, tag, Err(why.duplicate()));
                    }
                }
            }
        }
        if st.conns[conn].dead.is_none() {
            st.conns[conn].dead = Some(why);
        }
        drop(st);
        let _ = self.closers[conn].shutdown(Shutdown::Both);
        // Waiters, and submitters waiting for a tag, must learn that the connection died.
        self.changed.notify_all();
    }

    /// Sends one request if a tag is free (`Ok(None)` if not and `block` is false); waits for
    /// one otherwise, up to the stall limit.
    pub(super) fn send(&self, op: Op<'_>, block: bool) -> Result<Option<Ticket>, LoopbackError> {
        if let Some(delay) = self.jitter.as_ref().and_then(JitterSource::delay) {
            std::thread::sleep(delay);
        }
        let mut st = lock(&self.state);
        let mut waited_since = None;
        let (hwq, tag, sock) = loop {
            match st.claim()? {
                Claim::Tag { hwq, tag, sock } => break (hwq, tag, sock),
                Claim::Busy if !block => return Ok(None),
                Claim::Busy => {}
            }
            let since = *waited_since.get_or_insert_with(Instant::now);
            st.submitters_waiting += 1;
            st = match self.sleep(st, since) {
                Ok(st) => st,
                Err(Stalled {
                    mut st,
                    waited,
                    limit,
                }) => {
                    st.submitters_waiting -= 1;
                    st.stats.stalls += 1;
                    let now = Instant::now();
                    return Err(match st.oldest() {
                        Some((req, first)) => LoopbackError::stalled(
                            &req,
                            now.saturating_duration_since(first),
                            limit,
                        ),
                        None => LoopbackError::stalled(
                            &Request::new(op.command, Cookie(0), op.offset, op.len),
                            waited,
                            limit,
                        ),
                    });
                }
            };
            st.submitters_waiting -= 1;
        };
        st.next_conn = (hwq + 1) % st.conns.len();
        let seq = st.next_seq;
        st.next_seq += 1;
        let c = &mut st.conns[hwq];
        c.cmd_cookies[tag] = c.cmd_cookies[tag].wrapping_add(1);
        let cmd_cookie = c.cmd_cookies[tag];
        let cookie = self.cookie(cmd_cookie, hwq, tag);
        let req = Request {
            command: op.command,
            flags: op.flags,
            cookie,
            offset: op.offset,
            len: op.len,
        };
        let data = if op.command == Command::Write {
            op.data
        } else {
            &[]
        };
        let now = Instant::now();
        c.slots[tag] = Some(Slot {
            req,
            cmd_cookie,
            seq,
            sent_on: sock,
            first_sent: now,
            sent_at: now,
            result: None,
            waited: false,
            abandoned: false,
            payload: (self.timeout.is_some() && !data.is_empty()).then(|| data.to_vec()),
        });
        c.in_flight += 1;
        let in_flight = c.in_flight;
        st.stats.requests += 1;
        st.stats.max_in_flight = st.stats.max_in_flight.max(in_flight);
        drop(st);
        self.transmit(hwq, tag, sock, req, data);
        Ok(Some(Ticket {
            hwq,
            tag: tag as u16,
            seq,
            cookie,
        }))
    }

    /// Writes a request on `sock`. If that fails the connection is dead (a partial write
    /// leaves its stream out of step): the request goes again on another live connection, as
    /// `nbd_send_cmd` requeues it, or fails with EIO. A send blocked past the stall limit
    /// (no kernel timeout set) fails as a stall.
    pub(super) fn transmit(
        &self,
        hwq: usize,
        tag: usize,
        mut sock: usize,
        mut req: Request,
        data: &[u8],
    ) {
        loop {
            let header = req.encode();
            let sent = write_all_vectored(
                &mut *lock(&self.writers[sock]),
                &mut [IoSlice::new(&header), IoSlice::new(data)],
            );
            let Err(e) = sent else { return };
            let blocked = matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            );
            let reason = if blocked {
                format!(
                    "sending {} {} blocked longer than the send timeout",
                    req.command, req.cookie
                )
            } else {
                format!("sending {} {} failed: {e}", req.command, req.cookie)
            };
            // Handled here, not failed with whatever else was sent on `sock`.
            if let Some(s) = lock(&self.state).conns[hwq].slots[tag].as_mut() {
                s.sent_on = usize::MAX;
            }
            self.kill(
                sock,
                LoopbackError::ShutDown {
                    conn: sock,
                    reason: reason.clone(),
                },
            );
            let mut st = lock(&self.state);
            let Some(first_sent) = st.conns[hwq].slots[tag].as_ref().map(|s| s.first_sent) else {
                return;
            };
            let next = st.live_socket(hwq);
            let err = match (blocked, self.timeout, self.stall_limit, next) {
                (true, None, Some(limit), _) => {
                    st.stats.stalls += 1;
                    Some(LoopbackError::stalled(&req, first_sent.elapsed(), limit))
                }
                (_, _, _, None) => Some(LoopbackError::ShutDown { conn: sock, reason }),
                _ => None,
            };
            if let Some(err) = err {
                let wake = st.complete(hwq, tag, Err(err));
                drop(st);
                if wake {
                    self.changed.notify_all();
                }
                return;
            }
            let Some(next) = next else { return };
            match self.requeue(&mut st, hwq, tag, next) {
                Some(r) => req = r,
                None => return,
            }
            sock = next;
        }
    }

    /// Gives a request a new `cmd_cookie` and `next` as its connection, as the kernel does
    /// before sending a requeued request again; returns the request to send.
    pub(super) fn requeue(
        &self,
        st: &mut State,
        hwq: usize,
        tag: usize,
        next: usize,
    ) -> Option<Request> {
        let c = &mut st.conns[hwq];
        let s = c.slots[tag].as_mut()?;
        c.cmd_cookies[tag] = c.cmd_cookies[tag].wrapping_add(1);
        s.cmd_cookie = c.cmd_cookies[tag];
        s.req.cookie = self.cookie(s.cmd_cookie, hwq, tag);
        s.sent_on = next;
        s.sent_at = Instant::now();
        let req = s.req;
        st.stats.requeued += 1;
        st.stats.requests += 1;
        Some(req)
    }

    /// Waits for a request's reply: its data (empty but for READ) or its error. Gives up with
    /// [`LoopbackError::Stalled`] once the request has been in flight longer than the limit.
    pub(super) fn wait(&self, ticket: Ticket) -> Result<Vec<u8>, LoopbackError> {
        let mut st = lock(&self.state);
        loop {
            let c = &mut st.conns[ticket.hwq];
            let slot = &mut c.slots[usize::from(ticket.tag)];
            let first_sent = match slot {
                Some(s) if s.seq == ticket.seq && s.result.is_some() && !s.abandoned => {
                    let result = s.result.take().unwrap_or(Ok(Vec::new()));
                    *slot = None;
                    c.in_flight -= 1;
                    let wake = st.submitters_waiting > 0;
                    drop(st);
                    if wake {
                        self.changed.notify_all();
                    }
                    return result;
                }
                Some(s) if s.seq == ticket.seq && !s.abandoned => {
                    s.waited = true;
                    s.first_sent
                }
                _ => {
                    return Err(LoopbackError::Io(io::Error::other(
                        "ticket already waited for",
                    )))
                }
            };
            st = match self.sleep(st, first_sent) {
                Ok(st) => st,
                Err(Stalled {
                    mut st,
                    waited: age,
                    limit,
                }) => {
                    let mut req = None;
                    if let Some(s) = st.conns[ticket.hwq].slots[usize::from(ticket.tag)].as_mut() {
                        s.abandoned = true;
                        s.waited = false;
                        req = Some(s.req);
                    }
                    st.stats.stalls += 1;
                    let req = req.unwrap_or(Request::new(Command::Read, ticket.cookie, 0, 0));
                    return Err(LoopbackError::stalled(&req, age, limit));
                }
            };
        }
    }

    /// Sleeps until `changed` is signalled or, with a stall limit, until `since` is that old.
    /// Returns [`Stalled`] without sleeping once it already is.
    fn sleep<'a>(
        &'a self,
        st: MutexGuard<'a, State>,
        since: Instant,
    ) -> Result<MutexGuard<'a, State>, Stalled<'a>> {
        let Some(limit) = self.stall_limit else {
            return Ok(self
                .changed
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner));
        };
        let waited = since.elapsed();
        if waited >= limit {
            return Err(Stalled { st, waited, limit });
        }
        Ok(self
            .changed
            .wait_timeout(st, limit - waited)
            .unwrap_or_else(PoisonError::into_inner)
            .0)
    }

    /// Hands back a buffer for a later READ's data.
    pub(super) fn recycle(&self, buf: Vec<u8>) {
        let mut spare = lock(&self.spare);
        if spare.len() < KEEP_SPARE && buf.capacity() > 0 {
            spare.push(buf);
        }
    }
}
