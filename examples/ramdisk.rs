//! A RAM disk written the simple way, as a [`BlockDeviceMut`] (`&mut self`, one request at a
//! time), served through a `Mutex` on a real NBD device until Ctrl+C.
//!
//! ```text
//! sudo modprobe nbd
//! sudo cargo run --example ramdisk             # 64 MiB on /dev/nbd0
//! sudo cargo run --example ramdisk /dev/nbd2
//! sudo mkfs.ext4 /dev/nbd0 && sudo mount /dev/nbd0 /mnt   # in another terminal
//! ```

use std::io;
use std::process::ExitCode;
use std::sync::Mutex;

use userblk::link::nbd::MountOptions;
use userblk::{BlockDeviceMut, Capabilities};

/// A RAM disk: a plain vector of bytes.
struct RamDisk {
    data: Vec<u8>,
}

impl RamDisk {
    fn new(size: usize) -> RamDisk {
        RamDisk {
            data: vec![0; size],
        }
    }

    /// The bytes of a request; the server only passes ranges inside the device.
    fn range(&mut self, offset: u64, len: usize) -> &mut [u8] {
        let start = offset as usize;
        &mut self.data[start..start + len]
    }
}

impl BlockDeviceMut for RamDisk {
    fn blocks(&self) -> u64 {
        self.data.len() as u64 / 512
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            // Nothing is cached: a write is as durable as a RAM disk gets when it returns.
            flush: false,
            trim: true,
            trim_zeroes: true,
            write_zeroes: true,
            ..Capabilities::default()
        }
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.copy_from_slice(self.range(offset, buf.len()));
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.range(offset, data.len()).copy_from_slice(data);
        Ok(())
    }

    fn trim(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.range(offset, len as usize).fill(0);
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _may_trim: bool) -> io::Result<()> {
        self.range(offset, len as usize).fill(0);
        Ok(())
    }

    fn unmount(&mut self) {
        println!("ramdisk: unmounted by the kernel");
    }
}

fn main() -> ExitCode {
    let nbd = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/dev/nbd0".into());
    let disk = Mutex::new(RamDisk::new(64 << 20));
    let served = MountOptions::new()
        .device(&nbd)
        .unmount_on_signals(true)
        .mount(disk, |handle| {
            println!(
                "64 MiB RAM disk on {}; Ctrl+C to stop",
                handle.device().display()
            );
        });
    match served {
        Ok(()) => {
            println!("{nbd} is free");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ramdisk: {e}");
            ExitCode::FAILURE
        }
    }
}
