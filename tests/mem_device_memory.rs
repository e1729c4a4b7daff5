//! `MemDevice` costs only what is written: a 4 TiB disk with nothing written, and then with a
//! few blocks written at far offsets, adds a few megabytes of resident memory at most.
//!
//! One test in its own binary, so that no other test allocates while resident memory is
//! measured. It measures the change in VmRSS (the process already holds the test runner's
//! memory), not the total.

use std::fs;

use userblk::{BlockDevice, LoopbackKernel, MemDevice};

/// Resident memory of this process in bytes, from /proc/self/status.
fn rss() -> u64 {
    let status = fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmRSS in kB");
    kib << 10
}

const LIMIT: u64 = 10 << 20;

#[test]
fn four_tib_costs_only_what_is_written() {
    let before = rss();
    let dev = MemDevice::new(4 << 40);
    let empty = rss().saturating_sub(before);
    println!(
        "MemDevice::new(4 TiB), nothing written: +{} KiB RSS",
        empty >> 10
    );
    assert!(
        empty < LIMIT,
        "an empty 4 TiB MemDevice costs {empty} bytes"
    );

    let places = [
        0u64,
        (1 << 32) - 512,
        (1 << 41) + 4096,
        (3 << 40) + 12345 * 512,
        (4 << 40) - 512,
    ];
    for (i, &o) in places.iter().enumerate() {
        dev.write(o, &[i as u8 + 1; 512]).unwrap();
    }
    // Reading never-written space far away allocates nothing.
    let mut buf = vec![0xffu8; 1 << 20];
    dev.read((2 << 40) + (1 << 30), &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    drop(buf);
    for (i, &o) in places.iter().enumerate() {
        let mut back = [0u8; 512];
        dev.read(o, &mut back).unwrap();
        assert_eq!(back, [i as u8 + 1; 512], "block at {o}");
    }
    assert_eq!(dev.allocated(), 5 * (64 << 10));
    let written = rss().saturating_sub(before);
    println!(
        "after 5 blocks written at far offsets: +{} KiB RSS, {} KiB allocated",
        written >> 10,
        dev.allocated() >> 10
    );
    assert!(
        written < LIMIT,
        "5 blocks on a 4 TiB MemDevice cost {written} bytes"
    );

    // Served through the fake kernel, a request at the far end works the same.
    let kernel = LoopbackKernel::start(dev).unwrap();
    kernel.write((4 << 40) - 4096, &[9; 4096]).unwrap();
    assert_eq!(kernel.read((4 << 40) - 4096, 4096).unwrap(), vec![9; 4096]);
    kernel.shutdown().unwrap();
    let served = rss().saturating_sub(before);
    println!("after serving it: +{} KiB RSS", served >> 10);
}
