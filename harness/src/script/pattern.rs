//! Data patterns: how a script names the bytes of a WRITE or the bytes a READ must return,
//! compactly enough that a person can read them and a shrunk random failure fits on a line.

use std::fmt;

/// The bytes of one segment.
///
/// `Seed` depends on the absolute device offset, so the same bytes come back whatever request
/// boundaries a read has: a 4 KiB write of `seed:7` at 8192 reads back as `seed:7` from a read at
/// 10240 too. `Fill` and `Hex` repeat from the segment's start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Every byte is this value (`fill:0xab`).
    Fill(u8),
    /// Pseudo-random bytes, a function of the seed and the absolute device offset (`seed:7`).
    Seed(u64),
    /// These bytes, repeated (`hex:00ff10`).
    Hex(Vec<u8>),
    /// Anything at all (`any`); only in expectations, for data the device may choose.
    Any,
}

/// A run of `len` bytes (or the rest of the request when `len` is `None`) of one pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Length in bytes; `None` for "up to the end of the request".
    pub len: Option<u64>,
    /// What the bytes are.
    pub pattern: Pattern,
}

/// A request's data as segments, written `4K*seed:1 fill:0` in a script.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Data(pub Vec<Segment>);

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `out` with the `seed` pattern as it lies at device offset `offset`.
pub fn fill_seed(seed: u64, offset: u64, out: &mut [u8]) {
    let key = splitmix(seed);
    let mut pos = offset;
    let mut i = 0;
    while i < out.len() {
        let word = splitmix(key ^ (pos / 8)).to_le_bytes();
        let start = (pos % 8) as usize;
        let n = (8 - start).min(out.len() - i);
        out[i..i + n].copy_from_slice(&word[start..start + n]);
        i += n;
        pos += n as u64;
    }
}

impl Pattern {
    /// Writes the pattern's bytes for device offset `offset` into `out`. `Any` leaves `out` as
    /// it is.
    pub fn render(&self, offset: u64, out: &mut [u8]) {
        match self {
            Pattern::Fill(b) => out.fill(*b),
            Pattern::Seed(s) => fill_seed(*s, offset, out),
            Pattern::Hex(h) if !h.is_empty() => {
                for (o, b) in out.iter_mut().zip(h.iter().cycle()) {
                    *o = *b;
                }
            }
            Pattern::Hex(_) | Pattern::Any => {}
        }
    }

    /// `len` bytes of the pattern at `offset`.
    pub fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.render(offset, &mut out);
        out
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Fill(b) => write!(f, "fill:{b:#04x}"),
            Pattern::Seed(s) => write!(f, "seed:{s}"),
            Pattern::Hex(h) => {
                f.write_str("hex:")?;
                h.iter().try_for_each(|b| write!(f, "{b:02x}"))
            }
            Pattern::Any => f.write_str("any"),
        }
    }
}

impl Data {
    /// One pattern over the whole request.
    pub fn all(pattern: Pattern) -> Data {
        Data(vec![Segment { len: None, pattern }])
    }

    /// `fill:byte` over the whole request.
    pub fn fill(byte: u8) -> Data {
        Data::all(Pattern::Fill(byte))
    }

    /// `seed:seed` over the whole request.
    pub fn seed(seed: u64) -> Data {
        Data::all(Pattern::Seed(seed))
    }

    /// Exactly these bytes.
    pub fn bytes(bytes: &[u8]) -> Data {
        Data::all(Pattern::Hex(bytes.to_vec()))
    }

    /// Appends a segment of `len` bytes.
    pub fn then(mut self, len: u64, pattern: Pattern) -> Data {
        self.0.push(Segment {
            len: Some(len),
            pattern,
        });
        self
    }

    /// Whether any segment is `any`.
    pub fn has_any(&self) -> bool {
        self.0.iter().any(|s| s.pattern == Pattern::Any)
    }

    /// Splits `0..len` into the segments' byte ranges; `None` when the lengths do not add up to
    /// `len` (too long, or too short with no open-ended segment last).
    pub fn ranges(&self, len: u64) -> Option<Vec<(u64, u64, &Pattern)>> {
        let mut out = Vec::with_capacity(self.0.len());
        let mut at = 0u64;
        for (i, seg) in self.0.iter().enumerate() {
            let n = match seg.len {
                Some(n) => n,
                None if i + 1 == self.0.len() => len.checked_sub(at)?,
                None => return None,
            };
            let end = at.checked_add(n)?;
            if end > len {
                return None;
            }
            out.push((at, n, &seg.pattern));
            at = end;
        }
        (at == len).then_some(out)
    }

    /// The bytes for a request of `len` bytes at `offset`, and which of them matter (`false`
    /// under `any`). `None` when the segments do not add up to `len`.
    pub fn render(&self, offset: u64, len: usize) -> Option<(Vec<u8>, Option<Vec<bool>>)> {
        let ranges = self.ranges(len as u64)?;
        let mut out = vec![0u8; len];
        let mut mask = self.has_any().then(|| vec![true; len]);
        for (at, n, p) in ranges {
            let (at, n) = (at as usize, n as usize);
            p.render(offset + at as u64, &mut out[at..at + n]);
            if let (Pattern::Any, Some(m)) = (p, mask.as_mut()) {
                m[at..at + n].fill(false);
            }
        }
        Some((out, mask))
    }

    /// Describes `bytes` (read at `offset`) as segments, merging blocks of `granule` bytes that
    /// are one fill byte or one seed from `seeds`; other blocks become `hex:`. For printing what
    /// a device returned in the script format.
    pub fn describe(bytes: &[u8], offset: u64, granule: usize, seeds: &[u64]) -> Data {
        let granule = granule.max(1);
        let mut data = Data(Vec::new());
        for (i, chunk) in bytes.chunks(granule).enumerate() {
            let at = offset + (i * granule) as u64;
            let pattern = if chunk.iter().all(|&b| b == chunk[0]) {
                Pattern::Fill(chunk[0])
            } else if let Some(s) = seeds
                .iter()
                .find(|&&s| Pattern::Seed(s).bytes(at, chunk.len()) == chunk)
            {
                Pattern::Seed(*s)
            } else {
                Pattern::Hex(chunk.to_vec())
            };
            data.append(chunk.len() as u64, pattern);
        }
        data.close();
        data
    }

    /// Appends `len` bytes of `pattern`, merged into the last segment when it has the same
    /// pattern (hex segments are never merged: each holds its own bytes).
    pub(crate) fn append(&mut self, len: u64, pattern: Pattern) {
        match self.0.last_mut() {
            Some(last) if last.pattern == pattern && !matches!(pattern, Pattern::Hex(_)) => {
                last.len = last.len.map(|n| n + len);
            }
            _ => self.0.push(Segment {
                len: Some(len),
                pattern,
            }),
        }
    }

    /// Makes the last segment run to the end of the request, as the script format prints it.
    pub(crate) fn close(&mut self) {
        if let Some(last) = self.0.last_mut() {
            last.len = None;
        }
    }
}

impl fmt::Display for Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            if let Some(n) = seg.len {
                write!(f, "{}*", super::parse::size_text(n))?;
            }
            write!(f, "{}", seg.pattern)?;
        }
        Ok(())
    }
}

/// A hex dump of the first place where `actual` differs from `expected` (ignoring bytes whose
/// `mask` is false): up to 32 bytes from the 16-byte line holding the first difference, with the
/// device offset of each line. `None` when they agree.
pub fn first_difference(
    expected: &[u8],
    actual: &[u8],
    mask: Option<&[bool]>,
    offset: u64,
) -> Option<String> {
    if mask.is_none() && expected == actual {
        return None;
    }
    let n = expected.len().min(actual.len());
    let first = (0..n)
        .find(|&i| mask.is_none_or(|m| m[i]) && expected[i] != actual[i])
        .or((expected.len() != actual.len()).then_some(n))?;
    let start = first / 16 * 16;
    let end = (start + 32).min(expected.len().max(actual.len()));
    let mut out = format!(
        "first difference at byte {first} of the request (device offset {}):\n",
        offset + first as u64
    );
    let line = |bytes: &[u8], from: usize| -> String {
        (from..(from + 16).min(end))
            .map(|i| match bytes.get(i) {
                Some(b) if mask.is_none_or(|m| m.get(i).copied().unwrap_or(true)) => {
                    format!("{b:02x}")
                }
                Some(_) => "..".to_string(),
                None => "--".to_string(),
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut from = start;
    while from < end {
        out.push_str(&format!(
            "  {:>10}  expected {}\n  {:>10}  actual   {}\n",
            offset + from as u64,
            line(expected, from),
            "",
            line(actual, from)
        ));
        from += 16;
    }
    Some(out.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_depends_on_absolute_offset_only() {
        let whole = Pattern::Seed(7).bytes(8192, 4096);
        assert_eq!(Pattern::Seed(7).bytes(8192 + 1000, 100), whole[1000..1100]);
        assert_ne!(Pattern::Seed(8).bytes(8192, 4096), whole);
    }

    #[test]
    fn segments_must_add_up() {
        let d = Data::fill(1).0[0].clone();
        assert_eq!(d.len, None);
        let two = Data(vec![])
            .then(512, Pattern::Fill(1))
            .then(512, Pattern::Any);
        assert!(two.render(0, 1024).is_some());
        assert!(two.render(0, 1536).is_none());
        assert!(two.render(0, 512).is_none());
    }

    #[test]
    fn describe_merges_runs() {
        let mut bytes = Pattern::Seed(3).bytes(4096, 2048);
        bytes.extend(vec![0u8; 1024]);
        let d = Data::describe(&bytes, 4096, 512, &[3]);
        assert_eq!(d.to_string(), "2K*seed:3 fill:0x00");
    }

    #[test]
    fn dump_shows_the_first_difference() {
        let a = vec![0u8; 64];
        let mut b = a.clone();
        b[20] = 0xff;
        let dump = first_difference(&a, &b, None, 1000).unwrap();
        assert!(dump.contains("byte 20"), "{dump}");
        assert!(dump.contains("device offset 1020"), "{dump}");
        assert!(dump.contains("ff"), "{dump}");
        assert!(first_difference(&a, &a, None, 0).is_none());
    }
}
