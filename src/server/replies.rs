//! The sending side of a connection: replies queued by whichever thread has one, written in
//! batches by one `writev`, either by whoever finds the writer free (threads serving a sync
//! device) or by the connection's own writer thread (an async device: a tokio worker only
//! queues, and never waits on a socket); and their framing: simple replies (the kernel's), or
//! structured reply chunks once a network client negotiated them (`doc/proto.md`, "Structured
//! reply chunk message": data, hole, block status, error).

use std::io::{self, IoSlice, Write};
use std::sync::atomic::AtomicBool;
use std::sync::{Condvar, Mutex, TryLockError};

use crate::device::Extent;
use crate::link::net::wire::{chunk, ChunkHeader, REPLY_FLAG_DONE, STATE_HOLE, STATE_ZERO};
use crate::proto::{Cookie, Errno, Reply};
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

/// The longest header before a reply's data: a structured chunk header (20 bytes) and an
/// OFFSET_HOLE payload (12).
const MAX_HEADER: usize = 32;

/// A reply ready to go out, with the buffer its request was charged for.
#[derive(Debug)]
pub(super) struct Done {
    header: [u8; MAX_HEADER],
    header_len: u8,
    /// Whether `buf` is the READ data that follows the header. Never after an error.
    pub(super) with_data: bool,
    pub(super) buf: Buffer,
    /// A block-status reply's descriptors (outside the pool: their number is the device's, and
    /// the command is rare).
    extra: Vec<u8>,
}

impl Done {
    fn new(header: &[u8], with_data: bool, buf: Buffer) -> Done {
        let mut h = [0u8; MAX_HEADER];
        let n = header.len().min(MAX_HEADER);
        h[..n].copy_from_slice(&header[..n]);
        Done {
            header: h,
            header_len: n as u8,
            with_data,
            buf,
            extra: Vec::new(),
        }
    }

    /// The bytes before the data.
    fn header(&self) -> &[u8] {
        &self.header[..usize::from(self.header_len)]
    }

    /// A simple success reply; `with_data` for READ.
    pub(super) fn ok(cookie: Cookie, with_data: bool, buf: Buffer) -> Done {
        Done::new(&Reply::ok(cookie).encode(), with_data, buf)
    }

    /// A simple error reply.
    pub(super) fn error(cookie: Cookie, errno: Errno, buf: Buffer) -> Done {
        Done::new(&Reply::error(cookie, errno).encode(), false, buf)
    }

    /// An error reply in the connection's framing: an error chunk once structured replies are
    /// on (a READ's must be one).
    pub(super) fn error_in(structured: bool, cookie: Cookie, errno: Errno, buf: Buffer) -> Done {
        if !structured {
            return Done::error(cookie, errno, buf);
        }
        let mut h = [0u8; 26];
        h[..20].copy_from_slice(&chunk_header(cookie, chunk::ERROR, 6));
        h[20..24].copy_from_slice(&errno.0.to_be_bytes());
        // Message length 0: the errno says it all.
        Done::new(&h, false, buf)
    }

    /// A READ's structured reply: one OFFSET_DATA chunk, or one OFFSET_HOLE when the data is all
    /// zeroes (the client fills in the zeroes; nothing else crosses the network).
    pub(super) fn read_chunk(cookie: Cookie, offset: u64, buf: Buffer) -> Done {
        let data = buf.as_slice();
        if !data.is_empty() && data.iter().all(|&b| b == 0) {
            let mut h = [0u8; 32];
            h[..20].copy_from_slice(&chunk_header(cookie, chunk::OFFSET_HOLE, 12));
            h[20..28].copy_from_slice(&offset.to_be_bytes());
            h[28..32].copy_from_slice(&(data.len() as u32).to_be_bytes());
            return Done::new(&h, false, buf);
        }
        let mut h = [0u8; 28];
        let len = u32::try_from(data.len() + 8).unwrap_or(u32::MAX);
        h[..20].copy_from_slice(&chunk_header(cookie, chunk::OFFSET_DATA, len));
        h[20..28].copy_from_slice(&offset.to_be_bytes());
        Done::new(&h, true, buf)
    }

    /// A BLOCK_STATUS reply: one chunk for context `context`, with `descriptors`.
    pub(super) fn block_status(
        cookie: Cookie,
        context: u32,
        descriptors: Vec<u8>,
        buf: Buffer,
    ) -> Done {
        let mut h = [0u8; 24];
        let len = u32::try_from(descriptors.len() + 4).unwrap_or(u32::MAX);
        h[..20].copy_from_slice(&chunk_header(cookie, chunk::BLOCK_STATUS, len));
        h[20..24].copy_from_slice(&context.to_be_bytes());
        let mut d = Done::new(&h, false, buf);
        d.extra = descriptors;
        d
    }

    /// Whether this reply carries data large enough to be written by its own thread.
    pub(super) fn is_large(&self) -> bool {
        self.with_data && self.buf.as_slice().len() >= WRITE_OWN_REPLY
    }
}

fn chunk_header(cookie: Cookie, kind: u16, len: u32) -> [u8; 20] {
    ChunkHeader {
        flags: REPLY_FLAG_DONE,
        kind,
        cookie: cookie.0,
        len,
    }
    .encode()
}

/// Most descriptors in one block-status reply (the protocol asks for no more than 2^20; fewer
/// keep a reply small, and the client asks again from where it ends).
const MAX_EXTENTS: usize = 1 << 16;

/// The descriptors (length, flags) of a block-status reply for a request of `len` bytes: the
/// device's extents with empty ones dropped, equal neighbours merged, cut at `len` (and at one
/// with `req_one`). A device that reports nothing gets one data extent for it all.
pub(super) fn encode_extents(extents: &[Extent], len: u32, req_one: bool) -> Vec<u8> {
    let mut runs: Vec<(u32, u32)> = Vec::new();
    let mut total = 0u64;
    for e in extents {
        let left = u64::from(len) - total;
        if left == 0 || runs.len() >= MAX_EXTENTS {
            break;
        }
        if e.len == 0 {
            continue;
        }
        let l = e.len.min(left) as u32;
        let flags = if e.hole { STATE_HOLE } else { 0 } | if e.zero { STATE_ZERO } else { 0 };
        match runs.last_mut() {
            Some((rl, rf)) if *rf == flags => *rl += l,
            _ => runs.push((l, flags)),
        }
        total += u64::from(l);
    }
    if runs.is_empty() {
        runs.push((len, 0));
    }
    if req_one {
        runs.truncate(1);
    }
    let mut out = Vec::with_capacity(8 * runs.len());
    for (l, f) in runs {
        out.extend_from_slice(&l.to_be_bytes());
        out.extend_from_slice(&f.to_be_bytes());
    }
    out
}

/// Writes replies in as few `writev` calls as the slices allow.
fn write_replies(w: &mut impl Write, replies: &[Done]) -> io::Result<()> {
    let mut iov = [IoSlice::new(&[]); 2 * REPLIES_PER_WRITE];
    for group in replies.chunks(REPLIES_PER_WRITE) {
        let mut n = 0;
        for d in group {
            iov[n] = IoSlice::new(d.header());
            n += 1;
            if d.with_data && !d.buf.as_slice().is_empty() {
                iov[n] = IoSlice::new(d.buf.as_slice());
                n += 1;
            } else if !d.extra.is_empty() {
                iov[n] = IoSlice::new(&d.extra);
                n += 1;
            }
        }
        write_all_vectored(w, &mut iov[..n])?;
    }
    Ok(())
}

/// The writing end of a connection, with the list it swaps with the pending one (so that taking
/// every pending reply never allocates).
#[derive(Debug)]
struct Writer<S> {
    stream: S,
    taken: Vec<Done>,
}

/// The replies waiting for the writer, and what a writer thread sleeps on.
#[derive(Debug)]
struct Pending {
    replies: Vec<Done>,
    /// The connection's writer thread waits for a reply (whoever queues one wakes it).
    writer_asleep: bool,
    /// No reply will be queued any more: the writer thread ends once it has written the rest.
    closed: bool,
}

/// The sending side of one connection.
///
/// Shared writing (a sync device's threads): whoever has a reply puts it in `pending` and, if
/// the writer is free, writes everything pending in one go; if the writer is busy its holder
/// writes the new reply too before it lets go. So no thread waits for another's `writev`, and
/// replies that complete together leave together.
///
/// A writer thread (an async device): a task that has a reply only queues it
/// ([`queue`](Self::queue)) and wakes the thread, which writes everything queued in one go
/// ([`write_until_closed`](Self::write_until_closed)). A client that stops reading blocks that
/// thread alone; the replies queued meanwhile hold their pool memory, so the pool's byte bound
/// stops the connection's reader, not the tasks. (The reader of a device that never blocks
/// defers the replies of the futures it found ready and flushes them itself, as the threads of a
/// sync device do: it is a plain thread, and the writer thread takes what it leaves.)
#[derive(Debug)]
pub(super) struct Outbox<S> {
    writer: Mutex<Writer<S>>,
    pending: Mutex<Pending>,
    wake: Condvar,
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
            pending: Mutex::new(Pending {
                replies: Vec::with_capacity(4 * REPLIES_PER_WRITE),
                writer_asleep: false,
                closed: false,
            }),
            wake: Condvar::new(),
            reader_waiting: AtomicBool::new(false),
        }
    }

    /// Queues a reply for the next [`flush`](Self::flush); returns how many are queued.
    pub(super) fn defer(&self, done: Done) -> usize {
        let mut pending = lock(&self.pending);
        pending.replies.push(done);
        pending.replies.len()
    }

    /// Queues a reply for the connection's writer thread, waking it if it sleeps. Never waits
    /// for the socket: a tokio worker calls this.
    pub(super) fn queue(&self, done: Done) {
        let mut pending = lock(&self.pending);
        pending.replies.push(done);
        if std::mem::take(&mut pending.writer_asleep) {
            drop(pending);
            self.wake.notify_one();
        }
    }

    /// Tells the writer thread that nothing more will be queued: it writes what is left, and
    /// ends.
    pub(super) fn close(&self) {
        lock(&self.pending).closed = true;
        self.wake.notify_one();
    }

    /// The writer thread: writes what is queued, in batches, until [`close`](Self::close) and
    /// nothing is left. Every buffer written (or dropped after a failed write) goes back to
    /// `pool`. The first write error goes to `failed` at once; then it goes on taking replies
    /// (their memory goes back) without writing.
    pub(super) fn write_until_closed(&self, pool: &BufferPool, failed: impl FnOnce(io::Error)) {
        let mut failed = Some(failed);
        loop {
            let mut pending = lock(&self.pending);
            while pending.replies.is_empty() && !pending.closed {
                pending.writer_asleep = true;
                pending = self.wake.wait(pending).unwrap_or_else(|p| p.into_inner());
            }
            pending.writer_asleep = false;
            if pending.replies.is_empty() {
                return;
            }
            drop(pending);
            // The reader may be writing (an inline device's replies, with `flush`): it writes
            // what it finds pending, and what is left after it is ours.
            let mut guard = lock(&self.writer);
            let w = &mut *guard;
            std::mem::swap(&mut lock(&self.pending).replies, &mut w.taken);
            // Still writing (no error yet)?
            if failed.is_some() {
                if let Err(e) = write_replies(&mut w.stream, &w.taken) {
                    if let Some(f) = failed.take() {
                        f(e);
                    }
                }
            }
            pool.give(w.taken.drain(..).map(|d| d.buf));
        }
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
                std::mem::swap(&mut lock(&self.pending).replies, &mut w.taken);
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
            if lock(&self.pending).replies.is_empty() {
                return result;
            }
        }
    }
}
