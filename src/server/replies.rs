//! The sending side of a connection: replies queued by whichever thread has one, written in
//! batches by one `writev`, by whoever finds the writer free.

use std::io::{self, IoSlice, Write};
use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, TryLockError};

use crate::proto::{Cookie, Errno, Reply, REPLY_LEN};
use crate::server::pool::{lock, Buffer, BufferPool};
use crate::stream::write_all_vectored;

/// Writes a reply header and, on success, its data, in one `writev` where the socket allows.
pub(super) fn send_reply(w: &mut impl Write, reply: Reply, data: &[u8]) -> io::Result<()> {
    let header = reply.encode();
    let data = if reply.error == 0 { data } else { &[] };
    write_all_vectored(w, &mut [IoSlice::new(&header), IoSlice::new(data)])
}

/// A reply write that failed because the kernel side went away: nothing is left to tell it.
pub(super) fn peer_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected
    )
}

/// READ data from this size on is written by the thread that read it, not gathered with others.
pub(super) const WRITE_OWN_REPLY: usize = 64 << 10;

/// Replies gathered into one `writev` (two slices each: header and READ data).
pub(super) const REPLIES_PER_WRITE: usize = 32;

/// A reply ready to go out, with the buffer its request was charged for.
#[derive(Debug)]
pub(super) struct Done {
    pub(super) header: [u8; REPLY_LEN],
    /// Whether `buf` is the READ data that follows the header. Never after an error.
    pub(super) with_data: bool,
    pub(super) buf: Buffer,
}

impl Done {
    pub(super) fn ok(cookie: Cookie, with_data: bool, buf: Buffer) -> Done {
        Done {
            header: Reply::ok(cookie).encode(),
            with_data,
            buf,
        }
    }

    pub(super) fn error(cookie: Cookie, errno: Errno, buf: Buffer) -> Done {
        Done {
            header: Reply::error(cookie, errno).encode(),
            with_data: false,
            buf,
        }
    }

    /// Whether this reply carries data large enough to be written by its own thread.
    pub(super) fn is_large(&self) -> bool {
        self.with_data && self.buf.as_slice().len() >= WRITE_OWN_REPLY
    }
}

/// Writes replies in as few `writev` calls as the slices allow.
fn write_replies(w: &mut impl Write, replies: &[Done]) -> io::Result<()> {
    let mut iov = [IoSlice::new(&[]); 2 * REPLIES_PER_WRITE];
    for group in replies.chunks(REPLIES_PER_WRITE) {
        let mut n = 0;
        for d in group {
            iov[n] = IoSlice::new(&d.header);
            n += 1;
            if d.with_data && !d.buf.as_slice().is_empty() {
                iov[n] = IoSlice::new(d.buf.as_slice());
                n += 1;
            }
        }
        write_all_vectored(w, &mut iov[..n])?;
    }
    Ok(())
}

/// The writing end of a connection, with the list it swaps with `pending` (so that taking every
/// pending reply never allocates).
#[derive(Debug)]
struct Writer<S> {
    stream: S,
    taken: Vec<Done>,
}

/// The sending side of one connection.
///
/// Whoever has a reply puts it in `pending` and, if the writer is free, writes everything pending
/// in one go; if the writer is busy its holder writes the new reply too before it lets go. So no
/// thread waits for another's `writev`, and replies that complete together leave together.
#[derive(Debug)]
pub(super) struct Outbox<S> {
    writer: Mutex<Writer<S>>,
    pending: Mutex<Vec<Done>>,
    /// The thread whose turn it is to read this connection waits for the socket or for memory:
    /// it wrote what was pending before it started waiting, and nobody will write a reply
    /// queued after that but the thread queueing it.
    pub(super) reader_waiting: AtomicBool,
}

impl<S: Write> Outbox<S> {
    pub(super) fn new(stream: S) -> Outbox<S> {
        Outbox {
            writer: Mutex::new(Writer {
                stream,
                taken: Vec::with_capacity(4 * REPLIES_PER_WRITE),
            }),
            pending: Mutex::new(Vec::with_capacity(4 * REPLIES_PER_WRITE)),
            reader_waiting: AtomicBool::new(false),
        }
    }

    /// Queues a reply for the next [`flush`](Self::flush); returns how many are queued.
    pub(super) fn defer(&self, done: Done) -> usize {
        let mut pending = lock(&self.pending);
        pending.push(done);
        pending.len()
    }

    /// Writes the pending replies (and `own`, first) unless another thread is at it (then that
    /// thread writes them); waits for the writer only when there is `own` to write. Every
    /// buffer written (or dropped after a failed write) goes back to `pool`. Returns the first
    /// write error: the connection is finished, and what was pending is dropped.
    pub(super) fn flush(&self, pool: &BufferPool, mut own: Option<Done>) -> io::Result<()> {
        let mut result = Ok(());
        loop {
            let mut guard = match own {
                Some(_) => lock(&self.writer),
                None => match self.writer.try_lock() {
                    Ok(w) => w,
                    Err(TryLockError::Poisoned(p)) => p.into_inner(),
                    // The holder writes ours before it lets go (it checks `pending` after).
                    Err(TryLockError::WouldBlock) => return result,
                },
            };
            let w = &mut *guard;
            if let Some(done) = own.take() {
                result = write_replies(&mut w.stream, std::slice::from_ref(&done));
                pool.give(std::iter::once(done.buf));
            }
            loop {
                std::mem::swap(&mut *lock(&self.pending), &mut w.taken);
                if w.taken.is_empty() {
                    break;
                }
                if result.is_ok() {
                    result = write_replies(&mut w.stream, &w.taken);
                }
                pool.give(w.taken.drain(..).map(|d| d.buf));
            }
            drop(guard);
            // A reply queued while we were letting go would otherwise be stranded.
            if lock(&self.pending).is_empty() {
                return result;
            }
        }
    }
}
