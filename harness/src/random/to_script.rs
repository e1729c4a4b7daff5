//! A run's history as a [`Script`]: each operation a step (reads and writes split as the kernel
//! splits them), in the order they were invoked, each
//! read expecting what the model allows; operations that were in flight together in the run
//! form a group of steps sent together.

use userblk::proto::TransmissionFlags;
use userblk::LoopbackOptions;

use super::generate::ModelOp;
use super::history::{History, Phase};
use crate::script::{Data, Pattern, Script};

/// At most this many combinations of per-block values are spelled out for one read; beyond,
/// the blocks that may hold several values expect `any`.
const MAX_ALTERNATIVES: usize = 16;

/// The history's operations before the disconnect as a script, up to and including event
/// `upto` when given. `flags` are what the server advertised (a flush the kernel would not send
/// is left out; write-zeroes without `SEND_WRITE_ZEROES` become zero-filled writes).
pub(crate) fn script_of(h: &History, flags: TransmissionFlags, upto: Option<usize>) -> Script {
    let expect = h.expectations();
    let mut order: Vec<usize> = (0..h.events.len())
        .filter(|&e| h.events[e].phase != Phase::Reopened)
        .collect();
    order.sort_by_key(|&e| (h.events[e].phase, h.events[e].invoked));
    if let Some(last) = upto.and_then(|u| order.iter().position(|&e| e == u)) {
        order.truncate(last + 1);
    }
    // Operations whose intervals overlap (directly or through others) were in flight together.
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut group_end = 0;
    for &e in &order {
        let ev = &h.events[e];
        match groups.last_mut() {
            Some(g) if ev.invoked < group_end => {
                g.push(e);
                group_end = group_end.max(ev.completed);
            }
            _ => {
                groups.push(vec![e]);
                group_end = ev.completed;
            }
        }
    }
    let mut script = Script::new();
    for g in groups {
        let mut steps = Script::new();
        for e in g {
            steps = step(steps, h, e, flags, expect.get(&e));
        }
        script = together(script, steps);
    }
    script
}

/// Appends `group` to `script`: one step as it is, several as steps sent together.
fn together(mut script: Script, group: Script) -> Script {
    // Until scripts can say "in flight together", the steps go one after the other, in the
    // order they were invoked; each read still expects only what the model allows.
    script.steps.extend(group.steps);
    script
}

/// Appends event `e` as a step.
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
    let piece = (u64::from(LoopbackOptions::default().max_request) / bs).max(1) * bs;
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
            match (expect, &ev.result) {
                (Some(blocks), Ok(_)) => {
                    let first = ((o - offset) / bs) as usize;
                    let n = (l / bs) as usize;
                    match blocks.get(first..first + n) {
                        Some(mine) => s.data(data_of(mine, bs)),
                        None => s,
                    }
                }
                _ => s,
            }
        }),
    }
}

/// The data a read expects: one pattern per block, `any` where several are allowed (see
/// [`alternatives`] for spelling them out).
fn data_of(blocks: &[Vec<Pattern>], bs: u64) -> Data {
    let mut data = Data(Vec::new());
    for pats in blocks {
        let p = match pats.as_slice() {
            [one] => one.clone(),
            _ => Pattern::Any,
        };
        data.append(bs, p);
    }
    data.close();
    data
}

/// Every combination of the blocks' allowed values, when there are at most
/// [`MAX_ALTERNATIVES`].
#[allow(dead_code)] // for `Expect::AnyOf`, once scripts have it
fn alternatives(blocks: &[Vec<Pattern>], bs: u64) -> Option<Vec<Data>> {
    let count = blocks
        .iter()
        .try_fold(1usize, |n, p| n.checked_mul(p.len().max(1)))?;
    if count > MAX_ALTERNATIVES {
        return None;
    }
    let mut out = Vec::with_capacity(count);
    for mut k in 0..count {
        let mut data = Data(Vec::new());
        for pats in blocks {
            let n = pats.len().max(1);
            data.append(bs, pats.get(k % n).cloned().unwrap_or(Pattern::Any));
            k /= n;
        }
        data.close();
        out.push(data);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alternatives_spell_out_each_combination() {
        let blocks = vec![
            vec![Pattern::Seed(1), Pattern::Seed(2)],
            vec![Pattern::Fill(0)],
            vec![Pattern::Seed(1), Pattern::Fill(0)],
        ];
        let alts = alternatives(&blocks, 512).unwrap();
        assert_eq!(alts.len(), 4);
        assert_eq!(alts[0].to_string(), "512*seed:1 512*fill:0x00 seed:1");
        assert_eq!(alts[3].to_string(), "512*seed:2 fill:0x00");
        let many = vec![vec![Pattern::Seed(1), Pattern::Seed(2)]; 5];
        assert!(alternatives(&many, 512).is_none());
        assert_eq!(data_of(&many, 512).to_string(), "any");
    }
}
