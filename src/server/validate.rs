//! Checking a request against the export before any device sees it: what keeps the promise that
//! a device never sees a request outside its size, misaligned, empty, or for a command it did not
//! advertise. Every transport calls [`validate_io`]; the NBD loop calls [`validate`].

use crate::link::net::wire::CMD_FLAG_REQ_ONE;
use crate::link::Export;
use crate::proto::{Errno, Request, TransmissionFlags};
use crate::server::request::{IoOp, IoRequest};

/// Checks an NBD request header against the export before the device sees it: the
/// [`IoRequest`] to dispatch, or the errno to reply.
///
/// Errors follow the NBD protocol document: EPERM for any write on a read-only export, ENOSPC
/// for a write past the end, EINVAL for a read or trim past the end, a misaligned or empty
/// request, a command that was not advertised (DISC included: it is not for the device), or
/// unknown flags.
pub fn validate(req: &Request, export: &Export, max_io_len: u32) -> Result<IoRequest, Errno> {
    let io = IoRequest::from_nbd(req)?;
    validate_io(&io, export, max_io_len)?;
    Ok(io)
}

/// Checks a transport-neutral request against the export, with the errnos of [`validate`].
/// READ and WRITE longer than `max_io_len` get EINVAL.
pub fn validate_io(io: &IoRequest, export: &Export, max_io_len: u32) -> Result<(), Errno> {
    let flags = export.flags;
    if io.op.is_write() && flags.contains(TransmissionFlags::READ_ONLY) {
        return Err(Errno::EPERM);
    }
    let advertised = match io.op {
        IoOp::Read | IoOp::Write => true,
        IoOp::Flush => flags.contains(TransmissionFlags::SEND_FLUSH),
        IoOp::Trim => flags.contains(TransmissionFlags::SEND_TRIM),
        IoOp::WriteZeroes => flags.contains(TransmissionFlags::SEND_WRITE_ZEROES),
    };
    if !advertised {
        return Err(Errno::EINVAL);
    }
    if io.op == IoOp::Flush {
        return Ok(());
    }
    let bs = u64::from(export.block_size.max(1));
    if io.len == 0 || io.offset % bs != 0 || io.len % bs != 0 {
        return Err(Errno::EINVAL);
    }
    if io.op.has_data() && io.len > u64::from(max_io_len) {
        return Err(Errno::EINVAL);
    }
    if io.exceeds(export.size) {
        return Err(match io.op {
            IoOp::Write | IoOp::WriteZeroes => Errno::ENOSPC,
            _ => Errno::EINVAL,
        });
    }
    Ok(())
}

/// Checks an `NBD_CMD_BLOCK_STATUS` request (allowed only once a client selected
/// `base:allocation`): no flag but `NBD_CMD_FLAG_REQ_ONE`, a nonzero length, aligned, within the
/// export (EINVAL otherwise, as the protocol document asks). Its length may exceed `max_io_len`:
/// no data moves.
pub fn validate_block_status(req: &Request, export: &Export) -> Result<(), Errno> {
    if req.flags.0 & !CMD_FLAG_REQ_ONE.0 != 0 {
        return Err(Errno::EINVAL);
    }
    let bs = u64::from(export.block_size.max(1));
    let (offset, len) = (req.offset, u64::from(req.len));
    if len == 0 || offset % bs != 0 || len % bs != 0 {
        return Err(Errno::EINVAL);
    }
    if offset.checked_add(len).is_none_or(|end| end > export.size) {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Command, CommandFlags, Cookie, MAX_IO_LEN};
    use rstest::rstest;

    const RW: Export = Export {
        size: 1 << 20,
        block_size: 512,
        flags: TransmissionFlags(1 | 1 << 2 | 1 << 5 | 1 << 6),
    };
    const RO: Export = Export {
        size: 1 << 20,
        block_size: 512,
        flags: TransmissionFlags(1 | 1 << 1 | 1 << 2),
    };
    const NO_EXTRAS: Export = Export {
        size: 1 << 20,
        block_size: 4096,
        flags: TransmissionFlags(1),
    };

    fn req(command: Command, offset: u64, len: u32) -> Request {
        Request::new(command, Cookie(1), offset, len)
    }

    #[rstest]
    #[case::read_ok(RW, req(Command::Read, 0, 4096), Ok(()))]
    #[case::read_last_block(RW, req(Command::Read, (1 << 20) - 512, 512), Ok(()))]
    #[case::read_past_end(RW, req(Command::Read, (1 << 20) - 512, 1024), Err(Errno::EINVAL))]
    #[case::read_offset_overflow(RW, req(Command::Read, u64::MAX - 511, 512), Err(Errno::EINVAL))]
    #[case::write_past_end(RW, req(Command::Write, 1 << 20, 512), Err(Errno::ENOSPC))]
    #[case::zeroes_past_end(RW, req(Command::WriteZeroes, 1 << 20, 512), Err(Errno::ENOSPC))]
    #[case::trim_past_end(RW, req(Command::Trim, 1 << 20, 512), Err(Errno::EINVAL))]
    #[case::misaligned_offset(RW, req(Command::Read, 100, 512), Err(Errno::EINVAL))]
    #[case::misaligned_len(RW, req(Command::Write, 0, 100), Err(Errno::EINVAL))]
    #[case::misaligned_4k(NO_EXTRAS, req(Command::Read, 512, 4096), Err(Errno::EINVAL))]
    #[case::empty_read(RW, req(Command::Read, 0, 0), Err(Errno::EINVAL))]
    #[case::too_large(Export { size: 1 << 40, ..RW }, req(Command::Read, 0, MAX_IO_LEN + 512), Err(Errno::EINVAL))]
    #[case::max_size(Export { size: 1 << 40, ..RW }, req(Command::Read, 0, MAX_IO_LEN), Ok(()))]
    #[case::big_trim(Export { size: 1 << 40, ..RW }, req(Command::Trim, 0, 0xffff_fe00), Ok(()))]
    #[case::read_only_write(RO, req(Command::Write, 0, 512), Err(Errno::EPERM))]
    #[case::read_only_write_past_end(RO, req(Command::Write, 1 << 30, 512), Err(Errno::EPERM))]
    #[case::read_only_trim(RO, req(Command::Trim, 0, 512), Err(Errno::EPERM))]
    #[case::read_only_read(RO, req(Command::Read, 0, 512), Ok(()))]
    #[case::flush_not_advertised(NO_EXTRAS, req(Command::Flush, 0, 0), Err(Errno::EINVAL))]
    #[case::trim_not_advertised(NO_EXTRAS, req(Command::Trim, 0, 4096), Err(Errno::EINVAL))]
    #[case::zeroes_not_advertised(
        NO_EXTRAS,
        req(Command::WriteZeroes, 0, 4096),
        Err(Errno::EINVAL)
    )]
    #[case::cache_never(RW, req(Command::Cache, 0, 512), Err(Errno::EINVAL))]
    #[case::block_status_never(RW, req(Command::BlockStatus, 0, 512), Err(Errno::EINVAL))]
    #[case::flush_ok(RW, req(Command::Flush, 0, 0), Ok(()))]
    #[case::disc_is_not_for_the_device(RW, req(Command::Disc, 0, 0), Err(Errno::EINVAL))]
    fn validation(#[case] export: Export, #[case] req: Request, #[case] want: Result<(), Errno>) {
        assert_eq!(validate(&req, &export, MAX_IO_LEN).map(|_| ()), want);
    }

    #[test]
    fn flags_are_checked() {
        let mut r = req(Command::Write, 0, 512);
        r.flags = CommandFlags::FUA;
        assert_eq!(validate(&r, &RW, MAX_IO_LEN).map(|_| ()), Ok(()));
        r.flags = CommandFlags::NO_HOLE;
        assert_eq!(
            validate(&r, &RW, MAX_IO_LEN).map(|_| ()),
            Err(Errno::EINVAL)
        );
        r.flags = CommandFlags(1 << 7);
        assert_eq!(
            validate(&r, &RW, MAX_IO_LEN).map(|_| ()),
            Err(Errno::EINVAL)
        );
        let mut z = req(Command::WriteZeroes, 0, 512);
        z.flags = CommandFlags::NO_HOLE | CommandFlags::FUA;
        assert_eq!(validate(&z, &RW, MAX_IO_LEN).map(|_| ()), Ok(()));
    }

    /// ublk describes a request in sectors (a u32 count), so a TRIM may exceed 4 GiB.
    #[test]
    fn neutral_requests_beyond_u32_lengths() {
        let big = Export {
            size: 1 << 40,
            ..RW
        };
        let trim = IoRequest::new(IoOp::Trim, 0, 8 << 30);
        assert_eq!(validate_io(&trim, &big, MAX_IO_LEN), Ok(()));
        let read = IoRequest::new(IoOp::Read, 0, 8 << 30);
        assert_eq!(validate_io(&read, &big, MAX_IO_LEN), Err(Errno::EINVAL));
        let past = IoRequest::new(IoOp::WriteZeroes, 1 << 40, 512);
        assert_eq!(validate_io(&past, &big, MAX_IO_LEN), Err(Errno::ENOSPC));
    }
}
