//! Remote-disk benchmark: the example remote disk (`examples/remote_disk`, storage behind a Unix
//! socket, each request waiting an injected latency) served through the loopback fake kernel
//! behind the two traits, in the same process:
//! - `sync`: the device behind the synchronous trait (`AsyncDevice::blocking`, each call
//!   blocking a server thread), with the default `ServerOptions` (its `workers` threads per
//!   connection);
//! - `async`: the same device as an `AsyncDevice`, its requests run as tasks on the tokio
//!   runtime.
//!
//! Workload: 4 KiB random reads at queue depth 1, 32 and 128, one connection; a single driver
//! thread keeps `qd` requests in flight with the fake kernel's `submit`/`wait`. Each cell runs
//! for a fixed time after a warm-up; the rounds alternate sync and async and the table shows the
//! median. The last line is the ratio at queue depth 128.
//!
//! ```text
//! cargo bench --bench remote                              # 1 ms latency, 3 rounds of 2 s
//! cargo bench --bench remote -- --latency-ms 5 --secs 1 --rounds 1
//! ```

#[path = "../examples/remote_disk/remote.rs"]
mod remote;

#[path = "common/random_reads.rs"]
mod random_reads;

use std::time::Duration;

use remote::{RemoteDisk, Storage, DEFAULT_LATENCY};
use userblk::{AsyncDevice, BlockDevice, LoopbackKernel, LoopbackOptions, ServerOptions};

const SIZE: u64 = 256 << 20;
const DEPTHS: [usize; 3] = [1, 32, 128];

/// xorshift offsets, 4 KiB aligned.
/// Reads per second at `qd` for `dur`.
fn drive(kernel: &LoopbackKernel, qd: usize, dur: Duration) -> f64 {
    let (done, took) = random_reads::drive(kernel, SIZE, qd, dur);
    done as f64 / took.as_secs_f64()
}

fn kernel(device: impl BlockDevice + 'static, qd: usize) -> LoopbackKernel {
    let options = LoopbackOptions {
        queue_depth: qd as u16,
        server: ServerOptions::default(),
        ..LoopbackOptions::default()
    };
    LoopbackKernel::with_options(device, options).expect("start the fake kernel")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut latency = DEFAULT_LATENCY;
    let mut secs = 2.0;
    let mut rounds = 3;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--latency-ms" => {
                latency = Duration::from_secs_f64(args.next().ok_or("value")?.parse::<f64>()? / 1e3)
            }
            "--secs" => secs = args.next().ok_or("value")?.parse()?,
            "--rounds" => rounds = args.next().ok_or("value")?.parse()?,
            "--bench" => {}
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    let dur = Duration::from_secs_f64(secs);
    let rt = tokio::runtime::Runtime::new()?;
    let storage = Storage::start(rt.handle(), SIZE, latency)?;
    let connect = || -> std::io::Result<AsyncDevice<RemoteDisk>> {
        let disk = rt.block_on(RemoteDisk::connect(storage.path(), storage.size()))?;
        Ok(AsyncDevice::with_runtime(disk, rt.handle().clone()))
    };
    println!(
        "remote disk, {:?} latency, 4 KiB random reads, sync: {} threads per connection",
        latency,
        ServerOptions::default().workers
    );
    println!("{:<18} {:>8} {:>12}", "workload", "trait", "reads/s");
    let mut ratio = 0.0;
    for qd in DEPTHS {
        let (mut sync, mut asy) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            for is_async in [false, true] {
                let dev = connect()?;
                let k = if is_async {
                    kernel(dev, qd)
                } else {
                    kernel(dev.blocking(), qd)
                };
                drive(&k, qd, Duration::from_millis(300));
                let iops = drive(&k, qd, dur);
                k.shutdown()?;
                if is_async { &mut asy } else { &mut sync }.push(iops);
            }
        }
        let (s, a) = (median(sync), median(asy));
        let name = format!("randread 4k qd{qd}");
        println!("{name:<18} {:>8} {s:>12.0}", "sync");
        println!("{name:<18} {:>8} {a:>12.0}", "async");
        ratio = a / s;
    }
    println!("async/sync at QD128: {ratio:.2}x");
    Ok(())
}
