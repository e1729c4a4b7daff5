//! `userblk replay`.

use std::process::ExitCode;

/// Arguments of `userblk replay`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `userblk replay`.
pub fn run(_args: Args) -> ExitCode {
    eprintln!("userblk replay: not implemented yet");
    ExitCode::FAILURE
}
