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
//!   without a reply), `none` (read nothing), `any-of(DATA | DATA ..)` (see below). Omitted:
//!   `ok`, or `closed` after `disc` and `eof`.
//!
//! Requests in flight together are a group, between a `together {` line and a `}` line:
//!
//! ```text
//! together {                      # two overlapping writes and a read racing them
//!   write 0 8K seed:1
//!   write 4K 8K seed:2
//!   read 0 12K => any-of(fill:0 | seed:1 | 4K*any seed:2)
//! }
//! read 0 12K => any-of(8K*seed:1 seed:2 | 4K*seed:1 seed:2)   # either write last, per block
//! ```
//!
//! - Every request of a group is sent before any reply is waited for, so they are in flight
//!   at the server together; their replies may come in any order, and each step's expectation
//!   is checked against its own reply (matched by cookie). The next step after the `}` starts
//!   once every reply of the group has come. Through [`LoopbackKernel`] a group holds at most
//!   as many requests as it has tags (`queue_depth` times `connections`, 128 by default).
//! - `together {` and `}` stand alone on their line (a `#` comment may follow). Groups do not
//!   nest, are not empty, and hold no `disc`, `eof` or `raw` step and no `closed` or `none`
//!   expectation: all have no meaning when requests race.
//! - `any-of(A | B ..)`: success, and each of the device's logical blocks in the data read
//!   equals the same block of one of the alternatives, each block independently (a read
//!   racing two writes may see some blocks of each, never a torn block). Each alternative is
//!   data segments as above, `any` included. Allowed outside groups too.
//!
//! [`Script::replay`] runs a script through [`LoopbackKernel`] (whose reply checks then apply);
//! scripts with `raw` or `eof` steps go through a raw socket to a real [`Server`] instead, one
//! request (or one group) at a time, where the harness checks each reply itself (magic,
//! cookie, no payload after an error). [`Script::replay_socket`] does the same against any
//! server. When the connection closes as expected, steps left after it fail the replay as
//! unused. `any-of` is checked in the export's logical blocks (512 bytes through
//! [`Script::replay_socket`], which knows no export; [`Script::replay_socket_with`] takes the
//! size).
//!
//! A [`Script`] prints in the text format (`Display`), groups included, and parses back to an
//! equal script: a failure found by random testing pastes into a regression test.
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
//!
//! // Two writes racing a read: each 512-byte block read is all one write's, or still zeroes.
//! let race = Script::new().together(
//!     Script::new()
//!         .write(0, 8192, Data::seed(1))
//!         .write(0, 8192, Data::seed(2))
//!         .read(0, 8192)
//!         .any_of(vec![Data::seed(1), Data::seed(2), Data::fill(0)]),
//! );
//! assert_eq!(Script::parse(&race.to_string())?, race);
//! race.replay(MemDevice::new(1 << 20))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod judge;
mod parse;
mod pattern;
mod raw;
mod replay;

use userblk::proto::{Command, CommandFlags, Errno};

pub use parse::{ParseError, ParseErrorKind};
pub use pattern::{fill_seed, first_difference, Data, Pattern, Segment};
pub use replay::{GroupSpan, ScriptError, StepFailure};

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
    /// Success, and each of the device's logical blocks in the data read equals the same block
    /// of one of these alternatives (each rendered at the read's offset), block by block
    /// independently: a read racing two writes may see some blocks of each, never a torn block.
    /// Bytes under `any` in an alternative match anything. Written
    /// `any-of(seed:1 | 4K*any seed:2 | fill:0)`.
    AnyOf(Vec<Data>),
}

/// One request and its expected outcome.
///
/// Two steps are equal when they send the same, expect the same and belong to the same group;
/// the line they came from is not compared, so a script printed and parsed back equals the
/// original.
#[derive(Clone, Debug, Eq)]
pub struct Step {
    /// The line it came from, for scripts parsed from text.
    pub line: Option<usize>,
    /// What is sent.
    pub action: Action,
    /// What must come back.
    pub expect: Expect,
    /// The group of requests in flight together that the step belongs to: groups are numbered
    /// from 1 in script order, and a group is the run of consecutive steps with the same number.
    /// `None` for a step sent alone (after the previous step's reply came).
    pub group: Option<usize>,
}

impl PartialEq for Step {
    fn eq(&self, other: &Step) -> bool {
        self.action == other.action && self.expect == other.expect && self.group == other.group
    }
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
            group: None,
        });
        self
    }

    /// Appends `group`'s requests as one group, all in flight at once: every request is issued
    /// before any reply is waited for, and the replies may come in any order. Each step keeps
    /// its own expectation (use [`Script::any_of`] for a read racing writes). Groups inside
    /// `group` are merged into the one group; an empty `group` appends nothing. `disc`, `eof`
    /// and `raw` steps, and `closed` or `none` expectations, have no meaning in a group: the
    /// replay fails on them.
    pub fn together(mut self, group: Script) -> Script {
        if group.steps.is_empty() {
            return self;
        }
        let number = self.steps.iter().filter_map(|s| s.group).max().unwrap_or(0) + 1;
        self.steps.extend(group.steps.into_iter().map(|s| Step {
            group: Some(number),
            ..s
        }));
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

    /// The last step must succeed, each logical block of its data equal to the same block of
    /// one of `alternatives` (see [`Expect::AnyOf`]).
    pub fn any_of(self, alternatives: Vec<Data>) -> Script {
        self.expect(Expect::AnyOf(alternatives))
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
            match &s.expect {
                Expect::Data(d) => add(d),
                Expect::AnyOf(alts) => alts.iter().for_each(&mut add),
                _ => {}
            }
        }
        seeds
    }
}
