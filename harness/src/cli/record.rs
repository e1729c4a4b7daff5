//! `userblk record`: serve a built-in device on a real `/dev/nbdN` through a
//! [`crate::trace::Recorder`], until SIGINT or SIGTERM, then write the trace file.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use userblk::link::nbd::MountOptions;

use crate::spec::DeviceSpec;
use crate::trace::Recorder;

/// Arguments of `userblk record`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The device to serve: ram:SIZE (reads as zeroes at first) or file:PATH.
    pub device: DeviceSpec,
    /// Where to write the trace (format: harness/traces/README.md).
    #[arg(short, long)]
    pub output: PathBuf,
    /// The NBD device node to serve on, or `auto` for a free one.
    #[arg(long, default_value = "/dev/nbd0")]
    pub nbd: PathBuf,
    /// Free text stored in the trace: kernel, workload.
    #[arg(long, default_value = "")]
    pub description: String,
    /// Connections (sockets) the kernel uses.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Once the device is served, write its path to this file (for scripts to wait on).
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

/// Runs `userblk record`.
pub fn run(args: Args) -> ExitCode {
    let device = match args.device.open(false) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("userblk record: opening {}: {e}", args.device);
            return ExitCode::FAILURE;
        }
    };
    let initial_zeroes = matches!(args.device, DeviceSpec::Ram { .. });
    let description = if args.description.is_empty() {
        format!("{}, recorded by userblk record", args.device)
    } else {
        args.description.clone()
    };
    let rec = Arc::new(
        Recorder::new(device)
            .initial_zeroes(initial_zeroes)
            .description(description),
    );
    let options = MountOptions::new()
        .device(&args.nbd)
        .connections(args.connections)
        .unmount_on_signals(true);
    let served = options.mount(Arc::clone(&rec), |handle| {
        let path = handle.device();
        eprintln!(
            "userblk record: recording {} on {}; SIGINT or SIGTERM stops and writes {}",
            args.device,
            path.display(),
            args.output.display()
        );
        if let Some(ready) = &args.ready_file {
            if let Err(e) = std::fs::write(ready, format!("{}\n", path.display())) {
                eprintln!("userblk record: writing {}: {e}", ready.display());
            }
        }
    });
    let mut ok = true;
    if let Err(e) = &served {
        eprintln!("userblk record: serving: {e}");
        ok = false;
    }
    let trace = rec.trace();
    if trace.ops.is_empty() && !ok {
        return ExitCode::FAILURE;
    }
    let bytes = trace.encode();
    if let Err(e) = std::fs::write(&args.output, &bytes) {
        eprintln!("userblk record: writing {}: {e}", args.output.display());
        return ExitCode::FAILURE;
    }
    eprintln!(
        "userblk record: wrote {} ({} bytes): {}",
        args.output.display(),
        bytes.len(),
        trace.summary()
    );
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
