//! Scripts: a stream of NBD requests with the reply expected for each, replayed against a
//! device (or any server on a socket); the first unexpected reply fails with the step, what was
//! expected, what came, and a hex dump of the first differing bytes.
//!
//! A script is written with the builder methods of [`Script`] or in a text format, one request
//! per line:
//!
//! ```text
//! # COMMAND [OFFSET LENGTH] [FLAGS] [DATA] [=> EXPECTED]
//! write 0 4K seed:1                 => ok       # 4 KiB of the pseudo-random pattern 1
//! write end-512 512 fua fill:0xab               # the last block, with FUA; `=> ok` is implied
//! read 0 8K                         => 4K*seed:1 fill:0x00
//! read end 512                      => EINVAL   # past the end: the server refuses it
//! trim 4K 4K                        => ok
//! zeroes 1M 64K nohole              => ok
//! flush                             => ok
//! raw 25609513 00000000 0000000000000001 0000000000000000 00000200 => 512*any
//! raw 00000000                      => none     # a broken header...
//! eof                               => closed   # ...and the server hangs up
//! ```
//!
//! - Commands: `read`, `write`, `flush`, `trim`, `zeroes`, `cache`, `block_status`, `disc`;
//!   `raw HEX..` sends bytes as they are (spaces ignored); `eof` closes the kernel's side.
//! - Numbers: `4096`, `0x1000`, `4K`/`1M`/`1G` (binary); offsets may count from the device's
//!   end: `end`, `end-512`.
//! - Flags: `fua`, `nohole`, `flags=0x..` for raw bits (unknown ones included).
//! - Data is segments, `LEN*PATTERN` (the last may omit `LEN*`: the rest of the request):
//!   `fill:0xab` (one byte), `seed:N` (pseudo-random, a function of `N` and the absolute device
//!   offset, so it reads back the same whatever the request boundaries), `hex:00ff..` (repeated),
//!   and in expectations `any`.
//! - Expected: `ok` (success; any data for a read), data segments (success with those bytes),
//!   an errno (`EINVAL`, `EPERM`, .., or `err:N`), `closed` (the server closes the connection
//!   without a reply), `none` (read nothing). Omitted: `ok`, or `closed` after `disc` and `eof`.
//!
//! [`Script::replay`] runs a script through [`LoopbackKernel`] (whose reply checks then apply);
//! scripts with `raw` or `eof` steps go through a raw socket to a real [`Server`] instead, one
//! request at a time, where the harness checks each reply itself (magic, cookie, no payload
//! after an error). [`Script::replay_socket`] does the same against any server. When the
//! connection closes as expected, steps left after it fail the replay as unused.
//!
//! ```
//! use userblk::MemDevice;
//! use userblk::proto::Errno;
//! use userblk_harness::script::{Data, Script};
//!
//! let script = Script::new()
//!     .write(0, 4096, Data::seed(1)).ok()
//!     .read(0, 4096).data(Data::seed(1))
//!     .read(1 << 20, 512).errno(Errno::EINVAL);
//! script.replay(MemDevice::new(1 << 20))?;
//!
//! let text = "write 0 4K fill:0xab\nread 0 4K => fill:0xab\n";
//! Script::parse(text)?.replay(MemDevice::new(1 << 20))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod parse;
mod pattern;
mod replay;

use userblk::proto::{Command, CommandFlags, Errno};

pub use parse::{ParseError, ParseErrorKind};
pub use pattern::{fill_seed, first_difference, Data, Pattern, Segment};
pub use replay::{ScriptError, StepFailure};

#[allow(unused_imports)] // for the module docs
use userblk::{LoopbackKernel, Server};

/// A device offset: absolute, or relative to the device's end (`end-512`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pos {
    /// Bytes from the start.
    Abs(u64),
    /// Bytes from the end (negative: before it).
    FromEnd(i64),
}

impl From<u64> for Pos {
    fn from(n: u64) -> Pos {
        Pos::Abs(n)
    }
}

impl Pos {
    /// The absolute offset on a device of `size` bytes; `None` if it falls outside `0..=u64::MAX`.
    pub fn resolve(self, size: u64) -> Option<u64> {
        match self {
            Pos::Abs(n) => Some(n),
            Pos::FromEnd(d) => u64::try_from(i128::from(size) + i128::from(d)).ok(),
        }
    }
}

/// What a step sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// A well-formed request (its flags may still be wrong on purpose).
    Request {
        /// The command.
        command: Command,
        /// Command flags, any bits.
        flags: CommandFlags,
        /// Offset.
        offset: Pos,
        /// Length.
        len: u32,
        /// A WRITE's payload.
        data: Option<Data>,
    },
    /// Bytes sent as they are.
    Raw(Vec<u8>),
    /// The kernel's side closes its write half: the server sees EOF.
    Eof,
}

impl Action {
    /// The expectation a step gets when none is written.
    pub fn default_expect(&self) -> Expect {
        match self {
            Action::Request {
                command: Command::Disc,
                ..
            }
            | Action::Eof => Expect::Closed,
            _ => Expect::Ok,
        }
    }
}

/// What a step expects back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Success (a read's data is not checked).
    Ok,
    /// Success with exactly this data.
    Data(Data),
    /// An error reply with this errno.
    Errno(u32),
    /// The server closes the connection without replying.
    Closed,
    /// Nothing is read.
    Nothing,
}

/// One request and its expected outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// The line it came from, for scripts parsed from text.
    pub line: Option<usize>,
    /// What is sent.
    pub action: Action,
    /// What must come back.
    pub expect: Expect,
}

/// A request stream with the replies expected. See the [module docs](self) for the format.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Script {
    /// The steps, in order.
    pub steps: Vec<Step>,
}

impl Script {
    /// An empty script.
    pub fn new() -> Script {
        Script::default()
    }

    /// Parses the text format.
    pub fn parse(text: &str) -> Result<Script, ParseError> {
        parse::parse(text)
    }

    /// Appends a step with its default expectation.
    pub fn step(mut self, action: Action) -> Script {
        let expect = action.default_expect();
        self.steps.push(Step {
            line: None,
            action,
            expect,
        });
        self
    }

    /// Appends a request.
    pub fn request(
        self,
        command: Command,
        flags: CommandFlags,
        offset: impl Into<Pos>,
        len: u32,
        data: Option<Data>,
    ) -> Script {
        self.step(Action::Request {
            command,
            flags,
            offset: offset.into(),
            len,
            data,
        })
    }

    /// Appends a READ.
    pub fn read(self, offset: impl Into<Pos>, len: u32) -> Script {
        self.request(Command::Read, CommandFlags::NONE, offset, len, None)
    }

    /// Appends a WRITE of `len` bytes of `data`.
    pub fn write(self, offset: impl Into<Pos>, len: u32, data: Data) -> Script {
        self.request(Command::Write, CommandFlags::NONE, offset, len, Some(data))
    }

    /// Appends a FLUSH.
    pub fn flush(self) -> Script {
        self.request(Command::Flush, CommandFlags::NONE, 0, 0, None)
    }

    /// Appends a TRIM.
    pub fn trim(self, offset: impl Into<Pos>, len: u32) -> Script {
        self.request(Command::Trim, CommandFlags::NONE, offset, len, None)
    }

    /// Appends a WRITE_ZEROES (with NO_HOLE when `no_hole`).
    pub fn zeroes(self, offset: impl Into<Pos>, len: u32, no_hole: bool) -> Script {
        let flags = if no_hole {
            CommandFlags::NO_HOLE
        } else {
            CommandFlags::NONE
        };
        self.request(Command::WriteZeroes, flags, offset, len, None)
    }

    /// Appends a DISC; the server is expected to close the connection.
    pub fn disc(self) -> Script {
        self.request(Command::Disc, CommandFlags::NONE, 0, 0, None)
    }

    /// Appends raw bytes.
    pub fn raw(self, bytes: &[u8]) -> Script {
        self.step(Action::Raw(bytes.to_vec()))
    }

    /// Appends an EOF from the kernel's side; the server is expected to close the connection.
    pub fn eof(self) -> Script {
        self.step(Action::Eof)
    }

    /// Adds flag bits to the last step's request.
    pub fn with_flags(mut self, extra: CommandFlags) -> Script {
        if let Some(Step {
            action: Action::Request { flags, .. },
            ..
        }) = self.steps.last_mut()
        {
            *flags = *flags | extra;
        }
        self
    }

    /// Sets FUA on the last step's request.
    pub fn fua(self) -> Script {
        self.with_flags(CommandFlags::FUA)
    }

    /// Sets the last step's expectation.
    pub fn expect(mut self, expect: Expect) -> Script {
        if let Some(s) = self.steps.last_mut() {
            s.expect = expect;
        }
        self
    }

    /// The last step must succeed.
    pub fn ok(self) -> Script {
        self.expect(Expect::Ok)
    }

    /// The last step must succeed with this data.
    pub fn data(self, data: Data) -> Script {
        self.expect(Expect::Data(data))
    }

    /// The last step must fail with this errno.
    pub fn errno(self, errno: Errno) -> Script {
        self.expect(Expect::Errno(errno.0))
    }

    /// The server must close the connection at the last step.
    pub fn closed(self) -> Script {
        self.expect(Expect::Closed)
    }

    /// Whether the script needs a raw socket (it has `raw` or `eof` steps).
    pub fn needs_raw(&self) -> bool {
        self.steps
            .iter()
            .any(|s| matches!(s.action, Action::Raw(_) | Action::Eof))
    }

    /// The seeds its patterns use, to describe data that came back.
    fn seeds(&self) -> Vec<u64> {
        let mut seeds = Vec::new();
        let mut add = |d: &Data| {
            for seg in &d.0 {
                if let Pattern::Seed(s) = seg.pattern {
                    if !seeds.contains(&s) {
                        seeds.push(s);
                    }
                }
            }
        };
        for s in &self.steps {
            if let Action::Request { data: Some(d), .. } = &s.action {
                add(d);
            }
            if let Expect::Data(d) = &s.expect {
                add(d);
            }
        }
        seeds
    }
}
