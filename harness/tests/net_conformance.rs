//! The conformance suite and random tests through userblk's network server, as an NBD client
//! sees it: TCP on 127.0.0.1 and [::1], and a Unix socket.

use userblk::{BlockDevice, MemDevice};
use userblk_harness::conformance;
use userblk_harness::net_rig::{NetRig, NetTransport};
use userblk_harness::random::{random_test, RandomConfig};

fn factory() -> Box<dyn BlockDevice> {
    Box::new(MemDevice::new(64 << 20))
}

#[test]
fn conformance_over_tcp() {
    let rig = NetRig::new(NetTransport::Tcp);
    let report = conformance::run_all(&rig, &factory, factory().capabilities());
    println!("{report}");
    assert!(report.all_passed(), "{report}");
}

#[test]
fn conformance_over_unix_socket() {
    let rig = NetRig::new(NetTransport::Unix);
    let report = conformance::run_all(&rig, &factory, factory().capabilities());
    println!("{report}");
    assert!(report.all_passed(), "{report}");
}

#[test]
fn conformance_over_ipv6_loopback() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("SKIPPED: no IPv6 loopback on this machine");
        return;
    }
    let rig = NetRig::new(NetTransport::Tcp6);
    let report = conformance::run_all(&rig, &factory, factory().capabilities());
    assert!(report.all_passed(), "{report}");
}

#[test]
fn random_sequences_over_tcp() {
    let rig = NetRig::new(NetTransport::Tcp);
    let small = || Box::new(MemDevice::new(8 << 20)) as Box<dyn BlockDevice>;
    let config = RandomConfig {
        runs: 4,
        ops: 150,
        ..RandomConfig::default()
    };
    if let Err(f) = random_test(&rig, &small, small().capabilities(), &config, &mut |_| {}) {
        panic!("{f}");
    }
}
