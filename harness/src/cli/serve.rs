//! `userblk serve`.

use std::process::ExitCode;

/// Arguments of `userblk serve`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `userblk serve`.
pub fn run(_args: Args) -> ExitCode {
    eprintln!("userblk serve: not implemented yet");
    ExitCode::FAILURE
}
