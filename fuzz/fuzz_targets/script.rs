//! The script text format (`userblk_harness::script::Script::parse`): any text parses or fails
//! with a typed error naming a line of the text, never a panic; a script that parses prints
//! (`Display`) as text that parses back to the same steps, and prints the same again.

#![no_main]

use libfuzzer_sys::fuzz_target;
use userblk_harness::script::Script;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let script = match Script::parse(&text) {
        Ok(s) => s,
        Err(e) => {
            assert!(e.line >= 1 && e.line <= text.lines().count().max(1), "{e}");
            let _ = e.to_string();
            return;
        }
    };
    let printed = script.to_string();
    let again = Script::parse(&printed)
        .unwrap_or_else(|e| panic!("printed script does not parse: {e}\n{printed}"));
    assert_eq!(script.steps.len(), again.steps.len(), "{printed}");
    for (a, b) in script.steps.iter().zip(&again.steps) {
        assert_eq!(a.action, b.action, "{printed}");
        assert_eq!(a.expect, b.expect, "{printed}");
    }
    assert_eq!(again.to_string(), printed);
    let _ = script.needs_raw();
});
