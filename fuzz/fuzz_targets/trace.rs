//! The trace reader (`userblk_harness::trace::Trace::decode`): a `.ubt` file is untrusted input.
//! Any bytes decode or fail with a typed `TraceError`, in bounded memory (libFuzzer's RSS and
//! malloc limits catch an allocation the file's size does not justify); a trace that decodes
//! encodes to a file that decodes to the same trace; and checking it against itself
//! (`Trace::verify`, what `userblk replay --info` does) never panics.
//!
//! Inputs whose first byte is odd (and that do not start with the magic) are a body: the target compresses the rest and puts the
//! file header in front, so that the fuzzer explores the records rather than the zlib checksum.
//! Other inputs are the file as it is.

#![no_main]

use libfuzzer_sys::fuzz_target;
use userblk_harness::trace::{OpKind, Trace, MAGIC};

fuzz_target!(|data: &[u8]| {
    let owned;
    let file = match data {
        [first, body @ ..] if first & 1 == 1 && !data.starts_with(&MAGIC) => {
            let z = miniz_oxide::deflate::compress_to_vec_zlib(body, 1);
            owned = [&MAGIC[..], &[1, 0, 0, 0], &z].concat();
            &owned[..]
        }
        _ => data,
    };
    let Ok(trace) = Trace::decode(file) else {
        return;
    };
    let again = Trace::decode(&trace.encode()).expect("a decoded trace re-encodes readably");
    assert_eq!(again.header, trace.header);
    assert_eq!(again.ops.len(), trace.ops.len());
    for (a, b) in trace.ops.iter().zip(&again.ops) {
        assert_eq!(
            (a.start, a.end, a.offset, a.len, a.errno),
            (b.start, b.end, b.offset, b.len, b.errno)
        );
        match (&a.kind, &b.kind) {
            (OpKind::Write { fua: x, .. }, OpKind::Write { fua: y, .. }) => {
                assert_eq!(x, y);
                // Piece numbers may change (unused pieces are dropped); the data may not.
                assert_eq!(trace.write_data(a), again.write_data(b));
            }
            (x, y) => assert_eq!(x, y),
        }
    }
    let _ = trace.summary().to_string();
    // The model is quadratic in ops overlapping in time: keep each run short.
    if trace.ops.len() <= 256 {
        let _ = trace.verify();
    }
});
