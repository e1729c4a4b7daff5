//! Async never-blocks benchmark: `MemDevice` behind the async trait (its futures are always
//! ready at their first poll, and it says `never_blocks`) served through the loopback fake
//! kernel, three ways in the same process, interleaved round by round:
//! - `spawn`: every request a task on the tokio runtime (`batch_never_blocks: false`);
//! - `inline`: the default for a never-blocks async device: the connection's reader polls each
//!   request's future itself and spawns a task only for one that is not ready;
//! - `sync`: the same `MemDevice` as a sync device (default options), for reference.
//!
//! The ratios are inline/spawn.
//!
//! Workload: 4 KiB random reads at queue depth 1, 32 and 128, one connection, a single driver
//! thread keeping `qd` requests in flight with the fake kernel's `submit`/`wait`. Each cell runs
//! for a fixed time after a warm-up; the table shows the median over the rounds of reads/s and of
//! the server's CPU microseconds per read (its connection, reply and tokio worker threads, from
//! `/proc/self/task/*/schedstat`: less sensitive to other load on the machine than reads/s).
//! The ratios are inline/spawn.
//!
//! ```text
//! cargo bench --bench async_mem                     # 3 rounds of 1 s
//! cargo bench --bench async_mem -- --secs 2 --rounds 5
//! ```

#[path = "common/random_reads.rs"]
mod random_reads;

use std::time::Duration;

use userblk::{
    AsyncDevice, BlockDevice, LoopbackKernel, LoopbackOptions, MemDevice, ServerOptions,
};

const SIZE: u64 = 256 << 20;
const DEPTHS: [usize; 3] = [1, 32, 128];

/// xorshift offsets, 4 KiB aligned.
/// CPU time consumed so far by the server's threads (userblk's connection and reply threads,
/// and the tokio workers the async device's tasks run on), in nanoseconds.
fn server_cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    let mut ns = 0;
    for task in tasks.flatten() {
        let path = task.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if ["userblk-conn", "userblk-reply", "tokio-runtime-w"]
            .iter()
            .any(|p| comm.starts_with(p))
        {
            ns += std::fs::read_to_string(path.join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    ns
}

/// Reads per second at `qd` for `dur`, and the server's CPU microseconds per read.
fn drive(kernel: &LoopbackKernel, qd: usize, dur: Duration) -> (f64, f64) {
    let cpu = server_cpu_ns();
    let (done, took) = random_reads::drive(kernel, SIZE, qd, dur);
    let cpu_us = server_cpu_ns().saturating_sub(cpu) as f64 / 1e3 / done as f64;
    (done as f64 / took.as_secs_f64(), cpu_us)
}

fn kernel(device: impl BlockDevice + 'static, qd: usize, batch: bool) -> LoopbackKernel {
    let options = LoopbackOptions {
        queue_depth: qd as u16,
        server: ServerOptions {
            batch_never_blocks: batch,
            ..ServerOptions::default()
        },
        ..LoopbackOptions::default()
    };
    LoopbackKernel::with_options(device, options).expect("start the fake kernel")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut secs = 1.0;
    let mut rounds = 3;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--secs" => secs = args.next().ok_or("value")?.parse()?,
            "--rounds" => rounds = args.next().ok_or("value")?.parse()?,
            "--bench" => {}
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    let dur = Duration::from_secs_f64(secs);
    let rt = tokio::runtime::Runtime::new()?;
    println!("MemDevice behind the async trait, 4 KiB random reads, one connection");
    println!(
        "{:<18} {:>8} {:>8} {:>8} {:>7} {:>8} {:>8} {:>8} {:>7}",
        "workload",
        "spawn/s",
        "inline/s",
        "sync/s",
        "ratio",
        "spawn_us",
        "inl_us",
        "sync_us",
        "ratio"
    );
    for qd in DEPTHS {
        let mut cells: [Vec<f64>; 3] = Default::default();
        let mut cpu: [Vec<f64>; 3] = Default::default();
        for _ in 0..rounds {
            for i in 0..3 {
                let k = match i {
                    0 | 1 => {
                        let dev =
                            AsyncDevice::with_runtime(MemDevice::new(SIZE), rt.handle().clone());
                        kernel(dev, qd, i == 1)
                    }
                    _ => kernel(MemDevice::new(SIZE), qd, true),
                };
                drive(&k, qd, Duration::from_millis(300));
                let (iops, us) = drive(&k, qd, dur);
                cells[i].push(iops);
                cpu[i].push(us);
                k.shutdown()?;
            }
        }
        let [s, i, y] = cells.map(median);
        let [sc, ic, yc] = cpu.map(median);
        let name = format!("randread 4k qd{qd}");
        println!(
            "{name:<18} {s:>8.0} {i:>8.0} {y:>8.0} {:>6.2}x {sc:>8.2} {ic:>8.2} {yc:>8.2} {:>6.2}x",
            i / s,
            ic / sc
        );
    }
    Ok(())
}
