//! Entry points for the fuzz targets in `fuzz/` (hidden from the docs; not part of the API).
//!
//! The netlink reply parsers are crate-private, so that the real API stays the typed
//! [`status`](super::status) and [`mount`](super::mount); these wrappers hand them to
//! libFuzzer with plain types, and leave every check to the fuzz target.

use super::netlink::{self, Collector, ConnectRequest, NbdCmd, Outcome};

/// `netlink::parse_messages`: each message as `(type, seq, payload)`, or `None` when the
/// datagram is malformed.
pub fn messages(datagram: &[u8]) -> Option<Vec<(u16, u32, &[u8])>> {
    netlink::parse_messages(datagram)
        .ok()
        .map(|ms| ms.into_iter().map(|m| (m.kind, m.seq, m.payload)).collect())
}

/// `netlink::parse_attrs`: `(type, payload)` pairs, flag bits masked off.
pub fn attrs(buf: &[u8]) -> Option<Vec<(u16, &[u8])>> {
    netlink::parse_attrs(buf).ok()
}

/// The family id in a GETFAMILY answer's payload.
pub fn family_id(payload: &[u8]) -> Option<u16> {
    netlink::parse_family_id(payload).ok()
}

/// The device index in a CONNECT answer's payload.
pub fn connect_reply(payload: &[u8]) -> Option<u32> {
    netlink::parse_connect_reply(payload).ok()
}

/// The devices in a STATUS answer's payload, as `(index, connected)`.
pub fn status_reply(payload: &[u8]) -> Option<Vec<(u32, bool)>> {
    netlink::parse_status_reply(payload)
        .ok()
        .map(|v| v.into_iter().map(|d| (d.index, d.connected)).collect())
}

/// What feeding datagrams to a request's collector gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Collected {
    /// A datagram was malformed (the request fails with InvalidData).
    Malformed,
    /// No acknowledgement yet after every datagram.
    Pending,
    /// Acknowledged, with the payloads of the replies before the acknowledgement.
    Ok(Vec<Vec<u8>>),
    /// The kernel's (positive) errno.
    Errno(i32),
}

/// Feeds `datagrams` in order to the collector of request `seq`, as `GenlSocket::request`
/// does with what it receives, stopping at the first outcome.
pub fn collect<'a>(seq: u32, datagrams: impl IntoIterator<Item = &'a [u8]>) -> Collected {
    let mut c = Collector::default();
    for d in datagrams {
        match c.feed(seq, d) {
            Err(_) => return Collected::Malformed,
            Ok(None) => {}
            Ok(Some(Outcome::Ok(replies))) => return Collected::Ok(replies),
            Ok(Some(Outcome::Errno(e))) => return Collected::Errno(e),
        }
    }
    Collected::Pending
}

/// The CONNECT request the link sends for these values, as bytes (family id `family`,
/// sequence number `seq`).
#[allow(clippy::too_many_arguments)]
pub fn connect_request(
    family: u16,
    seq: u32,
    index: Option<u32>,
    size: u64,
    block_size: u64,
    flags: u64,
    timeout: Option<u64>,
    dead_conn_timeout: Option<u64>,
    fds: Vec<u32>,
) -> Result<Vec<u8>, String> {
    let req = ConnectRequest {
        index,
        size,
        block_size,
        flags,
        timeout,
        dead_conn_timeout,
        fds,
    };
    netlink::encode_request(family, seq, NbdCmd::Connect as u8, 1, &req.attrs())
        .map_err(|e| e.to_string())
}

/// The GETFAMILY request for `name`.
pub fn get_family_request(seq: u32, name: &str) -> Result<Vec<u8>, String> {
    netlink::get_family_request(seq, name).map_err(|e| e.to_string())
}
