//! `userblk disconnect` and `userblk serve --reattach` refuse what they cannot do with a typed
//! message and exit status 1, before touching any device. (Their real work, on a killed server's
//! device, runs in the VM suite: vm/cases/reattach.sh.)

use std::path::Path;
use std::process::{Command, Output};

fn userblk(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_userblk"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("userblk {args:?}: {e}"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn disconnect_names_a_path_that_is_no_nbd_device() {
    let o = userblk(&["disconnect", "/dev/sda"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert_eq!(
        stderr(&o).trim(),
        "userblk disconnect: /dev/sda is not an NBD device (expected /dev/nbdN)"
    );
}

#[test]
fn reattach_needs_a_device_node() {
    let o = userblk(&["serve", "ram:1M", "--reattach"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert_eq!(
        stderr(&o).trim(),
        "userblk serve: cannot reattach to nbd: a reattach needs the device node (e.g. /dev/nbd0), not auto"
    );
}

#[test]
fn reattach_to_a_device_that_is_not_connected_says_so() {
    if Path::new("/sys/block/nbd15/pid").exists() {
        println!("skipped: /dev/nbd15 is connected here");
        return;
    }
    let o = userblk(&["serve", "ram:1M", "--nbd", "/dev/nbd15", "--reattach"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert_eq!(
        stderr(&o).trim(),
        "userblk serve: cannot reattach to /dev/nbd15: it is not connected (serve it without --reattach)"
    );
}

#[test]
fn reattach_by_ioctl_is_refused() {
    let o = userblk(&[
        "serve",
        "ram:1M",
        "--nbd",
        "/dev/nbd15",
        "--reattach",
        "--setup",
        "ioctl",
    ]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        stderr(&o).contains("only a running device set up by netlink can be reattached"),
        "{}",
        stderr(&o)
    );
}
