//! [`RawKernel`]: the kernel's end of one connection handed to the test, with a real server on
//! the other end: send any bytes (malformed headers, truncated payloads), read replies one by
//! one.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::thread::{self, JoinHandle};

use super::error::{LoopbackError, Violation};
use super::LoopbackLink;
use crate::device::BlockDevice;
use crate::link::Export;
use crate::proto::{Command, Cookie, Reply, Request, REPLY_LEN};
use crate::server::{export_of, Server, ServerError, ServerOptions};
use crate::stream::{read_full, write_all_vectored};

/// The kernel's socket, handed to the test: send any bytes, read replies one by one.
///
/// ```
/// use userblk::link::loopback::RawKernel;
/// use userblk::proto::{Command, Cookie, Errno, Request};
/// use userblk::MemDevice;
///
/// let mut raw = RawKernel::start(MemDevice::new(1 << 20))?;
/// raw.send_request(&Request::new(Command::Read, Cookie(7), 1 << 20, 512), &[])?;
/// let reply = raw.recv_reply()?;
/// assert_eq!((reply.cookie, reply.errno()), (Cookie(7), Some(Errno::EINVAL)));
/// raw.finish()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct RawKernel {
    sock: UnixStream,
    export: Export,
    server: Option<JoinHandle<Result<(), ServerError>>>,
}

impl RawKernel {
    /// Starts a server for `device` with one connection whose other end the test holds.
    pub fn start<D: BlockDevice + 'static>(device: D) -> Result<RawKernel, LoopbackError> {
        RawKernel::with_options(device, ServerOptions::default())
    }

    /// Same, with server options.
    pub fn with_options<D: BlockDevice + 'static>(
        device: D,
        options: ServerOptions,
    ) -> Result<RawKernel, LoopbackError> {
        let export = export_of(&device)?;
        let (link, mut ends) = LoopbackLink::new(1)?;
        let mut server = Server::with_options(device, link, options)?;
        let server = thread::Builder::new()
            .name("userblk-raw-server".into())
            .spawn(move || server.run())?;
        let sock = ends.pop().ok_or_else(|| io::Error::other("no socket"))?;
        Ok(RawKernel {
            sock,
            export,
            server: Some(server),
        })
    }

    /// What the server advertised.
    pub fn export(&self) -> &Export {
        &self.export
    }

    /// Sends raw bytes.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.sock.write_all(bytes)
    }

    /// Sends a request header and its payload.
    pub fn send_request(&mut self, req: &Request, payload: &[u8]) -> io::Result<()> {
        write_all_vectored(
            &mut self.sock,
            &mut [IoSlice::new(&req.encode()), IoSlice::new(payload)],
        )
    }

    /// Reads one reply header; EOF is `Disconnected`.
    pub fn recv_reply(&mut self) -> Result<Reply, LoopbackError> {
        let mut header = [0u8; REPLY_LEN];
        let got = read_full(&mut self.sock, &mut header)?;
        if got == 0 {
            return Err(LoopbackError::Disconnected { conn: 0 });
        }
        Reply::parse(&header[..got]).map_err(|e| {
            LoopbackError::Violation(Violation {
                conn: 0,
                what: e.to_string(),
            })
        })
    }

    /// Reads exactly `len` bytes of reply data.
    pub fn recv_data(&mut self, len: usize) -> Result<Vec<u8>, LoopbackError> {
        let mut data = vec![0u8; len];
        let got = read_full(&mut self.sock, &mut data)?;
        if got < len {
            return Err(LoopbackError::Disconnected { conn: 0 });
        }
        Ok(data)
    }

    /// Reads until the server closes the connection; returns the bytes that came first.
    pub fn recv_to_eof(&mut self) -> io::Result<Vec<u8>> {
        let mut rest = Vec::new();
        self.sock.read_to_end(&mut rest)?;
        Ok(rest)
    }

    /// Sends DISC and returns the server's result.
    pub fn disconnect(mut self) -> Result<(), ServerError> {
        let _ = self.send(&Request::new(Command::Disc, Cookie(0), 0, 0).encode());
        self.join()
    }

    /// Closes the kernel's side (EOF for the server) and returns the server's result.
    pub fn finish(mut self) -> Result<(), ServerError> {
        let _ = self.sock.shutdown(Shutdown::Write);
        self.join()
    }

    fn join(&mut self) -> Result<(), ServerError> {
        match self.server.take() {
            Some(h) => h.join().unwrap_or_else(|_| {
                Err(ServerError::Io {
                    conn: 0,
                    source: io::Error::other("server thread panicked"),
                })
            }),
            None => Ok(()),
        }
    }
}

impl Drop for RawKernel {
    fn drop(&mut self) {
        let _ = self.sock.shutdown(Shutdown::Both);
        let _ = self.join();
    }
}
