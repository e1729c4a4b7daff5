//! Reading NBD requests from a connection: headers, WRITE payloads, and the payloads of rejected
//! WRITEs skipped to keep the stream in sync.

use std::io::{self, Read};

use crate::proto::{Cookie, ParseError, Request, REQUEST_LEN};
use crate::server::ServerError;
use crate::stream::read_full;

/// What the reader found next on a connection.
pub(super) enum Incoming {
    /// A clean EOF before any header byte.
    Eof,
    /// A request header (payload not yet read).
    Request(Request),
    /// A sound header with an unknown command: reply EINVAL and go on.
    Unknown { cookie: Cookie },
}

/// Reads exactly one request header, unbuffered (for [`Server::handle_one`]).
pub(super) fn read_header(r: &mut impl Read, conn: usize) -> Result<Incoming, ServerError> {
    let mut header = [0u8; REQUEST_LEN];
    let got = read_full(r, &mut header).map_err(|source| ServerError::Io { conn, source })?;
    if got == 0 {
        return Ok(Incoming::Eof);
    }
    parse_header(&header[..got], conn)
}

pub(super) fn parse_header(header: &[u8], conn: usize) -> Result<Incoming, ServerError> {
    match Request::parse(header) {
        Ok(req) => Ok(Incoming::Request(req)),
        Err(ParseError::UnknownCommand { cookie, .. }) => Ok(Incoming::Unknown { cookie }),
        Err(source) => Err(ServerError::Protocol { conn, source }),
    }
}

/// Reads a WRITE's payload into `buf`, or fails with `TruncatedPayload`.
pub(super) fn read_payload(
    r: &mut impl Read,
    conn: usize,
    req: &Request,
    buf: &mut [u8],
) -> Result<(), ServerError> {
    let got = read_full(r, buf).map_err(|source| ServerError::Io { conn, source })?;
    if got < buf.len() {
        return Err(ServerError::TruncatedPayload {
            conn,
            cookie: req.cookie,
            expected: req.len,
            got,
        });
    }
    Ok(())
}

/// Reads and discards the payload of a rejected WRITE, to keep the stream in sync.
pub(super) fn skip_payload(
    r: &mut impl Read,
    conn: usize,
    req: &Request,
) -> Result<(), ServerError> {
    let mut scratch = [0u8; 64 << 10];
    let mut left = req.payload_len();
    while left > 0 {
        let n = left.min(scratch.len());
        let got =
            read_full(r, &mut scratch[..n]).map_err(|source| ServerError::Io { conn, source })?;
        if got < n {
            return Err(ServerError::TruncatedPayload {
                conn,
                cookie: req.cookie,
                expected: req.len,
                got: req.payload_len() - left + got,
            });
        }
        left -= n;
    }
    Ok(())
}

/// How many request bytes a reader takes from the socket at once: every header (and small
/// payload) that has arrived, so that a deep queue costs one `read` for many requests.
const READ_AHEAD: usize = 64 << 10;

/// Reads one connection's requests through a buffer, so that a queue of small requests costs
/// one `read` for many; large payloads go straight from the socket into their request's buffer.
pub(super) struct RequestReader<S> {
    sock: S,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl<S: Read> RequestReader<S> {
    pub(super) fn new(sock: S) -> RequestReader<S> {
        RequestReader {
            sock,
            buf: vec![0u8; READ_AHEAD].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Reads whatever the socket has (at least one byte, or 0 at EOF) after the buffered bytes.
    pub(super) fn fill(&mut self, conn: usize) -> Result<usize, ServerError> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        loop {
            match self.sock.read(&mut self.buf[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(ServerError::Io { conn, source }),
            }
        }
    }

    /// Whether a whole request header is buffered (the next one needs no `read`).
    pub(super) fn has_header(&self) -> bool {
        self.end - self.start >= REQUEST_LEN
    }

    pub(super) fn next_header(&mut self, conn: usize) -> Result<Incoming, ServerError> {
        while self.end - self.start < REQUEST_LEN {
            if self.fill(conn)? == 0 {
                if self.start == self.end {
                    return Ok(Incoming::Eof);
                }
                let source = ParseError::ShortHeader {
                    len: self.end - self.start,
                };
                return Err(ServerError::Protocol { conn, source });
            }
        }
        let header = &self.buf[self.start..self.start + REQUEST_LEN];
        self.start += REQUEST_LEN;
        parse_header(header, conn)
    }

    /// Fills `out` with a WRITE's payload: what is buffered, then straight from the socket.
    pub(super) fn payload(
        &mut self,
        conn: usize,
        req: &Request,
        out: &mut [u8],
    ) -> Result<(), ServerError> {
        let have = (self.end - self.start).min(out.len());
        out[..have].copy_from_slice(&self.buf[self.start..self.start + have]);
        self.start += have;
        let got = read_full(&mut self.sock, &mut out[have..])
            .map_err(|source| ServerError::Io { conn, source })?;
        if have + got < out.len() {
            return Err(ServerError::TruncatedPayload {
                conn,
                cookie: req.cookie,
                expected: req.len,
                got: have + got,
            });
        }
        Ok(())
    }

    /// Discards the payload of a rejected WRITE, to keep the stream in sync.
    pub(super) fn skip(&mut self, conn: usize, req: &Request) -> Result<(), ServerError> {
        let len = req.payload_len();
        let mut done = 0;
        while done < len {
            if self.start == self.end && self.fill(conn)? == 0 {
                return Err(ServerError::TruncatedPayload {
                    conn,
                    cookie: req.cookie,
                    expected: req.len,
                    got: done,
                });
            }
            let n = (self.end - self.start).min(len - done);
            self.start += n;
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Command;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn reader_handles_headers_and_payloads_split_anywhere() {
        let (mut kernel, server) = UnixStream::pair().unwrap();
        let mut r = RequestReader::new(server);
        let mut bytes = Vec::new();
        bytes.extend(Request::new(Command::Write, Cookie(1), 0, 4096).encode());
        bytes.extend((0..4096).map(|i| i as u8));
        bytes.extend(Request::new(Command::Read, Cookie(2), 0, 512).encode());
        // Header and payload arrive in pieces that cut both.
        let cuts = [0, 10, 30, 1000, 4124, 4130, bytes.len()];
        let writer = std::thread::spawn(move || {
            for w in cuts.windows(2) {
                kernel.write_all(&bytes[w[0]..w[1]]).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            kernel
        });
        let Incoming::Request(write) = r.next_header(0).unwrap() else {
            panic!("expected a request")
        };
        assert_eq!((write.command, write.cookie), (Command::Write, Cookie(1)));
        let mut payload = vec![0u8; 4096];
        r.payload(0, &write, &mut payload).unwrap();
        assert!(payload.iter().enumerate().all(|(i, &b)| b == i as u8));
        let Incoming::Request(read) = r.next_header(0).unwrap() else {
            panic!("expected a request")
        };
        assert_eq!((read.command, read.cookie), (Command::Read, Cookie(2)));
        assert!(!r.has_header());
        drop(writer.join().unwrap());
        assert!(matches!(r.next_header(0), Ok(Incoming::Eof)));
    }
}
