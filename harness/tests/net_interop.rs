//! Third-party NBD tools against userblk's network server, and the harness's client against
//! third-party servers. scripts/setup-interop.sh installs the tools (libnbd-bin, nbdkit,
//! qemu-utils, fio); a test whose tool is missing says so on stderr ("SKIPPED: ...") and passes.
//! Everything listens on Unix sockets in temporary directories or on 127.0.0.1; every external
//! command runs under a time limit.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use userblk::link::net::{ListenAddr, Listening, NetOptions};
use userblk::{BlockDevice, FileDevice, MemDevice};
use userblk_harness::conformance::{self, Outcome, Report};
use userblk_harness::net_rig::{ExternalRig, NbdClient, NbdUri};

/// The path of `name` on PATH, or `None` after saying the test is skipped.
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

/// Runs a command to its end, killed after 120 s; panics with its output if it fails.
fn run(cmd: &mut Command) -> Output {
    let out = run_status(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn run_status(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{cmd:?} still running after 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A device served on a Unix socket in its own directory.
struct Served {
    listening: Option<Listening>,
    uri: String,
    _dir: tempfile::TempDir,
}

impl Served {
    fn new(dev: impl BlockDevice + 'static) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let listening = NetOptions::new()
            .on_event(|_| {})
            .spawn(dev, &ListenAddr::Unix(sock.clone()))
            .unwrap();
        Served {
            listening: Some(listening),
            uri: format!("nbd+unix:///?socket={}", sock.display()),
            _dir: dir,
        }
    }

    fn client(&self) -> NbdClient {
        NbdClient::connect(&self.uri.parse::<NbdUri>().unwrap()).unwrap()
    }

    fn stats(&self) -> userblk::link::net::NetStats {
        self.listening.as_ref().unwrap().handle().stats()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(l) = self.listening.take() {
            l.stop().unwrap();
        }
    }
}

fn random_file(path: &Path, len: usize, seed: u64) {
    let mut x = seed | 1;
    let mut data = vec![0u8; len];
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = chunk.len();
        chunk.copy_from_slice(&x.to_le_bytes()[..n]);
    }
    // A hole in the middle, so that copies see zeroes too.
    data[len / 4..len / 2].fill(0);
    std::fs::write(path, data).unwrap();
}

#[test]
fn nbdinfo_size_flags_and_map_after_trim_and_zeroes() {
    let Some(nbdinfo) = tool("nbdinfo") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let dev = FileDevice::create(dir.path().join("disk.img"), 16 << 20).unwrap();
    let served = Served::new(dev);
    let info = text(&run(Command::new(&nbdinfo).arg(&served.uri)));
    for want in [
        "export-size: 16777216",
        "can_flush: true",
        "can_trim: true",
        "can_zero: true",
        "can_fast_zero: true",
        "can_multi_conn: true",
        "is_read_only: false",
        "block_size_minimum: 512",
        "using structured packets",
    ] {
        assert!(info.contains(want), "{want:?} not in:\n{info}");
    }
    let c = served.client();
    c.write(0, &vec![0x11; 4 << 20], false).unwrap();
    c.trim(1 << 20, 1 << 20).unwrap();
    c.write_zeroes(2 << 20, 1 << 20, false).unwrap();
    c.flush().unwrap();
    drop(c);
    let map = text(&run(Command::new(&nbdinfo).arg("--map").arg(&served.uri)));
    let rows: Vec<(u64, u64, String)> = map
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[3].to_string(),
            )
        })
        .collect();
    if rows.len() == 1 {
        eprintln!("SKIPPED (map): this file system reports no holes:\n{map}");
        return;
    }
    let m = 1u64 << 20;
    assert_eq!(
        rows,
        [
            (0, m, "data".to_string()),
            (m, 2 * m, "hole,zero".to_string()),
            (3 * m, m, "data".to_string()),
            (4 * m, 12 * m, "hole,zero".to_string()),
        ],
        "{map}"
    );
}

#[test]
fn nbdcopy_both_ways_with_four_connections() {
    let Some(nbdcopy) = tool("nbdcopy") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let back = dir.path().join("back.img");
    random_file(&src, 32 << 20, 7);
    let served = Served::new(Arc::new(MemDevice::new(32 << 20)));
    run(Command::new(&nbdcopy)
        .args(["--connections=4", "--threads=4"])
        .arg(&src)
        .arg(&served.uri));
    // Several connections were used: the server advertised multi-conn.
    assert!(served.stats().served >= 4, "{:?}", served.stats());
    run(Command::new(&nbdcopy)
        .args(["--connections=4", "--threads=4"])
        .arg(&served.uri)
        .arg(&back));
    assert!(
        std::fs::read(&src).unwrap() == std::fs::read(&back).unwrap(),
        "the copy back differs"
    );
}

#[test]
fn qemu_img_convert_and_compare() {
    let Some(qemu_img) = tool("qemu-img") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    random_file(&src, 16 << 20, 11);
    let served = Served::new(Arc::new(MemDevice::new(16 << 20)));
    run(Command::new(&qemu_img)
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&served.uri));
    run(Command::new(&qemu_img)
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&served.uri));
    // One changed block is found: the comparison really reads the export.
    served.client().write(8 << 20, &[0xff; 512], false).unwrap();
    let out = run_status(
        Command::new(&qemu_img)
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&served.uri),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
}

#[test]
fn qemu_io_write_read_pattern_discard_zero_flush() {
    let Some(qemu_io) = tool("qemu-io") else {
        return;
    };
    let served = Served::new(Arc::new(MemDevice::new(16 << 20)));
    let out = run(Command::new(&qemu_io).args([
        "-f",
        "raw",
        "-c",
        "write -P 0xab 0 1M",
        "-c",
        "write -P 0xcd 1M 64k",
        "-c",
        "read -P 0xab 0 1M",
        "-c",
        "read -P 0xcd 1M 64k",
        "-c",
        "discard 0 64k",
        "-c",
        "write -z 64k 64k",
        "-c",
        "read -P 0 64k 64k",
        "-c",
        "flush",
        &served.uri,
    ]));
    let out = text(&out);
    assert!(!out.contains("failed"), "{out}");
    assert_eq!(out.matches("read ").count(), 3, "{out}");
    // What qemu-io wrote is what the device holds.
    let c = served.client();
    assert_eq!(c.read(1 << 20, 65536).unwrap(), vec![0xcd; 65536]);
    assert_eq!(c.read(65536, 65536).unwrap(), vec![0; 65536]);
}

#[test]
fn fio_nbd_engine_with_crc32c_verify() {
    let Some(fio) = tool("fio") else {
        return;
    };
    let served = Served::new(Arc::new(MemDevice::new(16 << 20)));
    let out = run(Command::new(&fio).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", served.uri),
        "--rw=randwrite",
        "--bs=4k",
        "--size=16M",
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        // No verify-state file left in the working directory.
        "--verify_state_save=0",
        "--output-format=terse",
    ]));
    let terse = text(&out);
    // Terse format: field 5 is the error code.
    let err = terse.split(';').nth(4).unwrap_or("?");
    assert_eq!(err, "0", "{terse}");
}

/// Cases every server must pass whatever its disk: they check what they read against what they
/// wrote, and that requests past the end fail (out_of_range_rejected holds a server the harness
/// does not run to what the protocol requires, and notes where it departs from what the
/// protocol recommends). (flush_and_fua, device_errors_reach_caller, read_only_rejected and
/// unmount_once look at the device the case made, which an external server never sees.)
const CORE_CASES: [&str; 7] = [
    "read_after_write",
    "overlapping_writes",
    "adjacent_writes",
    "request_sizes",
    "in_flight_disjoint",
    "in_flight_overlapping",
    "out_of_range_rejected",
];

fn conformance_against(uri: &str) -> Report {
    conformance_against_except(uri, &[])
}

/// [`conformance_against`], not requiring the `excused` cases to pass (their outcome is
/// printed with the report).
fn conformance_against_except(uri: &str, excused: &[&str]) -> Report {
    let rig = ExternalRig::new(uri).unwrap();
    // The device is not used by an external server; the factory only gives the capabilities
    // the cases expect: what the server advertises.
    let probe = NbdClient::connect(rig.uri()).unwrap();
    let caps = probe.info().capabilities();
    drop(probe);
    let factory = || Box::new(MemDevice::new(64 << 20)) as Box<dyn BlockDevice>;
    let report = conformance::run_all(&rig, &factory, caps);
    println!("{report}");
    for name in CORE_CASES.iter().filter(|n| !excused.contains(n)) {
        let c = report.case(name).unwrap();
        assert_eq!(c.outcome, Outcome::Pass, "{name} against {uri}:\n{report}");
    }
    report
}

/// A server process, killed on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn client_rig_against_nbdkit_memory() {
    let Some(nbdkit) = tool("nbdkit") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbdkit.sock");
    let _server = Process(
        Command::new(nbdkit)
            .args(["-f", "-U"])
            .arg(&sock)
            .args(["memory", "size=64M"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_socket(&sock);
    conformance_against(&format!("nbd+unix:///?socket={}", sock.display()));
}

#[test]
fn client_rig_against_qemu_nbd() {
    let Some(qemu_nbd) = tool("qemu-nbd") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let sock = dir.path().join("qemu.sock");
    let _server = Process(
        Command::new(qemu_nbd)
            .args(["-f", "raw", "-t", "--shared=16", "--cache=writeback", "-k"])
            .arg(&sock)
            .arg(&img)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_socket(&sock);
    // Excused: under load, qemu-nbd has returned a read torn inside one 512-byte block while
    // writes to that block were in flight (about 1 run in 5). Its raw driver does buffered
    // pread/pwrite from a thread pool, and the page cache does not make a buffered read atomic
    // against a racing buffered write, so a reader can see part of each. Not confirmed; the
    // other core cases must pass.
    let report = conformance_against_except(
        &format!("nbd+unix:///?socket={}", sock.display()),
        &["in_flight_overlapping"],
    );
    // qemu-nbd answers EINVAL to writes past the end (the protocol: SHOULD ENOSPC) and serves a
    // zero-length read: within the protocol, and noted.
    let notes = &report.case("out_of_range_rejected").unwrap().notes;
    assert!(
        notes.iter().any(|n| n.contains("not what it recommends")),
        "{notes:?}"
    );
}

#[test]
fn client_rig_against_userblk_serve_listen_and_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("userblk.sock");
    // Killed on drop if an assertion fails first; else it ends on SIGTERM below.
    let mut guard = Process(
        Command::new(env!("CARGO_BIN_EXE_userblk"))
            .args(["serve", "ram:64M", "--listen"])
            .arg(format!("unix:{}", sock.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let server = &mut guard.0;
    wait_for_socket(&sock);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let report = conformance_against(&uri);
    // A server's own disk can't fail on purpose nor turn read-only: those cases, and the
    // flush and unmount counts, are about the device the case made, which an external server
    // never sees: they skip. Nothing fails.
    let device_specific = [
        "flush_and_fua",
        "device_errors_reach_caller",
        "read_only_rejected",
        "unmount_once",
    ];
    for c in &report.cases {
        assert!(
            !matches!(c.outcome, Outcome::Fail(_)),
            "{}: {:?}",
            c.name,
            c.outcome
        );
        if device_specific.contains(&c.name) {
            assert!(
                matches!(c.outcome, Outcome::Skip(_)),
                "{}: {:?}",
                c.name,
                c.outcome
            );
        }
    }
    // SIGTERM with a client connected: it stops cleanly, exit status 0.
    let c = NbdClient::connect(&uri.parse().unwrap()).unwrap();
    c.write(0, &[9; 4096], false).unwrap();
    run(Command::new("kill")
        .arg("-TERM")
        .arg(server.id().to_string()));
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = server.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "userblk serve ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    if let Some(mut o) = server.stdout.take() {
        use std::io::Read as _;
        o.read_to_string(&mut stdout).unwrap();
    }
    assert!(status.success(), "{status}");
    assert!(stdout.contains("stopped on SIGTERM"), "{stdout}");
    assert!(!sock.exists(), "the socket file is left behind");
    drop(c);
    let _ = std::io::stdout().flush();
}

#[test]
fn nbdinfo_map_of_a_sparse_mem_device() {
    let Some(nbdinfo) = tool("nbdinfo") else {
        return;
    };
    let dev = Arc::new(MemDevice::new(4 << 20));
    dev.write(1 << 20, &vec![5; 128 << 10]).unwrap();
    let served = Served::new(Arc::clone(&dev));
    let map = text(&run(Command::new(&nbdinfo).arg("--map").arg(&served.uri)));
    let rows: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let want = [
        ["0", "1048576", "3", "hole,zero"],
        ["1048576", "131072", "0", "data"],
        ["1179648", "3014656", "3", "hole,zero"],
    ];
    assert_eq!(rows, want, "{map}");
    // Zeroing the data frees it: one hole again.
    served
        .client()
        .write_zeroes(1 << 20, 128 << 10, false)
        .unwrap();
    let map = text(&run(Command::new(&nbdinfo).arg("--map").arg(&served.uri)));
    assert_eq!(map.lines().count(), 1, "{map}");
}
