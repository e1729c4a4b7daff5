//! [`MeasuredRig`]: a loopback rig that adds the request latency of every fake kernel it
//! starts to one [`LatencyReport`], so `userblk check` can print one table for a whole run
//! of cases, each of which serves its own device.

use std::sync::{Arc, Mutex, PoisonError};

use userblk::link::loopback::LatencyReport;
use userblk::proto::TransmissionFlags;
use userblk::{BlockDevice, LoopbackKernel};

use crate::target::{Attached, LoopbackRig, OpError, RawRequests, Rig, Target};
use crate::trace::{after_detach, replay_kernel, ReplayError, ReplayOptions, ReplayReport, Trace};

/// A [`LoopbackRig`] that keeps the latency of everything it served.
#[derive(Debug, Default)]
pub struct MeasuredRig {
    /// The rig doing the work.
    pub rig: LoopbackRig,
    latency: Arc<Mutex<LatencyReport>>,
}

impl MeasuredRig {
    /// Measures through `rig`.
    pub fn new(rig: LoopbackRig) -> MeasuredRig {
        MeasuredRig {
            rig,
            latency: Arc::default(),
        }
    }

    /// The latency of every request answered so far, through every kernel this rig started
    /// (a kernel's requests count once it is detached).
    pub fn latency(&self) -> LatencyReport {
        self.latency
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl MeasuredRig {
    /// Replays `trace` on `device` with its recorded request sizes and overlap
    /// ([`crate::trace::replay_kernel`]), counting its latency.
    pub fn replay(
        &self,
        device: Box<dyn BlockDevice>,
        trace: &Trace,
    ) -> Result<ReplayReport, ReplayError> {
        let options = ReplayOptions {
            trim_zeroes: device.capabilities().trim_zeroes,
        };
        let kernel =
            LoopbackKernel::with_options(device, self.rig.kernel_options()).map_err(|e| {
                ReplayError::Rig {
                    what: "attaching",
                    source: e.into(),
                }
            })?;
        let measured = Measured {
            kernel,
            sink: Arc::clone(&self.latency),
        };
        let result = replay_kernel(trace, &measured.kernel, &options);
        after_detach(result, Box::new(measured).detach())
    }
}

impl Rig for MeasuredRig {
    fn name(&self) -> String {
        self.rig.name()
    }

    fn attach(&self, device: Box<dyn BlockDevice>) -> Result<Box<dyn Attached>, OpError> {
        let kernel = LoopbackKernel::with_options(device, self.rig.kernel_options())?;
        Ok(Box::new(Measured {
            kernel,
            sink: Arc::clone(&self.latency),
        }))
    }
}

/// A kernel whose latency goes to the rig's report when it is detached (or dropped).
struct Measured {
    kernel: LoopbackKernel,
    sink: Arc<Mutex<LatencyReport>>,
}

impl Measured {
    fn record(&self) {
        self.sink
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .merge(&self.kernel.latency());
    }
}

impl Target for Measured {
    fn size(&self) -> u64 {
        Target::size(&self.kernel)
    }
    fn block_size(&self) -> u32 {
        Target::block_size(&self.kernel)
    }
    fn flags(&self) -> TransmissionFlags {
        Target::flags(&self.kernel)
    }
    fn sees_device_errno(&self) -> bool {
        Target::sees_device_errno(&self.kernel)
    }
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, OpError> {
        Target::read(&self.kernel, offset, len)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), OpError> {
        Target::write(&self.kernel, offset, data)
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> Result<(), OpError> {
        Target::write_fua(&self.kernel, offset, data)
    }
    fn flush(&self) -> Result<(), OpError> {
        Target::flush(&self.kernel)
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), OpError> {
        Target::trim(&self.kernel, offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> Result<(), OpError> {
        Target::write_zeroes(&self.kernel, offset, len, no_hole)
    }
    fn raw(&self) -> Option<&dyn RawRequests> {
        Target::raw(&self.kernel)
    }
}

impl Attached for Measured {
    fn detach(self: Box<Self>) -> Result<(), OpError> {
        self.record();
        let Measured { kernel, .. } = *self;
        Box::new(kernel).detach()
    }
}

#[cfg(test)]
mod tests {
    use userblk::proto::Command;
    use userblk::MemDevice;

    use super::*;

    #[test]
    fn latency_of_every_attached_kernel_adds_up() {
        let rig = MeasuredRig::default();
        for _ in 0..2 {
            let t = rig.attach(Box::new(MemDevice::new(1 << 20))).unwrap();
            t.write(0, &[1; 4096]).unwrap();
            t.read(0, 4096).unwrap();
            t.detach().unwrap();
        }
        let report = rig.latency();
        assert_eq!(report.get(Command::Write).map(|c| c.count), Some(2));
        assert_eq!(report.get(Command::Read).map(|c| c.count), Some(2));
    }
}
