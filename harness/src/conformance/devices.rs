//! Wrapper devices the suite puts around the device under test, public because a driver's own
//! tests want them too: [`Counting`] logs every call, [`FailingRange`] makes calls fail,
//! [`ReadOnly`] advertises a device read-only.

use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

use userblk::{BlockDevice, Capabilities};

/// A device method, as logged by [`Counting`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CallKind {
    /// [`BlockDevice::read`].
    Read,
    /// [`BlockDevice::write`].
    Write,
    /// [`BlockDevice::write_fua`].
    WriteFua,
    /// [`BlockDevice::flush`].
    Flush,
    /// [`BlockDevice::trim`].
    Trim,
    /// [`BlockDevice::write_zeroes`].
    WriteZeroes,
    /// [`BlockDevice::unmount`].
    Unmount,
}

/// One call a device received, logged when it returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Call {
    /// Which method.
    pub kind: CallKind,
    /// Its offset (0 for flush and unmount).
    pub offset: u64,
    /// Its length.
    pub len: u64,
    /// Whether it succeeded.
    pub ok: bool,
    /// Whether it came after `unmount` (which it never should).
    pub after_unmount: bool,
}

/// The log a [`Counting`] device keeps; clone it before handing the device over.
#[derive(Clone, Debug, Default)]
pub struct CallLog {
    calls: Arc<Mutex<Vec<Call>>>,
}

impl CallLog {
    /// Every call so far, in the order they returned.
    pub fn calls(&self) -> Vec<Call> {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many calls of this kind so far.
    pub fn count(&self, kind: CallKind) -> usize {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|c| c.kind == kind)
            .count()
    }

    fn push(&self, kind: CallKind, offset: u64, len: u64, ok: bool) {
        let mut calls = self.calls.lock().unwrap_or_else(PoisonError::into_inner);
        let after_unmount = calls.iter().any(|c| c.kind == CallKind::Unmount);
        calls.push(Call {
            kind,
            offset,
            len,
            ok,
            after_unmount,
        });
    }
}

/// Wraps a device and logs every call it receives (see [`CallLog`]).
///
/// ```
/// use userblk::{LoopbackKernel, MemDevice};
/// use userblk_harness::conformance::{CallKind, Counting};
///
/// let dev = Counting::new(MemDevice::new(1 << 20));
/// let log = dev.log();
/// let kernel = LoopbackKernel::start(dev)?;
/// kernel.write(0, &[1; 512])?;
/// kernel.shutdown()?;
/// assert_eq!((log.count(CallKind::Write), log.count(CallKind::Unmount)), (1, 1));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Counting<D> {
    inner: D,
    log: CallLog,
}

impl<D> Counting<D> {
    /// Wraps `inner` with a fresh log.
    pub fn new(inner: D) -> Counting<D> {
        Counting {
            inner,
            log: CallLog::default(),
        }
    }

    /// A handle on the log, which stays valid after the device is gone.
    pub fn log(&self) -> CallLog {
        self.log.clone()
    }
}

impl<D: BlockDevice> BlockDevice for Counting<D> {
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn blocks(&self) -> u64 {
        self.inner.blocks()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let r = self.inner.read(offset, buf);
        self.log
            .push(CallKind::Read, offset, buf.len() as u64, r.is_ok());
        r
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let r = self.inner.write(offset, data);
        self.log
            .push(CallKind::Write, offset, data.len() as u64, r.is_ok());
        r
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let r = self.inner.write_fua(offset, data);
        self.log
            .push(CallKind::WriteFua, offset, data.len() as u64, r.is_ok());
        r
    }
    fn flush(&self) -> io::Result<()> {
        let r = self.inner.flush();
        self.log.push(CallKind::Flush, 0, 0, r.is_ok());
        r
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        let r = self.inner.trim(offset, len);
        self.log.push(CallKind::Trim, offset, len, r.is_ok());
        r
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        let r = self.inner.write_zeroes(offset, len, may_trim);
        self.log.push(CallKind::WriteZeroes, offset, len, r.is_ok());
        r
    }
    fn unmount(&self) {
        self.inner.unmount();
        self.log.push(CallKind::Unmount, 0, 0, true);
    }
}

/// How a [`FailingRange`] fails its calls.
#[derive(Clone, Debug)]
pub enum Fault {
    /// With this raw OS errno.
    Errno(i32),
    /// With an `io::Error` that has no OS errno (the server must send EIO).
    NoErrno,
}

/// Wraps a device so that reads and writes (or trims, zeroes) touching `range` fail, and
/// everything else passes through.
#[derive(Debug)]
pub struct FailingRange<D> {
    inner: D,
    range: Range<u64>,
    reads: Option<Fault>,
    writes: Option<Fault>,
}

impl<D> FailingRange<D> {
    /// Calls touching `range` fail: reads with `reads`, writes, trims and zeroes with `writes`
    /// (`None`: pass through).
    pub fn new(
        inner: D,
        range: Range<u64>,
        reads: Option<Fault>,
        writes: Option<Fault>,
    ) -> FailingRange<D> {
        FailingRange {
            inner,
            range,
            reads,
            writes,
        }
    }

    fn check(&self, how: &Option<Fault>, offset: u64, len: u64) -> io::Result<()> {
        let touches = offset < self.range.end && offset.saturating_add(len) > self.range.start;
        match how {
            Some(f) if touches => Err(match f {
                Fault::Errno(e) => io::Error::from_raw_os_error(*e),
                Fault::NoErrno => io::Error::other("injected failure without an errno"),
            }),
            _ => Ok(()),
        }
    }
}

impl<D: BlockDevice> BlockDevice for FailingRange<D> {
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn blocks(&self) -> u64 {
        self.inner.blocks()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(&self.reads, offset, buf.len() as u64)?;
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check(&self.writes, offset, data.len() as u64)?;
        self.inner.write(offset, data)
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check(&self.writes, offset, data.len() as u64)?;
        self.inner.write_fua(offset, data)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(&self.writes, offset, len)?;
        self.inner.trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.check(&self.writes, offset, len)?;
        self.inner.write_zeroes(offset, len, may_trim)
    }
    fn unmount(&self) {
        self.inner.unmount()
    }
}

/// Wraps a device and advertises it read-only; it forwards everything, so a write that got
/// through anyway would show in the device.
#[derive(Debug)]
pub struct ReadOnly<D>(pub D);

impl<D: BlockDevice> BlockDevice for ReadOnly<D> {
    fn block_size(&self) -> u32 {
        self.0.block_size()
    }
    fn blocks(&self) -> u64 {
        self.0.blocks()
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: true,
            ..self.0.capabilities()
        }
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write(offset, data)
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write_fua(offset, data)
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush()
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.0.write_zeroes(offset, len, may_trim)
    }
    fn unmount(&self) {
        self.0.unmount()
    }
}
