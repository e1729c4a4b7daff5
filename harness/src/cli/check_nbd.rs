//! `userblk check nbd://HOST:PORT/NAME` (or `nbds://...`, `nbd+unix:///NAME?socket=PATH`): the
//! checks that can run against a disk the harness does not own, through the harness's NBD client
//! ([`ExternalRig`]), against any NBD server. The export is overwritten.
//!
//! The checks still take a device factory: here it makes placeholders of the export's size and
//! capabilities whose content is never used (the rig drops them; the server serves its own
//! disk). Re-opening one means connecting to the server again.
//!
//! What runs: the conformance suite (capabilities from the server's transmission flags; cases
//! that inspect the device the harness made skip), the random tests, and the shipped traces the
//! export is large enough for. What does not: the fake kernel's profiles, the 32 MiB-request
//! pass, the sparse 4 TiB probe and the latency table, all of which need a device the harness
//! serves itself.

use std::fmt;
use std::io;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Instant;

use userblk::{BlockDevice, Capabilities};

use super::check::{describe, print_report, run_random, run_traces, verdict, Args, Progress};
use crate::conformance::{self, Env};
use crate::factory::{DeviceFactory, Reopen};
use crate::net_rig::{ExternalRig, NbdClient};
use crate::spec::{human, DeviceSpec, SpecError};
use crate::target::Rig;
use crate::trace::replay_on;

/// What `userblk check` checks: a device it serves itself, or an NBD server's export.
#[derive(Clone, Debug)]
pub enum CheckTarget {
    /// A device spec (`ram:64M`, `file:PATH`, `pattern:SIZE`).
    Device(DeviceSpec),
    /// An NBD URI (`nbd://`, `nbds://`, `nbd+unix://`): the server serves its own disk.
    Nbd(String),
}

impl FromStr for CheckTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<CheckTarget, String> {
        if ["nbd://", "nbds://", "nbd+unix://", "nbds+unix://"]
            .iter()
            .any(|p| s.starts_with(p))
        {
            // The URI itself is parsed (and its errors reported) when connecting.
            Ok(CheckTarget::Nbd(s.to_string()))
        } else {
            s.parse().map(CheckTarget::Device).map_err(|e: SpecError| {
                format!(
                    "{e}; or an NBD URI: nbd://HOST[:PORT]/NAME, nbds://..., \
                     nbd+unix:///NAME?socket=PATH"
                )
            })
        }
    }
}

impl fmt::Display for CheckTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckTarget::Device(d) => d.fmt(f),
            CheckTarget::Nbd(u) => f.write_str(u),
        }
    }
}

/// Stands in for the device a case or run hands to [`ExternalRig::attach`], which drops it
/// unused: it has the export's size and capabilities (which the checks read) and no content
/// (reading it is an error, so a check that wrongly used it would say so).
struct Placeholder {
    blocks: u64,
    caps: Capabilities,
}

impl BlockDevice for Placeholder {
    fn blocks(&self) -> u64 {
        self.blocks
    }
    fn capabilities(&self) -> Capabilities {
        self.caps
    }
    fn read(&self, _offset: u64, _buf: &mut [u8]) -> io::Result<()> {
        Err(io::Error::other(
            "placeholder device: the NBD server serves its own disk",
        ))
    }
}

/// Zeroes the export over `len` bytes before a trace that assumes it starts as zeroes.
fn zero_export(rig: &ExternalRig, caps: Capabilities, len: u64) -> Result<(), String> {
    let dev = Placeholder {
        blocks: len / 512,
        caps,
    };
    let t = rig.attach(Box::new(dev)).map_err(|e| e.to_string())?;
    let zeroed = t
        .write_zeroes(0, len, false)
        .and_then(|()| t.flush())
        .map_err(|e| format!("cannot zero the export before replaying: {e}"));
    let detached = t.detach().map_err(|e| e.to_string());
    zeroed.and(detached)
}

/// Runs `userblk check URI`.
pub fn run(uri: &str, args: &Args) -> ExitCode {
    let started = Instant::now();
    if args.kernel.is_some() || !args.profiles.is_empty() {
        eprintln!(
            "userblk check: --kernel and --profile apply to a device spec, not to an NBD URI"
        );
        return ExitCode::from(2);
    }
    let rig = match ExternalRig::new(uri) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("userblk check: {e}");
            return ExitCode::from(2);
        }
    };
    eprintln!(
        "userblk check: warning: this check WRITES to the export at {uri}: its contents are lost"
    );
    let info = match NbdClient::connect(rig.uri()) {
        Ok(c) => {
            let info = c.info().clone();
            let _ = c.disconnect();
            info
        }
        Err(e) => {
            eprintln!("userblk check: cannot connect to {uri}: {e}");
            return ExitCode::from(2);
        }
    };
    let size = info.size;
    let caps = info.capabilities();
    // The checks' devices: placeholders of the export's size, never read (see Placeholder).
    // Re-openable: the "storage" is the server's export, and re-opening it is connecting again,
    // so the durability cases check that the data survives a disconnect.
    let blocks = size / 512;
    let make = Reopen::new(|| Ok(()), move |_: &()| Ok(Placeholder { blocks, caps }));
    let progress = Progress::new();
    println!(
        "userblk check {uri}: {} bytes, {}; through the harness's NBD client (the server's own disk)",
        human(size),
        describe(&caps),
    );
    let mut failed = false;

    // 1. The conformance suite.
    let cases = conformance::cases();
    let env = Env::new(&rig, &make, caps);
    let report = conformance::run_cases(&env, &cases, &mut |i, c| {
        progress.show(&format!(
            "[{}/{}] conformance: {}",
            i + 1,
            cases.len(),
            c.name
        ));
    });
    progress.clear();
    print_report(&report);
    failed |= !report.all_passed();

    // 2. Random sequences against the model (which takes the initial content as unknown).
    failed |= !run_random(&rig, &make, caps, args, &progress, |_| String::new());

    // 3. The shipped traces the export is large enough for.
    failed |= !run_traces(args, size, caps, "export", &progress, &mut |trace| {
        if trace.header.initial_zeroes {
            zero_export(&rig, caps, trace.header.size)?;
        }
        let dev = make.create().map_err(|e| e.to_string())?;
        replay_on(&rig, dev, trace).map_err(|e| e.to_string())
    });

    verdict(failed, started)
}
