//! A run's history as a [`Script`]: each operation a step (reads and writes split as the kernel
//! splits them), in the order they were invoked; operations that were in flight together in the
//! run form a group, sent together (`together { .. }`); each read expects what the model allows
//! when the script is replayed: per block, the value of any write of its own group, or what the
//! groups before it may have left (`any-of(..)` when that is more than one value).

use userblk::proto::TransmissionFlags;
use userblk::LoopbackOptions;

use super::generate::ModelOp;
use super::history::{History, Phase};
use crate::script::{Data, Pattern, Script};

/// The most requests in one group: well within the fake kernel's tags (128 by default), which
/// a replayed group may not exceed.
const MAX_GROUP_REQUESTS: usize = 64;

/// The history's operations before the disconnect as a script, up to and including event
/// `upto` when given. `flags` are what the server advertised (a flush the kernel would not send
/// is left out; write-zeroes without `SEND_WRITE_ZEROES` become zero-filled writes).
pub(crate) fn script_of(h: &History, flags: TransmissionFlags, upto: Option<usize>) -> Script {
    let mut order: Vec<usize> = (0..h.events.len())
        .filter(|&e| h.events[e].phase != Phase::Reopened)
        .collect();
    order.sort_by_key(|&e| (h.events[e].phase, h.events[e].invoked));
    if let Some(last) = upto.and_then(|u| order.iter().position(|&e| e == u)) {
        order.truncate(last + 1);
    }
    let groups = groups(h, &order);
    // What a replay allows: the history as the script runs it, each group in flight together
    // and the groups one after the other.
    let mut replayed = History::new(h.block_size, h.trim_zeroes, h.threads);
    let mut origin = Vec::new();
    for (g, members) in groups.iter().enumerate() {
        for &e in members {
            let mut ev = h.events[e].clone();
            (ev.invoked, ev.completed) = (3 * g as u64, 3 * g as u64 + 1);
            replayed.events.push(ev);
            origin.push(e);
        }
    }
    let expect = replayed.expectations();
    let mut script = Script::new();
    let mut at = 0;
    for members in groups {
        let mut steps = Script::new();
        for _ in &members {
            steps = step(steps, &replayed, at, flags, expect.get(&at));
            at += 1;
        }
        script = if steps.steps.len() > 1 {
            script.together(steps)
        } else {
            Script {
                steps: script.steps.into_iter().chain(steps.steps).collect(),
            }
        };
    }
    debug_assert_eq!(origin.len(), at);
    script
}

/// Splits `order` into groups: operations whose intervals overlap (directly or through others)
/// were in flight together; a group stops growing at [`MAX_GROUP_REQUESTS`].
fn groups(h: &History, order: &[usize]) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut group_end = 0;
    let mut requests = 0;
    for &e in order {
        let ev = &h.events[e];
        let n = requests_of(&ev.op, h.block_size);
        match groups.last_mut() {
            Some(g) if ev.invoked < group_end && requests + n <= MAX_GROUP_REQUESTS => {
                g.push(e);
                group_end = group_end.max(ev.completed);
                requests += n;
            }
            _ => {
                groups.push(vec![e]);
                group_end = ev.completed;
                requests = n;
            }
        }
    }
    groups
}

/// The largest read or write request the kernel sends (`max_sectors_kb` of the fake kernel's
/// default profile, which replays scripts), in whole blocks.
fn piece(bs: u64) -> u64 {
    let bs32 = u32::try_from(bs).unwrap_or(u32::MAX);
    LoopbackOptions::default()
        .resolved_profile()
        .max_request_for(bs32)
        .max(bs)
}

/// How many requests an operation becomes.
fn requests_of(op: &ModelOp, bs: u64) -> usize {
    match *op {
        ModelOp::Read { len, .. } | ModelOp::Write { len, .. } => len.div_ceil(piece(bs)) as usize,
        _ => 1,
    }
}

/// Appends event `e` of `h` as steps.
fn step(
    script: Script,
    h: &History,
    e: usize,
    flags: TransmissionFlags,
    expect: Option<&Vec<Vec<Pattern>>>,
) -> Script {
    let ev = &h.events[e];
    let bs = h.block_size;
    // Reads and writes go as the kernel sends them: in requests of at most `max_sectors_kb`.
    let piece = piece(bs);
    let pieces = |offset: u64, len: u64| {
        (0..len.div_ceil(piece)).map(move |i| (offset + i * piece, (len - i * piece).min(piece)))
    };
    match ev.op {
        ModelOp::Write {
            offset,
            len,
            seed,
            fua,
        } => pieces(offset, len).fold(script, |s, (o, l)| {
            let s = s.write(o, l as u32, Data::seed(seed));
            if fua {
                s.fua()
            } else {
                s
            }
        }),
        ModelOp::Flush if flags.contains(TransmissionFlags::SEND_FLUSH) => script.flush(),
        ModelOp::Flush => script,
        ModelOp::Trim { offset, len } => script.trim(offset, len as u32),
        ModelOp::Zeroes {
            offset,
            len,
            no_hole,
        } => {
            if flags.contains(TransmissionFlags::SEND_WRITE_ZEROES) {
                script.zeroes(offset, len as u32, no_hole)
            } else {
                script.write(offset, len as u32, Data::fill(0))
            }
        }
        ModelOp::Read { offset, len } => pieces(offset, len).fold(script, |s, (o, l)| {
            let s = s.read(o, l as u32);
            let first = ((o - offset) / bs) as usize;
            let n = (l / bs) as usize;
            match (expect.and_then(|b| b.get(first..first + n)), &ev.result) {
                (Some(blocks), Ok(_)) => match alternatives(blocks, bs) {
                    Some(alts) => s.any_of(alts),
                    None => s.data(data_of(blocks, bs)),
                },
                _ => s,
            }
        }),
    }
}

/// The data a read expects when each block has one allowed value.
fn data_of(blocks: &[Vec<Pattern>], bs: u64) -> Data {
    let mut data = Data(Vec::new());
    for pats in blocks {
        data.append(bs, pats.first().cloned().unwrap_or(Pattern::Any));
    }
    data.close();
    data
}

/// When some block may hold several values: alternatives from which `any-of` picks each block
/// independently (alternative `k` holds each block's `k`-th allowed value, or its last).
fn alternatives(blocks: &[Vec<Pattern>], bs: u64) -> Option<Vec<Data>> {
    let most = blocks.iter().map(Vec::len).max().unwrap_or(0);
    if most <= 1 {
        return None;
    }
    let alts = (0..most)
        .map(|k| {
            let mut data = Data(Vec::new());
            for pats in blocks {
                let p = pats.get(k).or(pats.last()).cloned().unwrap_or(Pattern::Any);
                data.append(bs, p);
            }
            data.close();
            data
        })
        .collect();
    Some(alts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alternatives_cover_every_allowed_value_of_each_block() {
        let blocks = vec![
            vec![Pattern::Seed(1), Pattern::Seed(2)],
            vec![Pattern::Fill(0)],
            vec![Pattern::Seed(1), Pattern::Fill(0), Pattern::Seed(3)],
        ];
        let alts = alternatives(&blocks, 512).unwrap();
        let text: Vec<String> = alts.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "512*seed:1 512*fill:0x00 seed:1",
                "512*seed:2 fill:0x00",
                "512*seed:2 512*fill:0x00 seed:3",
            ]
        );
        let single = vec![vec![Pattern::Seed(1)], vec![Pattern::Any]];
        assert!(alternatives(&single, 512).is_none());
        assert_eq!(data_of(&single, 512).to_string(), "512*seed:1 any");
    }
}
