//! Structured replies and block status through userblk's network server, checked by the
//! harness's strict client: READ data and holes, error chunks, `base:allocation` extents from
//! `FileDevice` (SEEK_DATA/SEEK_HOLE) and from a device that reports nonsense, `REQ_ONE`, and
//! the same suite with simple replies only.

use std::io;
use std::sync::Arc;

use userblk::link::net::wire::{STATE_HOLE, STATE_ZERO};
use userblk::link::net::{ListenAddr, Listening, NetOptions};
use userblk::{BlockDevice, Capabilities, Extent, FileDevice, MemDevice};
use userblk_harness::conformance;
use userblk_harness::net_rig::{ClientError, NbdClient, NbdUri, NetRig, NetTransport};

fn serve(dev: impl BlockDevice + 'static) -> (Listening, NbdUri) {
    let addr = ListenAddr::Tcp(([127, 0, 0, 1], 0).into());
    let l = NetOptions::new()
        .on_event(|_| {})
        .spawn(dev, &addr)
        .unwrap();
    let ListenAddr::Tcp(a) = l.local_addr().clone() else {
        unreachable!()
    };
    let uri = format!("nbd://{a}/").parse().unwrap();
    (l, uri)
}

/// (offset, length, flags) of each extent from `offset` to `end`, asking as often as needed.
fn map(c: &NbdClient, mut offset: u64, end: u64) -> Vec<(u64, u64, u32)> {
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    while offset < end {
        let len = (end - offset).min(1 << 30) as u32;
        let ext = c.block_status(offset, len, false).unwrap();
        assert!(!ext.is_empty());
        for e in ext {
            match out.last_mut() {
                Some(last) if last.2 == e.flags => last.1 += u64::from(e.len),
                _ => out.push((offset, u64::from(e.len), e.flags)),
            }
            offset += u64::from(e.len);
        }
    }
    out
}

#[test]
fn file_device_map_follows_writes_trims_and_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let dev = FileDevice::create(dir.path().join("disk.img"), 8 << 20).unwrap();
    let (listening, uri) = serve(dev);
    let c = NbdClient::connect(&uri).unwrap();
    assert!(c.info().structured_replies);
    assert!(c.info().base_allocation.is_some());
    let all = map(&c, 0, 8 << 20);
    if all.len() == 1 && all[0].2 == 0 {
        eprintln!("SKIPPED: this file system reports no holes");
        return;
    }
    assert_eq!(all, [(0, 8 << 20, STATE_HOLE | STATE_ZERO)]);
    c.write(1 << 20, &vec![0xab; 1 << 20], false).unwrap();
    c.write(4 << 20, &vec![0xcd; 2 << 20], false).unwrap();
    c.trim(4 << 20, 1 << 20).unwrap();
    let hz = STATE_HOLE | STATE_ZERO;
    assert_eq!(
        map(&c, 0, 8 << 20),
        [
            (0, 1 << 20, hz),
            (1 << 20, 1 << 20, 0),
            (2 << 20, 3 << 20, hz),
            (5 << 20, 1 << 20, 0),
            (6 << 20, 2 << 20, hz),
        ]
    );
    // REQ_ONE: exactly one extent, within the request.
    let one = c.block_status(1 << 20, 4 << 20, true).unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!((one[0].len, one[0].flags), (1 << 20, 0));
    // Past the end, or misaligned: EINVAL, and the connection goes on.
    for (o, l) in [((8 << 20) - 512, 1024u32), (8 << 20, 512), (100, 512)] {
        match c.block_status(o, l, false) {
            Err(ClientError::Errno { errno: 22, .. }) => {}
            other => panic!("block status {o}+{l}: {other:?}"),
        }
    }
    // A READ of a hole and of data, across both: the bytes are right.
    let got = c.read((2 << 20) - 4096, 8192).unwrap();
    assert!(got[..4096].iter().all(|&b| b == 0xab));
    assert!(got[4096..].iter().all(|&b| b == 0));
    c.disconnect().unwrap();
    listening.stop().unwrap();
}

/// Reports extents that are empty, overlong and unaligned, and fails reads at 1 MiB.
struct Nonsense(MemDevice);

impl BlockDevice for Nonsense {
    fn blocks(&self) -> u64 {
        self.0.blocks()
    }
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if offset == 1 << 20 {
            return Err(io::Error::from_raw_os_error(5)); // EIO
        }
        self.0.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write(offset, data)
    }
    fn block_status(&self, offset: u64, _len: u64) -> io::Result<Vec<Extent>> {
        match offset {
            0 => Ok(vec![
                Extent::hole(0),
                Extent::hole(4096),
                Extent::hole(4096),
                Extent::data(u64::MAX),
            ]),
            4096 => Ok(Vec::new()),
            8192 => panic!("block status panics"),
            _ => Err(io::Error::from_raw_os_error(28)),
        }
    }
}

#[test]
fn device_extents_are_sanitised_and_errors_become_error_chunks() {
    let (listening, uri) = serve(Nonsense(MemDevice::new(4 << 20)));
    let c = NbdClient::connect(&uri).unwrap();
    // Empty extents dropped, equal neighbours merged, the overlong one cut at the request.
    let e = c.block_status(0, 1 << 20, false).unwrap();
    let got: Vec<(u32, u32)> = e.iter().map(|e| (e.len, e.flags)).collect();
    assert_eq!(
        got,
        [(8192, STATE_HOLE | STATE_ZERO), ((1 << 20) - 8192, 0)]
    );
    // Nothing reported: the whole range as data.
    let e = c.block_status(4096, 8192, false).unwrap();
    assert_eq!((e.len(), e[0].len, e[0].flags), (1, 8192, 0));
    // A panic and an error: error chunks (EIO, ENOSPC), and serving goes on.
    assert!(matches!(
        c.block_status(8192, 512, false),
        Err(ClientError::Errno { errno: 5, .. })
    ));
    assert!(matches!(
        c.block_status(1 << 20, 512, false),
        Err(ClientError::Errno { errno: 28, .. })
    ));
    // A failed READ is an error chunk, never a simple reply.
    assert!(matches!(
        c.read(1 << 20, 4096),
        Err(ClientError::Errno { errno: 5, .. })
    ));
    c.write(0, &[1; 4096], false).unwrap();
    assert_eq!(c.read(0, 4096).unwrap(), vec![1; 4096]);
    c.disconnect().unwrap();
    listening.stop().unwrap();
}

#[test]
fn block_status_without_negotiation_is_refused() {
    use std::io::{Read, Write};
    use userblk::link::net::wire::{self, ChunkHeader, InfoRequest, Opt, OptionReplyHeader, Rep};
    use userblk::proto::{Command, Cookie, Request};

    let (listening, uri) = serve(Arc::new(MemDevice::new(1 << 20)));
    let userblk_harness::net_rig::NbdAddr::Tcp { host, port } = &uri.addr else {
        unreachable!()
    };
    let mut s = std::net::TcpStream::connect((host.as_str(), *port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut greeting = [0u8; wire::GREETING_LEN];
    s.read_exact(&mut greeting).unwrap();
    // Structured replies, no meta context, GO.
    let mut hs = wire::FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    hs.extend(wire::encode_option(Opt::STRUCTURED_REPLY, &[]));
    let go = InfoRequest {
        name: String::new(),
        requests: vec![],
    };
    hs.extend(wire::encode_option(Opt::GO, &go.encode()));
    s.write_all(&hs).unwrap();
    loop {
        let mut h = [0u8; wire::OPTION_REPLY_HEADER_LEN];
        s.read_exact(&mut h).unwrap();
        let h = OptionReplyHeader::parse(&h).unwrap();
        let mut data = vec![0u8; h.len as usize];
        s.read_exact(&mut data).unwrap();
        if (h.option, h.reply) == (Opt::GO, Rep::ACK) {
            break;
        }
    }
    let req = Request::new(Command::BlockStatus, Cookie(0xb5), 0, 512);
    s.write_all(&req.encode()).unwrap();
    let mut h = [0u8; wire::CHUNK_HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    let h = ChunkHeader::parse(&h).unwrap();
    let mut payload = vec![0u8; h.len as usize];
    s.read_exact(&mut payload).unwrap();
    assert_eq!((h.kind, h.cookie), (wire::chunk::ERROR, 0xb5));
    assert_eq!(payload[..4], 22u32.to_be_bytes()); // EINVAL
    drop(s);
    listening.stop().unwrap();
}

#[test]
fn conformance_with_simple_replies_only() {
    let mut rig = NetRig::new(NetTransport::Unix);
    rig.client.structured_replies = false;
    // Re-openable and crashable RAM, so the durability cases run too.
    let factory = userblk_harness::factory::mem(64 << 20);
    let report = conformance::run_all(&rig, &factory, MemDevice::new(1 << 20).capabilities());
    assert!(report.all_passed(), "{report}");
}
