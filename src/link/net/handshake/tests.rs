//! Tests of the server side of the handshake, with a scripted client.

use super::*;
use wire::{OptionReplyHeader, OPTION_REPLY_HEADER_LEN};

/// A scripted client: what it sends, and what the server wrote back.
struct Duplex {
    input: io::Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn offer() -> Offer {
    Offer {
        name: "disk".into(),
        description: "a test disk".into(),
        export: ExportData {
            size: 1 << 20,
            flags: TransmissionFlags(0x10d),
        },
        block_sizes: BlockSizes {
            minimum: 512,
            preferred: 4096,
            maximum: 32 << 20,
        },
        structured_replies: true,
    }
}

fn client(flags: u32, options: &[(Opt, Vec<u8>)]) -> Duplex {
    let mut input = flags.to_be_bytes().to_vec();
    for (o, d) in options {
        input.extend(wire::encode_option(*o, d));
    }
    Duplex {
        input: io::Cursor::new(input),
        output: Vec::new(),
    }
}

/// The option replies in `out` after the greeting, as (option, reply, data).
fn replies(out: &[u8]) -> Vec<(Opt, Rep, Vec<u8>)> {
    let mut at = wire::GREETING_LEN;
    let mut v = Vec::new();
    while at < out.len() {
        let h = OptionReplyHeader::parse(&out[at..]).unwrap();
        at += OPTION_REPLY_HEADER_LEN;
        v.push((h.option, h.reply, out[at..at + h.len as usize].to_vec()));
        at += h.len as usize;
    }
    v
}

fn go(name: &str, requests: Vec<u16>) -> Vec<u8> {
    InfoRequest {
        name: name.into(),
        requests,
    }
    .encode()
}

fn run(tls: TlsMode, d: &mut Duplex) -> Result<Outcome, HandshakeError> {
    let offer = offer();
    let mut h = Handshake::greet(d, &offer, tls)?;
    h.options(d)
}

const FIXED: u32 = FLAG_C_FIXED_NEWSTYLE;

#[test]
fn go_replies_export_block_size_name_and_description() {
    let mut d = client(
        FIXED,
        &[(
            Opt::GO,
            go("", vec![info::NAME, info::DESCRIPTION, info::BLOCK_SIZE]),
        )],
    );
    let outcome = run(TlsMode::Off, &mut d).unwrap();
    assert_eq!(
        outcome,
        Outcome::Transmission(Negotiated {
            structured_replies: false,
            base_allocation: false,
            export_name: false,
            flags: offer().export.flags,
        })
    );
    assert_eq!(wire::parse_greeting(&d.output), Ok(SERVER_FLAGS));
    let r = replies(&d.output);
    let infos: Vec<Info> = r
        .iter()
        .filter(|(_, rep, _)| *rep == Rep::INFO)
        .map(|(_, _, data)| Info::parse(data).unwrap())
        .collect();
    assert_eq!(
        infos,
        [
            Info::Export(offer().export),
            Info::BlockSize(offer().block_sizes),
            Info::Name("disk".into()),
            Info::Description("a test disk".into()),
        ]
    );
    assert_eq!(r.last().unwrap().1, Rep::ACK);
}

#[test]
fn unknown_export_and_malformed_go_get_errors_and_the_handshake_goes_on() {
    let mut bad = go("", vec![]);
    bad.push(0); // one byte more than the count says
    let mut d = client(
        FIXED,
        &[
            (Opt::INFO, go("other", vec![])),
            (Opt::GO, bad),
            (Opt(42), vec![1, 2, 3]),
            (Opt::GO, go("disk", vec![])),
        ],
    );
    assert!(matches!(
        run(TlsMode::Off, &mut d),
        Ok(Outcome::Transmission(_))
    ));
    let kinds: Vec<Rep> = replies(&d.output).iter().map(|r| r.1).collect();
    assert_eq!(
        kinds,
        [
            Rep::ERR_UNKNOWN,
            Rep::ERR_INVALID,
            Rep::ERR_UNSUP,
            Rep::INFO,
            Rep::INFO,
            Rep::ACK
        ]
    );
}

#[test]
fn export_name_reply_honours_no_zeroes() {
    for (flags, len) in [(FIXED, 8 + 2 + 124), (FIXED | FLAG_C_NO_ZEROES, 10)] {
        let mut d = client(flags, &[(Opt::EXPORT_NAME, b"disk".to_vec())]);
        assert!(matches!(
            run(TlsMode::Off, &mut d),
            Ok(Outcome::Transmission(Negotiated {
                export_name: true,
                ..
            }))
        ));
        assert_eq!(d.output.len(), wire::GREETING_LEN + len);
        assert_eq!(
            d.output[wire::GREETING_LEN..wire::GREETING_LEN + 8],
            (1u64 << 20).to_be_bytes()
        );
    }
    let mut d = client(FIXED, &[(Opt::EXPORT_NAME, b"nope".to_vec())]);
    assert!(matches!(
        run(TlsMode::Off, &mut d),
        Err(HandshakeError::UnknownExport { .. })
    ));
}

#[test]
fn list_and_abort() {
    let mut d = client(FIXED, &[(Opt::LIST, vec![]), (Opt::ABORT, vec![])]);
    assert_eq!(run(TlsMode::Off, &mut d).unwrap(), Outcome::Aborted);
    let r = replies(&d.output);
    assert_eq!(r[0].1, Rep::SERVER);
    assert_eq!(
        wire::parse_server_reply(&r[0].2).unwrap(),
        ("disk".into(), "a test disk".into())
    );
    assert_eq!((r[1].1, r[2].0, r[2].1), (Rep::ACK, Opt::ABORT, Rep::ACK));
}

#[test]
fn meta_context_needs_structured_replies_and_selects_base_allocation() {
    let query = |qs: &[&str]| {
        MetaContextRequest {
            name: "disk".into(),
            queries: qs.iter().map(|q| q.to_string()).collect(),
        }
        .encode()
    };
    let mut d = client(
        FIXED,
        &[
            (Opt::SET_META_CONTEXT, query(&[BASE_ALLOCATION])),
            (Opt::STRUCTURED_REPLY, vec![]),
            (Opt::LIST_META_CONTEXT, query(&[])),
            (Opt::LIST_META_CONTEXT, query(&["base:", "x-other:thing"])),
            (
                Opt::SET_META_CONTEXT,
                query(&["x-other:thing", BASE_ALLOCATION]),
            ),
            (Opt::GO, go("", vec![])),
        ],
    );
    assert_eq!(
        run(TlsMode::Off, &mut d).unwrap(),
        Outcome::Transmission(Negotiated {
            structured_replies: true,
            base_allocation: true,
            export_name: false,
            flags: offer().export.flags | wire::FLAG_SEND_DF,
        })
    );
    let r = replies(&d.output);
    let kinds: Vec<Rep> = r.iter().map(|r| r.1).collect();
    assert_eq!(
        kinds[..8],
        [
            Rep::ERR_INVALID,
            Rep::ACK,
            Rep::META_CONTEXT,
            Rep::ACK,
            Rep::META_CONTEXT,
            Rep::ACK,
            Rep::META_CONTEXT,
            Rep::ACK
        ]
    );
    assert_eq!(
        wire::parse_meta_context_reply(&r[6].2).unwrap(),
        (BASE_ALLOCATION_ID, BASE_ALLOCATION.into())
    );
}

#[test]
fn require_tls_refuses_everything_but_starttls() {
    let mut d = client(
        FIXED,
        &[
            (Opt::LIST, vec![]),
            (Opt::GO, go("", vec![])),
            (Opt::STARTTLS, vec![]),
        ],
    );
    assert_eq!(run(TlsMode::Require, &mut d).unwrap(), Outcome::StartTls);
    let kinds: Vec<Rep> = replies(&d.output).iter().map(|r| r.1).collect();
    assert_eq!(kinds, [Rep::ERR_TLS_REQD, Rep::ERR_TLS_REQD, Rep::ACK]);
    let mut d = client(FIXED, &[(Opt::EXPORT_NAME, vec![])]);
    assert!(matches!(
        run(TlsMode::Require, &mut d),
        Err(HandshakeError::TlsRequired)
    ));
    // Without TLS configured, STARTTLS is refused by policy.
    let mut d = client(FIXED, &[(Opt::STARTTLS, vec![]), (Opt::ABORT, vec![])]);
    assert_eq!(run(TlsMode::Off, &mut d).unwrap(), Outcome::Aborted);
    assert_eq!(replies(&d.output)[0].1, Rep::ERR_POLICY);
}

#[test]
fn starttls_forgets_structured_replies() {
    let offer = offer();
    let mut d = client(
        FIXED,
        &[(Opt::STRUCTURED_REPLY, vec![]), (Opt::STARTTLS, vec![])],
    );
    let mut h = Handshake::greet(&mut d, &offer, TlsMode::Allow).unwrap();
    assert_eq!(h.options(&mut d).unwrap(), Outcome::StartTls);
    h.tls_started();
    d.input = io::Cursor::new(wire::encode_option(Opt::GO, &go("", vec![])));
    assert_eq!(
        h.options(&mut d).unwrap(),
        Outcome::Transmission(Negotiated {
            structured_replies: false,
            base_allocation: false,
            export_name: false,
            flags: offer.export.flags,
        })
    );
}

#[test]
fn hostile_clients_get_typed_errors() {
    let offer = offer();
    // Unknown client flags.
    let mut d = client(1 << 7, &[]);
    assert!(matches!(
        Handshake::greet(&mut d, &offer, TlsMode::Off),
        Err(HandshakeError::ClientFlags { flags: 0x80 })
    ));
    // A huge option length is refused before anything is read or allocated.
    let mut d = client(FIXED, &[]);
    d.input.get_mut().extend(
        OptionHeader {
            option: Opt::GO,
            len: u32::MAX,
        }
        .encode(),
    );
    assert!(matches!(
        run(TlsMode::Off, &mut d),
        Err(HandshakeError::OptionTooLong { len: u32::MAX, .. })
    ));
    // A bad option magic.
    let mut d = client(FIXED, &[]);
    d.input.get_mut().extend([0x42; 16]);
    assert!(matches!(
        run(TlsMode::Off, &mut d),
        Err(HandshakeError::Wire { .. })
    ));
    // Too many options.
    let many: Vec<(Opt, Vec<u8>)> = (0..MAX_OPTIONS + 1).map(|_| (Opt(99), vec![])).collect();
    let mut d = client(FIXED, &many);
    assert!(matches!(
        run(TlsMode::Off, &mut d),
        Err(HandshakeError::TooManyOptions)
    ));
    // Hang-up inside option data.
    let mut d = client(FIXED, &[(Opt::GO, go("", vec![]))]);
    let len = d.input.get_ref().len();
    d.input.get_mut().truncate(len - 3);
    assert!(matches!(
        run(TlsMode::Off, &mut d),
        Err(HandshakeError::Eof {
            stage: "option data",
            got: 3,
            expected: 6
        })
    ));
}

#[test]
fn non_fixed_client_may_only_name_an_export() {
    let mut d = client(0, &[(Opt::LIST, vec![]), (Opt::EXPORT_NAME, vec![])]);
    assert!(matches!(
        run(TlsMode::Off, &mut d),
        Ok(Outcome::Transmission(_))
    ));
    assert_eq!(
        replies(&d.output[..wire::GREETING_LEN + 20 + 33])[0].1,
        Rep::ERR_INVALID
    );
}

#[test]
fn options_get_err_shutdown_once_the_server_is_stopping_and_abort_still_ends_cleanly() {
    let stopping = AtomicBool::new(false);
    let offer = offer();
    let mut d = client(
        FIXED,
        &[
            (Opt::GO, go("", vec![])),
            (Opt::LIST, vec![]),
            (Opt(42), vec![]),
            (Opt::ABORT, vec![]),
        ],
    );
    let mut h = Handshake::greet(&mut d, &offer, TlsMode::Off).unwrap();
    h.stop_flag(&stopping);
    // The flag is read per option: set after the greeting, it refuses the very first one.
    stopping.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(h.options(&mut d).unwrap(), Outcome::Aborted);
    let kinds: Vec<(Opt, Rep)> = replies(&d.output)
        .iter()
        .map(|(o, rep, _)| (*o, *rep))
        .collect();
    assert_eq!(
        kinds,
        [
            (Opt::GO, Rep::ERR_SHUTDOWN),
            (Opt::LIST, Rep::ERR_SHUTDOWN),
            (Opt(42), Rep::ERR_SHUTDOWN),
            (Opt::ABORT, Rep::ACK),
        ]
    );
}

#[test]
fn export_name_while_stopping_ends_the_handshake_with_a_typed_error() {
    let stopping = AtomicBool::new(true);
    let offer = offer();
    let mut d = client(FIXED, &[(Opt::EXPORT_NAME, b"disk".to_vec())]);
    let mut h = Handshake::greet(&mut d, &offer, TlsMode::Off).unwrap();
    h.stop_flag(&stopping);
    assert!(matches!(
        h.options(&mut d),
        Err(HandshakeError::ShuttingDown)
    ));
    // Nothing after the greeting: the export reply was not sent.
    assert_eq!(d.output.len(), wire::GREETING_LEN);
}
