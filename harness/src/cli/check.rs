//! `userblk check`: the conformance suite, the random tests and the shipped traces against a
//! device, through the loopback fake kernel (no root) or a real `/dev/nbdN`, with a progress line
//! while it runs and a report at the end; or, given an NBD URI, against any NBD server
//! ([`super::check_nbd`] does that).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use userblk::{BlockDevice, Capabilities, FileDevice, LoopbackOptions, MemDevice, PatternDevice};

use userblk::link::loopback::{KernelProfile, LatencyReport, Transport};

use crate::cli::check_nbd::{self, CheckTarget};
use crate::cli::measured::MeasuredRig;
use crate::conformance::{self, Env, Report};
use crate::factory::{DeviceFactory, Reopen};
use crate::nbd_rig::NbdRig;
use crate::random::{self, random_test, RandomConfig, RandomSummary};
use crate::spec::{human, DeviceSpec};
use crate::target::{LoopbackRig, Rig};
use crate::trace::{replay_on, trace_files, ReplayReport, Trace};

/// Arguments of `userblk check`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The device to check: ram:SIZE (e.g. ram:64M) or file:PATH (its contents are overwritten);
    /// or an NBD server's export, nbd://HOST:PORT/NAME, nbds://..., or
    /// nbd+unix:///NAME?socket=PATH (its contents are overwritten).
    pub device: CheckTarget,
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
    /// The kernel the fake kernel plays (repeatable): linux-6.1, linux-6.12, ublk-6.12.
    /// Default: each of them, the conformance suite once per kernel.
    #[arg(long = "profile", value_name = "NAME", value_parser = parse_profile)]
    pub profiles: Vec<KernelProfile>,
    /// Directory of traces (*.ubt) to replay. Default: the traces shipped in harness/traces.
    #[arg(long, value_name = "DIR")]
    pub traces: Option<PathBuf>,
}

fn parse_profile(name: &str) -> Result<KernelProfile, String> {
    KernelProfile::by_name(name).ok_or_else(|| {
        format!(
            "unknown kernel profile {name:?}: one of {}",
            KernelProfile::names()
        )
    })
}

/// A progress line on stderr, rewritten in place when stderr is a terminal.
pub(super) struct Progress {
    tty: bool,
}

impl Progress {
    /// Shown only when stderr is a terminal.
    pub(super) fn new() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
        }
    }

    pub(super) fn show(&self, text: &str) {
        if self.tty {
            let mut e = std::io::stderr().lock();
            let _ = write!(e, "\r\x1b[K{text}");
            let _ = e.flush();
        }
    }

    pub(super) fn clear(&self) {
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
            Box::new(crate::factory::mem(size))
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

/// The fake kernel's options for `profile`, with the harness's defaults (READ buffers
/// poisoned so an under-filled read is caught).
fn loopback_options(profile: KernelProfile) -> LoopbackOptions {
    LoopbackOptions::for_profile(profile)
}

/// Replays `trace` with its recorded request sizes and overlap through a fake kernel of
/// `rig`'s options, adding its latency to the rig's.
fn replay_measured(
    rig: &MeasuredRig,
    device: Box<dyn BlockDevice>,
    trace: &Trace,
) -> Result<ReplayReport, String> {
    rig.replay(device, trace).map_err(|e| e.to_string())
}

/// Size of the sparse device the huge-offset probe serves: past every boundary where a 32-bit
/// count of bytes, sectors or pages wraps (2^32 B, 2^41 B, ...) but 2^44.
const HUGE: u64 = 4 << 40;

/// Runs the cases that matter at huge offsets on a sparse 4 TiB device of the spec's kind (a
/// RAM disk, or a sparse temporary file beside the spec's file); `None` for a read-only kind.
fn huge_probe(spec: &DeviceSpec, rig: &LoopbackRig) -> Result<Option<Report>, String> {
    let (factory, _file): (Box<dyn DeviceFactory>, Option<TempFile>) = match spec {
        DeviceSpec::Pattern { .. } => return Ok(None),
        DeviceSpec::Ram { .. } => (Box::new(|| MemDevice::new(HUGE)), None),
        DeviceSpec::File { path } => {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            let file = TempFile::sparse(dir.unwrap_or(Path::new(".")), HUGE)?;
            let path = file.0.clone();
            let factory = Reopen::new(move || Ok(path.clone()), |p: &PathBuf| FileDevice::open(p));
            (Box::new(factory), Some(file))
        }
    };
    let caps = factory.create().map_err(|e| e.to_string())?.capabilities();
    let env = Env::new(rig, &*factory, caps);
    let cases: Vec<_> = conformance::cases()
        .into_iter()
        .filter(|c| {
            [
                "read_after_write",
                "huge_offsets",
                "write_zeroes_reads_zero",
            ]
            .contains(&c.name)
        })
        .collect();
    let mut report = conformance::run_cases(&env, &cases, &mut |_, _| {});
    report.rig = format!("loopback, sparse {} device", human(HUGE));
    Ok(Some(report))
}

/// A sparse file removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn sparse(dir: &Path, size: u64) -> Result<TempFile, String> {
        let path = dir.join(format!(".userblk-check-huge-{}.img", std::process::id()));
        let f = std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let file = TempFile(path);
        f.set_len(size).map_err(|e| {
            format!(
                "{}: cannot make a sparse {} file here: {e}",
                file.0.display(),
                human(size)
            )
        })?;
        Ok(file)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The random tests of `userblk check` through `rig`, with one line of result (or the failure and
/// the command that reproduces it); `detail` adds to the line what the rig did. Whether they
/// passed.
pub(super) fn run_random(
    rig: &dyn Rig,
    make: &dyn DeviceFactory,
    caps: Capabilities,
    args: &Args,
    progress: &Progress,
    detail: impl Fn(&RandomSummary) -> String,
) -> bool {
    let config = RandomConfig {
        seed: args.seed,
        runs: args.runs,
        ops: args.ops,
        ..RandomConfig::default()
    };
    let t = Instant::now();
    let result = random_test(rig, make, caps, &config, &mut |i| {
        progress.show(&format!(
            "[{}/{}] random sequences (seed {})",
            i + 1,
            config.runs,
            config.seed + u64::from(i)
        ))
    });
    progress.clear();
    match result {
        Ok(s) => {
            println!(
                "random ({}{}): {} runs, {} operations, seeds {}..={}: ok ({} ms)",
                config.mode,
                detail(&s),
                s.runs,
                s.ops,
                config.seed,
                config.seed + u64::from(config.runs.saturating_sub(1)),
                t.elapsed().as_millis()
            );
            true
        }
        Err(f) => {
            println!("random: FAIL\n{f}");
            println!(
                "  reproduce: userblk check {} --seed {} --runs 1 --ops {}",
                args.device, f.seed, args.ops
            );
            false
        }
    }
}

/// Replays the traces of `args.traces` (default: the shipped ones) that fit in `size` bytes
/// through `replay`, one line each; a read-only `what` ("device", "export") skips them all.
/// Whether every trace that ran passed.
pub(super) fn run_traces(
    args: &Args,
    size: u64,
    caps: Capabilities,
    what: &str,
    progress: &Progress,
    replay: &mut dyn FnMut(&Trace) -> Result<ReplayReport, String>,
) -> bool {
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
    let mut passed = true;
    for (i, path) in files.iter().enumerate() {
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        progress.show(&format!("[{}/{}] trace {name}", i + 1, files.len()));
        let t = Instant::now();
        let line = match Trace::read_file(path) {
            Err(e) => {
                passed = false;
                format!("  FAIL  {name:<32} cannot read: {e}")
            }
            Ok(trace) if trace.header.size > size => format!(
                "  skip  {name:<32} needs a device of {} bytes",
                human(trace.header.size)
            ),
            Ok(_) if caps.read_only => format!("  skip  {name:<32} the {what} is read-only"),
            Ok(trace) => match replay(&trace) {
                Ok(r) => format!("  ok    {name:<32} {:>6} ms  {r}", t.elapsed().as_millis()),
                Err(e) => {
                    passed = false;
                    format!("  FAIL  {name:<32} {e}")
                }
            },
        };
        progress.clear();
        println!("{line}");
    }
    passed
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
pub(super) fn describe(caps: &Capabilities) -> String {
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

pub(super) fn print_report(r: &Report) {
    print!("{r}");
}

/// Runs `userblk check`.
pub fn run(args: Args) -> ExitCode {
    let spec = match &args.device {
        CheckTarget::Nbd(uri) => return check_nbd::run(uri, &args),
        CheckTarget::Device(spec) => spec.clone(),
    };
    let started = Instant::now();
    let make = match factory(&spec) {
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
    let profiles = if args.profiles.is_empty() {
        KernelProfile::all().to_vec()
    } else {
        args.profiles.clone()
    };
    // The newest NBD kernel asked for (else the first asked for) plays the fake kernel after the
    // conformance suite.
    let newest = profiles
        .iter()
        .filter(|p| p.transport == Transport::Nbd)
        .max_by_key(|p| KernelProfile::all().iter().position(|q| q == *p))
        .or(profiles.first())
        .copied()
        .unwrap_or_else(KernelProfile::newest);
    let rigs: Vec<MeasuredRig> = profiles
        .iter()
        .map(|&p| {
            MeasuredRig::new(LoopbackRig {
                options: loopback_options(p),
            })
        })
        .collect();
    let loopback = MeasuredRig::new(LoopbackRig {
        options: loopback_options(newest),
    });
    let nbd = args.kernel.as_ref().map(NbdRig::new);
    // The random tests' rig: two connections and the fake kernel's jitter (kept out of the
    // latency table: their devices sleep on purpose).
    let random_loopback = LoopbackRig {
        options: random::loopback_options(loopback_options(newest)),
    };
    let rig: &dyn Rig = match &nbd {
        Some(n) => n,
        None => &random_loopback,
    };
    let progress = Progress::new();
    let through = match &nbd {
        Some(n) => n.name(),
        None => format!(
            "the loopback fake kernel playing {}",
            profiles
                .iter()
                .map(|p| p.name)
                .collect::<Vec<_>>()
                .join(" and ")
        ),
    };
    println!(
        "userblk check {}: {} bytes, {}; through {through}",
        args.device,
        human(size),
        describe(&caps),
    );
    let mut failed = false;

    // 1. The conformance suite, once per kernel played (or once through the real kernel).
    let suite_rigs: Vec<&dyn Rig> = match &nbd {
        Some(n) => vec![n],
        None => rigs.iter().map(|r| r as &dyn Rig).collect(),
    };
    let cases = conformance::cases();
    for (k, suite_rig) in suite_rigs.iter().enumerate() {
        let env = Env::new(*suite_rig, &*make, caps);
        let label = match &nbd {
            Some(_) => String::new(),
            None => format!(", {}", profiles[k].name),
        };
        let mut report = conformance::run_cases(&env, &cases, &mut |i, c| {
            progress.show(&format!(
                "[{}/{}] conformance{label}: {}",
                i + 1,
                cases.len(),
                c.name
            ));
        });
        if nbd.is_none() {
            report.rig = format!("loopback, {}", profiles[k].name);
        }
        progress.clear();
        print_report(&report);
        failed |= !report.all_passed();
    }
    if nbd.is_none() {
        // Through the loopback also with whole 32 MiB requests and four connections.
        // (Not in the latency table: 32 MiB requests would swamp it.)
        let big = LoopbackRig {
            options: LoopbackOptions {
                connections: 4,
                max_request: userblk::proto::MAX_IO_LEN,
                ..loopback_options(newest)
            },
        };
        let env = Env::new(&big, &*make, caps);
        let subset: Vec<_> = cases
            .iter()
            .copied()
            .filter(|c| conformance::LARGE_REQUEST_CASES.contains(&c.name))
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

    // 1b. A sparse 4 TiB device of the same kind: offsets that 32-bit arithmetic aliases.
    if nbd.is_none() {
        match huge_probe(&spec, &loopback.rig) {
            Ok(Some(report)) => {
                print_report(&report);
                failed |= !report.all_passed();
            }
            Ok(None) => println!("huge offsets: skipped ({} is read-only)", args.device),
            Err(e) => {
                failed = true;
                println!("huge offsets: FAIL: {e}");
            }
        }
    }

    // 2. Random sequences against the model.
    failed |= !run_random(rig, &*make, caps, &args, &progress, |s| {
        format!(", jittered, {} re-opened and read back", s.reopened)
    });

    // 3. The shipped traces.
    failed |= !run_traces(&args, size, caps, "device", &progress, &mut |trace| {
        make.create()
            .map_err(|e| e.to_string())
            .and_then(|dev| zeroed(dev, trace))
            .and_then(|dev| match &nbd {
                Some(n) => replay_on(n, dev, trace).map_err(|e| e.to_string()),
                None => replay_measured(&loopback, dev, trace),
            })
    });

    // 4. How long requests took, through every fake kernel of the run.
    if nbd.is_none() {
        let mut latency = loopback.latency();
        for r in &rigs {
            latency.merge(&r.latency());
        }
        println!("latency (request sent to reply read, every fake kernel of this run):");
        for line in latency.to_string().lines() {
            println!("  {line}");
        }
        // Outliers against the median of their own size, and slow in absolute terms too.
        let floor = Duration::from_millis(100);
        for c in &latency.commands {
            let slow = c.slower_than(LatencyReport::OUTLIER_FACTOR, floor);
            if slow > 0 {
                println!(
                    "  outliers: {slow} {} requests took over {} times the median of their size \
                     and over {} ms (the slowest {} ms): a device that stalls now and then? Not \
                     a failure; a stall over the limit is.",
                    c.command.name(),
                    LatencyReport::OUTLIER_FACTOR,
                    floor.as_millis(),
                    c.max.as_millis()
                );
            }
        }
    }

    verdict(failed, started)
}

/// Prints the verdict and the time the run took, and returns the exit code that goes with it.
pub(super) fn verdict(failed: bool, started: Instant) -> ExitCode {
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
