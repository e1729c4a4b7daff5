//! A remote disk: the storage is a server task reached over a Unix socket with a protocol of its
//! own, each request waiting an injected latency (default 1 ms, a network round trip); the
//! device is an `AsyncBlockDevice` (see `remote_disk/remote.rs`), served as tasks on a tokio
//! runtime so that the kernel's whole queue is in flight at once.
//!
//! ```text
//! cargo run --example remote_disk                        # through the fake kernel: a quick check
//! cargo run --example remote_disk -- --latency-ms 5      # the same, slower storage
//! sudo modprobe nbd
//! sudo cargo run --example remote_disk -- --nbd /dev/nbd0   # on a real NBD device until Ctrl+C
//! sudo cargo run --example remote_disk -- --nbd /dev/nbd0 --blocking   # behind the sync trait
//! sudo modprobe ublk_drv
//! sudo cargo run --example remote_disk -- --ublk         # as /dev/ublkbN (Linux 6.0+), async
//! sudo cargo run --example remote_disk -- --ublk --blocking --workers 8   # sync, 8 threads a queue
//! ```
//!
//! Through ublk the async device's requests are tasks on the runtime, each tag's buffer lent to
//! it; behind the sync trait (`--blocking`), each queue's worker threads call it one request at
//! a time each (`--workers`, default twice the CPUs between 4 and 16).

#[path = "remote_disk/remote.rs"]
mod remote;

use std::error::Error;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use remote::{RemoteDisk, Storage, DEFAULT_LATENCY};
use userblk::link::loopback::Op;
use userblk::link::nbd::MountOptions;
use userblk::link::ublk::UblkOptions;
use userblk::{AsyncDevice, LoopbackKernel};

const SIZE: u64 = 256 << 20;

fn main() -> Result<(), Box<dyn Error>> {
    let mut latency = DEFAULT_LATENCY;
    let mut nbd: Option<PathBuf> = None;
    let mut ublk = false;
    let mut workers: Option<usize> = None;
    let mut queues = 1u16;
    let mut blocking = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--latency-ms" => {
                let ms: f64 = args.next().ok_or("--latency-ms needs a value")?.parse()?;
                latency = Duration::from_secs_f64(ms / 1000.0);
            }
            "--nbd" => nbd = Some(args.next().ok_or("--nbd needs a device")?.into()),
            "--ublk" => ublk = true,
            "--workers" => workers = Some(args.next().ok_or("--workers needs a count")?.parse()?),
            "--queues" => queues = args.next().ok_or("--queues needs a count")?.parse()?,
            "--blocking" => blocking = true,
            other => {
                return Err(format!(
                    "unknown argument {other:?} (--latency-ms MS, --nbd DEV | --ublk [--queues N] \
                     [--workers N], --blocking)"
                )
                .into())
            }
        }
    }
    if nbd.is_some() && ublk {
        return Err("--nbd and --ublk: choose one".into());
    }
    if nbd.is_some() || ublk {
        // Ctrl+C and SIGTERM are for the mount's signal watch, which waits for them in a thread
        // of its own: blocked here, before the runtime's threads and the storage's start, they
        // reach no other thread (one that left them unblocked would take them, and a SIGINT
        // sent to a shell's background job, which ignores it, would vanish there).
        let mut set = SigSet::empty();
        set.add(Signal::SIGINT);
        set.add(Signal::SIGTERM);
        set.thread_block()?;
    }
    let rt = tokio::runtime::Runtime::new()?;
    let storage = Storage::start(rt.handle(), SIZE, latency)?;
    let disk = rt.block_on(RemoteDisk::connect(storage.path(), storage.size()))?;
    let device = AsyncDevice::with_runtime(disk, rt.handle().clone());
    let mode = if blocking { "sync trait" } else { "async" };
    match nbd {
        None if ublk => {
            let mut options = UblkOptions::new().queues(queues).unmount_on_signals(true);
            if let Some(n) = workers {
                options = options.workers(n);
            }
            let ready = |handle: &userblk::link::ublk::UblkHandle| {
                println!(
                    "remote_disk: {} MiB at {:?} latency on {} (ublk, {mode}); Ctrl+C to stop",
                    SIZE >> 20,
                    latency,
                    handle.device().display(),
                );
            };
            if blocking {
                options.mount(device.blocking(), ready)?;
            } else {
                options.mount(device, ready)?;
            }
            println!("remote_disk: unmounted");
        }
        Some(path) => {
            let mount = MountOptions::new().device(&path).unmount_on_signals(true);
            let ready = |handle: &userblk::link::nbd::MountHandle| {
                println!(
                    "remote_disk: {} MiB at {:?} latency on {} ({mode}); Ctrl+C to stop",
                    SIZE >> 20,
                    latency,
                    handle.device().display(),
                );
            };
            if blocking {
                mount.mount(device.blocking(), ready)?;
            } else {
                mount.mount(device, ready)?;
            }
            println!("remote_disk: unmounted");
        }
        None => {
            let kernel = LoopbackKernel::start(device)?;
            kernel.write(1 << 20, &[0x5a; 64 << 10])?;
            assert_eq!(kernel.read(1 << 20, 64 << 10)?, vec![0x5a; 64 << 10]);
            // 4 KiB random reads with 128 in flight: each waits `latency`, but not for the others.
            let t = Instant::now();
            let mut done = 0u64;
            let mut inflight = std::collections::VecDeque::new();
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            while t.elapsed() < Duration::from_secs(1) {
                while inflight.len() < 128 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let at = (x % (SIZE / 4096)) * 4096;
                    inflight.push_back(kernel.submit(Op::read(at, 4096))?);
                }
                if let Some(t) = inflight.pop_front() {
                    kernel.wait(t)?;
                    done += 1;
                }
            }
            for t in inflight {
                kernel.wait(t)?;
            }
            println!(
                "remote_disk: {done} reads of 4 KiB in {:.2} s at {:?} latency, 128 in flight",
                t.elapsed().as_secs_f64(),
                latency
            );
            kernel.shutdown()?;
        }
    }
    Ok(())
}
