//! `userblk check`.

use std::process::ExitCode;

/// Arguments of `userblk check`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `userblk check`.
pub fn run(_args: Args) -> ExitCode {
    eprintln!("userblk check: not implemented yet");
    ExitCode::FAILURE
}
