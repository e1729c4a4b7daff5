//! The conformance suite: what every [`BlockDevice`] served through userblk must do, as a list
//! of plain public functions (one per case) and [`run_all`], in the style of object_store's
//! integration suite.
//!
//! Each case takes an [`Env`]: a [`Rig`] that serves devices (the loopback fake kernel in
//! `cargo test`, `/dev/nbdN` in the VM), a factory that makes a fresh device under test, and
//! the capabilities the device claims, which decide what is checked (e.g. whether trimmed ranges
//! must read as zeroes). Cases attach a fresh device each, so they are independent.
//!
//! A case is a **driver** check (what the device does with requests it is given) or a
//! **server** check (what the serving stack does with requests the device must never see: past
//! the end, misaligned, writes to a read-only export); see [`CaseKind`].
//!
//! Every case runs. Each ends in one of four [`Outcome`]s: it passed; it failed; it was
//! skipped because it does not apply to the device (trim on a device without trim: nothing to
//! check, nothing missed); or it **could not run** here ([`Outcome::NotRun`]: the factory's
//! devices are too small for it, or cannot be re-opened), so something was not checked.
//! [`Report::all_passed`] is true only when no case failed and every case ran; a caller who
//! knows a case cannot run on their rig says so by name, with [`Report::all_passed_except`]:
//!
//! ```
//! use userblk::{BlockDevice, MemDevice};
//! use userblk_harness::conformance::{self, Outcome};
//! use userblk_harness::target::LoopbackRig;
//!
//! // 256 KiB is too small for the cases that need megabytes of room.
//! let factory = || Box::new(MemDevice::new(256 << 10)) as Box<dyn BlockDevice>;
//! let report = conformance::run_all(&LoopbackRig::default(), &factory, factory().capabilities());
//! assert!(matches!(report.case("adjacent_writes").unwrap().outcome, Outcome::NotRun(_)));
//! assert!(!report.all_passed(), "cases that did not run are not passes");
//! let not_run: Vec<&str> = report.not_run().map(|c| c.name).collect();
//! assert!(report.all_passed_except(&not_run), "{report}");
//! ```
//!
//! ```
//! use userblk::BlockDevice;
//! use userblk_harness::conformance;
//! use userblk_harness::factory::{self, DeviceFactory};
//! use userblk_harness::target::LoopbackRig;
//!
//! // Re-openable (the durability cases disconnect and re-open) and crashable.
//! let factory = factory::mem(64 << 20);
//! let caps = factory.create()?.capabilities();
//! let report = conformance::run_all(&LoopbackRig::default(), &factory, caps);
//! assert!(report.all_passed(), "{report}");
//! # Ok::<(), std::io::Error>(())
//! ```

mod cases;
mod devices;

use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use userblk::{BlockDevice, Capabilities};

use crate::factory::DeviceFactory;
use crate::target::{Attached, Rig};

pub use cases::*;
pub use devices::{Call, CallKind, CallLog, Counting, FailingRange, Fault, ReadOnly};

/// Why a case did not pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The device (or the serving stack) did something wrong; the message says what, in words
    /// on its first line, details after.
    Failed(String),
    /// The case does not apply (e.g. trim on a device without trim).
    Skipped(String),
    /// The case could not run on this rig or with this factory (e.g. the device is too small,
    /// or cannot be re-opened); unlike a skip, this counts against [`Report::all_passed`].
    NotRun(String),
}

impl Failure {
    /// A failure with this message.
    pub fn failed(msg: impl Into<String>) -> Failure {
        Failure::Failed(msg.into())
    }

    /// A skip with this reason.
    pub fn skip(reason: impl Into<String>) -> Failure {
        Failure::Skipped(reason.into())
    }

    /// A case that could not run, with the reason.
    pub fn not_run(reason: impl Into<String>) -> Failure {
        Failure::NotRun(reason.into())
    }
}

/// What a case returns.
pub type CaseResult = Result<(), Failure>;

/// What a case runs against.
pub struct Env<'a> {
    /// Serves devices.
    pub rig: &'a dyn Rig,
    /// Makes a fresh device under test (and, where it can, storage to re-open).
    pub factory: &'a dyn DeviceFactory,
    /// What the device claims; decides what is checked.
    pub caps: Capabilities,
    notes: Mutex<Vec<String>>,
}

impl fmt::Debug for Env<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Env")
            .field("rig", &self.rig.name())
            .field("caps", &self.caps)
            .finish_non_exhaustive()
    }
}

impl<'a> Env<'a> {
    /// An environment: `rig` serves devices from `factory`, which claim `caps`.
    pub fn new(rig: &'a dyn Rig, factory: &'a dyn DeviceFactory, caps: Capabilities) -> Env<'a> {
        Env {
            rig,
            factory,
            caps,
            notes: Mutex::new(Vec::new()),
        }
    }

    /// A fresh device from the factory.
    pub fn create(&self) -> Result<Box<dyn BlockDevice>, Failure> {
        self.factory
            .create()
            .map_err(|e| Failure::failed(format!("the factory could not make a device: {e}")))
    }

    /// Skips the case when the rig does not serve the device the case makes (an external NBD
    /// server with its own disk): for cases that inspect that device.
    pub fn needs_own_device(&self) -> Result<(), Failure> {
        if self.rig.serves_given_device() {
            Ok(())
        } else {
            Err(Failure::skip(
                "the server serves its own disk: this case inspects the device the harness made",
            ))
        }
    }

    /// Serves a fresh device from the factory.
    pub fn attach(&self) -> Result<Box<dyn Attached>, Failure> {
        self.attach_device(self.create()?)
    }

    /// Serves `device` (usually the factory's, wrapped).
    pub fn attach_device(
        &self,
        device: Box<dyn BlockDevice>,
    ) -> Result<Box<dyn Attached>, Failure> {
        self.rig
            .attach(device)
            .map_err(|e| Failure::failed(format!("could not attach the device: {e}")))
    }

    /// Records a note for the report, e.g. how a case checked what it checked on this rig.
    /// Notes are kept whatever the outcome, and shown under the case.
    pub fn note(&self, note: impl Into<String>) {
        self.notes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(note.into());
    }

    fn take_notes(&self) -> Vec<String> {
        std::mem::take(&mut *self.notes.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// What a case checks: the device, or the serving stack in front of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CaseKind {
    /// What the device does with the requests it is given.
    Driver,
    /// What the server does with requests the device must never see (past the end,
    /// misaligned, writes to a read-only export): its errno, and that the device was not called.
    /// Through the loopback these requests go straight to the server; through a real kernel
    /// the block layer refuses them first, so the case checks what the kernel returns (and says
    /// so in a note).
    Server,
}

impl fmt::Display for CaseKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CaseKind::Driver => "driver",
            CaseKind::Server => "server",
        })
    }
}

/// One case of the suite.
#[derive(Clone, Copy)]
pub struct Case {
    /// Its name (the function's).
    pub name: &'static str,
    /// What it checks, in a line.
    pub about: &'static str,
    /// Whether it checks the driver or the server.
    pub kind: CaseKind,
    /// The case.
    pub run: fn(&Env<'_>) -> CaseResult,
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Case")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish()
    }
}

/// How a case ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Passed.
    Pass,
    /// Failed, with the reason (what went wrong in words on the first line, details after).
    Fail(String),
    /// Did not apply to the device, with the reason. Not a problem.
    Skip(String),
    /// Could not run on this rig or with this factory, with the reason: something was not
    /// checked. Counts against [`Report::all_passed`] unless excused by name with
    /// [`Report::all_passed_except`].
    NotRun(String),
}

/// A case's result in a [`Report`].
#[derive(Clone, Debug)]
pub struct CaseReport {
    /// The case's name.
    pub name: &'static str,
    /// Whether it checks the driver or the server.
    pub kind: CaseKind,
    /// How it ended.
    pub outcome: Outcome,
    /// How long it took.
    pub elapsed: Duration,
    /// What the case said about how it ran (see [`Env::note`]).
    pub notes: Vec<String>,
}

/// How many cases ended each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Passed.
    pub passed: usize,
    /// Failed.
    pub failed: usize,
    /// Did not apply.
    pub skipped: usize,
    /// Could not run.
    pub not_run: usize,
}

/// The results of a run.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The rig's name.
    pub rig: String,
    /// One entry per case, in order.
    pub cases: Vec<CaseReport>,
}

impl Report {
    /// Cases that failed.
    pub fn failures(&self) -> impl Iterator<Item = &CaseReport> {
        self.cases
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::Fail(_)))
    }

    /// Cases that could not run.
    pub fn not_run(&self) -> impl Iterator<Item = &CaseReport> {
        self.cases
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::NotRun(_)))
    }

    /// Whether every case ran and none failed (skipped cases, which do not apply, are fine).
    pub fn all_passed(&self) -> bool {
        self.all_passed_except(&[])
    }

    /// Whether no case failed and every case ran, except the cases named in `may_not_run`,
    /// which may end [`Outcome::NotRun`]: the caller's way to say "this rig cannot run that
    /// case, I know". A name excuses only a case that could not run, never a failure.
    pub fn all_passed_except(&self, may_not_run: &[&str]) -> bool {
        self.failures().next().is_none() && self.not_run().all(|c| may_not_run.contains(&c.name))
    }

    /// The case of this name.
    pub fn case(&self, name: &str) -> Option<&CaseReport> {
        self.cases.iter().find(|c| c.name == name)
    }

    /// How many cases ended each way.
    pub fn counts(&self) -> Counts {
        let mut n = Counts::default();
        for c in &self.cases {
            match c.outcome {
                Outcome::Pass => n.passed += 1,
                Outcome::Fail(_) => n.failed += 1,
                Outcome::Skip(_) => n.skipped += 1,
                Outcome::NotRun(_) => n.not_run += 1,
            }
        }
        n
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.counts();
        writeln!(
            f,
            "conformance ({}): {} passed, {} failed, {} skipped, {} not run",
            self.rig, n.passed, n.failed, n.skipped, n.not_run
        )?;
        for c in &self.cases {
            let ms = c.elapsed.as_millis();
            let (name, kind) = (c.name, c.kind);
            match &c.outcome {
                Outcome::Pass => writeln!(f, "  ok       {kind}  {name:<32} {ms:>6} ms")?,
                Outcome::Skip(why) => writeln!(f, "  skip     {kind}  {name:<32} {why}")?,
                Outcome::NotRun(why) => writeln!(f, "  NOT RUN  {kind}  {name:<32} {why}")?,
                Outcome::Fail(why) => {
                    writeln!(f, "  FAIL     {kind}  {name:<32} {ms:>6} ms")?;
                    for line in why.lines() {
                        writeln!(f, "           {line}")?;
                    }
                }
            }
            for note in &c.notes {
                writeln!(f, "           note: {note}")?;
            }
        }
        Ok(())
    }
}

/// Runs one case, turning a panic inside it into a failure.
pub fn run_case(env: &Env<'_>, case: &Case) -> CaseReport {
    // A fresh environment per case, so that its notes are its own.
    let env = Env::new(env.rig, env.factory, env.caps);
    let start = Instant::now();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (case.run)(&env)));
    let outcome = match result {
        Ok(Ok(())) => Outcome::Pass,
        Ok(Err(Failure::Failed(m))) => Outcome::Fail(m),
        Ok(Err(Failure::Skipped(m))) => Outcome::Skip(m),
        Ok(Err(Failure::NotRun(m))) => Outcome::NotRun(m),
        Err(p) => Outcome::Fail(format!(
            "the case panicked: {}",
            p.downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)")
        )),
    };
    CaseReport {
        name: case.name,
        kind: case.kind,
        outcome,
        elapsed: start.elapsed(),
        notes: env.take_notes(),
    }
}

/// The cases that send the largest requests and many at once: those worth running again with
/// whole 32 MiB requests over several connections.
pub const LARGE_REQUEST_CASES: [&str; 3] = [
    "request_sizes",
    "in_flight_disjoint",
    "in_flight_overlapping",
];

/// Runs `cases` in order; `progress` is called before each with its index.
pub fn run_cases(env: &Env<'_>, cases: &[Case], progress: &mut dyn FnMut(usize, &Case)) -> Report {
    let mut report = Report {
        rig: env.rig.name(),
        cases: Vec::with_capacity(cases.len()),
    };
    for (i, case) in cases.iter().enumerate() {
        progress(i, case);
        report.cases.push(run_case(env, case));
    }
    report
}

/// Runs every case of [`cases`] against fresh devices from `factory`, served by `rig`. Every
/// case runs, the concurrent ones included; see [`Report::all_passed`] and
/// [`Report::all_passed_except`] for what counts as passing.
pub fn run_all(rig: &dyn Rig, factory: &dyn DeviceFactory, caps: Capabilities) -> Report {
    run_cases(&Env::new(rig, factory, caps), &cases(), &mut |_, _| {})
}
