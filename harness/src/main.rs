//! `userblk`: serve a built-in device on /dev/nbdN, check, replay and record block devices, or
//! run a command in a VM per test kernel.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use userblk_harness::cli;

/// User-space block devices through the Linux NBD driver, and a test harness for them.
#[derive(Debug, Parser)]
#[command(name = "userblk", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve a built-in device (ram:SIZE, file:PATH) on a real /dev/nbdN (needs root and the nbd module).
    Serve(cli::serve::Args),
    /// Free a /dev/nbdN whose server is gone (killed, crashed): what `nbd-client -d` does.
    Disconnect(cli::disconnect::Args),
    /// Run the conformance suite, random tests and shipped traces against a device, and report.
    Check(cli::check::Args),
    /// Replay a recorded trace against a device and check every read.
    Replay(cli::replay::Args),
    /// Serve a device on /dev/nbdN and record every request it receives into a trace file.
    Record(cli::record::Args),
    /// Set up once, as root, that other users may serve unprivileged ublk devices (udev rule, ublk_drv).
    UblkSetup(cli::ublk_setup::Args),
    /// Give a new /dev/ublkcN and /dev/ublkbN to the device's owner (run by the udev rule of ublk-setup).
    #[command(hide = true)]
    UblkChown(cli::ublk_setup::ChownArgs),
    /// Run a command as root in a VM per test kernel (QEMU, virtme-ng) with nbd loaded; `vm setup` installs what it needs.
    Vm(cli::vm::Args),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::Serve(a) => cli::serve::run(a),
        Cmd::Disconnect(a) => cli::disconnect::run(a),
        Cmd::Check(a) => cli::check::run(a),
        Cmd::Replay(a) => cli::replay::run(a),
        Cmd::Record(a) => cli::record::run(a),
        Cmd::UblkSetup(a) => cli::ublk_setup::run_setup(a),
        Cmd::UblkChown(a) => cli::ublk_setup::run_chown(a),
        Cmd::Vm(a) => cli::vm::run(a),
    }
}
