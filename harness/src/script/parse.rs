//! The script text format: parsing (never panics; errors are typed and carry the line number)
//! and printing (what [`Script`]'s `Display` writes parses back to the same script).

use std::fmt;

use userblk::proto::{Command, CommandFlags, Errno};

use super::pattern::{Data, Pattern, Segment};
use super::{Action, Expect, Pos, Script, Step};

/// Why a script line was not understood.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {kind}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What was wrong.
    pub kind: ParseErrorKind,
}

/// What was wrong with a script line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseErrorKind {
    /// The first word is not a command.
    #[error("unknown command `{0}`: expected read, write, flush, trim, zeroes, cache, block_status, disc, eof or raw")]
    UnknownCommand(String),
    /// A required argument is missing.
    #[error("missing {0}")]
    Missing(&'static str),
    /// A number that does not parse or does not fit.
    #[error("bad number `{0}`: expected e.g. 4096, 0x1000, 4K, end or end-512")]
    BadNumber(String),
    /// A data pattern that does not parse.
    #[error("bad data `{0}`: expected fill:0xab, seed:N, hex:00ff.., any, optionally LEN* before")]
    BadPattern(String),
    /// Data segments that do not add up to the request's length.
    #[error("data segments do not add up to the request's {0} bytes")]
    DataLength(u64),
    /// `any` in a WRITE's data.
    #[error("`any` is only allowed in an expectation")]
    AnyInWrite,
    /// A word that means nothing where it is.
    #[error("unexpected `{0}`")]
    Unexpected(String),
    /// An expectation that does not parse.
    #[error("bad expectation `{0}`: expected ok, closed, none, an errno (EINVAL, err:22) or data")]
    BadExpectation(String),
    /// Hex digits that do not parse.
    #[error("bad hex `{0}`")]
    BadHex(String),
    /// A length above the protocol's 32-bit field.
    #[error("length {0} does not fit the request's 32-bit length field")]
    TooLong(u64),
    /// A `together {` never closed by `}` (the error's line is the opening one).
    #[error("`together {{` is never closed by a `}}` line")]
    UnclosedGroup,
    /// A `together {` inside another group.
    #[error(
        "groups do not nest: the group opened at line {0} is still open (close it with `}}` first)"
    )]
    NestedGroup(usize),
    /// A `}` with no group open.
    #[error("`}}` without a `together {{` before it")]
    UnopenedClose,
    /// A group with no request in it.
    #[error("an empty group: `together {{` needs at least one request before `}}`")]
    EmptyGroup,
    /// A step that has no meaning in a group (`disc`, `eof`, `raw`).
    #[error("`{0}` cannot be in a group: {1}")]
    NotInGroup(&'static str, &'static str),
    /// An expectation that has no meaning in a group (`closed`, `none`).
    #[error("`=> {0}` cannot be expected in a group: every request of a group gets a reply")]
    ExpectationInGroup(&'static str),
    /// `any-of()` with nothing inside.
    #[error("`any-of()` needs at least one alternative, e.g. any-of(seed:1 | fill:0)")]
    EmptyAnyOf,
    /// An `any-of(..)` alternative that is not data, or an unclosed `any-of(`.
    #[error("bad any-of alternative `{0}`: expected data segments separated by `|`, e.g. any-of(seed:1 | 4K*seed:1 seed:2)")]
    BadAlternative(String),
}

fn err(line: usize, kind: ParseErrorKind) -> ParseError {
    ParseError { line, kind }
}

/// `4096` as `4K`, `1048576` as `1M`; other values in decimal.
pub(crate) fn size_text(n: u64) -> String {
    for (shift, unit) in [(30, "G"), (20, "M"), (10, "K")] {
        if n >= 1 << shift && n % (1 << shift) == 0 {
            return format!("{}{unit}", n >> shift);
        }
    }
    n.to_string()
}

/// Parses `4096`, `0x1000`, `4K`, `1M` (binary units).
fn parse_u64(s: &str) -> Option<u64> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).ok();
    }
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        b't' | b'T' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

fn parse_pos(s: &str) -> Option<Pos> {
    if let Some(rest) = s.strip_prefix("end") {
        if rest.is_empty() {
            return Some(Pos::FromEnd(0));
        }
        if let Some(n) = rest.strip_prefix('-') {
            // `checked_sub_unsigned` reaches i64::MIN, which `-i64` cannot.
            return Some(Pos::FromEnd(0i64.checked_sub_unsigned(parse_u64(n)?)?));
        }
        let n = rest.strip_prefix('+')?;
        return Some(Pos::FromEnd(i64::try_from(parse_u64(n)?).ok()?));
    }
    parse_u64(s).map(Pos::Abs)
}

fn parse_hex(s: &str) -> Option<Vec<u8>> {
    let s: String = s.chars().filter(|c| *c != '_').collect();
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|d| u8::from_str_radix(d, 16).ok()))
        .collect()
}

fn parse_segment(tok: &str) -> Option<Segment> {
    let (len, pat) = match tok.split_once('*') {
        Some((n, p)) => (Some(parse_u64(n)?), p),
        None => (None, tok),
    };
    let pattern = if pat == "any" {
        Pattern::Any
    } else if let Some(v) = pat.strip_prefix("fill:") {
        Pattern::Fill(u8::try_from(parse_u64(v)?).ok()?)
    } else if let Some(v) = pat.strip_prefix("seed:") {
        Pattern::Seed(parse_u64(v)?)
    } else if let Some(v) = pat.strip_prefix("hex:") {
        let h = parse_hex(v)?;
        if h.is_empty() {
            return None;
        }
        Pattern::Hex(h)
    } else {
        return None;
    };
    Some(Segment { len, pattern })
}

fn is_segment(tok: &str) -> bool {
    let pat = tok.split_once('*').map_or(tok, |(_, p)| p);
    pat == "any"
        || ["fill:", "seed:", "hex:"]
            .iter()
            .any(|p| pat.starts_with(p))
}

fn errno_by_name(s: &str) -> Option<u32> {
    let all = [
        Errno::EPERM,
        Errno::EIO,
        Errno::ENOMEM,
        Errno::EINVAL,
        Errno::ENOSPC,
        Errno::EOVERFLOW,
        Errno::ENOTSUP,
        Errno::ESHUTDOWN,
    ];
    if let Some(n) = s.strip_prefix("err:") {
        return u32::try_from(parse_u64(n)?).ok();
    }
    let upper = s.to_ascii_uppercase();
    if upper == "EOPNOTSUPP" {
        return Some(Errno::ENOTSUP.0);
    }
    all.iter().find(|e| e.name() == upper).map(|e| e.0)
}

/// The name of a command in the script format.
pub(crate) fn command_word(c: Command) -> &'static str {
    match c {
        Command::Read => "read",
        Command::Write => "write",
        Command::Disc => "disc",
        Command::Flush => "flush",
        Command::Trim => "trim",
        Command::Cache => "cache",
        Command::WriteZeroes => "zeroes",
        Command::BlockStatus => "block_status",
    }
}

/// Parses `any-of(ALT | ALT ..)`'s inside, each alternative data that adds up to `len` (when
/// known).
fn parse_any_of(line: usize, inner: &str, len: Option<u64>) -> Result<Expect, ParseError> {
    if inner.trim().is_empty() {
        return Err(err(line, ParseErrorKind::EmptyAnyOf));
    }
    let mut alts = Vec::new();
    for alt in inner.split('|') {
        let bad = || err(line, ParseErrorKind::BadAlternative(alt.trim().to_string()));
        let toks: Vec<&str> = alt.split_whitespace().collect();
        if toks.is_empty() || !toks.iter().all(|t| is_segment(t)) {
            return Err(bad());
        }
        let data = parse_data(line, &toks)?;
        if let Some(len) = len {
            if data.ranges(len).is_none() {
                return Err(err(line, ParseErrorKind::DataLength(len)));
            }
        }
        alts.push(data);
    }
    Ok(Expect::AnyOf(alts))
}

fn parse_expect(line: usize, text: &str, len: Option<u64>) -> Result<Expect, ParseError> {
    let bad = |t: &str| err(line, ParseErrorKind::BadExpectation(t.to_string()));
    let text = text.trim();
    if let Some(rest) = text.strip_prefix("any-of") {
        let inner = rest
            .trim_start()
            .strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(|| err(line, ParseErrorKind::BadAlternative(text.to_string())))?;
        return parse_any_of(line, inner, len);
    }
    let toks: Vec<&str> = text.split_whitespace().collect();
    match toks.as_slice() {
        [] => Err(err(line, ParseErrorKind::Missing("expectation after `=>`"))),
        ["ok"] => Ok(Expect::Ok),
        ["closed"] => Ok(Expect::Closed),
        ["none"] => Ok(Expect::Nothing),
        [one] if !is_segment(one) => errno_by_name(one)
            .map(Expect::Errno)
            .ok_or_else(|| bad(one)),
        segs => {
            let data = parse_data(line, segs)?;
            if let Some(len) = len {
                if data.ranges(len).is_none() {
                    return Err(err(line, ParseErrorKind::DataLength(len)));
                }
            }
            Ok(Expect::Data(data))
        }
    }
}

fn parse_data(line: usize, toks: &[&str]) -> Result<Data, ParseError> {
    toks.iter()
        .map(|t| {
            parse_segment(t).ok_or_else(|| err(line, ParseErrorKind::BadPattern(t.to_string())))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Data)
}

fn parse_line(line: usize, text: &str) -> Result<Option<Step>, ParseError> {
    let text = text.split('#').next().unwrap_or("");
    let (req, expect) = match text.split_once("=>") {
        Some((r, e)) => (r, Some(e)),
        None => (text, None),
    };
    let toks: Vec<&str> = req.split_whitespace().collect();
    let Some((&word, args)) = toks.split_first() else {
        return match expect {
            Some(_) => Err(err(line, ParseErrorKind::Missing("request before `=>`"))),
            None => Ok(None),
        };
    };
    let e = |k| err(line, k);
    let action = match word {
        "raw" => {
            let joined: String = args.concat();
            let bytes = parse_hex(&joined).ok_or_else(|| e(ParseErrorKind::BadHex(joined)))?;
            if bytes.is_empty() {
                return Err(e(ParseErrorKind::Missing("bytes after `raw`")));
            }
            Action::Raw(bytes)
        }
        "eof" => match args.first() {
            Some(t) => return Err(e(ParseErrorKind::Unexpected(t.to_string()))),
            None => Action::Eof,
        },
        _ => {
            let command = match word {
                "read" => Command::Read,
                "write" => Command::Write,
                "flush" => Command::Flush,
                "trim" => Command::Trim,
                "zeroes" | "write_zeroes" => Command::WriteZeroes,
                "cache" => Command::Cache,
                "block_status" => Command::BlockStatus,
                "disc" => Command::Disc,
                w => return Err(e(ParseErrorKind::UnknownCommand(w.to_string()))),
            };
            let ranged = !matches!(command, Command::Flush | Command::Disc);
            let mut rest = args;
            let (mut offset, mut len) = (Pos::Abs(0), 0u64);
            if ranged {
                let [o, l, tail @ ..] = rest else {
                    return Err(e(ParseErrorKind::Missing("offset and length")));
                };
                offset = parse_pos(o).ok_or_else(|| e(ParseErrorKind::BadNumber(o.to_string())))?;
                len = parse_u64(l).ok_or_else(|| e(ParseErrorKind::BadNumber(l.to_string())))?;
                if len > u64::from(u32::MAX) {
                    return Err(e(ParseErrorKind::TooLong(len)));
                }
                rest = tail;
            }
            let mut flags = CommandFlags::NONE;
            let mut data_toks = Vec::new();
            for t in rest {
                match *t {
                    "fua" => flags = flags | CommandFlags::FUA,
                    "nohole" => flags = flags | CommandFlags::NO_HOLE,
                    t if t.starts_with("flags=") => {
                        let v = parse_u64(&t[6..])
                            .and_then(|v| u16::try_from(v).ok())
                            .ok_or_else(|| e(ParseErrorKind::BadNumber(t.to_string())))?;
                        flags = flags | CommandFlags(v);
                    }
                    t if command == Command::Write && is_segment(t) => data_toks.push(t),
                    t => return Err(e(ParseErrorKind::Unexpected(t.to_string()))),
                }
            }
            let data = if command == Command::Write {
                if data_toks.is_empty() {
                    return Err(e(ParseErrorKind::Missing("data to write (e.g. fill:0xab)")));
                }
                let data = parse_data(line, &data_toks)?;
                if data.has_any() {
                    return Err(e(ParseErrorKind::AnyInWrite));
                }
                if data.ranges(len).is_none() {
                    return Err(e(ParseErrorKind::DataLength(len)));
                }
                Some(data)
            } else {
                None
            };
            Action::Request {
                command,
                flags,
                offset,
                len: len as u32,
                data,
            }
        }
    };
    let read_len = match &action {
        Action::Request {
            command: Command::Read,
            len,
            ..
        } => Some(u64::from(*len)),
        _ => None,
    };
    let expect = match expect {
        Some(t) => parse_expect(line, t, read_len)?,
        None => action.default_expect(),
    };
    Ok(Some(Step {
        line: Some(line),
        action,
        expect,
        group: None,
    }))
}

/// Refuses a step that has no meaning in a group.
fn check_in_group(line: usize, step: &Step) -> Result<(), ParseError> {
    let e = |k| Err(err(line, k));
    match &step.action {
        Action::Raw(_) => e(ParseErrorKind::NotInGroup(
            "raw",
            "its reply cannot be told apart from the others'",
        ))?,
        Action::Eof => e(ParseErrorKind::NotInGroup(
            "eof",
            "it ends the connection under the other requests",
        ))?,
        Action::Request {
            command: Command::Disc,
            ..
        } => e(ParseErrorKind::NotInGroup(
            "disc",
            "it ends the connection under the other requests",
        ))?,
        Action::Request { .. } => {}
    }
    match step.expect {
        Expect::Closed => e(ParseErrorKind::ExpectationInGroup("closed")),
        Expect::Nothing => e(ParseErrorKind::ExpectationInGroup("none")),
        _ => Ok(()),
    }
}

/// Parses a script. Blank lines and `#` comments are skipped; `together {` .. `}` lines
/// enclose a group.
pub(super) fn parse(text: &str) -> Result<Script, ParseError> {
    let mut steps = Vec::new();
    // The open group: its number, the line of its `together {`, and its steps so far.
    let mut open: Option<(usize, usize, usize)> = None;
    let mut groups = 0;
    for (i, l) in text.lines().enumerate() {
        let line = i + 1;
        let toks: Vec<&str> = l
            .split('#')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        match toks.as_slice() {
            ["together", rest @ ..] => {
                match rest {
                    [] => Err(err(line, ParseErrorKind::Missing("`{` after `together`")))?,
                    ["{"] => {}
                    ["{", t, ..] | [t, ..] => {
                        Err(err(line, ParseErrorKind::Unexpected(t.to_string())))?
                    }
                }
                if let Some((_, at, _)) = open {
                    return Err(err(line, ParseErrorKind::NestedGroup(at)));
                }
                groups += 1;
                open = Some((groups, line, 0));
            }
            ["}", rest @ ..] => {
                if let Some(t) = rest.first() {
                    return Err(err(line, ParseErrorKind::Unexpected(t.to_string())));
                }
                match open.take() {
                    None => return Err(err(line, ParseErrorKind::UnopenedClose)),
                    Some((_, _, 0)) => return Err(err(line, ParseErrorKind::EmptyGroup)),
                    Some(_) => {}
                }
            }
            _ => {
                if let Some(mut step) = parse_line(line, l)? {
                    if let Some((number, _, count)) = open.as_mut() {
                        check_in_group(line, &step)?;
                        step.group = Some(*number);
                        *count += 1;
                    }
                    steps.push(step);
                }
            }
        }
    }
    if let Some((_, at, _)) = open {
        return Err(err(at, ParseErrorKind::UnclosedGroup));
    }
    Ok(Script { steps })
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Pos::Abs(n) => f.write_str(&size_text(n)),
            Pos::FromEnd(0) => f.write_str("end"),
            Pos::FromEnd(d) if d < 0 => write!(f, "end-{}", size_text(d.unsigned_abs())),
            Pos::FromEnd(d) => write!(f, "end+{}", size_text(d.unsigned_abs())),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Raw(bytes) => {
                f.write_str("raw")?;
                for chunk in bytes.chunks(4) {
                    f.write_str(" ")?;
                    chunk.iter().try_for_each(|b| write!(f, "{b:02x}"))?;
                }
                Ok(())
            }
            Action::Eof => f.write_str("eof"),
            Action::Request {
                command,
                flags,
                offset,
                len,
                data,
            } => {
                f.write_str(command_word(*command))?;
                if !matches!(command, Command::Flush | Command::Disc) {
                    write!(f, " {offset} {}", size_text(u64::from(*len)))?;
                }
                let mut rest = *flags;
                if rest.contains(CommandFlags::FUA) {
                    f.write_str(" fua")?;
                    rest = CommandFlags(rest.0 & !CommandFlags::FUA.0);
                }
                if rest.contains(CommandFlags::NO_HOLE) {
                    f.write_str(" nohole")?;
                    rest = CommandFlags(rest.0 & !CommandFlags::NO_HOLE.0);
                }
                if rest.0 != 0 {
                    write!(f, " flags={:#06x}", rest.0)?;
                }
                if let Some(d) = data {
                    write!(f, " {d}")?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expect::Ok => f.write_str("ok"),
            Expect::Closed => f.write_str("closed"),
            Expect::Nothing => f.write_str("none"),
            Expect::Errno(n) => match Errno(*n).name() {
                "unknown" => write!(f, "err:{n}"),
                name => f.write_str(name),
            },
            Expect::Data(d) => write!(f, "{d}"),
            Expect::AnyOf(alts) => {
                f.write_str("any-of(")?;
                for (i, d) in alts.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" | ")?;
                    }
                    write!(f, "{d}")?;
                }
                f.write_str(")")
            }
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} => {}", self.action, self.expect)
    }
}

impl fmt::Display for Script {
    /// The text format, groups as `together {` .. `}` with their requests indented; parses
    /// back to an equal script.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut open = None;
        for s in &self.steps {
            if s.group != open {
                if open.is_some() {
                    writeln!(f, "}}")?;
                }
                if s.group.is_some() {
                    writeln!(f, "together {{")?;
                }
                open = s.group;
            }
            if open.is_some() {
                f.write_str("  ")?;
            }
            writeln!(f, "{s}")?;
        }
        if open.is_some() {
            writeln!(f, "}}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "
        # a comment
        write 0 4K seed:1                 => ok
        write end-512 512 fua fill:0xab
        read 0 8K                         => 4K*seed:1 fill:0x00
        read end 512                      => EINVAL
        zeroes 1M 64K nohole              => ok
        trim 0 4K flags=0x10              => err:22
        flush
        raw 25609513 00000000 0000000000000001 0000000000000000 00000200 => 512*any
        eof => closed
    ";

    #[test]
    fn parses_and_prints_back_the_same_script() {
        let s = parse(EXAMPLE).unwrap();
        assert_eq!(s.steps.len(), 9);
        assert_eq!(s.steps[1].line, Some(4));
        let again = parse(&s.to_string()).unwrap();
        let strip = |s: &Script| s.steps.iter().map(|st| st.to_string()).collect::<Vec<_>>();
        assert_eq!(strip(&s), strip(&again));
        assert_eq!(
            s.steps[3].to_string(),
            "read end 512 => EINVAL",
            "{}",
            s.steps[3]
        );
    }

    #[test]
    fn groups_and_any_of_parse_and_print_back() {
        let text = "
            write 0 4K seed:1
            together {   # two writes and a read racing them
              write 0 8K seed:2
              write 4K 8K fua seed:3 => ok
              read 0 16K => any-of(seed:2 | 4K*any 8K*seed:3 any | fill:0)
            }
            together {
              read 0 4K => any-of( seed:1|seed:2 )
            }
            read 0 8K => any-of(seed:1 | 4K*seed:1 4K*seed:2)
        ";
        let s = parse(text).unwrap();
        let groups: Vec<_> = s.steps.iter().map(|s| s.group).collect();
        assert_eq!(groups, [None, Some(1), Some(1), Some(1), Some(2), None]);
        assert_eq!(s.steps[3].line, Some(6));
        let Expect::AnyOf(alts) = &s.steps[3].expect else {
            panic!("{:?}", s.steps[3].expect)
        };
        assert_eq!(alts.len(), 3);
        assert_eq!(alts[1].to_string(), "4K*any 8K*seed:3 any");
        let printed = s.to_string();
        assert_eq!(
            printed,
            "write 0 4K seed:1 => ok\n\
             together {\n\
             \x20 write 0 8K seed:2 => ok\n\
             \x20 write 4K 8K fua seed:3 => ok\n\
             \x20 read 0 16K => any-of(seed:2 | 4K*any 8K*seed:3 any | fill:0x00)\n\
             }\n\
             together {\n\
             \x20 read 0 4K => any-of(seed:1 | seed:2)\n\
             }\n\
             read 0 8K => any-of(seed:1 | 4K*seed:1 seed:2)\n"
                .replace("4K*seed:1 seed:2", "4K*seed:1 4K*seed:2")
        );
        assert_eq!(parse(&printed).unwrap(), s);
    }

    #[test]
    fn malformed_groups_and_alternatives_are_typed_errors() {
        use ParseErrorKind as K;
        let cases: &[(&str, usize, ParseErrorKind)] = &[
            ("together {\nread 0 512", 1, K::UnclosedGroup),
            ("together {\ntogether {\n}\n}", 2, K::NestedGroup(1)),
            ("read 0 512\n}", 2, K::UnopenedClose),
            ("together {\n# nothing\n}", 3, K::EmptyGroup),
            ("together", 1, K::Missing("`{` after `together`")),
            ("together { read 0 512", 1, K::Unexpected("read".into())),
            ("together x", 1, K::Unexpected("x".into())),
            (
                "together {\nread 0 512\n} read",
                3,
                K::Unexpected("read".into()),
            ),
            (
                "together {\ndisc\n}",
                2,
                K::NotInGroup("disc", "it ends the connection under the other requests"),
            ),
            (
                "together {\neof\n}",
                2,
                K::NotInGroup("eof", "it ends the connection under the other requests"),
            ),
            (
                "together {\nraw 25609513\n}",
                2,
                K::NotInGroup("raw", "its reply cannot be told apart from the others'"),
            ),
            (
                "together {\nread 0 512 => closed\n}",
                2,
                K::ExpectationInGroup("closed"),
            ),
            (
                "together {\nwrite 0 512 fill:1 => none\n}",
                2,
                K::ExpectationInGroup("none"),
            ),
            ("read 0 512 => any-of()", 1, K::EmptyAnyOf),
            ("read 0 512 => any-of(   )", 1, K::EmptyAnyOf),
            (
                "read 0 512 => any-of(seed:1 | )",
                1,
                K::BadAlternative("".into()),
            ),
            (
                "read 0 512 => any-of(seed:1 || fill:0)",
                1,
                K::BadAlternative("".into()),
            ),
            (
                "read 0 512 => any-of(ok | seed:1)",
                1,
                K::BadAlternative("ok".into()),
            ),
            (
                "read 0 512 => any-of(EIO)",
                1,
                K::BadAlternative("EIO".into()),
            ),
            (
                "read 0 512 => any-of(seed:1",
                1,
                K::BadAlternative("any-of(seed:1".into()),
            ),
            (
                "read 0 512 => any-of seed:1",
                1,
                K::BadAlternative("any-of seed:1".into()),
            ),
            (
                "read 0 512 => any-of(seed:1) x",
                1,
                K::BadAlternative("any-of(seed:1) x".into()),
            ),
            (
                "read 0 512 => any-of(seed:x)",
                1,
                K::BadPattern("seed:x".into()),
            ),
            (
                "read 0 512 => any-of(seed:1 | 1K*fill:0)",
                1,
                K::DataLength(512),
            ),
        ];
        for (text, line, kind) in cases {
            let e = parse(text).unwrap_err();
            assert_eq!((e.line, &e.kind), (*line, kind), "{text}");
        }
        // Each says what is wrong in words.
        let e = parse("together {\nread 0 512").unwrap_err().to_string();
        assert_eq!(e, "line 1: `together {` is never closed by a `}` line");
    }

    #[test]
    fn offsets_from_the_end_reach_i64_min() {
        assert_eq!(
            parse_pos("end-9223372036854775808"),
            Some(Pos::FromEnd(i64::MIN))
        );
        assert_eq!(parse_pos("end-9223372036854775809"), None);
        assert_eq!(parse_pos("end+9223372036854775808"), None);
        assert_eq!(parse_pos("end\u{e9}"), None);
        assert_eq!(parse_pos("end+4K"), Some(Pos::FromEnd(4096)));
    }

    #[test]
    fn errors_name_the_line_and_never_panic() {
        let cases: &[(&str, ParseErrorKind)] = &[
            ("frob 0 1", ParseErrorKind::UnknownCommand("frob".into())),
            ("read 0", ParseErrorKind::Missing("offset and length")),
            ("read x 512", ParseErrorKind::BadNumber("x".into())),
            (
                "write 0 512",
                ParseErrorKind::Missing("data to write (e.g. fill:0xab)"),
            ),
            ("write 0 512 1K*fill:0", ParseErrorKind::DataLength(512)),
            ("write 0 512 any", ParseErrorKind::AnyInWrite),
            (
                "read 0 512 => maybe",
                ParseErrorKind::BadExpectation("maybe".into()),
            ),
            ("raw 123", ParseErrorKind::BadHex("123".into())),
            ("read 0 8G", ParseErrorKind::TooLong(8 << 30)),
            ("flush extra", ParseErrorKind::Unexpected("extra".into())),
        ];
        for (text, kind) in cases {
            let e = parse(&format!("\n{text}")).unwrap_err();
            assert_eq!((e.line, &e.kind), (2, kind), "{text}");
        }
        for junk in [
            "=>",
            "read 0 512 =>",
            "write 0 0x",
            "read end- 1",
            "raw",
            "\u{0}\u{ff}=>=>",
            "write 0 512 hex:",
            "read end\u{e9} 512",
            "together {\n}\n}",
            "}",
            "read 0 512 => any-of(",
            "read 0 512 => any-of)",
            "read 0 512 => any-of(|)",
            "read 0 512 => any-of((seed:1))",
        ] {
            assert!(parse(junk).is_err(), "{junk}");
        }
    }
}
