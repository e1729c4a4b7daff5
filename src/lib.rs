//! userblk: block devices implemented in user space, served to Linux through the kernel's NBD
//! driver, and tested without root through a fake kernel that speaks NBD as the real one does.
//!
//! - [`BlockDevice`] (or [`BlockDeviceMut`]) is what you implement.
//! - [`Server`] serves it over a [`KernelLink`]: the real `/dev/nbdX`, or [`LoopbackKernel`].
//! - [`proto`] is the wire format; [`devices`] has ready-made devices.
//!
//! ```
//! use std::io;
//! use userblk::{BlockDevice, LoopbackKernel};
//!
//! /// Every byte reads as 0x2a; writes are refused (EPERM) by the default `write`.
//! struct Answer;
//!
//! impl BlockDevice for Answer {
//!     fn blocks(&self) -> u64 { 2048 }
//!     fn read(&self, _offset: u64, buf: &mut [u8]) -> io::Result<()> {
//!         buf.fill(42);
//!         Ok(())
//!     }
//! }
//!
//! let kernel = LoopbackKernel::start(Answer)?;
//! assert_eq!(kernel.read(4096, 512)?, vec![42; 512]);
//! assert_eq!(kernel.write(0, &[0; 512]).unwrap_err().errno(), Some(1)); // EPERM
//! kernel.shutdown()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod async_device;
pub mod device;
pub mod devices;
pub mod link;
pub mod proto;
pub mod server;
mod stream;

pub use async_device::{AsyncBlockDevice, AsyncDevice, IoBuf};
pub use device::{BlockDevice, BlockDeviceMut, Capabilities, Exclusive, Extent};
pub use devices::{FileDevice, MemDevice, PatternDevice};
pub use link::loopback::{LoopbackError, LoopbackKernel, LoopbackOptions};
pub use link::{Export, KernelLink, LinkError, Started};
pub use server::{Server, ServerError, ServerOptions, Step};
