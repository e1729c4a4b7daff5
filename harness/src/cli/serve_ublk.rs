//! `userblk serve --transport ublk` (and `auto` where the kernel has ublk): serves a built-in
//! device as `/dev/ublkbN` until Ctrl+C (SIGINT) or SIGTERM, then stops and deletes it.

use std::path::Path;
use std::process::ExitCode;

use userblk::link::ublk::{self, UblkOptions};

use super::serve::{flags_text, Args, TransportArg};
use crate::spec::human;

/// Whether these arguments ask for ublk: `--transport ublk`, `--recoverable` or `--recover`,
/// or `auto` without an NBD device named and with `/dev/ublk-control` present (after trying
/// `modprobe ublk_drv`).
pub fn wants_ublk(args: &Args) -> bool {
    if args.recover.is_some() || args.recoverable {
        return true;
    }
    match args.transport {
        TransportArg::Ublk => true,
        TransportArg::Nbd => false,
        TransportArg::Auto => args.nbd == Path::new("auto") && ublk::available(true),
    }
}

/// Serves `device` through ublk as `args` say.
pub fn run(args: Args, device: Box<dyn userblk::BlockDevice>) -> ExitCode {
    let mut options = UblkOptions::new()
        .id(args.ublk_id)
        .queues(args.queues)
        .queue_depth(args.queue_depth)
        .read_only(args.read_only)
        .recoverable(args.recoverable)
        .unmount_on_signals(true);
    if let Some(id) = args.recover {
        options = options.recover(id);
    }
    if let Some(bs) = args.block_size {
        options = options.block_size(bs);
    }
    let spec = args.device.clone();
    let served = options.mount(device, |handle| {
        let (size, bs, flags) = handle
            .export()
            .map_or((0, 0, Default::default()), |e| (e.size, e.block_size, e.flags));
        let (queues, depth) = handle.queues();
        println!(
            "userblk: serving {spec} on {} ({size} bytes = {}, {bs}-byte blocks; {}; ublk, {queues} queue{} of depth {depth}{})",
            handle.device().display(),
            human(size),
            flags_text(flags),
            if queues == 1 { "" } else { "s" },
            match (args.recover, args.recoverable) {
                (Some(_), _) => ", recovered",
                (None, true) => ", recoverable",
                _ => "",
            },
        );
        println!("userblk: press Ctrl+C to stop");
        handle.clone()
    });
    match served {
        Ok(handle) => {
            let why = handle
                .signal()
                .map_or(String::new(), |s| format!(" on {s}"));
            println!(
                "userblk: stopped{why}: {} removed",
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        Cli::try_parse_from(std::iter::once("serve").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn transport_choice() {
        assert!(wants_ublk(
            &parse(&["ram:1M", "--transport", "ublk"]).unwrap()
        ));
        assert!(!wants_ublk(
            &parse(&["ram:1M", "--transport", "nbd"]).unwrap()
        ));
        // A device named with --nbd means NBD, without looking for ublk.
        assert!(!wants_ublk(
            &parse(&["ram:1M", "--nbd", "/dev/nbd1"]).unwrap()
        ));
        // Recovery is ublk's alone.
        assert!(wants_ublk(&parse(&["ram:1M", "--recover", "3"]).unwrap()));
        assert!(wants_ublk(
            &parse(&["ram:1M", "--recoverable", "--transport", "nbd"]).unwrap()
        ));
        let a = parse(&[
            "ram:1M",
            "--transport",
            "ublk",
            "--queues",
            "2",
            "--queue-depth",
            "128",
            "--ublk-id",
            "5",
        ])
        .unwrap();
        assert_eq!((a.queues, a.queue_depth, a.ublk_id), (2, 128, Some(5)));
        assert_eq!(parse(&["ram:1M"]).unwrap().queue_depth, 64);
        for bad in [
            &["ram:1M", "--queue-depth", "0"][..],
            &["ram:1M", "--queue-depth", "5000"],
            &["ram:1M", "--recover", "1", "--ublk-id", "2"],
            &["ram:1M", "--transport", "scsi"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
