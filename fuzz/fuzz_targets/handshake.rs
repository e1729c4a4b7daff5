//! The server side of the fixed newstyle handshake (`userblk::link::net::handshake`) fed an
//! arbitrary byte stream as the client, over an in-memory stream, from the greeting to the end of
//! option haggling (`NBD_OPT_STARTTLS` is played as if TLS had started: the state machine's
//! `tls_started` is called and haggling goes on over the same stream).
//!
//! The first four bytes choose the set-up: byte 0 the TLS mode, whether structured replies are
//! offered and the export's name; bytes 1-2 (big-endian) the stream offset from which the server
//! is stopping (`0xffff`: never), so that `NBD_REP_ERR_SHUTDOWN` is reached mid-haggle; byte 3
//! a budget after which the client stops reading (the server's writes fail), `0`: never. The
//! rest is what the client sends: its flags, then options.
//!
//! Checks besides "no panic": the greeting is the server's; every option the server read whole
//! gets its replies in order, each naming that option, the intermediate ones of a type that option
//! may have (`NBD_REP_SERVER`, `NBD_REP_INFO`, `NBD_REP_META_CONTEXT`), ending in exactly one
//! `NBD_REP_ACK` or error (the last option may go unanswered only when the handshake failed);
//! `NBD_OPT_EXPORT_NAME` is answered with the export reply and nothing else; nothing is written
//! after the end; unknown options get an error; with TLS required, no export data, list or
//! context leaves before TLS and transmission never starts without it; once stopping, every option
//! but `NBD_OPT_ABORT` gets `NBD_REP_ERR_SHUTDOWN`; a successful end has read exactly the options
//! answered (nothing read ahead of the transmission phase), with the transmission flags and
//! structured replies the replies announced; and what the server writes stays under a fixed bound.
//! Memory: `fuzz/run.sh` runs this target with `-malloc_limit_mb=1`, so that any allocation of a
//! megabyte or more (an announced length taken at its word) is a crash; option data is at most
//! `MAX_OPTION_LEN` (64 KiB).

#![no_main]

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use libfuzzer_sys::fuzz_target;
use userblk::link::net::handshake::{
    Handshake, HandshakeError, Offer, Outcome, MAX_OPTIONS, MAX_OPTION_LEN, SERVER_FLAGS,
};
use userblk::link::net::wire::{
    self, BlockSizes, ExportData, Info, Opt, OptionHeader, OptionReplyHeader, Rep,
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_SEND_DF, GREETING_LEN, OPTION_HEADER_LEN,
    OPTION_REPLY_HEADER_LEN,
};
use userblk::link::net::TlsMode;
use userblk::proto::TransmissionFlags;

/// The most the server may write in one handshake: the greeting and the replies to
/// `MAX_OPTIONS` options, none of which carries more than a few hundred bytes beyond the export's
/// name and description (the longest, an error reply, quotes at most a 4 KiB string).
const OUTPUT_BOUND: usize = GREETING_LEN + MAX_OPTIONS * (8 << 10);

/// The client's end of the stream: reads come from the fuzzer's bytes, writes are kept.
struct Duplex<'a> {
    input: &'a [u8],
    at: usize,
    output: Vec<u8>,
    /// Bytes the client reads before it stops reading (0: no limit).
    write_budget: usize,
    write_failed: bool,
    /// Once `at` reaches this, the server is stopping.
    stop_at: usize,
    stopping: &'a AtomicBool,
}

impl Read for Duplex<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // One byte at a time at odd offsets: the server must cope with short reads.
        let n = buf.len().min(self.input.len() - self.at);
        let n = if self.at % 7 == 3 { n.min(1) } else { n };
        buf[..n].copy_from_slice(&self.input[self.at..self.at + n]);
        self.at += n;
        if self.at >= self.stop_at {
            self.stopping.store(true, Ordering::SeqCst);
        }
        Ok(n)
    }
}

impl Write for Duplex<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.write_budget != 0 && self.output.len() + buf.len() > self.write_budget {
            self.write_failed = true;
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

const NAMES: [&str; 4] = ["", "disk", "exp\u{e9}rt", "a-longer-export-name-for-list"];

fn offer(config: u8) -> Offer {
    Offer {
        name: NAMES[usize::from(config >> 3 & 3)].to_string(),
        description: if config & 0x20 != 0 {
            "a fuzzed disk".into()
        } else {
            String::new()
        },
        export: ExportData {
            size: 1 << 20,
            flags: TransmissionFlags(0x0d | u16::from(config & 0x40) << 2),
        },
        block_sizes: BlockSizes {
            minimum: 512,
            preferred: 4096,
            maximum: 32 << 20,
        },
        structured_replies: config & 0x04 != 0,
    }
}

/// An option the server read whole (or only the header of, when it refused the length).
struct Sent<'a> {
    option: Opt,
    data: &'a [u8],
    /// Whether the whole option was read.
    whole: bool,
    /// Bytes of the stream up to its end (header only, when not whole).
    end: usize,
    /// TLS was running when it arrived.
    tls: bool,
    /// The server was stopping when it had been read.
    stopping: bool,
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let config = data[0];
    let tls = match config & 3 {
        1 => TlsMode::Allow,
        2 => TlsMode::Require,
        _ => TlsMode::Off,
    };
    let stop_at = match u16::from_be_bytes([data[1], data[2]]) {
        0xffff => usize::MAX,
        n => usize::from(n),
    };
    let write_budget = usize::from(data[3]) * 37;
    let input = &data[4..];
    let offer = offer(config);
    let stopping = AtomicBool::new(false);

    let mut s = Duplex {
        input,
        at: 0,
        output: Vec::new(),
        write_budget,
        write_failed: false,
        stop_at,
        stopping: &stopping,
    };
    // Option boundaries as the server reads them, with the TLS and stop state at each.
    let mut tls_starts = Vec::new();
    let result = run(&mut s, &offer, tls, &stopping, &mut tls_starts);

    assert!(
        s.output.len() <= OUTPUT_BOUND,
        "one handshake wrote {} bytes",
        s.output.len()
    );
    check(&s, &offer, tls, stop_at, &tls_starts, &result);
});

fn run(
    s: &mut Duplex<'_>,
    offer: &Offer,
    tls: TlsMode,
    stopping: &AtomicBool,
    tls_starts: &mut Vec<usize>,
) -> Result<Outcome, HandshakeError> {
    let mut hs = Handshake::greet(s, offer, tls)?;
    hs.stop_flag(stopping);
    loop {
        match hs.options(s)? {
            Outcome::StartTls => {
                assert_ne!(tls, TlsMode::Off, "STARTTLS accepted with TLS off");
                assert!(!hs.tls_active(), "STARTTLS accepted twice");
                hs.tls_started();
                tls_starts.push(s.at);
            }
            other => return Ok(other),
        }
    }
}

/// The options in the stream up to what the server read.
fn sent<'a>(s: &Duplex<'a>, stop_at: usize, tls_starts: &[usize]) -> Vec<Sent<'a>> {
    let mut v = Vec::new();
    let mut at = 4;
    while at + OPTION_HEADER_LEN <= s.at {
        let Ok(h) = OptionHeader::parse(&s.input[at..]) else {
            break;
        };
        let end = at + OPTION_HEADER_LEN + h.len as usize;
        let whole = h.len <= MAX_OPTION_LEN && end <= s.at;
        let end = if whole { end } else { at + OPTION_HEADER_LEN };
        v.push(Sent {
            option: h.option,
            data: &s.input[at + OPTION_HEADER_LEN..end],
            whole,
            end,
            tls: tls_starts.iter().any(|&t| t <= at),
            stopping: end >= stop_at,
        });
        if !whole {
            break;
        }
        at = end;
    }
    v
}

fn check(
    s: &Duplex<'_>,
    offer: &Offer,
    tls: TlsMode,
    stop_at: usize,
    tls_starts: &[usize],
    result: &Result<Outcome, HandshakeError>,
) {
    let out = &s.output;
    if out.len() < GREETING_LEN {
        assert!(s.write_failed && result.is_err(), "no greeting");
        return;
    }
    assert_eq!(wire::parse_greeting(out), Ok(SERVER_FLAGS));
    if s.input.len() < 4 || s.at < 4 {
        assert!(result.is_err());
        return;
    }
    let client_flags = u32::from_be_bytes([s.input[0], s.input[1], s.input[2], s.input[3]]);
    let fixed = client_flags & FLAG_C_FIXED_NEWSTYLE != 0;
    let options = sent(s, stop_at, tls_starts);
    assert!(options.len() <= MAX_OPTIONS);
    let truncated = s.write_failed;
    let mut at = GREETING_LEN;
    let mut structured = false;
    let mut announced: Option<TransmissionFlags> = None;
    for (i, o) in options.iter().enumerate() {
        let last = i + 1 == options.len();
        if !o.whole {
            assert!(last && result.is_err(), "an option cut short was answered");
            break;
        }
        if o.option == Opt::EXPORT_NAME && at < out.len() {
            // The export reply: size, flags, and 124 zeroes unless the client said NO_ZEROES.
            let len = if client_flags & FLAG_C_NO_ZEROES != 0 { 10 } else { 134 };
            assert!(!o.stopping, "EXPORT_NAME served while stopping");
            assert!(tls != TlsMode::Require || o.tls, "EXPORT_NAME served without TLS");
            assert_eq!(out.len(), at + len, "bytes after the export reply");
            assert!(matches!(result, Ok(Outcome::Transmission(n)) if n.export_name));
            return;
        }
        // The replies to this option, up to the final one.
        let mut finished = false;
        let mut types = Vec::new();
        while at < out.len() {
            let Ok(h) = OptionReplyHeader::parse(&out[at..]) else {
                assert!(truncated, "a malformed reply header");
                return;
            };
            let body = at + OPTION_REPLY_HEADER_LEN..at + OPTION_REPLY_HEADER_LEN + h.len as usize;
            if body.end > out.len() {
                assert!(truncated, "a reply cut short");
                return;
            }
            assert_eq!(h.option, o.option, "a reply names another option");
            let body = &out[body];
            at += OPTION_REPLY_HEADER_LEN + h.len as usize;
            types.push(h.reply);
            if h.reply == Rep::ACK || h.reply.is_error() {
                finished = true;
                break;
            }
            match h.reply {
                Rep::SERVER => assert_eq!(o.option, Opt::LIST),
                Rep::INFO => {
                    assert!(matches!(o.option, Opt::INFO | Opt::GO));
                    if let Ok(Info::Export(e)) = Info::parse(body) {
                        assert_eq!(e.size, offer.export.size);
                        announced = Some(e.flags);
                    }
                }
                Rep::META_CONTEXT => {
                    assert!(matches!(o.option, Opt::LIST_META_CONTEXT | Opt::SET_META_CONTEXT))
                }
                other => panic!("{other} in reply to {}", o.option),
            }
            assert!(
                tls != TlsMode::Require || o.tls,
                "{} answered with data before TLS",
                o.option
            );
        }
        if !finished {
            assert!(
                (last && result.is_err()) || truncated,
                "{} got no final reply",
                o.option
            );
            break;
        }
        let fin = *types.last().unwrap_or(&Rep::ACK);
        if o.stopping && o.option != Opt::ABORT {
            assert_eq!(types, [Rep::ERR_SHUTDOWN], "{} while stopping", o.option);
        }
        if !fixed {
            // Without fixed newstyle, nothing but EXPORT_NAME is answered but with an error.
            assert!(fin.is_error(), "{} answered to a non-fixed client", o.option);
        }
        if tls == TlsMode::Require && !o.tls && !matches!(o.option, Opt::STARTTLS | Opt::ABORT) {
            assert!(fin.is_error(), "{} accepted before TLS", o.option);
        }
        let known = matches!(
            o.option,
            Opt::EXPORT_NAME
                | Opt::ABORT
                | Opt::LIST
                | Opt::STARTTLS
                | Opt::INFO
                | Opt::GO
                | Opt::STRUCTURED_REPLY
                | Opt::LIST_META_CONTEXT
                | Opt::SET_META_CONTEXT
        );
        if !known {
            assert_eq!(types.len(), 1);
            assert!(fin.is_error(), "unknown {} accepted", o.option);
        }
        if o.option == Opt::STARTTLS && fin == Rep::ACK {
            assert!(tls_starts.contains(&o.end) || (last && result.is_err()));
            structured = false;
        }
        if o.option == Opt::STRUCTURED_REPLY && fin == Rep::ACK {
            assert!(o.data.is_empty() && offer.structured_replies);
            structured = true;
        }
        if o.option == Opt::ABORT && fin == Rep::ACK {
            assert!(last, "options read after an acknowledged ABORT");
        }
        if last && result.is_ok() {
            assert_eq!(s.at, o.end, "the server read past the last option it answered");
        }
    }
    if !truncated && result.is_ok() {
        assert_eq!(at, out.len(), "bytes after the last reply");
    }
    match result {
        Ok(Outcome::Transmission(n)) => {
            let last = options.last().expect("transmission without an option");
            assert_eq!(last.option, Opt::GO);
            assert!(tls != TlsMode::Require || last.tls, "transmission without TLS");
            assert!(!last.stopping, "transmission while stopping");
            assert_eq!(n.structured_replies, structured);
            assert!(!n.base_allocation || n.structured_replies);
            let mut flags = offer.export.flags;
            if structured {
                flags |= FLAG_SEND_DF;
            }
            assert_eq!(n.flags, flags);
            assert_eq!(announced, Some(flags), "GO without NBD_INFO_EXPORT");
        }
        Ok(Outcome::Aborted) => {
            assert_eq!(options.last().map(|o| o.option), Some(Opt::ABORT));
        }
        Ok(Outcome::StartTls) => unreachable!("run continues after STARTTLS"),
        Err(HandshakeError::TooManyOptions) => assert_eq!(options.len(), MAX_OPTIONS),
        Err(HandshakeError::OptionTooLong { len, .. }) => assert!(*len > MAX_OPTION_LEN),
        Err(HandshakeError::ClientFlags { flags }) => {
            assert_ne!(flags & !u32::from(SERVER_FLAGS), 0)
        }
        Err(_) => {}
    }
}
