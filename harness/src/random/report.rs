//! How a random test fails: the kinds of failure, one failed run ([`Failure`]) and what
//! [`random_test`](super::random_test) hands back ([`RandomFailure`]), printed with the kind and
//! what went wrong on the first line, then the seed, the explanation with hex dumps, the history
//! of the block concerned and the shrunk operations as a script.

use std::fmt;

use super::generate::ModelOp;
use super::Mode;
use crate::script::Script;

/// What kind of failure a run found. Shrinking keeps only smaller runs that fail the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureKind {
    /// A read returned a value that an acknowledged write had replaced before the read began,
    /// and a later read of the block returned a newer one: the read came too late, from a stale
    /// copy.
    StaleRead,
    /// As a stale read, but the block still held the old value when it was last read (after
    /// every client thread had finished): the acknowledged write is gone.
    LostWrite,
    /// One block held parts of two writes.
    TornRead,
    /// After a clean disconnect (the server unmounted the device) and re-opening the same
    /// storage, a block did not hold what was read back just before.
    LostAcrossDisconnect,
    /// A read returned bytes no write put there (nor the block's initial content), or the data
    /// of a write that began only after the read completed: the device did not fill the buffer
    /// it answered with.
    UnfilledRead,
    /// An operation did not complete: the device or the server never answered.
    Stall,
    /// An operation failed with an error.
    OpFailed,
    /// Serving ended with an error (a protocol violation, a server error) when detaching.
    ServingError,
    /// The device could not be made or attached.
    Setup,
}

impl FailureKind {
    /// The words that start the report: `stale read`, `lost write`, ...
    pub fn name(&self) -> &'static str {
        match self {
            FailureKind::StaleRead => "stale read",
            FailureKind::LostWrite => "lost write",
            FailureKind::TornRead => "torn read",
            FailureKind::LostAcrossDisconnect => "lost across disconnect",
            FailureKind::UnfilledRead => "unfilled read",
            FailureKind::Stall => "stall",
            FailureKind::OpFailed => "operation failed",
            FailureKind::ServingError => "serving error",
            FailureKind::Setup => "could not run",
        }
    }

    /// Whether the history checker finds it (rather than the runner).
    pub fn from_checker(&self) -> bool {
        matches!(
            self,
            FailureKind::StaleRead
                | FailureKind::LostWrite
                | FailureKind::TornRead
                | FailureKind::LostAcrossDisconnect
                | FailureKind::UnfilledRead
        )
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One failed run.
#[derive(Clone, Debug)]
pub struct Failure {
    /// The kind.
    pub kind: FailureKind,
    /// One line: what went wrong.
    pub summary: String,
    /// The explanation, with hex dumps.
    pub details: String,
    /// The operations that touched the block concerned, in order, or those in flight.
    pub history: String,
    /// The block concerned, if one is.
    pub block: Option<u64>,
    /// The operation concerned: an index into the run's [`History::events`](super::History).
    pub event: Option<usize>,
}

impl Failure {
    /// A failure with no history.
    pub fn new(kind: FailureKind, summary: impl Into<String>) -> Failure {
        Failure {
            kind,
            summary: summary.into(),
            details: String::new(),
            history: String::new(),
            block: None,
            event: None,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}: {}", self.kind, self.summary)?;
        for line in self.details.lines().chain(self.history.lines()) {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

/// A failed random test, shrunk.
#[derive(Clone, Debug)]
pub struct RandomFailure {
    /// The seed of the failing run (`--seed` reproduces its operations as the first run).
    pub seed: u64,
    /// How it ran.
    pub mode: Mode,
    /// What kind of failure.
    pub kind: FailureKind,
    /// What went wrong: the kind and a summary on the first line, then the explanation and hex
    /// dumps.
    pub message: String,
    /// The operations that touched the block concerned (thread, invocation and completion
    /// order, what each read returned).
    pub history: String,
    /// Operations in the run as generated.
    pub original_len: usize,
    /// The shrunk operations, thread after thread.
    pub ops: Vec<ModelOp>,
    /// The shrunk operations of each client thread (one list in sequential mode).
    pub threads: Vec<Vec<ModelOp>>,
    /// The shrunk run as a script, with the replies the model allows.
    pub script: Script,
    /// How shrinking went, in words.
    pub shrinking: String,
}

impl RandomFailure {
    /// Builds the report of `failure` found in the run of `seed`.
    pub(crate) fn new(
        seed: u64,
        mode: Mode,
        failure: &Failure,
        original_len: usize,
        threads: Vec<Vec<ModelOp>>,
        script: Script,
        shrinking: String,
    ) -> RandomFailure {
        let mut message = format!("{}: {}", failure.kind, failure.summary);
        if !failure.details.is_empty() {
            message.push('\n');
            message.push_str(failure.details.trim_end());
        }
        RandomFailure {
            seed,
            mode,
            kind: failure.kind,
            message,
            history: failure.history.clone(),
            original_len,
            ops: threads.iter().flatten().copied().collect(),
            threads,
            script,
            shrinking,
        }
    }
}

impl fmt::Display for RandomFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut lines = self.message.lines();
        writeln!(f, "{}", lines.next().unwrap_or_default())?;
        writeln!(
            f,
            "  random test, seed {} ({}): the seed reproduces the operations{}",
            self.seed,
            self.mode,
            match self.mode {
                Mode::Sequential => "",
                Mode::Concurrent { .. } => " and the delays, not the threads' timing",
            }
        )?;
        for line in lines {
            writeln!(f, "  {line}")?;
        }
        for line in self.history.lines() {
            writeln!(f, "  {line}")?;
        }
        writeln!(f, "  {}", self.shrinking)?;
        if !self.script.steps.is_empty() {
            writeln!(f, "  as a script (paste it into a regression test):")?;
            for line in self.script.to_string().lines() {
                writeln!(f, "    {line}")?;
            }
        }
        Ok(())
    }
}
