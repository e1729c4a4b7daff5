//! The NBD wire format (`userblk::proto`): any bytes parse as a request header and as a reply
//! header, or fail with the error that names what is wrong; what parses encodes back to exactly
//! the bytes it came from; and the server's validation never lets through a request the device
//! must not see.

#![no_main]

use libfuzzer_sys::fuzz_target;
use userblk::link::Export;
use userblk::proto::{
    Command, CommandFlags, Cookie, Errno, ParseError, Reply, ReplyParseError, Request,
    TransmissionFlags, REPLY_LEN, REPLY_MAGIC, REQUEST_LEN, REQUEST_MAGIC,
};
use userblk::server::validate;

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fuzz_target!(|data: &[u8]| {
    match Request::parse(data) {
        Ok(req) => {
            assert_eq!(req.encode()[..], data[..REQUEST_LEN], "round trip");
            assert_eq!(Request::try_from(data), Ok(req));
            let payload = if req.command == Command::Write {
                req.len as usize
            } else {
                0
            };
            assert_eq!(req.payload_len(), payload);
            check_validation(&req, &data[REQUEST_LEN..]);
        }
        Err(e @ ParseError::ShortHeader { len }) => {
            assert!(len < REQUEST_LEN && len == data.len());
            assert!(e.is_fatal());
        }
        Err(e @ ParseError::BadMagic { magic }) => {
            assert_ne!(magic, REQUEST_MAGIC);
            assert_eq!(magic, be32(data));
            assert!(e.is_fatal());
        }
        Err(e @ ParseError::UnknownCommand { command, cookie }) => {
            assert!(Command::from_wire(command).is_none());
            assert_eq!(u32::from(command), be32(&data[4..]) & 0xffff);
            assert_eq!(cookie, Cookie(be64(&data[8..])));
            // Recoverable: the server answers it and goes on.
            assert!(!e.is_fatal());
        }
    }
    match Reply::parse(data) {
        Ok(reply) => {
            assert_eq!(reply.encode()[..], data[..REPLY_LEN]);
            assert_eq!(reply.errno().is_none(), reply.error == 0);
        }
        Err(ReplyParseError::ShortHeader { len }) => assert!(len < REPLY_LEN),
        Err(ReplyParseError::BadMagic { magic }) => assert_ne!(magic, REPLY_MAGIC),
    }
    if data.len() >= 4 {
        // Any host errno maps into the protocol's set.
        let e = Errno::from_raw_os_error(be32(data) as i32);
        assert_ne!(e.name(), "unknown", "{e:?}");
    }
});

/// The export and limit come from the bytes after the header. Whatever `validate` accepts is
/// what the device may be given: inside the export, aligned, non-empty, advertised.
fn check_validation(req: &Request, rest: &[u8]) {
    let mut b = [0u8; 12];
    let n = rest.len().min(12);
    b[..n].copy_from_slice(&rest[..n]);
    let block_size = 512u32 << (b[0] % 8);
    let size = be64(&b[1..]) / u64::from(block_size) * u64::from(block_size);
    let flags = TransmissionFlags(u16::from(b[9]) | u16::from(b[10] & 1) << 8);
    let max_io = 512u32 << (b[11] % 20);
    let export = Export {
        size,
        block_size,
        flags,
    };
    let Ok(_) = validate(req, &export, max_io) else {
        return;
    };
    let f = export.flags;
    let writes = matches!(
        req.command,
        Command::Write | Command::Trim | Command::WriteZeroes
    );
    assert!(
        !(writes && f.contains(TransmissionFlags::READ_ONLY)),
        "{req:?}"
    );
    assert_eq!(req.flags.unknown(), 0);
    if req.flags.contains(CommandFlags::NO_HOLE) {
        assert_eq!(req.command, Command::WriteZeroes);
    }
    match req.command {
        Command::Disc => {}
        Command::Flush => assert!(f.contains(TransmissionFlags::SEND_FLUSH)),
        Command::Cache | Command::BlockStatus => panic!("never advertised: {req:?}"),
        c => {
            match c {
                Command::Trim => assert!(f.contains(TransmissionFlags::SEND_TRIM)),
                Command::WriteZeroes => {
                    assert!(f.contains(TransmissionFlags::SEND_WRITE_ZEROES))
                }
                _ => assert!(req.len <= max_io),
            }
            assert!(req.len > 0);
            assert_eq!(req.offset % u64::from(block_size), 0);
            assert_eq!(req.len % block_size, 0);
            assert!(!req.exceeds(size), "{req:?} beyond {size}");
        }
    }
}
