//! The smallest complete userblk program: a RAM disk served through the loopback fake kernel,
//! exactly as `/dev/nbd0` would serve it, with no root and no kernel module.
//!
//! `cargo run --example quickstart`

use userblk::{LoopbackKernel, MemDevice};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let kernel = LoopbackKernel::start(MemDevice::new(64 << 20))?;
    println!(
        "serving a {} MiB RAM disk, advertised flags {:#06x}",
        kernel.size() >> 20,
        kernel.export().flags.0
    );

    let data: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    kernel.write(4 << 20, &data)?; // one 1 MiB WRITE: Linux 6.12 sends up to 1,280 KiB at once
    kernel.flush()?;
    assert_eq!(kernel.read(4 << 20, data.len())?, data);
    kernel.trim(4 << 20, 65536)?;
    assert!(kernel.read(4 << 20, 65536)?.iter().all(|&b| b == 0));

    // Requests the kernel never sends, answered as the protocol asks, not passed to the device:
    let past_end = kernel.read(kernel.size(), 512).unwrap_err();
    println!("read past the end: {past_end}");

    let stats = kernel.stats();
    kernel.shutdown()?;
    println!(
        "{} requests, {} replies, at most {} in flight; disconnected cleanly",
        stats.requests, stats.replies, stats.max_in_flight
    );
    Ok(())
}
