//! `userblk replay`: replay trace files against a built-in device through the loopback kernel
//! (and the real server), checking every read against the model of the trace.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::spec::DeviceSpec;
use crate::target::{LoopbackRig, Rig};
use crate::trace::{replay_on, Trace};

/// Arguments of `userblk replay`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Trace files (`*.ubt`).
    #[arg(required = true)]
    pub traces: Vec<PathBuf>,
    /// The device to replay against: ram:SIZE or file:PATH (a new, zero-filled or sparse file:
    /// reads of never-written ranges are checked as zeroes when the trace's device started
    /// zeroed). Default: a RAM disk of each trace's size.
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// Only describe the traces and check each against itself; replay nothing.
    #[arg(long)]
    pub info: bool,
}

/// Runs `userblk replay`.
pub fn run(args: Args) -> ExitCode {
    let mut failed = 0;
    for path in &args.traces {
        if let Err(e) = one(path, &args) {
            eprintln!("{}: FAILED: {e}", path.display());
            failed += 1;
        }
    }
    println!(
        "replay: {} passed, {} failed",
        args.traces.len() - failed,
        failed
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn one(path: &PathBuf, args: &Args) -> Result<(), String> {
    let trace = Trace::read_file(path).map_err(|e| e.to_string())?;
    let h = &trace.header;
    println!("{}: {}", path.display(), h.description);
    println!(
        "  device: {} bytes, {}-byte blocks, flags {:#06x}, initially {}, trimmed ranges read {}",
        h.size,
        h.block_size,
        h.flags.0,
        if h.initial_zeroes {
            "zeroes"
        } else {
            "unknown"
        },
        if h.trim_zeroes {
            "zeroes"
        } else {
            "unspecified"
        }
    );
    println!("  {}", trace.summary());
    let verified = trace.verify()?;
    println!(
        "  self-check: {} reads match the model, {} not fully predictable (racing writes, or \
         content of unknown value)",
        verified.reads_verified, verified.reads_ambiguous
    );
    if args.info {
        return Ok(());
    }
    let spec = args
        .device
        .clone()
        .unwrap_or(DeviceSpec::Ram { size: h.size });
    let device = spec
        .open(false)
        .map_err(|e| format!("opening {spec}: {e}"))?;
    let rig = LoopbackRig::default();
    let report = replay_on(&rig, device, &trace).map_err(|e| e.to_string())?;
    println!("  replay on {spec} via {}: {report}", rig.name());
    Ok(())
}
