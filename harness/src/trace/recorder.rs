//! [`Recorder`]: a [`BlockDevice`] wrapper that logs every call into a [`Trace`].

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use userblk::{BlockDevice, Capabilities};

use super::{hash64, OpKind, Trace, TraceHeader, TraceOp, MAX_IO, SECTOR, ZERO_PIECE};

/// Wraps a device and records every request it serves, with what each write wrote (each 4 KiB
/// piece stored once, zero pieces not at all) and a checksum of what each read returned.
///
/// Serve it shared (`Arc<Recorder<D>>` is a [`BlockDevice`] too) and take the [`trace`] when
/// done:
///
/// ```
/// use std::sync::Arc;
/// use userblk::{LoopbackKernel, MemDevice};
/// use userblk_harness::trace::Recorder;
///
/// let rec = Arc::new(Recorder::new(MemDevice::new(1 << 20)).initial_zeroes(true));
/// let kernel = LoopbackKernel::start(Arc::clone(&rec))?;
/// kernel.write(4096, &[7; 4096])?;
/// kernel.read(0, 8192)?;
/// kernel.shutdown()?;
/// let trace = rec.trace();
/// assert_eq!(trace.ops.len(), 2);
/// assert_eq!(trace.verify()?.reads_verified, 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// [`trace`]: Recorder::trace
pub struct Recorder<D> {
    device: D,
    clock: AtomicU64,
    log: Mutex<Log>,
    initial_zeroes: bool,
    description: String,
}

#[derive(Default)]
struct Log {
    ops: Vec<TraceOp>,
    pieces: Vec<Box<[u8]>>,
    /// hash64 of a piece -> its references (several only on a hash collision).
    index: HashMap<u64, Vec<u32>>,
}

impl Log {
    fn intern(&mut self, data: &[u8]) -> u32 {
        if data.iter().all(|&b| b == 0) {
            return ZERO_PIECE;
        }
        let h = hash64(data);
        let refs = self.index.entry(h).or_default();
        for &r in refs.iter() {
            if self.pieces[r as usize - 1][..] == *data {
                return r;
            }
        }
        self.pieces.push(data.into());
        let r = self.pieces.len() as u32;
        refs.push(r);
        r
    }
}

impl<D> fmt::Debug for Recorder<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recorder")
            .field("ops", &self.lock().ops.len())
            .field("initial_zeroes", &self.initial_zeroes)
            .field("description", &self.description)
            .finish_non_exhaustive()
    }
}

impl<D> Recorder<D> {
    fn lock(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<D: BlockDevice> Recorder<D> {
    /// Starts recording the requests `device` receives.
    pub fn new(device: D) -> Recorder<D> {
        Recorder {
            device,
            clock: AtomicU64::new(0),
            log: Mutex::new(Log::default()),
            initial_zeroes: false,
            description: String::new(),
        }
    }

    /// Declares that the device reads as zeroes before the first request (a new RAM disk or
    /// sparse file), so that a replay checks reads of never-written ranges too.
    pub fn initial_zeroes(mut self, yes: bool) -> Recorder<D> {
        self.initial_zeroes = yes;
        self
    }

    /// Sets the trace's description (kernel, workload).
    pub fn description(mut self, text: impl Into<String>) -> Recorder<D> {
        self.description = text.into();
        self
    }

    /// The device recorded.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// Requests recorded so far.
    pub fn ops_recorded(&self) -> usize {
        self.lock().ops.len()
    }

    /// The trace so far (requests still in the device are not in it).
    ///
    /// Calls outside the device or not in whole 512-byte sectors, which a server never makes
    /// (only a direct caller can), are left out: a trace holds only requests a kernel can send.
    pub fn trace(&self) -> Trace {
        let log = self.lock();
        let bs = self.device.block_size();
        let size = self.device.blocks().saturating_mul(u64::from(bs));
        let mut ops: Vec<TraceOp> = log
            .ops
            .iter()
            .filter(|op| {
                op.offset % SECTOR == 0
                    && op.len % SECTOR == 0
                    && op.offset.checked_add(op.len).is_some_and(|end| end <= size)
                    && (!matches!(op.kind, OpKind::Read { .. } | OpKind::Write { .. })
                        || op.len <= MAX_IO)
            })
            .cloned()
            .collect();
        ops.sort_by_key(|op| op.start);
        Trace::canonical(
            TraceHeader {
                size,
                block_size: bs,
                flags: self.device.capabilities().transmission_flags(),
                initial_zeroes: self.initial_zeroes,
                trim_zeroes: self.device.capabilities().trim_zeroes,
                description: self.description.clone(),
            },
            &log.pieces,
            ops,
        )
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    /// Calls `f` between two ticks and logs the op; `data` is a write's payload. (Reads are
    /// logged by `read` itself, which needs the buffer back to checksum it.)
    fn record(
        &self,
        kind: OpKind,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
        f: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        let start = self.tick();
        let result = f();
        let end = self.tick();
        let errno = result
            .as_ref()
            .err()
            .map(|e| e.raw_os_error().filter(|&e| e > 0).unwrap_or(5));
        let mut log = self.lock();
        let kind = match kind {
            OpKind::Write { fua, .. } => OpKind::Write {
                fua,
                pieces: match (data, errno) {
                    (Some(data), None) => Trace::pieces(offset, len)
                        .map(|(o, l)| {
                            let at = (o - offset) as usize;
                            log.intern(&data[at..at + l as usize])
                        })
                        .collect(),
                    _ => Vec::new(),
                },
            },
            other => other,
        };
        log.ops.push(TraceOp {
            start,
            end,
            offset,
            len,
            kind,
            errno,
        });
        result
    }
}

impl<D: BlockDevice> BlockDevice for Recorder<D> {
    fn block_size(&self) -> u32 {
        self.device.block_size()
    }

    fn blocks(&self) -> u64 {
        self.device.blocks()
    }

    fn capabilities(&self) -> Capabilities {
        self.device.capabilities()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = buf.len() as u64;
        let start = self.tick();
        let result = self.device.read(offset, buf);
        let end = self.tick();
        let errno = result
            .as_ref()
            .err()
            .map(|e| e.raw_os_error().filter(|&e| e > 0).unwrap_or(5));
        let hash = result.is_ok().then(|| hash64(buf));
        self.lock().ops.push(TraceOp {
            start,
            end,
            offset,
            len,
            kind: OpKind::Read { hash },
            errno,
        });
        result
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let kind = OpKind::Write {
            fua: false,
            pieces: Vec::new(),
        };
        self.record(kind, offset, data.len() as u64, Some(data), || {
            self.device.write(offset, data)
        })
    }

    fn write_fua(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let kind = OpKind::Write {
            fua: true,
            pieces: Vec::new(),
        };
        self.record(kind, offset, data.len() as u64, Some(data), || {
            self.device.write_fua(offset, data)
        })
    }

    fn flush(&self) -> io::Result<()> {
        self.record(OpKind::Flush, 0, 0, None, || self.device.flush())
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.record(OpKind::Trim, offset, len, None, || {
            self.device.trim(offset, len)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.record(OpKind::WriteZeroes { may_trim }, offset, len, None, || {
            self.device.write_zeroes(offset, len, may_trim)
        })
    }

    fn unmount(&self) {
        self.device.unmount()
    }
}
