//! [`Target`]: something block operations run against, the same way whoever is on the other end.
//! [`Rig`] attaches a device and hands back a target: [`LoopbackRig`] through the fake kernel in
//! `cargo test`; the real-kernel rig through `/dev/nbdN` in the VM. Conformance cases, scripts'
//! block steps and trace replays are written against these two traits only, so one case list
//! runs in both places.

use std::fmt;

use userblk::link::loopback::Op;
use userblk::proto::TransmissionFlags;
use userblk::server::unfilled_ranges;
use userblk::{BlockDevice, LoopbackError, LoopbackKernel, LoopbackOptions};

/// A failed block operation as the caller saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpError {
    /// The errno seen, if any (through the real kernel, device errors arrive as EIO).
    pub errno: Option<i32>,
    /// What happened, for reports.
    pub message: String,
}

impl fmt::Display for OpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.errno {
            Some(e) => write!(f, "errno {e}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for OpError {}

impl From<LoopbackError> for OpError {
    fn from(e: LoopbackError) -> OpError {
        OpError {
            errno: e.errno(),
            message: e.to_string(),
        }
    }
}

/// Block operations on a served device; several threads may drive one at once.
pub trait Target: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Logical block size.
    fn block_size(&self) -> u32;
    /// The smallest alignment the server enforces: requests misaligned to it must be refused.
    /// The block size unless the server advertises a smaller minimum (an NBD server may accept
    /// any byte offset, minimum 1).
    fn min_block_size(&self) -> u32 {
        self.block_size()
    }
    /// The longest request the server must serve: longer ones must be refused. 32 MiB unless
    /// the server advertises otherwise (one that advertises no maximum may serve any length).
    fn max_request(&self) -> u32 {
        userblk::proto::MAX_IO_LEN
    }
    /// The transmission flags the server advertised.
    fn flags(&self) -> TransmissionFlags;
    /// Whether device errors arrive with their own errno (loopback) or as EIO (real kernel).
    fn sees_device_errno(&self) -> bool;
    /// Reads `len` bytes at `offset`.
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, OpError>;
    /// Writes `data` at `offset`.
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), OpError>;
    /// Writes with FUA.
    fn write_fua(&self, offset: u64, data: &[u8]) -> Result<(), OpError>;
    /// Flushes.
    fn flush(&self) -> Result<(), OpError>;
    /// Discards a range.
    fn trim(&self, offset: u64, len: u64) -> Result<(), OpError>;
    /// Zeroes a range (`no_hole`: keep it allocated).
    fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> Result<(), OpError>;
    /// A way to send requests straight to the server, past the block layer's checks, for the
    /// conformance suite's server checks. `None` (the default) through a real kernel, which
    /// refuses such requests itself.
    fn raw(&self) -> Option<&dyn RawRequests> {
        None
    }
}

/// Sends NBD requests exactly as given: no bounds, alignment or read-only checks, no splitting.
pub trait RawRequests {
    /// Sends one request and waits for its reply: a READ's data (empty for other commands), or
    /// the error the server replied with (`errno` set to the reply's value).
    fn request(&self, op: Op<'_>) -> Result<Vec<u8>, OpError>;
}

/// A target whose device is being served; [`detach`](Attached::detach) disconnects and reports
/// how serving ended.
pub trait Attached: Target {
    /// Disconnects (DISC), waits for the server to stop, and returns its result.
    fn detach(self: Box<Self>) -> Result<(), OpError>;
}

/// Serves devices and hands back targets.
pub trait Rig: Send + Sync {
    /// A short name for reports, e.g. `loopback` or `/dev/nbd0`.
    fn name(&self) -> String;
    /// Serves `device` and returns the target driving it.
    fn attach(&self, device: Box<dyn BlockDevice>) -> Result<Box<dyn Attached>, OpError>;
    /// Whether the target serves the device given to [`attach`](Rig::attach). `false` for a
    /// rig that connects to a server with a disk of its own (an external NBD server): cases
    /// that inspect the device they made then skip.
    fn serves_given_device(&self) -> bool {
        true
    }
}

/// Attaches devices to a [`LoopbackKernel`].
///
/// The harness always has the server poison READ buffers
/// ([`ServerOptions::poison_reads`](userblk::ServerOptions::poison_reads)), whatever `options`
/// say: a read the device did not fill then fails as an "unfilled read" naming the bytes,
/// where the served default (zeroes) would hide it.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoopbackRig {
    /// The fake kernel's options.
    pub options: LoopbackOptions,
}

impl LoopbackRig {
    /// The options the rig's kernels run with: `options` with READ buffers poisoned.
    pub fn kernel_options(&self) -> LoopbackOptions {
        poisoned(self.options)
    }
}

/// `options` with the server poisoning READ buffers, as the harness runs every fake kernel.
pub fn poisoned(mut options: LoopbackOptions) -> LoopbackOptions {
    options.server.poison_reads = true;
    options
}

impl Rig for LoopbackRig {
    fn name(&self) -> String {
        "loopback".into()
    }

    fn attach(&self, device: Box<dyn BlockDevice>) -> Result<Box<dyn Attached>, OpError> {
        Ok(Box::new(LoopbackKernel::with_options(
            device,
            self.kernel_options(),
        )?))
    }
}

/// Fails a read whose data holds the server's poison marker: bytes the device never wrote.
fn check_filled(offset: u64, data: Vec<u8>) -> Result<Vec<u8>, OpError> {
    let unfilled = unfilled_ranges(&data);
    let Some(first) = unfilled.first() else {
        return Ok(data);
    };
    let spans: Vec<String> = unfilled
        .iter()
        .take(4)
        .map(|r| format!("{}..{}", offset + r.start as u64, offset + r.end as u64))
        .collect();
    let bytes: usize = unfilled.iter().map(|r| r.len()).sum();
    Err(OpError {
        errno: None,
        message: format!(
            "unfilled read: the device did not write {bytes} of the {} bytes of the READ at \
             offset {offset} (device bytes {}{}); served, the buffer's old contents would have \
             gone to the kernel (first unfilled byte: +{})",
            data.len(),
            spans.join(", "),
            if unfilled.len() > 4 { ", ..." } else { "" },
            first.start
        ),
    })
}

impl Target for LoopbackKernel {
    fn size(&self) -> u64 {
        self.export().size
    }
    fn block_size(&self) -> u32 {
        self.export().block_size
    }
    fn flags(&self) -> TransmissionFlags {
        self.export().flags
    }
    fn sees_device_errno(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, OpError> {
        let data = LoopbackKernel::read(self, offset, len)?;
        if self.options().server.poison_reads {
            check_filled(offset, data)
        } else {
            Ok(data)
        }
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), OpError> {
        Ok(LoopbackKernel::write(self, offset, data)?)
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> Result<(), OpError> {
        Ok(LoopbackKernel::write_fua(self, offset, data)?)
    }
    fn flush(&self) -> Result<(), OpError> {
        Ok(LoopbackKernel::flush(self)?)
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), OpError> {
        Ok(LoopbackKernel::trim(self, offset, len)?)
    }
    fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> Result<(), OpError> {
        Ok(LoopbackKernel::write_zeroes(self, offset, len, no_hole)?)
    }
    fn raw(&self) -> Option<&dyn RawRequests> {
        Some(self)
    }
}

impl RawRequests for LoopbackKernel {
    fn request(&self, op: Op<'_>) -> Result<Vec<u8>, OpError> {
        let ticket = self.submit(op)?;
        Ok(self.wait(ticket)?)
    }
}

impl Attached for LoopbackKernel {
    fn detach(self: Box<Self>) -> Result<(), OpError> {
        Ok(self.shutdown()?)
    }
}
