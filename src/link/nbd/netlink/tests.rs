//! The netlink messages, byte for byte, and the parsing of the kernel's replies.

use super::*;

#[test]
fn get_family_request_bytes() {
    #[rustfmt::skip]
    let want: &[u8] = &[
        0x1c, 0x00, 0x00, 0x00, // nlmsg_len 28
        0x10, 0x00,             // nlmsg_type GENL_ID_CTRL
        0x05, 0x00,             // flags REQUEST | ACK
        0x07, 0x00, 0x00, 0x00, // seq 7
        0x00, 0x00, 0x00, 0x00, // pid 0 (the kernel fills it in)
        0x03,                   // cmd CTRL_CMD_GETFAMILY
        0x01,                   // version 1
        0x00, 0x00,             // reserved
        0x08, 0x00,             // nla_len 8 (4 header + "nbd\0")
        0x02, 0x00,             // nla_type CTRL_ATTR_FAMILY_NAME
        b'n', b'b', b'd', 0x00, // "nbd", NUL-terminated, already 4-aligned
    ];
    assert_eq!(get_family_request(7, "nbd"), Ok(want.to_vec()));
}

#[test]
fn connect_request_bytes() {
    let req = ConnectRequest {
        index: Some(3),
        size: 64 << 20,
        block_size: 4096,
        flags: 0x10d,
        timeout: Some(30),
        dead_conn_timeout: None,
        fds: vec![5, 6],
    };
    let bytes = encode_request(
        0x1a,
        1,
        NbdCmd::Connect as u8,
        NBD_GENL_VERSION,
        &req.attrs(),
    )
    .unwrap();
    #[rustfmt::skip]
    let want: &[u8] = &[
        0x68, 0x00, 0x00, 0x00, // nlmsg_len 104
        0x1a, 0x00,             // nlmsg_type: the nbd family's id
        0x05, 0x00,             // flags REQUEST | ACK
        0x01, 0x00, 0x00, 0x00, // seq 1
        0x00, 0x00, 0x00, 0x00, // pid
        0x01, 0x01, 0x00, 0x00, // cmd CONNECT, version 1, reserved
        0x08, 0x00, 0x01, 0x00, // NBD_ATTR_INDEX, 8 bytes
        0x03, 0x00, 0x00, 0x00, //   3
        0x0c, 0x00, 0x02, 0x00, // NBD_ATTR_SIZE_BYTES, 12 bytes
        0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, // 64 MiB
        0x0c, 0x00, 0x03, 0x00, // NBD_ATTR_BLOCK_SIZE_BYTES
        0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // 4096
        0x0c, 0x00, 0x05, 0x00, // NBD_ATTR_SERVER_FLAGS
        0x0d, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // HAS_FLAGS|SEND_FLUSH|SEND_FUA|CAN_MULTI_CONN
        0x0c, 0x00, 0x04, 0x00, // NBD_ATTR_TIMEOUT
        0x1e, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // 30 s
        0x1c, 0x00, 0x07, 0x00, // NBD_ATTR_SOCKETS, 28 bytes, nested:
        0x0c, 0x00, 0x01, 0x00, //   NBD_SOCK_ITEM, 12 bytes, nested:
        0x08, 0x00, 0x01, 0x00, //     NBD_SOCK_FD
        0x05, 0x00, 0x00, 0x00, //     fd 5
        0x0c, 0x00, 0x01, 0x00, //   NBD_SOCK_ITEM
        0x08, 0x00, 0x01, 0x00, //     NBD_SOCK_FD
        0x06, 0x00, 0x00, 0x00, //     fd 6
    ];
    assert_eq!(bytes, want);
}

#[test]
fn reconfigure_request_bytes() {
    let req = ReconfigureRequest {
        index: 0,
        timeout: None,
        dead_conn_timeout: Some(60),
        fds: vec![9],
    };
    let bytes = encode_request(
        0x1a,
        2,
        NbdCmd::Reconfigure as u8,
        NBD_GENL_VERSION,
        &req.attrs(),
    )
    .unwrap();
    #[rustfmt::skip]
    let want: &[u8] = &[
        0x38, 0x00, 0x00, 0x00, // nlmsg_len 56
        0x1a, 0x00,             // the nbd family's id
        0x05, 0x00,             // flags REQUEST | ACK
        0x02, 0x00, 0x00, 0x00, // seq 2
        0x00, 0x00, 0x00, 0x00, // pid
        0x03, 0x01, 0x00, 0x00, // cmd RECONFIGURE, version 1, reserved
        0x08, 0x00, 0x01, 0x00, // NBD_ATTR_INDEX
        0x00, 0x00, 0x00, 0x00, //   0
        0x0c, 0x00, 0x08, 0x00, // NBD_ATTR_DEAD_CONN_TIMEOUT (no SIZE_BYTES: it would resize)
        0x3c, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // 60 s
        0x10, 0x00, 0x07, 0x00, // NBD_ATTR_SOCKETS, 16 bytes, nested:
        0x0c, 0x00, 0x01, 0x00, //   NBD_SOCK_ITEM
        0x08, 0x00, 0x01, 0x00, //     NBD_SOCK_FD
        0x09, 0x00, 0x00, 0x00, //     fd 9
    ];
    assert_eq!(bytes, want);
}

#[test]
fn parses_family_reply() {
    #[rustfmt::skip]
    let datagram: &[u8] = &[
        0x24, 0x00, 0x00, 0x00, // nlmsg_len 36
        0x10, 0x00, 0x00, 0x00, // GENL_ID_CTRL, flags 0
        0x01, 0x00, 0x00, 0x00, // seq 1
        0x99, 0x00, 0x00, 0x00, // pid
        0x01, 0x02, 0x00, 0x00, // cmd NEWFAMILY, version 2
        0x06, 0x00, 0x01, 0x00, // CTRL_ATTR_FAMILY_ID, 6 bytes
        0x1a, 0x00, 0x00, 0x00, //   0x1a, then 2 bytes padding
        0x08, 0x00, 0x02, 0x00, // CTRL_ATTR_FAMILY_NAME
        b'n', b'b', b'd', 0x00, //   "nbd"
    ];
    let msgs = parse_messages(datagram).unwrap();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].kind, GENL_ID_CTRL);
    assert_eq!(parse_family_id(msgs[0].payload), Ok(0x1a));
}

#[test]
fn collects_reply_then_ack() {
    #[rustfmt::skip]
    let datagram: &[u8] = &[
        // The CONNECT reply.
        0x1c, 0x00, 0x00, 0x00, // nlmsg_len 28
        0x1a, 0x00, 0x00, 0x00, // nbd family
        0x04, 0x00, 0x00, 0x00, // seq 4
        0x00, 0x00, 0x00, 0x00, // pid
        0x01, 0x01, 0x00, 0x00, // cmd CONNECT, version 1
        0x08, 0x00, 0x01, 0x00, // NBD_ATTR_INDEX
        0x02, 0x00, 0x00, 0x00, //   nbd2
        // The acknowledgement.
        0x24, 0x00, 0x00, 0x00, // nlmsg_len 36
        0x02, 0x00, 0x00, 0x01, // NLMSG_ERROR, flags NLM_F_CAPPED
        0x04, 0x00, 0x00, 0x00, // seq 4
        0x00, 0x00, 0x00, 0x00, // pid
        0x00, 0x00, 0x00, 0x00, // error 0: success
        0x6c, 0x00, 0x00, 0x00, // the request's header, echoed
        0x1a, 0x00, 0x05, 0x00,
        0x04, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00,
    ];
    let mut c = Collector::default();
    let Some(Outcome::Ok(replies)) = c.feed(4, datagram).unwrap() else {
        panic!("no outcome");
    };
    assert_eq!(replies.len(), 1);
    assert_eq!(parse_connect_reply(&replies[0]), Ok(2));
}

#[test]
fn error_reply_carries_positive_errno() {
    #[rustfmt::skip]
    let datagram: &[u8] = &[
        0x24, 0x00, 0x00, 0x00, // nlmsg_len 36
        0x02, 0x00, 0x00, 0x01, // NLMSG_ERROR
        0x09, 0x00, 0x00, 0x00, // seq 9
        0x00, 0x00, 0x00, 0x00, // pid
        0xf0, 0xff, 0xff, 0xff, // error -16 (EBUSY)
        0x1c, 0x00, 0x00, 0x00, // echoed header
        0x1a, 0x00, 0x05, 0x00,
        0x09, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00,
    ];
    let mut c = Collector::default();
    assert_eq!(
        c.feed(8, datagram).unwrap(),
        None,
        "other sequence numbers are ignored"
    );
    assert_eq!(c.feed(9, datagram).unwrap(), Some(Outcome::Errno(16)));
}

#[test]
fn parses_status_list() {
    #[rustfmt::skip]
    let payload: &[u8] = &[
        0x05, 0x01, 0x00, 0x00, // cmd STATUS, version 1
        0x2c, 0x00, 0x09, 0x00, // NBD_ATTR_DEVICE_LIST, 44 bytes
        0x14, 0x00, 0x01, 0x00, //   NBD_DEVICE_ITEM, 20 bytes (padding included)
        0x08, 0x00, 0x01, 0x00, //     NBD_DEVICE_INDEX
        0x00, 0x00, 0x00, 0x00, //     0
        0x05, 0x00, 0x02, 0x00, //     NBD_DEVICE_CONNECTED, 5 bytes
        0x01, 0x00, 0x00, 0x00, //     1, then padding
        0x14, 0x00, 0x01, 0x80, //   NBD_DEVICE_ITEM with NLA_F_NESTED set
        0x08, 0x00, 0x01, 0x00, //     NBD_DEVICE_INDEX
        0x01, 0x00, 0x00, 0x00, //     1
        0x05, 0x00, 0x02, 0x00, //     NBD_DEVICE_CONNECTED
        0x00, 0x00, 0x00, 0x00, //     0
    ];
    assert_eq!(
        parse_status_reply(payload),
        Ok(vec![
            DeviceStatus {
                index: 0,
                connected: true
            },
            DeviceStatus {
                index: 1,
                connected: false
            },
        ])
    );
}

#[test]
fn malformed_input_is_an_error_not_a_panic() {
    assert_eq!(
        parse_messages(&[0x30, 0, 0, 0, 0x10, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]),
        Err(DecodeError::Malformed(0)),
        "nlmsg_len beyond the datagram"
    );
    assert_eq!(
        parse_messages(&[0x02, 0, 0, 0, 0x10, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]),
        Err(DecodeError::Malformed(0)),
        "nlmsg_len below the header"
    );
    assert_eq!(
        parse_attrs(&[0x02, 0, 1, 0]),
        Err(DecodeError::Malformed(0))
    );
    assert_eq!(
        parse_attrs(&[0x09, 0, 1, 0, 0]),
        Err(DecodeError::Malformed(0))
    );
    assert_eq!(genl_attrs(&[1, 1]), Err(DecodeError::Malformed(0)));
    assert_eq!(
        parse_connect_reply(&[1, 1, 0, 0]),
        Err(DecodeError::MissingAttr(attr::INDEX))
    );
    for n in 0..64 {
        let junk: Vec<u8> = (0..n).map(|i| (i * 37 + n) as u8).collect();
        let _ = parse_messages(&junk);
        let _ = parse_attrs(&junk);
        let _ = parse_status_reply(&junk);
    }
}

/// Found by the `netlink_encode` fuzz target: a CONNECT for 7,087 connections overflowed the
/// SOCKETS attribute's 16-bit length, which was clamped to 65,535, and the kernel would have
/// read the rest of the list as other attributes. Now the request is refused before sending.
#[test]
fn a_socket_list_beyond_netlinks_lengths_is_refused() {
    let req = |n: u32| ConnectRequest {
        index: None,
        size: 1 << 20,
        block_size: 512,
        flags: 1,
        timeout: None,
        dead_conn_timeout: None,
        fds: (0..n).collect(),
    };
    // 4 header bytes + 12 per socket: 5,460 fit in 65,535, 5,461 do not.
    let fits = encode_request(0x1a, 1, 1, 1, &req(5460).attrs()).unwrap();
    let msgs = parse_messages(&fits).unwrap();
    let attrs = genl_attrs(msgs[0].payload).unwrap();
    let socks = attrs.iter().find(|(k, _)| *k == attr::SOCKETS).unwrap().1;
    assert_eq!(parse_attrs(socks).unwrap().len(), 5460);
    assert_eq!(
        encode_request(0x1a, 1, 1, 1, &req(7087).attrs()),
        Err(EncodeError::AttrTooLong {
            kind: attr::SOCKETS,
            len: 4 + 12 * 7087
        })
    );
    let long_name = "n".repeat(70_000);
    assert!(matches!(
        get_family_request(1, &long_name),
        Err(EncodeError::AttrTooLong { kind: 2, .. })
    ));
}

/// Found by the `netlink` fuzz target: an NLMSG_ERROR carrying a positive value became a
/// negative "errno". Only 0 and -1 ..= -4095 are meaningful; anything else is malformed.
#[test]
fn an_error_value_that_is_no_errno_is_malformed() {
    let ack = |error: i32| {
        let mut d = vec![0x24, 0, 0, 0, 0x02, 0, 0, 0, 0x09, 0, 0, 0, 0, 0, 0, 0];
        d.extend_from_slice(&error.to_ne_bytes());
        d.extend_from_slice(&[0; 16]);
        d
    };
    let mut c = Collector::default();
    assert_eq!(c.feed(9, &ack(-4095)), Ok(Some(Outcome::Errno(4095))));
    for bad in [1, 0x4d00, -4096, i32::MIN] {
        assert_eq!(
            Collector::default().feed(9, &ack(bad)),
            Err(DecodeError::BadErrno(bad)),
            "{bad}"
        );
    }
}
