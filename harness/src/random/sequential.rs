//! Sequential random testing on a target the caller attached: [`run_ops`] runs one sequence in
//! the calling thread and checks it with the same history checker as concurrent runs (with one
//! thread, every operation completes before the next is invoked, so each read has exactly one
//! value it may return).

use userblk::Capabilities;

use super::concurrent::{execute, op_failure};
use super::generate::ModelOp;
use super::history::{Clock, Event, History, Phase};
use super::to_script::script_of;
use crate::script::Script;
use crate::target::Target;

/// Runs `ops` on `target`, one after the other, and checks every read. Returns the sequence as
/// a script (up to and including the first failure) and the failure: the index of the operation
/// concerned and the message (its first line says what went wrong: `lost write: ...`).
pub fn run_ops(
    target: &dyn Target,
    ops: &[ModelOp],
    caps: Capabilities,
) -> (Script, Option<(usize, String)>) {
    let clock = Clock::new();
    let mut h = History::new(u64::from(target.block_size()), caps.trim_zeroes, 1);
    for (index, op) in ops.iter().enumerate() {
        let (invoked, at) = clock.tick();
        let result = execute(target, op);
        let (completed, end) = clock.tick();
        let failed = result.is_err();
        h.events.push(Event {
            phase: Phase::Run,
            thread: 0,
            index,
            op: *op,
            invoked,
            completed,
            at,
            took: end.saturating_sub(at),
            result,
        });
        if failed {
            break;
        }
    }
    let failure = op_failure(&h).or_else(|| {
        h.first_violation(None)
            .map(|v| super::concurrent::violation_failure(&h, &v))
    });
    match failure {
        None => (script_of(&h, target.flags(), None), None),
        Some(f) => {
            let event = f.event.unwrap_or(h.events.len().saturating_sub(1));
            let index = h.events.get(event).map_or(0, |e| e.index);
            let script = script_of(&h, target.flags(), Some(event));
            let mut message = format!("{}: {}", f.kind, f.summary);
            if !f.details.is_empty() {
                message.push('\n');
                message.push_str(f.details.trim_end());
            }
            (script, Some((index, message)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::LoopbackRig;
    use crate::target::Rig;
    use userblk::{BlockDevice, MemDevice};

    #[test]
    fn a_sequence_on_a_good_device_passes_and_becomes_a_script_that_replays() {
        let dev = MemDevice::new(1 << 20);
        let caps = dev.capabilities();
        let t = LoopbackRig::default().attach(Box::new(dev)).unwrap();
        let ops = super::super::generate(3, 60, 1 << 20, 512, caps);
        let (script, failure) = run_ops(&*t, &ops, caps);
        assert!(failure.is_none(), "{failure:?}");
        t.detach().unwrap();
        script.replay(MemDevice::new(1 << 20)).unwrap();
    }
}
