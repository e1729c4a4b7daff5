//! `userblk check`: the conformance suite, the random tests and the shipped traces against a
//! device, through the loopback fake kernel (no root) or a real `/dev/nbdN`, with a progress line
//! while it runs and a report at the end.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use userblk::{BlockDevice, Capabilities, LoopbackOptions, MemDevice, PatternDevice};

use crate::conformance::{self, Env, Report};
use crate::factory::{DeviceFactory, Reopen};
use crate::nbd_rig::NbdRig;
use crate::random::{loopback_rig, random_test, RandomConfig};
use crate::spec::{human, DeviceSpec};
use crate::target::{LoopbackRig, Rig};
use crate::trace::{replay_on, Trace};

/// Arguments of `userblk check`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The device to check: ram:SIZE (e.g. ram:64M) or file:PATH (its contents are overwritten).
    pub device: DeviceSpec,
    /// Check through this real NBD device (e.g. /dev/nbd0; needs root and the nbd module)
    /// instead of the loopback fake kernel.
    #[arg(long, value_name = "DEV")]
    pub kernel: Option<PathBuf>,
    /// Seed of the first random sequence; a failure prints the seed that reproduces it.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Random runs (concurrent: several client threads on one device).
    #[arg(long, default_value_t = RandomConfig::default().runs)]
    pub runs: u32,
    /// Operations per random run, over all its threads.
    #[arg(long, default_value_t = RandomConfig::default().ops)]
    pub ops: usize,
    /// Directory of traces (*.ubt) to replay. Default: the traces shipped in harness/traces.
    #[arg(long, value_name = "DIR")]
    pub traces: Option<PathBuf>,
}

/// A progress line on stderr, rewritten in place when stderr is a terminal.
struct Progress {
    tty: bool,
}

impl Progress {
    fn show(&self, text: &str) {
        if self.tty {
            let mut e = std::io::stderr().lock();
            let _ = write!(e, "\r\x1b[K{text}");
            let _ = e.flush();
        }
    }

    fn clear(&self) {
        if self.tty {
            eprint!("\r\x1b[K");
        }
    }
}

/// Makes fresh devices of the spec: a new RAM disk each time (re-openable: the same memory
/// served again), the same file each time.
fn factory(spec: &DeviceSpec) -> Result<Box<dyn DeviceFactory>, String> {
    Ok(match spec {
        DeviceSpec::Ram { size } => {
            let size = *size;
            Box::new(Reopen::new(
                move || Ok(Arc::new(MemDevice::new(size))),
                |mem: &Arc<MemDevice>| Ok(Arc::clone(mem)),
            ))
        }
        DeviceSpec::Pattern { size } => {
            let size = *size;
            Box::new(move || Box::new(PatternDevice::new(size)) as Box<dyn BlockDevice>)
        }
        DeviceSpec::File { .. } => {
            // Fail early with the reason if the file cannot be opened at all.
            drop(
                spec.open(false)
                    .map_err(|e| format!("cannot open {spec}: {e}"))?,
            );
            let spec = spec.clone();
            Box::new(Reopen::new(
                move || Ok(spec.clone()),
                |spec: &DeviceSpec| spec.open(false),
            ))
        }
    })
}

/// The traces to replay: `*.ubt` files in `dir`, sorted.
fn trace_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "ubt"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// The device, zeroed over the trace's range when the trace assumes it starts as zeroes (a file
/// that earlier checks wrote to does not).
fn zeroed(dev: Box<dyn BlockDevice>, trace: &Trace) -> Result<Box<dyn BlockDevice>, String> {
    if trace.header.initial_zeroes {
        dev.write_zeroes(0, trace.header.size, true)
            .map_err(|e| format!("cannot zero the device before replaying: {e}"))?;
    }
    Ok(dev)
}

/// `flush fua trim(zeroes) write-zeroes`, or `read-only`.
fn describe(caps: &Capabilities) -> String {
    let mut words = Vec::new();
    for (on, word) in [
        (caps.read_only, "read-only"),
        (caps.flush, "flush"),
        (caps.fua, "fua"),
        (caps.trim && !caps.trim_zeroes, "trim"),
        (caps.trim && caps.trim_zeroes, "trim (reads back zeroes)"),
        (caps.write_zeroes, "write-zeroes"),
        (caps.rotational, "rotational"),
    ] {
        if on {
            words.push(word);
        }
    }
    if words.is_empty() {
        "no optional capabilities".into()
    } else {
        words.join(", ")
    }
}

fn print_report(r: &Report) {
    print!("{r}");
}

/// Runs `userblk check`.
pub fn run(args: Args) -> ExitCode {
    let started = Instant::now();
    let make = match factory(&args.device) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("userblk check: {e}");
            return ExitCode::from(2);
        }
    };
    let probe = match make.create() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("userblk check: {e}");
            return ExitCode::from(2);
        }
    };
    let caps: Capabilities = probe.capabilities();
    let size = probe.blocks() * u64::from(probe.block_size());
    drop(probe);
    let loopback = LoopbackRig::default();
    let nbd = args.kernel.as_ref().map(NbdRig::new);
    let rig: &dyn Rig = match &nbd {
        Some(n) => n,
        None => &loopback,
    };
    let progress = Progress {
        tty: std::io::stderr().is_terminal(),
    };
    println!(
        "userblk check {}: {} bytes, {}; through {}",
        args.device,
        human(size),
        describe(&caps),
        rig.name()
    );
    let mut failed = false;

    // 1. The conformance suite.
    let cases = conformance::cases();
    let env = Env::new(rig, &*make, caps);
    let report = conformance::run_cases(&env, &cases, &mut |i, c| {
        progress.show(&format!(
            "[{}/{}] conformance: {}",
            i + 1,
            cases.len(),
            c.name
        ));
    });
    progress.clear();
    print_report(&report);
    failed |= !report.all_passed();
    if nbd.is_none() {
        // Through the loopback also with whole 32 MiB requests and four connections.
        let big = LoopbackRig {
            options: LoopbackOptions {
                connections: 4,
                max_request: userblk::proto::MAX_IO_LEN,
                ..LoopbackOptions::default()
            },
        };
        let env = Env::new(&big, &*make, caps);
        let subset: Vec<_> = cases
            .iter()
            .copied()
            .filter(|c| {
                [
                    "request_sizes",
                    "in_flight_disjoint",
                    "in_flight_overlapping",
                ]
                .contains(&c.name)
            })
            .collect();
        let mut report = conformance::run_cases(&env, &subset, &mut |i, c| {
            progress.show(&format!(
                "[{}/{}] conformance, 32 MiB requests: {}",
                i + 1,
                subset.len(),
                c.name
            ));
        });
        report.rig = "loopback, 4 connections, unsplit requests up to 32 MiB".into();
        progress.clear();
        print_report(&report);
        failed |= !report.all_passed();
    }

    // 2. Random sequences against the model.
    let config = RandomConfig {
        seed: args.seed,
        runs: args.runs,
        ops: args.ops,
        ..RandomConfig::default()
    };
    let t = Instant::now();
    // Through the loopback, with two connections, as the kernel with connections=2.
    let random_loopback = loopback_rig();
    let random_rig: &dyn Rig = match &nbd {
        Some(n) => n,
        None => &random_loopback,
    };
    match random_test(random_rig, &*make, caps, &config, &mut |i| {
        progress.show(&format!(
            "[{}/{}] random sequences (seed {})",
            i + 1,
            config.runs,
            config.seed + u64::from(i)
        ))
    }) {
        Ok(s) => {
            progress.clear();
            println!(
                "random: {} sequences, {} operations, seeds {}..={}: ok ({} ms)",
                s.runs,
                s.ops,
                config.seed,
                config.seed + u64::from(config.runs.saturating_sub(1)),
                t.elapsed().as_millis()
            );
        }
        Err(f) => {
            progress.clear();
            failed = true;
            println!("random: FAIL\n{f}");
            println!(
                "  reproduce: userblk check {} --seed {} --runs 1 --ops {}",
                args.device, f.seed, args.ops
            );
        }
    }

    // 3. The shipped traces.
    let dir = args
        .traces
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("traces"));
    let files = trace_files(&dir);
    if files.is_empty() {
        println!("traces: none found in {}", dir.display());
    } else {
        println!("traces ({}):", dir.display());
    }
    for (i, path) in files.iter().enumerate() {
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        progress.show(&format!("[{}/{}] trace {name}", i + 1, files.len()));
        let t = Instant::now();
        let line = match Trace::read_file(path) {
            Err(e) => {
                failed = true;
                format!("  FAIL  {name:<32} cannot read: {e}")
            }
            Ok(trace) if trace.header.size > size => format!(
                "  skip  {name:<32} needs a device of {} bytes",
                human(trace.header.size)
            ),
            Ok(_) if caps.read_only => format!("  skip  {name:<32} the device is read-only"),
            Ok(trace) => match make
                .create()
                .map_err(|e| e.to_string())
                .and_then(|dev| zeroed(dev, &trace))
                .and_then(|dev| replay_on(rig, dev, &trace).map_err(|e| e.to_string()))
            {
                Ok(r) => format!("  ok    {name:<32} {:>6} ms  {r}", t.elapsed().as_millis()),
                Err(e) => {
                    failed = true;
                    format!("  FAIL  {name:<32} {e}")
                }
            },
        };
        progress.clear();
        println!("{line}");
    }

    println!(
        "{} in {:.1} s",
        if failed { "FAILED" } else { "all passed" },
        started.elapsed().as_secs_f64()
    );
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
