//! The trace file format, version 1 (specified in `harness/traces/README.md`): an 12-byte plain
//! header (magic, version, reserved) then one zlib stream holding the body: header fields,
//! piece definitions and ops as LEB128 varints, and an end record with counts.
//!
//! Decoding checks everything it reads and never trusts a length to allocate: a truncated or
//! corrupt file gives a [`TraceError`].

use std::io;

use userblk::proto::TransmissionFlags;

use super::{OpKind, Trace, TraceHeader, TraceOp, MAX_IO, PIECE, SECTOR, ZERO_PIECE};

/// The first 8 bytes of a trace file.
pub const MAGIC: [u8; 8] = *b"UBLKTRAC";

/// The format version this code writes and reads.
pub const VERSION: u16 = 1;

/// The body is refused beyond this many bytes once decompressed (a zip bomb guard: deflate
/// expands up to ~1000 times). The largest shipped trace's body is 17 MB.
pub const MAX_BODY: usize = 256 << 20;

/// What a decoded trace may hold in memory (its ops, piece table and write references), counted
/// while decoding. A FLUSH record is 3 bytes of body but an op of about 70 bytes in memory, so
/// without this bound a body of flushes within [`MAX_BODY`] would still ask for 6 GiB.
pub const MAX_DECODED: usize = 512 << 20;

// Record tags: low 3 bits the kind, then flags.
const T_READ: u8 = 1;
const T_WRITE: u8 = 2;
const T_FLUSH: u8 = 3;
const T_TRIM: u8 = 4;
const T_ZEROES: u8 = 5;
const T_PIECE: u8 = 6;
const T_END: u8 = 7;
const KIND_MASK: u8 = 0x07;
/// WRITE: FUA. WRITE_ZEROES: a hole may be punched.
const F_FLAG: u8 = 0x08;
/// The op failed; an errno follows instead of data.
const F_FAILED: u8 = 0x10;

/// Why a trace file could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TraceError {
    /// Reading or writing the file failed.
    #[error("trace file: {0}")]
    Io(#[from] io::Error),
    /// The file does not start with [`MAGIC`].
    #[error("not a userblk trace (bad magic)")]
    BadMagic,
    /// The file's version is not one this code reads.
    #[error("trace format version {0} is not supported (this build reads version {VERSION})")]
    UnsupportedVersion(u16),
    /// The compressed body is damaged or cut short.
    #[error("corrupt trace: compressed body: {0}")]
    Compression(String),
    /// The body ends in the middle of a record.
    #[error("truncated trace: body ends at byte {at} inside {what}")]
    Truncated {
        /// Position in the body.
        at: usize,
        /// What was being read.
        what: &'static str,
    },
    /// The file expands beyond what a trace may use: its body beyond [`MAX_BODY`] bytes, or the
    /// decoded trace beyond [`MAX_DECODED`] bytes of memory.
    #[error("trace too large: {what} beyond the {limit}-byte limit")]
    TooLarge {
        /// "decompressed body" or "decoded trace".
        what: &'static str,
        /// The limit.
        limit: usize,
    },
    /// A field has an impossible value.
    #[error("corrupt trace at body byte {at}: {what}")]
    Corrupt {
        /// Position in the body.
        at: usize,
        /// What is wrong.
        what: String,
    },
}

/// Appends LEB128 varints and raw bytes.
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn var(&mut self, mut v: u64) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.0.push(b);
                return;
            }
            self.0.push(b | 0x80);
        }
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
}

/// Reads what [`Writer`] wrote, with a typed error for every way it can go wrong.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn u8(&mut self, what: &'static str) -> Result<u8, TraceError> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or(TraceError::Truncated { at: self.pos, what })?;
        self.pos += 1;
        Ok(b)
    }
    fn var(&mut self, what: &'static str) -> Result<u64, TraceError> {
        let start = self.pos;
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8(what)?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                break;
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.corrupt_at(start, format!("{what}: varint longer than 64 bits")))
    }
    fn bytes(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], TraceError> {
        let rest = self.buf.len() - self.pos;
        if n > rest as u64 {
            return Err(TraceError::Truncated {
                at: self.buf.len(),
                what,
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    fn corrupt_at(&self, at: usize, what: String) -> TraceError {
        TraceError::Corrupt { at, what }
    }
}

impl Trace {
    /// The trace as a file's bytes (format version [`VERSION`]).
    pub fn encode(&self) -> Vec<u8> {
        let body = self.encode_body();
        let mut out = Vec::with_capacity(body.len() / 4 + 16);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&miniz_oxide::deflate::compress_to_vec_zlib(&body, 9));
        out
    }

    /// The body, before compression.
    fn encode_body(&self) -> Vec<u8> {
        let mut w = Writer(Vec::new());
        let h = &self.header;
        w.var(h.size);
        w.var(u64::from(h.block_size));
        w.var(u64::from(h.flags.0));
        w.u8(u8::from(h.initial_zeroes) | u8::from(h.trim_zeroes) << 1);
        w.var(h.description.len() as u64);
        w.bytes(h.description.as_bytes());

        // Pieces are defined just before the first op that uses them, so a reader never sees a
        // forward reference; they are renumbered in order of first use.
        let mut renumber = vec![0u32; self.pieces.len() + 1];
        let mut defined = 0u32;
        let mut prev_start = 0u64;
        for op in &self.ops {
            if let OpKind::Write { pieces, .. } = &op.kind {
                for &r in pieces {
                    let Some(data) = self.piece(r) else { continue };
                    if renumber[r as usize] == 0 {
                        defined += 1;
                        renumber[r as usize] = defined;
                        w.u8(T_PIECE);
                        w.var(data.len() as u64 / SECTOR);
                        w.bytes(data);
                    }
                }
            }
            let (kind, flag) = match op.kind {
                OpKind::Read { .. } => (T_READ, false),
                OpKind::Write { fua, .. } => (T_WRITE, fua),
                OpKind::Flush => (T_FLUSH, false),
                OpKind::Trim => (T_TRIM, false),
                OpKind::WriteZeroes { may_trim } => (T_ZEROES, may_trim),
            };
            let mut tag = kind;
            if flag {
                tag |= F_FLAG;
            }
            if op.errno.is_some() {
                tag |= F_FAILED;
            }
            w.u8(tag);
            w.var(op.start - prev_start);
            w.var(op.end - op.start);
            prev_start = op.start;
            if kind != T_FLUSH {
                w.var(op.offset / SECTOR);
                w.var(op.len / SECTOR);
            }
            match (&op.kind, op.errno) {
                (_, Some(e)) => w.var(u64::from(e.unsigned_abs())),
                (OpKind::Read { hash }, None) => w.bytes(&hash.unwrap_or(0).to_le_bytes()),
                (OpKind::Write { pieces, .. }, None) => {
                    for &r in pieces {
                        w.var(u64::from(renumber.get(r as usize).copied().unwrap_or(0)));
                    }
                }
                _ => {}
            }
        }
        w.u8(T_END);
        w.var(self.ops.len() as u64);
        w.var(u64::from(defined));
        w.0
    }

    /// Parses a trace file's bytes.
    pub fn decode(bytes: &[u8]) -> Result<Trace, TraceError> {
        if bytes.len() < 8 || bytes[..8] != MAGIC {
            return Err(TraceError::BadMagic);
        }
        if bytes.len() < 12 {
            return Err(TraceError::Truncated {
                at: 0,
                what: "file header",
            });
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        let reserved = u16::from_le_bytes([bytes[10], bytes[11]]);
        if version != VERSION || reserved != 0 {
            return Err(TraceError::UnsupportedVersion(version));
        }
        decode_limited(&bytes[12..], MAX_BODY, MAX_DECODED)
    }

    /// Reads a trace file.
    pub fn read_file(path: impl AsRef<std::path::Path>) -> Result<Trace, TraceError> {
        Trace::decode(&std::fs::read(path)?)
    }

    /// Writes the trace to a file.
    pub fn write_file(&self, path: impl AsRef<std::path::Path>) -> Result<(), TraceError> {
        Ok(std::fs::write(path, self.encode())?)
    }
}

/// Decompresses and decodes a body within the given limits (the tests use small ones).
fn decode_limited(
    compressed: &[u8],
    max_body: usize,
    max_decoded: usize,
) -> Result<Trace, TraceError> {
    let body = miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(compressed, max_body)
        .map_err(|e| {
            use miniz_oxide::inflate::TINFLStatus as S;
            TraceError::Compression(match e.status {
                S::FailedCannotMakeProgress => "cut short".into(),
                S::Adler32Mismatch => "checksum mismatch (damaged)".into(),
                S::HasMoreOutput => {
                    return TraceError::TooLarge {
                        what: "decompressed body",
                        limit: max_body,
                    }
                }
                other => format!("damaged ({other:?})"),
            })
        })?;
    decode_body(&body, max_decoded)
}

/// Counts the memory a decoded trace takes, against a limit.
struct Budget {
    left: usize,
    limit: usize,
}

impl Budget {
    fn spend(&mut self, bytes: usize) -> Result<(), TraceError> {
        self.left = self.left.checked_sub(bytes).ok_or(TraceError::TooLarge {
            what: "decoded trace",
            limit: self.limit,
        })?;
        Ok(())
    }
}

fn decode_body(body: &[u8], max_decoded: usize) -> Result<Trace, TraceError> {
    let mut budget = Budget {
        left: max_decoded,
        limit: max_decoded,
    };
    let mut r = Reader { buf: body, pos: 0 };
    let size = r.var("device size")?;
    let at = r.pos;
    let block_size = r.var("block size")?;
    if !(SECTOR..=65536).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(r.corrupt_at(at, format!("block size {block_size}")));
    }
    if size % block_size != 0 {
        return Err(r.corrupt_at(at, format!("size {size} not a multiple of the block size")));
    }
    let at = r.pos;
    let flags = u16::try_from(r.var("flags")?)
        .map_err(|_| r.corrupt_at(at, "transmission flags beyond 16 bits".into()))?;
    let at = r.pos;
    let content = r.u8("content flags")?;
    if content & !3 != 0 {
        return Err(r.corrupt_at(at, format!("unknown content flags {content:#04x}")));
    }
    let n = r.var("description length")?;
    let at = r.pos;
    let description = std::str::from_utf8(r.bytes(n, "description")?)
        .map_err(|_| r.corrupt_at(at, "description is not UTF-8".into()))?
        .to_string();
    let header = TraceHeader {
        size,
        block_size: block_size as u32,
        flags: TransmissionFlags(flags),
        initial_zeroes: content & 1 != 0,
        trim_zeroes: content & 2 != 0,
        description,
    };

    let mut pieces: Vec<Box<[u8]>> = Vec::new();
    let mut ops = Vec::new();
    let mut start = 0u64;
    loop {
        let at = r.pos;
        let tag = r.u8("record tag")?;
        let kind = tag & KIND_MASK;
        let flag = tag & F_FLAG != 0;
        let failed = tag & F_FAILED != 0;
        if tag & !(KIND_MASK | F_FLAG | F_FAILED) != 0 {
            return Err(r.corrupt_at(at, format!("unknown record flags in tag {tag:#04x}")));
        }
        match kind {
            T_PIECE => {
                let sectors = r.var("piece length")?;
                if sectors == 0 || sectors > PIECE / SECTOR || flag || failed {
                    return Err(r.corrupt_at(at, format!("piece of {sectors} sectors")));
                }
                let data = r.bytes(sectors * SECTOR, "piece data")?;
                budget.spend(data.len() + size_of::<Box<[u8]>>())?;
                pieces.push(data.into());
                continue;
            }
            T_END => {
                let n_ops = r.var("op count")?;
                let n_pieces = r.var("piece count")?;
                if n_ops != ops.len() as u64 || n_pieces != pieces.len() as u64 {
                    return Err(r.corrupt_at(
                        at,
                        format!(
                            "end record counts {n_ops} ops and {n_pieces} pieces, body has {} and {}",
                            ops.len(),
                            pieces.len()
                        ),
                    ));
                }
                if r.pos != body.len() {
                    return Err(r.corrupt_at(r.pos, "bytes after the end record".into()));
                }
                break;
            }
            T_READ | T_WRITE | T_FLUSH | T_TRIM | T_ZEROES => {}
            _ => return Err(r.corrupt_at(at, format!("unknown record kind {kind}"))),
        }
        let delta = r.var("start")?;
        let dur = r.var("duration")?;
        start = start
            .checked_add(delta)
            .ok_or_else(|| r.corrupt_at(at, "clock overflows".into()))?;
        let end = start
            .checked_add(dur)
            .ok_or_else(|| r.corrupt_at(at, "clock overflows".into()))?;
        let (offset, len) = if kind == T_FLUSH {
            (0, 0)
        } else {
            let o = r.var("offset")?;
            let l = r.var("length")?;
            match (o.checked_mul(SECTOR), l.checked_mul(SECTOR)) {
                (Some(o), Some(l)) if o.checked_add(l).is_some_and(|e| e <= size) => (o, l),
                _ => {
                    return Err(r.corrupt_at(
                        at,
                        format!("range of {l} sectors at sector {o} outside the device"),
                    ))
                }
            }
        };
        if matches!(kind, T_READ | T_WRITE) && len > MAX_IO {
            return Err(r.corrupt_at(at, format!("{len}-byte request beyond the 32 MiB limit")));
        }
        if flag && !matches!(kind, T_WRITE | T_ZEROES) {
            return Err(r.corrupt_at(at, format!("flag on a record of kind {kind}")));
        }
        let errno = if failed {
            let e = r.var("errno")?;
            Some(
                i32::try_from(e)
                    .map_err(|_| r.corrupt_at(at, format!("errno {e} out of range")))?,
            )
        } else {
            None
        };
        let kind = match kind {
            T_READ => OpKind::Read {
                hash: if failed {
                    None
                } else {
                    let b = r.bytes(8, "read checksum")?;
                    let mut h = [0u8; 8];
                    h.copy_from_slice(b);
                    Some(u64::from_le_bytes(h))
                },
            },
            T_WRITE => {
                let mut refs = Vec::new();
                if !failed {
                    for (_, plen) in Trace::pieces(offset, len) {
                        let at = r.pos;
                        let p = r.var("piece reference")?;
                        let ok = p == u64::from(ZERO_PIECE)
                            || pieces
                                .get((p as usize).wrapping_sub(1))
                                .is_some_and(|d| d.len() as u64 == plen);
                        if !ok || p > u64::from(u32::MAX) {
                            return Err(r.corrupt_at(
                                at,
                                format!("piece reference {p} undefined or not {plen} bytes long"),
                            ));
                        }
                        refs.push(p as u32);
                    }
                }
                OpKind::Write {
                    fua: flag,
                    pieces: refs,
                }
            }
            T_FLUSH => OpKind::Flush,
            T_TRIM => OpKind::Trim,
            _ => OpKind::WriteZeroes { may_trim: flag },
        };
        let refs = match &kind {
            OpKind::Write { pieces, .. } => pieces.len(),
            _ => 0,
        };
        budget.spend(size_of::<TraceOp>() + refs * size_of::<u32>())?;
        ops.push(TraceOp {
            start,
            end,
            offset,
            len,
            kind,
            errno,
        });
    }
    Ok(Trace {
        header,
        pieces,
        ops,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::Recorder;
    use userblk::{BlockDevice, MemDevice};

    fn sample() -> Trace {
        let rec = Recorder::new(MemDevice::new(1 << 20)).description("sample");
        rec.write(0, &[1; 8192]).unwrap();
        rec.write_fua(8192, &[0; 4096]).unwrap();
        rec.flush().unwrap();
        rec.write_zeroes(0, 4096, true).unwrap();
        rec.trim(4096, 4096).unwrap();
        let mut buf = [0u8; 4096];
        rec.read(512, &mut buf).unwrap();
        let mut trace = rec.trace();
        // And a failed op, as a device error leaves it.
        trace.ops.push(TraceOp {
            start: 100,
            end: 101,
            offset: 0,
            len: 512,
            kind: OpKind::Read { hash: None },
            errno: Some(5),
        });
        trace
    }

    #[test]
    fn a_recorder_leaves_out_calls_no_server_would_make() {
        let rec = Recorder::new(MemDevice::new(1 << 20));
        let mut buf = [0u8; 4096];
        assert!(rec.read(1 << 20, &mut buf).is_err());
        // MemDevice itself accepts an unaligned write; the server never sends one.
        rec.write(100, &[1; 512]).unwrap();
        let trace = rec.trace();
        assert!(trace.ops.is_empty());
        assert!(Trace::decode(&trace.encode()).is_ok());
    }

    #[test]
    fn mutated_bodies_give_errors_never_panics() {
        let body = sample().encode_body();
        assert!(decode_body(&body, MAX_DECODED).is_ok());
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for cut in 0..body.len() {
            assert!(
                decode_body(&body[..cut], MAX_DECODED).is_err(),
                "prefix of {cut} bytes accepted"
            );
        }
        for _ in 0..5_000 {
            let mut b = body.clone();
            for _ in 0..1 + next() % 4 {
                let i = (next() % b.len() as u64) as usize;
                b[i] = next() as u8;
            }
            let _ = decode_body(&b, MAX_DECODED);
        }
    }

    #[test]
    fn varints_round_trip_and_overlong_is_an_error() {
        let mut w = Writer(Vec::new());
        for v in [0, 1, 127, 128, 300, u64::MAX] {
            w.var(v);
        }
        let mut r = Reader { buf: &w.0, pos: 0 };
        for v in [0, 1, 127, 128, 300, u64::MAX] {
            assert_eq!(r.var("v").unwrap(), v);
        }
        let mut r = Reader {
            buf: &[0xff; 11],
            pos: 0,
        };
        assert!(matches!(r.var("v"), Err(TraceError::Corrupt { .. })));
        let mut r = Reader {
            buf: &[0x80],
            pos: 0,
        };
        assert!(matches!(r.var("v"), Err(TraceError::Truncated { .. })));
    }

    /// A body of `n` FLUSH records (3 bytes each: tag, start delta, duration), compressed.
    fn flushes(n: usize) -> Vec<u8> {
        let mut w = Writer(Vec::new());
        for v in [1 << 20, 512, 0, 0, 0] {
            w.var(v); // size, block size, flags, content flags, description length
        }
        for _ in 0..n {
            w.bytes(&[T_FLUSH, 1, 1]);
        }
        w.u8(T_END);
        w.var(n as u64);
        w.var(0);
        miniz_oxide::deflate::compress_to_vec_zlib(&w.0, 6)
    }

    /// Each op costs its in-memory size against the limit: a file of flushes, tiny once
    /// compressed, cannot make the decoder allocate 24 times its body. (Before the budget, and
    /// with the former 1 GiB body limit, a 1 MiB file of flushes asked for 25 GiB of ops.)
    #[test]
    fn decoded_memory_is_bounded_with_a_typed_error() {
        let file = flushes(10_000);
        assert!(file.len() < 1000, "{} bytes compressed", file.len());
        let op = size_of::<TraceOp>();
        let trace = decode_limited(&file, MAX_BODY, 10_000 * op).unwrap();
        assert_eq!(trace.ops.len(), 10_000);
        let err = decode_limited(&file, MAX_BODY, 10_000 * op - 1).unwrap_err();
        assert!(
            matches!(
                err,
                TraceError::TooLarge {
                    what: "decoded trace",
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "trace too large: decoded trace beyond the {}-byte limit",
                10_000 * op - 1
            )
        );
    }

    #[test]
    fn a_body_beyond_the_limit_is_too_large() {
        let file = flushes(10_000);
        let err = decode_limited(&file, 1000, MAX_DECODED).unwrap_err();
        assert!(
            matches!(
                err,
                TraceError::TooLarge {
                    what: "decompressed body",
                    limit: 1000
                }
            ),
            "{err:?}"
        );
        // Through the public entry point, with the real limits, the same file is fine.
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&[1, 0, 0, 0]);
        bytes.extend_from_slice(&file);
        assert_eq!(Trace::decode(&bytes).unwrap().ops.len(), 10_000);
    }
}
