//! The concurrent random test on the ready-made devices, with its defaults: they pass, through
//! the two-connection loopback rig, with the storage re-opened after each run where the factory
//! can; and its failures name what went wrong.

use std::sync::Arc;
use std::time::Instant;

use userblk::{BlockDevice, FileDevice, MemDevice};
use userblk_harness::factory::{DeviceFactory, Reopen};
use userblk_harness::random::{loopback_rig, random_test, Mode, RandomConfig};

const SIZE: u64 = 64 << 20;

fn passes(name: &str, factory: &dyn DeviceFactory, config: &RandomConfig) -> u32 {
    let caps = factory.create().unwrap().capabilities();
    let t = Instant::now();
    let r = random_test(&loopback_rig(), factory, caps, config, &mut |_| {});
    println!("{name}: {:.2} s: {r:?}", t.elapsed().as_secs_f64());
    match r {
        Ok(s) => {
            assert_eq!(s.runs, config.runs);
            s.reopened
        }
        Err(f) => panic!("{name}: {f}"),
    }
}

/// RAM that outlives the device: re-opening serves the same memory.
fn ram(block_size: u32) -> impl DeviceFactory {
    Reopen::new(
        move || Ok(Arc::new(MemDevice::with_block_size(SIZE, block_size))),
        |m: &Arc<MemDevice>| Ok(Arc::clone(m)),
    )
}

#[test]
fn mem_device_passes_the_default_concurrent_test_with_reopening() {
    let config = RandomConfig::default();
    assert_eq!(config.mode, Mode::Concurrent { threads: 4 });
    assert!(config.jitter.is_some());
    assert_eq!(passes("ram 512", &ram(512), &config), config.runs);
}

#[test]
fn mem_device_with_4k_blocks_passes_the_default_concurrent_test() {
    let config = RandomConfig::default();
    assert_eq!(passes("ram 4096", &ram(4096), &config), config.runs);
}

#[test]
fn file_device_passes_the_concurrent_test_with_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    FileDevice::create(&path, SIZE).unwrap();
    // The same file each time: runs start on what earlier runs left, which the checker must
    // take as initial content, never as this run's data.
    let factory = Reopen::new(move || Ok(path.clone()), |p: &std::path::PathBuf| FileDevice::open(p));
    let config = RandomConfig {
        runs: 6,
        ..RandomConfig::default()
    };
    assert_eq!(passes("file", &factory, &config), 6);
}

#[test]
fn sequential_mode_still_passes_on_a_plain_factory() {
    let factory = || Box::new(MemDevice::new(SIZE)) as Box<dyn BlockDevice>;
    let config = RandomConfig {
        mode: Mode::Sequential,
        runs: 5,
        ops: 150,
        ..RandomConfig::default()
    };
    // No re-openable storage: nothing re-opened, and that is not a failure.
    assert_eq!(passes("sequential", &factory, &config), 0);
}
