//! The model of a trace: what each read must return, given the writes before it.
//!
//! Ops are swept in logical-time order. A write takes effect when it returns. A read is checked
//! against the content when it returns, except where a content-changing op overlapped it in both
//! range and time: the device may have served those bytes before or after that op, so they are
//! left unchecked. Two writes that overlapped in range and time leave their common range
//! unknown, as do failed writes and trims (trimmed data is unspecified).

use std::collections::BTreeMap;
use std::ops::Range;

use super::{hash64, OpKind, Trace, TraceOp};

/// What a range of the device holds according to the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// Not known: never written on a device of unknown initial content, trimmed, written by a
    /// failed or racing write, or overlapped by a write in flight during the read.
    Unknown,
    /// Zeroes.
    Zero,
    /// What op `n` of the trace (a successful write) wrote there.
    Written(usize),
}

/// Byte ranges mapped to what they hold; gaps are [`Fill::Unknown`] or [`Fill::Zero`] according
/// to `gap`.
#[derive(Clone, Debug)]
struct RangeMap {
    /// start -> (end, fill); ranges never overlap.
    map: BTreeMap<u64, (u64, Fill)>,
    gap: Fill,
}

impl RangeMap {
    fn new(gap: Fill) -> RangeMap {
        RangeMap {
            map: BTreeMap::new(),
            gap,
        }
    }

    /// Cuts the range containing `at` (if any) in two at `at`.
    fn split(&mut self, at: u64) {
        let Some((&s, &(e, f))) = self.map.range(..at).next_back() else {
            return;
        };
        if e > at {
            self.map.insert(s, (at, f));
            self.map.insert(at, (e, f));
        }
    }

    fn set(&mut self, r: Range<u64>, fill: Fill) {
        if r.is_empty() {
            return;
        }
        self.split(r.start);
        self.split(r.end);
        let inside: Vec<u64> = self.map.range(r.clone()).map(|(&s, _)| s).collect();
        for s in inside {
            self.map.remove(&s);
        }
        if fill != self.gap {
            self.map.insert(r.start, (r.end, fill));
        }
    }

    /// The pieces of `r`, in order, covering it exactly.
    fn get(&self, r: Range<u64>) -> Vec<(Range<u64>, Fill)> {
        let mut out = Vec::new();
        let mut pos = r.start;
        let first = self
            .map
            .range(..=r.start)
            .next_back()
            .filter(|(_, &(e, _))| e > r.start)
            .map(|(&s, _)| s)
            .unwrap_or(r.start);
        for (&s, &(e, f)) in self.map.range(first..r.end) {
            let s = s.max(r.start);
            if s > pos {
                out.push((pos..s, self.gap));
            }
            let e = e.min(r.end);
            out.push((s..e, f));
            pos = e;
        }
        if pos < r.end {
            out.push((pos..r.end, self.gap));
        }
        out
    }
}

/// What one read must return: its range cut into pieces, each with what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expectation {
    /// Byte ranges of the device covering the read, in order, with their expected content.
    pub ranges: Vec<(Range<u64>, Fill)>,
}

impl Expectation {
    /// Bytes whose value the model knows.
    pub fn known_bytes(&self) -> u64 {
        self.ranges
            .iter()
            .filter(|(_, f)| *f != Fill::Unknown)
            .map(|(r, _)| r.end - r.start)
            .sum()
    }

    /// Whether every byte is known.
    pub fn fully_known(&self) -> bool {
        self.ranges.iter().all(|(_, f)| *f != Fill::Unknown)
    }
}

/// The result of [`Trace::verify`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Reads whose recorded checksum matched the model.
    pub reads_verified: u64,
    /// Reads the model cannot fully predict (racing writes, trimmed or never-written content of
    /// unknown value), not checked.
    pub reads_ambiguous: u64,
}

fn overlap(a: &TraceOp, b: &TraceOp) -> Option<Range<u64>> {
    let s = a.offset.max(b.offset);
    let e = (a.offset + a.len).min(b.offset + b.len);
    (s < e).then_some(s..e)
}

impl Trace {
    /// For each op, in order: what it must read (`Some` for successful reads, `None` for the
    /// rest), on a device that reads trimmed ranges as zeroes if `trim_zeroes`, else as
    /// anything.
    pub fn expectations(&self, trim_zeroes: bool) -> Vec<Option<Expectation>> {
        let trimmed = if trim_zeroes {
            Fill::Zero
        } else {
            Fill::Unknown
        };
        let gap = if self.header.initial_zeroes {
            Fill::Zero
        } else {
            Fill::Unknown
        };
        let mut content = RangeMap::new(gap);
        // Events: (tick, 0 = start / 1 = end, op). At equal ticks starts come first, which can
        // only make more bytes unknown, never fewer.
        let mut events: Vec<(u64, u8, usize)> = Vec::with_capacity(self.ops.len() * 2);
        for (i, op) in self.ops.iter().enumerate() {
            if op.kind == OpKind::Flush {
                continue;
            }
            events.push((op.start, 0, i));
            events.push((op.end, 1, i));
        }
        events.sort_unstable();
        let mut in_flight: Vec<usize> = Vec::new();
        // Per op: ranges made unknown by ops overlapping it in time.
        let mut tainted: Vec<Vec<Range<u64>>> = vec![Vec::new(); self.ops.len()];
        let mut out = vec![None; self.ops.len()];
        for (_, phase, i) in events {
            let op = &self.ops[i];
            if phase == 0 {
                for &j in &in_flight {
                    let other = &self.ops[j];
                    let Some(r) = overlap(op, other) else {
                        continue;
                    };
                    // A read racing a change is unknown where they meet; two racing changes
                    // leave their common range unknown. A read changes nothing for a write.
                    if other.kind.mutates() {
                        tainted[i].push(r.clone());
                    }
                    if op.kind.mutates() {
                        tainted[j].push(r);
                    }
                }
                in_flight.push(i);
                continue;
            }
            in_flight.retain(|&j| j != i);
            let range = op.offset..op.offset + op.len;
            match op.kind {
                OpKind::Read { .. } if op.errno.is_none() => {
                    let mut view = RangeMap::new(Fill::Unknown);
                    for (r, f) in content.get(range.clone()) {
                        view.set(r, f);
                    }
                    for r in &tainted[i] {
                        view.set(r.clone(), Fill::Unknown);
                    }
                    out[i] = Some(Expectation {
                        ranges: view.get(range),
                    });
                }
                OpKind::Read { .. } | OpKind::Flush => {}
                _ => {
                    let fill = match op.kind {
                        _ if op.errno.is_some() => Fill::Unknown,
                        OpKind::Write { .. } => Fill::Written(i),
                        OpKind::WriteZeroes { .. } => Fill::Zero,
                        _ => trimmed,
                    };
                    content.set(range, fill);
                    for r in &tainted[i] {
                        content.set(r.clone(), Fill::Unknown);
                    }
                }
            }
        }
        out
    }

    /// Fills `buf` (which covers `range` of the device) with the content the model gives for
    /// `fill`; false for [`Fill::Unknown`].
    pub(crate) fn expected_bytes(&self, range: Range<u64>, fill: Fill, buf: &mut [u8]) -> bool {
        match fill {
            Fill::Unknown => false,
            Fill::Zero => {
                buf.fill(0);
                true
            }
            Fill::Written(i) => {
                let Some(op) = self.ops.get(i) else {
                    return false;
                };
                let OpKind::Write { pieces, .. } = &op.kind else {
                    return false;
                };
                for ((p_off, p_len), &r) in Trace::pieces(op.offset, op.len).zip(pieces) {
                    let s = p_off.max(range.start);
                    let e = (p_off + p_len).min(range.end);
                    if s >= e {
                        continue;
                    }
                    let dst = &mut buf[(s - range.start) as usize..(e - range.start) as usize];
                    match self.piece(r) {
                        Some(data) => {
                            dst.copy_from_slice(&data[(s - p_off) as usize..(e - p_off) as usize])
                        }
                        None => dst.fill(0),
                    }
                }
                true
            }
        }
    }

    /// Checks the trace against itself: every read the model fully predicts must have returned,
    /// at record time, data with the checksum recorded. A failure means the recorded device
    /// returned something its own earlier writes do not explain (or the trace is damaged); it
    /// names the op.
    pub fn verify(&self) -> Result<VerifyReport, String> {
        let mut report = VerifyReport::default();
        for (i, exp) in self
            .expectations(self.header.trim_zeroes)
            .into_iter()
            .enumerate()
        {
            let Some(exp) = exp else { continue };
            let op = &self.ops[i];
            let OpKind::Read { hash: Some(hash) } = op.kind else {
                continue;
            };
            if !exp.fully_known() {
                report.reads_ambiguous += 1;
                continue;
            }
            let mut buf = vec![0u8; op.len as usize];
            for (r, f) in &exp.ranges {
                let at = (r.start - op.offset) as usize..(r.end - op.offset) as usize;
                self.expected_bytes(r.clone(), *f, &mut buf[at]);
            }
            if hash64(&buf) != hash {
                return Err(format!(
                    "op #{i} ({op}): the device returned data with checksum {hash:016x}, the \
                     model of the trace expects {:016x} ({})",
                    hash64(&buf),
                    describe(&exp, &self.ops)
                ));
            }
            report.reads_verified += 1;
        }
        Ok(report)
    }
}

/// "zeroes at 0..4096, op #3 at 4096..8192".
pub(crate) fn describe(exp: &Expectation, ops: &[TraceOp]) -> String {
    exp.ranges
        .iter()
        .map(|(r, f)| {
            let what = match f {
                Fill::Unknown => "unknown".to_string(),
                Fill::Zero => "zeroes".to_string(),
                Fill::Written(i) => match ops.get(*i) {
                    Some(op) => format!("op #{i} ({})", op.kind.name()),
                    None => format!("op #{i}"),
                },
            };
            format!("{what} at {}..{}", r.start, r.end)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_map_splits_and_merges_gaps() {
        let mut m = RangeMap::new(Fill::Zero);
        m.set(0..100, Fill::Written(1));
        m.set(50..150, Fill::Written(2));
        m.set(10..20, Fill::Zero);
        assert_eq!(
            m.get(0..200),
            vec![
                (0..10, Fill::Written(1)),
                (10..20, Fill::Zero),
                (20..50, Fill::Written(1)),
                (50..150, Fill::Written(2)),
                (150..200, Fill::Zero),
            ]
        );
        assert_eq!(m.get(60..70), vec![(60..70, Fill::Written(2))]);
        m.set(0..200, Fill::Zero);
        assert_eq!(m.get(0..200), vec![(0..200, Fill::Zero)]);
        assert!(m.map.is_empty());
    }
}
