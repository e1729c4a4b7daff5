//! Replaying a [`Script`]: through [`LoopbackKernel`], or over a raw socket where the harness
//! checks the replies itself (see `raw.rs`); one step, or one group of steps in flight together,
//! at a time.

use std::fmt;
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::thread::{self, JoinHandle};

use userblk::link::loopback::{LoopbackLink, Op, Ticket};
use userblk::proto::{Command, Cookie, Request};
use userblk::server::export_of;
use userblk::{
    BlockDevice, LoopbackError, LoopbackKernel, LoopbackOptions, Server, ServerError, ServerOptions,
};

use super::judge::{judge, Actual, Context};
use super::raw::Raw;
use super::{Action, Expect, Script, Step};

/// The group of requests in flight together that a failed step belonged to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupSpan {
    /// The group's number in the script (from 1).
    pub number: usize,
    /// Its first and last step numbers (1-based, inclusive).
    pub steps: (usize, usize),
    /// Its first and last requests' lines, for parsed scripts.
    pub lines: Option<(usize, usize)>,
}

impl fmt::Display for GroupSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "group {} (steps {}-{}",
            self.number, self.steps.0, self.steps.1
        )?;
        if let Some((a, b)) = self.lines {
            write!(f, ", lines {a}-{b}")?;
        }
        f.write_str(")")
    }
}

/// A step whose outcome was not the one expected.
///
/// Printed as: the step, its line and group, and what was wrong in words on the first line;
/// then the step's text, what was expected, what came, and hex dumps of the bytes that differ.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepFailure {
    /// 1-based step number.
    pub step: usize,
    /// The script line, for parsed scripts.
    pub line: Option<usize>,
    /// The group the step was sent in, if any.
    pub group: Option<GroupSpan>,
    /// The step in the text format.
    pub text: String,
    /// What was wrong, in words.
    pub summary: String,
    /// What was expected.
    pub expected: String,
    /// What came.
    pub actual: String,
    /// For data that differs: a hex dump of the first differing bytes.
    pub diff: Option<String>,
}

impl fmt::Display for StepFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "step {}", self.step)?;
        if let Some(l) = self.line {
            write!(f, " (line {l})")?;
        }
        if let Some(g) = &self.group {
            write!(f, " in {g}")?;
        }
        write!(
            f,
            ": {}\n  step:     {}\n  expected: {}\n  actual:   {}",
            self.summary, self.text, self.expected, self.actual
        )?;
        if let Some(d) = &self.diff {
            write!(f, "\n  {}", d.replace('\n', "\n  "))?;
        }
        Ok(())
    }
}

/// Why a replay failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScriptError {
    /// A step's outcome was not the one expected.
    #[error("{0}")]
    Step(Box<StepFailure>),
    /// The connection closed (as expected) with steps still to run.
    #[error("{} step(s) left unused after the connection closed at step {after}: {}", steps.len(), steps.join("; "))]
    Unused {
        /// The step at which the connection closed.
        after: usize,
        /// The steps never run, in the text format.
        steps: Vec<String>,
    },
    /// The server or fake kernel could not be started.
    #[error("could not start: {0}")]
    Start(String),
    /// Every step passed, but serving ended badly (a server error, a protocol violation).
    #[error("after the last step: {0}")]
    End(String),
}

/// The request a step sends, with its offset resolved and its payload rendered.
pub(super) struct Resolved {
    pub request: Request,
    pub payload: Vec<u8>,
}

fn resolve(action: &Action, size: u64, cookie: Cookie) -> Result<Option<Resolved>, String> {
    let Action::Request {
        command,
        flags,
        offset,
        len,
        data,
    } = action
    else {
        return Ok(None);
    };
    let offset = offset
        .resolve(size)
        .ok_or_else(|| format!("offset {offset} falls outside 0..2^64 on a {size}-byte device"))?;
    let payload = match data {
        Some(d) if *command == Command::Write => d
            .render(offset, *len as usize)
            .map(|(bytes, _)| bytes)
            .ok_or_else(|| format!("data `{d}` does not add up to {len} bytes"))?,
        _ => Vec::new(),
    };
    Ok(Some(Resolved {
        request: Request {
            command: *command,
            flags: *flags,
            cookie,
            offset,
            len: *len,
        },
        payload,
    }))
}

/// Why a step cannot be sent in a group (the parser refuses these; a built script may hold
/// them).
fn misfit_in_group(step: &Step) -> Option<&'static str> {
    match (&step.action, &step.expect) {
        (Action::Raw(_), _) => Some("a raw step cannot be in a group"),
        (Action::Eof, _) => Some("eof cannot be in a group"),
        (
            Action::Request {
                command: Command::Disc,
                ..
            },
            _,
        ) => Some("disc cannot be in a group"),
        (_, Expect::Closed | Expect::Nothing) => {
            Some("`closed` and `none` cannot be expected in a group")
        }
        _ => None,
    }
}

/// The steps sent together from `start`: its group's run, or the step alone.
fn unit(steps: &[Step], start: usize) -> Range<usize> {
    let Some(g) = steps[start].group else {
        return start..start + 1;
    };
    let len = steps[start..]
        .iter()
        .take_while(|s| s.group == Some(g))
        .count();
    start..start + len
}

/// Runs the steps on an engine, a step or a group at a time, and judges each.
fn drive(script: &Script, engine: &mut dyn Engine) -> Result<(), ScriptError> {
    let seeds = script.seeds();
    let size = engine.size();
    let steps = &script.steps;
    let mut start = 0;
    while start < steps.len() {
        let range = unit(steps, start);
        let group = steps[start].group.map(|number| GroupSpan {
            number,
            steps: (range.start + 1, range.end),
            lines: steps[range.start]
                .line
                .zip(steps[range.end - 1].line)
                .filter(|_| range.len() > 1),
        });
        let fail = |i: usize, summary: String, actual: String, diff: Option<String>| {
            ScriptError::Step(Box::new(StepFailure {
                step: i + 1,
                line: steps[i].line,
                group: group.clone(),
                text: steps[i].to_string(),
                summary,
                expected: steps[i].expect.to_string(),
                actual,
                diff,
            }))
        };
        let mut sent = Vec::with_capacity(range.len());
        for i in range.clone() {
            let not_sent =
                |why: String| fail(i, format!("not sent: {why}"), "nothing".into(), None);
            if group.is_some() {
                if let Some(why) = misfit_in_group(&steps[i]) {
                    return Err(not_sent(why.into()));
                }
            }
            sent.push(resolve(&steps[i].action, size, Cookie(i as u64 + 1)).map_err(not_sent)?);
        }
        let offsets: Vec<u64> = sent
            .iter()
            .map(|r| r.as_ref().map_or(0, |r| r.request.offset))
            .collect();
        let actuals = if group.is_some() {
            engine.exec_group(sent.into_iter().flatten().collect())
        } else {
            vec![engine.exec(&steps[start], sent.pop().flatten())]
        };
        let mut closed = false;
        for ((i, actual), offset) in range.clone().zip(actuals).zip(offsets) {
            closed |= matches!(actual, Actual::Closed);
            let cx = Context {
                offset,
                seeds: &seeds,
                block_size: engine.block_size(),
            };
            if let Err(m) = judge(&steps[i].expect, &actual, &cx) {
                return Err(fail(i, m.summary, m.actual, m.diff));
            }
        }
        if closed && range.end < steps.len() {
            return Err(ScriptError::Unused {
                after: range.end,
                steps: steps[range.end..].iter().map(Step::to_string).collect(),
            });
        }
        start = range.end;
    }
    engine.finish().map_err(ScriptError::End)
}

/// What replays steps: the fake kernel or a raw socket.
pub(super) trait Engine {
    /// The device size in bytes.
    fn size(&self) -> u64;
    /// The logical block size, for `any-of`.
    fn block_size(&self) -> u64;
    /// Sends one step and waits for its outcome.
    fn exec(&mut self, step: &Step, req: Option<Resolved>) -> Actual;
    /// Sends every request before waiting for any reply; the outcomes in the requests' order.
    fn exec_group(&mut self, reqs: Vec<Resolved>) -> Vec<Actual>;
    /// Ends the connection; how serving ended.
    fn finish(&mut self) -> Result<(), String>;
}

struct Loopback {
    kernel: Option<LoopbackKernel>,
    size: u64,
    block_size: u64,
    /// Requests the fake kernel can have in flight (its tags), the most a group may hold:
    /// `submit` waits for a free tag, and none frees before the group is waited for.
    tags: usize,
}

fn outcome(result: Result<Vec<u8>, LoopbackError>) -> Actual {
    match result {
        Ok(data) => Actual::Ok(data),
        Err(LoopbackError::Reply { errno, .. }) => Actual::Errno(errno.0),
        Err(LoopbackError::Violation(v)) => Actual::Violation(v.to_string()),
        Err(LoopbackError::Disconnected { .. }) => Actual::Closed,
        Err(e) => Actual::Failed(e.to_string()),
    }
}

fn op(r: &Resolved) -> Op<'_> {
    Op {
        command: r.request.command,
        flags: r.request.flags,
        offset: r.request.offset,
        len: r.request.len,
        data: &r.payload,
    }
}

impl Engine for Loopback {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u64 {
        self.block_size
    }

    fn exec(&mut self, _step: &Step, req: Option<Resolved>) -> Actual {
        let Some(r) = req else {
            return Actual::Failed("raw steps need Script::replay_raw".into());
        };
        if r.request.command == Command::Disc {
            return match self.kernel.take().map(LoopbackKernel::shutdown) {
                Some(Ok(())) | None => Actual::Closed,
                Some(Err(e)) => Actual::Failed(format!("disconnect: {e}")),
            };
        }
        let Some(kernel) = &self.kernel else {
            return Actual::Closed;
        };
        outcome(kernel.submit(op(&r)).and_then(|t| kernel.wait(t)))
    }

    fn exec_group(&mut self, reqs: Vec<Resolved>) -> Vec<Actual> {
        let Some(kernel) = &self.kernel else {
            return reqs.iter().map(|_| Actual::Closed).collect();
        };
        if reqs.len() > self.tags {
            let why = format!(
                "a group of {} requests is more than the fake kernel's {} tags \
                 (LoopbackOptions::queue_depth times connections)",
                reqs.len(),
                self.tags
            );
            return reqs.iter().map(|_| Actual::Failed(why.clone())).collect();
        }
        // Every request is submitted before any is waited for: they are in flight together.
        let tickets: Vec<Result<Ticket, LoopbackError>> =
            reqs.iter().map(|r| kernel.submit(op(r))).collect();
        tickets
            .into_iter()
            .map(|t| outcome(t.and_then(|t| kernel.wait(t))))
            .collect()
    }

    fn finish(&mut self) -> Result<(), String> {
        match self.kernel.take() {
            Some(k) => k.shutdown().map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }
}

impl Script {
    /// Replays the script against `device`: through [`LoopbackKernel`] with default options,
    /// or, when it has `raw` or `eof` steps, through a raw socket (see [`Script::replay_raw`]).
    pub fn replay<D: BlockDevice + 'static>(&self, device: D) -> Result<(), ScriptError> {
        if self.needs_raw() {
            self.replay_raw(device)
        } else {
            self.replay_loopback(device, LoopbackOptions::default())
        }
    }

    /// Replays through a [`LoopbackKernel`] with these options: each step is submitted as one
    /// request and waited for, a group's requests all submitted before any is waited for; the
    /// fake kernel's reply checks apply. `raw` and `eof` steps fail, and so does a group of
    /// more requests than the fake kernel has tags (`queue_depth` times `connections`).
    pub fn replay_loopback<D: BlockDevice + 'static>(
        &self,
        device: D,
        options: LoopbackOptions,
    ) -> Result<(), ScriptError> {
        let tags = usize::from(options.resolved_profile().queue_depth)
            .saturating_mul(options.connections.max(1));
        let kernel = LoopbackKernel::with_options(device, options)
            .map_err(|e| ScriptError::Start(e.to_string()))?;
        let size = kernel.size();
        let block_size = u64::from(kernel.export().block_size);
        drive(
            self,
            &mut Loopback {
                kernel: Some(kernel),
                size,
                block_size,
                tags,
            },
        )
    }

    /// Replays over a raw socket to a [`Server`] for `device`, checking every reply (magic,
    /// cookie, no bytes after an error reply, a READ's full payload). A step is sent and its
    /// reply read before the next; a group's requests are all written before its replies are
    /// read, and the replies matched to them by cookie in whatever order they come.
    pub fn replay_raw<D: BlockDevice + 'static>(&self, device: D) -> Result<(), ScriptError> {
        let start = |e: &dyn fmt::Display| ScriptError::Start(e.to_string());
        let export = export_of(&device).map_err(|e| start(&e))?;
        let (link, mut ends) = LoopbackLink::new(1).map_err(|e| start(&e))?;
        let mut server =
            Server::with_options(device, link, ServerOptions::default()).map_err(|e| start(&e))?;
        let handle = thread::Builder::new()
            .name("userblk-script-server".into())
            .spawn(move || server.run())
            .map_err(|e| start(&e))?;
        let sock = ends
            .pop()
            .ok_or_else(|| ScriptError::Start("no socket".into()))?;
        self.replay_on(
            sock,
            export.size,
            u64::from(export.block_size),
            Some(handle),
        )
    }

    /// Replays against any server on the other end of `sock` (serving a device of `size`
    /// bytes), checking its replies as [`Script::replay_raw`] does. `any-of` expectations are
    /// checked in 512-byte blocks; see [`Script::replay_socket_with`] for another block size.
    pub fn replay_socket(&self, sock: UnixStream, size: u64) -> Result<(), ScriptError> {
        self.replay_on(sock, size, 512, None)
    }

    /// [`Script::replay_socket`] for a device of `block_size`-byte logical blocks, the unit in
    /// which `any-of` expectations are checked.
    pub fn replay_socket_with(
        &self,
        sock: UnixStream,
        size: u64,
        block_size: u32,
    ) -> Result<(), ScriptError> {
        self.replay_on(sock, size, u64::from(block_size), None)
    }

    fn replay_on(
        &self,
        sock: UnixStream,
        size: u64,
        block_size: u64,
        server: Option<JoinHandle<Result<(), ServerError>>>,
    ) -> Result<(), ScriptError> {
        let mut raw = Raw::new(sock, size, block_size, server)
            .map_err(|e| ScriptError::Start(e.to_string()))?;
        drive(self, &mut raw)
    }
}
