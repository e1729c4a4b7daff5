//! The device through userblk's loopback fake kernel: no root, no kernel module, every
//! `cargo test`. The conformance suite, random sequences against a model, and a regression
//! script.

use std::sync::Arc;

use blockdev_template::PageDisk;
use userblk::BlockDevice;
use userblk_harness::conformance;
use userblk_harness::factory::{DeviceFactory, Reopen};
use userblk_harness::random::{random_test, RandomConfig};
use userblk_harness::target::LoopbackRig;

/// Fresh disks, each of which can be served again after a clean disconnect: the durability
/// cases disconnect, re-open the same storage and read back what was acknowledged. (A disk kept
/// in a file or a remote store re-opens it from its path or handle instead.)
fn factory() -> impl DeviceFactory {
    Reopen::new(
        || Ok(Arc::new(PageDisk::new(64 << 20))),
        |disk: &Arc<PageDisk>| Ok(Arc::clone(disk)),
    )
}

#[test]
fn conformance_suite() {
    let report = conformance::run_all(
        &LoopbackRig::default(),
        &factory(),
        PageDisk::new(4096).capabilities(),
    );
    println!("{report}");
    assert!(report.all_passed(), "{report}");
}

#[test]
fn random_sequences() {
    let config = RandomConfig::default();
    let result = random_test(
        &LoopbackRig::default(),
        &factory(),
        PageDisk::new(4096).capabilities(),
        &config,
        &mut |_| {},
    );
    if let Err(failure) = result {
        panic!("{failure}");
    }
}

#[test]
fn a_write_across_pages_reads_back_and_trim_frees_pages() {
    let disk = PageDisk::new(1 << 20);
    let data: Vec<u8> = (0..3 * 4096).map(|i| (i % 251) as u8).collect();
    disk.write(2048, &data).unwrap();
    let mut back = vec![0; data.len()];
    disk.read(2048, &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(disk.allocated_pages(), 4);
    disk.trim(0, 1 << 20).unwrap();
    assert_eq!(disk.allocated_pages(), 0, "whole pages are freed");
    disk.read(2048, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0));
}
