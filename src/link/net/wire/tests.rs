//! Tests of the handshake wire format: fixtures with a comment per field, round trips, and parsers fed random bytes.

use super::*;
use proptest::prelude::*;

#[rustfmt::skip]
const GO_DEFAULT_EXPORT: [u8; 26] = [
    0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, // IHAVEOPT
    0x00, 0x00, 0x00, 0x07,                         // NBD_OPT_GO
    0x00, 0x00, 0x00, 0x0a,                         // 10 bytes of data
    0x00, 0x00, 0x00, 0x00,                         // name length 0: the default export
    0x00, 0x02,                                     // two information requests
    0x00, 0x03,                                     // NBD_INFO_BLOCK_SIZE
    0x00, 0x01,                                     // NBD_INFO_NAME
];

#[rustfmt::skip]
const INFO_EXPORT_REPLY: [u8; 32] = [
    0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, // option reply magic
    0x00, 0x00, 0x00, 0x07,                         // NBD_OPT_GO
    0x00, 0x00, 0x00, 0x03,                         // NBD_REP_INFO
    0x00, 0x00, 0x00, 0x0c,                         // 12 bytes
    0x00, 0x00,                                     // NBD_INFO_EXPORT
    0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, // size 1 MiB
    0x01, 0x0d,                                     // HAS_FLAGS SEND_FLUSH SEND_FUA MULTI_CONN
];

#[test]
fn go_option_fixture() {
    let h = OptionHeader::parse(&GO_DEFAULT_EXPORT).unwrap();
    assert_eq!(
        h,
        OptionHeader {
            option: Opt::GO,
            len: 10
        }
    );
    let req = InfoRequest::parse(&GO_DEFAULT_EXPORT[16..]).unwrap();
    assert_eq!(req.name, "");
    assert_eq!(req.requests, [info::BLOCK_SIZE, info::NAME]);
    assert_eq!(encode_option(Opt::GO, &req.encode()), GO_DEFAULT_EXPORT);
}

#[test]
fn info_export_reply_fixture() {
    let export = Info::Export(ExportData {
        size: 1 << 20,
        flags: TransmissionFlags(0x10d),
    });
    let bytes = encode_option_reply(Opt::GO, Rep::INFO, &export.encode());
    assert_eq!(bytes, INFO_EXPORT_REPLY);
    let h = OptionReplyHeader::parse(&bytes).unwrap();
    assert_eq!((h.option, h.reply, h.len), (Opt::GO, Rep::INFO, 12));
    assert_eq!(Info::parse(&bytes[20..]).unwrap(), export);
}

#[test]
fn greeting_round_trips_and_names_a_bad_magic() {
    let g = encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(parse_greeting(&g), Ok(3));
    let mut old = g;
    old[8..16].copy_from_slice(&0x0000_4202_8186_1253_u64.to_be_bytes());
    assert!(matches!(
        parse_greeting(&old),
        Err(WireError::BadMagic {
            what: "IHAVEOPT",
            ..
        })
    ));
}

#[test]
fn info_request_lengths_must_agree() {
    // Name length larger than the data.
    let mut d = vec![0, 0, 0, 9, 0, 0];
    assert!(matches!(InfoRequest::parse(&d), Err(WireError::Invalid(_))));
    // Count says one request but none follows.
    d = vec![0, 0, 0, 0, 0, 1];
    assert!(InfoRequest::parse(&d).is_err());
    // A NUL in the name.
    d = vec![0, 0, 0, 1, 0, 0, 0];
    assert!(InfoRequest::parse(&d).is_err());
    assert!(InfoRequest::parse(&[0; 5]).is_err());
}

#[test]
fn meta_context_request_round_trips_and_rejects_overruns() {
    let req = MetaContextRequest {
        name: "disk".into(),
        queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:x".into()],
    };
    assert_eq!(MetaContextRequest::parse(&req.encode()).unwrap(), req);
    let mut bytes = req.encode();
    bytes.push(0);
    assert!(MetaContextRequest::parse(&bytes).is_err());
    bytes.truncate(bytes.len() - 2);
    assert!(MetaContextRequest::parse(&bytes).is_err());
}

#[test]
fn chunk_header_round_trips() {
    let h = ChunkHeader {
        flags: REPLY_FLAG_DONE,
        kind: chunk::OFFSET_HOLE,
        cookie: 0x0102_0304_0506_0708,
        len: 12,
    };
    assert_eq!(ChunkHeader::parse(&h.encode()), Ok(h));
    assert_eq!(
        encode_error_chunk(22, "bad"),
        [0, 0, 0, 22, 0, 3, b'b', b'a', b'd']
    );
}

proptest! {
    #[test]
    fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
        let _ = parse_greeting(&bytes);
        let _ = OptionHeader::parse(&bytes);
        let _ = OptionReplyHeader::parse(&bytes);
        let _ = InfoRequest::parse(&bytes);
        let _ = MetaContextRequest::parse(&bytes);
        let _ = Info::parse(&bytes);
        let _ = parse_server_reply(&bytes);
        let _ = parse_meta_context_reply(&bytes);
        let _ = ChunkHeader::parse(&bytes);
    }

    #[test]
    fn info_request_round_trips(name in "[a-z0-9/]{0,40}", requests in proptest::collection::vec(any::<u16>(), 0..8)) {
        let req = InfoRequest { name, requests };
        prop_assert_eq!(InfoRequest::parse(&req.encode()), Ok(req));
    }
}
