//! Server checks: requests the device must never see (past the end, straddling it, misaligned,
//! empty, too large, writes to a read-only export). Through the loopback they are sent as raw
//! NBD requests, straight to the server ([`Target::raw`]), so that what is checked is the
//! server's answer (the errno the NBD protocol asks for) and that the device was never called.
//! Through a real kernel the block layer refuses them before the server sees them; the cases
//! then check what the kernel returns, and say so in a note.

use userblk::link::loopback::Op;
use userblk::proto::{Command, CommandFlags, Errno, TransmissionFlags};
use userblk::BlockDevice;

use super::super::devices::{CallKind, CallLog, Counting, ReadOnly};
use super::{block, expect_read, needs_size, op, pattern, with_target};
use crate::conformance::{CaseResult, Env, Failure};
use crate::target::{OpError, RawRequests, Target};

/// What the note says when the requests went through a real kernel.
const THROUGH_KERNEL: &str = "checked through the kernel: its block layer refuses these \
     requests before the server sees them, so this checks the kernel's answers, not the server's";

/// One raw request and the errnos the protocol asks for it.
struct Reject<'a> {
    op: Op<'a>,
    allowed: &'a [Errno],
    /// What the protocol makes of the answer.
    rule: Rule,
}

/// How binding the protocol's answer to a [`Reject`] is. userblk's own server (a rig that serves
/// the harness's device) is held to the protocol's SHOULDs; a server the harness does not run is
/// held to what the protocol requires, and its departures from the SHOULDs are noted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rule {
    /// The protocol says the server SHOULD answer one of `allowed` (past the end: EINVAL for
    /// reads and trims, ENOSPC for writes; misaligned: EINVAL): any error is within it, success
    /// is not.
    Should,
    /// The protocol leaves the outcome unspecified (a zero-length request, a READ over the
    /// server's maximum payload): success or any error is within it; the server SHOULD NOT
    /// disconnect.
    Unspecified,
}

fn describe(op: &Op<'_>) -> String {
    let fua = if op.flags.contains(CommandFlags::FUA) {
        " (FUA)"
    } else {
        ""
    };
    format!("{}{fua} at {}, {} bytes", op.command, op.offset, op.len)
}

fn names(errnos: &[Errno]) -> String {
    errnos
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(" or ")
}

/// Sends each request raw; returns a line per request answered otherwise than the protocol
/// allows (with `strict`, otherwise than it asks), and a line per answer that departs from what
/// the protocol asks but not from what it allows (never with `strict`).
fn send_all(
    raw: &dyn RawRequests,
    rejects: &[Reject<'_>],
    strict: bool,
) -> (Vec<String>, Vec<String>) {
    let mut wrong = Vec::new();
    let mut departures = Vec::new();
    for r in rejects {
        let what = describe(&r.op);
        let want = names(r.allowed);
        let lenient = !strict;
        match raw.request(r.op) {
            Ok(_) if lenient && r.rule == Rule::Unspecified => departures.push(format!(
                "{what}: succeeded (the protocol leaves it unspecified; {want} is usual)"
            )),
            Ok(_) => wrong.push(format!("{what}: succeeded, expected {want}")),
            Err(OpError { errno: Some(e), .. }) if r.allowed.iter().any(|a| a.0 as i32 == e) => {}
            Err(OpError { errno: Some(e), .. }) if lenient => departures.push(format!(
                "{what}: answered {}, where the protocol says {} {want}",
                Errno(e as u32),
                if r.rule == Rule::Should {
                    "SHOULD"
                } else {
                    "usually"
                }
            )),
            Err(OpError { errno: Some(e), .. }) => wrong.push(format!(
                "{what}: answered {}, expected {want}",
                Errno(e as u32)
            )),
            // A broken connection is never an answer: the server SHOULD NOT disconnect.
            Err(e) => wrong.push(format!("{what}: {e}, expected {want}")),
        }
    }
    (wrong, departures)
}

/// Calls that changed or read the device since the first `from` calls of `log`.
fn device_calls_since(log: &CallLog, from: usize, writes_only: bool) -> Vec<String> {
    log.calls()
        .iter()
        .skip(from)
        .filter(|c| {
            !writes_only
                || matches!(
                    c.kind,
                    CallKind::Write | CallKind::WriteFua | CallKind::Trim | CallKind::WriteZeroes
                )
        })
        .filter(|c| c.kind != CallKind::Unmount)
        .map(|c| format!("{:?} at {}, {} bytes", c.kind, c.offset, c.len))
        .collect()
}

/// The failure for requests that reached the device or were answered wrongly, or `Ok`.
fn verdict(reached: &[String], wrong: &[String]) -> CaseResult {
    if reached.is_empty() && wrong.is_empty() {
        return Ok(());
    }
    let mut msg = if !reached.is_empty() {
        format!(
            "requests the server must reject reached the device: {} device call(s), first {}",
            reached.len(),
            reached[0]
        )
    } else {
        format!(
            "wrong answer from the server: {} request(s) it must reject were answered otherwise, \
             first {}",
            wrong.len(),
            wrong[0]
        )
    };
    for line in wrong {
        msg.push_str(&format!("\n  answer: {line}"));
    }
    for line in reached {
        msg.push_str(&format!("\n  device called: {line}"));
    }
    Err(Failure::failed(msg))
}

/// Requests past the end, straddling it, with an offset that overflows, misaligned, empty or
/// over the server's maximum (32 MiB unless it advertises one) get the errno the NBD protocol
/// asks for (EINVAL for reads and trims, ENOSPC for writes and write-zeroes past the end, EINVAL
/// when misaligned to the minimum block size the server enforces, unchecked when that is 1),
/// the device is never called for them, and the data at the end is unchanged afterwards.
///
/// Against a server the harness does not run (an external NBD server), the case holds it to
/// what the protocol requires rather than to what it recommends: a request past the end or
/// misaligned must fail, with any error (the protocol's "SHOULD return ENOSPC" / "EINVAL" is a
/// recommendation); a zero-length request or a READ over the maximum may succeed (the protocol
/// leaves them unspecified); no request may break the connection; and each departure from the
/// recommended answer is listed in a note.
pub fn out_of_range_rejected(env: &Env<'_>) -> CaseResult {
    let dev = Counting::new(env.create()?);
    let log = dev.log();
    with_target(env, Some(Box::new(dev)), |t| {
        let bs = block(t);
        needs_size(t, 64 * bs)?;
        let size = t.size();
        let tail = size - 2 * bs;
        let writable = !t.flags().contains(TransmissionFlags::READ_ONLY);
        if writable {
            op(t.write(tail, &pattern(7, tail, 2 * bs)), || {
                "write of the last two blocks".into()
            })?;
        }
        let before = op(t.read(tail, 2 * bs as usize), || {
            "read of the last two blocks".into()
        })?;
        let from = log.calls().len();
        let wrong = match t.raw() {
            Some(raw) => {
                if t.min_block_size() <= 1 {
                    env.note(
                        "the server advertises a minimum block size of 1, or none (then 1 by \
                         default): misaligned requests are valid there, not checked",
                    );
                }
                let strict = env.rig.serves_given_device();
                let (wrong, departures) = raw_out_of_range(raw, t, writable, strict);
                if let Some(first) = departures.first() {
                    env.note(format!(
                        "{} answer(s) within the protocol but not what it recommends \
                         (a failure for userblk's own server), first {first}",
                        departures.len()
                    ));
                }
                wrong
            }
            None => {
                env.note(THROUGH_KERNEL);
                kernel_out_of_range(t, writable)
            }
        };
        let reached = device_calls_since(&log, from, false);
        verdict(&reached, &wrong)?;
        expect_read(
            t,
            tail,
            &before,
            "rejected request changed data",
            "the last two blocks after rejected requests",
        )
    })
}

fn raw_out_of_range(
    raw: &dyn RawRequests,
    t: &dyn Target,
    writable: bool,
    strict: bool,
) -> (Vec<String>, Vec<String>) {
    const EINVAL: &[Errno] = &[Errno::EINVAL];
    const ENOSPC: &[Errno] = &[Errno::ENOSPC];
    let bs = block(t);
    let size = t.size();
    let tail = size - 2 * bs;
    let flags = t.flags();
    let junk = pattern(8, 0, 2 * bs + 1);
    let mut rejects = Vec::new();
    let with = |command, offset, len: u64, data| Op {
        command,
        flags: CommandFlags::NONE,
        offset,
        len: len as u32,
        data,
    };
    for (o, l) in [
        (size - bs, 2 * bs),
        (size, bs),
        (size + 64 * bs, bs),
        (u64::MAX / bs * bs, bs),
        (u64::MAX / bs * bs - bs, 2 * bs),
    ] {
        rejects.push(Reject {
            op: Op::read(o, l as u32),
            allowed: EINVAL,
            rule: Rule::Should,
        });
        if writable {
            rejects.push(Reject {
                op: Op::write(o, &junk[..l as usize]),
                allowed: ENOSPC,
                rule: Rule::Should,
            });
            if flags.contains(TransmissionFlags::SEND_WRITE_ZEROES) {
                rejects.push(Reject {
                    op: with(Command::WriteZeroes, o, l, &[]),
                    allowed: ENOSPC,
                    rule: Rule::Should,
                });
            }
            if flags.contains(TransmissionFlags::SEND_TRIM) {
                rejects.push(Reject {
                    op: with(Command::Trim, o, l, &[]),
                    allowed: EINVAL,
                    rule: Rule::Should,
                });
            }
        }
    }
    // Misaligned (to the minimum block size the server enforces: none when it is 1), empty,
    // too large: EINVAL wherever they are.
    let min = u64::from(t.min_block_size());
    let misaligned = min > 1;
    if misaligned {
        rejects.push(Reject {
            op: Op::read(1, bs as u32),
            allowed: EINVAL,
            rule: Rule::Should,
        });
        rejects.push(Reject {
            op: Op::read(0, bs as u32 + 1),
            allowed: EINVAL,
            rule: Rule::Should,
        });
    }
    rejects.push(Reject {
        op: Op::read(0, 0),
        allowed: EINVAL,
        rule: Rule::Unspecified,
    });
    // Longer than the server's maximum, when a request can be (and fits in the export).
    if let Some(len) = t
        .max_request()
        .checked_add(bs as u32)
        .filter(|&l| u64::from(l) <= size)
    {
        rejects.push(Reject {
            op: Op::read(0, len),
            allowed: EINVAL,
            rule: Rule::Unspecified,
        });
    }
    if writable && misaligned {
        rejects.push(Reject {
            op: Op::write(tail + 1, &junk[..bs as usize]),
            allowed: EINVAL,
            rule: Rule::Should,
        });
        rejects.push(Reject {
            op: Op::write(tail, &junk[..bs as usize + 1]),
            allowed: EINVAL,
            rule: Rule::Should,
        });
        if flags.contains(TransmissionFlags::SEND_TRIM) && (bs / 2) % min != 0 {
            rejects.push(Reject {
                op: with(Command::Trim, tail + bs / 2, bs, &[]),
                allowed: EINVAL,
                rule: Rule::Should,
            });
        }
    }
    send_all(raw, &rejects, strict)
}

/// Through a kernel: each request must fail (with whatever errno the kernel picks).
fn kernel_out_of_range(t: &dyn Target, writable: bool) -> Vec<String> {
    let bs = block(t);
    let size = t.size();
    let tail = size - 2 * bs;
    let junk = pattern(8, 0, 2 * bs);
    let trim = t.flags().contains(TransmissionFlags::SEND_TRIM);
    let mut wrong = Vec::new();
    let mut expect_err = |what: String, r: Result<(), OpError>| {
        if r.is_ok() {
            wrong.push(format!("{what}: succeeded, expected an error"));
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
        if writable {
            expect_err(
                format!("write at {o}, {l} bytes"),
                t.write(o, &junk[..l as usize]),
            );
            expect_err(
                format!("write-zeroes at {o}, {l} bytes"),
                t.write_zeroes(o, l, false),
            );
            if trim {
                expect_err(format!("trim at {o}, {l} bytes"), t.trim(o, l));
            }
        }
    }
    expect_err("read at offset 1".into(), t.read(1, bs as usize).map(drop));
    expect_err(
        format!("read of {} bytes", bs + 1),
        t.read(0, bs as usize + 1).map(drop),
    );
    if writable {
        expect_err(
            format!("write at {}", tail + 1),
            t.write(tail + 1, &junk[..bs as usize]),
        );
    }
    wrong
}

/// On a read-only export (the device itself, or wrapped in [`ReadOnly`]), writes, FUA writes,
/// trims and write-zeroes get EPERM (EINVAL also for a trim or write-zeroes the export does not
/// advertise), nothing reaches the device, and the data stays.
pub fn read_only_rejected(env: &Env<'_>) -> CaseResult {
    env.needs_own_device()?;
    let dev = Counting::new(env.create()?);
    let log = dev.log();
    let dev: Box<dyn BlockDevice> = Box::new(ReadOnly(dev));
    with_target(env, Some(dev), |t| {
        let bs = block(t);
        needs_size(t, 64 * bs)?;
        if !t.flags().contains(TransmissionFlags::READ_ONLY) {
            return Err(Failure::failed(
                "read-only not advertised: a read-only device was exported read-write",
            ));
        }
        let len = 8 * bs;
        let places = [0, t.size() / 2 / bs * bs, t.size() - len];
        let before: Vec<Vec<u8>> = places
            .iter()
            .map(|&o| op(t.read(o, len as usize), || format!("read at {o}")))
            .collect::<Result<_, _>>()?;
        let data = pattern(9, 0, len);
        let from = log.calls().len();
        let wrong = match t.raw() {
            Some(raw) => raw_read_only(raw, t, &places, &data),
            None => {
                env.note(THROUGH_KERNEL);
                kernel_read_only(t, &places, &data)
            }
        };
        let reached = device_calls_since(&log, from, true);
        verdict(&reached, &wrong)?;
        for (o, b) in places.iter().zip(&before) {
            expect_read(
                t,
                *o,
                b,
                "rejected write changed data",
                "data on a read-only device after rejected writes",
            )?;
        }
        Ok(())
    })
}

fn raw_read_only(
    raw: &dyn RawRequests,
    t: &dyn Target,
    places: &[u64],
    data: &[u8],
) -> Vec<String> {
    const EPERM: &[Errno] = &[Errno::EPERM];
    // A command the export does not advertise may be refused as such (EINVAL) before the
    // server even looks at read-only.
    const EPERM_OR_EINVAL: &[Errno] = &[Errno::EPERM, Errno::EINVAL];
    let flags = t.flags();
    let advertised = |f| {
        if flags.contains(f) {
            EPERM
        } else {
            EPERM_OR_EINVAL
        }
    };
    let len = data.len() as u32;
    let mut rejects = Vec::new();
    for &o in places {
        rejects.push(Reject {
            op: Op::write(o, data),
            allowed: EPERM,
            rule: Rule::Should,
        });
        rejects.push(Reject {
            op: Op {
                flags: CommandFlags::FUA,
                ..Op::write(o, data)
            },
            allowed: EPERM,
            rule: Rule::Should,
        });
        for (command, flag) in [
            (Command::Trim, TransmissionFlags::SEND_TRIM),
            (Command::WriteZeroes, TransmissionFlags::SEND_WRITE_ZEROES),
        ] {
            rejects.push(Reject {
                op: Op {
                    command,
                    flags: CommandFlags::NONE,
                    offset: o,
                    len,
                    data: &[],
                },
                allowed: advertised(flag),
                rule: Rule::Should,
            });
        }
    }
    // Only for the harness's own device (the case needs it): held to the protocol's SHOULDs.
    send_all(raw, &rejects, true).0
}

fn kernel_read_only(t: &dyn Target, places: &[u64], data: &[u8]) -> Vec<String> {
    let len = data.len() as u64;
    let mut wrong = Vec::new();
    for &o in places {
        let attempts: [(&str, Result<(), OpError>); 4] = [
            ("write", t.write(o, data)),
            ("FUA write", t.write_fua(o, data)),
            ("trim", t.trim(o, len)),
            ("write-zeroes", t.write_zeroes(o, len, false)),
        ];
        for (what, r) in attempts {
            if r.is_ok() {
                wrong.push(format!("{what} at {o}: succeeded, expected an error"));
            }
        }
    }
    wrong
}
