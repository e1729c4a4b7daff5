//! Kernel tests a driver author writes once: [`run`] takes the driver's [`DeviceFactory`] and
//! runs the conformance suite, the random tests and the shipped traces through whichever real
//! kernel transport is there (`/dev/nbdN` today), or skips, saying why, where there is none
//! (not root, no `nbd` module): so the same test runs in plain `cargo test` (a skip) and under
//! `userblk vm -- cargo test` (each real kernel).
//!
//! ```no_run
//! // tests/kernel.rs of a driver crate
//! use userblk::MemDevice; // your device instead
//!
//! #[test]
//! fn on_real_kernels() {
//!     userblk_harness::kernel_test::run(|| MemDevice::new(64 << 20)).assert_passed();
//! }
//! ```
//!
//! [`KernelTest`] changes the settings (how many random sequences, which cases may not run).
//! The transport is picked by [`transport`]: `USERBLK_TEST_UBLK=1` serves through ublk
//! (`/dev/ublkbN`); `USERBLK_TEST_NBD=/dev/nbdN|auto` forces NBD (and
//! `USERBLK_TEST_NBD_SETUP=ioctl|netlink` the way it is configured); otherwise root with the
//! `nbd` module loaded (as `userblk vm` does) means NBD on the first free device.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use userblk::BlockDevice;

use crate::conformance::{self, Env, Report};
use crate::factory::DeviceFactory;
use crate::nbd_rig::{NbdRig, ENV_DEVICE};
use crate::random::{random_test, RandomConfig, RandomFailure, RandomSummary};
use crate::target::Rig;
use crate::trace::{replay_on, trace_files, Trace};
use crate::ublk_rig::{UblkRig, ENV_UBLK};

/// A real kernel path to block devices.
#[derive(Clone, Debug)]
pub enum Transport {
    /// The kernel's NBD driver, `/dev/nbdN`.
    Nbd(NbdRig),
    /// The kernel's ublk driver, `/dev/ublkbN` (Linux 6.0+ with `ublk_drv`), when
    /// `USERBLK_TEST_UBLK` asks for it.
    Ublk(UblkRig),
}

impl Transport {
    /// The rig that serves devices through it.
    pub fn rig(&self) -> &dyn Rig {
        match self {
            Transport::Nbd(rig) => rig,
            Transport::Ublk(rig) => rig,
        }
    }
}

/// Why kernel tests cannot run here.
fn missing_transport(euid_root: bool, nbd_loaded: bool) -> Option<String> {
    if !euid_root {
        Some(
            "not root: real-kernel tests serve /dev/nbdN; run them with `userblk vm -- cargo test`"
                .into(),
        )
    } else if !nbd_loaded {
        Some("the nbd module is not loaded (no /sys/module/nbd): run with `userblk vm -- cargo test`, or `modprobe nbd` first".into())
    } else {
        None
    }
}

/// The transport to test through, or why there is none (printed as "skipped: ...").
pub fn transport() -> Result<Transport, String> {
    if std::env::var_os(ENV_UBLK).is_some() {
        return UblkRig::from_env().map(Transport::Ublk);
    }
    if std::env::var_os(ENV_DEVICE).is_some() {
        return NbdRig::from_env().map(Transport::Nbd);
    }
    let root = nix::unistd::geteuid().is_root();
    let nbd = Path::new("/sys/module/nbd").exists();
    match missing_transport(root, nbd) {
        Some(why) => Err(why),
        None => Ok(Transport::Nbd(NbdRig::new("auto"))),
    }
}

/// Kernel tests share the machine's devices: one at a time per process.
static TURN: Mutex<()> = Mutex::new(());

/// Settings of a kernel test run.
#[derive(Clone, Debug)]
pub struct KernelTest {
    /// Random sequences (default: 5 runs of 200 operations from seed 1: each one is slower
    /// through a real kernel than through the loopback).
    pub random: RandomConfig,
    /// Conformance cases that may end "not run" without failing (see
    /// [`Report::all_passed_except`]).
    pub may_not_run: Vec<&'static str>,
    /// Which traces to replay (default: [`Traces::ThisKernel`]).
    pub traces: Traces,
    /// Where the traces are (default: the ones shipped with userblk-harness).
    pub traces_dir: PathBuf,
}

impl Default for KernelTest {
    fn default() -> KernelTest {
        KernelTest {
            random: RandomConfig {
                runs: 5,
                ..RandomConfig::default()
            },
            may_not_run: Vec::new(),
            traces: Traces::ThisKernel,
            traces_dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("traces"),
        }
    }
}

/// Which of the traces in [`KernelTest::traces_dir`] to replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traces {
    /// Those recorded on the running kernel's series (`ext4-6.12.ubt` on 6.12), or all when
    /// none was: each kernel replays the request streams it makes itself.
    ThisKernel,
    /// All of them.
    All,
    /// None.
    Off,
}

/// The traces of `files` that `which` selects on a kernel of `release`.
pub fn select_traces(files: Vec<PathBuf>, which: Traces, release: &str) -> Vec<PathBuf> {
    match which {
        Traces::Off => Vec::new(),
        Traces::All => files,
        Traces::ThisKernel => {
            let series = crate::vm::kernels::series_of(release).unwrap_or(release);
            let suffix = format!("-{series}.ubt");
            let mine: Vec<PathBuf> = files
                .iter()
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.ends_with(&suffix))
                })
                .cloned()
                .collect();
            if mine.is_empty() {
                files
            } else {
                mine
            }
        }
    }
}

/// How one trace went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TraceOutcome {
    /// Replayed, every read as recorded; the replay's summary.
    Passed(String),
    /// Not replayed, and why (the device is smaller than the trace, or read-only).
    Skipped(String),
    /// A read differed, or the replay failed.
    Failed(String),
}

/// What a kernel test run found.
#[derive(Debug)]
pub struct KernelReport {
    /// The transport's name (`/dev/nbd (auto)`).
    pub transport: String,
    /// The kernel release (`uname -r`).
    pub kernel: String,
    /// The conformance suite.
    pub conformance: Report,
    /// The random sequences.
    pub random: Result<RandomSummary, Box<RandomFailure>>,
    /// Each trace by file name.
    pub traces: Vec<(String, TraceOutcome)>,
    /// Cases allowed not to run.
    pub may_not_run: Vec<&'static str>,
}

impl KernelReport {
    /// Whether everything passed: no conformance case failed and every one ran (but those
    /// allowed not to), the random sequences passed, no trace failed.
    pub fn passed(&self) -> bool {
        self.conformance.all_passed_except(&self.may_not_run)
            && self.random.is_ok()
            && !self
                .traces
                .iter()
                .any(|(_, o)| matches!(o, TraceOutcome::Failed(_)))
    }
}

impl fmt::Display for KernelReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "kernel {} through {}", self.kernel, self.transport)?;
        write!(f, "{}", self.conformance)?;
        match &self.random {
            Ok(s) => writeln!(f, "random: {} sequences, {} operations: ok", s.runs, s.ops)?,
            Err(e) => write!(f, "random: FAIL\n{e}")?,
        }
        if !self.traces.is_empty() {
            writeln!(f, "traces:")?;
        }
        for (name, o) in &self.traces {
            match o {
                TraceOutcome::Passed(s) => writeln!(f, "  ok    {name:<24} {s}")?,
                TraceOutcome::Skipped(s) => writeln!(f, "  skip  {name:<24} {s}")?,
                TraceOutcome::Failed(s) => writeln!(f, "  FAIL  {name:<24} {s}")?,
            }
        }
        writeln!(f, "{}", if self.passed() { "passed" } else { "FAILED" })
    }
}

/// The result of [`run`]: skipped (no real kernel here) or a report.
#[derive(Debug)]
pub enum KernelRun {
    /// No transport here; the reason.
    Skipped(String),
    /// Ran through a real kernel.
    Ran(Box<KernelReport>),
}

impl KernelRun {
    /// Prints the report (or "skipped: why") and panics with it if something failed: the body
    /// of a `#[test]`.
    #[track_caller]
    pub fn assert_passed(&self) {
        match self {
            KernelRun::Skipped(why) => println!("skipped: {why}"),
            KernelRun::Ran(r) => {
                println!("{r}");
                if !r.passed() {
                    panic!("real-kernel test failed on {}:\n{r}", r.kernel);
                }
            }
        }
    }

    /// Whether it was skipped or passed.
    pub fn passed(&self) -> bool {
        match self {
            KernelRun::Skipped(_) => true,
            KernelRun::Ran(r) => r.passed(),
        }
    }
}

/// Runs the default [`KernelTest`] with `factory`.
pub fn run(factory: impl DeviceFactory) -> KernelRun {
    KernelTest::default().run(&factory)
}

impl KernelTest {
    /// Runs the suite, the random sequences and the traces through the transport there is, or
    /// skips.
    pub fn run(&self, factory: &dyn DeviceFactory) -> KernelRun {
        let transport = match transport() {
            Ok(t) => t,
            Err(why) => return KernelRun::Skipped(why),
        };
        let _turn = TURN.lock().unwrap_or_else(PoisonError::into_inner);
        KernelRun::Ran(Box::new(self.run_on(transport.rig(), factory)))
    }

    /// Runs everything through `rig` (a real one, or the loopback for a test of this function).
    pub fn run_on(&self, rig: &dyn Rig, factory: &dyn DeviceFactory) -> KernelReport {
        let kernel = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_else(|_| "(unknown)".into());
        let probe = factory.create();
        let (caps, size) = match &probe {
            Ok(d) => (d.capabilities(), d.blocks() * u64::from(d.block_size())),
            Err(_) => (Default::default(), 0),
        };
        drop(probe);
        eprintln!(
            "kernel test: conformance through {} on {kernel}",
            rig.name()
        );
        let conformance = conformance::run_cases(
            &Env::new(rig, factory, caps),
            &conformance::cases(),
            &mut |_, c| eprintln!("  case {}", c.name),
        );
        eprintln!("kernel test: {} random sequences", self.random.runs);
        let random = random_test(rig, factory, caps, &self.random, &mut |_| {});
        let mut traces = Vec::new();
        {
            let files = select_traces(trace_files(&self.traces_dir), self.traces, &kernel);
            for path in files {
                let name = path
                    .file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
                eprintln!("kernel test: trace {name}");
                traces.push((name, replay(rig, factory, &path, size, caps.read_only)));
            }
        }
        KernelReport {
            transport: rig.name(),
            kernel,
            conformance,
            random,
            traces,
            may_not_run: self.may_not_run.clone(),
        }
    }
}

fn replay(
    rig: &dyn Rig,
    factory: &dyn DeviceFactory,
    path: &Path,
    size: u64,
    read_only: bool,
) -> TraceOutcome {
    let t = Instant::now();
    let trace = match Trace::read_file(path) {
        Ok(t) => t,
        Err(e) => return TraceOutcome::Failed(format!("cannot read it: {e}")),
    };
    if trace.header.size > size {
        return TraceOutcome::Skipped(format!(
            "needs a device of {} bytes; the factory's has {size}",
            trace.header.size
        ));
    }
    if read_only {
        return TraceOutcome::Skipped("the device is read-only".into());
    }
    let device = match factory.create() {
        Ok(d) => d,
        Err(e) => return TraceOutcome::Failed(format!("the factory failed: {e}")),
    };
    if trace.header.initial_zeroes {
        if let Err(e) = device.write_zeroes(0, trace.header.size, true) {
            return TraceOutcome::Failed(format!("cannot zero the device first: {e}"));
        }
    }
    let device: Box<dyn BlockDevice> = device;
    match replay_on(rig, device, &trace) {
        Ok(r) => TraceOutcome::Passed(format!("{} ms, {r}", t.elapsed().as_millis())),
        Err(e) => TraceOutcome::Failed(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::LoopbackRig;
    use userblk::MemDevice;

    #[test]
    fn skips_say_what_is_missing() {
        let why = missing_transport(false, true).unwrap();
        assert!(why.starts_with("not root"), "{why}");
        assert!(why.contains("userblk vm -- cargo test"), "{why}");
        let why = missing_transport(true, false).unwrap();
        assert!(why.contains("nbd module is not loaded"), "{why}");
        assert_eq!(missing_transport(true, true), None);
    }

    #[test]
    fn a_correct_device_passes_through_the_loopback() {
        let t = KernelTest {
            random: RandomConfig {
                runs: 2,
                ops: 50,
                ..RandomConfig::default()
            },
            ..KernelTest::default()
        };
        let t = KernelTest {
            traces: Traces::All,
            ..t
        };
        let r = t.run_on(&LoopbackRig::default(), &crate::factory::mem(64 << 20));
        assert!(r.passed(), "{r}");
        assert_eq!(r.traces.len(), 4, "{r}");
        assert!(
            r.traces
                .iter()
                .all(|(_, o)| matches!(o, TraceOutcome::Passed(_))),
            "{r}"
        );
        assert!(r.to_string().ends_with("passed\n"), "{r}");
    }

    /// A device that drops every write past its first MiB (a "cache" that never reaches the
    /// backing store beyond it).
    struct ForgetsWrites(MemDevice);

    impl BlockDevice for ForgetsWrites {
        fn blocks(&self) -> u64 {
            self.0.blocks()
        }
        fn block_size(&self) -> u32 {
            self.0.block_size()
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            self.0.read(offset, buf)
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            if offset < 1 << 20 {
                self.0.write(offset, data)
            } else {
                Ok(())
            }
        }
    }

    #[test]
    fn a_device_that_loses_writes_fails_and_small_devices_skip_traces() {
        let t = KernelTest {
            random: RandomConfig {
                runs: 2,
                ops: 50,
                shrink_attempts: 20,
                ..RandomConfig::default()
            },
            ..KernelTest::default()
        };
        let r = t.run_on(&LoopbackRig::default(), &|| {
            ForgetsWrites(MemDevice::new(16 << 20))
        });
        assert!(!r.passed());
        assert!(r.conformance.failures().next().is_some(), "{r}");
        assert!(r.random.is_err(), "{r}");
        assert!(
            r.traces.iter().any(
                |(_, o)| matches!(o, TraceOutcome::Skipped(s) if s.contains("needs a device of"))
            ),
            "the 64 MiB ext4 traces do not fit 16 MiB: {r}"
        );
        assert!(r.to_string().ends_with("FAILED\n"));
        let run = KernelRun::Ran(Box::new(r));
        assert!(!run.passed());
        let panicked =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run.assert_passed()));
        assert!(panicked.is_err(), "assert_passed panics on a failure");
    }

    #[test]
    fn each_kernel_replays_its_own_traces() {
        let files: Vec<PathBuf> = [
            "ext4-6.1.ubt",
            "ext4-6.12.ubt",
            "fio-6.1.ubt",
            "fio-6.12.ubt",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        let names = |v: Vec<PathBuf>| -> Vec<String> {
            v.iter().map(|p| p.display().to_string()).collect()
        };
        let on = |release| names(select_traces(files.clone(), Traces::ThisKernel, release));
        assert_eq!(on("6.1.0-57-amd64"), ["ext4-6.1.ubt", "fio-6.1.ubt"]);
        assert_eq!(
            on("6.12.117+deb12-amd64"),
            ["ext4-6.12.ubt", "fio-6.12.ubt"]
        );
        assert_eq!(
            on("6.8.0-45-generic").len(),
            4,
            "no trace of 6.8: all of them"
        );
        assert_eq!(select_traces(files.clone(), Traces::All, "6.1.0").len(), 4);
        assert!(select_traces(files, Traces::Off, "6.1.0").is_empty());
    }

    #[test]
    fn a_skip_passes() {
        let run = KernelRun::Skipped("not root".into());
        assert!(run.passed());
        run.assert_passed();
    }
}
