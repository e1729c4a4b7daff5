//! `userblk ublk-setup` and its hidden udev helper `userblk ublk-chown`, as the binary runs them,
//! without touching the system: the plan printed by `--dry-run`, and the refusals of bad input.
//! (The real set-up, and a device served by a user other than root, run in the VM suite:
//! vm/cases/ublk_unpriv.sh.)

use std::process::{Command, Output};

fn userblk(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_userblk"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("userblk {args:?}: {e}"))
}

#[test]
fn dry_run_prints_the_rule_with_this_binary_and_changes_nothing() {
    let o = userblk(&["ublk-setup", "--dry-run", "--binary", "/opt/bin/userblk"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.starts_with("userblk ublk-setup would:\n  run: modprobe ublk_drv\n"),
        "{out}"
    );
    assert!(
        out.contains(
            r#"    ACTION=="add", KERNEL=="ublk[bc][0-9]*", RUN+="/opt/bin/userblk ublk-chown %k""#
        ),
        "{out}"
    );
    assert!(out.contains("  chmod 0666 /dev/ublk-control\n"), "{out}");
}

#[test]
fn bad_binaries_and_groups_are_refused() {
    let o = userblk(&["ublk-setup", "--dry-run", "--binary", "relative/userblk"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with(
            "userblk ublk-setup: relative/userblk: the udev rule runs userblk by an absolute path"
        ),
        "{err}"
    );
    let o = userblk(&[
        "ublk-setup",
        "--dry-run",
        "--group",
        "no-such-group-userblk",
    ]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no group named \"no-such-group-userblk\""),
        "{err}"
    );
}

#[test]
fn chown_refuses_names_that_are_no_ublk_node() {
    let o = userblk(&["ublk-chown", "sda1"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert_eq!(
        String::from_utf8_lossy(&o.stderr).trim(),
        "userblk ublk-chown sda1: \"sda1\" is not a ublk device node name (ublkcN or ublkbN)"
    );
}
