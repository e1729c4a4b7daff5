//! The sending side of a connection: replies queued by whichever thread has one, written in
//! batches by one `writev`; and their framing: simple replies (the kernel's), or structured reply
//! chunks once a network client negotiated them (`doc/proto.md`, "Structured reply chunk
//! message": data, hole, block status, error).

use std::io::{self, IoSlice};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

use crate::device::Extent;
use crate::link::net::wire::{chunk, ChunkHeader, REPLY_FLAG_DONE, STATE_HOLE, STATE_ZERO};
use crate::proto::{Cookie, Errno, Reply};
use crate::stream::write_all_vectored;

/// Writes a reply header and, on success, its data, in one `writev` where the socket allows.
pub(super) fn send_reply(w: &mut UnixStream, reply: Reply, data: &[u8]) -> io::Result<()> {
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

/// A reply ready to go out, with the permit (and buffer) of its request.
pub(super) struct Done {
    header: [u8; MAX_HEADER],
    header_len: u8,
    /// Whether `buf` is the data that follows the header (READ data, block-status
    /// descriptors). Never after an error.
    pub(super) with_data: bool,
    pub(super) buf: Vec<u8>,
}

impl Done {
    fn new(header: &[u8], with_data: bool, buf: Vec<u8>) -> Done {
        let mut h = [0u8; MAX_HEADER];
        let n = header.len().min(MAX_HEADER);
        h[..n].copy_from_slice(&header[..n]);
        Done {
            header: h,
            header_len: n as u8,
            with_data,
            buf,
        }
    }

    /// The bytes before the data.
    pub(super) fn header(&self) -> &[u8] {
        &self.header[..usize::from(self.header_len)]
    }

    /// A simple success reply; `with_data` for READ.
    pub(super) fn ok(cookie: Cookie, with_data: bool, buf: Vec<u8>) -> Done {
        Done::new(&Reply::ok(cookie).encode(), with_data, buf)
    }

    /// An error reply: simple, or an error chunk once structured replies are on (a READ's must
    /// be one).
    pub(super) fn error(structured: bool, cookie: Cookie, errno: Errno, buf: Vec<u8>) -> Done {
        if !structured {
            return Done::new(&Reply::error(cookie, errno).encode(), false, buf);
        }
        let mut h = [0u8; CHUNK_ERROR_LEN];
        h[..20].copy_from_slice(&chunk_header(cookie, chunk::ERROR, 6));
        h[20..24].copy_from_slice(&errno.0.to_be_bytes());
        // Message length 0: the errno says it all.
        Done::new(&h, false, buf)
    }

    /// A READ's structured reply: one OFFSET_DATA chunk, or one OFFSET_HOLE when the data is all
    /// zeroes (the client fills in the zeroes; nothing else crosses the network).
    pub(super) fn read_chunk(cookie: Cookie, offset: u64, buf: Vec<u8>) -> Done {
        if !buf.is_empty() && buf.iter().all(|&b| b == 0) {
            let mut h = [0u8; 32];
            h[..20].copy_from_slice(&chunk_header(cookie, chunk::OFFSET_HOLE, 12));
            h[20..28].copy_from_slice(&offset.to_be_bytes());
            h[28..32].copy_from_slice(&(buf.len() as u32).to_be_bytes());
            return Done::new(&h, false, buf);
        }
        let mut h = [0u8; 28];
        let len = u32::try_from(buf.len() + 8).unwrap_or(u32::MAX);
        h[..20].copy_from_slice(&chunk_header(cookie, chunk::OFFSET_DATA, len));
        h[20..28].copy_from_slice(&offset.to_be_bytes());
        Done::new(&h, true, buf)
    }

    /// A BLOCK_STATUS reply: one chunk for context `context`, the descriptors in `buf`.
    pub(super) fn block_status(cookie: Cookie, context: u32, buf: Vec<u8>) -> Done {
        let mut h = [0u8; 24];
        let len = u32::try_from(buf.len() + 4).unwrap_or(u32::MAX);
        h[..20].copy_from_slice(&chunk_header(cookie, chunk::BLOCK_STATUS, len));
        h[20..24].copy_from_slice(&context.to_be_bytes());
        Done::new(&h, true, buf)
    }
}

const CHUNK_ERROR_LEN: usize = 26;

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

/// The descriptors (length, flags) of a block-status reply for a request of `len` bytes, into
/// `out`: the device's extents with empty ones dropped, equal neighbours merged, cut at `len`
/// (and at one with `req_one`). A device that reports nothing gets one data extent for it all.
pub(super) fn encode_extents(extents: &[Extent], len: u32, req_one: bool, out: &mut Vec<u8>) {
    out.clear();
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
    for (l, f) in runs {
        out.extend_from_slice(&l.to_be_bytes());
        out.extend_from_slice(&f.to_be_bytes());
    }
}

/// Writes replies in as few `writev` calls as the slices allow.
pub(super) fn write_replies(w: &mut UnixStream, replies: &[Done]) -> io::Result<()> {
    let mut iov = [IoSlice::new(&[]); 2 * REPLIES_PER_WRITE];
    for group in replies.chunks(REPLIES_PER_WRITE) {
        let mut n = 0;
        for d in group {
            iov[n] = IoSlice::new(d.header());
            n += 1;
            if d.with_data && !d.buf.is_empty() {
                iov[n] = IoSlice::new(&d.buf);
                n += 1;
            }
        }
        write_all_vectored(w, &mut iov[..n])?;
    }
    Ok(())
}

/// The sending side of one connection.
///
/// Whoever has a reply puts it in `pending` and, if `writer` is free, writes everything pending
/// in one go; if `writer` is busy its holder writes the new reply too before it lets go. So no
/// thread waits for another's `writev`, and replies that complete together leave together.
pub(super) struct Outbox {
    pub(super) writer: Mutex<UnixStream>,
    pub(super) pending: Mutex<Vec<Done>>,
}
