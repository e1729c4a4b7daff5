//! The concurrent random test on the ready-made devices, with its defaults: they pass, through
//! the two-connection loopback rig, with the storage re-opened after each run where the factory
//! can; and its failures name what went wrong.

use std::sync::Arc;
use std::time::Instant;

use userblk::{BlockDevice, FileDevice, MemDevice};
use userblk_harness::factory::{DeviceFactory, Reopen};
use userblk_harness::random::{loopback_rig, random_test, Mode, RandomConfig};

const SIZE: u64 = 64 << 20;

fn passes(name: &str, factory: &dyn DeviceFactory, config: &RandomConfig) -> u32 {
    let caps = factory.create().unwrap().capabilities();
    let t = Instant::now();
    let r = random_test(&loopback_rig(), factory, caps, config, &mut |_| {});
    println!("{name}: {:.2} s: {r:?}", t.elapsed().as_secs_f64());
    match r {
        Ok(s) => {
            assert_eq!(s.runs, config.runs);
            s.reopened
        }
        Err(f) => panic!("{name}: {f}"),
    }
}

/// RAM that outlives the device: re-opening serves the same memory.
fn ram(block_size: u32) -> impl DeviceFactory {
    Reopen::new(
        move || Ok(Arc::new(MemDevice::with_block_size(SIZE, block_size))),
        |m: &Arc<MemDevice>| Ok(Arc::clone(m)),
    )
}

#[test]
fn mem_device_passes_the_default_concurrent_test_with_reopening() {
    let config = RandomConfig::default();
    assert_eq!(config.mode, Mode::Concurrent { threads: 4 });
    assert!(config.jitter.is_some());
    assert_eq!(passes("ram 512", &ram(512), &config), config.runs);
}

#[test]
fn mem_device_with_4k_blocks_passes_the_default_concurrent_test() {
    let config = RandomConfig::default();
    assert_eq!(passes("ram 4096", &ram(4096), &config), config.runs);
}

#[test]
fn file_device_passes_the_concurrent_test_with_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    FileDevice::create(&path, SIZE).unwrap();
    // The same file each time: runs start on what earlier runs left, which the checker must
    // take as initial content, never as this run's data.
    let factory = Reopen::new(
        move || Ok(path.clone()),
        |p: &std::path::PathBuf| FileDevice::open(p),
    );
    let config = RandomConfig {
        runs: 6,
        ..RandomConfig::default()
    };
    assert_eq!(passes("file", &factory, &config), 6);
}

#[test]
fn sequential_mode_still_passes_on_a_plain_factory() {
    let factory = || Box::new(MemDevice::new(SIZE)) as Box<dyn BlockDevice>;
    let config = RandomConfig {
        mode: Mode::Sequential,
        runs: 5,
        ops: 150,
        ..RandomConfig::default()
    };
    // No re-openable storage: nothing re-opened, and that is not a failure.
    assert_eq!(passes("sequential", &factory, &config), 0);
}

/// Set when the test is over: then a hung write may go on.
type Release = Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>;

/// Answers everything but a write to block 3, which waits until the test is over.
struct Hangs {
    mem: MemDevice,
    release: Release,
}

impl BlockDevice for Hangs {
    fn blocks(&self) -> u64 {
        self.mem.blocks()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.mem.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        if offset <= 3 * 512 && offset + data.len() as u64 > 3 * 512 {
            let (lock, cv) = &*self.release;
            let mut released = lock.lock().unwrap();
            while !*released {
                released = cv.wait(released).unwrap();
            }
        }
        self.mem.write(offset, data)
    }
}

#[test]
fn an_operation_that_never_completes_is_a_stall_not_a_hang() {
    let release: Release = Arc::default();
    let factory = {
        let release = Arc::clone(&release);
        move || Hangs {
            mem: MemDevice::new(1 << 20),
            release: Arc::clone(&release),
        }
    };
    let caps = userblk::Capabilities::default();
    let config = RandomConfig {
        runs: 5,
        stall_timeout: std::time::Duration::from_secs(1),
        ..RandomConfig::default()
    };
    let f = random_test(&loopback_rig(), &factory, caps, &config, &mut |_| {})
        .expect_err("the stall went unnoticed");
    let text = f.to_string();
    println!("{text}");
    assert_eq!(
        f.kind,
        userblk_harness::random::FailureKind::Stall,
        "{text}"
    );
    assert!(text.starts_with("stall: "), "{text}");
    assert!(text.contains("has not completed after"), "{text}");
    assert!(text.contains("in flight:"), "{text}");
    *release.0.lock().unwrap() = true;
    release.1.notify_all();
}

/// Writes each block in two halves, the second a moment after the first, with no lock: a read
/// in between sees half of each write.
struct HalfWrites(MemDevice);

impl BlockDevice for HalfWrites {
    fn blocks(&self) -> u64 {
        self.0.blocks()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        for (i, block) in data.chunks(512).enumerate() {
            let at = offset + (i * 512) as u64;
            self.0.write(at, &block[..256])?;
            std::thread::sleep(std::time::Duration::from_micros(50));
            self.0.write(at + 256, &block[256..])?;
        }
        Ok(())
    }
}

#[test]
fn a_block_holding_halves_of_two_writes_is_a_torn_read() {
    let factory = || HalfWrites(MemDevice::new(SIZE));
    let caps = userblk::Capabilities::default();
    let f = random_test(
        &loopback_rig(),
        &factory,
        caps,
        &RandomConfig::default(),
        &mut |_| {},
    )
    .expect_err("the torn writes went unnoticed");
    let text = f.to_string();
    println!("{text}");
    use userblk_harness::random::FailureKind;
    // When the first read of a never-written block lands between the halves of a write, the
    // checker takes that torn value for the block's unknown initial content, and a later clean
    // read is then what looks wrong ("bytes that no write put there"): reported as an unfilled
    // read. Which of the two it sees depends on the threads' timing; both name the block.
    match f.kind {
        FailureKind::TornRead => {
            assert!(text.starts_with("torn read: block "), "{text}");
            assert!(text.contains("holds parts of two writes"), "{text}");
            assert!(text.contains("bytes 0..256 from "), "{text}");
        }
        FailureKind::UnfilledRead => {
            assert!(text.starts_with("unfilled read: block "), "{text}");
            assert!(text.contains("the block's initial content"), "{text}");
        }
        other => panic!("{other:?} for torn writes: {text}"),
    }
}

/// Leaves the second half of every read of block 5 as the buffer it was given.
struct HalfReads(MemDevice);

impl BlockDevice for HalfReads {
    fn blocks(&self) -> u64 {
        self.0.blocks()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let touches = offset <= 5 * 512 && offset + buf.len() as u64 > 5 * 512;
        let n = if touches { buf.len() / 2 } else { buf.len() };
        self.0.read(offset, &mut buf[..n])
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.write(offset, data)
    }
}

#[test]
fn a_read_the_device_did_not_fill_is_an_unfilled_read() {
    let factory = || HalfReads(MemDevice::new(SIZE));
    let caps = userblk::Capabilities::default();
    let f = random_test(
        &loopback_rig(),
        &factory,
        caps,
        &RandomConfig::default(),
        &mut |_| {},
    )
    .expect_err("the unfilled reads went unnoticed");
    let text = f.to_string();
    println!("{text}");
    assert_eq!(
        f.kind,
        userblk_harness::random::FailureKind::UnfilledRead,
        "{text}"
    );
    assert!(text.starts_with("unfilled read: "), "{text}");
    assert!(text.contains("the device did not write"), "{text}");
}
