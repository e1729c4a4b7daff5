//! `userblk record`.

use std::process::ExitCode;

/// Arguments of `userblk record`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `userblk record`.
pub fn run(_args: Args) -> ExitCode {
    eprintln!("userblk record: not implemented yet");
    ExitCode::FAILURE
}
