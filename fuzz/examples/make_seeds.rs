//! Writes the seed corpora in `fuzz/seeds/<target>/seed-*` from the project's tests and shipped
//! traces, small enough to keep in the repository:
//!
//! ```sh
//! cargo +nightly run --manifest-path fuzz/Cargo.toml --example make_seeds
//! ```
//!
//! Scripts come from `harness/tests/scripts`; traces are the first ops of each shipped
//! `harness/traces/*.ubt` (re-encoded, a few KiB each) plus a cut-off file; request streams,
//! headers and netlink datagrams are the fixtures of the unit and malformed-input tests; handshakes
//! are the option sequences libnbd's tools and qemu send (as `harness/tests/net_hostile.rs` plays
//! them).

use std::fs;
use std::path::{Path, PathBuf};

use userblk::link::net::wire::{self, InfoRequest, MetaContextRequest, Opt};
use userblk::proto::{encode_request, Command, CommandFlags, Cookie, Reply, Request};
use userblk_harness::trace::{OpKind, Trace};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn put(target: &str, name: &str, bytes: &[u8]) {
    let dir = root().join("seeds").join(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
}

fn req(command: Command, cookie: u64, offset: u64, len: u32) -> Request {
    Request::new(command, Cookie(cookie), offset, len)
}

/// Requests with their payloads, as one stream.
fn stream(reqs: &[(Request, usize)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (r, payload) in reqs {
        out.extend_from_slice(&r.encode());
        out.extend((0..*payload).map(|i| (i % 251) as u8));
    }
    out
}

fn main() {
    let project = root().join("..");

    // proto: the fixtures of src/proto.rs's tests.
    let mut w = req(Command::Write, 42 << 32 | 7, 1 << 20, 4096);
    w.flags = CommandFlags::FUA;
    put("proto", "write-fua", &w.encode());
    put(
        "proto",
        "flush",
        &req(Command::Flush, 0xdead_beef_0102_0304, 0, 0).encode(),
    );
    put(
        "proto",
        "unknown",
        &encode_request(0x2560_9513, 9, Cookie(1), 0, 0),
    );
    let mut reply = Reply::error(Cookie(42 << 32 | 7), userblk::proto::Errno::EIO)
        .encode()
        .to_vec();
    reply.extend_from_slice(&[0; 12]);
    put("proto", "reply-eio", &reply);

    // server: two option bytes (see the target), then a stream like tests/malformed.rs's.
    let everything = 0b0101_1110; // trim, zeroes, flush+fua, never_blocks
    let ok = stream(&[
        (req(Command::Write, 1, 0, 4096), 4096),
        (req(Command::Read, 2, 0, 4096), 0),
        (req(Command::Flush, 3, 0, 0), 0),
        (req(Command::Trim, 4, 4096, 512), 0),
        (req(Command::WriteZeroes, 5, 8192, 1024), 0),
        (req(Command::Read, 6, 12288, 512), 0),
        (req(Command::Disc, 7, 0, 0), 0),
    ]);
    put(
        "server",
        "ops",
        &[&[everything, 0b0100_0000][..], &ok].concat(),
    );
    put(
        "server",
        "ops-workers",
        &[&[0b0001_1110, 0b0011_0110][..], &ok].concat(),
    );
    let bad = stream(&[
        (req(Command::Read, 1, 1 << 20, 512), 0),
        (req(Command::Write, 2, 100, 512), 512),
        (req(Command::Cache, 3, 0, 512), 0),
        (req(Command::Read, 4, 0, 33 << 20), 0),
    ]);
    let mut bad = [&[0b1000_0001, 0][..], &bad].concat();
    bad.extend_from_slice(&encode_request(0x2560_9513, 9, Cookie(5), 0, 0));
    bad.extend_from_slice(&req(Command::Write, 6, 0, 4096).encode()[..20]);
    put("server", "malformed", &bad);

    // script: the shipped scripts of harness/tests/scripts.
    for name in ["basic", "limits", "malformed", "truncated"] {
        let path = project.join(format!("harness/tests/scripts/{name}.script"));
        put("script", name, &fs::read(path).unwrap());
    }

    // trace: the first ops of each shipped trace, and a file cut short.
    for name in ["ext4-6.1", "ext4-6.12", "fio-6.1", "fio-6.12"] {
        let bytes = fs::read(project.join(format!("harness/traces/{name}.ubt"))).unwrap();
        let trace = Trace::decode(&bytes).unwrap();
        let ops: Vec<_> = trace.ops.iter().take(12).cloned().collect();
        let mut pieces = Vec::new();
        let mut ops_renumbered = Vec::new();
        for mut op in ops {
            if let OpKind::Write { pieces: refs, .. } = &mut op.kind {
                for r in refs.iter_mut() {
                    if let Some(data) = trace.piece(*r) {
                        pieces.push(Box::<[u8]>::from(data));
                        *r = pieces.len() as u32;
                    }
                }
            }
            ops_renumbered.push(op);
        }
        let small = Trace::from_parts(trace.header.clone(), pieces, ops_renumbered).unwrap();
        let file = small.encode();
        put("trace", name, &file);
        // The same as a body (the target's odd first byte): decompressed.
        let body = miniz_oxide::inflate::decompress_to_vec_zlib(&file[12..]).unwrap();
        put(
            "trace",
            &format!("{name}-body"),
            &[&[1u8][..], &body].concat(),
        );
        if name == "fio-6.1" {
            put("trace", "cut-short", &bytes[..600]);
        }
    }

    // netlink: the sequence number (4 bytes) then datagrams split by "DGRM", from the
    // fixtures of src/link/nbd/netlink.rs's tests.
    #[rustfmt::skip]
    let connect_then_ack: &[u8] = &[
        0x1c, 0, 0, 0, 0x1a, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0,
        0x01, 0x01, 0, 0, 0x08, 0, 0x01, 0, 0x02, 0, 0, 0,
        0x24, 0, 0, 0, 0x02, 0, 0, 0x01, 4, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0x6c, 0, 0, 0, 0x1a, 0, 0x05, 0, 4, 0, 0, 0, 0, 0, 0, 0,
    ];
    put(
        "netlink",
        "connect",
        &[&4u32.to_ne_bytes()[..], connect_then_ack].concat(),
    );
    #[rustfmt::skip]
    let status: &[u8] = &[
        0x3c, 0, 0, 0, 0x1a, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0,
        0x05, 0x01, 0, 0, 0x2c, 0, 0x09, 0,
        0x14, 0, 0x01, 0, 0x08, 0, 0x01, 0, 0, 0, 0, 0, 0x05, 0, 0x02, 0, 1, 0, 0, 0,
        0x14, 0, 0x01, 0x80, 0x08, 0, 0x01, 0, 1, 0, 0, 0, 0x05, 0, 0x02, 0, 0, 0, 0, 0,
    ];
    #[rustfmt::skip]
    let ebusy: &[u8] = &[
        0x24, 0, 0, 0, 0x02, 0, 0, 0x01, 9, 0, 0, 0, 0, 0, 0, 0,
        0xf0, 0xff, 0xff, 0xff, 0x1c, 0, 0, 0, 0x1a, 0, 0x05, 0, 9, 0, 0, 0, 0, 0, 0, 0,
    ];
    put(
        "netlink",
        "status-then-ebusy",
        &[&9u32.to_ne_bytes()[..], status, b"DGRM", ebusy].concat(),
    );

    // netlink_encode: option bits, family, seq, then the CONNECT values (see the target).
    let mut enc = vec![0b111, 0x1a, 0, 1, 0, 0, 0, 3, 0, 0, 0];
    enc.extend_from_slice(&(64u64 << 20).to_le_bytes());
    enc.extend_from_slice(&4096u64.to_le_bytes());
    enc.extend_from_slice(&0x10du64.to_le_bytes());
    enc.extend_from_slice(&30u64.to_le_bytes());
    enc.extend_from_slice(&60u64.to_le_bytes());
    enc.extend_from_slice(&2u16.to_le_bytes());
    enc.extend_from_slice(&5u32.to_le_bytes());
    enc.extend_from_slice(b"nbd");
    put("netlink_encode", "connect", &enc);

    // spec: what the README and the CLI tests use.
    for (name, s) in [
        ("ram", "ram:64M"),
        ("file", "file:/tmp/disk.img"),
        ("pattern", "pattern:1G"),
        ("bytes", "ram:4096"),
    ] {
        put("spec", name, s.as_bytes());
    }
    // handshake: four set-up bytes (see the target), then what clients send: libnbd's tools
    // (nbdinfo --map: LIST, STRUCTURED_REPLY, SET_META_CONTEXT base:allocation, GO with
    // BLOCK_SIZE), qemu's and old clients' EXPORT_NAME, TLS required then STARTTLS, and a stop
    // in the middle of the haggling.
    let opt = |o: u32, d: &[u8]| wire::encode_option(Opt(o), d);
    let go = InfoRequest {
        name: String::new(),
        requests: vec![wire::info::BLOCK_SIZE, wire::info::NAME],
    }
    .encode();
    let meta = MetaContextRequest {
        name: String::new(),
        queries: vec![wire::BASE_ALLOCATION.into()],
    }
    .encode();
    let fixed = wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES;
    let client = |setup: [u8; 4], flags: u32, options: &[Vec<u8>]| {
        let mut b = setup.to_vec();
        b.extend(flags.to_be_bytes());
        for o in options {
            b.extend(o);
        }
        b
    };
    let never = [0xff, 0xff];
    let libnbd = [
        opt(3, &[]),
        opt(8, &[]),
        opt(10, &meta),
        opt(9, &meta),
        opt(6, &go),
        opt(7, &go),
    ];
    put(
        "handshake",
        "libnbd",
        &client([0x0c, never[0], never[1], 0], fixed, &libnbd),
    );
    put(
        "handshake",
        "export-name",
        &client([0x08, never[0], never[1], 0], 1, &[opt(1, b"disk")]),
    );
    put(
        "handshake",
        "tls-required",
        &client(
            [0x0e, never[0], never[1], 0],
            fixed,
            &[opt(7, &go), opt(5, &[]), opt(8, &[]), opt(7, &go)],
        ),
    );
    put(
        "handshake",
        "stopping",
        &client([0x04, 0, 40, 0], fixed, &[opt(3, &[]), opt(7, &go), opt(2, &[])]),
    );
    put(
        "handshake",
        "unknown-and-abort",
        &client([0x00, never[0], never[1], 3], fixed, &[opt(42, b"xyz"), opt(2, &[])]),
    );

    println!("seeds written under {}", root().join("seeds").display());
}
