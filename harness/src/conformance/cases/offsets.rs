//! Driver case: offsets that narrow arithmetic aliases. A driver that keeps an offset in a
//! 32-bit integer, counted in bytes, 512-byte sectors, 4 KiB pages or its own blocks (say
//! `(offset >> 9) as u32`), sends 2 TiB + X to X; one that uses a signed or 16-bit integer
//! wraps sooner. [`huge_offsets`] writes distinct data just below, at and just above each such
//! boundary below the device's size and at X and boundary + X, reads it all back, and names
//! the two writes that collided.

use std::collections::BTreeMap;

use super::{block, op, pattern, with_target, writable};
use crate::conformance::{CaseResult, Env, Failure};
use crate::script::first_difference;
use crate::target::Target;

/// Integer widths a driver may wrongly count in: `u16`, `i32`, `u32`.
const WIDTHS: [u32; 3] = [16, 31, 32];

/// The offsets (powers of two) at which an offset kept in 16 or 32 bits (signed or not), in
/// units of bytes, 512-byte sectors, 4 KiB pages or `block_size`-byte blocks, wraps, that leave
/// room for a block at and after them on a device of `size` bytes. In order.
///
/// ```
/// use userblk_harness::conformance::alias_boundaries;
///
/// // 64 MiB: a 16-bit byte offset wraps at 64 KiB, a 16-bit sector number at 32 MiB.
/// assert_eq!(alias_boundaries(64 << 20, 512), [1 << 16, 1 << 25]);
/// // 4 TiB: also 2^31 and 2^32 bytes, sectors (1 and 2 TiB) and pages (256 MiB).
/// assert_eq!(
///     alias_boundaries(4 << 40, 512),
///     [1 << 16, 1 << 25, 1 << 28, 1 << 31, 1 << 32, 1 << 40, 1 << 41]
/// );
/// ```
pub fn alias_boundaries(size: u64, block_size: u32) -> Vec<u64> {
    let bs = u64::from(block_size.max(1));
    let unit_shifts = [0, 9, 12, bs.trailing_zeros()];
    let mut out: Vec<u64> = WIDTHS
        .iter()
        .flat_map(|&w| unit_shifts.iter().map(move |&u| w + u))
        .filter(|&shift| shift < 64)
        .map(|shift| 1u64 << shift)
        .filter(|&b| b.checked_add(2 * bs).is_some_and(|end| end <= size))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Offsets within the first 64 KiB, each paired with boundary + X.
fn low_offsets(bs: u64) -> Vec<u64> {
    let mut xs: Vec<u64> = [0, bs, 4096, 3 * 4096 + bs]
        .iter()
        .map(|x| x.div_ceil(bs) * bs)
        .collect();
    xs.dedup();
    xs
}

/// An offset as a person reads it: "2 TiB + 4096", "4 GiB - 512", "65536".
pub(crate) fn human_offset(o: u64) -> String {
    for (unit, name) in [(40, "TiB"), (30, "GiB"), (20, "MiB")] {
        let u = 1u64 << unit;
        let m = (o >> unit) + ((o >> (unit - 1)) & 1); // nearest multiple
        if m == 0 {
            continue;
        }
        let near = m << unit;
        let (sign, rem) = if o >= near {
            ("+", o - near)
        } else {
            ("-", near - o)
        };
        if rem <= 1 << 20 && rem < u / 4 {
            return if rem == 0 {
                format!("{m} {name}")
            } else {
                format!("{m} {name} {sign} {rem}")
            };
        }
    }
    o.to_string()
}

/// "offsets differing by 2^41 alias", or "3 × 2^41" when not a power of two.
fn distance(a: u64, b: u64) -> String {
    let d = a.abs_diff(b);
    let k = d.trailing_zeros();
    match d >> k {
        1 => format!("offsets differing by 2^{k} alias"),
        m => format!("offsets differing by {m} × 2^{k} alias"),
    }
}

/// One block written by the case.
struct Written {
    data: Vec<u8>,
    /// Write order: a later write to an aliased place overwrites an earlier one.
    seq: usize,
}

/// The block's data: a pattern of its own, stamped with its offset and the phase.
fn block_data(phase: u64, offset: u64, bs: u64) -> Vec<u8> {
    let mut d = pattern(0x0ff5e7 + phase, offset, bs);
    d[..8].copy_from_slice(&offset.to_le_bytes());
    d[8..16].copy_from_slice(&phase.to_le_bytes());
    d
}

/// Why the block at `at` read back as `got`: which other write's data it holds, if any.
fn diagnose(at: u64, got: &[u8], model: &BTreeMap<u64, Written>) -> String {
    let mine = &model[&at];
    if let Some((&q, other)) = model.iter().find(|(&q, w)| q != at && w.data == got) {
        let (a, b) = (human_offset(at), human_offset(q));
        return if other.seq > mine.seq {
            format!(
                "lost write: data written at {a} was overwritten by a write at {b} ({})",
                distance(at, q)
            )
        } else {
            format!(
                "misdirected read: a read at {a} returned the data written at {b} ({})",
                distance(at, q)
            )
        };
    }
    let at_h = human_offset(at);
    if got.iter().all(|&b| b == 0) {
        format!("lost write: data written at {at_h} reads back as zeroes (dropped, or written elsewhere)")
    } else {
        format!("wrong data: data written at {at_h} reads back as data that no write of this case put there")
    }
}

/// Reads every block of the model back; fails on the first (in write order) that differs.
fn verify(t: &dyn Target, model: &BTreeMap<u64, Written>, phase: &str) -> CaseResult {
    let bs = block(t);
    let mut wrong: Vec<(usize, u64, Vec<u8>)> = Vec::new();
    for (&o, w) in model {
        let got = op(t.read(o, bs as usize), || {
            format!("read of one block at {} ({o})", human_offset(o))
        })?;
        if got != w.data {
            wrong.push((w.seq, o, got));
        }
    }
    wrong.sort_by_key(|(seq, _, _)| *seq);
    let Some((_, at, got)) = wrong.first() else {
        return Ok(());
    };
    let mut msg = diagnose(*at, got, model);
    msg.push_str(&format!(
        "\n{phase}; {} of {} blocks read back wrong:",
        wrong.len(),
        model.len()
    ));
    for (_, o, g) in wrong.iter().take(8) {
        msg.push_str(&format!("\n  at {o}: {}", diagnose(*o, g, model)));
    }
    if let Some(diff) = first_difference(&model[at].data, got, None, *at) {
        msg.push('\n');
        msg.push_str(&diff);
    }
    Err(Failure::failed(msg))
}

/// Writes distinct data at offsets that 16- and 32-bit byte, sector, page and block arithmetic
/// would alias ([`alias_boundaries`] below the device's size): one block just below, at and
/// just above each boundary, at boundary + X for a few X in the first 16 KiB, and at those X;
/// high offsets first. Then reads every block back, and again after a write straddling each
/// boundary. A difference names the two writes that collided, e.g. "lost write: data written at
/// 2 TiB + 4096 was overwritten by a write at 4096 (offsets differing by 2^41 alias)".
/// Sparse devices make this cheap at any size; on one too small for any boundary it is skipped.
pub fn huge_offsets(env: &Env<'_>) -> CaseResult {
    writable(env)?;
    with_target(env, None, |t| {
        let bs = block(t);
        let size = t.size();
        let boundaries = alias_boundaries(size, t.block_size());
        if boundaries.is_empty() {
            return Err(Failure::skip(format!(
                "no 16- or 32-bit offset boundary lies below the device's size ({size} bytes)"
            )));
        }
        let lows = low_offsets(bs);
        let mut places: Vec<u64> = lows.clone();
        for &b in &boundaries {
            places.extend([b - bs, b, b + bs]);
            places.extend(lows.iter().map(|x| b + x));
        }
        places.push(size - bs);
        places.retain(|&o| o + bs <= size);
        places.sort_unstable();
        places.dedup();
        let list: Vec<String> = boundaries
            .iter()
            .map(|b| format!("2^{}", b.trailing_zeros()))
            .collect();
        let list = list.join(", ");

        // High offsets first: a driver that wraps them sees the low write land last, on top.
        let mut model = BTreeMap::new();
        for (seq, &o) in places.iter().rev().enumerate() {
            let data = block_data(1, o, bs);
            op(t.write(o, &data), || {
                format!("write of one block at {} ({o})", human_offset(o))
            })?;
            model.insert(o, Written { data, seq });
        }
        verify(
            t,
            &model,
            &format!("single blocks written around the boundaries {list}"),
        )?;

        // One write across each boundary, two blocks either side.
        let first_seq = model.len();
        for (seq, &b) in (first_seq..).zip(&boundaries) {
            let (o, len) = (b - 2 * bs, 4 * bs);
            let data: Vec<u8> = (0..4).flat_map(|i| block_data(2, o + i * bs, bs)).collect();
            op(t.write(o, &data), || {
                format!("write of {len} bytes across {}", human_offset(b))
            })?;
            for (i, d) in data.chunks(bs as usize).enumerate() {
                model.insert(
                    o + i as u64 * bs,
                    Written {
                        data: d.to_vec(),
                        seq,
                    },
                );
            }
            let back = op(t.read(o, len as usize), || {
                format!("read of {len} bytes across {}", human_offset(b))
            })?;
            if back != data {
                let diff = first_difference(&data, &back, None, o).unwrap_or_default();
                return Err(Failure::failed(format!(
                    "wrong data: a write of {len} bytes across {} does not read back in one request\n{diff}",
                    human_offset(b)
                )));
            }
        }
        verify(
            t,
            &model,
            &format!("after writes across the boundaries {list}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_read_as_people_write_them() {
        assert_eq!(human_offset(4096), "4096");
        assert_eq!(human_offset((1 << 41) + 4096), "2 TiB + 4096");
        assert_eq!(human_offset((1 << 32) - 512), "4 GiB - 512");
        assert_eq!(human_offset(1 << 44), "16 TiB");
        assert_eq!(human_offset((1 << 25) + 512), "32 MiB + 512");
        assert_eq!(human_offset(3 << 39), "1536 GiB");
    }

    #[test]
    fn distances_name_the_power_of_two() {
        assert_eq!(
            distance(4096, (1 << 41) + 4096),
            "offsets differing by 2^41 alias"
        );
        assert_eq!(distance(3 << 41, 0), "offsets differing by 3 × 2^41 alias");
    }

    #[test]
    fn boundaries_follow_the_block_size() {
        // 4 KiB blocks: a 32-bit block number wraps at 16 TiB, as a page number does.
        assert_eq!(alias_boundaries(1 << 45, 4096).last(), Some(&(1 << 44)));
        // 64 KiB blocks: at 2^48.
        assert!(alias_boundaries(1 << 50, 65536).contains(&(1 << 48)));
        assert!(alias_boundaries(1 << 16, 512).is_empty());
    }
}
