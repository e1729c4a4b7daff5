//! Concurrent runs: several threads drive one device at once (writes racing each other and the
//! flushes of other threads), and the power is cut while ops are in flight. Each op's invocation
//! and completion, and each power loss's start and end, are stamped on one clock; after the run
//! the [model](super::model) checks every survivor against the history, so an op in flight
//! during a power loss may have reached the device or not, block by block.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex, PoisonError};
use std::thread;

use super::model::{Model, PowerLoss, Stamp, Time};
use super::ops::{concurrent_ops, CrashOp};
use super::run::{read_blocks, survivor_hashes, validate, CrashReport, Served, Via};
use super::CrashError;
use crate::factory::DeviceFactory;
use crate::target::{OpError, Rig};

/// How the checker runs concurrent streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConcurrentOptions {
    /// Threads driving the device at once, one stream each. Default: 4.
    pub threads: usize,
    /// Ops in each thread's stream. Default: 100.
    pub ops_per_thread: usize,
    /// The power is cut after every `crash_every`th op completed (by any thread, while the
    /// others go on), and once at the end; 0: only at the end. Default: 4.
    pub crash_every: usize,
    /// Runs, each on a fresh device with the next seed: races are found by trying, and found
    /// more often when the device's write-back takes time, as it does on real storage.
    /// Default: 8.
    pub rounds: usize,
    /// Seed of the first round's streams. Default: 1.
    pub seed: u64,
    /// Drive the device through the loopback fake kernel (`true`, the default) or call it
    /// directly from the threads.
    pub loopback: bool,
    /// The device promises whole writes (see
    /// [`CrashOptions::atomic_writes`](super::CrashOptions::atomic_writes)). Default: `false`.
    pub atomic_writes: bool,
}

impl Default for ConcurrentOptions {
    fn default() -> ConcurrentOptions {
        ConcurrentOptions {
            threads: 4,
            ops_per_thread: 100,
            crash_every: 4,
            rounds: 8,
            seed: 1,
            loopback: true,
            atomic_writes: false,
        }
    }
}

/// Runs `options.rounds` concurrent rounds, each on a fresh crashable device from `factory`:
/// `options.threads` threads drive [`concurrent_ops`] streams at once while the power is cut
/// over and over, and every survivor is checked against the write-cache rules, including the
/// rules for ops in flight. Stops at the first violation; its report names the seed.
///
/// ```
/// use userblk::MemDevice;
/// use userblk_harness::crash::{check_concurrent, ConcurrentOptions};
/// use userblk_harness::factory;
///
/// let factory = factory::crashable(|| MemDevice::new(1 << 20));
/// let options = ConcurrentOptions { rounds: 2, ops_per_thread: 40, ..ConcurrentOptions::default() };
/// let report = check_concurrent(&factory, &options)?;
/// assert_eq!(report.ops, 2 * 4 * 40);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn check_concurrent(
    factory: &dyn DeviceFactory,
    options: &ConcurrentOptions,
) -> Result<CrashReport, CrashError> {
    rounds(factory, Via::loopback_or_direct(options.loopback), options)
}

/// [`check_concurrent`] through `rig` (e.g. a real `/dev/nbdN`); `options.loopback` is not
/// used.
pub fn check_concurrent_on(
    rig: &dyn Rig,
    factory: &dyn DeviceFactory,
    options: &ConcurrentOptions,
) -> Result<CrashReport, CrashError> {
    rounds(factory, Via::Rig(rig), options)
}

/// One concurrent run of the given streams (one thread each) on a fresh crashable device
/// from `factory`; of `options`, only `crash_every`, `loopback` and `atomic_writes` are used.
pub fn check_streams(
    factory: &dyn DeviceFactory,
    streams: &[Vec<CrashOp>],
    options: &ConcurrentOptions,
) -> Result<CrashReport, CrashError> {
    let via = Via::loopback_or_direct(options.loopback);
    let run = format!("concurrent run of {} given streams", streams.len());
    round(factory, via, options, run, &mut |_, _| streams.to_vec())
}

fn rounds(
    factory: &dyn DeviceFactory,
    via: Via<'_>,
    options: &ConcurrentOptions,
) -> Result<CrashReport, CrashError> {
    let mut report = CrashReport::default();
    for r in 0..options.rounds {
        let seed = options.seed.wrapping_add(r as u64);
        let run = format!(
            "concurrent run: seed {seed}, {} threads x {} ops, power cut after every {} ops \
             completed (crash::concurrent_ops({seed}, ...) makes the streams)",
            options.threads, options.ops_per_thread, options.crash_every
        );
        report += round(factory, via, options, run, &mut |size, bs| {
            concurrent_ops(seed, size, bs, options.threads, options.ops_per_thread)
        })?;
    }
    Ok(report)
}

/// What a thread saw of one op.
#[derive(Clone, Copy)]
struct Stamped {
    id: usize,
    thread: usize,
    index: usize,
    inv: Time,
    comp: Time,
    applied: bool,
}

/// A power loss, and the hash of each block of the universe in the device that survived it.
type Survived = (PowerLoss, Vec<(u64, u64)>);

/// The first failure of any thread: the others stop at their next op.
struct Failure {
    stop: AtomicBool,
    first: Mutex<Option<CrashError>>,
}

impl Failure {
    fn set(&self, e: CrashError) {
        let mut first = self.first.lock().unwrap_or_else(PoisonError::into_inner);
        first.get_or_insert(e);
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn round(
    factory: &dyn DeviceFactory,
    via: Via<'_>,
    options: &ConcurrentOptions,
    run: String,
    make: &mut dyn FnMut(u64, u32) -> Vec<Vec<CrashOp>>,
) -> Result<CrashReport, CrashError> {
    let served = Served::new(factory, via)?;
    let target = served.target();
    let bs = u64::from(target.block_size().max(1));
    let size = target.size();
    let streams = make(size, target.block_size());
    let first_id: Vec<usize> = streams
        .iter()
        .scan(0, |next, s| {
            let first = *next;
            *next += s.len();
            Some(first)
        })
        .collect();
    let mut universe = BTreeSet::new();
    for (t, stream) in streams.iter().enumerate() {
        for (j, op) in stream.iter().enumerate() {
            validate(first_id[t] + j, op, bs, size)?;
            if let Some((offset, len)) = op.range() {
                universe.extend(offset / bs..(offset + len).div_ceil(bs));
            }
        }
    }
    let universe: Vec<u64> = universe.into_iter().collect();
    let mut model = Model::new(bs, options.atomic_writes);
    let mut initial = Vec::with_capacity(universe.len());
    read_blocks(
        &universe,
        bs,
        &mut |offset, len| target.read(offset, len),
        &mut |b, block| initial.push((b, model.hash(block))),
    )
    .map_err(CrashError::Setup)?;
    for (b, h) in initial {
        model.learn(b, h);
    }

    let clock = AtomicU64::new(1);
    let tick = || clock.fetch_add(1, Ordering::SeqCst);
    let completed = AtomicUsize::new(0);
    let failure = Failure {
        stop: AtomicBool::new(false),
        first: Mutex::new(None),
    };
    let losses: Mutex<Vec<Survived>> = Mutex::new(Vec::new());
    let barrier = Barrier::new(streams.len());
    // Cuts the power now (other threads going on), and keeps what survived of the universe.
    let cut = |after: usize| -> Result<(), CrashError> {
        let cs = tick();
        let survivor = served.crash(after)?;
        let ce = tick();
        let found = survivor_hashes(&model, &*survivor, &universe, bs)
            .map_err(|source| CrashError::Crash { after, source })?;
        let loss = PowerLoss {
            cs,
            ce,
            after,
            run: Some(run.clone()),
        };
        losses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((loss, found));
        Ok(())
    };
    let stamped: Vec<Stamped> = thread::scope(|s| {
        let handles: Vec<_> = streams
            .iter()
            .enumerate()
            .map(|(thread, stream)| {
                let (served, failure, barrier, completed, cut) =
                    (&served, &failure, &barrier, &completed, &cut);
                let first = first_id[thread];
                s.spawn(move || {
                    let mut seen = Vec::with_capacity(stream.len());
                    barrier.wait();
                    for (index, op) in stream.iter().enumerate() {
                        if failure.stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let id = first + index;
                        let inv = tick();
                        let result = served.apply(op);
                        let comp = tick();
                        let applied = match result {
                            Ok(applied) => applied,
                            Err(source) => {
                                failure.set(CrashError::Op {
                                    index: id,
                                    op: format!("{op}, thread {thread}"),
                                    source,
                                });
                                break;
                            }
                        };
                        seen.push(Stamped {
                            id,
                            thread,
                            index,
                            inv,
                            comp,
                            applied,
                        });
                        let n = completed.fetch_add(1, Ordering::SeqCst) + 1;
                        if options.crash_every > 0 && n % options.crash_every == 0 {
                            if let Err(e) = cut(id) {
                                failure.set(e);
                                break;
                            }
                        }
                    }
                    seen
                })
            })
            .collect();
        let mut all = Vec::new();
        for (thread, h) in handles.into_iter().enumerate() {
            match h.join() {
                Ok(seen) => all.extend(seen),
                // A panic in the device when called directly (the server catches its own).
                Err(_) => failure.set(CrashError::Setup(OpError {
                    errno: None,
                    message: format!("driver thread {thread} panicked"),
                })),
            }
        }
        all
    });
    if let Some(e) = failure
        .first
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
    {
        return Err(e);
    }
    let mut stamped = stamped;
    stamped.sort_by_key(|s| s.id);
    if let Some(last) = stamped.iter().max_by_key(|s| s.comp) {
        cut(last.id)?;
    }
    for s in &stamped {
        let op = &streams[s.thread][s.index];
        served.record(
            &mut model,
            s.id,
            op,
            Some(s.thread),
            Stamp {
                inv: s.inv,
                comp: s.comp,
            },
            s.applied,
        );
    }
    let mut losses = losses.into_inner().unwrap_or_else(PoisonError::into_inner);
    losses.sort_by_key(|(loss, _)| loss.cs);
    let mut report = CrashReport {
        ops: stamped.len(),
        ..CrashReport::default()
    };
    for (loss, found) in &losses {
        report.blocks_checked += model.check(loss, found).map_err(CrashError::Violation)?;
        report.crash_points += 1;
    }
    served.finish()?;
    Ok(report)
}
