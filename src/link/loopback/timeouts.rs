//! Time on the kernel side: the kernel's per-request timeout, played by a timer thread as
//! blk-mq's timeout handler calls `nbd_xmit_timeout`, and the bounded wait for the server at
//! shutdown. (The stall watchdog itself is in `inflight`: waiters give up at their deadline.)
//!
//! What `nbd_xmit_timeout` does when a request's timer expires, in 6.1 and 6.12 alike, with a
//! timeout set (`tag_set.timeout != 0`) and one connection or several: if the request was sent
//! on the current socket of its connection, that socket is marked dead
//! (`nbd_mark_nsock_dead`: `kernel_sock_shutdown(SHUT_RDWR)`), and the request is requeued
//! (`nbd_requeue_cmd`, which sets `NBD_CMD_REQUEUED`). `nbd_queue_rq` then sends it again with
//! `cmd_cookie` bumped, on its queue's socket or, that one being dead, on `find_fallback`'s
//! live one; with none (one connection, or all dead) and no `dead_conn_timeout`,
//! `nbd_handle_cmd` calls `sock_shutdown` and the request ends with `BLK_STS_IOERR`. The other
//! requests sent on the dead socket stay in flight until their own timers expire, and go the
//! same way. A reply still on its way over the dead socket is never read; had it been read
//! first, `nbd_handle_reply` would refuse it ("Raced with timeout", or "Double reply" for the
//! old `cmd_cookie`) and drop the connection. With the timeout 0 the handler only logs
//! "Possible stuck request" and re-arms the timer (30 s, `nbd_set_cmd_timeout`).

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use super::error::{secs, LoopbackError};
use super::inflight::{lock, Inner};

impl Inner {
    /// The timer thread: until shutdown, handles every request whose time since its last
    /// sending reaches `timeout`.
    pub(super) fn run_timer(&self, timeout: Duration) {
        let mut st = lock(&self.state);
        loop {
            if st.stopping {
                return;
            }
            let now = Instant::now();
            let mut next = now + timeout;
            let mut expired = Vec::new();
            for (hwq, c) in st.conns.iter().enumerate() {
                for (tag, slot) in c.slots.iter().enumerate() {
                    let Some(s) = slot else { continue };
                    if s.result.is_some() || s.sent_on == usize::MAX {
                        continue;
                    }
                    let deadline = s.sent_at + timeout;
                    if deadline <= now {
                        expired.push((hwq, tag));
                    } else {
                        next = next.min(deadline);
                    }
                }
            }
            if expired.is_empty() {
                st = self
                    .timer
                    .wait_timeout(st, next.saturating_duration_since(now))
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                continue;
            }
            drop(st);
            for (hwq, tag) in expired {
                self.expire(hwq, tag, timeout);
            }
            st = lock(&self.state);
        }
    }

    /// A request's timeout expired: shut its connection down, then send it again on a live
    /// connection, or fail it with EIO when none is left.
    fn expire(&self, hwq: usize, tag: usize, timeout: Duration) {
        let mut st = lock(&self.state);
        let Some(s) = st.conns[hwq].slots[tag].as_ref() else {
            return;
        };
        // Answered, or sent again, since the scan.
        if s.result.is_some() || s.sent_at.elapsed() < timeout || s.sent_on == usize::MAX {
            return;
        }
        let (sock, req, first_sent, cookie) = (s.sent_on, s.req, s.first_sent, s.req.cookie);
        st.stats.timeouts += 1;
        let alive = st.conns[sock].dead.is_none();
        drop(st);
        if alive {
            let reason = format!(
                "{} {} at offset {} timed out after {} (kernel timeout {})",
                req.command,
                req.cookie,
                req.offset,
                secs(first_sent.elapsed()),
                secs(timeout)
            );
            self.kill(sock, LoopbackError::ShutDown { conn: sock, reason });
        }
        let mut st = lock(&self.state);
        let Some(s) = st.conns[hwq].slots[tag].as_ref() else {
            return;
        };
        if s.req.cookie != cookie || s.result.is_some() {
            return;
        }
        let payload = s.payload.clone().unwrap_or_default();
        match st.live_socket(hwq) {
            Some(next) => {
                let Some(req) = self.requeue(&mut st, hwq, tag, next) else {
                    return;
                };
                drop(st);
                self.transmit(hwq, tag, next, req, &payload);
            }
            None => {
                let after = first_sent.elapsed();
                st.lose(&req, after);
                let err = LoopbackError::TimedOut {
                    command: req.command,
                    offset: req.offset,
                    len: req.len,
                    after,
                };
                let wake = st.complete(hwq, tag, Err(err));
                drop(st);
                if wake {
                    self.changed.notify_all();
                }
            }
        }
    }
}

/// Waits for the signal that the server thread ended: up to `grace`, or for ever if `None`.
/// Returns whether it ended.
pub(super) fn wait_for_end(done: &Receiver<()>, grace: Option<Duration>) -> bool {
    match grace {
        None => {
            let _ = done.recv();
            true
        }
        Some(grace) => !matches!(done.recv_timeout(grace), Err(RecvTimeoutError::Timeout)),
    }
}
