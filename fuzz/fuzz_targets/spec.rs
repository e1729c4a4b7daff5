//! Device specifications from the command line (`userblk_harness::spec`): any text parses or
//! fails with a typed error; what parses prints back as a spec that parses to the same device.

#![no_main]

use libfuzzer_sys::fuzz_target;
use userblk_harness::spec::{human, parse_size, DeviceSpec, SpecError};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(n) = parse_size(text) {
        assert_eq!(parse_size(&human(n)), Ok(n), "{text:?}");
    }
    match text.parse::<DeviceSpec>() {
        Ok(spec) => {
            match &spec {
                DeviceSpec::Ram { size } | DeviceSpec::Pattern { size } => assert!(*size >= 512),
                DeviceSpec::File { path } => assert!(!path.as_os_str().is_empty()),
            }
            let printed = spec.to_string();
            assert_eq!(
                printed.parse::<DeviceSpec>(),
                Ok(spec),
                "{text:?} -> {printed:?}"
            );
        }
        Err(SpecError::TooSmall(n)) => assert!(n < 512),
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
