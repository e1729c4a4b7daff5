//! The model's rules, each on a small hand-made history with explicit times.

use super::*;

const BS: u64 = 512;

/// A plain op that reached the device.
const APPLIED: Effect = Effect {
    applied: true,
    durable: None,
    implies_flush: false,
};

fn model(atomic_writes: bool) -> Model {
    let mut m = Model::new(BS, atomic_writes);
    let zero = m.hash(&[0; BS as usize]);
    for b in 0..4 {
        m.learn(b, zero);
    }
    m
}

fn data(fill: u8, blocks: u64) -> Vec<u8> {
    vec![fill; (blocks * BS) as usize]
}

fn write(m: &mut Model, block: u64, fill: u8, blocks: u64, inv: Time, comp: Time) {
    let op = CrashOp::Write {
        offset: block * BS,
        data: data(fill, blocks),
    };
    let index = m.ops.len();
    m.record(index, &op, None, Stamp { inv, comp }, APPLIED);
}

fn fua(m: &mut Model, block: u64, fill: u8, inv: Time, comp: Time) {
    let op = CrashOp::WriteFua {
        offset: block * BS,
        data: data(fill, 1),
    };
    let index = m.ops.len();
    let fua_effect = Effect {
        durable: Some(Durable::Fua),
        ..APPLIED
    };
    m.record(index, &op, None, Stamp { inv, comp }, fua_effect);
}

fn flush(m: &mut Model, inv: Time, comp: Time) {
    let index = m.ops.len();
    m.record(index, &CrashOp::Flush, None, Stamp { inv, comp }, APPLIED);
}

/// Checks block `b` holding a block of `fill` (0: its content before the run).
fn holds(m: &mut Model, cs: Time, b: u64, fill: u8) -> Result<u64, Box<Violation>> {
    holding(m, cs, &[(b, fill)])
}

fn holding(m: &mut Model, cs: Time, blocks: &[(u64, u8)]) -> Result<u64, Box<Violation>> {
    let found: Vec<(u64, u64)> = blocks
        .iter()
        .map(|&(b, fill)| (b, m.hash(&data(fill, 1))))
        .collect();
    let loss = PowerLoss {
        cs,
        ce: cs + 1,
        after: m.ops.len().saturating_sub(1),
        run: None,
    };
    m.check(&loss, &found)
}

fn kind(r: Result<u64, Box<Violation>>) -> ViolationKind {
    match r {
        Ok(_) => panic!("expected a violation"),
        Err(v) => v.kind,
    }
}

#[test]
fn a_write_completed_before_a_flush_was_sent_is_durable() {
    let mut m = model(false);
    write(&mut m, 0, 1, 1, 1, 2);
    flush(&mut m, 3, 4);
    assert!(holds(&mut m.clone(), 5, 0, 1).is_ok());
    let v = holds(&mut m, 5, 0, 0).unwrap_err();
    assert_eq!(v.kind, ViolationKind::LostAfterFlush);
    assert!(
        v.to_string()
            .starts_with("lost after flush: block 0 lost op #0 (write)"),
        "{v}"
    );
    assert_eq!(v.last_flush, Some(1));
}

#[test]
fn a_write_racing_a_flush_may_survive_or_vanish() {
    // Still in flight when the flush was sent, completed before or after the flush did.
    for (w, f) in [((1, 4), (2, 3)), ((1, 3), (2, 4))] {
        for fill in [0, 1] {
            let mut m = model(false);
            write(&mut m, 0, 1, 1, w.0, w.1);
            flush(&mut m, f.0, f.1);
            assert!(holds(&mut m, 5, 0, fill).is_ok(), "{w:?} {f:?} {fill}");
        }
    }
}

#[test]
fn a_flush_still_in_flight_at_the_power_loss_makes_nothing_durable() {
    let mut m = model(false);
    write(&mut m, 0, 1, 1, 1, 2);
    flush(&mut m, 3, 6);
    assert!(holds(&mut m, 4, 0, 0).is_ok());
}

#[test]
fn a_completed_fua_write_is_durable_and_one_in_flight_is_not() {
    let mut m = model(false);
    fua(&mut m, 0, 1, 1, 2);
    assert_eq!(kind(holds(&mut m, 3, 0, 0)), ViolationKind::LostFuaWrite);
    for fill in [0, 1] {
        let mut m = model(false);
        fua(&mut m, 0, 1, 1, 5);
        assert!(holds(&mut m, 3, 0, fill).is_ok());
    }
}

#[test]
fn a_durable_write_supersedes_only_writes_completed_before_it_was_sent() {
    let mut m = model(false);
    write(&mut m, 0, 1, 1, 1, 2); // completed before the FUA write was sent
    write(&mut m, 0, 2, 1, 3, 6); // in flight with it
    fua(&mut m, 0, 3, 4, 5);
    for fill in [2, 3] {
        assert!(holds(&mut m, 7, 0, fill).is_ok(), "{fill}");
    }
    let v = holds(&mut m, 7, 0, 1).unwrap_err();
    assert_eq!(v.kind, ViolationKind::LostFuaWrite);
    assert!(v.found.contains("op #0 (write)"), "{v}");
    assert!(v.found.contains("since superseded"), "{v}");
    assert_eq!(v.allowed.len(), 2, "{v}");
}

#[test]
fn what_became_durable_stays_durable_at_later_power_losses() {
    let mut m = model(false);
    write(&mut m, 0, 1, 1, 1, 2);
    flush(&mut m, 3, 4);
    write(&mut m, 0, 2, 1, 6, 7);
    assert!(holds(&mut m, 5, 0, 1).is_ok());
    assert!(holds(&mut m, 8, 0, 1).is_ok());
    assert!(holds(&mut m, 8, 0, 2).is_ok());
    let v = holds(&mut m, 9, 0, 0).unwrap_err();
    assert_eq!(v.kind, ViolationKind::LostAfterFlush);
    assert!(v.found.starts_with("the content before the run"), "{v}");
}

#[test]
fn unflushed_writes_may_be_torn_unless_the_device_promises_whole_writes() {
    for atomic in [false, true] {
        let mut m = model(atomic);
        write(&mut m, 1, 1, 2, 1, 2);
        // Block 1 reached, block 2 not; and whole or nothing, which are always fine.
        for whole in [[(1, 1), (2, 1)], [(1, 0), (2, 0)]] {
            assert!(holding(&mut m, 3, &whole).is_ok());
        }
        let torn = holding(&mut m, 3, &[(1, 1), (2, 0)]);
        if atomic {
            let v = torn.unwrap_err();
            assert_eq!(v.kind, ViolationKind::TornWrite);
            assert!(
                v.to_string().starts_with("torn write: op #0 (write at 512"),
                "{v}"
            );
            assert_eq!(v.block, 2);
        } else {
            assert!(torn.is_ok());
        }
    }
}

#[test]
fn a_later_write_over_part_of_a_whole_write_is_not_a_tear() {
    let mut m = model(true);
    write(&mut m, 1, 1, 2, 1, 2);
    write(&mut m, 2, 2, 1, 3, 4);
    assert!(holding(&mut m, 5, &[(1, 1), (2, 2)]).is_ok());
}

#[test]
fn data_sent_after_the_power_loss_and_data_no_write_wrote_are_named() {
    let mut m = model(false);
    write(&mut m, 0, 1, 1, 3, 4);
    // The power loss lasted from 1 to 2, before the write was sent.
    let v = holds(&mut m, 1, 0, 1).unwrap_err();
    assert_eq!(v.kind, ViolationKind::WrittenAfterPowerLoss);
    assert_eq!(kind(holds(&mut m, 5, 0, 9)), ViolationKind::UnknownData);
}

#[test]
fn a_device_without_a_cache_must_keep_every_completed_write() {
    let mut m = model(false);
    let op = CrashOp::Write {
        offset: 0,
        data: data(1, 1),
    };
    let no_cache = Effect {
        durable: Some(Durable::NoCache),
        ..APPLIED
    };
    m.record(0, &op, None, Stamp { inv: 1, comp: 2 }, no_cache);
    assert_eq!(kind(holds(&mut m, 3, 0, 0)), ViolationKind::LostWrite);
}

#[test]
fn a_trim_allows_anything_until_superseded() {
    let mut m = model(false);
    let op = CrashOp::Trim { offset: 0, len: BS };
    m.record(0, &op, None, Stamp { inv: 1, comp: 2 }, APPLIED);
    flush(&mut m, 3, 4);
    assert!(holds(&mut m, 5, 0, 7).is_ok());
}

#[test]
fn a_fua_write_sent_as_write_then_flush_is_lost_after_that_flush() {
    let mut m = model(false);
    let op = CrashOp::WriteFua {
        offset: 0,
        data: data(1, 1),
    };
    let effect = Effect {
        durable: Some(Durable::FuaThenFlush),
        implies_flush: true,
        ..APPLIED
    };
    m.record(0, &op, None, Stamp { inv: 1, comp: 2 }, effect);
    let v = holds(&mut m, 3, 0, 0).unwrap_err();
    assert_eq!(v.kind, ViolationKind::LostAfterFlush);
    assert!(v.summary.contains("a write followed by a flush"), "{v}");
}
