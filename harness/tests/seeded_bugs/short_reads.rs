//! A driver bug that only the 6.12 profile exposes: a staging buffer sized for 6.1's largest
//! request (128 KiB). Under 6.12 requests of up to 1,280 KiB arrive: reads past the buffer are
//! never filled (a short read) and writes past it are acknowledged and dropped. The harness's defaults (which play 6.12) catch it; a
//! rig playing 6.1 cannot; the same shape of driver with a buffer as large as the protocol
//! allows passes.

use std::io;
use std::sync::{Arc, Mutex};

use userblk::link::loopback::KernelProfile;
use userblk::{BlockDevice, Capabilities, LoopbackKernel, LoopbackOptions, MemDevice};
use userblk_harness::conformance::{self, Env, Outcome};
use userblk_harness::factory::Reopen;
use userblk_harness::target::LoopbackRig;

const SIZE: u64 = 64 << 20;

/// Copies each request through one staging buffer of `staging` bytes, as drivers written
/// against a kernel that never sent more do; the rest of a longer request is dropped.
struct Staged {
    mem: MemDevice,
    buf: Mutex<Vec<u8>>,
}

impl Staged {
    fn new(staging: usize) -> Staged {
        Staged {
            mem: MemDevice::new(SIZE),
            buf: Mutex::new(vec![0; staging]),
        }
    }
}

impl BlockDevice for Staged {
    fn blocks(&self) -> u64 {
        self.mem.blocks()
    }
    fn capabilities(&self) -> Capabilities {
        self.mem.capabilities()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let mut buf = self.buf.lock().unwrap();
        let n = out.len().min(buf.len());
        self.mem.read(offset, &mut buf[..n])?;
        out[..n].copy_from_slice(&buf[..n]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut buf = self.buf.lock().unwrap();
        let n = data.len().min(buf.len());
        buf[..n].copy_from_slice(&data[..n]);
        self.mem.write(offset, &buf[..n])
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.mem.trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.mem.write_zeroes(offset, len, may_trim)
    }
}

/// Writes 1 MiB through `profile` and says whether all of it reached the device's storage.
fn stored_whole(profile: KernelProfile) -> bool {
    let dev = Arc::new(Staged::new(128 << 10));
    let k = LoopbackKernel::with_profile(Arc::clone(&dev), profile).unwrap();
    let data: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    k.write(4 << 20, &data).unwrap();
    k.shutdown().unwrap();
    let mut stored = vec![0; data.len()];
    dev.mem.read(4 << 20, &mut stored).unwrap();
    stored == data
}

#[test]
fn a_128_kib_staging_buffer_loses_data_under_6_12_only() {
    assert!(
        !stored_whole(KernelProfile::linux_6_12()),
        "the write was stored whole"
    );
    assert!(
        stored_whole(KernelProfile::linux_6_1()),
        "6.1 splits at 128 KiB: the bug cannot show"
    );
}

fn suite(options: LoopbackOptions, staging: usize) -> conformance::Report {
    let rig = LoopbackRig { options };
    // Re-openable (the same device served again), for the durability cases.
    let factory = Reopen::new(
        move || Ok(Arc::new(Staged::new(staging))),
        |dev: &Arc<Staged>| Ok(Arc::clone(dev)),
    );
    let env = Env::new(&rig, &factory, Staged::new(staging).capabilities());
    conformance::run_cases(&env, &conformance::cases(), &mut |_, _| {})
}

#[test]
fn the_default_rig_catches_it_and_a_6_1_rig_does_not() {
    let report = suite(LoopbackOptions::default(), 128 << 10);
    let failed: Vec<&str> = report.failures().map(|c| c.name).collect();
    assert!(failed.contains(&"request_sizes"), "{report}");
    let Outcome::Fail(msg) = &report.case("request_sizes").unwrap().outcome else {
        unreachable!()
    };
    // The first read longer than the staging buffer leaves its tail unwritten: the rig's
    // poisoned READ buffers name it before any comparison of data.
    assert!(msg.starts_with("unfilled read: "), "{msg}");
    let old = suite(
        LoopbackOptions::for_profile(KernelProfile::linux_6_1()),
        128 << 10,
    );
    assert!(old.all_passed(), "{old}");
    // The same driver with a staging buffer of the protocol's 32 MiB passes under 6.12.
    let fixed = suite(LoopbackOptions::default(), 32 << 20);
    assert!(fixed.all_passed(), "{fixed}");
}
