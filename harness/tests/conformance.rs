//! The conformance suite and the random tests against the ready-made devices, through the
//! loopback fake kernel: what a driver author's own test file looks like. Then the suite's own
//! honesty: cases that cannot run are reported, server checks fail against a server that does
//! not check, and the concurrent cases fail on data from before the writes.

use std::io::{self, Read, Write};

use userblk::link::loopback::{KernelProfile, LoopbackLink};
use userblk::proto::{Command, CommandFlags, Errno, Reply, Request, MAX_IO_LEN, REQUEST_LEN};
use userblk::server::{export_of, validate};
use userblk::{BlockDevice, Capabilities, FileDevice, KernelLink, LoopbackKernel, LoopbackOptions};
use userblk::{MemDevice, ServerError};
use userblk_harness::conformance::{self, CaseKind, Env, Outcome, Report};
use userblk_harness::factory::{self, DeviceFactory, Reopen};
use userblk_harness::random::{random_test, RandomConfig};
use userblk_harness::script::Script;
use userblk_harness::target::{Attached, LoopbackRig, OpError, Rig, Target};

const SIZE: u64 = 64 << 20;

fn suite(factory: &dyn DeviceFactory) {
    let caps = factory.create().unwrap().capabilities();
    let rig = LoopbackRig::default();
    let env = Env::new(&rig, factory, caps);
    let report = conformance::run_cases(&env, &conformance::cases(), &mut |_, c| {
        eprintln!("case {}", c.name)
    });
    println!("{report}");
    assert!(report.all_passed(), "{report}");
}

// Re-openable factories: the durability cases disconnect and open the same storage again.

#[test]
fn mem_device_conforms() {
    suite(&factory::mem(SIZE));
}

/// The suite, then concurrent random runs, as each kernel the fake kernel plays (NBD on 6.1 and
/// 6.12, ublk on 6.12): their request sizes, queue depths and commands.
#[test]
fn every_kernel_profile_conforms_and_passes_random_runs() {
    let factory = factory::mem_with_block_size(SIZE, 4096);
    let caps = factory.create().unwrap().capabilities();
    for &profile in KernelProfile::all() {
        let rig = LoopbackRig {
            options: LoopbackOptions::for_profile(profile),
        };
        let env = Env::new(&rig, &factory, caps);
        let report = conformance::run_cases(&env, &conformance::cases(), &mut |_, _| {});
        assert!(report.all_passed(), "{profile}: {report}");
        let config = RandomConfig {
            runs: 3,
            ..RandomConfig::default()
        };
        if let Err(f) = random_test(&rig, &factory, caps, &config, &mut |_| {}) {
            panic!("{profile}: {f}");
        }
    }
}

#[test]
fn mem_device_with_4k_blocks_conforms() {
    suite(&factory::mem_with_block_size(SIZE, 4096));
}

#[test]
fn file_device_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    FileDevice::create(&path, SIZE).unwrap();
    suite(&Reopen::new(
        move || Ok(path.clone()),
        |path: &std::path::PathBuf| FileDevice::open(path),
    ));
}

#[test]
fn big_requests_and_several_connections() {
    // One 32 MiB request at a time (no splitting), over four connections.
    let rig = LoopbackRig {
        options: LoopbackOptions {
            connections: 4,
            max_request: userblk::proto::MAX_IO_LEN,
            ..LoopbackOptions::default()
        },
    };
    let factory = || Box::new(MemDevice::new(SIZE)) as Box<dyn BlockDevice>;
    let env = Env::new(&rig, &factory, factory().capabilities());
    let cases: Vec<_> = conformance::cases()
        .into_iter()
        .filter(|c| conformance::LARGE_REQUEST_CASES.contains(&c.name))
        .collect();
    let report = conformance::run_cases(&env, &cases, &mut |_, _| {});
    assert!(report.all_passed(), "{report}");
}

#[test]
fn random_sequences_pass_on_mem_and_file_devices() {
    let config = RandomConfig {
        seed: 20,
        runs: 6,
        ops: 150,
        ..RandomConfig::default()
    };
    let rig = LoopbackRig::default();
    let mem = || Box::new(MemDevice::new(SIZE)) as Box<dyn BlockDevice>;
    let r = random_test(&rig, &mem, mem().capabilities(), &config, &mut |_| {});
    assert!(r.is_ok(), "{}", r.unwrap_err());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    FileDevice::create(&path, SIZE).unwrap();
    let file = move || Box::new(FileDevice::open(&path).unwrap()) as Box<dyn BlockDevice>;
    let r = random_test(&rig, &file, file().capabilities(), &config, &mut |_| {});
    assert!(r.is_ok(), "{}", r.unwrap_err());
}

/// The example scripts in tests/scripts replay against a fresh 64 MiB MemDevice.
#[test]
fn shipped_scripts_pass() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "script") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let script = Script::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if let Err(e) = script.replay(MemDevice::new(SIZE)) {
            panic!("{}: {e}", path.display());
        }
        n += 1;
    }
    assert!(n >= 4, "only {n} scripts found in {}", dir.display());
}

#[test]
fn mem_device_of_4_tib_conforms() {
    // Sparse: the whole suite, huge_offsets up to 2 TiB + X included, costs what it writes.
    suite(&factory::mem(4 << 40));
}

#[test]
fn cases_that_cannot_run_are_reported_and_not_passes() {
    let factory = || Box::new(MemDevice::new(256 << 10)) as Box<dyn BlockDevice>;
    let report = conformance::run_all(&LoopbackRig::default(), &factory, factory().capabilities());
    println!("{report}");
    let not_run: Vec<&str> = report.not_run().map(|c| c.name).collect();
    for name in [
        "adjacent_writes",
        "in_flight_disjoint",
        "in_flight_overlapping",
    ] {
        assert!(
            not_run.contains(&name),
            "{name} should not have run\n{report}"
        );
    }
    // The cases that fit in 256 KiB ran and passed.
    for name in ["read_after_write", "huge_offsets", "out_of_range_rejected"] {
        assert_eq!(
            report.case(name).unwrap().outcome,
            Outcome::Pass,
            "{report}"
        );
    }
    assert_eq!(report.counts().failed, 0);
    assert!(
        !report.all_passed(),
        "cases that did not run must not count as passed"
    );
    assert!(!report.all_passed_except(&not_run[1..]), "one not excused");
    assert!(report.all_passed_except(&not_run));
    assert!(
        report
            .to_string()
            .contains("NOT RUN  driver  in_flight_disjoint"),
        "{report}"
    );
}

#[test]
fn a_failure_is_never_excused() {
    let mut report = Report::default();
    report.cases.push(conformance::CaseReport {
        name: "huge_offsets",
        kind: CaseKind::Driver,
        outcome: Outcome::Fail("lost write: ...".into()),
        elapsed: Default::default(),
        notes: Vec::new(),
    });
    assert!(!report.all_passed_except(&["huge_offsets"]));
}

fn server_checks() -> Vec<conformance::Case> {
    let cases: Vec<_> = conformance::cases()
        .into_iter()
        .filter(|c| c.kind == CaseKind::Server)
        .collect();
    let names: Vec<_> = cases.iter().map(|c| c.name).collect();
    assert_eq!(names, ["out_of_range_rejected", "read_only_rejected"]);
    cases
}

/// How a hand-written server answers requests the device must not see.
#[derive(Clone, Copy, Debug)]
enum Checks {
    /// None: every request goes to the device, as in a server that trusts the kernel.
    None,
    /// userblk's validation, but every rejection answered EIO.
    AllEio,
}

/// A minimal NBD server with one connection: requests go to the device after `checks`.
fn hand_written_server(
    device: Box<dyn BlockDevice>,
    mut link: LoopbackLink,
    checks: Checks,
) -> Result<(), ServerError> {
    let export = export_of(&*device)?;
    let mut sock = link.start(&export)?.conns.remove(0);
    let errno = |r: io::Result<()>| match r {
        Ok(()) => None,
        Err(e) => Some(Errno(e.raw_os_error().unwrap_or(5) as u32)),
    };
    let mut header = [0u8; REQUEST_LEN];
    while sock.read_exact(&mut header).is_ok() {
        let Ok(req) = Request::parse(&header) else {
            break;
        };
        let mut payload = vec![
            0u8;
            if req.command == Command::Write {
                req.len as usize
            } else {
                0
            }
        ];
        if sock.read_exact(&mut payload).is_err() || req.command == Command::Disc {
            break;
        }
        let rejected = match checks {
            Checks::None => None,
            Checks::AllEio => validate(&req, &export, MAX_IO_LEN)
                .err()
                .map(|_| Errno::EIO),
        };
        let mut data = Vec::new();
        let failed = rejected.or_else(|| match req.command {
            Command::Read => {
                data = vec![0u8; req.len as usize];
                errno(device.read(req.offset, &mut data))
            }
            Command::Write if req.flags.contains(CommandFlags::FUA) => {
                errno(device.write_fua(req.offset, &payload))
            }
            Command::Write => errno(device.write(req.offset, &payload)),
            Command::Flush => errno(device.flush()),
            Command::Trim => errno(device.trim(req.offset, u64::from(req.len))),
            Command::WriteZeroes => errno(device.write_zeroes(
                req.offset,
                u64::from(req.len),
                !req.flags.contains(CommandFlags::NO_HOLE),
            )),
            _ => Some(Errno::EINVAL),
        });
        let sent = match failed {
            Some(e) => sock.write_all(&Reply::error(req.cookie, e).encode()),
            None => sock
                .write_all(&Reply::ok(req.cookie).encode())
                .and_then(|()| sock.write_all(&data)),
        };
        if sent.is_err() {
            break;
        }
    }
    device.unmount();
    Ok(())
}

/// Serves each device with [`hand_written_server`] behind the fake kernel.
struct HandWrittenRig(Checks);

impl Rig for HandWrittenRig {
    fn name(&self) -> String {
        format!("loopback, hand-written server ({:?} checks)", self.0)
    }
    fn attach(&self, device: Box<dyn BlockDevice>) -> Result<Box<dyn Attached>, OpError> {
        let export = export_of(&*device).map_err(|e| OpError {
            errno: None,
            message: e.to_string(),
        })?;
        let checks = self.0;
        let kernel =
            LoopbackKernel::with_server(export, LoopbackOptions::default(), move |link| {
                hand_written_server(device, link, checks)
            })?;
        Ok(Box::new(kernel))
    }
}

fn run_on(rig: &dyn Rig, cases: &[conformance::Case]) -> Report {
    let factory = || Box::new(MemDevice::new(SIZE)) as Box<dyn BlockDevice>;
    let env = Env::new(rig, &factory, factory().capabilities());
    let report = conformance::run_cases(&env, cases, &mut |_, _| {});
    println!("{report}");
    report
}

fn failure(report: &Report, case: &str) -> String {
    match &report.case(case).unwrap().outcome {
        Outcome::Fail(m) => m.clone(),
        other => panic!("{case} passed a server it should fail: {other:?}\n{report}"),
    }
}

#[test]
fn server_checks_fail_when_the_server_lets_requests_through() {
    let report = run_on(&HandWrittenRig(Checks::None), &server_checks());
    let msg = failure(&report, "out_of_range_rejected");
    assert!(
        msg.starts_with("requests the server must reject reached the device: "),
        "{msg}"
    );
    assert!(
        msg.contains("device called: Read at 67108352, 1024 bytes"),
        "{msg}"
    );
    assert!(
        msg.contains(
            "answer: WRITE at 67108864, 512 bytes: answered EINVAL (22), expected ENOSPC (28)"
        ),
        "{msg}"
    );
    let msg = failure(&report, "read_only_rejected");
    assert!(
        msg.starts_with("requests the server must reject reached the device: "),
        "{msg}"
    );
    assert!(
        msg.contains("device called: Write at 0, 4096 bytes"),
        "{msg}"
    );
    assert!(
        msg.contains("answer: WRITE at 0, 4096 bytes: succeeded, expected EPERM (1)"),
        "{msg}"
    );
}

#[test]
fn server_checks_fail_on_the_wrong_errno() {
    // The device is never called, but every rejection is EIO: not what the protocol asks.
    let report = run_on(&HandWrittenRig(Checks::AllEio), &server_checks());
    for case in ["out_of_range_rejected", "read_only_rejected"] {
        let msg = failure(&report, case);
        assert!(msg.starts_with("wrong answer from the server: "), "{msg}");
        assert!(!msg.contains("device called"), "{msg}");
    }
    let msg = failure(&report, "out_of_range_rejected");
    assert!(
        msg.contains("READ at 67108864, 512 bytes: answered EIO (5), expected EINVAL (22)"),
        "{msg}"
    );
    assert!(
        msg.contains("WRITE at 67108864, 512 bytes: answered EIO (5), expected ENOSPC (28)"),
        "{msg}"
    );
}

/// A loopback target with no raw path, as through a real kernel: the block layer's checks
/// refuse the requests before the server sees them.
struct NoRaw(LoopbackKernel);

impl Target for NoRaw {
    fn size(&self) -> u64 {
        Target::size(&self.0)
    }
    fn block_size(&self) -> u32 {
        Target::block_size(&self.0)
    }
    fn flags(&self) -> userblk::proto::TransmissionFlags {
        Target::flags(&self.0)
    }
    fn sees_device_errno(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, OpError> {
        Target::read(&self.0, offset, len)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), OpError> {
        Target::write(&self.0, offset, data)
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> Result<(), OpError> {
        Target::write_fua(&self.0, offset, data)
    }
    fn flush(&self) -> Result<(), OpError> {
        Target::flush(&self.0)
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), OpError> {
        Target::trim(&self.0, offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> Result<(), OpError> {
        Target::write_zeroes(&self.0, offset, len, no_hole)
    }
}

impl Attached for NoRaw {
    fn detach(self: Box<Self>) -> Result<(), OpError> {
        Ok(self.0.shutdown()?)
    }
}

struct NoRawRig;

impl Rig for NoRawRig {
    fn name(&self) -> String {
        "loopback without a raw path".into()
    }
    fn attach(&self, device: Box<dyn BlockDevice>) -> Result<Box<dyn Attached>, OpError> {
        Ok(Box::new(NoRaw(LoopbackKernel::with_options(
            device,
            LoopbackOptions::default(),
        )?)))
    }
}

#[test]
fn server_checks_without_a_raw_path_check_the_kernel_and_say_so() {
    let report = run_on(&NoRawRig, &server_checks());
    assert!(report.all_passed(), "{report}");
    for case in ["out_of_range_rejected", "read_only_rejected"] {
        let notes = &report.case(case).unwrap().notes;
        assert!(
            notes
                .iter()
                .any(|n| n.starts_with("checked through the kernel")),
            "{notes:?}"
        );
    }
    assert!(
        report
            .to_string()
            .contains("note: checked through the kernel"),
        "{report}"
    );
    // Through the raw path there is no such note.
    let report = run_on(&LoopbackRig::default(), &server_checks());
    assert!(report.cases.iter().all(|c| c.notes.is_empty()), "{report}");
}

/// Keeps the first write to each block of its second half and acknowledges later ones
/// without storing them: once the concurrent writers of `in_flight_overlapping` are done, half
/// the range still holds the data from before their writes. (A check-level double: the final
/// check used to accept that data.)
struct KeepsFirstWriteInSecondHalf {
    mem: MemDevice,
    written: std::sync::Mutex<std::collections::HashSet<u64>>,
}

impl BlockDevice for KeepsFirstWriteInSecondHalf {
    fn blocks(&self) -> u64 {
        self.mem.blocks()
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            never_blocks: false,
            ..self.mem.capabilities()
        }
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.mem.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut written = self.written.lock().unwrap();
        for (i, block) in data.chunks(512).enumerate() {
            let o = offset + i as u64 * 512;
            // The second half of in_flight_overlapping's range: 192 KiB..320 KiB.
            let kept = !(192 << 10..320 << 10).contains(&o) || written.insert(o);
            if kept {
                self.mem.write(o, block)?;
            }
        }
        Ok(())
    }
}

#[test]
fn writes_lost_under_concurrency_fail_in_flight_overlapping() {
    let factory = || KeepsFirstWriteInSecondHalf {
        mem: MemDevice::new(SIZE),
        written: Default::default(),
    };
    // Directly: the second of two writes to the second half is acknowledged and lost.
    let dev = factory();
    dev.write(200 << 10, &[1; 512]).unwrap();
    dev.write(200 << 10, &[2; 512]).unwrap();
    let mut back = [0; 512];
    dev.read(200 << 10, &mut back).unwrap();
    assert_eq!(back, [1; 512]);

    let rig = LoopbackRig::default();
    let env = Env::new(&rig, &factory, factory().capabilities());
    let case: Vec<_> = conformance::cases()
        .into_iter()
        .filter(|c| c.name == "in_flight_overlapping")
        .collect();
    let report = conformance::run_cases(&env, &case, &mut |_, _| {});
    let msg = failure(&report, "in_flight_overlapping");
    assert!(
        msg.starts_with("lost write: after all writers completed: the block at 196608 still holds the data from before"),
        "{msg}"
    );
}
