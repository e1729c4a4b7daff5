//! `userblk serve`: serves a built-in device on a real `/dev/nbdN` until Ctrl+C (SIGINT) or
//! SIGTERM, then unmounts cleanly (flush, DISC) and leaves the device free.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use userblk::link::nbd::{MountOptions, Setup};
use userblk::proto::TransmissionFlags;

use crate::spec::{human, DeviceSpec};

/// How the NBD driver is configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SetupArg {
    /// Generic netlink, or ioctls when the kernel has no netlink interface for NBD.
    Auto,
    /// Generic netlink only.
    Netlink,
    /// The classic ioctls (NBD_DO_IT on a thread of its own).
    Ioctl,
}

impl From<SetupArg> for Setup {
    fn from(s: SetupArg) -> Setup {
        match s {
            SetupArg::Auto => Setup::Auto,
            SetupArg::Netlink => Setup::Netlink,
            SetupArg::Ioctl => Setup::Ioctl,
        }
    }
}

/// Arguments of `userblk serve`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  userblk serve ram:512M                    a 512 MiB RAM disk on the first free /dev/nbdN
  userblk serve file:disk.img --nbd /dev/nbd1
  userblk serve pattern:1G --read-only --connections 4

Needs root (CAP_SYS_ADMIN) and the nbd module (`modprobe nbd`). Stop with Ctrl+C or SIGTERM:
the device is flushed, disconnected and left free for the next user.")]
pub struct Args {
    /// The device to serve: ram:SIZE (a RAM disk), file:PATH (a file or block device) or
    /// pattern:SIZE (read-only, reads 0xdeadbeef). Sizes take K, M, G, T suffixes.
    #[arg(value_name = "DEVICE")]
    pub device: DeviceSpec,

    /// The NBD device node to serve on, or `auto` for the first free one.
    #[arg(long = "nbd", value_name = "PATH", default_value = "auto")]
    pub nbd: PathBuf,

    /// Export read-only: the kernel refuses writes (files are opened read-only too).
    #[arg(long)]
    pub read_only: bool,

    /// Connections (sockets) between the kernel and the server; more than one lets the kernel
    /// use several queues.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub connections: u16,

    /// Seconds before an unanswered request fails with EIO; 0 waits forever.
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    pub timeout: u64,

    /// Logical block size the kernel sees: a power of two from 512 to the page size.
    #[arg(long, value_name = "BYTES")]
    pub block_size: Option<u32>,

    /// How to configure the driver.
    #[arg(long, value_enum, default_value_t = SetupArg::Auto)]
    pub setup: SetupArg,

    /// Lock the server's memory (mlockall), for a device that backs swap.
    #[arg(long)]
    pub mlock: bool,
}

fn flags_text(flags: TransmissionFlags) -> String {
    let names = [
        (TransmissionFlags::READ_ONLY, "read-only"),
        (TransmissionFlags::SEND_FLUSH, "flush"),
        (TransmissionFlags::SEND_FUA, "fua"),
        (TransmissionFlags::SEND_TRIM, "trim"),
        (TransmissionFlags::SEND_WRITE_ZEROES, "write-zeroes"),
        (TransmissionFlags::ROTATIONAL, "rotational"),
        (TransmissionFlags::CAN_MULTI_CONN, "multi-conn"),
    ];
    let on: Vec<&str> = names
        .iter()
        .filter(|(f, _)| flags.contains(*f))
        .map(|(_, n)| *n)
        .collect();
    if on.is_empty() {
        "none".into()
    } else {
        on.join(", ")
    }
}

/// Runs `userblk serve`.
pub fn run(args: Args) -> ExitCode {
    let device = match args.device.open(args.read_only) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("userblk serve: cannot open {}: {e}", args.device);
            return ExitCode::FAILURE;
        }
    };
    let mut options = MountOptions::new()
        .device(&args.nbd)
        .setup(args.setup.into())
        .connections(usize::from(args.connections))
        .timeout(Duration::from_secs(args.timeout))
        .read_only(args.read_only)
        .mlock(args.mlock)
        .unmount_on_signals(true);
    if let Some(bs) = args.block_size {
        options = options.block_size(bs);
    }
    let spec = args.device.clone();
    let served = options.mount(device, |handle| {
        let export = handle.export();
        let (size, bs, flags) = export.map_or((0, 0, TransmissionFlags(0)), |e| {
            (e.size, e.block_size, e.flags)
        });
        println!(
            "userblk: serving {spec} on {} ({} bytes = {}, {bs}-byte blocks; {}; set up by {}, {} connection{})",
            handle.device().display(),
            size,
            human(size),
            flags_text(flags),
            handle.setup().map_or("?", Setup::name),
            args.connections,
            if args.connections == 1 { "" } else { "s" },
        );
        if !handle.io_flusher() {
            eprintln!(
                "userblk: warning: PR_SET_IO_FLUSHER not permitted (needs CAP_SYS_RESOURCE, Linux 5.6+): \
                 heavy writeback to the device could deadlock under memory pressure"
            );
        }
        println!("userblk: press Ctrl+C to stop");
        handle.clone()
    });
    match served {
        Ok(handle) => {
            let why = handle
                .signal()
                .map_or(String::new(), |s| format!(" on {s}"));
            println!(
                "userblk: stopped{why}: {} flushed, disconnected and free",
                handle.device().display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("userblk serve: {e}");
            ExitCode::FAILURE
        }
    }
}
