//! A RAM disk on a real NBD device with the server's tuning exposed, for `vm/bench.sh` to
//! measure how connections and worker threads move throughput (its `ramdisk-wW-cC` targets).
//! Runs until SIGINT or SIGTERM, which disconnect the device.
//!
//! ```text
//! sudo modprobe nbd
//! sudo cargo run --release --example bench_ramdisk -- /dev/nbd4 256 --connections 2 --workers 0
//! ```

use std::process::ExitCode;

use userblk::link::nbd::MountOptions;
use userblk::{MemDevice, ServerOptions};

fn main() -> ExitCode {
    let usage =
        "usage: bench_ramdisk /dev/nbdN MIB [--connections N] [--workers N] [--in-flight-mib N]";
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(nbd), Some(mib)) = (
        args.first(),
        args.get(1).and_then(|s| s.parse::<u64>().ok()),
    ) else {
        eprintln!("{usage}");
        return ExitCode::from(2);
    };
    let mut connections = 1usize;
    let mut options = ServerOptions::default();
    let mut rest = args[2..].iter();
    while let Some(flag) = rest.next() {
        let Some(n) = rest.next().and_then(|v| v.parse::<usize>().ok()) else {
            eprintln!("{usage}");
            return ExitCode::from(2);
        };
        match flag.as_str() {
            "--connections" => connections = n,
            "--workers" => options.workers = n,
            "--in-flight-mib" => options.max_in_flight_bytes = n << 20,
            _ => {
                eprintln!("{usage}");
                return ExitCode::from(2);
            }
        }
    }
    let served = MountOptions::new()
        .device(nbd)
        .connections(connections)
        .server_options(options)
        .unmount_on_signals(true)
        .mount(MemDevice::new(mib << 20), |h| {
            println!(
                "bench_ramdisk: {mib} MiB on {} ({connections} connections, {options:?})",
                h.device().display()
            );
        });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_ramdisk: {e}");
            ExitCode::FAILURE
        }
    }
}
