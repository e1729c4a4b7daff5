//! The async example device (`examples/remote_disk`) through the harness as a user runs it: a
//! closure (or a `Reopen`) returning an `AsyncBlockDevice` is a device factory as it is. The
//! remote disk, at 1 ms of latency, passes the conformance suite and the concurrent random
//! tests; its page cache with the seeded lost update is caught by the concurrent random test,
//! and a direct test shows the race is real.

#[path = "../../examples/remote_disk/remote.rs"]
mod remote;

use std::time::{Duration, Instant};

use remote::{PageCache, RemoteDisk, Storage, DEFAULT_LATENCY, PAGE};
use userblk::async_device::{runtime, AsyncBlockDevice, IoBuf};
use userblk::{AsyncDevice, BlockDevice, MemDevice};
use userblk_harness::conformance;
use userblk_harness::crash::{self, AsyncCrashable, CrashOptions};
use userblk_harness::factory::{self, DeviceFactory, Reopen};
use userblk_harness::net_rig::{NetRig, NetTransport};
use userblk_harness::random::{loopback_rig, random_test, FailureKind, RandomConfig};
use userblk_harness::target::LoopbackRig;

const SIZE: u64 = 64 << 20;

/// Remote disks on a storage server each, re-opened by connecting again.
fn remote_disks(latency: Duration) -> impl DeviceFactory {
    let rt = runtime().unwrap();
    let connect = rt.clone();
    Reopen::new(
        move || Storage::start(&rt, SIZE, latency),
        move |s: &Storage| connect.block_on(RemoteDisk::connect(s.path(), s.size())),
    )
}

/// Page caches in front of remote disks: the correct one, or the racy one.
fn page_caches(racy: bool) -> impl DeviceFactory {
    let rt = runtime().unwrap();
    let connect = rt.clone();
    Reopen::new(
        move || Storage::start(&rt, SIZE, DEFAULT_LATENCY),
        move |s: &Storage| {
            let disk = connect.block_on(RemoteDisk::connect(s.path(), s.size()))?;
            Ok(if racy {
                PageCache::racy(disk)
            } else {
                PageCache::new(disk)
            })
        },
    )
}

fn concurrent(
    factory: &dyn DeviceFactory,
    runs: u32,
) -> Result<u32, Box<userblk_harness::random::RandomFailure>> {
    let caps = BlockDevice::capabilities(&factory.create().unwrap());
    let config = RandomConfig {
        runs,
        ..RandomConfig::default()
    };
    let t = Instant::now();
    let r = random_test(&loopback_rig(), factory, caps, &config, &mut |_| {});
    println!("{:.2} s: {r:?}", t.elapsed().as_secs_f64());
    r.map(|s| s.runs)
}

#[test]
fn remote_disk_conforms() {
    let factory = remote_disks(DEFAULT_LATENCY);
    let caps = BlockDevice::capabilities(&factory.create().unwrap());
    let rig = LoopbackRig::default();
    let env = conformance::Env::new(&rig, &factory, caps);
    let report = conformance::run_cases(&env, &conformance::cases(), &mut |_, _| {});
    println!("{report}");
    assert!(report.all_passed(), "{report}");
}

#[test]
fn remote_disk_passes_the_concurrent_random_test() {
    let runs =
        concurrent(&remote_disks(DEFAULT_LATENCY), 8).unwrap_or_else(|f| panic!("{}", f.message));
    assert_eq!(runs, 8);
}

#[test]
fn page_cache_passes_the_concurrent_random_test() {
    // Fewer runs: every page's first write reads it from the remote first.
    let runs = concurrent(&page_caches(false), 4).unwrap_or_else(|f| panic!("{}", f.message));
    assert_eq!(runs, 4);
}

#[test]
fn the_racy_page_cache_is_caught_losing_a_write() {
    let failure = concurrent(&page_caches(true), 20).expect_err("the lost update went unnoticed");
    println!("{}", failure.message);
    assert!(
        matches!(
            failure.kind,
            FailureKind::LostWrite | FailureKind::StaleRead
        ),
        "{:?}: {}",
        failure.kind,
        failure.message
    );
}

/// The race itself, without the harness: two tasks write different sectors of one page at
/// once; the racy cache keeps only one of them, the correct one both.
#[test]
fn two_writes_to_one_page_lose_one_in_the_racy_cache_only() {
    let rt = runtime().unwrap();
    for racy in [true, false] {
        let storage = Storage::start(&rt, 1 << 20, DEFAULT_LATENCY).unwrap();
        let disk = rt
            .block_on(RemoteDisk::connect(storage.path(), storage.size()))
            .unwrap();
        let cache = if racy {
            PageCache::racy(disk)
        } else {
            PageCache::new(disk)
        };
        let page = rt.block_on(async {
            let (a, b) = tokio::join!(
                cache.write(0, IoBuf::from(vec![0xaa; 512])),
                cache.write(512, IoBuf::from(vec![0xbb; 512])),
            );
            a.0.unwrap();
            b.0.unwrap();
            // What the remote storage holds, past the cache.
            let fresh = RemoteDisk::connect(storage.path(), storage.size())
                .await
                .unwrap();
            let (r, page) = fresh.read(0, IoBuf::zeroed(PAGE)).await;
            r.unwrap();
            page.into_vec()
        });
        let kept = [page[..512] == [0xaa; 512], page[512..1024] == [0xbb; 512]];
        if racy {
            assert_eq!(kept.iter().filter(|&&k| k).count(), 1, "racy: {kept:?}");
        } else {
            assert_eq!(kept, [true, true]);
        }
    }
}

/// The remote storage has no volatile cache: after a power loss it holds everything written.
impl AsyncCrashable for RemoteDisk {
    async fn crash(&self) -> std::io::Result<Box<dyn BlockDevice>> {
        let size = self.blocks() * 512;
        let copy = MemDevice::new(size);
        for at in (0..size).step_by(64 << 10) {
            let (r, buf) = self.read(at, IoBuf::zeroed(64 << 10)).await;
            r?;
            BlockDevice::write(&copy, at, &buf)?;
        }
        Ok(Box::new(copy))
    }
}

#[test]
fn remote_disk_passes_the_crash_checker() {
    let rt = runtime().unwrap();
    let storages = std::sync::Mutex::new(Vec::new());
    let factory = factory::crashable(move || {
        let storage = Storage::start(&rt, 1 << 20, DEFAULT_LATENCY).unwrap();
        let disk = rt
            .block_on(RemoteDisk::connect(storage.path(), storage.size()))
            .unwrap();
        storages.lock().unwrap().push(storage);
        AsyncDevice::new(disk)
    });
    let ops = crash::random_ops(3, 1 << 20, 512, 40);
    let report = crash::check(&factory, &ops, &CrashOptions::default()).unwrap();
    assert_eq!(report.crash_points, 40);
}

/// The network export serves an async device as tasks too (structured replies, block status).
#[test]
fn remote_disk_conforms_over_the_network() {
    let factory = remote_disks(DEFAULT_LATENCY);
    let caps = BlockDevice::capabilities(&factory.create().unwrap());
    let report = conformance::run_all(&NetRig::new(NetTransport::Unix), &factory, caps);
    println!("{report}");
    assert!(report.all_passed(), "{report}");
}
