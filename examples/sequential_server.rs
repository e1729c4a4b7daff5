//! The baseline of the benchmarks on a real NBD device: a RAM disk served by the vblk/buse-go
//! shaped one-request-at-a-time server (`benches/common/sequential.rs`) instead of
//! [`userblk::Server`], so that `vm/bench.sh` can measure both against the same kernel.
//! Runs until SIGINT or SIGTERM (which disconnect the device) or `nbd-client -d`.
//!
//! ```text
//! sudo modprobe nbd
//! sudo cargo run --release --example sequential_server -- /dev/nbd0 256   # MiB
//! ```

#[path = "../benches/common/sequential.rs"]
mod sequential;

use std::process::ExitCode;

use nix::sys::signal::{SigSet, Signal};
use userblk::link::nbd::MountOptions;
use userblk::MemDevice;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let nbd = args.next().unwrap_or_else(|| "/dev/nbd0".into());
    let mib: u64 = match args.next().map(|s| s.parse()) {
        None => 256,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("sequential_server: size in MiB: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Blocked before any thread starts, so that every thread inherits the mask and the watcher
    // below is the one that receives them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    if let Err(e) = signals.thread_block() {
        eprintln!("sequential_server: blocking signals: {e}");
        return ExitCode::FAILURE;
    }
    let link = MountOptions::new().device(&nbd).link();
    let handle = link.handle();
    std::thread::spawn(move || {
        if signals.wait().is_ok() {
            let _ = handle.unmount();
        }
    });
    let device = MemDevice::new(mib << 20);
    println!("sequential server: {mib} MiB RAM disk on {nbd}; SIGINT or SIGTERM to stop");
    match sequential::run(&device, link) {
        Ok(()) => {
            println!("{nbd} is free");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sequential_server: {e}");
            ExitCode::FAILURE
        }
    }
}
