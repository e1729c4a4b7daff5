//! The runner: one run of operation lists against a fresh device, each list in a client thread
//! of its own, all started together, every operation recorded with its invocation and
//! completion ticks; then a read-back of everything written, a clean disconnect, and (when the
//! factory can re-open storage) the same read-back from the storage opened again. A watchdog
//! turns an operation that never completes into a `stall` failure instead of a hang.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Barrier, Mutex, PoisonError};
use std::time::{Duration, Instant};

use userblk::{BlockDevice, Capabilities};

use super::generate::{ModelOp, FOCUS_OPS};
use super::history::{op_text, Clock, Event, History, Phase};
use super::report::{Failure, FailureKind};
use crate::factory::{DeviceFactory, Storage};
use crate::jitter::{Jitter, JitterProfile};
use crate::script::Pattern;
use crate::target::{Attached, OpError, Rig, Target};

/// The largest read of the read-back phases.
const READBACK_PIECE: u64 = 1 << 20;

/// History lines shown around the failing read.
const EXCERPT_LINES: usize = 40;

/// How to run.
#[derive(Clone, Copy)]
pub(crate) struct Runner<'a> {
    pub rig: &'a dyn Rig,
    pub factory: &'a dyn DeviceFactory,
    pub caps: Capabilities,
    /// Wrap the device in [`Jitter`] with this profile and seed.
    pub jitter: Option<(JitterProfile, u64)>,
    /// How long an operation may take before it is a stall.
    pub stall: Duration,
}

/// What one run gave.
pub(crate) struct Outcome {
    /// Everything that happened (empty when the device could not even be made).
    pub history: History,
    /// The failure to report, if any.
    pub failure: Option<Failure>,
    /// Whether the storage was re-opened and read back.
    pub reopened: bool,
}

impl Outcome {
    /// The failure if it is of `kind` (any violation of that kind the checker finds counts:
    /// a run may show several).
    pub(crate) fn failure_of(&self, kind: FailureKind) -> Option<Failure> {
        if kind.from_checker() && self.failure.as_ref().is_some_and(|f| f.kind.from_checker()) {
            self.history
                .first_violation(Some(kind))
                .map(|v| violation_failure(&self.history, &v))
        } else {
            self.failure.clone().filter(|f| f.kind == kind)
        }
    }
}

/// A violation as a failure, with the history of its block.
pub(crate) fn violation_failure(h: &History, v: &super::check::Violation) -> Failure {
    Failure {
        kind: v.kind,
        summary: v.summary.clone(),
        details: v.details.clone(),
        history: h.excerpt(v.block, Some(v.read), EXCERPT_LINES),
        block: Some(v.block),
        event: Some(v.read),
    }
}

/// Performs one operation on the target: a read's data, or nothing.
pub(crate) fn execute(target: &dyn Target, op: &ModelOp) -> Result<Vec<u8>, OpError> {
    match *op {
        ModelOp::Write {
            offset,
            len,
            seed,
            fua,
        } => {
            let data = Pattern::Seed(seed).bytes(offset, len as usize);
            if fua {
                target.write_fua(offset, &data)
            } else {
                target.write(offset, &data)
            }
            .map(|()| Vec::new())
        }
        ModelOp::Read { offset, len } => target.read(offset, len as usize),
        ModelOp::Flush => target.flush().map(|()| Vec::new()),
        ModelOp::Trim { offset, len } => target.trim(offset, len).map(|()| Vec::new()),
        ModelOp::Zeroes {
            offset,
            len,
            no_hole,
        } => target
            .write_zeroes(offset, len, no_hole)
            .map(|()| Vec::new()),
    }
}

/// Whether an error says the operation stalled (a timeout), rather than failed.
fn stalled(e: &OpError) -> bool {
    let m = e.message.to_ascii_lowercase();
    // 110: ETIMEDOUT on Linux.
    e.errno == Some(110) || m.contains("stall") || m.contains("timed out")
}

/// Reads of every range the operations write, merged, in pieces of at most 1 MiB.
pub(crate) fn readback(lists: &[Vec<ModelOp>], bs: u64) -> Vec<ModelOp> {
    let mut ranges: Vec<(u64, u64)> = lists
        .iter()
        .flatten()
        .filter(|op| op.writes())
        .filter_map(|op| op.range())
        .map(|(o, l)| (o, o + l))
        .collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (from, to) in ranges {
        match merged.last_mut() {
            Some(last) if from <= last.1 => last.1 = last.1.max(to),
            _ => merged.push((from, to)),
        }
    }
    let piece = (READBACK_PIECE / bs).max(1) * bs;
    let mut out = Vec::new();
    for (from, to) in merged {
        let mut at = from;
        while at < to {
            let len = (to - at).min(piece);
            out.push(ModelOp::Read { offset: at, len });
            at += len;
        }
    }
    out
}

/// An attached target shared with the client threads.
type Shared = Arc<Box<dyn Attached>>;

/// What a client thread tells the watchdog.
enum Msg {
    Done(Event),
    Finished,
}

/// A client thread's hold on the target: when the thread ends, even by a panic, it lets go of
/// the target and then sends `Finished`, so that the watchdog never waits for a thread that is
/// gone and the target can be detached once every thread has finished.
struct ClientGuard {
    tx: mpsc::Sender<Msg>,
    target: Option<Shared>,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        drop(self.target.take());
        let _ = self.tx.send(Msg::Finished);
    }
}

/// An operation in flight: its thread, index, what it is and since when.
type InFlight = Vec<Option<(usize, ModelOp, Instant)>>;

impl Runner<'_> {
    /// Runs `lists` (one per client thread) on a fresh device and checks the history.
    pub(crate) fn run(&self, lists: &[Vec<ModelOp>]) -> Outcome {
        let threads = lists.len().max(1);
        let mut history = History::new(512, self.caps.trim_zeroes, threads);
        let setup = |history: History, what: String| Outcome {
            history,
            failure: Some(Failure::new(FailureKind::Setup, what)),
            reopened: false,
        };
        let storage: Option<Box<dyn Storage>> = match self.factory.storage() {
            None => None,
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => return setup(history, format!("the factory's storage failed: {e}")),
        };
        let opened = match &storage {
            Some(s) => s.open(),
            None => self.factory.create(),
        };
        let device = match opened {
            Ok(d) => d,
            Err(e) => return setup(history, format!("the factory failed: {e}")),
        };
        let bs = u64::from(device.block_size().max(1));
        history.block_size = bs;
        let device: Box<dyn BlockDevice> = match self.jitter {
            Some((profile, seed)) => Box::new(Jitter::with_profile(device, seed, profile)),
            None => device,
        };
        let target: Shared = match self.rig.attach(device) {
            Ok(t) => Arc::new(t),
            Err(e) => return setup(history, format!("could not attach: {e}")),
        };
        let clock = Arc::new(Clock::new());
        let jobs: Vec<_> = lists.iter().cloned().enumerate().collect();
        let mut failure = self.drive(&target, jobs, Phase::Run, &clock, FOCUS_OPS, &mut history);
        let back = readback(lists, bs);
        if failure.is_none() {
            let jobs = vec![(0, back.clone())];
            failure = self.drive(&target, jobs, Phase::Readback, &clock, 0, &mut history);
        }
        if failure.is_some() {
            // A stalled operation still holds the target: leave it to its thread.
            return self.finish(history, failure, None, false);
        }
        let mut late = self.detach(target);
        let mut reopened = false;
        if let (Some(storage), None, true) = (&storage, &late, !back.is_empty()) {
            late = self.reopen(&**storage, back, &clock, &mut history);
            reopened = late.is_none();
        }
        // A stall after re-opening pre-empts; other trouble there comes after what the
        // checker finds.
        if late.as_ref().is_some_and(|f| f.kind == FailureKind::Stall) {
            return self.finish(history, late, None, false);
        }
        self.finish(history, None, late, reopened)
    }

    /// Decides what to report: a stall first; else the first thing that went wrong, an
    /// operation that failed or a read the checker rejects; then a serving error.
    fn finish(
        &self,
        history: History,
        failure: Option<Failure>,
        serving: Option<Failure>,
        reopened: bool,
    ) -> Outcome {
        let failure = failure
            .or_else(|| {
                let error = op_failure(&history);
                let violation = history.first_violation(None);
                let when = |e: Option<usize>| e.map(|e| history.events[e].invoked);
                match (error, violation) {
                    (Some(e), Some(v)) if when(Some(v.read)) < when(e.event) => {
                        Some(violation_failure(&history, &v))
                    }
                    (Some(e), _) => Some(e),
                    (None, v) => v.map(|v| violation_failure(&history, &v)),
                }
            })
            .or(serving);
        Outcome {
            history,
            failure,
            reopened,
        }
    }

    /// Opens the storage again, attaches it (without jitter: this is about what the storage
    /// kept), reads `back` and detaches.
    fn reopen(
        &self,
        storage: &dyn Storage,
        back: Vec<ModelOp>,
        clock: &Arc<Clock>,
        history: &mut History,
    ) -> Option<Failure> {
        let setup = |what: String| Some(Failure::new(FailureKind::Setup, what));
        let device = match storage.open() {
            Ok(d) => d,
            Err(e) => return setup(format!("re-opening the storage failed: {e}")),
        };
        let target: Shared = match self.rig.attach(device) {
            Ok(t) => Arc::new(t),
            Err(e) => return setup(format!("could not attach the re-opened storage: {e}")),
        };
        self.drive(&target, vec![(0, back)], Phase::Reopened, clock, 0, history)
            .or_else(|| self.detach(target))
    }

    /// Disconnects cleanly; a failure if serving ended with an error or never ended.
    fn detach(&self, target: Shared) -> Option<Failure> {
        let (tx, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("random-detach".into())
            .spawn(move || {
                let result = match Arc::try_unwrap(target) {
                    Ok(t) => t.detach(),
                    Err(_) => Err(OpError {
                        errno: None,
                        message: "the target is still in use".into(),
                    }),
                };
                let _ = tx.send(result);
            });
        if let Err(e) = spawned {
            return Some(Failure::new(
                FailureKind::Setup,
                format!("cannot start a thread: {e}"),
            ));
        }
        match rx.recv_timeout(self.stall) {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(Failure::new(
                FailureKind::ServingError,
                format!("serving ended with an error at the disconnect: {e}"),
            )),
            Err(_) => Some(Failure::new(
                FailureKind::Stall,
                format!(
                    "the disconnect (DISC, then unmount) did not finish within {} s",
                    self.stall.as_secs()
                ),
            )),
        }
    }

    /// Runs each job (thread number, operations) in a thread of its own, all started together
    /// and, with `round` > 0, meeting again every `round` operations (operations with the same
    /// index in their lists aim at the same focus area: see [`generate_threads`], so keeping
    /// the threads in step puts them in flight together). Adds the events to `history`. A
    /// stall is returned as a failure; the threads still blocked are left behind (they end
    /// when their operation does).
    ///
    /// [`generate_threads`]: super::generate_threads
    fn drive(
        &self,
        target: &Shared,
        jobs: Vec<(usize, Vec<ModelOp>)>,
        phase: Phase,
        clock: &Arc<Clock>,
        round: usize,
        history: &mut History,
    ) -> Option<Failure> {
        let n = jobs.len();
        let longest = jobs.iter().map(|j| j.1.len()).max().unwrap_or(0);
        let rounds = if round == 0 {
            1
        } else {
            longest.div_ceil(round).max(1)
        };
        let (tx, rx) = mpsc::channel();
        let in_flight: Arc<Mutex<InFlight>> = Arc::new(Mutex::new(vec![None; n]));
        let sync = Arc::new(Barrier::new(n));
        let events = &mut history.events;
        let mut running = 0;
        for (slot, (thread, ops)) in jobs.into_iter().enumerate() {
            let (target, clock, tx) = (Arc::clone(target), Arc::clone(clock), tx.clone());
            let (in_flight, sync) = (Arc::clone(&in_flight), Arc::clone(&sync));
            let spawned = std::thread::Builder::new()
                .name(format!("random-client{}", thread + 1))
                .spawn(move || {
                    let guard = ClientGuard {
                        tx,
                        target: Some(target),
                    };
                    let Some(target) = guard.target.as_deref() else {
                        return;
                    };
                    let mut stopped = false;
                    for r in 0..rounds {
                        // Every thread meets every round, even one that stopped at an error,
                        // so that none waits for it forever.
                        sync.wait();
                        let these = if round == 0 {
                            0..ops.len()
                        } else {
                            (r * round).min(ops.len())..((r + 1) * round).min(ops.len())
                        };
                        for index in these {
                            if stopped {
                                break;
                            }
                            let op = ops[index];
                            in_flight.lock().unwrap_or_else(PoisonError::into_inner)[slot] =
                                Some((index, op, Instant::now()));
                            let (invoked, at) = clock.tick();
                            let result = execute(&**target, &op);
                            let (completed, end) = clock.tick();
                            in_flight.lock().unwrap_or_else(PoisonError::into_inner)[slot] = None;
                            let failed = result.is_err();
                            let event = Event {
                                phase,
                                thread,
                                index,
                                op,
                                invoked,
                                completed,
                                at,
                                took: end.saturating_sub(at),
                                result,
                            };
                            stopped = guard.tx.send(Msg::Done(event)).is_err() || failed;
                        }
                    }
                });
            match spawned {
                Ok(_) => running += 1,
                Err(e) => {
                    // The threads started wait for this one at the barrier: they are left
                    // behind, as after a stall.
                    return Some(Failure::new(
                        FailureKind::Setup,
                        format!("cannot start a thread: {e}"),
                    ));
                }
            }
        }
        drop(tx);
        while running > 0 {
            match rx.recv_timeout(self.stall) {
                Ok(Msg::Done(e)) => events.push(e),
                Ok(Msg::Finished) => running -= 1,
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    return Some(self.stuck(&in_flight, phase));
                }
            }
        }
        None
    }

    /// The stall failure: what is in flight, the oldest first.
    fn stuck(&self, in_flight: &Mutex<InFlight>, phase: Phase) -> Failure {
        let mut now: Vec<(usize, usize, ModelOp, Instant)> = in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .enumerate()
            .filter_map(|(t, s)| s.map(|(i, op, since)| (t, i, op, since)))
            .collect();
        now.sort_by_key(|&(.., since)| since);
        let name = |t: usize, i: usize, op: &ModelOp| match phase {
            Phase::Run => format!("t{}.{} ({})", t + 1, i + 1, op_text(op)),
            Phase::Readback => format!("readback {} ({})", i + 1, op_text(op)),
            Phase::Reopened => format!("reopened {} ({})", i + 1, op_text(op)),
        };
        let summary = match now.first() {
            Some((t, i, op, since)) => format!(
                "{} has not completed after {:.1} s: the device or the server never answered",
                name(*t, *i, op),
                since.elapsed().as_secs_f64()
            ),
            None => format!(
                "no operation completed for {} s, none in flight",
                self.stall.as_secs()
            ),
        };
        let mut f = Failure::new(FailureKind::Stall, summary);
        if !now.is_empty() {
            f.history = "in flight:\n".to_string();
            for (t, i, op, since) in &now {
                f.history.push_str(&format!(
                    "  {} for {:.1} s\n",
                    name(*t, *i, op),
                    since.elapsed().as_secs_f64()
                ));
            }
        }
        f
    }
}

/// The first operation that failed, as a failure (`stall` when its error says so).
pub(crate) fn op_failure(h: &History) -> Option<Failure> {
    let e = h.first_error()?;
    let ev = &h.events[e];
    let err = ev.result.as_ref().err()?;
    // The loopback rig fails a read the device did not fill, naming the bytes.
    let summary = match err.message.strip_prefix("unfilled read: ") {
        Some(rest) if err.errno.is_none() => {
            (FailureKind::UnfilledRead, format!("{}: {rest}", h.name(e)))
        }
        _ if stalled(err) => (FailureKind::Stall, format!("{} failed: {err}", h.name(e))),
        _ => (
            FailureKind::OpFailed,
            format!("{} failed: {err}", h.name(e)),
        ),
    };
    let mut f = Failure::new(summary.0, summary.1);
    f.event = Some(e);
    if let Some((offset, _)) = ev.op.range() {
        f.block = Some(offset / h.block_size);
        f.history = h.excerpt(offset / h.block_size, Some(e), EXCERPT_LINES);
    }
    Some(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readback_merges_written_ranges_and_splits_big_ones() {
        let w = |offset, len| ModelOp::Write {
            offset,
            len,
            seed: 1,
            fua: false,
        };
        let lists = vec![
            vec![
                w(0, 1024),
                ModelOp::Read {
                    offset: 0,
                    len: 8192,
                },
            ],
            vec![
                w(512, 1024),
                ModelOp::Zeroes {
                    offset: 4096,
                    len: 3 << 20,
                    no_hole: false,
                },
                ModelOp::Flush,
            ],
        ];
        let back = readback(&lists, 512);
        assert_eq!(
            back,
            [
                ModelOp::Read {
                    offset: 0,
                    len: 1536
                },
                ModelOp::Read {
                    offset: 4096,
                    len: 1 << 20
                },
                ModelOp::Read {
                    offset: 4096 + (1 << 20),
                    len: 1 << 20
                },
                ModelOp::Read {
                    offset: 4096 + (2 << 20),
                    len: 1 << 20
                },
            ]
        );
    }

    #[test]
    fn timeouts_are_stalls() {
        let e = |errno, message: &str| OpError {
            errno,
            message: message.into(),
        };
        assert!(stalled(&e(Some(110), "x")));
        assert!(stalled(&e(None, "request stalled for 30 s")));
        assert!(stalled(&e(None, "read timed out")));
        assert!(!stalled(&e(Some(5), "EIO")));
    }
}
