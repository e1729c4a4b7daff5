//! The baseline: an NBD server shaped like vblk's and buse-go's, kept so that benchmarks can say
//! how much faster [`userblk::Server`] is than what it replaces.
//!
//! One thread, one request at a time: read the header, read a WRITE's payload into a freshly
//! allocated `Vec`, call the device, write the reply header and then the READ data with separate
//! `write` calls, loop. Only one connection is served. Unlike vblk it sends no payload after an
//! error reply (the fake kernel would kill the connection, and the comparison is about speed).
//! It validates nothing itself beyond what keeps the stream in sync: the device checks ranges.
//!
//! Shared by `benches/loopback.rs` and `examples/sequential_server.rs` (the VM benchmark's
//! baseline on a real `/dev/nbdN`) through `#[path]`.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

use userblk::proto::{Command, CommandFlags, Errno, ParseError, Reply, Request, REQUEST_LEN};
use userblk::server::export_of;
use userblk::{BlockDevice, KernelLink, ServerError};

/// Starts `link`, serves its first connection until DISC or EOF, unmounts the device and
/// finishes the link. Other connections are dropped, as a one-connection server would.
pub(crate) fn run<D: BlockDevice + ?Sized, L: KernelLink>(
    device: &D,
    mut link: L,
) -> Result<(), ServerError> {
    let export = export_of(device)?;
    let mut conns = link.start(&export)?.conns;
    let result = match conns.first_mut() {
        Some(sock) => serve(device, sock).map_err(|source| ServerError::Io { conn: 0, source }),
        None => Ok(()),
    };
    device.unmount();
    drop(conns);
    link.finish()?;
    result
}

/// Serves one connection, one request at a time, until DISC or EOF.
pub(crate) fn serve<D: BlockDevice + ?Sized>(device: &D, sock: &mut UnixStream) -> io::Result<()> {
    loop {
        let mut header = [0u8; REQUEST_LEN];
        match sock.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let req = match Request::parse(&header) {
            Ok(req) => req,
            Err(ParseError::UnknownCommand { cookie, .. }) => {
                sock.write_all(&Reply::error(cookie, Errno::EINVAL).encode())?;
                continue;
            }
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        };
        let len = req.len as usize;
        let result = match req.command {
            Command::Disc => return Ok(()),
            Command::Read => {
                let mut buf = vec![0u8; len];
                device.read(req.offset, &mut buf).map(|()| buf)
            }
            Command::Write => {
                let mut buf = vec![0u8; len];
                sock.read_exact(&mut buf)?;
                if req.flags.contains(CommandFlags::FUA) {
                    device.write_fua(req.offset, &buf)
                } else {
                    device.write(req.offset, &buf)
                }
                .map(|()| Vec::new())
            }
            Command::Flush => device.flush().map(|()| Vec::new()),
            Command::Trim => device.trim(req.offset, len as u64).map(|()| Vec::new()),
            Command::WriteZeroes => {
                let may_trim = !req.flags.contains(CommandFlags::NO_HOLE);
                device
                    .write_zeroes(req.offset, len as u64, may_trim)
                    .map(|()| Vec::new())
            }
            Command::Cache | Command::BlockStatus => Err(io::Error::from_raw_os_error(22)),
        };
        match result {
            Ok(data) => {
                sock.write_all(&Reply::ok(req.cookie).encode())?;
                if !data.is_empty() {
                    sock.write_all(&data)?;
                }
            }
            Err(e) => {
                let errno = Errno::from_io_error(&e);
                sock.write_all(&Reply::error(req.cookie, errno).encode())?;
            }
        }
    }
}
