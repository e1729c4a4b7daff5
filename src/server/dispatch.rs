//! A validated request to the device: the method it maps to, FUA, errno mapping, panics caught.

use std::io;
use std::panic::{self, AssertUnwindSafe};

use crate::device::BlockDevice;
use crate::proto::{Command, CommandFlags, Errno, Request};

/// Calls the device for a validated request. `buf` holds a WRITE's payload, or receives a READ's
/// data (it is `req.len` long). A panic in the device becomes EIO.
pub(super) fn execute<D: BlockDevice + ?Sized>(
    device: &D,
    req: &Request,
    buf: &mut [u8],
) -> Result<(), Errno> {
    let fua = req.flags.contains(CommandFlags::FUA);
    let off = req.offset;
    let len = u64::from(req.len);
    let result = panic::catch_unwind(AssertUnwindSafe(|| match req.command {
        Command::Read => device.read(off, buf),
        Command::Write if fua => device.write_fua(off, buf),
        Command::Write => device.write(off, buf),
        Command::Flush => device.flush(),
        Command::Trim => device.trim(off, len).and_then(|()| flush_if(device, fua)),
        Command::WriteZeroes => {
            let may_trim = !req.flags.contains(CommandFlags::NO_HOLE);
            device
                .write_zeroes(off, len, may_trim)
                .and_then(|()| flush_if(device, fua))
        }
        // Rejected by `validate`; never reaches here.
        Command::Disc | Command::Cache | Command::BlockStatus => {
            Err(io::Error::from_raw_os_error(22))
        }
    }));
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Errno::from_io_error(&e)),
        Err(_) => Err(Errno::EIO),
    }
}

fn flush_if<D: BlockDevice + ?Sized>(device: &D, fua: bool) -> io::Result<()> {
    if fua {
        device.flush()
    } else {
        Ok(())
    }
}
