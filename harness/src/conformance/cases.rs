//! The cases, one public function each, and [`cases`], the list [`super::run_all`] runs; the
//! helpers they share. The cases themselves live by theme: [`data`] (what is written reads
//! back), [`server`] (requests the device must never see), [`concurrency`] (requests in flight
//! together), [`offsets`] (offsets that 32-bit arithmetic aliases), [`device`] (errors and
//! unmount) and [`durability`] (what survives a disconnect, a re-open and a power loss).

mod concurrency;
mod data;
mod device;
mod durability;
mod offsets;
mod server;

use userblk::BlockDevice;

use super::{Case, CaseKind, CaseResult, Env, Failure};
use crate::script::{fill_seed, first_difference};
use crate::target::{Attached, OpError, Target};

pub use concurrency::*;
pub use data::*;
pub use device::*;
pub use durability::*;
pub use offsets::*;
pub use server::*;

/// Every case, in the order [`super::run_all`] runs them.
pub fn cases() -> Vec<Case> {
    // `case!(f, about)` is a driver check; `case!(server: f, about)` a server check.
    macro_rules! case {
        (server: $f:ident, $about:expr) => {
            Case {
                name: stringify!($f),
                about: $about,
                kind: CaseKind::Server,
                run: $f,
            }
        };
        ($f:ident, $about:expr) => {
            Case {
                name: stringify!($f),
                about: $about,
                kind: CaseKind::Driver,
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
            huge_offsets,
            "writes around the 2^32-byte, -sector and -page boundaries read back unaliased"
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
            server: out_of_range_rejected,
            "requests past the end or misaligned get the protocol's errno and never reach the device"
        ),
        case!(
            server: read_only_rejected,
            "on a read-only export, writes, trims and zeroes get EPERM and never reach the device"
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

/// A request's result, or a failure naming the request (`what`) and the error.
fn op<T>(r: Result<T, OpError>, what: impl FnOnce() -> String) -> Result<T, Failure> {
    r.map_err(|e| {
        // The fake kernel's watchdog says "stall: ..." of a request in flight too long, the
        // loopback rig "unfilled read: ..." of bytes the device never wrote: that is what went
        // wrong, so it comes first.
        if e.message.starts_with("stall") || e.message.starts_with("unfilled read") {
            Failure::failed(format!("{e} (during: {})", what()))
        } else {
            Failure::failed(format!("request failed: {}: {e}", what()))
        }
    })
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

/// A case needing a device of at least `min` bytes cannot run on a smaller one: that is the
/// factory's choice, and the case's checks are missing from the run, so it is not a skip.
fn needs_size(t: &dyn Target, min: u64) -> CaseResult {
    if t.size() < min {
        return Err(Failure::not_run(format!(
            "needs a device of at least {min} bytes, the factory's has {}",
            t.size()
        )));
    }
    Ok(())
}

/// Reads `want.len()` bytes at `offset` and compares. A difference fails with `problem` (what
/// it means, in words: "lost write", "write spilled over", ...), `what` was read, how many
/// blocks differ, and a dump of the first difference.
fn expect_read(t: &dyn Target, offset: u64, want: &[u8], problem: &str, what: &str) -> CaseResult {
    let got = op(t.read(offset, want.len()), || {
        format!("{what}: read of {} bytes at {offset}", want.len())
    })?;
    match first_difference(want, &got, None, offset) {
        None => Ok(()),
        Some(diff) => Err(Failure::failed(format!(
            "{problem}: {what}: {}\n{diff}",
            describe_difference(want, &got, offset, block(t) as usize)
        ))),
    }
}

/// "N bytes read at O differ from what was written (K of M blocks differ, ...)".
fn describe_difference(want: &[u8], got: &[u8], offset: u64, bs: usize) -> String {
    let bs = bs.max(1);
    let differing: Vec<(&[u8], &[u8])> = want
        .chunks(bs)
        .zip(got.chunks(bs))
        .filter(|(w, g)| w != g)
        .collect();
    let zeroes = !differing.is_empty() && differing.iter().all(|(_, g)| g.iter().all(|&b| b == 0));
    format!(
        "{} bytes read at {offset} differ from what was written ({} of {} blocks differ{})",
        want.len(),
        differing.len(),
        want.len().div_ceil(bs),
        if zeroes { ", reading as zeroes" } else { "" }
    )
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
