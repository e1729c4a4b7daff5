//! The cases, one public function each, and [`cases`], the list [`super::run_all`] runs.

use std::thread;

use userblk::proto::{TransmissionFlags, MAX_IO_LEN};
use userblk::BlockDevice;

use super::devices::{CallKind, Counting, FailingRange, Fault, ReadOnly};
use super::durability::*;
use super::{Case, CaseResult, Env, Failure};
use crate::script::{fill_seed, first_difference};
use crate::target::{Attached, OpError, Target};

/// Every case, in the order [`super::run_all`] runs them.
pub fn cases() -> Vec<Case> {
    macro_rules! case {
        ($f:ident, $about:expr) => {
            Case {
                name: stringify!($f),
                about: $about,
                run: $f,
            }
        };
    }
    vec![
        case!(
            read_after_write,
            "data written at the first, a middle and the last block reads back"
        ),
        case!(
            overlapping_writes,
            "a later write wins where writes overlap, and only there"
        ),
        case!(
            adjacent_writes,
            "writes side by side do not disturb each other"
        ),
        case!(
            request_sizes,
            "every request size from one block to the kernel's 32 MiB maximum"
        ),
        case!(
            unwritten_reads_stable,
            "never-written blocks read the same every time, whatever the request shape"
        ),
        case!(
            flush_and_fua,
            "flush and FUA succeed, and reach the device after the writes they cover"
        ),
        case!(
            trim_reads_back_as_promised,
            "trimmed ranges read as zeroes when the device promises it; neighbours intact"
        ),
        case!(
            write_zeroes_reads_zero,
            "write-zeroes (with and without NO_HOLE) reads back as zeroes; neighbours intact"
        ),
        case!(
            out_of_range_rejected,
            "requests past the end or misaligned fail and change nothing"
        ),
        case!(
            read_only_rejected,
            "on a read-only device, writes, trims and zeroes fail and change nothing"
        ),
        case!(
            in_flight_disjoint,
            "many requests in flight at once to disjoint ranges"
        ),
        case!(
            in_flight_overlapping,
            "concurrent writers and readers on one range see whole blocks of one writer"
        ),
        case!(
            device_errors_reach_caller,
            "errors from the device reach the caller with their errno (EIO through the kernel)"
        ),
        case!(
            unmount_once,
            "unmount is called exactly once, at the end, after every request"
        ),
        case!(
            reopen_after_writes,
            "unflushed writes survive a clean disconnect and re-open"
        ),
        case!(
            reopen_after_flush,
            "flushed writes survive a clean disconnect and re-open"
        ),
        case!(
            reopen_after_fua,
            "FUA writes survive a clean disconnect and re-open"
        ),
        case!(
            crash_and_reopen,
            "Crashable devices keep what the rules require across power losses"
        ),
    ]
}

// --- helpers ---------------------------------------------------------------------------------

fn op<T>(r: Result<T, OpError>, what: impl FnOnce() -> String) -> Result<T, Failure> {
    r.map_err(|e| Failure::failed(format!("{}: {e}", what())))
}

fn pattern(seed: u64, offset: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    fill_seed(seed, offset, &mut v);
    v
}

fn writable(env: &Env<'_>) -> CaseResult {
    if env.caps.read_only {
        return Err(Failure::skip("the device is read-only"));
    }
    Ok(())
}

/// Skips a case on a device smaller than `min` bytes.
fn needs_size(t: &dyn Target, min: u64) -> CaseResult {
    if t.size() < min {
        return Err(Failure::skip(format!(
            "needs a device of at least {min} bytes, this one has {}",
            t.size()
        )));
    }
    Ok(())
}

/// Reads and compares, failing with `what`, the expected and a dump of the first difference.
fn expect_read(t: &dyn Target, offset: u64, want: &[u8], what: &str) -> CaseResult {
    let got = op(t.read(offset, want.len()), || {
        format!("{what}: read of {} bytes at {offset}", want.len())
    })?;
    match first_difference(want, &got, None, offset) {
        None => Ok(()),
        Some(diff) => Err(Failure::failed(format!(
            "{what}: {} bytes read at offset {offset} differ from what was written\n{diff}",
            want.len()
        ))),
    }
}

fn detach(t: Box<dyn Attached>) -> CaseResult {
    t.detach()
        .map_err(|e| Failure::failed(format!("serving ended with an error: {e}")))
}

/// Runs `body` on a fresh target and detaches it, reporting the body's failure first.
fn with_target(
    env: &Env<'_>,
    device: Option<Box<dyn BlockDevice>>,
    body: impl FnOnce(&dyn Target) -> CaseResult,
) -> CaseResult {
    let t = match device {
        Some(d) => env.attach_device(d)?,
        None => env.attach()?,
    };
    let result = body(&*t);
    let detached = detach(t);
    result.and(detached)
}

fn block(t: &dyn Target) -> u64 {
    u64::from(t.block_size())
}

// --- cases -----------------------------------------------------------------------------------

/// Data written at the first, a middle and the last block (and the last 16 blocks) reads back,
/// and the blocks beside them keep what they had.
pub fn read_after_write(env: &Env<'_>) -> CaseResult {
    writable(env)?;
    with_target(env, None, |t| {
        let bs = block(t);
        needs_size(t, 64 * bs)?;
        let blocks = t.size() / bs;
        let places = [
            ("first block", 0),
            ("middle block", blocks / 2 * bs),
            ("last block", (blocks - 1) * bs),
        ];
        // Neighbours as they were, to check nothing spills over.
        let before_mid = op(t.read(places[1].1 - bs, bs as usize), || "read".into())?;
        let after_first = op(t.read(bs, bs as usize), || "read".into())?;
        let before_last = op(t.read(places[2].1 - bs, bs as usize), || "read".into())?;
        for (i, (name, off)) in places.iter().enumerate() {
            op(t.write(*off, &pattern(i as u64 + 1, *off, bs)), || {
                format!("{name}: write of one block at {off}")
            })?;
        }
        for (i, (name, off)) in places.iter().enumerate() {
            expect_read(t, *off, &pattern(i as u64 + 1, *off, bs), name)?;
        }
        expect_read(t, bs, &after_first, "block after the first (untouched)")?;
        expect_read(
            t,
            places[1].1 - bs,
            &before_mid,
            "block before the middle one (untouched)",
        )?;
        expect_read(
            t,
            places[2].1 - bs,
            &before_last,
            "block before the last (untouched)",
        )?;
        // Several blocks ending exactly at the end of the device, in one request.
        let tail = t.size() - 16 * bs;
        op(t.write(tail, &pattern(9, tail, 16 * bs)), || {
            format!("last 16 blocks: write at {tail}")
        })?;
        expect_read(t, tail, &pattern(9, tail, 16 * bs), "last 16 blocks")?;
        // And after a flush, in case the device only loses data then.
        op(t.flush(), || "flush".into())?;
        expect_read(t, 0, &pattern(1, 0, bs), "first block after a flush")?;
        expect_read(
            t,
            tail,
            &pattern(9, tail, 16 * bs),
            "last 16 blocks after a flush",
        )
    })
}

/// A later write wins where writes overlap and only there, including across the 64 KiB and
/// 128 KiB boundaries where devices and the kernel cut requests.
pub fn overlapping_writes(env: &Env<'_>) -> CaseResult {
    writable(env)?;
    with_target(env, None, |t| {
        let bs = block(t);
        needs_size(t, 512 << 10)?;
        let base = (128 << 10) - 16 * bs;
        let len = 32 * bs;
        let mut model = pattern(1, base, len);
        op(t.write(base, &model), || "first write".into())?;
        for (seed, from, n) in [(2, 4, 8), (3, 10, 12), (4, 0, 1), (5, 31, 1), (6, 12, 4)] {
            let (o, l) = (base + from * bs, n * bs);
            let data = pattern(seed, o, l);
            op(t.write(o, &data), || {
                format!("overlapping write at {o}, {l} bytes")
            })?;
            model[(from * bs) as usize..((from + n) * bs) as usize].copy_from_slice(&data);
            expect_read(
                t,
                base,
                &model,
                &format!("after the overlapping write of {l} bytes at {o}"),
            )?;
        }
        // One write covering several earlier ones entirely.
        let big = pattern(7, base - 8 * bs, len + 16 * bs);
        op(t.write(base - 8 * bs, &big), || "covering write".into())?;
        expect_read(t, base - 8 * bs, &big, "after a write covering the others")
    })
}

/// Writes side by side, each its own request, do not disturb each other; read back as one.
pub fn adjacent_writes(env: &Env<'_>) -> CaseResult {
    writable(env)?;
    with_target(env, None, |t| {
        let bs = block(t);
        needs_size(t, 1 << 20)?;
        // Single blocks, written out of order, then runs straddling 64 KiB and 128 KiB.
        let base = 64 << 10;
        let order = [3u64, 1, 0, 2, 5, 4];
        for &i in &order {
            let o = base + i * bs;
            op(t.write(o, &pattern(10 + i, o, bs)), || {
                format!("write of block at {o}")
            })?;
        }
        let want: Vec<u8> = (0..6)
            .flat_map(|i| pattern(10 + i, base + i * bs, bs))
            .collect();
        expect_read(t, base, &want, "six adjacent blocks written one by one")?;
        let runs = [
            (96u64 << 10, 40 << 10),
            (136 << 10, 24 << 10),
            (160 << 10, 8 * bs),
        ];
        let mut want = Vec::new();
        for (i, (o, l)) in runs.iter().enumerate() {
            let data = pattern(20 + i as u64, *o, *l);
            op(t.write(*o, &data), || format!("write at {o}, {l} bytes"))?;
            want.extend(data);
        }
        expect_read(t, runs[0].0, &want, "adjacent runs across 128 KiB")
    })
}

/// The request sizes checked: every count of blocks up to 16, every power of two up to the
/// kernel's 32 MiB maximum, one block either side of those up to 1 MiB, and 32 MiB less one block.
pub fn request_size_list(bs: u64, limit: u64) -> Vec<u64> {
    let max = u64::from(MAX_IO_LEN);
    let mut sizes: Vec<u64> = (1..=16).map(|n| n * bs).collect();
    let mut p = 16 * bs;
    while p <= max {
        sizes.push(p);
        if p <= 1 << 20 {
            sizes.extend([p - bs, p + bs]);
        }
        p *= 2;
    }
    sizes.push(max - bs);
    sizes.retain(|&s| s <= limit && s % bs == 0);
    sizes.sort_unstable();
    sizes.dedup();
    sizes
}

/// `0..size` as one piece, or two when it is above 16 MiB.
fn halves(size: u64) -> Vec<(u64, u64)> {
    const MAX_OP: u64 = 16 << 20;
    if size <= MAX_OP {
        vec![(0, size)]
    } else {
        vec![(0, MAX_OP), (MAX_OP, size - MAX_OP)]
    }
}

/// Every request size from one block to 32 MiB (see [`request_size_list`]) reads back what was
/// written, and the block after it is untouched.
pub fn request_sizes(env: &Env<'_>) -> CaseResult {
    writable(env)?;
    with_target(env, None, |t| {
        let bs = block(t);
        needs_size(t, 64 * bs)?;
        let limit = t.size() - bs;
        let sizes = request_size_list(bs, limit);
        let biggest = sizes.last().copied().unwrap_or(bs);
        // One pattern for all, stamped per size and block, so that a size's data differs from
        // the one before it everywhere.
        let base = pattern(42, 0, biggest + bs);
        let sentinel_seed = 43;
        for &size in &sizes {
            let mut data = base[..size as usize].to_vec();
            for (i, b) in data.chunks_mut(bs as usize).enumerate() {
                b[..8].copy_from_slice(&(size ^ (i as u64) << 40).to_le_bytes());
            }
            let sentinel = pattern(sentinel_seed + size, size, bs);
            op(t.write(size, &sentinel), || {
                format!("sentinel write at {size}")
            })?;
            // Operations above 16 MiB go in two: LoopbackKernel deadlocks on one that needs
            // more than its 128 tags (at 128 KiB a request). The kernel splits them anyway; the
            // server's 32 MiB maximum is checked by the shipped scripts.
            for (o, l) in halves(size) {
                let part = &data[o as usize..(o + l) as usize];
                op(t.write(o, part), || format!("write of {size} bytes at 0"))?;
            }
            for (o, l) in halves(size) {
                let part = &data[o as usize..(o + l) as usize];
                expect_read(t, o, part, &format!("request of {size} bytes"))?;
            }
            expect_read(
                t,
                size,
                &sentinel,
                &format!("the block after a {size}-byte write (must be untouched)"),
            )?;
        }
        Ok(())
    })
}

/// Blocks never written read the same twice, and the same in one request or block by block.
pub fn unwritten_reads_stable(env: &Env<'_>) -> CaseResult {
    with_target(env, None, |t| {
        let bs = block(t);
        needs_size(t, 64 * bs)?;
        let len = (64 << 10).min(t.size() / 4) / bs * bs;
        let places = [0, t.size() / 2 / bs * bs, t.size() - len];
        for off in places {
            let first = op(t.read(off, len as usize), || format!("read at {off}"))?;
            let again = op(t.read(off, len as usize), || format!("read at {off}"))?;
            if let Some(diff) = first_difference(&first, &again, None, off) {
                return Err(Failure::failed(format!(
                    "never-written data at {off} changed between two reads\n{diff}"
                )));
            }
            let mut pieces = Vec::with_capacity(len as usize);
            for i in 0..len / bs {
                pieces.extend(op(t.read(off + i * bs, bs as usize), || "read".into())?);
            }
            if let Some(diff) = first_difference(&first, &pieces, None, off) {
                return Err(Failure::failed(format!(
                    "never-written data at {off} reads differently block by block\n{diff}"
                )));
            }
        }
        Ok(())
    })
}

/// Flush and FUA writes succeed; the device sees a flush after the writes it covers, and a FUA
/// write as `write_fua` or as a write followed by a flush; the data reads back.
pub fn flush_and_fua(env: &Env<'_>) -> CaseResult {
    writable(env)?;
    let dev = Counting::new(env.create()?);
    let log = dev.log();
    with_target(env, Some(Box::new(dev)), |t| {
        let bs = block(t);
        needs_size(t, 64 * bs)?;
        let cache = t.flags().contains(TransmissionFlags::SEND_FLUSH);
        let a = 8 * bs;
        op(t.write(a, &pattern(1, a, 4 * bs)), || {
            "write before the flush".into()
        })?;
        op(t.flush(), || "flush".into())?;
        let calls = log.calls();
        let last_write = calls.iter().rposition(|c| {
            matches!(c.kind, CallKind::Write | CallKind::WriteFua)
                && c.offset < a + 4 * bs
                && c.offset + c.len > a
        });
        let last_flush = calls.iter().rposition(|c| c.kind == CallKind::Flush);
        if cache {
            match (last_write, last_flush) {
                (Some(w), Some(f)) if f > w => {}
                (None, _) => return Err(Failure::failed("the write never reached the device")),
                _ => {
                    return Err(Failure::failed(
                        "flush returned but the device saw no flush after the write it covers",
                    ))
                }
            }
        }
        let b = 32 * bs;
        let seen = log.calls().len();
        op(t.write_fua(b, &pattern(2, b, 2 * bs)), || {
            "FUA write".into()
        })?;
        let calls = log.calls();
        let fresh = &calls[seen..];
        let fua_seen = fresh.iter().any(|c| c.kind == CallKind::WriteFua && c.ok);
        let write_then_flush = fresh
            .iter()
            .position(|c| {
                c.kind == CallKind::Write && c.offset < b + 2 * bs && c.offset + c.len > b
            })
            .is_some_and(|w| fresh[w..].iter().any(|c| c.kind == CallKind::Flush));
        if cache && !fua_seen && !write_then_flush {
            return Err(Failure::failed(
                "a FUA write returned but the device saw neither write_fua nor a write followed by a flush",
            ));
        }
        expect_read(
            t,
            a,
            &pattern(1, a, 4 * bs),
            "data written before the flush",
        )?;
        expect_read(t, b, &pattern(2, b, 2 * bs), "data written with FUA")?;
        // Writes after a flush still win over the flushed data.
        op(t.write(a, &pattern(3, a, bs)), || {
            "write after the flush".into()
        })?;
        op(t.flush(), || "second flush".into())?;
        expect_read(t, a, &pattern(3, a, bs), "data rewritten after a flush")
    })
}

/// Trimmed ranges read as zeroes when the capabilities promise it (`trim_zeroes`), and the
/// blocks around them keep their data either way.
pub fn trim_reads_back_as_promised(env: &Env<'_>) -> CaseResult {
    writable(env)?;
    if !env.caps.trim {
        return Err(Failure::skip("the device does not support trim"));
    }
    with_target(env, None, |t| {
        let bs = block(t);
        needs_size(t, 1 << 20)?;
        if !t.flags().contains(TransmissionFlags::SEND_TRIM) {
            return Err(Failure::failed(
                "the capabilities say trim but the export does not advertise it",
            ));
        }
        // A range over several 64 KiB chunks, and trims inside, at the edges and across.
        let base = 64 << 10;
        let len = 256 << 10;
        let mut model = pattern(5, base, len);
        op(t.write(base, &model), || "write before trim".into())?;
        for (o, l) in [
            (64u64 << 10, 64u64 << 10),
            (8 * bs, 4 * bs),
            (200 << 10, 40 << 10),
            (len - bs, bs),
        ] {
            let abs = base + o;
            op(t.trim(abs, l), || format!("trim at {abs}, {l} bytes"))?;
            let got = op(t.read(abs, l as usize), || {
                format!("read of the trimmed range at {abs}")
            })?;
            if env.caps.trim_zeroes {
                if let Some(diff) = first_difference(&vec![0; l as usize], &got, None, abs) {
                    return Err(Failure::failed(format!(
                        "the trimmed range at {abs}, {l} bytes, does not read as zeroes though the \
                         device promises it (trim_zeroes): stale data after trim\n{diff}"
                    )));
                }
            }
            model[o as usize..(o + l) as usize].copy_from_slice(&got);
            expect_read(
                t,
                base,
                &model,
                &format!("around the trim at {abs}, {l} bytes"),
            )?;
        }
        Ok(())
    })
}

/// Write-zeroes, with and without NO_HOLE, reads back as zeroes and leaves its neighbours.
pub fn write_zeroes_reads_zero(env: &Env<'_>) -> CaseResult {
    writable(env)?;
    with_target(env, None, |t| {
        let bs = block(t);
        needs_size(t, 2 << 20)?;
        let base = 64 << 10;
        let len = 1 << 20;
        let mut model = pattern(6, base, len);
        op(t.write(base, &model), || "write before zeroing".into())?;
        for (o, l, no_hole) in [
            (0u64, bs, false),
            (4 * bs, 8 * bs, true),
            (64 << 10, 128 << 10, false),
            (300 << 10, 600 << 10, true),
            (len - bs, bs, true),
        ] {
            let abs = base + o;
            op(t.write_zeroes(abs, l, no_hole), || {
                format!("write-zeroes at {abs}, {l} bytes (no_hole {no_hole})")
            })?;
            model[o as usize..(o + l) as usize].fill(0);
            expect_read(
                t,
                base,
                &model,
                &format!("after write-zeroes at {abs}, {l} bytes (no_hole {no_hole})"),
            )?;
        }
        Ok(())
    })
}

/// Requests past the end, straddling it, or misaligned fail, and the data at the end is
/// unchanged afterwards.
pub fn out_of_range_rejected(env: &Env<'_>) -> CaseResult {
    with_target(env, None, |t| {
        let bs = block(t);
        needs_size(t, 64 * bs)?;
        let size = t.size();
        let tail = size - 2 * bs;
        if !env.caps.read_only {
            op(t.write(tail, &pattern(7, tail, 2 * bs)), || {
                "write of the last two blocks".into()
            })?;
        }
        let before = op(t.read(tail, 2 * bs as usize), || {
            "read of the last two blocks".into()
        })?;
        let junk = pattern(8, 0, 2 * bs);
        let mut wrong = Vec::new();
        let mut expect_err = |what: String, r: Result<(), OpError>| {
            if r.is_ok() {
                wrong.push(what);
            }
        };
        for (o, l) in [
            (size - bs, 2 * bs),
            (size, bs),
            (size + 64 * bs, bs),
            (u64::MAX / bs * bs, bs),
        ] {
            expect_err(
                format!("read at {o}, {l} bytes"),
                t.read(o, l as usize).map(drop),
            );
            if !env.caps.read_only {
                expect_err(
                    format!("write at {o}, {l} bytes"),
                    t.write(o, &junk[..l as usize]),
                );
                expect_err(
                    format!("write-zeroes at {o}, {l} bytes"),
                    t.write_zeroes(o, l, false),
                );
                if env.caps.trim {
                    expect_err(format!("trim at {o}, {l} bytes"), t.trim(o, l));
                }
            }
        }
        // Misaligned offset and length.
        expect_err("read at offset 1".into(), t.read(1, bs as usize).map(drop));
        expect_err(
            format!("read of {} bytes", bs + 1),
            t.read(0, bs as usize + 1).map(drop),
        );
        if !env.caps.read_only {
            expect_err(
                format!("write at {}", tail + 1),
                t.write(tail + 1, &junk[..bs as usize]),
            );
        }
        if !wrong.is_empty() {
            return Err(Failure::failed(format!(
                "these requests succeeded but must fail: {}",
                wrong.join("; ")
            )));
        }
        expect_read(
            t,
            tail,
            &before,
            "the last two blocks after rejected requests",
        )
    })
}

/// On a read-only device (the device itself, or wrapped in [`ReadOnly`]), writes, FUA writes,
/// trims and zeroes fail, nothing reaches the device, and the data stays.
pub fn read_only_rejected(env: &Env<'_>) -> CaseResult {
    let dev = Counting::new(env.create()?);
    let log = dev.log();
    let dev: Box<dyn BlockDevice> = Box::new(ReadOnly(dev));
    with_target(env, Some(dev), |t| {
        let bs = block(t);
        needs_size(t, 64 * bs)?;
        if !t.flags().contains(TransmissionFlags::READ_ONLY) {
            return Err(Failure::failed(
                "a read-only device was not exported read-only",
            ));
        }
        let len = 8 * bs;
        let places = [0, t.size() / 2 / bs * bs, t.size() - len];
        let before: Vec<Vec<u8>> = places
            .iter()
            .map(|&o| op(t.read(o, len as usize), || format!("read at {o}")))
            .collect::<Result<_, _>>()?;
        let data = pattern(9, 0, len);
        let mut wrong = Vec::new();
        for &o in &places {
            let attempts: [(&str, Result<(), OpError>); 4] = [
                ("write", t.write(o, &data)),
                ("FUA write", t.write_fua(o, &data)),
                ("trim", t.trim(o, len)),
                ("write-zeroes", t.write_zeroes(o, len, false)),
            ];
            for (what, r) in attempts {
                if r.is_ok() {
                    wrong.push(format!("{what} at {o}"));
                }
            }
        }
        if !wrong.is_empty() {
            return Err(Failure::failed(format!(
                "on a read-only device these succeeded: {}",
                wrong.join("; ")
            )));
        }
        let reached: Vec<String> = log
            .calls()
            .iter()
            .filter(|c| {
                matches!(
                    c.kind,
                    CallKind::Write | CallKind::WriteFua | CallKind::Trim | CallKind::WriteZeroes
                )
            })
            .map(|c| format!("{:?} at {}", c.kind, c.offset))
            .collect();
        if !reached.is_empty() {
            return Err(Failure::failed(format!(
                "writes reached a read-only device: {}",
                reached.join("; ")
            )));
        }
        for (o, b) in places.iter().zip(&before) {
            expect_read(t, *o, b, "data on a read-only device after rejected writes")?;
        }
        Ok(())
    })
}

/// Many requests in flight at once to disjoint ranges: one large write and read (which the
/// kernel splits into up to 128 requests in flight), and, with a shared rig, eight threads on
/// ranges of their own.
pub fn in_flight_disjoint(env: &Env<'_>) -> CaseResult {
    writable(env)?;
    with_target(env, None, |t| {
        let bs = block(t);
        needs_size(t, 4 << 20)?;
        let len = (16u64 << 20).min(t.size() / 2) / bs * bs;
        let data = pattern(11, 0, len);
        op(t.write(0, &data), || format!("write of {len} bytes"))?;
        expect_read(t, 0, &data, "large write split into many requests")
    })?;
    let t = env.attach()?;
    let bs = u64::from(t.block_size());
    let region = (t.size() / 8).min(1 << 20) / bs * bs;
    let t_ref: &dyn Target = &*t;
    let result = thread::scope(|s| {
        let workers: Vec<_> = (0..8u64)
            .map(|w| {
                s.spawn(move || -> CaseResult {
                    let base = w * region;
                    for round in 0..8u64 {
                        let l = ((round + 1) * 4 * bs).min(region);
                        let o = base + (round * 7 * bs) % (region - l + bs) / bs * bs;
                        let data = pattern(100 + w * 10 + round, o, l);
                        op(t_ref.write(o, &data), || {
                            format!("thread {w}: write at {o}")
                        })?;
                        expect_read(t_ref, o, &data, &format!("thread {w}, round {round}"))?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(Failure::failed("a thread panicked")))
        })
    });
    result.and(detach(t))
}

/// Concurrent writers to one range, with readers alongside: every block a reader sees, and
/// every block at the end, is wholly one writer's (or the data from before).
pub fn in_flight_overlapping(env: &Env<'_>) -> CaseResult {
    writable(env)?;
    let t = env.attach()?;
    let bs = u64::from(t.block_size());
    let base = 64 << 10;
    let len = 256 << 10;
    let writers = 4u64;
    let t_ref: &dyn Target = &*t;
    let result = (|| -> CaseResult {
        needs_size(t_ref, 1 << 20)?;
        op(t_ref.write(base, &pattern(200, base, len)), || {
            "initial write".into()
        })?;
        // Which seeds may legitimately be found in each block.
        let allowed: Vec<u64> = std::iter::once(200).chain(1..=writers).collect();
        let check = |got: &[u8], at: u64, who: &str| -> CaseResult {
            for (i, b) in got.chunks(bs as usize).enumerate() {
                let o = at + i as u64 * bs;
                if !allowed.iter().any(|&s| pattern(s, o, bs) == b) {
                    return Err(Failure::failed(format!(
                        "{who}: the block at {o} is not wholly one writer's data (torn or foreign)"
                    )));
                }
            }
            Ok(())
        };
        thread::scope(|s| {
            let mut hs = Vec::new();
            for w in 1..=writers {
                hs.push(s.spawn(move || -> CaseResult {
                    let data = pattern(w, base, len);
                    for _ in 0..6 {
                        op(t_ref.write(base, &data), || format!("writer {w}"))?;
                    }
                    Ok(())
                }));
            }
            for r in 0..2u64 {
                let check = &check;
                hs.push(s.spawn(move || -> CaseResult {
                    for _ in 0..6 {
                        let got = op(t_ref.read(base, len as usize), || format!("reader {r}"))?;
                        check(&got, base, &format!("reader {r}"))?;
                    }
                    Ok(())
                }));
            }
            hs.into_iter().try_for_each(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Failure::failed("a thread panicked")))
            })
        })?;
        let last = op(t_ref.read(base, len as usize), || "final read".into())?;
        check(&last, base, "after all writers finished")?;
        if last == pattern(200, base, len) {
            return Err(Failure::failed(
                "no writer's data arrived: every write was lost",
            ));
        }
        Ok(())
    })();
    result.and(detach(t))
}

/// A device's errors reach the caller: with the device's errno through the loopback (mapped to
/// the protocol's set, EIO for one it lacks or none), as EIO through the kernel; requests
/// outside the failing range still succeed.
pub fn device_errors_reach_caller(env: &Env<'_>) -> CaseResult {
    const ENOMEM: i32 = 12;
    const ENOSPC: i32 = 28;
    const ENOENT: i32 = 2;
    const EIO: i32 = 5;
    let probe = env.create()?;
    let bs = u64::from(probe.block_size());
    let size = probe.blocks() * bs;
    if size < 64 * bs {
        return Err(Failure::skip("needs a device of at least 64 blocks"));
    }
    let mid = size / 2 / bs * bs;
    let dev = FailingRange::new(
        probe,
        mid..mid + 8 * bs,
        Some(Fault::Errno(ENOMEM)),
        Some(Fault::Errno(ENOSPC)),
    );
    let dev = FailingRange::new(dev, 0..bs, Some(Fault::Errno(ENOENT)), Some(Fault::NoErrno));
    with_target(env, Some(Box::new(dev)), |t| {
        let see = |e: i32| if t.sees_device_errno() { e } else { EIO };
        let errno_of = |what: &str, r: Result<(), OpError>, want: i32| -> CaseResult {
            match r {
                Err(e) if e.errno == Some(want) => Ok(()),
                Err(e) => Err(Failure::failed(format!(
                    "{what}: the device failed with errno {want} expected at the caller, got {e}"
                ))),
                Ok(()) => Err(Failure::failed(format!(
                    "{what}: the device failed but the caller saw success"
                ))),
            }
        };
        errno_of(
            "read in the failing range",
            t.read(mid, bs as usize).map(drop),
            see(ENOMEM),
        )?;
        errno_of(
            "read overlapping the failing range",
            t.read(mid - bs, 2 * bs as usize).map(drop),
            see(ENOMEM),
        )?;
        errno_of(
            "read failing with ENOENT (not in the protocol)",
            t.read(0, bs as usize).map(drop),
            EIO,
        )?;
        if !env.caps.read_only {
            errno_of(
                "write in the failing range",
                t.write(mid, &vec![1; bs as usize]),
                see(ENOSPC),
            )?;
            errno_of(
                "write failing without an errno",
                t.write(0, &vec![1; bs as usize]),
                EIO,
            )?;
            op(t.write(mid - bs, &pattern(3, mid - bs, bs)), || {
                "write just before the failing range".into()
            })?;
            expect_read(
                t,
                mid - bs,
                &pattern(3, mid - bs, bs),
                "block beside the failing range",
            )?;
        }
        op(t.read(mid + 8 * bs, bs as usize), || {
            "read just after the failing range".into()
        })?;
        Ok(())
    })
}

/// `unmount` is called exactly once when serving ends, after every request, and not before.
pub fn unmount_once(env: &Env<'_>) -> CaseResult {
    let dev = Counting::new(env.create()?);
    let log = dev.log();
    let t = env.attach_device(Box::new(dev))?;
    let bs = u64::from(t.block_size());
    let body = (|| -> CaseResult {
        if !env.caps.read_only {
            op(t.write(0, &pattern(1, 0, 4 * bs)), || "write".into())?;
            op(t.flush(), || "flush".into())?;
        }
        op(t.read(0, 4 * bs as usize), || "read".into())?;
        if log.count(CallKind::Unmount) != 0 {
            return Err(Failure::failed(
                "unmount was called while the device was still served",
            ));
        }
        Ok(())
    })();
    let detached = detach(t);
    body?;
    detached?;
    let calls = log.calls();
    let unmounts = log.count(CallKind::Unmount);
    if unmounts != 1 {
        return Err(Failure::failed(format!(
            "unmount was called {unmounts} times when serving ended; it must be called exactly once"
        )));
    }
    if let Some(late) = calls.iter().find(|c| c.after_unmount) {
        return Err(Failure::failed(format!(
            "the device was called after unmount: {:?} at {}",
            late.kind, late.offset
        )));
    }
    Ok(())
}
