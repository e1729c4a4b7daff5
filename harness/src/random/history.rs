//! The history of a run: every operation with the ticks of a global counter taken when it was
//! invoked and when it completed, its result and a read's data; how to name its operations and
//! show those that touched one block. [`check`](super::check) holds it to the model.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::generate::ModelOp;
use crate::script::{fill_seed, Pattern};
use crate::target::OpError;

/// The page size of the devices whose blocks are smaller (read-modify-write of pages is a
/// classic way to lose a neighbour's write).
const PAGE: u64 = 4096;

/// A tick of the run's global counter: every invocation and every completion takes one, so
/// `a.completed < b.invoked` means `a` finished before `b` began.
pub type Tick = u64;

/// The global counter and the run's start, shared by the client threads.
#[derive(Debug)]
pub struct Clock {
    ticks: AtomicU64,
    start: Instant,
}

impl Default for Clock {
    fn default() -> Clock {
        Clock::new()
    }
}

impl Clock {
    /// A clock at tick 0, started now.
    pub fn new() -> Clock {
        Clock {
            ticks: AtomicU64::new(0),
            start: Instant::now(),
        }
    }

    /// The next tick and the time since the start.
    pub fn tick(&self) -> (Tick, Duration) {
        // SeqCst: a tick taken after another thread's tick (in real time) is larger.
        (
            self.ticks.fetch_add(1, Ordering::SeqCst),
            self.start.elapsed(),
        )
    }
}

/// Which part of a run an operation belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// The random operations, from every client thread at once.
    Run,
    /// The read-back of every written range after all client threads finished, still attached.
    Readback,
    /// The read-back after a clean disconnect and re-opening the same storage.
    Reopened,
}

/// One operation as it happened.
#[derive(Clone, Debug)]
pub struct Event {
    /// The phase.
    pub phase: Phase,
    /// The client thread (0-based).
    pub thread: usize,
    /// Its index in that thread's list (0-based).
    pub index: usize,
    /// The operation.
    pub op: ModelOp,
    /// Tick taken just before the call.
    pub invoked: Tick,
    /// Tick taken just after it returned.
    pub completed: Tick,
    /// When it was invoked, since the run started.
    pub at: Duration,
    /// How long it took.
    pub took: Duration,
    /// A read's data (empty for other operations), or the error.
    pub result: Result<Vec<u8>, OpError>,
}

/// Everything that happened in one run.
#[derive(Clone, Debug)]
pub struct History {
    /// The device's logical block size: the unit the checker reasons in.
    pub block_size: u64,
    /// Trimmed blocks read back as zeroes (else anything).
    pub trim_zeroes: bool,
    /// Client threads in the run phase.
    pub threads: usize,
    /// The events, in no particular order.
    pub events: Vec<Event>,
}

/// What a block holds after an operation: bytes, or anything (an unspecified trim).
pub(super) enum Value {
    /// These bytes.
    Bytes(Vec<u8>),
    /// Anything at all.
    Any,
}

impl History {
    /// An empty history.
    pub fn new(block_size: u64, trim_zeroes: bool, threads: usize) -> History {
        History {
            block_size: block_size.max(1),
            trim_zeroes,
            threads,
            events: Vec::new(),
        }
    }

    /// The blocks an operation touches.
    pub(super) fn blocks(&self, op: &ModelOp) -> std::ops::Range<u64> {
        match op.range() {
            Some((o, l)) => o / self.block_size..(o + l).div_ceil(self.block_size),
            None => 0..0,
        }
    }

    /// What block `b` holds after event `e` (a write, write-zeroes or trim).
    pub(super) fn value(&self, e: usize, b: u64) -> Value {
        let bs = self.block_size;
        match self.events[e].op {
            ModelOp::Write { seed, .. } => {
                Value::Bytes(Pattern::Seed(seed).bytes(b * bs, bs as usize))
            }
            ModelOp::Zeroes { .. } => Value::Bytes(vec![0; bs as usize]),
            ModelOp::Trim { .. } if self.trim_zeroes => Value::Bytes(vec![0; bs as usize]),
            _ => Value::Any,
        }
    }

    pub(super) fn holds(&self, e: usize, b: u64, chunk: &[u8]) -> bool {
        let bs = self.block_size;
        match self.events[e].op {
            ModelOp::Write { seed, .. } => {
                // Most candidates differ in the first word: check it before rendering a block.
                let mut word = [0u8; 8];
                let n = word.len().min(chunk.len());
                fill_seed(seed, b * bs, &mut word[..n]);
                word[..n] == chunk[..n]
                    && matches!(self.value(e, b), Value::Bytes(ref v) if v == chunk)
            }
            ModelOp::Zeroes { .. } => chunk.iter().all(|&x| x == 0),
            ModelOp::Trim { .. } if self.trim_zeroes => chunk.iter().all(|&x| x == 0),
            _ => true,
        }
    }

    /// A short name: `t2.13` (thread 2, operation 13; 1-based), `op 13` in a one-thread run,
    /// `readback 3`, `reopened 3`.
    pub fn label(&self, e: usize) -> String {
        let ev = &self.events[e];
        match ev.phase {
            Phase::Run if self.threads <= 1 => format!("op {}", ev.index + 1),
            Phase::Run => format!("t{}.{}", ev.thread + 1, ev.index + 1),
            Phase::Readback => format!("readback {}", ev.index + 1),
            Phase::Reopened => format!("reopened {}", ev.index + 1),
        }
    }

    /// The label and what the operation was: `t2.13 (write 4096 1024 seed:77)`.
    pub fn name(&self, e: usize) -> String {
        format!("{} ({})", self.label(e), op_text(&self.events[e].op))
    }

    /// The first operation that failed (by invocation), if any.
    pub fn first_error(&self) -> Option<usize> {
        (0..self.events.len())
            .filter(|&e| self.events[e].result.is_err())
            .min_by_key(|&e| self.events[e].invoked)
    }

    /// The operations touching block `b` (and the flushes that overlapped a write to it), one
    /// line each in invocation order, `focus` marked; at most `limit` lines, those nearest the
    /// focus kept.
    pub fn excerpt(&self, b: u64, focus: Option<usize>, limit: usize) -> String {
        let touches = |e: &Event| self.blocks(&e.op).contains(&b);
        let writes: Vec<&Event> = self
            .events
            .iter()
            .filter(|e| touches(e) && e.op.writes())
            .collect();
        // Writes to other blocks of the same 4 KiB page in flight with a write to this block:
        // a device that works in pages may have mixed them up.
        let bs = self.block_size;
        let page = (b * bs / PAGE * PAGE, (b * bs / PAGE + 1) * PAGE);
        let overlaps = |e: &Event| {
            writes
                .iter()
                .any(|w| e.invoked < w.completed && w.invoked < e.completed)
        };
        let page_mate = |e: &Event| {
            bs < PAGE && e.op.writes() && !touches(e) && e.op.touches(page.0, page.1) && overlaps(e)
        };
        let mut chosen: Vec<usize> = (0..self.events.len())
            .filter(|&i| {
                let e = &self.events[i];
                touches(e) || (e.op == ModelOp::Flush && overlaps(e)) || page_mate(e)
            })
            .collect();
        chosen.sort_by_key(|&i| self.events[i].invoked);
        let mut left_out = 0;
        if chosen.len() > limit {
            let at = focus
                .and_then(|f| chosen.iter().position(|&i| i == f))
                .unwrap_or(chosen.len() - 1);
            let from = (at + limit / 4).min(chosen.len()).saturating_sub(limit);
            left_out = chosen.len() - limit;
            chosen = chosen[from..from + limit].to_vec();
        }
        let mut out = format!(
            "operations on block {b} (offset {}), by invocation; #invoked..#completed, time \
             since start (duration):\n",
            b * bs
        );
        for &i in &chosen {
            let e = &self.events[i];
            let mark = if Some(i) == focus { "=>" } else { "  " };
            let mut line = format!(
                "{mark} #{:<6} #{:<6} {:>9.3} ms ({:.3} ms) {:<12} {}",
                e.invoked,
                e.completed,
                e.at.as_secs_f64() * 1e3,
                e.took.as_secs_f64() * 1e3,
                self.label(i),
                op_text(&e.op)
            );
            match &e.result {
                Ok(data) if matches!(e.op, ModelOp::Read { .. }) => {
                    let (o, _) = e.op.range().unwrap_or((0, 0));
                    let at = ((b * bs).saturating_sub(o)) as usize;
                    if let Some(chunk) = data.get(at..at + bs as usize) {
                        let source = self.source_text(b, chunk, Some(e.completed));
                        let _ = write!(line, "  returned {source}");
                    }
                }
                Ok(_) if page_mate(e) => line.push_str("  (another block of the same 4 KiB page)"),
                Ok(_) => {}
                Err(err) => {
                    let _ = write!(line, "  failed: {err}");
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        if left_out > 0 {
            let _ = writeln!(out, "   ({left_out} more left out)");
        }
        out
    }

    /// Names the write whose value `chunk` is, for block `b`: the newest such write invoked
    /// before `before` when given.
    pub(super) fn source_text(&self, b: u64, chunk: &[u8], before: Option<Tick>) -> String {
        let found = (0..self.events.len())
            .filter(|&e| {
                let ev = &self.events[e];
                ev.phase == Phase::Run
                    && ev.op.writes()
                    && before.is_none_or(|t| ev.invoked < t)
                    && self.blocks(&ev.op).contains(&b)
                    && !matches!(self.value(e, b), Value::Any)
                    && self.holds(e, b, chunk)
            })
            .max_by_key(|&e| self.events[e].invoked);
        let zeroes = chunk.iter().all(|&x| x == 0);
        match found {
            None if zeroes => "zeroes".into(),
            None => "bytes no write put there".into(),
            Some(e) if zeroes => format!("zeroes (as after {})", self.label(e)),
            Some(e) => format!("the value of {}", self.label(e)),
        }
    }
}

/// An operation as a script line would write it: `write 4096 1024 seed:7 fua`.
pub fn op_text(op: &ModelOp) -> String {
    match *op {
        ModelOp::Write {
            offset,
            len,
            seed,
            fua,
        } => format!(
            "write {offset} {len} seed:{seed}{}",
            if fua { " fua" } else { "" }
        ),
        ModelOp::Read { offset, len } => format!("read {offset} {len}"),
        ModelOp::Flush => "flush".into(),
        ModelOp::Trim { offset, len } => format!("trim {offset} {len}"),
        ModelOp::Zeroes {
            offset,
            len,
            no_hole,
        } => format!(
            "zeroes {offset} {len}{}",
            if no_hole { " nohole" } else { "" }
        ),
    }
}

#[cfg(test)]
pub(super) mod build {
    //! Histories made by hand, for tests.
    use super::*;

    /// Builds histories by hand: `(thread, op, invoked, completed, read data)`.
    pub(crate) struct Build(pub(crate) History);

    impl Build {
        pub(crate) fn new(bs: u64) -> Build {
            Build(History::new(bs, true, 2))
        }

        pub(crate) fn op(
            mut self,
            phase: Phase,
            thread: usize,
            op: ModelOp,
            span: (Tick, Tick),
        ) -> Build {
            let index = self
                .0
                .events
                .iter()
                .filter(|e| e.thread == thread && e.phase == phase)
                .count();
            self.0.events.push(Event {
                phase,
                thread,
                index,
                op,
                invoked: span.0,
                completed: span.1,
                at: Duration::ZERO,
                took: Duration::ZERO,
                result: Ok(Vec::new()),
            });
            self
        }

        pub(crate) fn write(
            self,
            thread: usize,
            offset: u64,
            len: u64,
            seed: u64,
            span: (Tick, Tick),
        ) -> Build {
            let op = ModelOp::Write {
                offset,
                len,
                seed,
                fua: false,
            };
            self.op(Phase::Run, thread, op, span)
        }

        pub(crate) fn read_as(
            mut self,
            phase: Phase,
            thread: usize,
            offset: u64,
            data: Vec<u8>,
            span: (Tick, Tick),
        ) -> Build {
            let len = data.len() as u64;
            self = self.op(phase, thread, ModelOp::Read { offset, len }, span);
            if let Some(e) = self.0.events.last_mut() {
                e.result = Ok(data);
            }
            self
        }

        pub(crate) fn read(
            self,
            thread: usize,
            offset: u64,
            data: Vec<u8>,
            span: (Tick, Tick),
        ) -> Build {
            self.read_as(Phase::Run, thread, offset, data, span)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::build::Build;
    use super::*;

    fn seed(s: u64, offset: u64, len: usize) -> Vec<u8> {
        Pattern::Seed(s).bytes(offset, len)
    }

    #[test]
    fn the_excerpt_keeps_lines_near_the_focus() {
        let mut b = Build::new(512);
        for i in 0..50 {
            b = b.write(0, 0, 512, i + 1, (2 * i, 2 * i + 1));
        }
        let b = b.read(1, 0, seed(50, 0, 512), (100, 101));
        let text = b.0.excerpt(0, Some(50), 8);
        assert_eq!(text.lines().count(), 10, "{text}");
        assert!(text.contains("=> #100"), "{text}");
        assert!(text.contains("(43 more left out)"), "{text}");
    }
}
