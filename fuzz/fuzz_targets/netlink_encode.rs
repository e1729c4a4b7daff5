//! The netlink request builder of the NBD link, round-tripped through its own parser: the
//! CONNECT request for any values (any device index, size, flags, timeouts and number of
//! sockets) and the GETFAMILY request for any name must parse back, with the reply parser, to
//! exactly the attributes that were put in; a request that cannot be encoded must say so
//! rather than send the kernel a malformed message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use userblk::link::nbd::fuzzing;

const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = self.0.len().min(N);
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
}

fn u32_of(v: &[u8]) -> u32 {
    u32::from_ne_bytes(v.try_into().expect("4-byte attribute"))
}

fn u64_of(v: &[u8]) -> u64 {
    u64::from_ne_bytes(v.try_into().expect("8-byte attribute"))
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let [opts] = b.take::<1>();
    let family = b.u16();
    let seq = b.u32();
    let index = (opts & 1 != 0).then(|| b.u32());
    let size = b.u64();
    let block_size = b.u64();
    let flags = b.u64();
    let timeout = (opts & 2 != 0).then(|| b.u64());
    let dead = (opts & 4 != 0).then(|| b.u64());
    // Connection counts up to 8191: past the 5,460 that fit a netlink attribute.
    let n = usize::from(b.u16() % 8192);
    let fd0 = b.u32();
    let fds: Vec<u32> = (0..n as u32).map(|i| fd0.wrapping_add(i)).collect();
    let name = String::from_utf8_lossy(b.0).replace('\0', "");

    match fuzzing::connect_request(
        family,
        seq,
        index,
        size,
        block_size,
        flags,
        timeout,
        dead,
        fds.clone(),
    ) {
        Ok(msg) => {
            let msgs = fuzzing::messages(&msg).expect("our own request parses");
            assert_eq!(msgs.len(), 1);
            let (kind, s, payload) = msgs[0];
            assert_eq!((kind, s), (family, seq));
            assert_eq!(&payload[..2], &[1, 1], "CONNECT, version 1");
            let attrs = fuzzing::attrs(&payload[4..]).expect("attributes parse");
            let mut want = Vec::new();
            if let Some(i) = index {
                want.push((NBD_ATTR_INDEX, i.to_ne_bytes().to_vec()));
            }
            want.push((NBD_ATTR_SIZE_BYTES, size.to_ne_bytes().to_vec()));
            want.push((NBD_ATTR_BLOCK_SIZE_BYTES, block_size.to_ne_bytes().to_vec()));
            want.push((NBD_ATTR_SERVER_FLAGS, flags.to_ne_bytes().to_vec()));
            if let Some(t) = timeout {
                want.push((NBD_ATTR_TIMEOUT, t.to_ne_bytes().to_vec()));
            }
            if let Some(t) = dead {
                want.push((NBD_ATTR_DEAD_CONN_TIMEOUT, t.to_ne_bytes().to_vec()));
            }
            assert_eq!(attrs.len(), want.len() + 1);
            for ((k, v), (wk, wv)) in attrs.iter().zip(&want) {
                assert_eq!((*k, *v), (*wk, &wv[..]));
                if v.len() == 8 {
                    assert_eq!(u64_of(v), u64_of(wv));
                }
            }
            let (k, socks) = attrs[attrs.len() - 1];
            assert_eq!(k, NBD_ATTR_SOCKETS);
            let items = fuzzing::attrs(socks).expect("SOCKETS parses");
            assert_eq!(items.len(), fds.len());
            for ((k, item), fd) in items.iter().zip(&fds) {
                assert_eq!(*k, 1, "NBD_SOCK_ITEM");
                let inner = fuzzing::attrs(item).expect("SOCK_ITEM parses");
                assert_eq!(inner.len(), 1);
                assert_eq!((inner[0].0, u32_of(inner[0].1)), (1, *fd));
            }
        }
        Err(_) => {
            // Only a request too large for netlink's 16-bit attribute lengths is refused.
            assert!(
                fds.len() * 12 + 4 > usize::from(u16::MAX),
                "{} sockets refused",
                fds.len()
            );
        }
    }

    match fuzzing::get_family_request(seq, &name) {
        Ok(msg) => {
            let msgs = fuzzing::messages(&msg).expect("GETFAMILY parses");
            let (kind, s, payload) = msgs[0];
            assert_eq!((kind, s), (0x10, seq));
            let attrs = fuzzing::attrs(&payload[4..]).expect("attributes parse");
            assert_eq!(attrs.len(), 1);
            assert_eq!(attrs[0].0, 2, "CTRL_ATTR_FAMILY_NAME");
            assert_eq!(attrs[0].1, [name.as_bytes(), &[0]].concat());
        }
        Err(_) => assert!(name.len() + 5 > usize::from(u16::MAX)),
    }
});
