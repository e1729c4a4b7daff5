//! A read-only device whose every 32-bit word reads 0xdeadbeef, served on a real NBD device
//! until Ctrl+C (the example of the seed crate vblk, on userblk).
//!
//! ```text
//! sudo modprobe nbd
//! sudo cargo run --example deadbeef            # on /dev/nbd0
//! sudo cargo run --example deadbeef /dev/nbd3
//! sudo hexdump -C /dev/nbd0 | head             # in another terminal
//! ```

use std::io;
use std::process::ExitCode;

use userblk::link::nbd::MountOptions;
use userblk::{BlockDevice, Capabilities};

const PATTERN: [u8; 4] = [0xde, 0xad, 0xbe, 0xef];

/// 1 MiB of 0xdeadbeef in 1 KiB blocks.
struct DeadBeef;

impl BlockDevice for DeadBeef {
    fn block_size(&self) -> u32 {
        1024
    }

    fn blocks(&self) -> u64 {
        1024
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: true,
            flush: false,
            ..Capabilities::default()
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = PATTERN[(offset as usize + i) % 4];
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    let nbd = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/dev/nbd0".into());
    let served = MountOptions::new()
        .device(&nbd)
        .unmount_on_signals(true)
        .mount(DeadBeef, |handle| {
            println!(
                "0xdeadbeef on {} (read-only); Ctrl+C to stop",
                handle.device().display()
            );
        });
    match served {
        Ok(()) => {
            println!("unmounted; {nbd} is free");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("deadbeef: {e}");
            ExitCode::FAILURE
        }
    }
}
