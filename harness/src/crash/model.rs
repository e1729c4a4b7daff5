//! The crash model: from a timed history of writes and flushes, what each block may hold after a
//! power loss at a given moment, and the [`Violation`] that names a block holding anything else.
//! The rules are in the [module docs](super); this file applies them.
//!
//! Time is a counter every driver thread draws from: an op is invoked at `inv` (drawn before it
//! is sent) and completed at `comp` (drawn after its reply arrived); a power loss is simulated
//! between `cs` (drawn before [`Crashable::crash`](super::Crashable::crash) is called) and `ce`
//! (drawn after it returned). So `a.comp < b.inv` means `a` really completed before `b` was sent,
//! and `w.inv < ce` means `w` may have reached the device before the power went.

use std::collections::BTreeMap;
use std::fmt;

use super::ops::CrashOp;
use crate::trace::hash64;

/// A point on the history's clock.
pub(crate) type Time = u64;

/// When an op ran: invoked (stamped before it was sent) and completed (stamped after its reply).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub inv: Time,
    pub comp: Time,
}

/// What the rules make of an op, from what the device advertised.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Effect {
    /// It reached the device (a trim to a device without trim does not).
    pub applied: bool,
    /// Durable as soon as it completed.
    pub durable: Option<Durable>,
    /// The kernel followed it with a flush (a FUA write to a device with a cache but no FUA).
    pub implies_flush: bool,
}

/// Why a write is durable as soon as it completed, without a flush.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Durable {
    /// It was a FUA write.
    Fua,
    /// It was a FUA write to a device with a cache but without FUA, which kernels send as the
    /// write followed by a flush: durable by that flush.
    FuaThenFlush,
    /// The device has no write cache (it did not advertise flush).
    NoCache,
}

/// What an op did to one block.
#[derive(Clone, Copy, Debug)]
struct Event {
    op: usize,
    inv: Time,
    comp: Time,
    /// The content's hash; `None` after a trim: anything.
    hash: Option<u64>,
    durable: Option<Durable>,
}

impl Event {
    /// Whether the rules make this event durable at a power loss starting at `cs`, when every
    /// write completed before `covered` was covered by a completed flush.
    fn required(&self, cs: Time, covered: Time) -> bool {
        self.comp < covered || (self.durable.is_some() && self.comp < cs)
    }

    fn matches(&self, hash: u64) -> bool {
        self.hash.is_none_or(|h| h == hash)
    }
}

/// One block's history.
#[derive(Clone, Debug)]
struct Block {
    /// The hash of its content before the run.
    initial: u64,
    /// The content before the run is still allowed (no write to it is durable yet).
    initial_live: bool,
    /// Events not superseded by a durable write: the candidates.
    events: Vec<Event>,
    /// Events superseded for good, the newest few, to name a stale value in a report.
    gone: Vec<Event>,
}

/// How many superseded events a block keeps for reports.
const GONE_KEPT: usize = 32;

impl Block {
    /// Drops the events that completed before the durable write sent at `inv`: they can never
    /// come back, at this power loss or any later one.
    fn supersede(&mut self, inv: Time) {
        self.initial_live = false;
        if self.events.iter().all(|e| e.comp >= inv) {
            return;
        }
        let (old, live): (Vec<Event>, Vec<Event>) = self.events.iter().partition(|e| e.comp < inv);
        self.events = live;
        self.gone.extend(old);
        let excess = self.gone.len().saturating_sub(GONE_KEPT);
        self.gone.drain(..excess);
    }

    /// The candidates at a power loss that ended at `ce`: the content before the run if still
    /// live, then every live event sent before `ce`.
    fn allowed(&self, ce: Time) -> impl Iterator<Item = Value> + '_ {
        let initial = self.initial_live.then_some(Value::Initial(self.initial));
        initial.into_iter().chain(
            self.events
                .iter()
                .filter(move |e| e.inv < ce)
                .map(|e| Value::Written(*e)),
        )
    }
}

/// A value a block may hold.
#[derive(Clone, Copy, Debug)]
enum Value {
    Initial(u64),
    Written(Event),
}

impl Value {
    fn matches(&self, hash: u64) -> bool {
        match self {
            Value::Initial(h) => *h == hash,
            Value::Written(e) => e.matches(hash),
        }
    }
}

/// A flush (or the flush the kernel sends after a FUA write to a device without FUA).
#[derive(Clone, Copy, Debug)]
struct Flush {
    op: usize,
    inv: Time,
    comp: Time,
}

/// An op of the history, for reports.
#[derive(Clone, Debug)]
struct OpRecord {
    /// `op #3 (write)`.
    label: String,
    /// `op #3 (write at 4096 (512 bytes), thread 1)`.
    detail: String,
    inv: Time,
    comp: Time,
    /// First block and block count of a write with data (for the torn-write check).
    data_blocks: Option<(u64, u64)>,
}

/// A simulated power loss, with the content of the blocks read from the device that survived.
#[derive(Clone, Debug)]
pub(crate) struct PowerLoss {
    /// Clock before `crash()` was called.
    pub cs: Time,
    /// Clock after it returned.
    pub ce: Time,
    /// The op whose completion triggered it.
    pub after: usize,
    /// What the run was, for reports (a seed, threads).
    pub run: Option<String>,
}

/// What kind of rule a surviving block breaks; the first words of a report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ViolationKind {
    /// A write covered by a completed flush is gone.
    LostAfterFlush,
    /// A completed FUA write is gone.
    LostFuaWrite,
    /// A completed write to a device without a write cache (no flush capability) is gone.
    LostWrite,
    /// Some blocks of a write survived and others did not, on a device that promises whole
    /// writes ([`CrashOptions::atomic_writes`](super::CrashOptions::atomic_writes)).
    TornWrite,
    /// A block holds data of a write sent after the power loss: `crash()` did not return a
    /// snapshot.
    WrittenAfterPowerLoss,
    /// A block holds data no write of the run wrote.
    UnknownData,
}

impl fmt::Display for ViolationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ViolationKind::LostAfterFlush => "lost after flush",
            ViolationKind::LostFuaWrite => "lost FUA write",
            ViolationKind::LostWrite => "lost write on a device without a write cache",
            ViolationKind::TornWrite => "torn write",
            ViolationKind::WrittenAfterPowerLoss => "data written after the power loss",
            ViolationKind::UnknownData => "data no write wrote",
        })
    }
}

/// A block that survived a simulated power loss with a value the rules do not allow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Which rule it breaks.
    pub kind: ViolationKind,
    /// What was lost and why it had to survive, in a sentence.
    pub summary: String,
    /// Ops completed before the power loss.
    pub crash_after: usize,
    /// The op whose completion the power loss followed, described (`op #12 (flush)`).
    pub last_op: String,
    /// The flush that covered the most writes among those completed before the power loss.
    pub last_flush: Option<usize>,
    /// Ops in flight during the power loss, described (concurrent runs).
    pub in_flight: Vec<String>,
    /// The block (in device blocks).
    pub block: u64,
    /// Its byte offset.
    pub offset: u64,
    /// The values allowed, described with short hashes (`op #3 (write) [1a2b3c4d]`).
    pub allowed: Vec<String>,
    /// The value found, described.
    pub found: String,
    /// The run, when it needs saying (seed and threads of a concurrent run).
    pub run: Option<String>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}: {}", self.kind, self.summary)?;
        write!(
            f,
            "power lost after {} (last completed flush: {})",
            self.last_op,
            self.last_flush
                .map_or("none".to_string(), |i| format!("op #{i}")),
        )?;
        if !self.in_flight.is_empty() {
            write!(f, ", in flight: {}", self.in_flight.join(", "))?;
        }
        write!(
            f,
            ": block {} (offset {}) holds {}; allowed: {}",
            self.block,
            self.offset,
            self.found,
            self.allowed.join(", ")
        )?;
        if let Some(run) = &self.run {
            write!(f, "\n{run}")?;
        }
        Ok(())
    }
}

/// Every block the run touched, with its history, and every flush.
#[derive(Clone)]
pub(crate) struct Model {
    bs: u64,
    atomic_writes: bool,
    blocks: BTreeMap<u64, Block>,
    flushes: Vec<Flush>,
    ops: Vec<OpRecord>,
    zero_hash: u64,
    zero_block: Vec<u8>,
}

impl Model {
    pub(crate) fn new(block_size: u64, atomic_writes: bool) -> Model {
        let zero_block = vec![0u8; block_size as usize];
        Model {
            bs: block_size,
            atomic_writes,
            blocks: BTreeMap::new(),
            flushes: Vec::new(),
            ops: Vec::new(),
            zero_hash: hash64(&zero_block),
            zero_block,
        }
    }

    /// hash64 of a block; zero blocks, the most common, by a plain comparison.
    pub(crate) fn hash(&self, block: &[u8]) -> u64 {
        if block == &self.zero_block[..] {
            self.zero_hash
        } else {
            hash64(block)
        }
    }

    /// Whether the block's content before the run is known.
    pub(crate) fn knows(&self, block: u64) -> bool {
        self.blocks.contains_key(&block)
    }

    /// Sets the block's content before the run.
    pub(crate) fn learn(&mut self, block: u64, hash: u64) {
        self.blocks.entry(block).or_insert(Block {
            initial: hash,
            initial_live: true,
            events: Vec::new(),
            gone: Vec::new(),
        });
    }

    /// The blocks known, in order.
    pub(crate) fn block_numbers(&self) -> Vec<u64> {
        self.blocks.keys().copied().collect()
    }

    /// Records op `index` (ops are recorded in index order), sent by `thread` (in a
    /// concurrent run), with when it ran and what it did.
    pub(crate) fn record(
        &mut self,
        index: usize,
        op: &CrashOp,
        thread: Option<usize>,
        Stamp { inv, comp }: Stamp,
        Effect {
            applied,
            durable,
            implies_flush,
        }: Effect,
    ) {
        debug_assert_eq!(index, self.ops.len(), "ops are recorded in order");
        let bs = self.bs;
        let detail = match thread {
            Some(t) => format!("op #{index} ({op}, thread {t})"),
            None => format!("op #{index} ({op})"),
        };
        let data_blocks = match op {
            CrashOp::Write { offset, data } | CrashOp::WriteFua { offset, data } => {
                Some((offset / bs, data.len() as u64 / bs))
            }
            _ => None,
        };
        self.ops.push(OpRecord {
            label: format!("op #{index} ({})", op.name()),
            detail,
            inv,
            comp,
            data_blocks,
        });
        if implies_flush {
            self.flushes.push(Flush {
                op: index,
                inv,
                comp,
            });
        }
        if !applied {
            return;
        }
        // The value each block of the range gets.
        let values: Vec<(u64, Option<u64>)> = match op {
            CrashOp::Write { offset, data } | CrashOp::WriteFua { offset, data } => data
                .chunks(bs as usize)
                .enumerate()
                .map(|(i, d)| (offset / bs + i as u64, Some(self.hash(d))))
                .collect(),
            CrashOp::WriteZeroes { offset, len } => (offset / bs..(offset + len).div_ceil(bs))
                .map(|b| (b, Some(self.zero_hash)))
                .collect(),
            CrashOp::Trim { offset, len } => (offset / bs..(offset + len).div_ceil(bs))
                .map(|b| (b, None))
                .collect(),
            CrashOp::Flush => {
                self.flushes.push(Flush {
                    op: index,
                    inv,
                    comp,
                });
                return;
            }
        };
        for (b, hash) in values {
            // A block whose content before the run is unknown was not read: not checked.
            if let Some(st) = self.blocks.get_mut(&b) {
                st.events.push(Event {
                    op: index,
                    inv,
                    comp,
                    hash,
                    durable,
                });
            }
        }
    }

    fn describe(&self, v: &Value) -> String {
        let (what, hash) = match v {
            Value::Initial(h) => ("the content before the run".to_string(), Some(*h)),
            Value::Written(e) => (
                self.ops
                    .get(e.op)
                    .map_or_else(|| format!("op #{}", e.op), |o| o.label.clone()),
                e.hash,
            ),
        };
        match hash {
            Some(h) if h == self.zero_hash => format!("{what} [zeroes]"),
            Some(h) => format!("{what} [{:08x}]", h >> 32),
            None => format!("{what} [anything: trimmed]"),
        }
    }

    fn op_label(&self, op: usize) -> String {
        self.ops
            .get(op)
            .map_or_else(|| format!("op #{op}"), |o| o.label.clone())
    }

    /// Checks `found` (block, hash of its content in the survivor, by block) against the rules
    /// for `loss`. Power losses must be checked in the order of their `cs`: what one makes
    /// durable stays durable for the next. Returns the number of blocks checked.
    pub(crate) fn check(
        &mut self,
        loss: &PowerLoss,
        found: &[(u64, u64)],
    ) -> Result<u64, Box<Violation>> {
        // The completed flush sent last covers every write completed before it was sent.
        let cover = self
            .flushes
            .iter()
            .filter(|f| f.comp < loss.cs)
            .max_by_key(|f| f.inv)
            .copied();
        let covered = cover.map_or(0, |f| f.inv);
        let mut checked = 0u64;
        let mut bad = None;
        // `found` is sorted like the map: walk both together rather than look each block up.
        let mut blocks = self
            .blocks
            .range_mut(found.first().map_or(0, |f| f.0)..)
            .peekable();
        for &(b, hash) in found {
            while blocks.next_if(|(k, _)| **k < b).is_some() {}
            let Some((_, st)) = blocks.next_if(|(k, _)| **k == b) else {
                continue;
            };
            // The durable write sent last: nothing that completed before it was sent survives.
            let newest = st
                .events
                .iter()
                .filter(|e| e.required(loss.cs, covered))
                .max_by_key(|e| e.inv)
                .copied();
            if let Some(d) = newest {
                st.supersede(d.inv);
            }
            checked += 1;
            if !st.allowed(loss.ce).any(|v| v.matches(hash)) {
                bad = Some((b, hash, newest));
                break;
            }
        }
        if let Some((b, hash, newest)) = bad {
            return Err(self.violation(loss, cover, newest, b, hash));
        }
        if self.atomic_writes {
            self.check_torn(loss, cover, found)?;
        }
        Ok(checked)
    }

    /// The report of block `b` holding `hash`, which no rule allows.
    fn violation(
        &self,
        loss: &PowerLoss,
        cover: Option<Flush>,
        newest: Option<Event>,
        b: u64,
        hash: u64,
    ) -> Box<Violation> {
        let st = &self.blocks[&b];
        let stale = if st.initial == hash {
            Some(Value::Initial(hash))
        } else {
            st.gone
                .iter()
                .rev()
                .find(|e| e.matches(hash))
                .map(|e| Value::Written(*e))
        };
        let future = st
            .events
            .iter()
            .find(|e| e.inv >= loss.ce && e.matches(hash));
        let (kind, summary, found) = match (stale, newest, future) {
            (Some(old), Some(d), _) => {
                let by_flush = d.comp < cover.map_or(0, |f| f.inv);
                let lost = self.op_label(d.op);
                let old = self.describe(&old);
                match (by_flush, d.durable) {
                    (false, Some(Durable::Fua)) => (
                        ViolationKind::LostFuaWrite,
                        format!(
                            "block {b} lost {lost}, which completed before the power loss; it \
                             holds {old}"
                        ),
                        format!("{old}, since superseded"),
                    ),
                    (false, Some(Durable::NoCache)) => (
                        ViolationKind::LostWrite,
                        format!(
                            "block {b} lost {lost}, which completed before the power loss on a \
                             device that advertises no flush (so no volatile cache); it holds \
                             {old}"
                        ),
                        format!("{old}, since superseded"),
                    ),
                    (false, Some(Durable::FuaThenFlush)) => (
                        ViolationKind::LostAfterFlush,
                        format!(
                            "block {b} lost {lost}, which the kernel sent as a write followed by \
                             a flush (the device has no FUA); that flush completed before the \
                             power loss; it holds {old}"
                        ),
                        format!("{old}, since superseded"),
                    ),
                    _ => {
                        let flush = cover.map_or("a flush".into(), |f| self.op_label(f.op));
                        (
                            ViolationKind::LostAfterFlush,
                            format!(
                                "block {b} lost {lost}, which completed before {flush} was sent; \
                                 that flush completed before the power loss; it holds {old}"
                            ),
                            format!("{old}, since superseded"),
                        )
                    }
                }
            }
            (_, _, Some(e)) => {
                let what = self.describe(&Value::Written(*e));
                (
                    ViolationKind::WrittenAfterPowerLoss,
                    format!(
                        "block {b} holds {what}, sent after crash() returned: crash() must \
                         return a snapshot that later writes do not change"
                    ),
                    what,
                )
            }
            _ => {
                let what = format!("data [{:08x}] that no op wrote", hash >> 32);
                (
                    ViolationKind::UnknownData,
                    format!("block {b} holds {what}"),
                    what,
                )
            }
        };
        Box::new(self.report(loss, cover, kind, summary, b, found))
    }

    fn report(
        &self,
        loss: &PowerLoss,
        cover: Option<Flush>,
        kind: ViolationKind,
        summary: String,
        b: u64,
        found: String,
    ) -> Violation {
        let allowed = self.blocks.get(&b).map_or_else(Vec::new, |st| {
            st.allowed(loss.ce).map(|v| self.describe(&v)).collect()
        });
        let in_flight: Vec<String> = self
            .ops
            .iter()
            .filter(|o| o.inv < loss.ce && o.comp > loss.cs)
            .map(|o| o.detail.clone())
            .collect();
        Violation {
            kind,
            summary,
            crash_after: self.ops.iter().filter(|o| o.comp < loss.cs).count(),
            last_op: self
                .ops
                .get(loss.after)
                .map_or_else(|| format!("op #{}", loss.after), |o| o.detail.clone()),
            last_flush: cover.map(|f| f.op),
            in_flight,
            block: b,
            offset: b * self.bs,
            allowed,
            found,
            run: loss.run.clone(),
        }
    }

    /// With whole writes promised: no write of several blocks may have reached some of its
    /// blocks while others still hold what they held before it was sent.
    fn check_torn(
        &self,
        loss: &PowerLoss,
        cover: Option<Flush>,
        found: &[(u64, u64)],
    ) -> Result<(), Box<Violation>> {
        let at = |b: u64| {
            found
                .binary_search_by_key(&b, |(blk, _)| *blk)
                .ok()
                .map(|i| found[i].1)
        };
        for (index, op) in self.ops.iter().enumerate() {
            let Some((first, n)) = op.data_blocks else {
                continue;
            };
            if n < 2 || op.inv >= loss.ce {
                continue;
            }
            let mut reached = None;
            let mut missed = None;
            for b in first..first + n {
                let (Some(st), Some(hash)) = (self.blocks.get(&b), at(b)) else {
                    continue;
                };
                let matching: Vec<Value> =
                    st.allowed(loss.ce).filter(|v| v.matches(hash)).collect();
                let mine = |v: &Value| matches!(v, Value::Written(e) if e.op == index);
                let before = |v: &Value| match v {
                    Value::Initial(_) => true,
                    Value::Written(e) => e.hash.is_some() && e.comp < op.inv,
                };
                if !matching.is_empty() && matching.iter().all(mine) {
                    reached.get_or_insert(b);
                } else if !matching.is_empty() && matching.iter().all(before) {
                    missed.get_or_insert((b, matching[0]));
                }
            }
            if let (Some(r), Some((m, old))) = (reached, missed) {
                let summary = format!(
                    "{} reached block {r} but not block {m}, which holds {}; the device \
                     promises whole writes (atomic_writes)",
                    op.detail,
                    self.describe(&old)
                );
                let found = self.describe(&old);
                return Err(Box::new(self.report(
                    loss,
                    cover,
                    ViolationKind::TornWrite,
                    summary,
                    m,
                    found,
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
