//! TLS (NBD_OPT_STARTTLS) through userblk's network server: certificates made at test time with
//! the openssl command (a test CA, a server certificate for localhost / 127.0.0.1 / ::1, a client
//! certificate), laid out as libnbd expects (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`)
//! so that the same directory serves nbdinfo and the harness's client.

use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use userblk::link::net::wire::Rep;
use userblk::link::net::{ListenAddr, Listening, NetEvent, NetOptions, TlsConfig, TlsMode};
use userblk::{BlockDevice, MemDevice};
use userblk_harness::conformance;
use userblk_harness::net_rig::{
    ClientError, ClientOptions, NbdClient, NbdUri, NetRig, NetTransport,
};

fn have(name: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(name).is_file()));
    if !found {
        eprintln!("SKIPPED: {name} not found (install it with scripts/setup-interop.sh)");
    }
    found
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Certificates in `dir`; `client` also gets a directory with only the CA (no identity).
struct Pki {
    dir: tempfile::TempDir,
    anonymous: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=userblk test CA"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(d, &ca);
        for (who, cn, ext) in [
            (
                "server",
                "localhost",
                "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n",
            ),
            (
                "client",
                "client",
                "subjectAltName=DNS:client\nextendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n",
            ),
        ] {
            std::fs::write(d.join(format!("{who}.ext")), ext).unwrap();
            let key = format!("{who}-key.pem");
            let csr = format!("{who}.csr");
            let subj = format!("/CN={cn}");
            let mut req = vec!["req", "-new", "-subj", &subj];
            req.extend(ec);
            req.extend(["-keyout", &key, "-out", &csr]);
            openssl(d, &req);
            let cert = format!("{who}-cert.pem");
            let extfile = format!("{who}.ext");
            openssl(
                d,
                &[
                    "x509", "-req", "-in", &csr, "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
                    "-CAcreateserial", "-days", "2", "-extfile", &extfile, "-out", &cert,
                ],
            );
        }
        let anonymous = d.join("anonymous");
        std::fs::create_dir(&anonymous).unwrap();
        std::fs::copy(d.join("ca-cert.pem"), anonymous.join("ca-cert.pem")).unwrap();
        Pki { dir, anonymous }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn server(&self, client_certs: bool) -> TlsConfig {
        let ca = self.path("ca-cert.pem");
        TlsConfig::from_pem_files(
            &self.path("server-cert.pem"),
            &self.path("server-key.pem"),
            client_certs.then_some(ca.as_path()),
        )
        .unwrap()
    }
}

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

fn serve(pki: &Pki, mode: TlsMode, log: &Log) -> (Listening, std::net::SocketAddr) {
    let log = log.clone();
    let listening = NetOptions::new()
        .tls(pki.server(true), mode)
        .on_event(move |e: &NetEvent<'_>| log.0.lock().unwrap().push(e.to_string()))
        .spawn(
            Arc::new(MemDevice::new(16 << 20)),
            &ListenAddr::Tcp(([127, 0, 0, 1], 0).into()),
        )
        .unwrap();
    let ListenAddr::Tcp(a) = listening.local_addr().clone() else {
        unreachable!()
    };
    (listening, a)
}

#[test]
fn client_certificates_required_and_tls_required() {
    if !have("openssl") {
        return;
    }
    let pki = Pki::new();
    let log = Log::default();
    let (listening, addr) = serve(&pki, TlsMode::Require, &log);
    let certs = pki.dir.path().display().to_string();
    // With the client certificate: served over TLS, data round-trips.
    let uri: NbdUri = format!("nbds://127.0.0.1:{}/?tls-certificates={certs}", addr.port())
        .parse()
        .unwrap();
    let c = NbdClient::connect(&uri).unwrap();
    assert!(c.info().tls && c.info().structured_replies);
    let data: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
    c.write(4096, &data, false).unwrap();
    assert_eq!(c.read(4096, data.len()).unwrap(), data);
    c.disconnect().unwrap();
    // Without one: the TLS handshake fails, and the server logs why.
    let anon: NbdUri = format!(
        "nbds://localhost:{}/?tls-certificates={}",
        addr.port(),
        pki.anonymous.display()
    )
    .parse()
    .unwrap();
    assert!(NbdClient::connect(&anon).is_err());
    // Without TLS at all: the export is out of reach (NBD_REP_ERR_TLS_REQD).
    let plain: NbdUri = format!("nbd://127.0.0.1:{}/", addr.port()).parse().unwrap();
    match NbdClient::connect(&plain) {
        Err(ClientError::Refused { reply, .. }) => assert_eq!(reply, Rep::ERR_TLS_REQD),
        other => panic!("a plain client got {other:?}"),
    }
    listening.stop().unwrap();
    let lines = log.0.lock().unwrap().clone();
    assert!(
        lines.iter().any(|l| l.contains("TLS handshake failed")),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("serving, TLS")),
        "{lines:#?}"
    );
}

#[test]
fn allow_mode_serves_plain_and_tls_clients() {
    if !have("openssl") {
        return;
    }
    let pki = Pki::new();
    let log = Log::default();
    let (listening, addr) = serve(&pki, TlsMode::Allow, &log);
    let plain: NbdUri = format!("nbd://127.0.0.1:{}/", addr.port()).parse().unwrap();
    let p = NbdClient::connect(&plain).unwrap();
    assert!(!p.info().tls);
    p.write(0, &[3; 512], false).unwrap();
    let tls: NbdUri = format!(
        "nbds://127.0.0.1:{}/?tls-certificates={}",
        addr.port(),
        pki.dir.path().display()
    )
    .parse()
    .unwrap();
    let t = NbdClient::connect(&tls).unwrap();
    assert!(t.info().tls);
    assert_eq!(t.read(0, 512).unwrap(), vec![3; 512]);
    drop((p, t));
    listening.stop().unwrap();
}

#[test]
fn conformance_over_tls() {
    if !have("openssl") {
        return;
    }
    let pki = Pki::new();
    let mut rig = NetRig::new(NetTransport::Unix);
    rig.server = rig.server.clone().tls(pki.server(true), TlsMode::Require);
    let config = userblk::link::net::tls::client_config(
        &pki.path("ca-cert.pem"),
        Some((&pki.path("client-cert.pem"), &pki.path("client-key.pem"))),
    )
    .unwrap();
    rig.client = ClientOptions {
        tls: Some((config, "localhost".into())),
        ..ClientOptions::default()
    };
    // Re-openable and crashable RAM, so the durability cases run too.
    let factory = userblk_harness::factory::mem(64 << 20);
    let report = conformance::run_all(&rig, &factory, MemDevice::new(1 << 20).capabilities());
    assert!(report.all_passed(), "{report}");
}

#[test]
fn nbdinfo_over_tls_with_and_without_a_certificate() {
    if !have("openssl") || !have("nbdinfo") {
        return;
    }
    let pki = Pki::new();
    let log = Log::default();
    let (listening, addr) = serve(&pki, TlsMode::Require, &log);
    let nbdinfo = |dir: &Path| {
        let uri = format!(
            "nbds://127.0.0.1:{}/?tls-certificates={}",
            addr.port(),
            dir.display()
        );
        let mut child = Command::new("nbdinfo")
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        for _ in 0..6000 {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        child.wait_with_output().unwrap()
    };
    let ok = nbdinfo(pki.dir.path());
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success() && out.contains("export-size: 16777216") && out.contains("with TLS"),
        "{out}\n{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let refused = nbdinfo(&pki.anonymous);
    assert!(!refused.status.success());
    // A client that connects and leaves before TLS does not disturb the server.
    let s = TcpStream::connect(addr).unwrap();
    s.shutdown(Shutdown::Both).unwrap();
    assert!(nbdinfo(pki.dir.path()).status.success());
    listening.stop().unwrap();
}

#[test]
fn garbage_instead_of_a_tls_handshake_is_a_typed_error() {
    use std::io::{Read, Write};
    use userblk::link::net::wire::{self, Opt, OptionReplyHeader};

    if !have("openssl") {
        return;
    }
    let pki = Pki::new();
    let log = Log::default();
    let (listening, addr) = serve(&pki, TlsMode::Require, &log);
    for garbage in [&b""[..], b"\x16\x03\x01\x00", &[0x42; 300]] {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut greeting = [0u8; wire::GREETING_LEN];
        s.read_exact(&mut greeting).unwrap();
        s.write_all(&wire::FLAG_C_FIXED_NEWSTYLE.to_be_bytes())
            .unwrap();
        s.write_all(&wire::encode_option(Opt::STARTTLS, &[]))
            .unwrap();
        let mut h = [0u8; wire::OPTION_REPLY_HEADER_LEN];
        s.read_exact(&mut h).unwrap();
        assert_eq!(OptionReplyHeader::parse(&h).unwrap().reply, Rep::ACK);
        s.write_all(garbage).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }
    // A client with its certificate is served all the same.
    let uri: NbdUri = format!(
        "nbds://127.0.0.1:{}/?tls-certificates={}",
        addr.port(),
        pki.dir.path().display()
    )
    .parse()
    .unwrap();
    let c = NbdClient::connect(&uri).unwrap();
    c.write(0, &[1; 4096], false).unwrap();
    assert_eq!(c.read(0, 4096).unwrap(), vec![1; 4096]);
    c.disconnect().unwrap();
    listening.stop().unwrap();
    let lines = log.0.lock().unwrap().clone();
    let failed = lines
        .iter()
        .filter(|l| l.contains("handshake failed") && l.contains("TLS"))
        .count();
    assert_eq!(failed, 3, "{lines:#?}");
}
