//! `userblk serve`: serves a built-in device on a real `/dev/nbdN` until Ctrl+C (SIGINT) or
//! SIGTERM, then unmounts cleanly (flush, DISC) and leaves the device free; or, with `--listen`,
//! to NBD clients over TCP or a Unix socket (with TLS when asked), until the same signals.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use userblk::link::nbd::{MountOptions, Setup};
use userblk::link::net::{ListenAddr, NetOptions, TlsConfig, TlsMode};
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

  userblk serve ram:1G --listen 127.0.0.1:10809          any NBD client: nbdinfo nbd://127.0.0.1
  userblk serve file:disk.img --listen unix:/tmp/nbd.sock --export disk
  userblk serve ram:1G --listen [::1]:10809 --tls-cert server.pem --tls-key key.pem --tls require

On /dev/nbdN: needs root (CAP_SYS_ADMIN) and the nbd module (`modprobe nbd`). Stop with Ctrl+C
or SIGTERM: the device is flushed, disconnected and left free for the next user. With --listen:
no root needed; Ctrl+C stops accepting, lets clients finish what is in flight, then flushes.")]
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

    /// Serve NBD clients over the network instead of /dev/nbdN: unix:PATH, HOST:PORT, or an
    /// IPv6 address in brackets and a port (port 0 picks a free one and prints it).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<ListenAddr>,

    /// With --listen: the export's name (clients asking for the empty name get it too).
    #[arg(long = "export", value_name = "NAME", default_value = "")]
    pub export: String,

    /// With --listen: clients served at once; more are closed on arrival.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub max_clients: usize,

    /// With --listen: seconds a client may take to finish the handshake.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub handshake_timeout: u64,

    /// With --listen: the server's TLS certificate chain (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// With --listen: the server's TLS private key (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// With --listen: require client certificates signed by this CA (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,

    /// With --listen and a certificate: `require` (no export without TLS; the default) or
    /// `allow` (TLS at the client's choice).
    #[arg(long, value_enum, value_name = "MODE", requires = "tls_cert")]
    pub tls: Option<TlsArg>,

    /// The kernel driver: `nbd`, `ublk` (/dev/ublkbN, Linux 6.0+ with ublk_drv), or `auto`:
    /// ublk where /dev/ublk-control exists (after trying `modprobe ublk_drv`), else nbd. A
    /// device given with --nbd means nbd.
    #[arg(long, value_enum, default_value_t = TransportArg::Auto)]
    pub transport: TransportArg,

    /// With ublk: hardware queues, one serving thread each (capped at the CPUs).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub queues: u16,

    /// With ublk: requests each queue may have in flight (1 to 4096).
    #[arg(long, value_name = "N", default_value_t = userblk::link::ublk::DEFAULT_QUEUE_DEPTH,
          value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub queue_depth: u16,

    /// With ublk: the device id (/dev/ublkbN); the kernel picks one when not given.
    #[arg(long, value_name = "N")]
    pub ublk_id: Option<u32>,

    /// With ublk: create the device recoverable, so that if this server dies (kill -9, a crash)
    /// /dev/ublkbN stays, its requests wait, and `--recover N` takes it over.
    #[arg(long)]
    pub recoverable: bool,

    /// With ublk: take over recoverable device N (/dev/ublkbN) whose server died, serving the
    /// same content; the requests in flight are re-issued and a mounted file system stays.
    #[arg(long, value_name = "N", conflicts_with_all = ["ublk_id", "recoverable"])]
    pub recover: Option<u32>,
}

/// Which kernel driver serves the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportArg {
    /// ublk where the kernel has it, else NBD.
    Auto,
    /// The NBD driver, /dev/nbdN.
    Nbd,
    /// The ublk driver, /dev/ublkbN.
    Ublk,
}

/// Whether TLS is required or only offered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsArg {
    /// No export is reachable without TLS.
    Require,
    /// TLS is offered; plain clients are served too.
    Allow,
}

pub(crate) fn flags_text(flags: TransmissionFlags) -> String {
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
    if let Some(addr) = args.listen.clone() {
        return run_listen(args, addr, device);
    }
    if super::serve_ublk::wants_ublk(&args) {
        return super::serve_ublk::run(args, device);
    }
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

/// `userblk serve --listen`: NBD clients over the network.
fn run_listen(args: Args, addr: ListenAddr, device: Box<dyn userblk::BlockDevice>) -> ExitCode {
    let mut options = NetOptions::new()
        .export_name(args.export.clone())
        .description(format!("userblk {}", args.device))
        .read_only(args.read_only)
        .max_clients(args.max_clients)
        .handshake_timeout(Duration::from_secs(args.handshake_timeout))
        .stop_on_signals(true);
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            match TlsConfig::from_pem_files(cert, key, args.tls_ca.as_deref()) {
                Ok(c) => Some(c),
                Err(e) => {
                    eprintln!("userblk serve: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        _ => None,
    };
    let tls_on = tls.is_some();
    if let Some(config) = tls {
        let mode = match args.tls {
            Some(TlsArg::Allow) => TlsMode::Allow,
            Some(TlsArg::Require) | None => TlsMode::Require,
        };
        options = options.tls(config, mode);
    }
    if !addr.is_local() && (!tls_on || args.tls == Some(TlsArg::Allow)) {
        eprintln!(
            "userblk: warning: {addr} is reachable from other machines and TLS is not required: \
             anyone who can connect can read{} this disk",
            if args.read_only { "" } else { " and write" }
        );
    }
    let spec = args.device.clone();
    let served = options.listen(device, &addr, |handle| {
        let name = if args.export.is_empty() {
            "(default)"
        } else {
            &args.export
        };
        let url = match handle.local_addr() {
            ListenAddr::Tcp(a) => format!(
                "{}://{a}/{}",
                if tls_on { "nbds" } else { "nbd" },
                args.export
            ),
            ListenAddr::Unix(p) => format!(
                "{}:///{}?socket={}",
                if tls_on { "nbds+unix" } else { "nbd+unix" },
                args.export,
                p.display()
            ),
        };
        println!(
            "userblk: serving {spec} as export {name} on {} ({url})",
            handle.local_addr()
        );
        println!("userblk: press Ctrl+C to stop");
        handle.clone()
    });
    match served {
        Ok(handle) => {
            let why = handle
                .signal()
                .map_or(String::new(), |s| format!(" on {s}"));
            let st = handle.stats();
            println!(
                "userblk: stopped{why}: {} clients served, {} handshakes failed; device flushed",
                st.served, st.handshake_failures
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("userblk serve: {e}");
            ExitCode::FAILURE
        }
    }
}
