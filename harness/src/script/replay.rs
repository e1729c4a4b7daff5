//! Replaying a [`Script`]: through [`LoopbackKernel`], or one request at a time over a raw
//! socket where the harness checks the replies itself.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use userblk::link::loopback::{LoopbackLink, Op};
use userblk::proto::{Command, Cookie, Errno, Reply, ReplyParseError, Request, REPLY_LEN};
use userblk::server::export_of;
use userblk::{
    BlockDevice, LoopbackError, LoopbackKernel, LoopbackOptions, Server, ServerError, ServerOptions,
};

use super::pattern::{first_difference, Data};
use super::{Action, Expect, Script, Step};

/// How long the raw replayer waits for a reply before failing the step.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long it watches for bytes after an error reply (payload that must not be there).
const TRAILING_WINDOW: Duration = Duration::from_millis(50);

/// A step whose outcome was not the one expected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepFailure {
    /// 1-based step number.
    pub step: usize,
    /// The script line, for parsed scripts.
    pub line: Option<usize>,
    /// The step in the text format.
    pub text: String,
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
        write!(
            f,
            ": {}\n  expected: {}\n  actual:   {}",
            self.text, self.expected, self.actual
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

/// What a step got back.
enum Actual {
    Ok(Vec<u8>),
    Errno(u32),
    Closed,
    Nothing,
    Violation(String),
    Failed(String),
}

/// The request a step sends, with its offset resolved and its payload rendered.
struct Resolved {
    request: Request,
    payload: Vec<u8>,
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

/// Compares an outcome with the expectation; `Err` is the failure (without step details).
fn judge(
    expect: &Expect,
    actual: Actual,
    offset: u64,
    seeds: &[u64],
    block_size: u64,
) -> Result<(), (String, Option<String>)> {
    let describe = |a: &Actual| match a {
        Actual::Ok(d) if d.is_empty() => "ok".to_string(),
        Actual::Ok(d) => format!("ok, data {}", Data::describe(d, offset, 512, seeds)),
        Actual::Errno(e) => format!("error {}", Errno(*e)),
        Actual::Closed => "the connection closed without a reply".into(),
        Actual::Nothing => "nothing read".into(),
        Actual::Violation(v) => format!("protocol violation: {v}"),
        Actual::Failed(f) => format!("failed: {f}"),
    };
    match (expect, &actual) {
        (Expect::Ok, Actual::Ok(_)) | (Expect::Closed, Actual::Closed) => Ok(()),
        (Expect::Nothing, Actual::Nothing) => Ok(()),
        (Expect::Errno(e), Actual::Errno(a)) if e == a => Ok(()),
        (Expect::Data(d), Actual::Ok(bytes)) => match d.render(offset, bytes.len()) {
            None => Err((
                format!("{d}"),
                Some(format!(
                    "the expected data does not add up to the {} bytes returned",
                    bytes.len()
                )),
            )),
            Some((want, mask)) => match first_difference(&want, bytes, mask.as_deref(), offset) {
                None => Ok(()),
                Some(diff) => Err((describe(&actual), Some(diff))),
            },
        },
        (Expect::AnyOf(alts), Actual::Ok(bytes)) => any_of(alts, bytes, offset, block_size)
            .map_err(|(why, diff)| {
                (
                    format!("{why}; the read returned {}", describe(&actual)),
                    Some(diff),
                )
            }),
        _ => Err((describe(&actual), None)),
    }
}

/// Checks `bytes`, read at device offset `offset`, block by block against the alternatives:
/// each logical block (the part of it inside the read) must equal the same block of one of
/// them. `Err` says which block matched none, with a dump of how it differs from each.
fn any_of(
    alts: &[Data],
    bytes: &[u8],
    offset: u64,
    block_size: u64,
) -> Result<(), (String, String)> {
    let mut rendered = Vec::with_capacity(alts.len());
    for d in alts {
        match d.render(offset, bytes.len()) {
            Some(r) => rendered.push(r),
            None => {
                return Err((
                    format!(
                        "the alternative `{d}` does not add up to the {} bytes returned",
                        bytes.len()
                    ),
                    String::new(),
                ))
            }
        }
    }
    let bs = block_size.max(1);
    let mut at = 0usize;
    while at < bytes.len() {
        let abs = offset + at as u64;
        let end = (at as u64 + (bs - abs % bs)).min(bytes.len() as u64) as usize;
        let block_matches = |(want, mask): &(Vec<u8>, Option<Vec<bool>>)| {
            (at..end).all(|i| mask.as_ref().is_some_and(|m| !m[i]) || want[i] == bytes[i])
        };
        if !rendered.iter().any(block_matches) {
            let mut dumps = Vec::new();
            for (k, (want, mask)) in rendered.iter().enumerate() {
                // Only this block's bytes count: the dump shows where it differs.
                let in_block: Vec<bool> = (0..bytes.len())
                    .map(|i| (at..end).contains(&i) && mask.as_ref().is_none_or(|m| m[i]))
                    .collect();
                if let Some(d) = first_difference(want, bytes, Some(&in_block), offset) {
                    dumps.push(format!("against alternative {} ({}): {d}", k + 1, alts[k]));
                }
            }
            return Err((
                format!(
                    "block {} (device bytes {abs}..{}, {bs}-byte blocks) matches none of the {} \
                     alternatives: a torn or lost write",
                    abs / bs,
                    offset + end as u64,
                    alts.len()
                ),
                dumps.join("\n"),
            ));
        }
        at = end;
    }
    Ok(())
}

/// Runs steps on an engine and judges each.
fn drive(script: &Script, engine: &mut dyn Engine) -> Result<(), ScriptError> {
    let seeds = script.seeds();
    let size = engine.size();
    for (i, step) in script.steps.iter().enumerate() {
        let fail = |expected: String, actual: String, diff: Option<String>| {
            ScriptError::Step(Box::new(StepFailure {
                step: i + 1,
                line: step.line,
                text: step.to_string(),
                expected,
                actual,
                diff,
            }))
        };
        let resolved = resolve(&step.action, size, Cookie(i as u64 + 1))
            .map_err(|e| fail(step.expect.to_string(), format!("not sent: {e}"), None))?;
        let offset = resolved.as_ref().map_or(0, |r| r.request.offset);
        let actual = engine.exec(step, resolved);
        let closed = matches!(actual, Actual::Closed);
        if let Err((actual, diff)) =
            judge(&step.expect, actual, offset, &seeds, engine.block_size())
        {
            return Err(fail(step.expect.to_string(), actual, diff));
        }
        if closed && i + 1 < script.steps.len() {
            return Err(ScriptError::Unused {
                after: i + 1,
                steps: script.steps[i + 1..].iter().map(Step::to_string).collect(),
            });
        }
    }
    engine.finish().map_err(ScriptError::End)
}

trait Engine {
    fn size(&self) -> u64;
    /// The logical block size, for `any-of`.
    fn block_size(&self) -> u64;
    fn exec(&mut self, step: &Step, req: Option<Resolved>) -> Actual;
    fn finish(&mut self) -> Result<(), String>;
}

struct Loopback {
    kernel: Option<LoopbackKernel>,
    size: u64,
    block_size: u64,
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
        let op = Op {
            command: r.request.command,
            flags: r.request.flags,
            offset: r.request.offset,
            len: r.request.len,
            data: &r.payload,
        };
        match kernel.submit(op).and_then(|t| kernel.wait(t)) {
            Ok(data) => Actual::Ok(data),
            Err(LoopbackError::Reply { errno, .. }) => Actual::Errno(errno.0),
            Err(LoopbackError::Violation(v)) => Actual::Violation(v.to_string()),
            Err(LoopbackError::Disconnected { .. }) => Actual::Closed,
            Err(e) => Actual::Failed(e.to_string()),
        }
    }

    fn finish(&mut self) -> Result<(), String> {
        match self.kernel.take() {
            Some(k) => k.shutdown().map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }
}

/// The harness as the kernel, one request at a time over a socket it holds.
struct Raw {
    sock: UnixStream,
    size: u64,
    block_size: u64,
    server: Option<JoinHandle<Result<(), ServerError>>>,
    /// The server was expected to close the connection, so an error it ends with is expected.
    closing_expected: bool,
    /// The last error reply, to explain a desynchronised stream.
    last_error: Option<(Request, u32)>,
}

fn read_full(sock: &mut UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match sock.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl Raw {
    /// Reads the reply to `req` (cookie, command, offset, length as sent) and checks it.
    fn reply(&mut self, req: Option<Request>) -> Actual {
        let mut header = [0u8; REPLY_LEN];
        let got = match read_full(&mut self.sock, &mut header) {
            Ok(n) => n,
            Err(e) if timed_out(&e) => {
                return Actual::Failed(format!("no reply within {} s", REPLY_TIMEOUT.as_secs()))
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Actual::Closed,
            Err(e) => return Actual::Failed(e.to_string()),
        };
        if got == 0 {
            return Actual::Closed;
        }
        let after = match self.last_error {
            Some((r, e)) => format!(
                " (after the error reply {} to {} {})",
                Errno(e),
                r.command,
                r.cookie
            ),
            None => String::new(),
        };
        let reply = match Reply::parse(&header[..got]) {
            Ok(r) => r,
            Err(ReplyParseError::ShortHeader { len }) => {
                return Actual::Violation(format!(
                    "stream ended inside a reply header ({len} of {REPLY_LEN} bytes){after}"
                ))
            }
            Err(ReplyParseError::BadMagic { magic }) => {
                return Actual::Violation(format!("bad reply magic {magic:#010x}{after}"))
            }
        };
        let Some(req) = req else {
            return match reply.errno() {
                Some(e) => Actual::Errno(e.0),
                None => Actual::Ok(Vec::new()),
            };
        };
        if reply.cookie != req.cookie {
            return Actual::Violation(format!(
                "reply cookie {} does not match the request's {} ({} at {})",
                reply.cookie, req.cookie, req.command, req.offset
            ));
        }
        if let Some(errno) = reply.errno() {
            self.last_error = Some((req, reply.error));
            // Nothing may follow an error reply: the kernel would read it as the next header.
            let _ = self.sock.set_read_timeout(Some(TRAILING_WINDOW));
            let mut trailing = [0u8; 4096];
            let extra = self.sock.read(&mut trailing).unwrap_or(0);
            let _ = self.sock.set_read_timeout(Some(REPLY_TIMEOUT));
            if extra > 0 {
                return Actual::Violation(format!(
                    "{extra} byte(s) follow the error reply {errno} to {} {} at offset {}, {} bytes: \
                     no payload may follow an error reply (the kernel reads none, so the stream desyncs)",
                    req.command, req.cookie, req.offset, req.len
                ));
            }
            return Actual::Errno(errno.0);
        }
        self.last_error = None;
        if req.command != Command::Read {
            return Actual::Ok(Vec::new());
        }
        let mut data = vec![0u8; req.len as usize];
        match read_full(&mut self.sock, &mut data) {
            Ok(n) if n == data.len() => Actual::Ok(data),
            Ok(n) => Actual::Violation(format!(
                "stream ended after {n} of {} data bytes of READ {} at {}",
                req.len, req.cookie, req.offset
            )),
            Err(e) => Actual::Failed(e.to_string()),
        }
    }
}

impl Engine for Raw {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u64 {
        self.block_size
    }

    fn exec(&mut self, step: &Step, req: Option<Resolved>) -> Actual {
        if step.expect == Expect::Closed {
            self.closing_expected = true;
        }
        let (sent, req) = match (&step.action, req) {
            (Action::Eof, _) => {
                let _ = self.sock.shutdown(Shutdown::Write);
                (Ok(()), None)
            }
            (Action::Raw(bytes), _) => {
                // Expect the reply a well-formed header would get: its cookie and command.
                let parsed = Request::parse(bytes).ok();
                (self.sock.write_all(bytes), parsed)
            }
            (_, Some(r)) => {
                let mut bytes = r.request.encode().to_vec();
                bytes.extend_from_slice(&r.payload);
                (self.sock.write_all(&bytes), Some(r.request))
            }
            (_, None) => return Actual::Failed("nothing to send".into()),
        };
        if let Err(e) = sent {
            return match e.kind() {
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => Actual::Closed,
                _ => Actual::Failed(e.to_string()),
            };
        }
        if step.expect == Expect::Nothing {
            return Actual::Nothing;
        }
        if matches!(req, Some(r) if r.command == Command::Disc) {
            return self.reply(None);
        }
        self.reply(req)
    }

    fn finish(&mut self) -> Result<(), String> {
        let _ = self.sock.shutdown(Shutdown::Write);
        let Some(server) = self.server.take() else {
            return Ok(());
        };
        let result = server.join().unwrap_or_else(|_| {
            Err(ServerError::InvalidGeometry(
                "server thread panicked".into(),
            ))
        });
        match result {
            Err(e) if !self.closing_expected => Err(format!("the server ended with: {e}")),
            _ => Ok(()),
        }
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        let _ = self.sock.shutdown(Shutdown::Both);
        if let Some(s) = self.server.take() {
            let _ = s.join();
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
    /// request and waited for; the fake kernel's reply checks apply. `raw` and `eof` steps fail.
    pub fn replay_loopback<D: BlockDevice + 'static>(
        &self,
        device: D,
        options: LoopbackOptions,
    ) -> Result<(), ScriptError> {
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
            },
        )
    }

    /// Replays over a raw socket to a [`Server`] for `device`, one request at a time, checking
    /// every reply (magic, cookie, no bytes after an error reply, a READ's full payload).
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
        sock.set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(|e| ScriptError::Start(e.to_string()))?;
        drive(
            self,
            &mut Raw {
                sock,
                size,
                block_size,
                server,
                closing_expected: false,
                last_error: None,
            },
        )
    }
}
