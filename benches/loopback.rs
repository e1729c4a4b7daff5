//! Loopback benchmark: `MemDevice` served through `LoopbackKernel`, no root needed.
//!
//! Each workload runs against four things, in the same process, interleaved round by round:
//! - `userblk`: [`userblk::Server`] with its default options (for `MemDevice`, which never
//!   blocks: two threads per connection taking turns, replies written in batches);
//! - `userblk-inline`: the same with one thread per connection (`workers: 0`,
//!   `batch_never_blocks: false`) that reads, calls the device and writes replies in batches,
//!   device calls never overlapping;
//! - `sequential`: the vblk/buse-go-shaped baseline in `common/sequential.rs`, behind the very
//!   same fake kernel (so the kernel side costs the same for both);
//! - `memcpy`: a plain copy of the same bytes at the same offsets, the ceiling.
//!
//! Workloads: 4 KiB random reads and writes at queue depth 1, 32 and 128, and 1 MiB sequential
//! reads and writes at queue depth 8. A single driver thread keeps `qd` requests in flight with
//! the fake kernel's `submit`/`wait` tickets. Each measurement runs for a fixed duration after a
//! warm-up; the table shows the median over the rounds, and the ratios are of those medians.
//! `srv_cpu_us` and `kern_cpu_us` are CPU microseconds per request spent by the server's threads
//! and by everything else (fake kernel and driver; for memcpy, the copying thread), read from
//! `/proc/self/task/*/schedstat`: less sensitive to other load on the machine than req/s.
//!
//! ```text
//! cargo bench --bench loopback                      # 3 rounds of 1 s per cell
//! cargo bench --bench loopback -- --secs 1 --rounds 5 --filter 4k
//! cargo bench --bench loopback -- --only userblk --workers 2   # one server, for profiling
//! ```

#[path = "common/sequential.rs"]
mod sequential;

use std::collections::VecDeque;
use std::hint::black_box;
use std::time::{Duration, Instant};

use userblk::link::loopback::Op;
use userblk::server::export_of;
use userblk::{BlockDevice, LoopbackKernel, LoopbackOptions, MemDevice};

/// Device size: larger than the last-level cache, so copies come from memory as on a real disk.
const DEVICE_SIZE: u64 = 256 << 20;

#[derive(Clone, Copy, Debug)]
struct Workload {
    name: &'static str,
    write: bool,
    random: bool,
    block: u32,
    qd: usize,
}

const WORKLOADS: &[Workload] = &[
    Workload::rand("randread 4k qd1", false, 1),
    Workload::rand("randread 4k qd32", false, 32),
    Workload::rand("randread 4k qd128", false, 128),
    Workload::rand("randwrite 4k qd1", true, 1),
    Workload::rand("randwrite 4k qd32", true, 32),
    Workload::rand("randwrite 4k qd128", true, 128),
    Workload::seq("seqread 1m qd8", false),
    Workload::seq("seqwrite 1m qd8", true),
];

impl Workload {
    const fn rand(name: &'static str, write: bool, qd: usize) -> Workload {
        Workload {
            name,
            write,
            random: true,
            block: 4096,
            qd,
        }
    }

    const fn seq(name: &'static str, write: bool) -> Workload {
        Workload {
            name,
            write,
            random: false,
            block: 1 << 20,
            qd: 8,
        }
    }
}

/// The offsets a workload visits: random block-aligned, or sequential with wrap-around.
struct Offsets {
    random: bool,
    block: u64,
    next: u64,
    rng: u64,
}

impl Offsets {
    fn new(w: &Workload) -> Offsets {
        Offsets {
            random: w.random,
            block: u64::from(w.block),
            next: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
        }
    }

    fn next(&mut self) -> u64 {
        let blocks = DEVICE_SIZE / self.block;
        let i = if self.random {
            // xorshift64*: cheap next to everything measured.
            self.rng ^= self.rng >> 12;
            self.rng ^= self.rng << 25;
            self.rng ^= self.rng >> 27;
            self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) % blocks
        } else {
            let i = self.next;
            self.next = (self.next + 1) % blocks;
            i
        };
        i * self.block
    }
}

/// Requests completed and the time they took.
#[derive(Clone, Copy, Debug)]
struct Sample {
    ops: u64,
    elapsed: Duration,
}

impl Sample {
    fn per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
}

/// CPU time consumed so far by this process's threads, in nanoseconds, split into the server's
/// threads (userblk's `userblk-connN` threads, the baseline's `sequential` thread) and the rest (the
/// fake kernel and the driving thread). From `/proc/self/task/*/schedstat`; zeroes where absent.
fn cpu_ns() -> (u64, u64) {
    let (mut server, mut rest) = (0, 0);
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return (0, 0);
    };
    for task in tasks.flatten() {
        let path = task.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let ns: u64 = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        let comm = comm.trim();
        if comm.starts_with("userblk-conn") || comm == "sequential" {
            server += ns;
        } else {
            rest += ns;
        }
    }
    (server, rest)
}

/// A measurement: throughput, and CPU microseconds per request on each side.
#[derive(Clone, Copy, Debug)]
struct Measured {
    rate: f64,
    server_us: f64,
    kernel_us: f64,
}

fn measure(f: impl FnOnce() -> Sample) -> Measured {
    let (s0, k0) = cpu_ns();
    let sample = f();
    let (s1, k1) = cpu_ns();
    let per_op = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / 1e3 / sample.ops.max(1) as f64;
    Measured {
        rate: sample.per_sec(),
        server_us: per_op(s0, s1),
        kernel_us: per_op(k0, k1),
    }
}

/// Keeps `qd` requests in flight until `dur` has passed, then drains them; every completion is
/// counted and the clock stops when the last is in.
fn drive(kernel: &LoopbackKernel, w: &Workload, payload: &[u8], dur: Duration) -> Sample {
    let mut offsets = Offsets::new(w);
    let mut ring = VecDeque::with_capacity(w.qd);
    let start = Instant::now();
    let deadline = start + dur;
    let mut ops = 0u64;
    loop {
        while ring.len() < w.qd {
            let off = offsets.next();
            let op = if w.write {
                Op::write(off, payload)
            } else {
                Op::read(off, w.block)
            };
            ring.push_back(kernel.submit(op).expect("submit"));
        }
        let Some(t) = ring.pop_front() else { break };
        kernel.recycle(black_box(kernel.wait(t).expect("request failed")));
        ops += 1;
        if Instant::now() >= deadline {
            break;
        }
    }
    for t in ring {
        kernel.recycle(black_box(kernel.wait(t).expect("request failed")));
        ops += 1;
    }
    Sample {
        ops,
        elapsed: start.elapsed(),
    }
}

/// The same bytes at the same offsets, copied in memory.
fn copy(mem: &mut [u8], w: &Workload, payload: &[u8], dur: Duration) -> Sample {
    let mut offsets = Offsets::new(w);
    let mut dst = vec![0u8; w.block as usize];
    let len = w.block as usize;
    let start = Instant::now();
    let mut ops = 0u64;
    loop {
        for _ in 0..16 {
            let off = offsets.next() as usize;
            if w.write {
                mem[off..off + len].copy_from_slice(payload);
            } else {
                dst.copy_from_slice(&mem[off..off + len]);
            }
            black_box((&mut *mem, &mut dst));
            ops += 1;
        }
        if start.elapsed() >= dur {
            break;
        }
    }
    Sample {
        ops,
        elapsed: start.elapsed(),
    }
}

fn filled_device() -> MemDevice {
    let dev = MemDevice::new(DEVICE_SIZE);
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    for off in (0..DEVICE_SIZE).step_by(chunk.len()) {
        dev.write(off, &chunk).expect("fill");
    }
    dev
}

struct Args {
    secs: f64,
    warmup: f64,
    rounds: usize,
    filter: Option<String>,
    /// Run only this one (for profiling); the ratios are then meaningless.
    only: Option<String>,
    /// Worker threads of the userblk server (default: `ServerOptions::default()`'s).
    workers: Option<usize>,
}

fn args() -> Args {
    let mut a = Args {
        secs: 1.0,
        warmup: 0.25,
        rounds: 3,
        filter: None,
        only: None,
        workers: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--secs" => a.secs = val().parse().expect("--secs: seconds"),
            "--warmup" => a.warmup = val().parse().expect("--warmup: seconds"),
            "--rounds" => a.rounds = val().parse().expect("--rounds: a count"),
            "--filter" => a.filter = Some(val()),
            "--only" => a.only = Some(val()),
            "--workers" => a.workers = Some(val().parse().expect("--workers: a count")),
            "--bench" => {}
            other if !other.starts_with('-') => a.filter = Some(other.to_string()),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    let args = args();
    let dur = Duration::from_secs_f64(args.secs);
    let warmup = Duration::from_secs_f64(args.warmup);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "loopback bench: MemDevice {} MiB, 1 connection, {cpus} CPUs, {} rounds x {:.2} s per cell (+{:.2} s warm-up), fixed duration",
        DEVICE_SIZE >> 20,
        args.rounds,
        args.secs,
        args.warmup
    );
    println!("load average at start: {}", load.trim());

    let mut options = LoopbackOptions::default();
    if let Some(w) = args.workers {
        options.server.workers = w;
    }
    println!("userblk: {:?}", options.server);
    let userblk = LoopbackKernel::with_options(filled_device(), options).expect("start userblk");
    options.server.workers = 0;
    options.server.batch_never_blocks = false;
    println!("userblk-inline: {:?}", options.server);
    let inline = LoopbackKernel::with_options(filled_device(), options).expect("start inline");
    let seq_dev = filled_device();
    let export = export_of(&seq_dev).expect("export");
    let baseline = LoopbackKernel::with_server(export, LoopbackOptions::default(), move |link| {
        // A thread of its own, named so that its CPU time is counted as the server's.
        std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("sequential".into())
                .spawn_scoped(s, || sequential::run(&seq_dev, link))
                .expect("spawn")
                .join()
                .expect("sequential server panicked")
        })
    })
    .expect("start sequential");
    let mut mem: Vec<u8> = (0..DEVICE_SIZE).map(|i| (i % 251) as u8).collect();

    println!(
        "\n{:<20} {:<14} {:>10} {:>9} {:>14} {:>10} {:>12} {:>12}",
        "workload",
        "server",
        "req/s",
        "MB/s",
        "vs_sequential",
        "vs_memcpy",
        "srv_cpu_us",
        "kern_cpu_us"
    );
    for w in WORKLOADS {
        if args.filter.as_deref().is_some_and(|f| !w.name.contains(f)) {
            continue;
        }
        let payload: Vec<u8> = (0..w.block).map(|i| (i % 253) as u8).collect();
        let mut samples: [Vec<Measured>; 4] = Default::default();
        let run = |name: &str| args.only.as_deref().is_none_or(|o| o == name);
        for _ in 0..args.rounds {
            if run("memcpy") {
                copy(&mut mem, w, &payload, warmup);
                samples[0].push(measure(|| copy(&mut mem, w, &payload, dur)));
            }
            if run("sequential") {
                drive(&baseline, w, &payload, warmup);
                samples[1].push(measure(|| drive(&baseline, w, &payload, dur)));
            }
            if run("userblk") {
                drive(&userblk, w, &payload, warmup);
                samples[2].push(measure(|| drive(&userblk, w, &payload, dur)));
            }
            if run("userblk-inline") {
                drive(&inline, w, &payload, warmup);
                samples[3].push(measure(|| drive(&inline, w, &payload, dur)));
            }
        }
        let medians = samples.map(|v| {
            let m = |f: fn(&Measured) -> f64| median(v.iter().map(f).collect());
            Measured {
                rate: m(|s| s.rate),
                server_us: m(|s| s.server_us),
                kernel_us: m(|s| s.kernel_us),
            }
        });
        let (memcpy, seq) = (medians[0].rate, medians[1].rate);
        let names = ["memcpy", "sequential", "userblk", "userblk-inline"];
        for (name, m) in names.iter().zip(medians) {
            if m.rate.is_nan() {
                continue;
            }
            let cpu = if *name == "memcpy" {
                format!("{:>12.2} {:>12}", m.kernel_us, "-")
            } else {
                format!("{:>12.2} {:>12.2}", m.server_us, m.kernel_us)
            };
            println!(
                "{:<20} {:<14} {:>10.0} {:>9.1} {:>14.2} {:>10.3} {cpu}",
                w.name,
                name,
                m.rate,
                m.rate * f64::from(w.block) / 1e6,
                m.rate / seq,
                m.rate / memcpy
            );
        }
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("\nload average at end: {}", load.trim());
    let stats = userblk.stats();
    println!(
        "userblk: max in flight {}, replies that overtook an older request {}",
        stats.max_in_flight, stats.overtaken
    );
    userblk.shutdown().expect("userblk shutdown");
    inline.shutdown().expect("userblk-inline shutdown");
    baseline.shutdown().expect("sequential shutdown");
}
