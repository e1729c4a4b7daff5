//! Durability cases: what a device acknowledged is still there after a clean disconnect and a
//! re-open of the same storage (plain writes, flushed writes, FUA writes), and, for devices the
//! factory says are [`Crashable`](crate::crash::Crashable), after simulated power losses.
//!
//! DESIGN.md: "a clean disconnect loses nothing that was acknowledged", flushed or not: the
//! kernel's NBD driver sends DISC on a clean disconnect and the server unmounts the device, which
//! must make its cache durable. The re-open cases need a factory that can open the same storage
//! again ([`DeviceFactory::storage`](crate::factory::DeviceFactory::storage)).

use std::collections::BTreeMap;

use super::{op, pattern};
use crate::conformance::{CaseResult, Env, Failure};
use crate::crash::{self, ConcurrentOptions, CrashError, CrashOptions, CrashPoints};
use crate::factory::Storage;
use crate::script::first_difference;
use crate::target::{Attached, Target};

/// Why a re-open case cannot run, and how to make it run.
const NO_STORAGE: &str = "the device factory cannot re-open the same storage, so durability \
across a disconnect is not checked. Give a re-openable factory: \
factory::Reopen::new(|| make_storage(), |storage| MyDevice::open(storage)) (e.g. a temporary \
file and FileDevice::open, or factory::mem(size) for RAM)";

/// Data written without a flush, then a clean disconnect and a re-open, reads back.
pub fn reopen_after_writes(env: &Env<'_>) -> CaseResult {
    reopen(env, Mode::Plain)
}

/// Data written and flushed, then a clean disconnect and a re-open, reads back.
pub fn reopen_after_flush(env: &Env<'_>) -> CaseResult {
    reopen(env, Mode::Flush)
}

/// Data written with FUA, then a clean disconnect and a re-open, reads back.
pub fn reopen_after_fua(env: &Env<'_>) -> CaseResult {
    reopen(env, Mode::Fua)
}

/// For a factory of [`Crashable`](crate::crash::Crashable) devices: the crash checker, one
/// stream and then threads racing, through the suite's rig; every survivor of a simulated power
/// loss holds what the write-cache rules require.
pub fn crash_and_reopen(env: &Env<'_>) -> CaseResult {
    env.needs_own_device()?;
    if env.caps.read_only {
        return Err(Failure::skip("the device is read-only"));
    }
    // A factory without Crashable devices skips, saying how to give one.
    let probe =
        match env.factory.create_crashable() {
            None => return Err(Failure::skip(
                "the factory's devices are not Crashable: to check what survives a power loss, \
                 implement crash::Crashable and build the factory with \
                 factory::crashable(|| MyDevice::new(..)) or Reopen::new(..).crashable()",
            )),
            Some(Err(e)) => {
                return Err(Failure::failed(format!(
                    "the factory could not make a device: {e}"
                )))
            }
            Some(Ok(probe)) => probe,
        };
    let bs = probe.block_size();
    // The first MiB is enough to race on, and keeps the blocks checked per power loss few.
    let span = (probe.blocks() * u64::from(bs)).min(1 << 20);
    drop(probe);
    let failed = |e: CrashError| Failure::failed(e.to_string());
    let ops = crash::random_ops(1, span, bs, 200);
    let options = CrashOptions {
        points: CrashPoints::Flushes,
        ..CrashOptions::default()
    };
    crash::check_on(env.rig, env.factory, &ops, &options).map_err(failed)?;
    let options = ConcurrentOptions {
        rounds: 2,
        ops_per_thread: 50,
        crash_every: 8,
        ..ConcurrentOptions::default()
    };
    crash::check_concurrent_on(env.rig, env.factory, &options).map_err(failed)?;
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    Flush,
    Fua,
}

impl Mode {
    fn words(self) -> &'static str {
        match self {
            Mode::Plain => "written without a flush",
            Mode::Flush => "written and flushed",
            Mode::Fua => "written with FUA",
        }
    }
}

/// What each written block must hold, and which write put it there.
#[derive(Default)]
struct Expected {
    blocks: BTreeMap<u64, (Vec<u8>, String)>,
}

impl Expected {
    fn note(&mut self, bs: u64, offset: u64, data: &[u8], name: &str) {
        for (i, block) in data.chunks(bs as usize).enumerate() {
            self.blocks
                .insert(offset / bs + i as u64, (block.to_vec(), name.to_string()));
        }
    }
}

fn attach(env: &Env<'_>, storage: &dyn Storage, when: &str) -> Result<Box<dyn Attached>, Failure> {
    let device = storage
        .open()
        .map_err(|e| Failure::failed(format!("could not open the storage {when}: {e}")))?;
    env.attach_device(device)
}

fn detach(t: Box<dyn Attached>, when: &str) -> CaseResult {
    t.detach().map_err(|e| {
        Failure::failed(format!(
            "the clean disconnect {when} ended with an error: {e}"
        ))
    })
}

/// Writes `data` at `offset` as `mode` says, and notes it.
fn put(
    t: &dyn Target,
    mode: Mode,
    expected: &mut Expected,
    offset: u64,
    data: &[u8],
    name: &str,
) -> CaseResult {
    let bs = u64::from(t.block_size());
    match mode {
        Mode::Fua => op(t.write_fua(offset, data), || {
            format!("{name}: FUA write at {offset}")
        })?,
        _ => op(t.write(offset, data), || {
            format!("{name}: write at {offset}")
        })?,
    }
    expected.note(bs, offset, data, name);
    Ok(())
}

/// Writes of one session: one block, several blocks, a block written twice, writes that
/// overlap; `seed` varies the data and `base` the places between sessions.
fn session(
    t: &dyn Target,
    mode: Mode,
    expected: &mut Expected,
    seed: u64,
    base: u64,
) -> CaseResult {
    let bs = u64::from(t.block_size());
    let blocks = t.size() / bs;
    let at = |b: u64| b * bs;
    put(
        t,
        mode,
        expected,
        at(base),
        &pattern(seed, at(base), bs),
        "one block",
    )?;
    let mid = blocks / 2 - 4 + base;
    put(
        t,
        mode,
        expected,
        at(mid),
        &pattern(seed + 1, at(mid), 8 * bs),
        "eight blocks in the middle",
    )?;
    let last = blocks - 1 - base;
    put(
        t,
        mode,
        expected,
        at(last),
        &pattern(seed + 2, at(last), bs),
        "the last block",
    )?;
    let twice = 16 + base;
    put(
        t,
        mode,
        expected,
        at(twice),
        &pattern(seed + 3, at(twice), bs),
        "a block",
    )?;
    put(
        t,
        mode,
        expected,
        at(twice),
        &pattern(seed + 4, at(twice), bs),
        "the same block written again",
    )?;
    let over = 24 + base;
    put(
        t,
        mode,
        expected,
        at(over),
        &pattern(seed + 5, at(over), 4 * bs),
        "four blocks",
    )?;
    put(
        t,
        mode,
        expected,
        at(over + 2),
        &pattern(seed + 6, at(over + 2), 4 * bs),
        "four blocks overlapping the previous write by two",
    )?;
    if mode == Mode::Flush {
        op(t.flush(), || "flush".into())?;
    }
    Ok(())
}

/// Reads back every noted block; the failure lists what was lost, write by write, with a dump
/// of the first difference.
fn verify(t: &dyn Target, mode: Mode, expected: &Expected, when: &str) -> CaseResult {
    let bs = u64::from(t.block_size());
    // (write, first block, blocks) of each run of lost blocks, and the first dump.
    let mut lost: Vec<(&str, u64, u64)> = Vec::new();
    let mut first_dump = None;
    let mut zeroes = true;
    let mut count = 0;
    for (&b, (want, name)) in &expected.blocks {
        let got = op(t.read(b * bs, bs as usize), || {
            format!("read of block {b} {when}")
        })?;
        let Some(diff) = first_difference(want, &got, None, b * bs) else {
            continue;
        };
        count += 1;
        zeroes &= got.iter().all(|&x| x == 0);
        first_dump.get_or_insert(diff);
        match lost.last_mut() {
            Some((n, first, len)) if *n == name.as_str() && *first + *len == b => *len += 1,
            _ => lost.push((name, b, 1)),
        }
    }
    let Some(dump) = first_dump else {
        return Ok(());
    };
    let runs: Vec<String> = lost
        .iter()
        .map(|(name, first, n)| match n {
            1 => format!("{name}: block {first} (offset {})", first * bs),
            _ => format!(
                "{name}: blocks {first}..={} (offset {}, {n} blocks)",
                first + n - 1,
                first * bs
            ),
        })
        .collect();
    Err(Failure::failed(format!(
        "lost across disconnect: {count} of {} blocks {} were acknowledged before a clean \
         disconnect and read back differently {when}{} (a clean disconnect loses nothing \
         acknowledged: unmount() must make every acknowledged write durable)\n{}\n{dump}",
        expected.blocks.len(),
        mode.words(),
        if zeroes { ", as zeroes" } else { "" },
        runs.join("\n")
    )))
}

/// Two sessions of writes, each ended by a clean disconnect and followed by a re-open that
/// must read back everything acknowledged so far.
fn reopen(env: &Env<'_>, mode: Mode) -> CaseResult {
    if env.caps.read_only {
        return Err(Failure::skip("the device is read-only"));
    }
    let storage = match env.factory.storage() {
        // Not a skip: the promise applies to every writable device, and it went unchecked.
        None => return Err(Failure::not_run(NO_STORAGE)),
        Some(Err(e)) => {
            return Err(Failure::failed(format!(
                "the factory could not make storage: {e}"
            )))
        }
        Some(Ok(s)) => s,
    };
    let mut expected = Expected::default();
    for (round, when) in [
        (0u64, "after the first re-open"),
        (1, "after the second re-open"),
    ] {
        let t = attach(env, &*storage, if round == 0 { "first" } else { "again" })?;
        let bs = u64::from(t.block_size());
        if t.size() / bs < 64 {
            let size = t.size();
            detach(t, "")?;
            return Err(Failure::not_run(format!(
                "needs a device of at least 64 blocks, the factory's has {size} bytes"
            )));
        }
        // Different places and data in the second session, over what the first left.
        let written = session(&*t, mode, &mut expected, 10 * round + 1, 2 * round);
        let detached = detach(t, "after the writes");
        written?;
        detached?;
        let t = attach(env, &*storage, "after the disconnect")?;
        let checked = verify(&*t, mode, &expected, when);
        let detached = detach(t, "after reading back");
        checked?;
        detached?;
    }
    Ok(())
}
