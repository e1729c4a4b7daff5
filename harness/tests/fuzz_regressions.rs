//! Inputs the fuzz targets in `fuzz/` found crashing the harness's parsers, kept as ordinary
//! tests. (The netlink ones are unit tests in `src/link/nbd/netlink.rs`, where the parser is.)
//! Each input also lives in `fuzz/seeds/<target>/`, so every fuzzing run starts from it.

use userblk_harness::script::{ParseErrorKind, Pos, Script};

/// `script` target: an offset `end` followed by a multi-byte character was split at byte 1,
/// inside the character, and the parser panicked. It is a bad number now.
#[test]
fn script_offset_end_then_a_multibyte_character_is_a_bad_number() {
    // The fuzzer's input, minimized by hand: "zeroes\x0cend\xa0r3aw 0B", read as lossy UTF-8
    // (the \xa0 becomes U+FFFD, three bytes).
    let found = b"zeroes\x0cend\xa0r3aw 0B \n \n";
    let text = String::from_utf8_lossy(found);
    let err = Script::parse(&text).unwrap_err();
    assert_eq!(err.line, 1);
    assert_eq!(
        err.kind,
        ParseErrorKind::BadNumber("end\u{fffd}r3aw".into())
    );
    for offset in ["end\u{e9}", "endé512", "end\u{1f600}", "end-\u{e9}"] {
        let err = Script::parse(&format!("read {offset} 512")).unwrap_err();
        assert_eq!(
            err.kind,
            ParseErrorKind::BadNumber(offset.into()),
            "{offset}"
        );
    }
    // What was right stays right.
    let s = Script::parse("read end-512 512\nread end+0 512\nread end 512 => EINVAL").unwrap();
    let offsets: Vec<_> = s
        .steps
        .iter()
        .map(|st| match st.action {
            userblk_harness::script::Action::Request { offset, .. } => offset,
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(
        offsets,
        [Pos::FromEnd(-512), Pos::FromEnd(0), Pos::FromEnd(0)]
    );
}
