//! `userblk disconnect /dev/nbdN`: frees an NBD device whatever became of its server (what
//! `nbd-client -d` does): netlink DISCONNECT, or the ioctls where the kernel has no netlink.

use std::path::PathBuf;
use std::process::ExitCode;

use userblk::link::nbd::{self, Disconnected};

/// Arguments of `userblk disconnect`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
A server killed with SIGKILL leaves its /dev/nbdN configured: its requests wait (for a reattach,
see `userblk serve --reattach`) and then fail, and the device stays busy until this is run.
Requests still in flight fail with EIO. A device that a running server still serves is refused
(stop that server instead), unless --force. Needs root.")]
pub struct Args {
    /// The NBD device node, e.g. /dev/nbd0.
    #[arg(value_name = "DEVICE")]
    pub device: PathBuf,
    /// Disconnect even a device that a running server still serves (its I/O fails).
    #[arg(long)]
    pub force: bool,
}

/// Runs `userblk disconnect`.
pub fn run(args: Args) -> ExitCode {
    let name = args.device.display();
    let result = if args.force {
        nbd::force_disconnect(&args.device)
    } else {
        nbd::disconnect(&args.device)
    };
    match result {
        Ok(Disconnected::AlreadyFree) => {
            println!("userblk: {name} was not connected: nothing to do");
            ExitCode::SUCCESS
        }
        Ok(Disconnected::Freed) => {
            println!("userblk: {name} disconnected and free");
            ExitCode::SUCCESS
        }
        Ok(Disconnected::StillOpen) => {
            println!(
                "userblk: {name} disconnected (its I/O now fails); it is still open, e.g. by a \
                 mounted file system, and frees once that closes it (umount it)"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("userblk disconnect: {e}");
            ExitCode::FAILURE
        }
    }
}
