//! The conformance suite: what every [`BlockDevice`] served through userblk must do, as a list
//! of plain public functions (one per case) and [`run_all`], in the style of object_store's
//! integration suite.
//!
//! Each case takes an [`Env`]: a [`Rig`] that serves devices (the loopback fake kernel in
//! `cargo test`, `/dev/nbdN` in the VM), a factory that makes a fresh device under test, and
//! the capabilities the device claims, which decide what is checked (e.g. whether trimmed ranges
//! must read as zeroes). Cases attach a fresh device each, so they are independent.
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
mod durability;

use std::fmt;
use std::time::{Duration, Instant};

use userblk::{BlockDevice, Capabilities};

use crate::factory::DeviceFactory;
use crate::target::{Attached, Rig};

pub use cases::*;
pub use devices::{Call, CallKind, CallLog, Counting, FailingRange, Fault, ReadOnly};
pub use durability::*;

/// Why a case did not pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The device (or the serving stack) did something wrong; the message says what.
    Failed(String),
    /// The case does not apply (e.g. trim on a device without trim).
    Skipped(String),
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
        Env { rig, factory, caps }
    }

    /// A fresh device from the factory.
    pub fn create(&self) -> Result<Box<dyn BlockDevice>, Failure> {
        self.factory
            .create()
            .map_err(|e| Failure::failed(format!("the factory could not make a device: {e}")))
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
}

/// One case of the suite.
#[derive(Clone, Copy)]
pub struct Case {
    /// Its name (the function's).
    pub name: &'static str,
    /// What it checks, in a line.
    pub about: &'static str,
    /// The case.
    pub run: fn(&Env<'_>) -> CaseResult,
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Case").field("name", &self.name).finish()
    }
}

/// How a case ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Passed.
    Pass,
    /// Failed, with the reason.
    Fail(String),
    /// Did not apply, with the reason.
    Skip(String),
}

/// A case's result in a [`Report`].
#[derive(Clone, Debug)]
pub struct CaseReport {
    /// The case's name.
    pub name: &'static str,
    /// How it ended.
    pub outcome: Outcome,
    /// How long it took.
    pub elapsed: Duration,
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

    /// Whether no case failed.
    pub fn all_passed(&self) -> bool {
        self.failures().next().is_none()
    }

    /// The case of this name.
    pub fn case(&self, name: &str) -> Option<&CaseReport> {
        self.cases.iter().find(|c| c.name == name)
    }

    /// (passed, failed, skipped).
    pub fn counts(&self) -> (usize, usize, usize) {
        let n = |f: fn(&Outcome) -> bool| self.cases.iter().filter(|c| f(&c.outcome)).count();
        (
            n(|o| *o == Outcome::Pass),
            n(|o| matches!(o, Outcome::Fail(_))),
            n(|o| matches!(o, Outcome::Skip(_))),
        )
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (p, x, s) = self.counts();
        writeln!(
            f,
            "conformance ({}): {p} passed, {x} failed, {s} skipped",
            self.rig
        )?;
        for c in &self.cases {
            let ms = c.elapsed.as_millis();
            match &c.outcome {
                Outcome::Pass => writeln!(f, "  ok    {:<32} {ms:>6} ms", c.name)?,
                Outcome::Skip(why) => writeln!(f, "  skip  {:<32} {why}", c.name)?,
                Outcome::Fail(why) => {
                    writeln!(f, "  FAIL  {:<32} {ms:>6} ms", c.name)?;
                    for line in why.lines() {
                        writeln!(f, "        {line}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Runs one case, turning a panic inside it into a failure.
pub fn run_case(env: &Env<'_>, case: &Case) -> CaseReport {
    let start = Instant::now();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (case.run)(env)));
    let outcome = match result {
        Ok(Ok(())) => Outcome::Pass,
        Ok(Err(Failure::Failed(m))) => Outcome::Fail(m),
        Ok(Err(Failure::Skipped(m))) => Outcome::Skip(m),
        Err(p) => Outcome::Fail(format!(
            "panicked: {}",
            p.downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)")
        )),
    };
    CaseReport {
        name: case.name,
        outcome,
        elapsed: start.elapsed(),
    }
}

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

/// Runs every case of [`cases`] against fresh devices from `factory`, served by `rig`.
pub fn run_all(rig: &dyn Rig, factory: &dyn DeviceFactory, caps: Capabilities) -> Report {
    run_cases(&Env::new(rig, factory, caps), &cases(), &mut |_, _| {})
}
