//! Shrinking a failed run: smaller candidates are run again and kept only when they fail **the
//! same way** (the same [`FailureKind`]; not any failure). Candidates, in order: only the
//! operations near the failing block (plus the flushes), the run cut after the failing read,
//! without the threads that never touched the failing block, then ever smaller runs of
//! operations deleted, and in sequential runs lengths halved in whole
//! device blocks. A concurrent candidate is run several times before it is given up, since the
//! threads' interleaving differs from run to run. Shrinking stops at a number of runs or a time
//! limit, whichever comes first; the failure kept is always one that was seen, whole.

use std::time::Instant;

use super::concurrent::{Outcome, Runner};
use super::generate::ModelOp;
use super::history::{History, Phase};
use super::report::{Failure, FailureKind};

/// What shrinking may spend.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Budget {
    /// Runs at most.
    pub runs: u32,
    /// Stop starting runs after this.
    pub deadline: Instant,
    /// Runs of one candidate before it is given up.
    pub retries: u32,
    /// Whether to halve lengths too (sequential runs).
    pub lengths: bool,
}

/// The smallest failing run found.
pub(crate) struct Shrunk {
    /// Its operation lists.
    pub lists: Vec<Vec<ModelOp>>,
    /// The failure it showed.
    pub failure: Failure,
    /// Its history.
    pub history: History,
    /// Runs spent.
    pub runs: u32,
    /// Candidates that failed the same way (0: nothing smaller reproduced).
    pub accepted: u32,
}

struct State<'a> {
    runner: &'a Runner<'a>,
    kind: FailureKind,
    budget: Budget,
    best: Shrunk,
}

impl State<'_> {
    fn exhausted(&self) -> bool {
        self.best.runs >= self.budget.runs || Instant::now() >= self.budget.deadline
    }

    /// Runs `cand` up to `retries` times; keeps it if it fails the same way.
    fn attempt(&mut self, cand: Vec<Vec<ModelOp>>) -> bool {
        if cand == self.best.lists || cand.iter().all(Vec::is_empty) {
            return false;
        }
        for _ in 0..self.budget.retries.max(1) {
            if self.exhausted() {
                return false;
            }
            self.best.runs += 1;
            let outcome: Outcome = self.runner.run(&cand);
            if let Some(failure) = outcome.failure_of(self.kind) {
                self.best.lists = cand;
                self.best.failure = failure;
                self.best.history = outcome.history;
                self.best.accepted += 1;
                return true;
            }
        }
        false
    }
}

/// The operations flattened, each with its thread.
fn flatten(lists: &[Vec<ModelOp>]) -> Vec<(usize, ModelOp)> {
    lists
        .iter()
        .enumerate()
        .flat_map(|(t, l)| l.iter().map(move |op| (t, *op)))
        .collect()
}

fn unflatten(flat: &[(usize, ModelOp)], threads: usize) -> Vec<Vec<ModelOp>> {
    let mut lists = vec![Vec::new(); threads];
    for &(t, op) in flat {
        lists[t].push(op);
    }
    lists
}

/// The run without what came after the failing read completed.
fn cut_after(history: &History, event: usize, lists: &[Vec<ModelOp>]) -> Vec<Vec<ModelOp>> {
    let failing = &history.events[event];
    if failing.phase != Phase::Run {
        return lists.to_vec();
    }
    let mut keep = vec![0usize; lists.len()];
    for e in &history.events {
        if e.phase == Phase::Run && e.invoked < failing.completed && e.thread < keep.len() {
            keep[e.thread] = keep[e.thread].max(e.index + 1);
        }
    }
    lists
        .iter()
        .zip(keep)
        .map(|(l, k)| l[..k.min(l.len())].to_vec())
        .collect()
}

/// Shrinks `lists`, which failed with `failure` (`history` the run's), keeping only candidates
/// that fail with the same kind.
pub(crate) fn shrink(
    runner: &Runner<'_>,
    lists: Vec<Vec<ModelOp>>,
    failure: Failure,
    history: History,
    budget: Budget,
) -> Shrunk {
    let threads = lists.len();
    let bs = history.block_size;
    let mut st = State {
        runner,
        kind: failure.kind,
        budget,
        best: Shrunk {
            lists,
            failure,
            history,
            runs: 0,
            accepted: 0,
        },
    };
    // 1. Only what lies near the failing block, with the flushes (a flush may be what starts a
    // write-back), from the block itself out to its 64 KiB neighbourhood.
    if let Some(b) = st.best.failure.block {
        for span in [bs, 4096.max(bs), 64 << 10] {
            if st.exhausted() {
                break;
            }
            let from = b * bs / span * span;
            let to = from + span.max(bs);
            let cand: Vec<Vec<ModelOp>> = st
                .best
                .lists
                .iter()
                .map(|l| {
                    l.iter()
                        .copied()
                        .filter(|op| *op == ModelOp::Flush || op.touches(from, to))
                        .collect()
                })
                .collect();
            if st.attempt(cand) {
                break;
            }
        }
    }
    // 2. Nothing after the failing read; no thread that never touched the failing block.
    if let Some(e) = st.best.failure.event {
        let cand = cut_after(&st.best.history, e, &st.best.lists);
        st.attempt(cand);
    }
    if let (Some(b), true) = (st.best.failure.block, threads > 1) {
        let cand: Vec<Vec<ModelOp>> = st
            .best
            .lists
            .iter()
            .map(|l| {
                if l.iter().any(|op| op.touches(b * bs, (b + 1) * bs)) {
                    l.clone()
                } else {
                    Vec::new()
                }
            })
            .collect();
        st.attempt(cand);
    }
    // 3. Delete runs of operations, halves first, then single ones; then halve lengths.
    let mut progress = true;
    while progress && !st.exhausted() {
        progress = false;
        let mut chunk = flatten(&st.best.lists).len().div_ceil(2).max(1);
        loop {
            let mut i = 0;
            while i < flatten(&st.best.lists).len() && !st.exhausted() {
                let mut flat = flatten(&st.best.lists);
                flat.drain(i..(i + chunk).min(flat.len()));
                if st.attempt(unflatten(&flat, threads)) {
                    progress = true;
                } else {
                    i += chunk;
                }
            }
            if chunk == 1 || st.exhausted() {
                break;
            }
            chunk /= 2;
        }
        if budget.lengths {
            let mut i = 0;
            while i < flatten(&st.best.lists).len() && !st.exhausted() {
                let mut flat = flatten(&st.best.lists);
                match flat[i].1.range() {
                    // Whole device blocks only: the kernel never sends anything else.
                    Some((_, len)) if len > bs => {
                        flat[i].1 = flat[i].1.with_len((len / 2).div_ceil(bs) * bs);
                        if st.attempt(unflatten(&flat, threads)) {
                            progress = true;
                        } else {
                            i += 1;
                        }
                    }
                    _ => i += 1,
                }
            }
        }
    }
    st.best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flatten_and_unflatten_keep_threads_and_order() {
        let r = |offset| ModelOp::Read { offset, len: 512 };
        let lists = vec![vec![r(0), r(512)], vec![], vec![r(1024)]];
        let flat = flatten(&lists);
        assert_eq!(flat, [(0, r(0)), (0, r(512)), (2, r(1024))]);
        assert_eq!(unflatten(&flat, 3), lists);
    }
}
