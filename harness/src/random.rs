//! Model-based random testing: seeded random sequences of block operations run against a
//! device and checked, read by read, against an in-memory reference model. A failing sequence
//! is shrunk (operations deleted, lengths halved) and printed as a [`Script`] in the text
//! format, ready to paste into a regression test.
//!
//! The model knows what every block must hold: a written pattern, zeroes, or, for a block never
//! written, whatever the first read returned (later reads must agree); a trimmed block is
//! unspecified unless the capabilities promise zeroes (`trim_zeroes`).
//!
//! ```
//! use userblk::{BlockDevice, MemDevice};
//! use userblk_harness::random::{random_test, RandomConfig};
//! use userblk_harness::target::LoopbackRig;
//!
//! let factory = || Box::new(MemDevice::new(8 << 20)) as Box<dyn BlockDevice>;
//! let config = RandomConfig { runs: 2, ops: 50, ..RandomConfig::default() };
//! let summary = random_test(&LoopbackRig::default(), &factory, factory().capabilities(), &config, &mut |_| {});
//! assert!(summary.is_ok());
//! ```

use std::collections::BTreeMap;
use std::fmt;

use userblk::proto::TransmissionFlags;
use userblk::{BlockDevice, Capabilities};

use crate::factory::DeviceFactory;
use crate::script::{first_difference, Data, Pattern, Script};
use crate::target::{Rig, Target};

/// A small seeded generator (splitmix64): the same seed gives the same operations everywhere.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`0` when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

/// One block operation of a random sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelOp {
    /// Write the `seed` pattern (see [`Pattern::Seed`]), with FUA when `fua`.
    Write {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Pattern seed.
        seed: u64,
        /// FUA.
        fua: bool,
    },
    /// Read and check against the model.
    Read {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Flush.
    Flush,
    /// Trim.
    Trim {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Write zeroes.
    Zeroes {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// NO_HOLE.
        no_hole: bool,
    },
}

impl ModelOp {
    fn range(&self) -> Option<(u64, u64)> {
        match *self {
            ModelOp::Write { offset, len, .. }
            | ModelOp::Read { offset, len }
            | ModelOp::Trim { offset, len }
            | ModelOp::Zeroes { offset, len, .. } => Some((offset, len)),
            ModelOp::Flush => None,
        }
    }

    fn with_len(self, new: u64) -> ModelOp {
        match self {
            ModelOp::Write {
                offset, seed, fua, ..
            } => ModelOp::Write {
                offset,
                len: new,
                seed,
                fua,
            },
            ModelOp::Read { offset, .. } => ModelOp::Read { offset, len: new },
            ModelOp::Trim { offset, .. } => ModelOp::Trim { offset, len: new },
            ModelOp::Zeroes {
                offset, no_hole, ..
            } => ModelOp::Zeroes {
                offset,
                len: new,
                no_hole,
            },
            ModelOp::Flush => ModelOp::Flush,
        }
    }
}

/// What a block must hold.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Cell {
    Pat(Pattern),
    Bytes(Vec<u8>),
    Unspecified,
}

/// The reference model: per block, what it must hold; absent means never written (learned on
/// the first read).
#[derive(Debug)]
struct Model {
    bs: u64,
    cells: BTreeMap<u64, Cell>,
    caps: Capabilities,
}

impl Model {
    fn set(&mut self, offset: u64, len: u64, cell: Cell) {
        for b in offset / self.bs..(offset + len) / self.bs {
            self.cells.insert(b, cell.clone());
        }
    }

    /// Checks a read; learns never-written blocks; returns the expectation for a script and,
    /// on a mismatch, the message.
    fn read(&mut self, offset: u64, got: &[u8]) -> (Data, Option<String>) {
        let bs = self.bs as usize;
        let mut data = Data(Vec::new());
        let mut failure = None;
        for (i, chunk) in got.chunks(bs).enumerate() {
            let at = offset + (i * bs) as u64;
            let b = at / self.bs;
            let cell = match self.cells.get(&b) {
                Some(c) => c.clone(),
                None => {
                    let learned = if chunk.iter().all(|&x| x == chunk[0]) {
                        Cell::Pat(Pattern::Fill(chunk[0]))
                    } else {
                        Cell::Bytes(chunk.to_vec())
                    };
                    self.cells.insert(b, learned.clone());
                    learned
                }
            };
            let (want, pattern) = match &cell {
                Cell::Pat(p) => (Some(p.bytes(at, chunk.len())), p.clone()),
                Cell::Bytes(v) => (Some(v.clone()), Pattern::Hex(v.clone())),
                Cell::Unspecified => (None, Pattern::Any),
            };
            if let (Some(want), None) = (&want, &failure) {
                if let Some(diff) = first_difference(want, chunk, None, at) {
                    failure = Some(format!(
                        "the block at {at} does not hold what the model expects ({pattern})\n{diff}"
                    ));
                }
            }
            data.append(chunk.len() as u64, pattern);
        }
        data.close();
        (data, failure)
    }
}

/// Random sequence settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RandomConfig {
    /// The first run's seed; run `i` uses `seed + i`.
    pub seed: u64,
    /// How many sequences.
    pub runs: u32,
    /// Operations per sequence (before the final read-back of what was written).
    pub ops: usize,
    /// How many re-runs shrinking a failure may take.
    pub shrink_attempts: u32,
}

impl Default for RandomConfig {
    fn default() -> RandomConfig {
        RandomConfig {
            seed: 1,
            runs: 20,
            ops: 200,
            shrink_attempts: 300,
        }
    }
}

/// What passed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RandomSummary {
    /// Sequences run.
    pub runs: u32,
    /// Operations run, over all sequences.
    pub ops: u64,
}

/// A failed sequence, shrunk.
#[derive(Clone, Debug)]
pub struct RandomFailure {
    /// The seed of the failing run (`--seed` reproduces it as the first run).
    pub seed: u64,
    /// What went wrong, on the shrunk sequence.
    pub message: String,
    /// Length of the sequence as generated.
    pub original_len: usize,
    /// The shrunk sequence.
    pub ops: Vec<ModelOp>,
    /// The shrunk sequence as a script, with the replies the model expects.
    pub script: Script,
}

impl fmt::Display for RandomFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "random test failed (seed {}): {}",
            self.seed,
            self.message.replace('\n', "\n  ")
        )?;
        writeln!(
            f,
            "shrunk from {} to {} operations; as a script (paste it into a regression test):",
            self.original_len,
            self.ops.len()
        )?;
        for line in self.script.to_string().lines() {
            writeln!(f, "    {line}")?;
        }
        Ok(())
    }
}

/// Generates a sequence for a device of `size` bytes: operations clustered near the start, the
/// end and 64/128 KiB boundaries so that they overlap often, then a read of every range written.
pub fn generate(seed: u64, n: usize, size: u64, bs: u64, caps: Capabilities) -> Vec<ModelOp> {
    let mut rng = Rng::new(seed);
    let blocks = size / bs;
    let mut ops = Vec::with_capacity(n + n / 2);
    let mut written = Vec::new();
    for _ in 0..n {
        let nb = match rng.below(100) {
            0..=59 => 1 + rng.below(8),
            60..=89 => 1 + rng.below(128),
            _ => 1 + rng.below((1 << 20) / bs),
        }
        .min(blocks);
        let hot = blocks.min((2 << 20) / bs);
        let start = match rng.below(10) {
            0..=5 => rng.below(hot),
            6 | 7 => blocks - 1 - rng.below(hot),
            8 => {
                let step = ((64 << 10) / bs).max(1);
                (1 + rng.below(blocks / step)) * step - rng.below(4).min(step)
            }
            _ => rng.below(blocks),
        }
        .min(blocks - nb);
        let (offset, len) = (start * bs, nb * bs);
        let mut kind = rng.below(100);
        if caps.read_only {
            kind = 0;
        }
        let op = match kind {
            0..=34 => ModelOp::Read { offset, len },
            35..=74 => ModelOp::Write {
                offset,
                len,
                seed: rng.next_u64() % 1_000_000,
                fua: kind >= 70,
            },
            75..=79 => ModelOp::Flush,
            80..=89 if caps.trim => ModelOp::Trim { offset, len },
            _ => ModelOp::Zeroes {
                offset,
                len,
                no_hole: rng.below(2) == 0,
            },
        };
        if !matches!(op, ModelOp::Read { .. } | ModelOp::Flush) {
            written.push((offset, len));
        }
        ops.push(op);
    }
    written.sort_unstable();
    written.dedup();
    for (offset, len) in written.into_iter().take(n / 2) {
        ops.push(ModelOp::Read { offset, len });
    }
    ops
}

/// Runs `ops` on `target`, checking each against the model. Returns the sequence as a script
/// (up to and including the first failure) and the failure: its index and message.
pub fn run_ops(
    target: &dyn Target,
    ops: &[ModelOp],
    caps: Capabilities,
) -> (Script, Option<(usize, String)>) {
    let bs = u64::from(target.block_size());
    let flags = target.flags();
    let mut model = Model {
        bs,
        cells: BTreeMap::new(),
        caps,
    };
    let mut script = Script::new();
    for (i, op) in ops.iter().enumerate() {
        let result = match *op {
            ModelOp::Write {
                offset,
                len,
                seed,
                fua,
            } => {
                let data = Pattern::Seed(seed).bytes(offset, len as usize);
                script = script.write(offset, len as u32, Data::seed(seed));
                if fua {
                    script = script.fua();
                }
                model.set(offset, len, Cell::Pat(Pattern::Seed(seed)));
                if fua {
                    target.write_fua(offset, &data)
                } else {
                    target.write(offset, &data)
                }
            }
            ModelOp::Flush => {
                if flags.contains(TransmissionFlags::SEND_FLUSH) {
                    script = script.flush();
                }
                target.flush()
            }
            ModelOp::Trim { offset, len } => {
                script = script.trim(offset, len as u32);
                let cell = if model.caps.trim_zeroes {
                    Cell::Pat(Pattern::Fill(0))
                } else {
                    Cell::Unspecified
                };
                model.set(offset, len, cell);
                target.trim(offset, len)
            }
            ModelOp::Zeroes {
                offset,
                len,
                no_hole,
            } => {
                script = if flags.contains(TransmissionFlags::SEND_WRITE_ZEROES) {
                    script.zeroes(offset, len as u32, no_hole)
                } else {
                    script.write(offset, len as u32, Data::fill(0))
                };
                model.set(offset, len, Cell::Pat(Pattern::Fill(0)));
                target.write_zeroes(offset, len, no_hole)
            }
            ModelOp::Read { offset, len } => match target.read(offset, len as usize) {
                Ok(got) => {
                    let (expect, failure) = model.read(offset, &got);
                    script = script.read(offset, len as u32).data(expect);
                    if let Some(f) = failure {
                        return (
                            script,
                            Some((i, format!("operation {} (read {offset} {len}): {f}", i + 1))),
                        );
                    }
                    Ok(())
                }
                Err(e) => {
                    script = script.read(offset, len as u32);
                    Err(e)
                }
            },
        };
        if let Err(e) = result {
            return (
                script,
                Some((i, format!("operation {} ({op:?}) failed: {e}", i + 1))),
            );
        }
    }
    (script, None)
}

/// Runs `ops` on a fresh device; the failure, if any (a serving error at the end counts).
fn attempt(
    rig: &dyn Rig,
    factory: &dyn DeviceFactory,
    caps: Capabilities,
    ops: &[ModelOp],
) -> (Script, Option<(usize, String)>) {
    let device = match factory.create() {
        Ok(d) => d,
        Err(e) => return (Script::new(), Some((0, format!("the factory failed: {e}")))),
    };
    let t = match rig.attach(device) {
        Ok(t) => t,
        Err(e) => return (Script::new(), Some((0, format!("could not attach: {e}")))),
    };
    let (script, failure) = run_ops(&*t, ops, caps);
    let detached = t.detach();
    match (failure, detached) {
        (Some(f), _) => (script, Some(f)),
        (None, Err(e)) => (
            script,
            Some((ops.len(), format!("serving ended with an error: {e}"))),
        ),
        (None, Ok(())) => (script, None),
    }
}

/// Shrinks a failing sequence: cuts it after the failure, deletes runs of operations (halves,
/// quarters, .. single ones), then halves lengths, while it still fails; at most `budget` re-runs.
pub fn shrink(
    rig: &dyn Rig,
    factory: &dyn DeviceFactory,
    caps: Capabilities,
    ops: &[ModelOp],
    budget: u32,
) -> Vec<ModelOp> {
    let tries = std::cell::Cell::new(0u32);
    let fails = |cand: &[ModelOp]| -> Option<usize> {
        tries.set(tries.get() + 1);
        attempt(rig, factory, caps, cand).1.map(|(i, _)| i)
    };
    let mut best = ops.to_vec();
    if let Some(i) = fails(&best) {
        best.truncate(i + 1);
    } else {
        return best;
    }
    let mut progress = true;
    while progress && tries.get() < budget {
        progress = false;
        let mut chunk = best.len().div_ceil(2).max(1);
        loop {
            let mut i = 0;
            while i < best.len() && tries.get() < budget {
                let mut cand = best.clone();
                cand.drain(i..(i + chunk).min(cand.len()));
                match (!cand.is_empty()).then(|| fails(&cand)).flatten() {
                    Some(at) => {
                        cand.truncate(at + 1);
                        best = cand;
                        progress = true;
                    }
                    None => i += chunk,
                }
            }
            if chunk == 1 || tries.get() >= budget {
                break;
            }
            chunk /= 2;
        }
        let bs = 512;
        let mut i = 0;
        while i < best.len() && tries.get() < budget {
            match best[i].range() {
                Some((_, len)) if len > bs => {
                    let mut cand = best.clone();
                    cand[i] = best[i].with_len((len / 2).div_ceil(bs) * bs);
                    match fails(&cand) {
                        Some(at) => {
                            cand.truncate(at + 1);
                            best = cand;
                            progress = true;
                        }
                        None => i += 1,
                    }
                }
                _ => i += 1,
            }
        }
    }
    best
}

/// Runs one sequence of `ops` operations from `seed` on a fresh device; a failure is shrunk.
pub fn random_run(
    rig: &dyn Rig,
    factory: &dyn DeviceFactory,
    caps: Capabilities,
    seed: u64,
    ops: usize,
    shrink_attempts: u32,
) -> Result<u64, Box<RandomFailure>> {
    let probe = factory.create().map_err(|e| {
        Box::new(RandomFailure {
            seed,
            message: format!("the factory failed: {e}"),
            original_len: 0,
            ops: Vec::new(),
            script: Script::new(),
        })
    })?;
    let bs = u64::from(probe.block_size());
    let size = probe.blocks() * bs;
    drop(probe);
    if size < bs {
        return Ok(0);
    }
    let seq = generate(seed, ops, size, bs, caps);
    let (_, failure) = attempt(rig, factory, caps, &seq);
    let Some(_) = failure else {
        return Ok(seq.len() as u64);
    };
    let shrunk = shrink(rig, factory, caps, &seq, shrink_attempts);
    let (script, failure) = attempt(rig, factory, caps, &shrunk);
    let message = failure.map_or_else(
        || "the failure did not reproduce on the shrunk sequence (flaky?)".to_string(),
        |(_, m)| m,
    );
    Err(Box::new(RandomFailure {
        seed,
        message,
        original_len: seq.len(),
        ops: shrunk,
        script,
    }))
}

/// Runs `config.runs` sequences; stops at the first failure, shrunk. `progress` is called
/// before each run with its index.
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
        summary.ops += random_run(rig, factory, caps, seed, config.ops, config.shrink_attempts)?;
        summary.runs += 1;
    }
    Ok(summary)
}
