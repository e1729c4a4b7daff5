//! The reply reader of [`NbdClient`](super::NbdClient): one thread reads every reply the server
//! sends, checks it against the request it answers (simple or structured, chunk types, ranges,
//! overlap, coverage, one block-status chunk per context) and hands it to the waiting caller. A
//! server that breaks a rule ends the connection with [`ClientError::Protocol`] naming it.

use std::io::{self, BufReader, Read};

use userblk::link::net::wire::{
    self, chunk, CHUNK_HEADER_LEN, REPLY_FLAG_DONE, STRUCTURED_REPLY_MAGIC,
};
use userblk::link::net::Socket;
use userblk::proto::{Command, Reply, REPLY_LEN, REPLY_MAGIC};

use super::client::{io_err, lock, read_exact, Answer, ClientError, Extent, Shared, Slot};

/// Marks the connection closed and fails every waiting request.
pub(super) fn close(shared: &Shared, why: String) {
    let mut slots = lock(&shared.slots);
    if slots.closed.is_none() {
        slots.closed = Some(why.clone());
    }
    for (_, slot) in slots.waiting.drain() {
        let err = if why.starts_with("protocol violation") {
            ClientError::Protocol(why.clone())
        } else {
            ClientError::Closed(why.clone())
        };
        let _ = slot.tx.send(Err(err));
    }
}

/// The reader thread: every reply, checked, to its waiting request.
pub(super) fn read_replies(shared: &Shared, stream: Socket) {
    let mut r = BufReader::with_capacity(256 << 10, stream);
    let why = match read_loop(shared, &mut r) {
        Ok(()) => "the server closed the connection".to_string(),
        Err(ClientError::Protocol(m)) => format!("protocol violation: {m}"),
        Err(e) => e.to_string(),
    };
    close(shared, why);
}

fn violation<T>(msg: String) -> Result<T, ClientError> {
    Err(ClientError::Protocol(msg))
}

fn read_loop(shared: &Shared, r: &mut impl Read) -> Result<(), ClientError> {
    loop {
        let mut magic = [0u8; 4];
        match r.read(&mut magic[..1]) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("reading a reply")(e)),
        }
        read_exact(r, &mut magic[1..], "reading a reply")?;
        match u32::from_be_bytes(magic) {
            REPLY_MAGIC => simple_reply(shared, r, magic)?,
            STRUCTURED_REPLY_MAGIC => structured_chunk(shared, r, magic)?,
            other => return violation(format!("reply magic {other:#010x}")),
        }
    }
}

fn take_slot(shared: &Shared, cookie: u64, what: &str) -> Result<Slot, ClientError> {
    lock(&shared.slots).waiting.remove(&cookie).map_or_else(
        || {
            violation(format!(
                "{what} for cookie {cookie:#x}, which is not in flight"
            ))
        },
        Ok,
    )
}

fn simple_reply(shared: &Shared, r: &mut impl Read, magic: [u8; 4]) -> Result<(), ClientError> {
    let mut h = [0u8; REPLY_LEN];
    h[..4].copy_from_slice(&magic);
    read_exact(r, &mut h[4..], "reading a reply")?;
    let reply = Reply::parse(&h)?;
    let slot = take_slot(shared, reply.cookie.0, "a simple reply")?;
    if let Some(errno) = reply.errno() {
        let _ = slot.tx.send(Err(ClientError::Errno {
            errno: errno.0,
            message: String::new(),
        }));
        return Ok(());
    }
    let answer = match slot.command {
        Command::Read if shared.structured => {
            let _ = slot.tx.send(Err(ClientError::Protocol(
                "simple reply to READ after structured replies were negotiated".into(),
            )));
            return violation(
                "simple reply to READ after structured replies were negotiated".into(),
            );
        }
        Command::Read => {
            let mut data = vec![0u8; slot.len as usize];
            read_exact(r, &mut data, "reading READ data")?;
            Answer::Data(data)
        }
        Command::BlockStatus => {
            return violation("simple success reply to BLOCK_STATUS".into());
        }
        _ => Answer::Done,
    };
    let _ = slot.tx.send(Ok(answer));
    Ok(())
}

impl From<userblk::proto::ReplyParseError> for ClientError {
    fn from(e: userblk::proto::ReplyParseError) -> ClientError {
        ClientError::Protocol(e.to_string())
    }
}

/// The largest chunk payload accepted: a 32 MiB READ plus its offset, or a block-status chunk
/// of 2^20 extents.
const MAX_CHUNK: u32 = (32 << 20) + 8;

fn structured_chunk(shared: &Shared, r: &mut impl Read, magic: [u8; 4]) -> Result<(), ClientError> {
    if !shared.structured {
        return violation("structured reply chunk without structured replies negotiated".into());
    }
    let mut h = [0u8; CHUNK_HEADER_LEN];
    h[..4].copy_from_slice(&magic);
    read_exact(r, &mut h[4..], "reading a reply chunk")?;
    let h = wire::ChunkHeader::parse(&h)?;
    // A READ's data chunk may be as long as what was asked for (a server that advertised no
    // maximum may serve more than 32 MiB at once); anything else stays small.
    let read_len = lock(&shared.slots)
        .waiting
        .get(&h.cookie)
        .filter(|s| s.command == Command::Read)
        .map_or(0, |s| s.len.saturating_add(8));
    if h.len > MAX_CHUNK.max(read_len) {
        return violation(format!("chunk of {} bytes", h.len));
    }
    let mut payload = vec![0u8; h.len as usize];
    read_exact(r, &mut payload, "reading a chunk payload")?;
    let mut slots = lock(&shared.slots);
    let Some(slot) = slots.waiting.get_mut(&h.cookie) else {
        return violation(format!(
            "chunk for cookie {:#x}, which is not in flight",
            h.cookie
        ));
    };
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let be64 = |b: &[u8], at: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[at..at + 8]);
        u64::from_be_bytes(a)
    };
    let is_read = slot.command == Command::Read;
    match h.kind {
        chunk::NONE => {
            if h.len != 0 || h.flags & REPLY_FLAG_DONE == 0 {
                return violation("NBD_REPLY_TYPE_NONE with a payload or without DONE".into());
            }
        }
        chunk::OFFSET_DATA | chunk::OFFSET_HOLE if is_read => {
            let (off, len) = if h.kind == chunk::OFFSET_DATA {
                if h.len < 9 {
                    return violation(format!("OFFSET_DATA chunk of {} bytes", h.len));
                }
                (be64(&payload, 0), u64::from(h.len) - 8)
            } else {
                if h.len != 12 {
                    return violation(format!("OFFSET_HOLE chunk of {} bytes", h.len));
                }
                let l = u64::from(be32(&payload, 8));
                if l == 0 {
                    return violation("OFFSET_HOLE of 0 bytes".into());
                }
                (be64(&payload, 0), l)
            };
            let start = off.wrapping_sub(slot.offset);
            if off < slot.offset || start + len > u64::from(slot.len) {
                return violation(format!(
                    "content chunk {off}+{len} outside the READ {}+{}",
                    slot.offset, slot.len
                ));
            }
            if slot
                .covered
                .iter()
                .any(|&(s, l)| start < s + l && s < start + len)
            {
                return violation(format!("content chunk {off}+{len} overlaps an earlier one"));
            }
            slot.covered.push((start, len));
            if h.kind == chunk::OFFSET_DATA {
                if slot.data.is_empty() {
                    slot.data = vec![0u8; slot.len as usize];
                }
                slot.data[start as usize..(start + len) as usize].copy_from_slice(&payload[8..]);
            }
        }
        chunk::BLOCK_STATUS if slot.command == Command::BlockStatus => {
            if h.len < 12 || (h.len - 4) % 8 != 0 {
                return violation(format!("BLOCK_STATUS chunk of {} bytes", h.len));
            }
            if Some(be32(&payload, 0)) != shared.context {
                return violation(format!("block status for context {}", be32(&payload, 0)));
            }
            if slot.extents.is_some() {
                return violation("two BLOCK_STATUS chunks for one context".into());
            }
            let extents: Vec<Extent> = payload[4..]
                .chunks(8)
                .map(|d| Extent {
                    len: be32(d, 0),
                    flags: be32(d, 4),
                })
                .collect();
            if extents.iter().any(|e| e.len == 0) {
                return violation("an extent of length 0".into());
            }
            slot.extents = Some(extents);
        }
        chunk::ERROR | chunk::ERROR_OFFSET => {
            let fixed = if h.kind == chunk::ERROR { 6 } else { 14 };
            if h.len < fixed {
                return violation(format!("error chunk of {} bytes", h.len));
            }
            let errno = be32(&payload, 0);
            let mlen = usize::from(u16::from_be_bytes([payload[4], payload[5]]));
            if errno == 0 || mlen > h.len as usize - fixed as usize {
                return violation(format!(
                    "error chunk with errno {errno}, message {mlen} bytes"
                ));
            }
            let message = String::from_utf8_lossy(&payload[6..6 + mlen]).into_owned();
            slot.error.get_or_insert((errno, message));
        }
        other if other & 0x8000 != 0 => {
            slot.error
                .get_or_insert((5, format!("unknown error chunk type {other:#x}")));
        }
        other => return violation(format!("chunk type {other} in reply to {}", slot.command)),
    }
    if h.flags & REPLY_FLAG_DONE == 0 {
        return Ok(());
    }
    let Some(slot) = slots.waiting.remove(&h.cookie) else {
        return Ok(());
    };
    drop(slots);
    let result = if let Some((errno, message)) = slot.error {
        Err(ClientError::Errno { errno, message })
    } else {
        match slot.command {
            Command::Read => {
                let covered: u64 = slot.covered.iter().map(|c| c.1).sum();
                if covered != u64::from(slot.len) {
                    let msg = format!(
                        "READ {}+{} done after {covered} bytes of content",
                        slot.offset, slot.len
                    );
                    let _ = slot.tx.send(Err(ClientError::Protocol(msg.clone())));
                    return violation(msg);
                }
                let mut data = slot.data;
                // All holes: zeroes, made only now.
                data.resize(slot.len as usize, 0);
                Ok(Answer::Data(data))
            }
            Command::BlockStatus => match slot.extents {
                Some(e) => Ok(Answer::Extents(e)),
                None => {
                    let msg = "BLOCK_STATUS done without a status chunk".to_string();
                    let _ = slot.tx.send(Err(ClientError::Protocol(msg.clone())));
                    return violation(msg);
                }
            },
            _ => Ok(Answer::Done),
        }
    };
    let _ = slot.tx.send(result);
    Ok(())
}
