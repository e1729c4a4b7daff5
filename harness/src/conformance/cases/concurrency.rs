//! Driver cases with many requests in flight at once: to disjoint ranges (each must land where
//! it was sent, whatever else is in flight) and to one range (each block holds one writer's data,
//! never a mix, and once the writers are done, never the data from before).

use std::thread;

use super::{block, expect_read, needs_size, op, pattern, with_target, writable};
use crate::conformance::{CaseResult, Env, Failure};
use crate::script::first_difference;
use crate::target::Target;

/// Joins scoped threads, failing with the first failure (or panic).
fn join_all<'s>(handles: Vec<thread::ScopedJoinHandle<'s, CaseResult>>) -> CaseResult {
    let mut first = Ok(());
    for h in handles {
        let r = h
            .join()
            .unwrap_or_else(|_| Err(Failure::failed("a thread of the case panicked")));
        first = first.and(r);
    }
    first
}

/// Many requests in flight at once to disjoint ranges, in two parts that both always run: one
/// large write and read (which the kernel splits into up to 128 requests in flight); then
/// eight threads at once, each writing and re-reading a region of its own, and at the end each
/// region must hold exactly its thread's writes (nothing from a neighbour).
pub fn in_flight_disjoint(env: &Env<'_>) -> CaseResult {
    writable(env)?;
    with_target(env, None, |t| {
        let bs = block(t);
        needs_size(t, 4 << 20)?;
        let len = (16u64 << 20).min(t.size() / 2) / bs * bs;
        let data = pattern(11, 0, len);
        op(t.write(0, &data), || format!("write of {len} bytes"))?;
        expect_read(
            t,
            0,
            &data,
            "lost write",
            "large write split into many requests",
        )?;
        threads_on_own_regions(t)
    })
}

fn threads_on_own_regions(t: &dyn Target) -> CaseResult {
    let bs = block(t);
    let region = (t.size() / 8).min(1 << 20) / bs * bs;
    thread::scope(|s| {
        let workers = (0..8u64)
            .map(|w| {
                s.spawn(move || -> Result<Vec<u8>, Failure> {
                    let base = w * region;
                    // The thread's model of its region: a first write over all of it, then
                    // writes of growing size at moving places.
                    let mut model = pattern(90 + w, base, region);
                    op(t.write(base, &model), || {
                        format!("thread {w}: write of its region at {base}")
                    })?;
                    for round in 0..8u64 {
                        let l = ((round + 1) * 4 * bs).min(region);
                        let o = base + (round * 7 * bs) % (region - l + bs) / bs * bs;
                        let data = pattern(100 + w * 10 + round, o, l);
                        op(t.write(o, &data), || format!("thread {w}: write at {o}"))?;
                        expect_read(
                            t,
                            o,
                            &data,
                            "lost write",
                            &format!(
                                "thread {w}, round {round}, with other threads' requests in flight"
                            ),
                        )?;
                        let at = (o - base) as usize;
                        model[at..at + l as usize].copy_from_slice(&data);
                    }
                    Ok(model)
                })
            })
            .collect::<Vec<_>>();
        let mut models = Vec::new();
        let mut first = Ok(());
        for (w, h) in workers.into_iter().enumerate() {
            match h.join() {
                Ok(Ok(m)) => models.push((w as u64, m)),
                Ok(Err(f)) => first = first.and(Err(f)),
                Err(_) => first = first.and(Err(Failure::failed("a thread of the case panicked"))),
            }
        }
        first?;
        // Once all are done, each region holds its own thread's data and no one else's.
        for (w, model) in models {
            expect_read(
                t,
                w * region,
                &model,
                "lost or misdirected write",
                &format!("thread {w}'s region after all threads finished"),
            )?;
        }
        Ok(())
    })
}

/// What a block holds, in terms of the data sources that may legitimately be there.
enum BlockContent {
    /// Wholly source `i`'s.
    One(usize),
    /// Pieces of several sources: (source, start, end) runs within the block.
    Torn(Vec<(usize, usize, usize)>),
    /// Bytes no source has there.
    Foreign,
}

/// Classifies `got` (the block at `offset`) against `sources`, each the full data of one
/// writer for that block.
fn classify(got: &[u8], sources: &[&[u8]]) -> BlockContent {
    if let Some(i) = sources.iter().position(|s| *s == got) {
        return BlockContent::One(i);
    }
    // Byte by byte, keep with the current source as long as it matches.
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    for (b, &byte) in got.iter().enumerate() {
        let continues = runs
            .last()
            .is_some_and(|&(s, _, end)| end == b && sources[s][b] == byte);
        if continues {
            if let Some(last) = runs.last_mut() {
                last.2 = b + 1;
            }
            continue;
        }
        match sources.iter().position(|s| s[b] == byte) {
            Some(s) => runs.push((s, b, b + 1)),
            None => return BlockContent::Foreign,
        }
    }
    // Random data matches another source by chance now and then; merge runs of a byte or
    // two into their neighbours so that the description names the real pieces.
    let mut merged: Vec<(usize, usize, usize)> = Vec::new();
    for r in runs {
        match merged.last_mut() {
            Some(last) if r.2 - r.1 <= 2 || last.0 == r.0 => last.2 = r.2,
            _ => merged.push(r),
        }
    }
    BlockContent::Torn(merged)
}

/// Concurrent writers to one range, with readers alongside: every block a reader sees is
/// wholly one writer's or the data from before (never a mix), and once every writer has
/// completed, every block holds one writer's data (never the data from before: a completed
/// write is not lost).
pub fn in_flight_overlapping(env: &Env<'_>) -> CaseResult {
    writable(env)?;
    with_target(env, None, |t| {
        needs_size(t, 1 << 20)?;
        let bs = block(t) as usize;
        let base = 64 << 10;
        let len = 256 << 10;
        let writers = 4u64;
        const INITIAL: u64 = 200;
        op(t.write(base, &pattern(INITIAL, base, len)), || {
            "initial write".into()
        })?;
        // Source 0 is the data from before; sources 1..=writers are the writers'.
        let data: Vec<Vec<u8>> = std::iter::once(INITIAL)
            .chain(1..=writers)
            .map(|s| pattern(s, base, len))
            .collect();
        let name = |s: usize| {
            if s == 0 {
                "the data from before".to_string()
            } else {
                format!("writer {s}'s")
            }
        };
        // `done`: every writer has completed, so the data from before is no longer allowed.
        let check = |got: &[u8], who: &str, done: bool| -> CaseResult {
            for (i, b) in got.chunks(bs).enumerate() {
                let at = i * bs;
                let o = base + at as u64;
                let sources: Vec<&[u8]> = data.iter().map(|d| &d[at..at + bs]).collect();
                match classify(b, &sources) {
                    BlockContent::One(0) if done => {
                        return Err(Failure::failed(format!(
                            "lost write: {who}: the block at {o} still holds the data from before, \
                             though all {writers} writers to it completed"
                        )))
                    }
                    BlockContent::One(_) => {}
                    BlockContent::Torn(runs) => {
                        let pieces: Vec<String> = runs
                            .iter()
                            .map(|&(s, from, to)| format!("{} (bytes {from}..{to})", name(s)))
                            .collect();
                        return Err(Failure::failed(format!(
                            "torn {}: {who}: the block at {o} mixes {}",
                            if done { "write" } else { "read" },
                            pieces.join(" and ")
                        )));
                    }
                    BlockContent::Foreign => {
                        let diff = first_difference(sources[1], b, None, o).unwrap_or_default();
                        return Err(Failure::failed(format!(
                            "foreign data: {who}: the block at {o} holds bytes no writer wrote \
                             (compared with writer 1's below)\n{diff}"
                        )));
                    }
                }
            }
            Ok(())
        };
        thread::scope(|s| {
            let mut hs = Vec::new();
            for w in 1..=writers {
                let d = &data[w as usize];
                hs.push(s.spawn(move || -> CaseResult {
                    for _ in 0..6 {
                        op(t.write(base, d), || format!("writer {w}"))?;
                    }
                    Ok(())
                }));
            }
            for r in 0..2u64 {
                let check = &check;
                hs.push(s.spawn(move || -> CaseResult {
                    for _ in 0..6 {
                        let got = op(t.read(base, len as usize), || format!("reader {r}"))?;
                        check(&got, &format!("reader {r}, with writers in flight"), false)?;
                    }
                    Ok(())
                }));
            }
            join_all(hs)
        })?;
        let last = op(t.read(base, len as usize), || "final read".into())?;
        check(&last, "after all writers completed", true)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_is_one_writers_torn_or_foreign() {
        let (a, b) = (pattern(1, 0, 512), pattern(2, 0, 512));
        let sources: [&[u8]; 2] = [&a, &b];
        assert!(matches!(classify(&b, &sources), BlockContent::One(1)));
        let mut torn = a.clone();
        torn[256..].copy_from_slice(&b[256..]);
        match classify(&torn, &sources) {
            BlockContent::Torn(runs) => assert_eq!(runs, [(0, 0, 256), (1, 256, 512)]),
            _ => panic!("a half-and-half block is torn"),
        }
        let mut foreign = a.clone();
        foreign[100] = !(a[100] | b[100]);
        foreign[100] ^= u8::from(foreign[100] == a[100] || foreign[100] == b[100]);
        assert!(matches!(
            classify(&foreign, &sources),
            BlockContent::Foreign
        ));
    }
}
