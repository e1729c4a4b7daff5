//! `userblk check URI` against NBD servers it does not own: `userblk serve` (everything that can
//! run must pass), nbdkit's memory plugin (when installed; what passes is printed), and an
//! address nothing listens on or a malformed URI (a clear error, exit status 2). Servers listen
//! on Unix sockets in temporary directories and are killed at the end; every command runs under
//! a time limit.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A server process, killed on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` (a server) and waits until `sock` accepts connections.
fn serve(cmd: &mut Command, sock: &Path) -> Process {
    let p = Process(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}")),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

/// Runs `userblk check ARGS` to its end, killed after 120 s.
fn check(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_userblk"))
        .arg("check")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("userblk check {args:?} still running after 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        eprintln!("SKIPPED: {name} not found (install it with scripts/setup-interop.sh)");
    }
    found
}

/// The cases the report lists as passed (`  ok  KIND NAME  TIME`).
fn passed(report: &str) -> Vec<&str> {
    report
        .lines()
        .filter_map(|l| l.strip_prefix("  ok "))
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|n| !n.ends_with(".ubt"))
        .collect()
}

/// Cases that check only what they read against what they wrote: any correct server passes.
const CORE: [&str; 9] = [
    "read_after_write",
    "overlapping_writes",
    "adjacent_writes",
    "request_sizes",
    "unwritten_reads_stable",
    "in_flight_disjoint",
    "in_flight_overlapping",
    "reopen_after_writes",
    "reopen_after_flush",
];

/// The cases that inspect the device the harness made.
const OWN_DEVICE: [&str; 5] = [
    "flush_and_fua",
    "read_only_rejected",
    "device_errors_reach_caller",
    "unmount_once",
    "crash_and_reopen",
];

#[test]
fn check_uri_against_userblk_serve_passes_and_skips_the_device_cases() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("userblk.sock");
    let _server = serve(
        Command::new(env!("CARGO_BIN_EXE_userblk"))
            .args(["serve", "ram:64M", "--listen"])
            .arg(format!("unix:{}", sock.display())),
        &sock,
    );
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let out = check(&[&uri, "--runs", "5"]);
    let report = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{report}");
    assert!(out.status.success(), "{}\n{report}\n{stderr}", out.status);
    assert!(stderr.contains("WRITES to the export"), "{stderr}");
    assert!(report.contains(&format!("conformance ({uri})")), "{report}");
    let ok = passed(&report);
    for name in CORE
        .iter()
        .chain(["out_of_range_rejected", "trim_reads_back_as_promised"].iter())
    {
        assert!(ok.contains(name), "{name} did not pass:\n{report}");
    }
    for name in OWN_DEVICE {
        let line = report
            .lines()
            .find(|l| l.split_whitespace().nth(2) == Some(name))
            .unwrap_or_else(|| panic!("{name} missing:\n{report}"));
        assert!(
            line.contains("skip") && line.contains("serves its own disk"),
            "{line}"
        );
    }
    assert!(
        report.contains("random (") && report.contains("ok ("),
        "{report}"
    );
    assert!(report.contains("fio-6.12.ubt"), "{report}");
    assert!(
        report
            .trim_end()
            .lines()
            .last()
            .unwrap()
            .starts_with("all passed"),
        "{report}"
    );
}

#[test]
fn check_uri_against_nbdkit_memory() {
    let Some(nbdkit) = tool("nbdkit") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbdkit.sock");
    let _server = serve(
        Command::new(nbdkit)
            .args(["-f", "-U"])
            .arg(&sock)
            .args(["memory", "64M"]),
        &sock,
    );
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let out = check(&[&uri, "--runs", "5"]);
    let report = String::from_utf8_lossy(&out.stdout);
    println!("{report}");
    let ok = passed(&report);
    println!("passed against nbdkit memory: {ok:?}");
    // nbdkit 1.x passes everything that can run: out_of_range_rejected too, since it
    // advertises no block sizes (so misaligned and over-32-MiB requests are valid there and not
    // checked). A failure here would be nbdkit's or the case's: read the report above.
    for name in CORE {
        assert!(
            ok.contains(&name),
            "{name} did not pass against nbdkit:\n{report}"
        );
    }
    assert_eq!(
        out.status.code(),
        Some(if report.contains("FAILED") { 1 } else { 0 })
    );
}

#[test]
fn check_bad_or_unreachable_uri_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let uri = format!(
        "nbd+unix:///?socket={}",
        dir.path().join("none.sock").display()
    );
    let out = check(&[&uri]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot connect to"), "{stderr}");
    let out = check(&["nbd://"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("bad NBD URI"), "{stderr}");
    // Neither a device nor a URI: the message names both forms.
    let out = check(&["nbdx://host/x"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("or an NBD URI"), "{stderr}");
}
