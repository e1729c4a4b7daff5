//! The sending side of a connection: replies queued by whichever thread has one, written in
//! batches by one `writev`.

use std::io::{self, IoSlice};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

use crate::proto::{Cookie, Errno, Reply, REPLY_LEN};
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

/// A reply ready to go out, with the permit (and buffer) of its request.
pub(super) struct Done {
    pub(super) header: [u8; REPLY_LEN],
    /// Whether `buf` is the READ data that follows the header. Never after an error.
    pub(super) with_data: bool,
    pub(super) buf: Vec<u8>,
}

impl Done {
    pub(super) fn error(cookie: Cookie, errno: Errno, buf: Vec<u8>) -> Done {
        Done {
            header: Reply::error(cookie, errno).encode(),
            with_data: false,
            buf,
        }
    }
}

/// Writes replies in as few `writev` calls as the slices allow.
pub(super) fn write_replies(w: &mut UnixStream, replies: &[Done]) -> io::Result<()> {
    let mut iov = [IoSlice::new(&[]); 2 * REPLIES_PER_WRITE];
    for group in replies.chunks(REPLIES_PER_WRITE) {
        let mut n = 0;
        for d in group {
            iov[n] = IoSlice::new(&d.header);
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
