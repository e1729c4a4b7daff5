//! The conformance suite and random tests through userblk's network server, as an NBD client
//! sees it: TCP on 127.0.0.1 and [::1], and a Unix socket.

use userblk::{BlockDevice, MemDevice};
use userblk_harness::conformance;
use userblk_harness::factory::DeviceFactory;
use userblk_harness::net_rig::{NetRig, NetTransport};
use userblk_harness::random::{random_test, RandomConfig};

fn factory() -> Box<dyn BlockDevice> {
    Box::new(MemDevice::new(64 << 20))
}

/// RAM that can be re-opened and crashed, so the durability cases run too.
fn storage() -> impl DeviceFactory {
    userblk_harness::factory::mem(64 << 20)
}

#[test]
fn conformance_over_tcp() {
    let rig = NetRig::new(NetTransport::Tcp);
    let report = conformance::run_all(&rig, &storage(), factory().capabilities());
    println!("{report}");
    assert!(report.all_passed(), "{report}");
}

#[test]
fn conformance_over_unix_socket() {
    let rig = NetRig::new(NetTransport::Unix);
    let report = conformance::run_all(&rig, &storage(), factory().capabilities());
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
    let report = conformance::run_all(&rig, &storage(), factory().capabilities());
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

#[test]
fn read_only_export_and_export_names() {
    use userblk::link::net::wire::Rep;
    use userblk::link::net::{ListenAddr, NetOptions};
    use userblk::proto::TransmissionFlags;
    use userblk_harness::net_rig::{ClientError, NbdClient, NbdUri};

    let dev = std::sync::Arc::new(MemDevice::new(1 << 20));
    dev.write(0, &[7; 512]).unwrap();
    let listening = NetOptions::new()
        .export_name("disk")
        .read_only(true)
        .on_event(|_| {})
        .spawn(
            std::sync::Arc::clone(&dev),
            &ListenAddr::Tcp(([127, 0, 0, 1], 0).into()),
        )
        .unwrap();
    let ListenAddr::Tcp(a) = listening.local_addr().clone() else {
        unreachable!()
    };
    // By its name and as the default export: read-only, reads work, every write is EPERM.
    for name in ["disk", ""] {
        let uri: NbdUri = format!("nbd://{a}/{name}").parse().unwrap();
        let c = NbdClient::connect(&uri).unwrap();
        assert_eq!(c.info().name.as_deref(), Some("disk"));
        assert!(c.info().flags.contains(TransmissionFlags::READ_ONLY));
        assert_eq!(c.read(0, 512).unwrap(), vec![7; 512]);
        for r in [
            c.write(0, &[1; 512], false),
            c.trim(0, 512),
            c.write_zeroes(0, 512, false),
        ] {
            assert!(
                matches!(r, Err(ClientError::Errno { errno: 1, .. })),
                "{r:?}"
            );
        }
    }
    // Another name: NBD_REP_ERR_UNKNOWN, and nothing else happens.
    let uri: NbdUri = format!("nbd://{a}/other").parse().unwrap();
    match NbdClient::connect(&uri) {
        Err(ClientError::Refused { reply, .. }) => assert_eq!(reply, Rep::ERR_UNKNOWN),
        other => panic!("{other:?}"),
    }
    listening.stop().unwrap();
    let mut buf = [0u8; 512];
    dev.read(0, &mut buf).unwrap();
    assert_eq!(buf, [7; 512]);
}

#[test]
fn recorded_traces_replay_over_the_network() {
    use userblk_harness::trace::{replay_on, Trace};
    let rig = NetRig::new(NetTransport::Unix);
    for name in ["fio-6.12.ubt", "ext4-6.1.ubt"] {
        let path = format!("{}/traces/{name}", env!("CARGO_MANIFEST_DIR"));
        let trace = Trace::read_file(&path).unwrap();
        let device = Box::new(MemDevice::new(trace.header.size));
        let report = replay_on(&rig, device, &trace).unwrap_or_else(|e| panic!("{name}: {e}"));
        println!("{name}: {report}");
    }
}
