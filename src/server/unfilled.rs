//! The marker a READ buffer holds before the device fills it, when the server is asked to
//! poison reads ([`ServerOptions::poison_reads`](crate::ServerOptions::poison_reads)), and
//! [`unfilled_ranges`], which finds it in data read back: bytes a device left unwritten.
//!
//! The marker is a run of 16-byte records, one per 16 bytes of the device
//! ([`unfilled_record`]): 4 bytes `f0 'u' 'n' 'f'`, the device offset the record was meant for
//! (a multiple of 16, little-endian, XORed with `0xa55a_a55a_a55a_a55a` so that no byte of it is
//! predictably 0x00 or 0xff, the bytes devices write most), then 4 bytes `'i' 'l' 'l' 0f`. So a
//! hex dump reads "unf…ill". Real data practically never holds a record at a 16-byte boundary
//! (a chance of 2^-64 per record for random bytes, and no text holds a lone `f0`), a record with
//! either end overwritten no longer counts, and records being independent, a span is found
//! wherever it starts and however long it is, at 16-byte granularity; its edges are then
//! followed byte by byte into the partial records around it.

use std::ops::Range;

/// The size of one marker record.
pub const UNFILLED_RECORD: usize = 16;

const RECORD: usize = UNFILLED_RECORD;
const HEAD: [u8; 4] = *b"\xf0unf";
const TAIL: [u8; 4] = *b"ill\x0f";
const POSITION_MASK: u64 = 0xa55a_a55a_a55a_a55a;

/// The marker record for device offset `position` (a multiple of 16): what a poisoned READ
/// buffer holds there until the device writes it.
///
/// ```
/// let r = userblk::server::unfilled_record(0x1230);
/// assert_eq!(&r[..4], b"\xf0unf");
/// assert_eq!(&r[4..12], &(0x1230u64 ^ 0xa55a_a55a_a55a_a55a).to_le_bytes());
/// assert_eq!(&r[12..], b"ill\x0f");
/// ```
pub fn unfilled_record(position: u64) -> [u8; UNFILLED_RECORD] {
    let mut r = [0u8; RECORD];
    r[..4].copy_from_slice(&HEAD);
    r[4..12].copy_from_slice(&(position ^ POSITION_MASK).to_le_bytes());
    r[12..].copy_from_slice(&TAIL);
    r
}

/// Fills `buf`, the buffer of a READ at device offset `offset` (block-aligned), with the marker.
pub(super) fn poison(buf: &mut [u8], offset: u64) {
    let mut position = offset;
    let mut chunks = buf.chunks_exact_mut(RECORD);
    for chunk in &mut chunks {
        chunk[..4].copy_from_slice(&HEAD);
        chunk[4..12].copy_from_slice(&(position ^ POSITION_MASK).to_le_bytes());
        chunk[12..].copy_from_slice(&TAIL);
        position = position.wrapping_add(RECORD as u64);
    }
    let rest = chunks.into_remainder();
    let n = rest.len();
    rest.copy_from_slice(&unfilled_record(position)[..n]);
}

/// The device offset a whole marker record at the start of `bytes` was meant for, if it is one.
fn marker_at(bytes: &[u8]) -> Option<u64> {
    let r = bytes.get(..RECORD)?;
    if r[..4] != HEAD || r[12..] != TAIL {
        return None;
    }
    let mut pos = [0u8; 8];
    pos.copy_from_slice(&r[4..12]);
    let position = u64::from_le_bytes(pos) ^ POSITION_MASK;
    (position % RECORD as u64 == 0).then_some(position)
}

/// The byte ranges of `data` that still hold the unfilled marker: bytes the device did not write.
///
/// `data` is what a READ returned, or several READs side by side, from a 16-byte aligned device
/// offset (every block-aligned read is). A span is found when it covers at least one whole
/// aligned 16-byte record; its ends are then extended byte by byte over the partial records
/// around it, so they are exact unless the device's own bytes happen to continue the marker.
///
/// ```
/// use userblk::server::{unfilled_ranges, Dispatcher, IoOp, IoRequest};
/// use userblk::BlockDevice;
///
/// /// Fills only the first 1000 bytes of every read.
/// struct Lazy;
/// impl BlockDevice for Lazy {
///     fn blocks(&self) -> u64 { 8 }
///     fn read(&self, _: u64, buf: &mut [u8]) -> std::io::Result<()> {
///         buf[..1000].fill(0);
///         Ok(())
///     }
/// }
///
/// let d = Dispatcher::new(&Lazy).poison_reads(true);
/// let mut buf = vec![0u8; 4096];
/// d.dispatch(&IoRequest::new(IoOp::Read, 0, 4096), &mut buf)?;
/// assert_eq!(unfilled_ranges(&buf), vec![1000..4096]);
/// # Ok::<(), userblk::proto::Errno>(())
/// ```
pub fn unfilled_ranges(data: &[u8]) -> Vec<Range<usize>> {
    let mut ranges: Vec<Range<usize>> = Vec::new();
    let mut i = 0;
    while i + RECORD <= data.len() {
        let Some(first) = marker_at(&data[i..]) else {
            i += RECORD;
            continue;
        };
        // A run of whole records, each meant for the offset after the previous one's.
        let start = i;
        let mut next = first;
        while let Some(p) = marker_at(data.get(i..).unwrap_or(&[])) {
            if p != next {
                break;
            }
            i += RECORD;
            next = p.wrapping_add(RECORD as u64);
        }
        // The partial record before the run, matched from its end backwards.
        let before = unfilled_record(first.wrapping_sub(RECORD as u64));
        let mut s = start;
        while s > 0 && start - s < RECORD && data[s - 1] == before[RECORD - (start - s) - 1] {
            s -= 1;
        }
        // The partial record after it, matched from its start.
        let after = unfilled_record(next);
        let mut e = i;
        while e < data.len() && e - i < RECORD && data[e] == after[e - i] {
            e += 1;
        }
        match ranges.last_mut() {
            Some(last) if last.end >= s => last.end = e,
            _ => ranges.push(s..e),
        }
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poisoned(offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        poison(&mut buf, offset);
        buf
    }

    #[test]
    fn a_poisoned_buffer_is_unfilled_from_end_to_end() {
        let buf = poisoned(1 << 40, 4096);
        assert_eq!(&buf[..4], b"\xf0unf");
        let second = ((1u64 << 40) + 16) ^ POSITION_MASK;
        assert_eq!(&buf[20..28], &second.to_le_bytes());
        assert_eq!(unfilled_ranges(&buf), vec![0..4096]);
    }

    #[test]
    fn spans_are_found_at_any_offset_with_exact_edges() {
        let mut buf = poisoned(8192, 4096);
        buf[..100].fill(0x11); // A prefix ending inside a record.
        buf[1000..2000].fill(0x22);
        buf[4090..].fill(0x33); // A suffix starting inside a record.
        assert_eq!(unfilled_ranges(&buf), vec![100..1000, 2000..4090]);
    }

    /// Zeroes and 0xff, what devices write most, do not continue the marker at a span's edge.
    #[test]
    fn common_fill_bytes_leave_the_edges_exact() {
        for fill in [0x00, 0xff] {
            for cut in 1000..1016 {
                let mut buf = poisoned(1 << 20, 4096);
                buf[..cut].fill(fill);
                buf[3000 + cut % 16..].fill(fill);
                assert_eq!(
                    unfilled_ranges(&buf),
                    vec![cut..3000 + cut % 16],
                    "{fill} {cut}"
                );
            }
        }
    }

    #[test]
    fn a_single_unwritten_record_is_found() {
        let mut buf = poisoned(0, 512);
        buf[..256].fill(1);
        buf[272..].fill(2);
        assert_eq!(unfilled_ranges(&buf), vec![256..272]);
    }

    #[test]
    fn reads_side_by_side_merge_and_real_data_never_matches() {
        let mut data = poisoned(0, 512);
        data.extend(poisoned(512, 512));
        assert_eq!(unfilled_ranges(&data), vec![0..1024]);
        // Reads of different places side by side: unfilled all the same.
        let mut data = poisoned(0, 512);
        data.extend(poisoned(1 << 20, 512));
        assert_eq!(unfilled_ranges(&data), vec![0..1024]);
        let noise: Vec<u8> = (0..1 << 20)
            .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        assert!(unfilled_ranges(&noise).is_empty());
        assert!(unfilled_ranges(&[0u8; 4096]).is_empty());
        assert!(unfilled_ranges(b"\xf0unf").is_empty());
    }

    #[test]
    fn the_magic_with_a_position_off_the_grid_is_data() {
        let mut r = unfilled_record(16);
        r[4] ^= 3; // Offset 19: not a record's.
        assert!(unfilled_ranges(&r).is_empty());
    }
}
