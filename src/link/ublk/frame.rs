//! ublk's framing, without the kernel: an I/O descriptor to the transport-neutral
//! [`IoRequest`], a dispatch result to the value committed, and an [`Export`] to SET_PARAMS'
//! parameters. Everything else (validation, the device call, errno mapping) is the shared
//! server core's.

use crate::link::Export;
use crate::proto::{Errno, TransmissionFlags as F};
use crate::server::{IoFlags, IoOp, IoRequest, IoResult};

use super::sys::{self, IoDesc, ParamBasic, ParamDiscard, Params};

/// The sector unit of ublk's descriptors and parameters.
pub(crate) const SECTOR: u64 = 512;
/// The largest TRIM or WRITE_ZEROES the kernel is told to send at once, in sectors (1 GiB).
pub(crate) const MAX_DISCARD_SECTORS: u32 = 1 << 21;

/// The request a descriptor asks for, or the errno to commit: ENOTSUP for an operation the
/// server does not serve (WRITE_SAME, zoned operations), EINVAL for a position that overflows.
pub(crate) fn io_request(desc: &IoDesc) -> Result<IoRequest, Errno> {
    let op = (desc.op_flags & 0xff) as u8;
    let flags = desc.op_flags;
    let op = match op {
        sys::OP_READ => IoOp::Read,
        sys::OP_WRITE => IoOp::Write,
        sys::OP_FLUSH => IoOp::Flush,
        sys::OP_DISCARD => IoOp::Trim,
        sys::OP_WRITE_ZEROES => IoOp::WriteZeroes,
        sys::OP_WRITE_SAME => return Err(Errno::ENOTSUP),
        _ => return Err(Errno::ENOTSUP),
    };
    let (offset, len) = if op == IoOp::Flush {
        (0, 0)
    } else {
        let offset = desc.start_sector.checked_mul(SECTOR).ok_or(Errno::EINVAL)?;
        (offset, u64::from(desc.nr_sectors) * SECTOR)
    };
    let mut req = IoRequest::new(op, offset, len);
    if flags & sys::IO_F_FUA != 0 {
        req = req.with(IoFlags::FUA);
    }
    if op == IoOp::WriteZeroes && flags & sys::IO_F_NOUNMAP != 0 {
        req = req.with(IoFlags::NO_HOLE);
    }
    Ok(req)
}

/// The value COMMIT_AND_FETCH_REQ carries for a request's outcome: the bytes moved for READ
/// and WRITE (the kernel fails a READ that reports 0), 0 for the others, or `-errno`.
pub(crate) fn commit_value(op: Option<IoOp>, result: IoResult) -> i32 {
    match result {
        Ok(n) if op.is_some_and(IoOp::has_data) => {
            i32::try_from(n).unwrap_or(-(Errno::EIO.0 as i32))
        }
        Ok(_) => 0,
        Err(e) => -(i32::try_from(e.0).unwrap_or(nix::libc::EIO)),
    }
}

/// SET_PARAMS' parameters for `export`, with requests of at most `max_io_bytes`: the logical
/// (and physical) block size, the size, read-only, rotational, a volatile cache where FLUSH is
/// served (and FUA where the device has it), discard and write-zeroes limits where served.
pub(crate) fn params(export: &Export, max_io_bytes: u32) -> Params {
    let flags = export.flags;
    let shift = export.block_size.max(512).trailing_zeros() as u8;
    let mut attrs = 0;
    if flags.contains(F::READ_ONLY) {
        attrs |= sys::ATTR_READ_ONLY;
    }
    if flags.contains(F::ROTATIONAL) {
        attrs |= sys::ATTR_ROTATIONAL;
    }
    if flags.contains(F::SEND_FLUSH) {
        attrs |= sys::ATTR_VOLATILE_CACHE;
        if flags.contains(F::SEND_FUA) {
            attrs |= sys::ATTR_FUA;
        }
    }
    let mut types = sys::PARAM_TYPE_BASIC;
    let trim = flags.contains(F::SEND_TRIM);
    let zeroes = flags.contains(F::SEND_WRITE_ZEROES);
    let discard = if trim || zeroes {
        types |= sys::PARAM_TYPE_DISCARD;
        ParamDiscard {
            discard_alignment: 0,
            discard_granularity: export.block_size,
            max_discard_sectors: if trim { MAX_DISCARD_SECTORS } else { 0 },
            max_write_zeroes_sectors: if zeroes { MAX_DISCARD_SECTORS } else { 0 },
            max_discard_segments: 1,
            reserved0: 0,
        }
    } else {
        ParamDiscard::default()
    };
    Params {
        len: size_of::<Params>() as u32,
        types,
        basic: ParamBasic {
            attrs,
            logical_bs_shift: shift,
            physical_bs_shift: shift,
            io_opt_shift: shift,
            io_min_shift: shift,
            max_sectors: max_io_bytes / SECTOR as u32,
            chunk_sectors: 0,
            dev_sectors: export.size / SECTOR,
            virt_boundary_mask: 0,
        },
        discard,
        ..Params::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(op: u8, flags: u32, sector: u64, sectors: u32) -> IoDesc {
        IoDesc {
            op_flags: u32::from(op) | flags,
            nr_sectors: sectors,
            start_sector: sector,
            addr: 0x7f00_0000_0000,
        }
    }

    #[test]
    fn descriptors_become_requests() {
        assert_eq!(
            io_request(&desc(sys::OP_READ, 0, 8, 8)),
            Ok(IoRequest::new(IoOp::Read, 4096, 4096))
        );
        assert_eq!(
            io_request(&desc(sys::OP_WRITE, sys::IO_F_FUA, 1, 1)),
            Ok(IoRequest::new(IoOp::Write, 512, 512).with(IoFlags::FUA))
        );
        // A flush carries no range, whatever the descriptor's other fields hold.
        assert_eq!(
            io_request(&desc(sys::OP_FLUSH, 0, 77, 3)),
            Ok(IoRequest::new(IoOp::Flush, 0, 0))
        );
        assert_eq!(
            io_request(&desc(sys::OP_DISCARD, 0, 0, 1 << 21)),
            Ok(IoRequest::new(IoOp::Trim, 0, 1 << 30))
        );
        assert_eq!(
            io_request(&desc(sys::OP_WRITE_ZEROES, sys::IO_F_NOUNMAP, 2, 2)),
            Ok(IoRequest::new(IoOp::WriteZeroes, 1024, 1024).with(IoFlags::NO_HOLE))
        );
        // NOUNMAP means nothing on a WRITE: dropped, not an error.
        assert_eq!(
            io_request(&desc(sys::OP_WRITE, sys::IO_F_NOUNMAP, 0, 1)),
            Ok(IoRequest::new(IoOp::Write, 0, 512))
        );
        assert_eq!(
            io_request(&desc(sys::OP_WRITE_SAME, 0, 0, 1)),
            Err(Errno::ENOTSUP)
        );
        assert_eq!(io_request(&desc(13, 0, 0, 1)), Err(Errno::ENOTSUP));
        assert_eq!(
            io_request(&desc(sys::OP_READ, 0, u64::MAX, 1)),
            Err(Errno::EINVAL)
        );
    }

    #[test]
    fn results_become_commit_values() {
        assert_eq!(commit_value(Some(IoOp::Read), Ok(4096)), 4096);
        assert_eq!(commit_value(Some(IoOp::Flush), Ok(0)), 0);
        assert_eq!(commit_value(Some(IoOp::Trim), Ok(0)), 0);
        assert_eq!(commit_value(Some(IoOp::Write), Err(Errno::ENOSPC)), -28);
        assert_eq!(commit_value(None, Err(Errno::ENOTSUP)), -95);
    }

    #[test]
    fn params_follow_the_export() {
        let export = Export {
            size: 1 << 30,
            block_size: 4096,
            flags: F::SEND_FLUSH | F::SEND_FUA | F::SEND_TRIM | F::READ_ONLY,
        };
        let p = params(&export, 512 << 10);
        assert_eq!(p.len, 112);
        assert_eq!(p.types, sys::PARAM_TYPE_BASIC | sys::PARAM_TYPE_DISCARD);
        assert_eq!(p.basic.logical_bs_shift, 12);
        assert_eq!(p.basic.dev_sectors, (1 << 30) / 512);
        assert_eq!(p.basic.max_sectors, 1024);
        assert_eq!(
            p.basic.attrs,
            sys::ATTR_READ_ONLY | sys::ATTR_VOLATILE_CACHE | sys::ATTR_FUA
        );
        assert_eq!(p.discard.max_discard_sectors, MAX_DISCARD_SECTORS);
        assert_eq!(p.discard.max_write_zeroes_sectors, 0);
        assert_eq!(p.discard.discard_granularity, 4096);
        assert_eq!(p.discard.max_discard_segments, 1);
        // No flush: no volatile cache, and FUA alone is not claimed; no discard type at all.
        let plain = Export {
            size: 1 << 20,
            block_size: 512,
            flags: F::SEND_FUA,
        };
        let p = params(&plain, 1 << 20);
        assert_eq!(p.basic.attrs, 0);
        assert_eq!(p.types, sys::PARAM_TYPE_BASIC);
        assert_eq!(p.basic.logical_bs_shift, 9);
    }
}
