//! The conformance suite and the random tests against the ready-made devices, through the
//! loopback fake kernel: what a driver author's own test file looks like.

use userblk::{BlockDevice, FileDevice, LoopbackOptions, MemDevice};
use userblk_harness::conformance::{self, Env};
use userblk_harness::factory::{self, DeviceFactory, Reopen};
use userblk_harness::random::{random_test, RandomConfig};
use userblk_harness::script::Script;
use userblk_harness::target::LoopbackRig;

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
        .filter(|c| {
            [
                "request_sizes",
                "in_flight_disjoint",
                "in_flight_overlapping",
            ]
            .contains(&c.name)
        })
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
