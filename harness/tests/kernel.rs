//! Tests against the real kernel's NBD driver. They need root, the nbd module and a device to
//! use: `USERBLK_TEST_NBD=/dev/nbd0` (or `auto`), set by the VM runner, with
//! `USERBLK_TEST_NBD_SETUP=netlink|ioctl` to pick the set-up. They are `#[ignore]`d, with the
//! reason, so plain `cargo test` lists them as skipped; `vm/run.sh` runs them in the VM with
//! `--include-ignored`. Run by hand without the variable, each prints "skipped: <reason>".
//!
//! The tests share the machine's NBD devices, so they take turns (a lock), whatever
//! `--test-threads` says.

use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use userblk::link::nbd;
use userblk::proto::TransmissionFlags;
use userblk::{BlockDevice, LinkError, MemDevice, ServerError};
use userblk_harness::conformance::{self, Env};
use userblk_harness::nbd_rig::{NbdRig, NbdTarget};
use userblk_harness::target::{Attached, Rig, Target};

static TURN: Mutex<()> = Mutex::new(());

/// The rig to test with and the lock that keeps other tests off the devices, or `None` after
/// printing why the test is skipped.
fn setup(test: &str) -> Option<(NbdRig, MutexGuard<'static, ()>)> {
    match NbdRig::from_env() {
        Ok(rig) => {
            let turn = TURN.lock().unwrap_or_else(PoisonError::into_inner);
            eprintln!("{test}: against {} ({:?})", rig.name(), rig.options);
            Some((rig, turn))
        }
        Err(why) => {
            println!("skipped: {why}");
            None
        }
    }
}

/// The device node the rig names (for tests that need a fixed one: auto picks `/dev/nbd0` when
/// it is free, which it is between tests).
fn fixed_device(rig: &NbdRig) -> PathBuf {
    rig.options
        .device_path()
        .map_or_else(|| PathBuf::from("/dev/nbd0"), PathBuf::from)
}

/// Waits until `/dev/nbdN` is no longer connected: unmount must leave it free.
fn assert_freed(index: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while nbd::device_connected(index) {
        assert!(Instant::now() < deadline, "/dev/nbd{index} still connected");
        thread::sleep(Duration::from_millis(20));
    }
}

fn attach(rig: &NbdRig, device: impl BlockDevice + 'static) -> NbdTarget {
    let mounted = rig.options.spawn(device).expect("mount");
    NbdTarget::open(mounted).expect("open the device node")
}

/// The whole conformance suite through `rig`, on a re-openable and crashable RAM disk (the
/// durability cases disconnect the device and serve the same memory again).
fn conformance_suite(rig: &dyn Rig) {
    let factory = userblk_harness::factory::mem(64 << 20);
    let caps = MemDevice::new(0).capabilities();
    let env = Env::new(rig, &factory, caps);
    let report = conformance::run_cases(&env, &conformance::cases(), &mut |_, c| {
        eprintln!("  case {}", c.name)
    });
    println!("{report}");
    assert!(report.all_passed(), "{report}");
}

/// Each block operation through the kernel's node `t`, checked there and, for the O_DIRECT
/// write, in the device `mem` behind it.
fn block_operations(t: &dyn Target, mem: &MemDevice) {
    let data: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8).collect();
    t.write(1 << 20, &data).unwrap();
    t.flush().unwrap();
    assert_eq!(t.read(1 << 20, data.len()).unwrap(), data);
    let mut direct = vec![0u8; data.len()];
    mem.read(1 << 20, &mut direct).unwrap();
    assert_eq!(direct, data, "O_DIRECT write reached the device");
    t.write_fua(0, &[9u8; 4096]).unwrap();
    assert_eq!(t.read(0, 4096).unwrap(), vec![9u8; 4096]);
    if t.flags().contains(TransmissionFlags::SEND_TRIM) {
        t.trim(1 << 20, 65536).unwrap();
    }
    t.write_zeroes(2 << 20, 65536, true).unwrap();
    t.write_zeroes(3 << 20, 65536, false).unwrap();
    assert!(t.read(2 << 20, 65536).unwrap().iter().all(|&b| b == 0));
    assert!(t.read(3 << 20, 65536).unwrap().iter().all(|&b| b == 0));
}

#[test]
#[ignore = "needs root and the nbd module: vm/run.sh runs it against /dev/nbd0"]
fn conformance_suite_on_the_real_kernel() {
    let Some((rig, _turn)) = setup("conformance") else {
        return;
    };
    conformance_suite(&rig);
}

#[test]
#[ignore = "needs root and the nbd module: vm/run.sh runs it against /dev/nbd0"]
fn block_operations_reach_the_device() {
    let Some((rig, _turn)) = setup("block operations") else {
        return;
    };
    let mem = Arc::new(MemDevice::new(64 << 20));
    let t = attach(&rig, Arc::clone(&mem));
    assert_eq!(t.kernel_size().unwrap(), 64 << 20, "BLKGETSIZE64");
    assert_eq!(t.kernel_block_size().unwrap(), 512, "BLKSSZGET");
    block_operations(&t, &mem);
    let index = t.mounted().index();
    Box::new(t).detach().unwrap();
    assert_freed(index);
}

#[test]
#[ignore = "needs root and the nbd module: vm/run.sh runs it against /dev/nbd0"]
fn busy_when_the_device_is_in_use() {
    let Some((rig, _turn)) = setup("busy") else {
        return;
    };
    let path = fixed_device(&rig);
    let options = rig.options.clone().device(&path);
    let first = options.spawn(MemDevice::new(1 << 20)).unwrap();
    let err = options.spawn(MemDevice::new(1 << 20)).unwrap_err();
    println!("second mount on {}: {err}", path.display());
    assert!(
        matches!(err, ServerError::Link(LinkError::Busy { .. })),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "{} is busy: it is already connected or being set up (pick another with --nbd, or disconnect it)",
            path.display()
        )
    );
    let index = first.index();
    first.unmount().unwrap();
    assert_freed(index);
}

#[test]
#[ignore = "needs root and the nbd module: vm/run.sh runs it against /dev/nbd0"]
fn invalid_block_size_is_reported() {
    let Some((rig, _turn)) = setup("block size") else {
        return;
    };
    // 64 KiB exceeds the 4 KiB page size the kernel allows before 6.15.
    let err = rig
        .options
        .clone()
        .block_size(65536)
        .spawn(MemDevice::new(1 << 20))
        .unwrap_err();
    println!("block size 65536: {err}");
    assert!(
        matches!(
            err,
            ServerError::Link(LinkError::InvalidBlockSize { block_size: 65536 })
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "invalid block size 65536: must be a power of two from 512 to the page size"
    );
    // And the device is left usable.
    let t = attach(&rig, MemDevice::with_block_size(1 << 20, 4096));
    assert_eq!(t.kernel_block_size().unwrap(), 4096);
    Box::new(t).detach().unwrap();
}

#[test]
#[ignore = "needs root and the nbd module: vm/run.sh runs it against /dev/nbd0"]
fn auto_picks_a_free_device_and_says_which() {
    let Some((rig, _turn)) = setup("auto") else {
        return;
    };
    let options = rig.options.clone().auto_device();
    let a = options.spawn(MemDevice::new(1 << 20)).unwrap();
    let b = options.spawn(MemDevice::new(1 << 20)).unwrap();
    println!(
        "auto picked {} and {} ({:?})",
        a.device().display(),
        b.device().display(),
        a.handle().setup()
    );
    assert_ne!(a.index(), b.index());
    assert!(nbd::device_connected(a.index()) && nbd::device_connected(b.index()));
    let ready = |p: PathBuf| p.exists();
    assert!(ready(a.device()) && ready(b.device()));
    let (ia, ib) = (a.index(), b.index());
    a.unmount().unwrap();
    b.unmount().unwrap();
    assert_freed(ia);
    assert_freed(ib);
}

#[test]
#[ignore = "needs root and the nbd module: vm/run.sh runs it against /dev/nbd0"]
fn serve_twice_in_a_row_on_the_same_device() {
    let Some((rig, _turn)) = setup("reuse") else {
        return;
    };
    let path = fixed_device(&rig);
    for round in 0..3 {
        let t = attach(&rig, MemDevice::new(4 << 20));
        assert_eq!(t.path(), &path, "round {round}");
        t.write(0, &[round as u8 + 1; 512]).unwrap();
        assert_eq!(t.read(0, 512).unwrap(), vec![round as u8 + 1; 512]);
        let index = t.mounted().index();
        Box::new(t).detach().unwrap();
        assert_freed(index);
    }
}

#[test]
#[ignore = "needs root and the nbd module: vm/run.sh runs it against /dev/nbd0"]
fn dropping_or_panicking_disconnects() {
    let Some((rig, _turn)) = setup("drop") else {
        return;
    };
    let mounted = rig.options.spawn(MemDevice::new(1 << 20)).unwrap();
    let index = mounted.index();
    drop(mounted);
    assert_freed(index);

    let options = rig.options.clone();
    let seen = Mutex::new(None);
    let r = panic::catch_unwind(AssertUnwindSafe(|| {
        options.mount(MemDevice::new(1 << 20), |h| {
            *seen.lock().unwrap() = h.index();
            panic!("the caller panics while the device is mounted");
        })
    }));
    assert!(r.is_err(), "the panic goes on");
    let index = seen.lock().unwrap().expect("mounted before the panic");
    assert_freed(index);
}

#[test]
#[ignore = "needs root and the nbd module: vm/run.sh runs it against /dev/nbd0"]
fn timeout_changes_and_status_while_running() {
    let Some((rig, _turn)) = setup("timeout") else {
        return;
    };
    let mounted = rig
        .options
        .clone()
        .timeout(Duration::from_secs(30))
        .spawn(MemDevice::new(1 << 20))
        .unwrap();
    mounted
        .handle()
        .set_timeout(Duration::from_secs(60))
        .unwrap();
    if let Ok(list) = nbd::status(Some(mounted.index())) {
        println!("status: {list:?}");
        assert!(list
            .iter()
            .any(|d| d.index == mounted.index() && d.connected));
    }
    let index = mounted.index();
    mounted.unmount().unwrap();
    assert_freed(index);
    // udev may hold the node open for a moment after the disconnect, which the kernel's STATUS
    // reports as connected: give it the same grace `assert_freed` gives.
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Ok(list) = nbd::status(Some(index)) {
        if list.iter().all(|d| !d.connected) {
            break;
        }
        assert!(Instant::now() < deadline, "still connected: {list:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "needs root and the nbd module: vm/run.sh runs it against /dev/nbd0"]
fn read_only_export_refuses_writes_in_the_kernel() {
    let Some((rig, _turn)) = setup("read-only") else {
        return;
    };
    let mem = Arc::new(MemDevice::new(1 << 20));
    let mounted = rig
        .options
        .clone()
        .read_only(true)
        .spawn(Arc::clone(&mem))
        .unwrap();
    let t = NbdTarget::open(mounted).unwrap();
    assert_eq!(t.kernel_size().unwrap(), 1 << 20);
    assert!(t.flags().contains(TransmissionFlags::READ_ONLY));
    // The kernel marked the disk read-only and refuses the write itself (EPERM).
    let err = t.write(0, &[1; 4096]).unwrap_err();
    assert_eq!(err.errno, Some(1), "{err}");
    assert!(mem.allocated() == 0, "nothing reached the device");
    Box::new(t).detach().unwrap();
}

// ---- Through the ublk driver (/dev/ublkbN): `USERBLK_TEST_UBLK=1`, set by vm/cases/ublk.sh on
// kernels that have ublk_drv. Every name has "ublk" in it, so `kernel ublk` runs just these.

use userblk::link::ublk::{self, UblkError, UblkOptions};
use userblk_harness::kernel_test::KernelTest;
use userblk_harness::ublk_rig::{UblkRig, UblkTarget};

fn setup_ublk(test: &str) -> Option<(UblkRig, MutexGuard<'static, ()>)> {
    match UblkRig::from_env() {
        Ok(rig) => {
            let turn = TURN.lock().unwrap_or_else(PoisonError::into_inner);
            eprintln!("{test}: through ublk ({:?})", rig.options);
            Some((rig, turn))
        }
        Err(why) => {
            println!("skipped: {why}");
            None
        }
    }
}

/// Waits until `/dev/ublkb{id}` and `/dev/ublkc{id}` are gone: stop and delete must leave
/// nothing behind.
fn assert_ublk_gone(id: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while ublk::block_device_path(id).exists() || ublk::char_device_path(id).exists() {
        assert!(
            Instant::now() < deadline,
            "/dev/ublkb{id} or /dev/ublkc{id} still there"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[ignore = "needs root and ublk_drv: vm/cases/ublk.sh runs it on 6.12"]
fn ublk_conformance_suite() {
    let Some((rig, _turn)) = setup_ublk("ublk conformance") else {
        return;
    };
    conformance_suite(&rig);
}

/// The random sequences (concurrent included) and this kernel's traces, as a driver author's
/// `kernel_test::run` runs them, through ublk.
#[test]
#[ignore = "needs root and ublk_drv: vm/cases/ublk.sh runs it on 6.12"]
fn ublk_random_tests_and_traces() {
    let Some((rig, _turn)) = setup_ublk("ublk random and traces") else {
        return;
    };
    let factory = userblk_harness::factory::mem(64 << 20);
    let report = KernelTest::default().run_on(&rig, &factory);
    println!("{report}");
    assert!(report.passed(), "{report}");
}

#[test]
#[ignore = "needs root and ublk_drv: vm/cases/ublk.sh runs it on 6.12"]
fn ublk_block_operations_reach_the_device() {
    let Some((rig, _turn)) = setup_ublk("ublk block operations") else {
        return;
    };
    let mem = Arc::new(MemDevice::new(64 << 20));
    let mounted = rig.options.spawn(Arc::clone(&mem)).unwrap();
    let t = UblkTarget::open(mounted).unwrap();
    assert_eq!(t.kernel_size().unwrap(), 64 << 20, "BLKGETSIZE64");
    assert_eq!(t.kernel_block_size().unwrap(), 512, "BLKSSZGET");
    block_operations(&t, &mem);
    let id = t.mounted().id();
    Box::new(t).detach().unwrap();
    assert_ublk_gone(id);
}

#[test]
#[ignore = "needs root and ublk_drv: vm/cases/ublk.sh runs it on 6.12"]
fn ublk_id_taken_is_reported() {
    let Some((rig, _turn)) = setup_ublk("ublk id taken") else {
        return;
    };
    let first = rig.options.spawn(MemDevice::new(1 << 20)).unwrap();
    let id = first.id();
    let err = rig
        .options
        .clone()
        .id(Some(id))
        .spawn(MemDevice::new(1 << 20))
        .unwrap_err();
    println!("second device with id {id}: {err}");
    assert!(
        matches!(err, ServerError::Link(LinkError::Ublk(UblkError::IdTaken { id: i })) if i == id),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "ublk device {id} already exists: pick another id (--ublk-id) or let the kernel choose"
        )
    );
    first.unmount().unwrap();
    assert_ublk_gone(id);
}

#[test]
#[ignore = "needs root and ublk_drv: vm/cases/ublk.sh runs it on 6.12"]
fn ublk_dropping_or_panicking_removes_the_device() {
    let Some((rig, _turn)) = setup_ublk("ublk drop") else {
        return;
    };
    let mounted = rig.options.spawn(MemDevice::new(1 << 20)).unwrap();
    let id = mounted.id();
    assert!(ublk::block_device_path(id).exists());
    drop(mounted);
    assert_ublk_gone(id);

    let seen = Mutex::new(None);
    let r = panic::catch_unwind(AssertUnwindSafe(|| {
        rig.options.mount(MemDevice::new(1 << 20), |h| {
            *seen.lock().unwrap() = h.id();
            panic!("the caller panics while the device is served");
        })
    }));
    assert!(r.is_err(), "the panic goes on");
    let id = seen.lock().unwrap().expect("served before the panic");
    assert_ublk_gone(id);
}

#[test]
#[ignore = "needs root and ublk_drv: vm/cases/ublk.sh runs it on 6.12"]
fn ublk_read_only_and_queues() {
    let Some((rig, _turn)) = setup_ublk("ublk read-only") else {
        return;
    };
    let mem = Arc::new(MemDevice::new(1 << 20));
    let options: UblkOptions = rig.options.clone().read_only(true).queues(2).queue_depth(8);
    let mounted = options.spawn(Arc::clone(&mem)).unwrap();
    let (queues, depth) = mounted.handle().queues();
    assert_eq!(depth, 8);
    assert!((1..=2).contains(&queues), "{queues}");
    let t = UblkTarget::open(mounted).unwrap();
    assert!(t.flags().contains(TransmissionFlags::READ_ONLY));
    let err = t.write(0, &[1; 4096]).unwrap_err();
    assert_eq!(err.errno, Some(1), "{err}");
    assert!(mem.allocated() == 0, "nothing reached the device");
    let id = t.mounted().id();
    Box::new(t).detach().unwrap();
    assert_ublk_gone(id);
}
