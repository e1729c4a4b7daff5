//! A device with a media error: a 16 MiB RAM disk whose 4 KiB at 1 MiB fail every read with EIO,
//! as a disk with a bad sector does. Shows how a driver reports an error for one request while the
//! connection goes on serving the rest (vm/run.sh checks that `dd` gets EIO and the device keeps
//! working).
//!
//! ```text
//! sudo modprobe nbd
//! sudo cargo run --example badsector [/dev/nbd0]
//! sudo dd if=/dev/nbd0 of=/dev/null bs=4k skip=256 count=1 iflag=direct   # Input/output error
//! ```
//!
//! With `ublk` as the argument it serves through the ublk driver instead (`modprobe ublk_drv`)
//! and prints the `/dev/ublkbN` it got: the same device, the same error, another transport.

use std::io;
use std::process::ExitCode;

use userblk::link::nbd::MountOptions;
use userblk::link::ublk::UblkOptions;
use userblk::{BlockDevice, Capabilities, MemDevice};

/// Where the bad sector is.
const BAD: std::ops::Range<u64> = (1 << 20)..(1 << 20) + 4096;

struct BadSector(MemDevice);

impl BlockDevice for BadSector {
    fn blocks(&self) -> u64 {
        self.0.blocks()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            flush: false,
            ..Capabilities::default()
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        if offset < BAD.end && BAD.start < end {
            // EIO goes on the wire; the kernel fails this request only.
            return Err(io::Error::from_raw_os_error(5));
        }
        self.0.read(offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write(offset, data)
    }
}

fn main() -> ExitCode {
    let nbd = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/dev/nbd0".into());
    if nbd == "ublk" {
        let served = UblkOptions::new().unmount_on_signals(true).mount(
            BadSector(MemDevice::new(16 << 20)),
            |handle| {
                println!(
                    "16 MiB with a bad sector at 1 MiB on {}; Ctrl+C to stop",
                    handle.device().display()
                );
            },
        );
        return match served {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("badsector: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let served = MountOptions::new()
        .device(&nbd)
        .unmount_on_signals(true)
        .mount(BadSector(MemDevice::new(16 << 20)), |handle| {
            println!(
                "16 MiB with a bad sector at 1 MiB on {}; Ctrl+C to stop",
                handle.device().display()
            );
        });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("badsector: {e}");
            ExitCode::FAILURE
        }
    }
}
