//! The generic netlink reply parser of the NBD link (`src/link/nbd/netlink.rs`, through the
//! hidden `userblk::link::nbd::fuzzing` entry points): datagrams from the kernel split into
//! messages and attributes that stay inside the datagram, or fail with a typed error; the
//! collector of a request's answer stops at the first acknowledgement or error of its sequence
//! number and ignores other sequence numbers.

#![no_main]

use libfuzzer_sys::fuzz_target;
use userblk::link::nbd::fuzzing::{self, Collected};

/// `NLMSG_ERROR`, `NLMSG_DONE`.
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

fn within(outer: &[u8], inner: &[u8]) -> bool {
    let (o, i) = (outer.as_ptr() as usize, inner.as_ptr() as usize);
    i >= o && i + inner.len() <= o + outer.len()
}

fuzz_target!(|data: &[u8]| {
    // The first 4 bytes are the request's sequence number; the rest is split into datagrams at
    // each occurrence of the separator "DGRM", as successive `recv`s would return them.
    let (seq, body) = match data {
        [a, b, c, d, rest @ ..] => (u32::from_ne_bytes([*a, *b, *c, *d]), rest),
        _ => return,
    };
    let datagrams: Vec<&[u8]> = split(body, b"DGRM");
    for d in &datagrams {
        let Some(msgs) = fuzzing::messages(d) else {
            continue;
        };
        for (kind, _seq, payload) in msgs {
            assert!(within(d, payload));
            if kind == NLMSG_ERROR || kind == NLMSG_DONE {
                continue;
            }
            // Every reply parser, on every message: none may panic or read outside it.
            let _ = fuzzing::family_id(payload);
            let _ = fuzzing::connect_reply(payload);
            let _ = fuzzing::status_reply(payload);
            if let Some(attrs) = payload.get(4..).and_then(fuzzing::attrs) {
                for (kind, value) in attrs {
                    assert!(kind <= 0x3fff, "flag bits left in type {kind:#x}");
                    assert!(within(payload, value));
                    let _ = fuzzing::attrs(value);
                }
            }
        }
    }
    match fuzzing::collect(seq, datagrams.iter().copied()) {
        Collected::Errno(e) => assert!(e > 0, "errno {e} must be positive"),
        Collected::Ok(replies) => {
            // Only messages of this sequence number, and none that ends a request, are kept.
            for r in &replies {
                assert!(datagrams.iter().any(|d| fuzzing::messages(d)
                    .unwrap_or_default()
                    .iter()
                    .any(|(k, s, p)| *s == seq
                        && *k != NLMSG_ERROR
                        && *k != NLMSG_DONE
                        && p == r)));
            }
        }
        Collected::Pending | Collected::Malformed => {}
    }
});

fn split<'a>(mut b: &'a [u8], sep: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    while let Some(i) = b.windows(sep.len()).position(|w| w == sep) {
        out.push(&b[..i]);
        b = &b[i + sep.len()..];
    }
    out.push(b);
    out
}
