//! The checker: each read of a [`History`] held to the model (see the [module docs](super) for
//! the model and where it comes from).
//!
//! Per logical block, a read may return the value of a write (or write-zeroes, or the initial
//! content, or anything at all after a trim unless the device promises zeroes) that was invoked
//! before the read completed and was not superseded: a write `w` is superseded when another
//! write, invoked after `w` completed, itself completed before the read was invoked. The
//! initial content of a block is unknown but one value: every read that matches no write must
//! agree on it. Reads made after the storage was re-opened must return what the read-back just
//! before the disconnect returned.

use std::collections::HashMap;
use std::fmt::Write as _;

use super::generate::ModelOp;
use super::history::{Event, History, Phase, Value};
use super::report::FailureKind;
use crate::script::{first_difference, Pattern};

/// A read that returned what the model does not allow.
#[derive(Clone, Debug)]
pub struct Violation {
    /// What kind of failure it is.
    pub kind: FailureKind,
    /// The block (in units of the block size).
    pub block: u64,
    /// The read (an index into [`History::events`]).
    pub read: usize,
    /// One line: what went wrong.
    pub summary: String,
    /// The lines that explain it, with hex dumps.
    pub details: String,
}

/// Where the bytes a read returned for one block came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Op(usize),
    Initial,
    Unknown,
}

impl History {
    /// Checks every read; returns every violation, in the order the reads were invoked.
    pub fn check(&self) -> Vec<Violation> {
        Checker::new(self).run()
    }

    /// The violation to report: the first one of `kind` when given, else the first of all
    /// (those found after re-opening only when there is nothing else).
    pub fn first_violation(&self, kind: Option<FailureKind>) -> Option<Violation> {
        let all = self.check();
        match kind {
            Some(k) => all.into_iter().find(|v| v.kind == k),
            None => {
                let reopened = |v: &Violation| self.events[v.read].phase == Phase::Reopened;
                let pick = all
                    .iter()
                    .position(|v| !reopened(v))
                    .or(all.iter().position(reopened));
                pick.map(|i| all[i].clone())
            }
        }
    }

    /// For each read before the disconnect (by event index), per block, the patterns the model
    /// allows it to return: the values of the allowed writes, `Any` after a trim that need
    /// not zero, and the initial content as it was read.
    pub fn expectations(&self) -> HashMap<usize, Vec<Vec<Pattern>>> {
        let mut c = Checker::new(self);
        c.walk();
        let mut out = HashMap::new();
        for (r, ev) in self.events.iter().enumerate() {
            if ev.phase == Phase::Reopened || !matches!(ev.op, ModelOp::Read { .. }) {
                continue;
            }
            let per_block = self
                .blocks(&ev.op)
                .map(|b| {
                    let allowed = c.allowed(r, b);
                    let mut pats: Vec<Pattern> = Vec::new();
                    for &w in &allowed.writes {
                        let p = match self.events[w].op {
                            ModelOp::Write { seed, .. } => Pattern::Seed(seed),
                            ModelOp::Trim { .. } if !self.trim_zeroes => Pattern::Any,
                            _ => Pattern::Fill(0),
                        };
                        if !pats.contains(&p) {
                            pats.push(p);
                        }
                    }
                    if allowed.initial {
                        let p = match c.initial.get(&b) {
                            Some((v, _, _)) if v.iter().all(|&x| x == v[0]) => Pattern::Fill(v[0]),
                            Some((v, _, _)) => Pattern::Hex(v.clone()),
                            None => Pattern::Any,
                        };
                        if !pats.contains(&p) {
                            pats.push(p);
                        }
                    }
                    if pats.contains(&Pattern::Any) {
                        pats = vec![Pattern::Any];
                    }
                    pats
                })
                .collect();
            out.insert(r, per_block);
        }
        out
    }
}

/// The checker's state while it walks the reads.
struct Checker<'h> {
    h: &'h History,
    /// Per block, the writes to it (event indices), in invocation order.
    writers: HashMap<u64, Vec<usize>>,
    /// Per block, its initial content as first seen, and whether that read could legally
    /// return the initial content (else it is a guess: the initial content, or garbage).
    initial: HashMap<u64, (Vec<u8>, bool, usize)>,
    /// Per block, what the read-back before the disconnect returned (`None`: anything may come
    /// back after a trim).
    readback: HashMap<u64, (usize, Option<Vec<u8>>)>,
}

/// The candidates for one block of one read.
struct Allowed {
    /// Writes whose value the read may return.
    writes: Vec<usize>,
    /// Whether the initial content is allowed (no write completed before the read).
    initial: bool,
    /// The newest write acknowledged before the read began (by invocation), which the read
    /// must not predate.
    newest: Option<usize>,
}

impl<'h> Checker<'h> {
    fn new(h: &'h History) -> Checker<'h> {
        let mut writers: HashMap<u64, Vec<usize>> = HashMap::new();
        let mut order: Vec<usize> = (0..h.events.len()).collect();
        order.sort_by_key(|&e| h.events[e].invoked);
        for e in order {
            let ev = &h.events[e];
            if ev.phase == Phase::Run && ev.op.writes() {
                for b in h.blocks(&ev.op) {
                    writers.entry(b).or_default().push(e);
                }
            }
        }
        Checker {
            h,
            writers,
            initial: HashMap::new(),
            readback: HashMap::new(),
        }
    }

    fn ev(&self, e: usize) -> &'h Event {
        &self.h.events[e]
    }

    fn writers(&self, b: u64) -> &[usize] {
        self.writers.get(&b).map_or(&[], Vec::as_slice)
    }

    fn allowed(&self, r: usize, b: u64) -> Allowed {
        let read = self.ev(r);
        let ws = self.writers(b);
        // The newest acknowledged write (by invocation) that completed before the read began:
        // every write that completed before it was invoked is superseded.
        let newest = ws
            .iter()
            .copied()
            .filter(|&w| self.ev(w).result.is_ok() && self.ev(w).completed < read.invoked)
            .max_by_key(|&w| self.ev(w).invoked);
        let bar = newest.map(|w| self.ev(w).invoked);
        let writes = ws
            .iter()
            .copied()
            .filter(|&w| {
                let ew = self.ev(w);
                ew.invoked < read.completed && bar.is_none_or(|m| m < ew.completed)
            })
            .collect();
        Allowed {
            writes,
            initial: newest.is_none(),
            newest,
        }
    }

    fn run(mut self) -> Vec<Violation> {
        self.walk()
    }

    /// Walks every read in order (learning initial contents and the read-back), returns the
    /// violations.
    fn walk(&mut self) -> Vec<Violation> {
        let h = self.h;
        let bs = h.block_size as usize;
        let mut reads: Vec<usize> = (0..h.events.len())
            .filter(|&e| matches!(h.events[e].op, ModelOp::Read { .. }))
            .filter(|&e| h.events[e].result.is_ok())
            .collect();
        reads.sort_by_key(|&e| (h.events[e].phase, h.events[e].invoked));
        let mut found = Vec::new();
        for &r in &reads {
            let ev = self.ev(r);
            let (Some((offset, _)), Ok(data)) = (ev.op.range(), &ev.result) else {
                continue;
            };
            for (k, chunk) in data.chunks(bs).enumerate() {
                let b = offset / h.block_size + k as u64;
                let v = match ev.phase {
                    Phase::Reopened => self.reopened(r, b, chunk),
                    _ => self.read(r, b, chunk),
                };
                if let Some(v) = v {
                    found.push(v);
                }
            }
        }
        // A stale value that the last read of the block still returns is a write lost for
        // good, not a read that came too early.
        let mut last: HashMap<u64, usize> = HashMap::new();
        for &r in &reads {
            if h.events[r].phase != Phase::Reopened {
                for b in h.blocks(&h.events[r].op) {
                    last.insert(b, r);
                }
            }
        }
        let lost: Vec<u64> = found
            .iter()
            .filter(|v| last.get(&v.block) == Some(&v.read))
            .map(|v| v.block)
            .collect();
        for v in &mut found {
            if v.kind == FailureKind::StaleRead && lost.contains(&v.block) {
                v.kind = FailureKind::LostWrite;
                v.details.push_str(
                    "the block still held it when it was last read: the write is lost, not late\n",
                );
            }
        }
        found
    }

    /// Checks block `b` of read `r` (run or read-back phase).
    fn read(&mut self, r: usize, b: u64, chunk: &[u8]) -> Option<Violation> {
        let h = self.h;
        let allowed = self.allowed(r, b);
        let remember = |me: &mut Self, value: Option<Vec<u8>>| {
            if h.events[r].phase == Phase::Readback {
                me.readback.insert(b, (r, value));
            }
        };
        let anything = |w: usize| matches!(h.events[w].op, ModelOp::Trim { .. }) && !h.trim_zeroes;
        if allowed.writes.iter().any(|&w| anything(w)) {
            remember(self, None);
            return None;
        }
        if allowed.writes.iter().any(|&w| h.holds(w, b, chunk)) {
            remember(self, Some(chunk.to_vec()));
            return None;
        }
        // Seed patterns are unique to a write; zeroes are not (the initial content may be
        // zeroes too), so only a seed pattern rules out the initial content.
        let seeded = self
            .writers(b)
            .iter()
            .any(|&w| matches!(h.events[w].op, ModelOp::Write { .. }) && h.holds(w, b, chunk));
        if allowed.initial && !seeded {
            match self.initial.get(&b) {
                Some((v, _, _)) if v.as_slice() == chunk => {
                    remember(self, Some(chunk.to_vec()));
                    return None;
                }
                Some(_) => {}
                None => {
                    self.initial.insert(b, (chunk.to_vec(), true, r));
                    remember(self, Some(chunk.to_vec()));
                    return None;
                }
            }
        }
        remember(self, Some(chunk.to_vec()));
        Some(self.explain(r, b, chunk, &allowed))
    }

    /// Says why block `b` of read `r` is wrong.
    fn explain(&mut self, r: usize, b: u64, chunk: &[u8], allowed: &Allowed) -> Violation {
        let h = self.h;
        let read = self.ev(r);
        let at = b * h.block_size;
        let mut details = String::new();
        let expected = self.expected_text(allowed);
        let _ = writeln!(
            details,
            "the block at {at} does not hold what the model expects ({expected})"
        );
        let newest = allowed.newest.map(|w| {
            let ew = self.ev(w);
            format!(
                "{} had replaced (acknowledged at #{}, before the read began at #{})",
                h.name(w),
                ew.completed,
                read.invoked
            )
        });
        // Which value it is: an older write's first (the newest such), then the initial
        // content, then a write that began after the read (unique seed patterns only).
        let matching: Vec<usize> = self
            .writers(b)
            .iter()
            .copied()
            .filter(|&w| !matches!(h.value(w, b), Value::Any) && h.holds(w, b, chunk))
            .collect();
        let past = matching
            .iter()
            .copied()
            .filter(|&w| self.ev(w).invoked < read.completed)
            .max_by_key(|&w| self.ev(w).invoked);
        let future = matching
            .iter()
            .copied()
            .find(|&w| matches!(h.events[w].op, ModelOp::Write { .. }));
        let source = match (past, self.initial.get(&b), future) {
            (Some(w), _, _) => Source::Op(w),
            (None, Some((v, _, _)), _) if v.as_slice() == chunk => Source::Initial,
            (None, _, Some(w)) => Source::Op(w),
            _ => Source::Unknown,
        };
        let (kind, summary) = match source {
            Source::Op(w) if self.ev(w).invoked >= read.completed => (
                FailureKind::UnfilledRead,
                format!(
                    "block {b} (offset {at}): {} returned the data of {}, which began only \
                     after the read completed (the device returned a buffer it did not fill?)",
                    h.name(r),
                    h.name(w)
                ),
            ),
            Source::Op(w) => (
                FailureKind::StaleRead,
                format!(
                    "block {b} (offset {at}): {} returned the value of {}, which {}",
                    h.name(r),
                    h.label(w),
                    newest.clone().unwrap_or_default()
                ),
            ),
            Source::Initial => {
                let (_, _, first) = self.initial[&b];
                (
                    FailureKind::StaleRead,
                    format!(
                        "block {b} (offset {at}): {} returned the block's initial content (as \
                         {} read it), which {}",
                        h.name(r),
                        h.label(first),
                        newest.clone().unwrap_or_default()
                    ),
                )
            }
            Source::Unknown => match self.torn(b, chunk) {
                Some(parts) => (
                    FailureKind::TornRead,
                    format!(
                        "block {b} (offset {at}) holds parts of two writes: {} returned {parts}",
                        h.name(r)
                    ),
                ),
                None => match self.initial.get(&b) {
                    Some((_, confirmed, first)) => (
                        FailureKind::UnfilledRead,
                        format!(
                            "block {b} (offset {at}): {} returned bytes that no write put there \
                             and that are not the block's initial content ({} read that{})",
                            h.name(r),
                            h.label(*first),
                            if *confirmed { "" } else { ", or so it seemed" }
                        ),
                    ),
                    None => {
                        self.initial.insert(b, (chunk.to_vec(), false, r));
                        (
                            FailureKind::StaleRead,
                            format!(
                                "block {b} (offset {at}): {} returned {} (the block's initial \
                                 content, or bytes the device did not fill), which {}",
                                h.name(r),
                                if chunk.iter().all(|&x| x == 0) {
                                    "zeroes no write of this run put there"
                                } else {
                                    "bytes no write of this run put there"
                                },
                                newest.clone().unwrap_or_default()
                            ),
                        )
                    }
                },
            },
        };
        if read.phase == Phase::Readback {
            let _ = writeln!(
                details,
                "(read back after every client thread had finished: nothing was in flight)"
            );
        }
        self.dumps(&mut details, b, chunk, allowed);
        Violation {
            kind,
            block: b,
            read: r,
            summary,
            details,
        }
    }

    /// `seed:7 (t1.3) or zeroes (t2.4)`.
    fn expected_text(&self, allowed: &Allowed) -> String {
        let h = self.h;
        let mut parts: Vec<String> = allowed
            .writes
            .iter()
            .map(|&w| {
                let what = match h.events[w].op {
                    ModelOp::Write { seed, .. } => format!("seed:{seed}"),
                    _ => "zeroes".into(),
                };
                format!("{what} from {}", h.label(w))
            })
            .collect();
        if allowed.initial {
            parts.push("the initial content".into());
        }
        if parts.is_empty() {
            "nothing: no write allowed".into()
        } else {
            parts.join(" or ")
        }
    }

    /// Hex dumps of the first difference from each allowed value (at most three).
    fn dumps(&self, out: &mut String, b: u64, chunk: &[u8], allowed: &Allowed) {
        let h = self.h;
        let at = b * h.block_size;
        let mut values: Vec<(String, Vec<u8>)> = allowed
            .writes
            .iter()
            .filter_map(|&w| match h.value(w, b) {
                Value::Bytes(v) => Some((format!("the value of {}", h.label(w)), v)),
                Value::Any => None,
            })
            .collect();
        if allowed.initial {
            if let Some((v, _, _)) = self.initial.get(&b) {
                values.push(("the initial content".into(), v.clone()));
            }
        }
        for (name, v) in values.iter().take(3) {
            if let Some(diff) = first_difference(v, chunk, None, at) {
                let _ = writeln!(out, "against {name}: {}", diff.trim_end());
            }
        }
    }

    /// If `chunk` is made of pieces of two or more values block `b` held, names them.
    fn torn(&self, b: u64, chunk: &[u8]) -> Option<String> {
        let h = self.h;
        let mut sources: Vec<(String, Vec<u8>)> = self
            .writers(b)
            .iter()
            .filter_map(|&w| match h.value(w, b) {
                Value::Bytes(v) => Some((h.label(w), v)),
                Value::Any => None,
            })
            .collect();
        if let Some((v, _, _)) = self.initial.get(&b) {
            sources.push(("the initial content".into(), v.clone()));
        }
        // Seed patterns are made of 8-byte words: compare word by word.
        let words = chunk.len().div_ceil(8);
        let word = |v: &[u8], i: usize| v[i * 8..(i * 8 + 8).min(v.len())].to_vec();
        let covers: Vec<Vec<bool>> = sources
            .iter()
            .map(|(_, v)| (0..words).map(|i| word(v, i) == word(chunk, i)).collect())
            .collect();
        if !(0..words).all(|i| covers.iter().any(|c| c[i])) {
            return None;
        }
        // Attribute each run of words to the first source covering it.
        let mut parts = Vec::new();
        let mut i = 0;
        while i < words {
            let s = covers.iter().position(|c| c[i])?;
            let mut j = i;
            while j < words && covers[s][j] {
                j += 1;
            }
            parts.push(format!(
                "bytes {}..{} from {}",
                i * 8,
                (j * 8).min(chunk.len()),
                sources[s].0
            ));
            i = j;
        }
        (parts.len() > 1).then(|| parts.join(", "))
    }

    /// Checks block `b` of read `r` made after re-opening the storage.
    fn reopened(&mut self, r: usize, b: u64, chunk: &[u8]) -> Option<Violation> {
        let h = self.h;
        let (before, value) = self.readback.get(&b)?.clone();
        let value = value?;
        if value == chunk {
            return None;
        }
        let at = b * h.block_size;
        let mut details = String::new();
        let _ = writeln!(
            details,
            "the device was detached cleanly (DISC; the server unmounted it), the same storage \
             re-opened and attached again"
        );
        if let Some(diff) = first_difference(&value, chunk, None, at) {
            let _ = writeln!(
                details,
                "against what {} returned before: {}",
                h.label(before),
                diff.trim_end()
            );
        }
        Some(Violation {
            kind: FailureKind::LostAcrossDisconnect,
            block: b,
            read: r,
            summary: format!(
                "block {b} (offset {at}) held {} before the disconnect ({}), but {} after \
                 re-opening the storage ({})",
                h.source_text(b, &value, None),
                h.label(before),
                h.source_text(b, chunk, None),
                h.label(r)
            ),
            details,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::history::build::Build;
    use super::*;

    fn seed(s: u64, offset: u64, len: usize) -> Vec<u8> {
        Pattern::Seed(s).bytes(offset, len)
    }

    fn kinds(h: &History) -> Vec<FailureKind> {
        h.check().iter().map(|v| v.kind).collect()
    }

    #[test]
    fn a_read_overlapping_a_write_may_return_either_value() {
        for got in [seed(1, 0, 512), seed(2, 0, 512)] {
            let h = Build::new(512)
                .write(0, 0, 512, 1, (0, 1))
                .write(0, 0, 512, 2, (2, 5))
                .read(1, 0, got, (3, 4))
                .0;
            assert!(h.check().is_empty());
        }
    }

    #[test]
    fn a_read_after_an_acknowledged_write_must_not_return_the_older_value() {
        let h = Build::new(512)
            .write(0, 0, 512, 1, (0, 1))
            .write(0, 0, 512, 2, (2, 3))
            .read(1, 0, seed(1, 0, 512), (4, 5))
            .read(1, 0, seed(2, 0, 512), (6, 7))
            .0;
        let v = h.check();
        assert_eq!(kinds(&h), [FailureKind::StaleRead]);
        assert!(
            v[0].summary.contains("returned the value of t1.1"),
            "{}",
            v[0].summary
        );
        assert!(
            v[0].summary.contains("t1.2 (write 0 512 seed:2)"),
            "{}",
            v[0].summary
        );
        assert!(v[0]
            .details
            .contains("does not hold what the model expects (seed:2 from t1.2)"));
        assert!(
            v[0].details.contains("first difference"),
            "{}",
            v[0].details
        );
    }

    #[test]
    fn a_stale_value_that_stays_is_a_lost_write() {
        let h = Build::new(512)
            .write(0, 0, 512, 1, (0, 1))
            .write(0, 0, 512, 2, (2, 3))
            .read(1, 0, seed(1, 0, 512), (4, 5))
            .read_as(Phase::Readback, 0, 0, seed(1, 0, 512), (6, 7))
            .0;
        assert_eq!(kinds(&h), [FailureKind::LostWrite, FailureKind::LostWrite]);
        let v = h.first_violation(None).unwrap();
        assert_eq!(v.read, 2);
        assert!(v.details.contains("lost, not late"), "{}", v.details);
    }

    #[test]
    fn concurrent_writes_may_land_in_either_order_but_reads_must_agree_with_time() {
        // Two overlapping writes: either may win, and a later read may see either.
        for winner in [1, 2] {
            let h = Build::new(512)
                .write(0, 0, 512, 1, (0, 3))
                .write(1, 0, 512, 2, (1, 2))
                .read(0, 0, seed(winner, 0, 512), (4, 5))
                .0;
            assert!(h.check().is_empty());
        }
        // A write invoked after the read completed is never visible to it.
        let h = Build::new(512)
            .read(0, 0, vec![0; 512], (0, 1))
            .read(0, 0, seed(9, 0, 512), (2, 3))
            .write(1, 0, 512, 9, (4, 5))
            .0;
        assert_eq!(kinds(&h), [FailureKind::UnfilledRead]);
    }

    #[test]
    fn the_initial_content_is_one_unknown_value() {
        let h = Build::new(512)
            .read(0, 0, vec![7; 512], (0, 1))
            .read(1, 0, vec![7; 512], (2, 3))
            .0;
        assert!(h.check().is_empty());
        let h = Build::new(512)
            .read(0, 0, vec![7; 512], (0, 1))
            .read(1, 0, vec![8; 512], (2, 3))
            .0;
        assert_eq!(kinds(&h), [FailureKind::UnfilledRead]);
        // Superseded initial content.
        let h = Build::new(512)
            .read(0, 0, vec![7; 512], (0, 1))
            .write(0, 0, 512, 3, (2, 3))
            .read(1, 0, vec![7; 512], (4, 5))
            .read(1, 0, seed(3, 0, 512), (6, 7))
            .0;
        assert_eq!(kinds(&h), [FailureKind::StaleRead]);
        assert!(h.check()[0]
            .summary
            .contains("initial content (as t1.1 read it)"));
    }

    #[test]
    fn parts_of_two_writes_in_one_block_are_a_torn_read() {
        let mut torn = seed(1, 4096, 4096);
        torn[2048..].copy_from_slice(&seed(2, 4096 + 2048, 2048));
        let h = Build::new(4096)
            .write(0, 4096, 4096, 1, (0, 3))
            .write(1, 0, 8192, 2, (1, 2))
            .read(0, 4096, torn, (4, 5))
            .0;
        let v = h.check();
        assert_eq!(kinds(&h), [FailureKind::TornRead]);
        assert!(
            v[0].summary
                .contains("bytes 0..2048 from t1.1, bytes 2048..4096 from t2.1"),
            "{}",
            v[0].summary
        );
        // Across block boundaries, mixing is allowed.
        let mut mixed = seed(1, 0, 1024);
        mixed[512..].copy_from_slice(&seed(2, 512, 512));
        let h = Build::new(512)
            .write(0, 0, 1024, 1, (0, 3))
            .write(1, 0, 1024, 2, (1, 2))
            .read(0, 0, mixed, (4, 5))
            .0;
        assert!(h.check().is_empty());
    }

    #[test]
    fn trim_allows_anything_unless_it_promises_zeroes() {
        let trim = ModelOp::Trim {
            offset: 0,
            len: 512,
        };
        let build = |zeroes| {
            let mut b = Build::new(512)
                .write(0, 0, 512, 1, (0, 1))
                .op(Phase::Run, 0, trim, (2, 3))
                .read(1, 0, vec![0x55; 512], (4, 5));
            b.0.trim_zeroes = zeroes;
            b.0
        };
        assert!(build(false).check().is_empty());
        // Bytes no write put there, never read before: the initial content at best, and the
        // trim had replaced that.
        assert_eq!(kinds(&build(true)), [FailureKind::LostWrite]);
    }

    #[test]
    fn reopened_storage_must_hold_what_was_read_back() {
        let h = Build::new(512)
            .write(0, 0, 512, 1, (0, 3))
            .write(1, 0, 512, 2, (1, 2))
            .read_as(Phase::Readback, 0, 0, seed(2, 0, 512), (4, 5))
            .read_as(Phase::Reopened, 0, 0, seed(1, 0, 512), (6, 7))
            .0;
        let v = h.check();
        assert_eq!(kinds(&h), [FailureKind::LostAcrossDisconnect]);
        assert!(
            v[0].summary
                .contains("held the value of t2.1 before the disconnect"),
            "{}",
            v[0].summary
        );
        assert!(
            v[0].summary.contains("but the value of t1.1 after"),
            "{}",
            v[0].summary
        );
        let excerpt = h.excerpt(0, Some(3), 10);
        assert!(excerpt.contains("reopened 1"), "{excerpt}");
        assert!(excerpt.contains("=> #6"), "{excerpt}");
    }
}
