//! `userblk vm` end to end without a VM: a fake `vng` on PATH plays the guest (it prints a
//! kernel console on stderr and runs the guest script with bash on the host), with stub
//! `modprobe`, `dmesg` and `qemu-system-x86_64`. This checks what `userblk vm` does with what a
//! guest gives it: output prefixed by kernel, exit statuses, panics and hung tasks in the
//! kernel log, the timeout, kept logs. Real boots are in the report (they need root and QEMU).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The fake vng: FAKE_CONSOLE lines go to stderr first (the boot), then the `--exec` command
/// runs unless FAKE_NO_EXEC is set; its status is vng's.
const FAKE_VNG: &str = r#"#!/bin/bash
exec_cmd=
while (($#)); do
    case $1 in
        --exec) exec_cmd=$2; shift 2 ;;
        *) shift ;;
    esac
done
printf '[    0.000000] Linux version 6.12.0-test (fake)\n' >&2
if [[ -n ${FAKE_CONSOLE:-} ]]; then printf '%b\n' "$FAKE_CONSOLE" >&2; fi
if [[ -n ${FAKE_NO_EXEC:-} ]]; then exit 1; fi
bash -c "$exec_cmd"
"#;

fn stub(dir: &Path, name: &str, body: &str) {
    let p = dir.join(name);
    fs::write(&p, body).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
}

struct Rig {
    dir: tempfile::TempDir,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).unwrap();
        stub(&bin, "vng", FAKE_VNG);
        stub(&bin, "qemu-system-x86_64", "#!/bin/sh\nexit 0\n");
        stub(
            &bin,
            "modprobe",
            "#!/bin/sh\necho \"modprobe $*\" >>\"$FAKE_LOG\"\nexit ${FAKE_MODPROBE_STATUS:-0}\n",
        );
        stub(&bin, "dmesg", "#!/bin/sh\nprintf '%b\\n' \"${FAKE_DMESG:-[    1.000000] nbd: registered device at major 43}\"\n");
        fs::write(dir.path().join("vmlinuz-6.12.0-test"), b"").unwrap();
        Rig { dir }
    }

    fn image(&self) -> PathBuf {
        self.dir.path().join("vmlinuz-6.12.0-test")
    }

    /// Runs `userblk vm --kvm off --kernel IMAGE ARGS...` with the stubs first on PATH.
    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
        let path = format!(
            "{}:{}",
            self.dir.path().join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_userblk"));
        cmd.arg("vm")
            .args(["--kvm", "off", "--kernel"])
            .arg(self.image())
            .args(args)
            .env("PATH", path)
            .env("VNG", self.dir.path().join("bin/vng"))
            .env("FAKE_LOG", self.dir.path().join("log"))
            .current_dir(self.dir.path());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let Output {
            status,
            stdout,
            stderr,
        } = cmd.output().unwrap();
        (
            status.code().unwrap_or(-1),
            String::from_utf8_lossy(&stdout).into_owned(),
            String::from_utf8_lossy(&stderr).into_owned(),
        )
    }
}

#[test]
fn output_is_prefixed_and_a_passing_command_passes() {
    let rig = Rig::new();
    let (code, out, err) = rig.run(
        &[
            "--",
            "bash",
            "-c",
            "echo \"hello from $USERBLK_VM in $PWD\"; echo to-stderr >&2",
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    let dir = fs::canonicalize(rig.dir.path()).unwrap();
    assert!(
        out.contains(&format!("[6.12] hello from 6.12 in {}\n", dir.display())),
        "{out}"
    );
    assert!(
        err.contains("[6.12] to-stderr\n"),
        "CMD's stderr, prefixed: {err}"
    );
    assert!(
        !err.contains("Linux version"),
        "kernel lines are not shown without -v: {err}"
    );
    assert!(
        out.contains("== summary\nkernel 6.12 (6.12.0-test, tcg): ok in "),
        "{out}"
    );
    let log = fs::read_to_string(rig.dir.path().join("log")).unwrap();
    assert_eq!(log, "modprobe nbd\n", "nbd loaded before the command");
}

#[test]
fn a_failing_command_fails_the_run_with_its_status() {
    let rig = Rig::new();
    let (code, out, err) = rig.run(
        &["--", "sh", "-c", "echo 'test failed here' >&2; exit 101"],
        &[],
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("[6.12] test failed here"), "{err}");
    assert!(
        out.contains("FAILED: the command exited with status 101"),
        "{out}"
    );
}

#[test]
fn a_panic_on_the_console_fails_and_shows_the_console() {
    let rig = Rig::new();
    let console = "[   21.400000] sysrq: Trigger a crash\\n[   21.456900] Kernel panic - not syncing: sysrq triggered crash\\n[   21.457100] Call Trace:";
    let (code, out, err) = rig.run(
        &["--", "true"],
        &[("FAKE_CONSOLE", console), ("FAKE_NO_EXEC", "1")],
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("== kernel 6.12: kernel panic: Kernel panic - not syncing: sysrq triggered crash\n    Call Trace:"), "{out}");
    assert!(
        out.contains("the console's last 4 lines:\n  | [    0.000000] Linux version"),
        "{out}"
    );
    assert!(
        out.contains("FAILED: the guest did not boot (vng status 1) [kernel panic]"),
        "{out}"
    );
}

#[test]
fn a_hung_task_in_dmesg_fails_a_passing_command() {
    let rig = Rig::new();
    let dmesg = "[  245.000001] INFO: task kworker/u4:2:87 blocked for more than 120 seconds.\\n[  245.000002]       Not tainted 6.12.0-test";
    let keep = rig.dir.path().join("logs");
    let keep = keep.to_str().unwrap();
    let (code, out, err) = rig.run(
        &["--keep-log", keep, "--", "true"],
        &[("FAKE_DMESG", dmesg)],
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("hung task: INFO: task kworker/u4:2:87 blocked for more than 120 seconds."),
        "{out}"
    );
    assert!(
        out.contains("FAILED: the command passed but the kernel reported problems [hung task]"),
        "{out}"
    );
    let kept = rig.dir.path().join("logs/6.12.0-test");
    assert!(fs::read_to_string(kept.join("dmesg.log"))
        .unwrap()
        .contains("blocked for more than"));
    assert!(fs::read_to_string(kept.join("console.log"))
        .unwrap()
        .contains("Linux version 6.12.0-test"));
}

#[test]
fn a_module_that_does_not_load_fails_before_the_command() {
    let rig = Rig::new();
    let (code, out, err) = rig.run(&["--", "touch", "ran"], &[("FAKE_MODPROBE_STATUS", "1")]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("FAILED: could not load a kernel module"),
        "{out}"
    );
    assert!(
        !rig.dir.path().join("ran").exists(),
        "the command did not run"
    );
}

#[test]
fn a_command_past_the_timeout_is_killed() {
    let rig = Rig::new();
    let (code, out, err) = rig.run(&["--timeout", "2", "--", "sleep", "1000"], &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("FAILED: timed out after 2 s (--timeout), while the command ran"),
        "{out}"
    );
    assert!(out.contains("the console's last"), "{out}");
}

#[test]
fn usage_errors_exit_2_with_the_reason() {
    let rig = Rig::new();
    let (code, _, err) = rig.run(&[], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("<CMD>"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_userblk"))
        .args(["vm", "--kernel", "9.99", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("userblk vm: no installed test kernel matches 9.99"),
        "{err}"
    );
    let (code, _, err) = rig.run(&["--rwdir", "/a,b", "--", "true"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot share /a,b with the guest"), "{err}");
}
