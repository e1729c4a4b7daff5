//! Random testing against a model of what a block device may do. By default **concurrent**:
//! several client threads issue seeded random operations on one device at once, crowded onto a
//! small hot region so that reads race writes on the same blocks, writes race flushes, trims
//! and write-zeroes land among them, with seeded delays ([`Jitter`](crate::jitter::Jitter))
//! around every device call; each operation is recorded with its invocation and completion in
//! one global order, and the [history](History) is checked against the model below. At the end
//! everything written is read back; then the device is detached cleanly and, when the factory
//! can re-open storage ([`DeviceFactory::storage`]), the same storage is opened, attached and
//! read back again. A failing run is shrunk (operations deleted, each candidate re-run a few
//! times) to a smaller one that fails **the same way**, and printed: the kind of failure and
//! what went wrong on the first line, the seed, the operations on the block concerned with
//! their order and thread, hex dumps, and the run as a [`Script`] (operations that were in
//! flight together as `together { .. }` groups, reads racing writes expecting `any-of(..)`).
//!
//! [`Mode::Sequential`] runs one sequence in one thread instead (every read then has exactly one
//! value it may return); [`random_run`] and [`run_ops`] are the sequential entry points.
//!
//! # The model
//!
//! A block device is a set of per-block registers. Per logical block (the device's block size):
//! - a read may return the value of a write (or write-zeroes; or the initial content; or,
//!   after a trim, anything, unless the device promises zeroes with `trim_zeroes`) that was
//!   invoked before the read completed and was not *superseded*: another write, invoked after
//!   it completed, completed before the read was invoked. Requests in flight together may take
//!   effect in any order, so a read overlapping a write may return the old or the new value,
//!   and two overlapping writes may leave either value;
//! - the initial content of a block never written is unknown, but it is one value: every read
//!   that matches no write must agree;
//! - a block holds one value: parts of two writes in one block are a torn read;
//! - a clean disconnect loses nothing: after the server has answered everything, unmounted
//!   the device and the same storage was opened again, each block must hold what the read-back
//!   just before the disconnect returned.
//!
//! Flushes and FUA impose no order on requests in flight; they are about durability, which is
//! the crash checker's business ([`crate::crash`]). Here they are issued among the writes to
//! exercise a driver's flush path (a write-back cache flushing while writes land).
//!
//! Where the rules come from:
//! - The NBD protocol (`doc/proto.md`, "Ordering of messages and writes"): "The server MAY
//!   process commands out of order, and MAY reply out of order, except that: All write commands
//!   (that includes `NBD_CMD_WRITE`, `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_TRIM`) that the server
//!   completes (i.e. replies to) prior to processing a `NBD_CMD_FLUSH` MUST be written to
//!   non-volatile storage prior to replying to that `NBD_CMD_FLUSH`. [...] A server MUST NOT
//!   reply to a command that has `NBD_CMD_FLAG_FUA` set in its command flags until the data (if
//!   any) written by that command is persisted to non-volatile storage." On `NBD_CMD_TRIM`:
//!   "After issuing this command, a client MUST NOT make any assumptions about the contents of
//!   the export affected by this command, until overwriting it again with `NBD_CMD_WRITE` or
//!   `NBD_CMD_WRITE_ZEROES`." On `NBD_CMD_DISC`: "The server MUST handle all outstanding
//!   requests, shut down the TLS session (if one is running), and close the TCP session."
//! - The kernel's block layer (`Documentation/block/blk-mq.rst`, "Hardware dispatch queues"):
//!   "Neither the block layer nor the device protocols guarantee the order of completion of
//!   requests. This must be handled by higher layers, like the filesystem." And
//!   (`Documentation/block/writeback_cache_control.rst`): REQ_PREFLUSH "explicitly guarantees
//!   that previously completed write requests are on non-volatile storage before the flagged
//!   bio starts"; REQ_FUA "will make sure that I/O completion for this request is only signaled
//!   after the data has been committed to non-volatile storage". Neither orders requests in
//!   flight: only completion before invocation does, which is what the checker uses.
//!
//! # Seeds and what they reproduce
//!
//! One `u64` seed gives the operations of every thread and the jitter schedule (the n-th device
//! call gets the n-th delays). The interleaving of the threads is up to the machine and is not
//! reproduced: a seed that failed once may pass the next time, which is why shrinking runs each
//! candidate several times ([`RandomConfig::retries`]) and only ever reports a failure it saw.
//!
//! # The fake kernel
//!
//! Concurrent runs want several connections, as the kernel's NBD driver uses with
//! `connections=N`, and the fake kernel's own dispatch jitter: [`loopback_rig`] is the loopback
//! rig for random tests (two connections, jitter on), [`loopback_options`] turns any fake
//! kernel's options into those.
//!
//! ```
//! use userblk::{BlockDevice, MemDevice};
//! use userblk_harness::random::{loopback_rig, random_test, RandomConfig};
//!
//! let factory = || Box::new(MemDevice::new(8 << 20)) as Box<dyn BlockDevice>;
//! let config = RandomConfig { runs: 2, ops: 100, ..RandomConfig::default() };
//! let summary = random_test(&loopback_rig(), &factory, factory().capabilities(), &config, &mut |_| {});
//! assert!(summary.is_ok());
//! ```

mod check;
mod concurrent;
pub(crate) mod generate;
mod history;
mod report;
mod sequential;
mod shrink;
mod to_script;

use std::fmt;
use std::time::{Duration, Instant};

use userblk::link::loopback::Jitter as KernelJitter;
use userblk::{Capabilities, LoopbackOptions};

use crate::factory::DeviceFactory;
use crate::jitter::JitterProfile;
use crate::script::Script;
use crate::target::{LoopbackRig, Rig};

pub use check::Violation;
use concurrent::Runner;
pub use generate::{
    generate, generate_threads, pattern_seed, ModelOp, Rng, FOCUS_BYTES, FOCUS_OPS, HOT_BYTES,
};
pub use history::{op_text, Clock, Event, History, Phase, Tick};
pub use report::{Failure, FailureKind, RandomFailure};
pub use sequential::run_ops;

/// How a random test drives the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One sequence, one operation at a time.
    Sequential,
    /// Client threads issuing operations at once on one device.
    Concurrent {
        /// How many threads.
        threads: usize,
    },
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::Sequential => f.write_str("sequential"),
            Mode::Concurrent { threads } => write!(f, "concurrent, {threads} threads"),
        }
    }
}

/// Random test settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RandomConfig {
    /// The first run's seed; run `i` uses `seed + i`. Default: 1.
    pub seed: u64,
    /// How many runs. Default: 20.
    pub runs: u32,
    /// Operations per run, over all threads (before the read-back of what was written).
    /// Default: 400.
    pub ops: usize,
    /// Concurrent or sequential. Default: concurrent, 4 threads.
    pub mode: Mode,
    /// Delays around device calls in concurrent runs (`None`: none). Default: the default
    /// [`JitterProfile`].
    pub jitter: Option<JitterProfile>,
    /// How many re-runs shrinking a failure may take. Default: 300.
    pub shrink_attempts: u32,
    /// How long shrinking may take. Default: 4 s.
    pub shrink_time: Duration,
    /// Runs of one shrinking candidate before it is given up (concurrent runs only: a
    /// sequential one fails every time or never). Default: 4.
    pub retries: u32,
    /// How long one operation may take before it is a stall. Default: 30 s.
    pub stall_timeout: Duration,
}

impl Default for RandomConfig {
    fn default() -> RandomConfig {
        RandomConfig {
            seed: 1,
            runs: 20,
            ops: 400,
            mode: Mode::Concurrent { threads: 4 },
            jitter: Some(JitterProfile::default()),
            shrink_attempts: 300,
            shrink_time: Duration::from_secs(4),
            retries: 4,
            stall_timeout: Duration::from_secs(30),
        }
    }
}

/// What passed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RandomSummary {
    /// Runs.
    pub runs: u32,
    /// Operations run, over all runs (read-backs not counted).
    pub ops: u64,
    /// Runs whose storage was re-opened after a clean disconnect and read back (0 when the
    /// factory cannot re-open storage).
    pub reopened: u32,
}

/// The loopback rig for random tests: [`loopback_options`] on the default fake kernel.
pub fn loopback_rig() -> LoopbackRig {
    LoopbackRig {
        options: loopback_options(LoopbackOptions::default()),
    }
}

/// `base` as random tests want it: two connections, so that requests also race across
/// connections (a flush on one, writes on the other) as with the kernel's `connections=2`; and
/// the fake kernel's own seeded [jitter](userblk::link::loopback::Jitter) (delays before
/// sending, a shuffled dispatch order for the requests of one operation), unless `base` has
/// some already. Its seed is fixed: each run's kernel draws the same delays.
pub fn loopback_options(base: LoopbackOptions) -> LoopbackOptions {
    LoopbackOptions {
        connections: base.connections.max(2),
        jitter: base.jitter.or(Some(KernelJitter::new(KERNEL_JITTER_SEED))),
        ..base
    }
}

/// The seed of the fake kernel's jitter in random tests.
const KERNEL_JITTER_SEED: u64 = 0x7261_6e64;

/// Runs one sequence of `ops` operations from `seed` on a fresh device, sequentially; a failure
/// is shrunk (at most `shrink_attempts` re-runs).
pub fn random_run(
    rig: &dyn Rig,
    factory: &dyn DeviceFactory,
    caps: Capabilities,
    seed: u64,
    ops: usize,
    shrink_attempts: u32,
) -> Result<u64, Box<RandomFailure>> {
    let config = RandomConfig {
        seed,
        ops,
        shrink_attempts,
        mode: Mode::Sequential,
        ..RandomConfig::default()
    };
    random_run_with(rig, factory, caps, seed, &config).map(|(ops, _)| ops)
}

/// Runs the run of `seed` as `config` says (its `seed` and `runs` are not used); returns the
/// operations run and whether the storage was re-opened, or the failure, shrunk.
pub fn random_run_with(
    rig: &dyn Rig,
    factory: &dyn DeviceFactory,
    caps: Capabilities,
    seed: u64,
    config: &RandomConfig,
) -> Result<(u64, bool), Box<RandomFailure>> {
    let setup = |what: String| {
        let f = Failure::new(FailureKind::Setup, what);
        Box::new(RandomFailure::new(
            seed,
            config.mode,
            &f,
            0,
            Vec::new(),
            Script::new(),
            "not shrunk".into(),
        ))
    };
    let probe = factory
        .create()
        .map_err(|e| setup(format!("the factory failed: {e}")))?;
    let bs = u64::from(probe.block_size().max(1));
    let size = probe.blocks() * bs;
    drop(probe);
    if size < bs {
        return Ok((0, false));
    }
    let lists = match config.mode {
        Mode::Sequential => vec![generate(seed, config.ops, size, bs, caps)],
        Mode::Concurrent { threads } => generate_threads(seed, threads, config.ops, size, bs, caps),
    };
    let concurrent = matches!(config.mode, Mode::Concurrent { .. });
    let runner = Runner {
        rig,
        factory,
        caps,
        jitter: config.jitter.filter(|_| concurrent).map(|p| (p, seed)),
        stall: config.stall_timeout,
    };
    let outcome = runner.run(&lists);
    let total: usize = lists.iter().map(Vec::len).sum();
    let Some(failure) = outcome.failure else {
        return Ok((total as u64, outcome.reopened));
    };
    let flags = caps.transmission_flags();
    if failure.kind == FailureKind::Setup {
        return Err(setup(failure.summary));
    }
    if failure.kind == FailureKind::Stall {
        // Every re-run would wait the whole stall timeout and leave a thread blocked.
        return Err(Box::new(RandomFailure::new(
            seed,
            config.mode,
            &failure,
            total,
            lists,
            Script::new(),
            "not shrunk: each re-run would wait the whole stall timeout".into(),
        )));
    }
    let started = Instant::now();
    let shrunk = shrink::shrink(
        &runner,
        lists,
        failure,
        outcome.history,
        shrink::Budget {
            runs: config.shrink_attempts,
            deadline: started + config.shrink_time,
            retries: if concurrent { config.retries } else { 1 },
            lengths: !concurrent,
        },
    );
    let upto = shrunk
        .failure
        .event
        .filter(|&e| shrunk.history.events[e].phase != Phase::Reopened);
    let script = to_script::script_of(&shrunk.history, flags, if concurrent { None } else { upto });
    let kept: usize = shrunk.lists.iter().map(Vec::len).sum();
    let shrinking = if shrunk.accepted == 0 {
        format!(
            "shrinking: no smaller run failed the same way ({}) in {} re-runs ({:.1} s); this is \
             the original failure, {total} operations",
            shrunk.failure.kind,
            shrunk.runs,
            started.elapsed().as_secs_f64()
        )
    } else {
        format!(
            "shrunk from {total} to {kept} operations, failing the same way ({}), in {} re-runs \
             ({:.1} s)",
            shrunk.failure.kind,
            shrunk.runs,
            started.elapsed().as_secs_f64()
        )
    };
    Err(Box::new(RandomFailure::new(
        seed,
        config.mode,
        &shrunk.failure,
        total,
        shrunk.lists,
        script,
        shrinking,
    )))
}

/// Runs `config.runs` runs; stops at the first failure, shrunk. `progress` is called before
/// each run with its index.
pub fn random_test(
    rig: &dyn Rig,
    factory: &dyn DeviceFactory,
    caps: Capabilities,
    config: &RandomConfig,
    progress: &mut dyn FnMut(u32),
) -> Result<RandomSummary, Box<RandomFailure>> {
    let mut summary = RandomSummary::default();
    for run in 0..config.runs {
        progress(run);
        let seed = config.seed.wrapping_add(u64::from(run));
        let (ops, reopened) = random_run_with(rig, factory, caps, seed, config)?;
        summary.ops += ops;
        summary.runs += 1;
        summary.reopened += u32::from(reopened);
    }
    Ok(summary)
}
