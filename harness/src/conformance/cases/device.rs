//! Driver cases about the device's life: its errors reach the caller with their errno, and
//! unmount is called exactly once, last.

use super::super::devices::{CallKind, Counting, FailingRange, Fault};
use super::{detach, expect_read, op, pattern, with_target};
use crate::conformance::{CaseResult, Env, Failure};
use crate::target::OpError;

/// A device's errors reach the caller: with the device's errno through the loopback (mapped to
/// the protocol's set, EIO for one it lacks or none), as EIO through the kernel; requests
/// outside the failing range still succeed.
pub fn device_errors_reach_caller(env: &Env<'_>) -> CaseResult {
    env.needs_own_device()?;
    const ENOMEM: i32 = 12;
    const ENOSPC: i32 = 28;
    const ENOENT: i32 = 2;
    const EIO: i32 = 5;
    let probe = env.create()?;
    let bs = u64::from(probe.block_size());
    let size = probe.blocks() * bs;
    if size < 64 * bs {
        return Err(Failure::not_run("needs a device of at least 64 blocks"));
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
                    "wrong errno: {what}: the device failed with errno {want} expected at the caller, got {e}"
                ))),
                Ok(()) => Err(Failure::failed(format!(
                    "error lost: {what}: the device failed but the caller saw success"
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
                "lost write",
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
    env.needs_own_device()?;
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
                "early unmount: unmount was called while the device was still served",
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
            "wrong unmount count: unmount was called {unmounts} times when serving ended; it must be called exactly once"
        )));
    }
    if let Some(late) = calls.iter().find(|c| c.after_unmount) {
        return Err(Failure::failed(format!(
            "call after unmount: the device was called after unmount: {:?} at {}",
            late.kind, late.offset
        )));
    }
    Ok(())
}
