//! Generic netlink for the NBD driver (family "nbd", include/uapi/linux/nbd-netlink.h), hand-rolled
//! on a raw `NETLINK_GENERIC` socket: the handful of messages needed does not justify a netlink
//! crate. The wire format (message building and parsing) is pure and apart from the socket, so
//! tests check it against byte fixtures.
//!
//! Layout, all integers in host byte order, every part padded to 4 bytes:
//! `nlmsghdr { len u32, type u16, flags u16, seq u32, pid u32 }`,
//! `genlmsghdr { cmd u8, version u8, reserved u16 }`, then attributes
//! `nlattr { len u16, type u16 }` + payload (`len` counts the 4-byte header, not the padding).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    bind, recv, send, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

/// `nlmsghdr` length.
const NLMSG_HDRLEN: usize = 16;
/// `genlmsghdr` length.
const GENL_HDRLEN: usize = 4;
/// `nlattr` header length.
const NLA_HDRLEN: usize = 4;

/// `NLMSG_ERROR`: an error or, with error 0, an acknowledgement.
const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`: the end of a multi-part reply.
const NLMSG_DONE: u16 = 3;
/// `NLM_F_REQUEST`.
const NLM_F_REQUEST: u16 = 1;
/// `NLM_F_ACK`: ask for an acknowledgement, so that every request ends with an `NLMSG_ERROR`.
const NLM_F_ACK: u16 = 4;
/// Attribute type bits that are flags (`NLA_F_NESTED`, `NLA_F_NET_BYTEORDER`), not the type.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// The generic netlink controller's fixed family id (`GENL_ID_CTRL`).
pub(crate) const GENL_ID_CTRL: u16 = 0x10;
/// `CTRL_CMD_NEWFAMILY`: the controller's answer to GETFAMILY.
const CTRL_CMD_NEWFAMILY: u8 = 1;
/// `CTRL_CMD_GETFAMILY`.
const CTRL_CMD_GETFAMILY: u8 = 3;
/// `CTRL_ATTR_FAMILY_ID` (u16).
const CTRL_ATTR_FAMILY_ID: u16 = 1;
/// `CTRL_ATTR_FAMILY_NAME` (string).
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

/// The NBD family's name and version (`NBD_GENL_FAMILY_NAME`, `NBD_GENL_VERSION`).
pub(crate) const NBD_FAMILY: &str = "nbd";
const NBD_GENL_VERSION: u8 = 1;

/// NBD generic netlink commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NbdCmd {
    /// `NBD_CMD_CONNECT`.
    Connect = 1,
    /// `NBD_CMD_DISCONNECT`.
    Disconnect = 2,
    /// `NBD_CMD_RECONFIGURE`.
    Reconfigure = 3,
    /// `NBD_CMD_STATUS`.
    Status = 5,
}

impl NbdCmd {
    /// The command's name, for error messages.
    pub(crate) fn name(self) -> &'static str {
        match self {
            NbdCmd::Connect => "netlink NBD_CMD_CONNECT",
            NbdCmd::Disconnect => "netlink NBD_CMD_DISCONNECT",
            NbdCmd::Reconfigure => "netlink NBD_CMD_RECONFIGURE",
            NbdCmd::Status => "netlink NBD_CMD_STATUS",
        }
    }
}

/// `NBD_ATTR_*`.
pub(crate) mod attr {
    pub(crate) const INDEX: u16 = 1;
    pub(crate) const SIZE_BYTES: u16 = 2;
    pub(crate) const BLOCK_SIZE_BYTES: u16 = 3;
    pub(crate) const TIMEOUT: u16 = 4;
    pub(crate) const SERVER_FLAGS: u16 = 5;
    pub(crate) const SOCKETS: u16 = 7;
    pub(crate) const DEAD_CONN_TIMEOUT: u16 = 8;
    pub(crate) const DEVICE_LIST: u16 = 9;
    /// `NBD_SOCK_ITEM`, inside SOCKETS.
    pub(crate) const SOCK_ITEM: u16 = 1;
    /// `NBD_SOCK_FD` (u32), inside SOCK_ITEM.
    pub(crate) const SOCK_FD: u16 = 1;
    /// `NBD_DEVICE_ITEM`, inside DEVICE_LIST.
    pub(crate) const DEVICE_ITEM: u16 = 1;
    /// `NBD_DEVICE_INDEX` (u32), inside DEVICE_ITEM.
    pub(crate) const DEVICE_INDEX: u16 = 1;
    /// `NBD_DEVICE_CONNECTED` (u8), inside DEVICE_ITEM.
    pub(crate) const DEVICE_CONNECTED: u16 = 2;
}

/// An attribute to encode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Attr {
    /// A u32 payload.
    U32(u16, u32),
    /// A u64 payload.
    U64(u16, u64),
    /// A NUL-terminated string.
    Str(u16, String),
    /// Attributes nested inside this one.
    Nested(u16, Vec<Attr>),
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Why a request could not be encoded: netlink counts an attribute's length in 16 bits.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum EncodeError {
    /// An attribute (with what is nested in it) is longer than `nla_len` can say: e.g. the
    /// SOCKETS list of more than 5,460 connections.
    #[error(
        "netlink attribute {kind} would be {len} bytes, beyond the 65,535 its length field holds"
    )]
    AttrTooLong {
        /// The attribute's type.
        kind: u16,
        /// Its length with its header.
        len: usize,
    },
}

fn attr_len(kind: u16, len: usize) -> Result<u16, EncodeError> {
    u16::try_from(len).map_err(|_| EncodeError::AttrTooLong { kind, len })
}

fn put_attr_header(buf: &mut Vec<u8>, kind: u16, payload_len: usize) -> Result<(), EncodeError> {
    let len = attr_len(kind, NLA_HDRLEN + payload_len)?;
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    Ok(())
}

fn pad(buf: &mut Vec<u8>) {
    buf.resize(align4(buf.len()), 0);
}

impl Attr {
    fn encode(&self, buf: &mut Vec<u8>) -> Result<(), EncodeError> {
        match self {
            Attr::U32(kind, v) => {
                put_attr_header(buf, *kind, 4)?;
                buf.extend_from_slice(&v.to_ne_bytes());
            }
            Attr::U64(kind, v) => {
                put_attr_header(buf, *kind, 8)?;
                buf.extend_from_slice(&v.to_ne_bytes());
            }
            Attr::Str(kind, s) => {
                put_attr_header(buf, *kind, s.len() + 1)?;
                buf.extend_from_slice(s.as_bytes());
                buf.push(0);
            }
            Attr::Nested(kind, children) => {
                let start = buf.len();
                put_attr_header(buf, *kind, 0)?;
                for c in children {
                    c.encode(buf)?;
                }
                let len = attr_len(*kind, buf.len() - start)?;
                buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
            }
        }
        pad(buf);
        Ok(())
    }
}

/// Builds one generic netlink request: headers and attributes, asking for an acknowledgement.
/// Fails rather than write a length that does not fit its field (the kernel would misparse
/// the rest).
pub(crate) fn encode_request(
    family: u16,
    seq: u32,
    cmd: u8,
    version: u8,
    attrs: &[Attr],
) -> Result<Vec<u8>, EncodeError> {
    let mut buf = Vec::with_capacity(64);
    buf.extend_from_slice(&[0; NLMSG_HDRLEN]);
    buf.extend_from_slice(&[cmd, version, 0, 0]);
    for a in attrs {
        a.encode(&mut buf)?;
    }
    // Bounded by the attributes' 16-bit lengths times their (few) count.
    let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
    buf[0..4].copy_from_slice(&len.to_ne_bytes());
    buf[4..6].copy_from_slice(&family.to_ne_bytes());
    buf[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    buf[8..12].copy_from_slice(&seq.to_ne_bytes());
    // pid 0: the kernel fills in our port id.
    Ok(buf)
}

/// The GETFAMILY request that resolves a family name to its id.
pub(crate) fn get_family_request(seq: u32, name: &str) -> Result<Vec<u8>, EncodeError> {
    encode_request(
        GENL_ID_CTRL,
        seq,
        CTRL_CMD_GETFAMILY,
        1,
        &[Attr::Str(CTRL_ATTR_FAMILY_NAME, name.to_string())],
    )
}

/// Why bytes from the netlink socket could not be understood.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DecodeError {
    /// A header or attribute runs past the end of the buffer, or claims a length below its own
    /// header.
    #[error("truncated or malformed netlink message at byte {0}")]
    Malformed(usize),
    /// A reply lacked an attribute the request's answer must carry.
    #[error("netlink reply without attribute {0}")]
    MissingAttr(u16),
    /// An `NLMSG_ERROR` whose error is neither 0 (an acknowledgement) nor a negative errno
    /// (-1 ..= -4095, the kernel's `MAX_ERRNO`).
    #[error("netlink error value {0} is not 0 or a negative errno")]
    BadErrno(i32),
}

/// The most negative error an `NLMSG_ERROR` carries: minus the kernel's largest errno
/// (`MAX_ERRNO`, include/linux/err.h).
const MIN_ERROR: i32 = -4095;

/// One netlink message as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Message<'a> {
    /// `nlmsg_type`: a family id, or NLMSG_ERROR / NLMSG_DONE.
    pub(crate) kind: u16,
    /// `nlmsg_seq`.
    pub(crate) seq: u32,
    /// Everything after the netlink header.
    pub(crate) payload: &'a [u8],
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Splits a datagram into its messages.
pub(crate) fn parse_messages(buf: &[u8]) -> Result<Vec<Message<'_>>, DecodeError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + NLMSG_HDRLEN <= buf.len() {
        let len = u32_at(buf, at).ok_or(DecodeError::Malformed(at))? as usize;
        if len < NLMSG_HDRLEN || at + len > buf.len() {
            return Err(DecodeError::Malformed(at));
        }
        out.push(Message {
            kind: u16_at(buf, at + 4).ok_or(DecodeError::Malformed(at))?,
            seq: u32_at(buf, at + 8).ok_or(DecodeError::Malformed(at))?,
            payload: &buf[at + NLMSG_HDRLEN..at + len],
        });
        at += align4(len);
    }
    Ok(out)
}

/// Attributes as (type, payload) pairs, the flag bits masked off the type.
pub(crate) fn parse_attrs(buf: &[u8]) -> Result<Vec<(u16, &[u8])>, DecodeError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + NLA_HDRLEN <= buf.len() {
        let len = usize::from(u16_at(buf, at).ok_or(DecodeError::Malformed(at))?);
        if len < NLA_HDRLEN || at + len > buf.len() {
            return Err(DecodeError::Malformed(at));
        }
        let kind = u16_at(buf, at + 2).ok_or(DecodeError::Malformed(at))? & NLA_TYPE_MASK;
        out.push((kind, &buf[at + NLA_HDRLEN..at + len]));
        at += align4(len);
    }
    Ok(out)
}

/// The attributes of a generic netlink message's payload (after its `genlmsghdr`).
pub(crate) fn genl_attrs(payload: &[u8]) -> Result<Vec<(u16, &[u8])>, DecodeError> {
    let body = payload
        .get(GENL_HDRLEN..)
        .ok_or(DecodeError::Malformed(0))?;
    parse_attrs(body)
}

fn find<'a>(attrs: &[(u16, &'a [u8])], kind: u16) -> Option<&'a [u8]> {
    attrs.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v)
}

fn attr_u32(attrs: &[(u16, &[u8])], kind: u16) -> Result<u32, DecodeError> {
    find(attrs, kind)
        .and_then(|v| u32_at(v, 0))
        .ok_or(DecodeError::MissingAttr(kind))
}

/// The family id in the controller's answer to GETFAMILY.
pub(crate) fn parse_family_id(payload: &[u8]) -> Result<u16, DecodeError> {
    let attrs = genl_attrs(payload)?;
    find(&attrs, CTRL_ATTR_FAMILY_ID)
        .and_then(|v| u16_at(v, 0))
        .ok_or(DecodeError::MissingAttr(CTRL_ATTR_FAMILY_ID))
}

/// The device index in the kernel's answer to CONNECT.
pub(crate) fn parse_connect_reply(payload: &[u8]) -> Result<u32, DecodeError> {
    attr_u32(&genl_attrs(payload)?, attr::INDEX)
}

/// One device in a STATUS answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceStatus {
    /// The device's index: `/dev/nbd{index}`.
    pub index: u32,
    /// Whether the device has a configuration: connected, being set up, or merely held open
    /// (the kernel counts any opener). A device that is not connected is free to use.
    pub connected: bool,
}

/// The devices in the kernel's answer to STATUS.
pub(crate) fn parse_status_reply(payload: &[u8]) -> Result<Vec<DeviceStatus>, DecodeError> {
    let attrs = genl_attrs(payload)?;
    let Some(list) = find(&attrs, attr::DEVICE_LIST) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (kind, item) in parse_attrs(list)? {
        if kind != attr::DEVICE_ITEM {
            continue;
        }
        let fields = parse_attrs(item)?;
        out.push(DeviceStatus {
            index: attr_u32(&fields, attr::DEVICE_INDEX)?,
            connected: find(&fields, attr::DEVICE_CONNECTED)
                .and_then(|v| v.first())
                .ok_or(DecodeError::MissingAttr(attr::DEVICE_CONNECTED))?
                != &0,
        });
    }
    Ok(out)
}

/// What a request's answer was: the messages that came before the acknowledgement, or the
/// kernel's errno.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Acknowledged; the payloads of the replies that came first.
    Ok(Vec<Vec<u8>>),
    /// The kernel answered with this (positive) errno.
    Errno(i32),
}

/// Feeds received datagrams for request `seq` into an outcome; `None` until the
/// acknowledgement (or error) arrives.
#[derive(Debug, Default)]
pub(crate) struct Collector {
    replies: Vec<Vec<u8>>,
}

impl Collector {
    pub(crate) fn feed(
        &mut self,
        seq: u32,
        datagram: &[u8],
    ) -> Result<Option<Outcome>, DecodeError> {
        for m in parse_messages(datagram)? {
            if m.seq != seq {
                continue;
            }
            match m.kind {
                NLMSG_ERROR => {
                    let raw = u32_at(m.payload, 0).ok_or(DecodeError::Malformed(0))? as i32;
                    return Ok(Some(match raw {
                        0 => Outcome::Ok(std::mem::take(&mut self.replies)),
                        MIN_ERROR..=-1 => Outcome::Errno(-raw),
                        _ => return Err(DecodeError::BadErrno(raw)),
                    }));
                }
                NLMSG_DONE => return Ok(Some(Outcome::Ok(std::mem::take(&mut self.replies)))),
                _ => self.replies.push(m.payload.to_vec()),
            }
        }
        Ok(None)
    }
}

/// A connected generic netlink socket.
#[derive(Debug)]
pub(crate) struct GenlSocket {
    fd: OwnedFd,
    seq: u32,
}

/// A failed request: the socket broke, or the kernel said no.
#[derive(Debug)]
pub(crate) enum RequestError {
    /// The kernel's errno.
    Errno(i32),
    /// The socket failed or the answer was not understood.
    Io(io::Error),
}

impl GenlSocket {
    /// Opens and binds a socket; answers are awaited at most 30 s (CONNECT may wait for the
    /// kernel to add a device).
    pub(crate) fn open() -> io::Result<GenlSocket> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkGeneric,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(30, 0))?;
        Ok(GenlSocket { fd, seq: 0 })
    }

    /// Sends a request built by `build(seq)` and waits for its acknowledgement.
    pub(crate) fn request(
        &mut self,
        build: impl FnOnce(u32) -> Result<Vec<u8>, EncodeError>,
    ) -> Result<Vec<Vec<u8>>, RequestError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let msg = build(seq)
            .map_err(|e| RequestError::Io(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        send(self.fd.as_raw_fd(), &msg, MsgFlags::empty())
            .map_err(|e| RequestError::Io(e.into()))?;
        let mut collector = Collector::default();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(n) => n,
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(RequestError::Io(e.into())),
            };
            match collector.feed(seq, &buf[..n]) {
                Ok(Some(Outcome::Ok(replies))) => return Ok(replies),
                Ok(Some(Outcome::Errno(e))) => return Err(RequestError::Errno(e)),
                Ok(None) => {}
                Err(e) => {
                    return Err(RequestError::Io(io::Error::new(
                        io::ErrorKind::InvalidData,
                        e,
                    )))
                }
            }
        }
    }

    /// Resolves a generic netlink family's id (ENOENT: no such family).
    pub(crate) fn family(&mut self, name: &str) -> Result<u16, RequestError> {
        let replies = self.request(|seq| get_family_request(seq, name))?;
        replies
            .iter()
            .find_map(|p| match p.first() {
                Some(&CTRL_CMD_NEWFAMILY) => parse_family_id(p).ok(),
                _ => None,
            })
            .ok_or_else(|| {
                RequestError::Io(io::Error::new(
                    io::ErrorKind::InvalidData,
                    DecodeError::MissingAttr(CTRL_ATTR_FAMILY_ID),
                ))
            })
    }
}

/// The NBD family on a generic netlink socket.
#[derive(Debug)]
pub(crate) struct NbdNetlink {
    sock: GenlSocket,
    family: u16,
}

/// What CONNECT tells the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ConnectRequest {
    /// The device, or `None` to let the kernel pick a free one.
    pub(crate) index: Option<u32>,
    pub(crate) size: u64,
    pub(crate) block_size: u64,
    pub(crate) flags: u64,
    /// Request timeout in seconds, if any.
    pub(crate) timeout: Option<u64>,
    /// Dead-connection timeout in seconds, if any.
    pub(crate) dead_conn_timeout: Option<u64>,
    /// The kernel's ends of the connections.
    pub(crate) fds: Vec<u32>,
}

impl ConnectRequest {
    /// Its attributes, in the order nbd-client sends them.
    pub(crate) fn attrs(&self) -> Vec<Attr> {
        let mut attrs = Vec::new();
        if let Some(i) = self.index {
            attrs.push(Attr::U32(attr::INDEX, i));
        }
        attrs.push(Attr::U64(attr::SIZE_BYTES, self.size));
        attrs.push(Attr::U64(attr::BLOCK_SIZE_BYTES, self.block_size));
        attrs.push(Attr::U64(attr::SERVER_FLAGS, self.flags));
        push_timeouts_and_sockets(&mut attrs, self.timeout, self.dead_conn_timeout, &self.fds);
        attrs
    }
}

/// What RECONFIGURE tells the kernel when new connections replace dead ones: no size or block
/// size (the kernel would resize the device), and the timeouts only when given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ReconfigureRequest {
    pub(crate) index: u32,
    /// Request timeout in seconds, if it is to change.
    pub(crate) timeout: Option<u64>,
    /// Dead-connection timeout in seconds, if it is to change.
    pub(crate) dead_conn_timeout: Option<u64>,
    /// The kernel's ends of the new connections.
    pub(crate) fds: Vec<u32>,
}

impl ReconfigureRequest {
    /// Its attributes.
    pub(crate) fn attrs(&self) -> Vec<Attr> {
        let mut attrs = vec![Attr::U32(attr::INDEX, self.index)];
        push_timeouts_and_sockets(&mut attrs, self.timeout, self.dead_conn_timeout, &self.fds);
        attrs
    }
}

/// The attributes CONNECT and RECONFIGURE end with: the timeouts that are given, then one
/// SOCK_ITEM a connection.
fn push_timeouts_and_sockets(
    attrs: &mut Vec<Attr>,
    timeout: Option<u64>,
    dead_conn_timeout: Option<u64>,
    fds: &[u32],
) {
    if let Some(t) = timeout {
        attrs.push(Attr::U64(attr::TIMEOUT, t));
    }
    if let Some(t) = dead_conn_timeout {
        attrs.push(Attr::U64(attr::DEAD_CONN_TIMEOUT, t));
    }
    let socks = fds
        .iter()
        .map(|&fd| Attr::Nested(attr::SOCK_ITEM, vec![Attr::U32(attr::SOCK_FD, fd)]))
        .collect();
    attrs.push(Attr::Nested(attr::SOCKETS, socks));
}

impl NbdNetlink {
    /// Opens a socket and resolves the "nbd" family (loading the module if root and it is
    /// installed: the kernel asks for `net-pf-16-proto-16-family-nbd`).
    pub(crate) fn open() -> Result<NbdNetlink, RequestError> {
        let mut sock = GenlSocket::open().map_err(RequestError::Io)?;
        let family = sock.family(NBD_FAMILY)?;
        Ok(NbdNetlink { sock, family })
    }

    fn call(&mut self, cmd: NbdCmd, attrs: &[Attr]) -> Result<Vec<Vec<u8>>, RequestError> {
        let family = self.family;
        self.sock
            .request(|seq| encode_request(family, seq, cmd as u8, NBD_GENL_VERSION, attrs))
    }

    /// CONNECT; returns the device's index.
    pub(crate) fn connect(&mut self, req: &ConnectRequest) -> Result<u32, RequestError> {
        let replies = self.call(NbdCmd::Connect, &req.attrs())?;
        for p in &replies {
            if let Ok(i) = parse_connect_reply(p) {
                return Ok(i);
            }
        }
        // A kernel that acknowledged without saying which device: only possible with an index.
        req.index.ok_or_else(|| {
            RequestError::Io(io::Error::new(
                io::ErrorKind::InvalidData,
                DecodeError::MissingAttr(attr::INDEX),
            ))
        })
    }

    /// DISCONNECT: DISC on every socket, then the sockets are shut down.
    pub(crate) fn disconnect(&mut self, index: u32) -> Result<(), RequestError> {
        self.call(NbdCmd::Disconnect, &[Attr::U32(attr::INDEX, index)])
            .map(drop)
    }

    /// RECONFIGURE with a new request timeout (seconds).
    pub(crate) fn set_timeout(&mut self, index: u32, seconds: u64) -> Result<(), RequestError> {
        self.call(
            NbdCmd::Reconfigure,
            &[
                Attr::U32(attr::INDEX, index),
                Attr::U64(attr::TIMEOUT, seconds),
            ],
        )
        .map(drop)
    }

    /// RECONFIGURE with new sockets: each replaces a dead connection (a socket for which none is
    /// dead is ignored by the kernel, which still answers success).
    pub(crate) fn reconfigure(&mut self, req: &ReconfigureRequest) -> Result<(), RequestError> {
        self.call(NbdCmd::Reconfigure, &req.attrs()).map(drop)
    }

    /// STATUS of one device, or of all.
    pub(crate) fn status(&mut self, index: Option<u32>) -> Result<Vec<DeviceStatus>, RequestError> {
        let attrs: Vec<Attr> = index
            .map(|i| Attr::U32(attr::INDEX, i))
            .into_iter()
            .collect();
        let replies = self.call(NbdCmd::Status, &attrs)?;
        let mut out = Vec::new();
        for p in &replies {
            out.extend(
                parse_status_reply(p)
                    .map_err(|e| RequestError::Io(io::Error::new(io::ErrorKind::InvalidData, e)))?,
            );
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
