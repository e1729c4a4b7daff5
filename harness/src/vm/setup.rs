//! `userblk vm setup`: what the VM needs, installed idempotently on Debian and Ubuntu: QEMU, the
//! test kernels with their modules, virtme-ng (pinned, from PyPI, in a private venv), busybox,
//! fio and e2fsprogs. As root it runs the steps (apt output to a log); otherwise it prints them.
//!
//! Debian bookworm: the 6.1 kernel (`linux-image-amd64`), 6.12 from bookworm-security (or
//! backports: `linux-image-6.12.*+deb12-amd64-unsigned`), QEMU from bookworm-backports (the
//! machine's `qemu-utils` comes from there and Breaks bookworm's `qemu-system-common`).
//! Ubuntu: the release's generic kernel and its HWE kernel (`linux-image-generic`,
//! `linux-image-generic-hwe-VERSION`), QEMU from the release.
//!
//! [`plan`] is pure (what to do, from what [`probe`] saw), so it is tested without root.

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::kernels::{self, Kernel};

/// The virtme-ng release used: newer ones changed the command line before.
pub const VNG_VERSION: &str = "1.42";
/// Where the venv goes unless `USERBLK_VM_PREFIX` says otherwise.
pub const DEFAULT_PREFIX: &str = "/opt/userblk-vm";
/// Where apt's output goes.
pub const LOG: &str = "/var/log/userblk-vm-setup.log";
const BACKPORTS_SOURCES: &str = "/etc/apt/sources.list.d/userblk-bookworm-backports.sources";
const BACKPORTS_PIN: &str = "/etc/apt/preferences.d/userblk-bookworm-backports";
const POLICY_RC: &str = "/usr/sbin/policy-rc.d";

/// The venv prefix (`$USERBLK_VM_PREFIX`, default `/opt/userblk-vm`).
pub fn prefix() -> PathBuf {
    std::env::var_os("USERBLK_VM_PREFIX")
        .filter(|p| !p.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_PREFIX), PathBuf::from)
}

/// The `vng` setup installs.
pub fn default_vng() -> PathBuf {
    prefix().join("venv/bin/vng")
}

/// Which distribution, from `/etc/os-release`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Distro {
    /// Debian, with its codename (`bookworm`).
    Debian(String),
    /// Ubuntu, with its version (`24.04`) and codename (`noble`).
    Ubuntu {
        /// `VERSION_ID`.
        version: String,
        /// `VERSION_CODENAME`.
        codename: String,
    },
    /// Anything else (`ID`).
    Other(String),
}

/// Parses `/etc/os-release` text.
pub fn parse_os_release(text: &str) -> Distro {
    let get = |key: &str| {
        text.lines()
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().trim_matches('"').to_string())
            .unwrap_or_default()
    };
    match get("ID").as_str() {
        "debian" => Distro::Debian(get("VERSION_CODENAME")),
        "ubuntu" => Distro::Ubuntu {
            version: get("VERSION_ID"),
            codename: get("VERSION_CODENAME"),
        },
        other => Distro::Other(other.to_string()),
    }
}

/// What is on the machine, as far as setup cares.
#[derive(Clone, Debug)]
pub struct Probe {
    /// The distribution.
    pub distro: Distro,
    /// Packages (of those setup knows) that are installed.
    pub installed_packages: Vec<String>,
    /// The newest 6.12 kernel package apt knows (Debian), if its lists have one.
    pub candidate_612: Option<String>,
    /// Whether an apt source for bookworm-backports exists.
    pub has_backports: bool,
    /// Whether our pin file exists.
    pub has_pin: bool,
    /// The version `vng --version` prints from the venv, if it runs.
    pub vng_version: Option<String>,
    /// The test kernels found.
    pub kernels: Vec<Kernel>,
}

/// One thing to do as root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Run a command.
    Run(Vec<String>),
    /// Write a file (mode 0644).
    Write {
        /// Where.
        path: PathBuf,
        /// What.
        contents: String,
    },
}

/// A step of the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// Why, for the log.
    pub why: String,
    /// What.
    pub action: Action,
}

impl fmt::Display for Step {
    /// The step as a command to type (with `sudo`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "# {}", self.why)?;
        match &self.action {
            Action::Run(argv) => {
                let words: Vec<String> = argv
                    .iter()
                    .map(|a| super::boot::shell_quote(std::ffi::OsStr::new(a)))
                    .collect();
                writeln!(f, "sudo {}", words.join(" "))
            }
            Action::Write { path, contents } => {
                writeln!(f, "sudo tee {} >/dev/null <<'EOF'", path.display())?;
                write!(f, "{contents}")?;
                writeln!(f, "EOF")
            }
        }
    }
}

fn run(why: impl Into<String>, argv: &[&str]) -> Step {
    Step {
        why: why.into(),
        action: Action::Run(argv.iter().map(|s| s.to_string()).collect()),
    }
}

fn apt_install(why: impl Into<String>, release: Option<&str>, pkgs: &[String]) -> Step {
    let mut argv: Vec<String> = [
        "env",
        "DEBIAN_FRONTEND=noninteractive",
        // The kernel's postinst skips update-initramfs: virtme-ng makes its own initramfs.
        "INITRD=No",
        "apt-get",
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "-o",
        "Dpkg::Options::=--force-confdef",
        "-o",
        "Dpkg::Options::=--force-confold",
    ]
    .map(String::from)
    .to_vec();
    if let Some(r) = release {
        argv.push("-t".into());
        argv.push(r.into());
    }
    argv.extend(pkgs.iter().cloned());
    Step {
        why: why.into(),
        action: Action::Run(argv),
    }
}

/// Packages every distribution needs (Debian and Ubuntu names agree).
const COMMON_PACKAGES: &[&str] = &[
    "busybox-static",
    "kmod",
    "fio",
    "e2fsprogs",
    "util-linux",
    "python3-venv",
    "udev",
];
/// Debian only: the suite's benchmark also uses these.
const DEBIAN_EXTRA: &[&str] = &["nbdkit", "nbd-client", "linux-image-amd64"];

/// Every package name setup may check, for [`probe`].
pub fn known_packages(distro: &Distro) -> Vec<String> {
    let mut v: Vec<String> = COMMON_PACKAGES.iter().map(|s| s.to_string()).collect();
    v.push("qemu-system-x86".into());
    match distro {
        Distro::Debian(_) => v.extend(DEBIAN_EXTRA.iter().map(|s| s.to_string())),
        Distro::Ubuntu { version, .. } => {
            v.push("linux-image-generic".into());
            v.push(format!("linux-image-generic-hwe-{version}"));
        }
        Distro::Other(_) => {}
    }
    v
}

/// The kernels setup is expected to provide, as series or package names, for the
/// found/missing report.
pub fn expected_kernels(distro: &Distro) -> Vec<(&'static str, String)> {
    match distro {
        Distro::Debian(_) => vec![
            ("6.1", "linux-image-amd64 (bookworm)".into()),
            (
                "6.12",
                "linux-image-6.12.*+deb12-amd64-unsigned (bookworm-security)".into(),
            ),
        ],
        _ => Vec::new(),
    }
}

/// Why setup cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Not Debian or Ubuntu.
    #[error("userblk vm setup knows Debian and Ubuntu, not '{0}': install by hand QEMU (qemu-system-x86_64), busybox (static), kmod, fio, e2fsprogs, python3 with venv, virtme-ng {VNG_VERSION} from PyPI, and kernels whose modules include nbd")]
    Unsupported(String),
    /// A step failed.
    #[error("failed: {step} (output: {log})")]
    StepFailed {
        /// The step, as text.
        step: String,
        /// The log.
        log: String,
    },
    /// A host operation failed.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

/// The steps that bring the machine from `p` to ready; empty when it is ready. Apt steps come
/// first (sources, update, packages), then virtme-ng.
pub fn plan(p: &Probe) -> Result<Vec<Step>, SetupError> {
    let has = |pkg: &str| p.installed_packages.iter().any(|i| i == pkg);
    let mut steps = Vec::new();
    let mut packages: Vec<String> = COMMON_PACKAGES
        .iter()
        .filter(|n| !has(n))
        .map(|s| s.to_string())
        .collect();
    let mut need_update = false;
    match &p.distro {
        Distro::Debian(codename) => {
            if codename != "bookworm" {
                // Other releases: the same packages by name; kernels are whatever they ship.
            }
            if !p.has_backports {
                steps.push(Step {
                    why: "apt source bookworm-backports: QEMU comes from there".into(),
                    action: Action::Write {
                        path: BACKPORTS_SOURCES.into(),
                        contents: "# Added by userblk vm setup: QEMU (and maybe the 6.12 kernel) come from here.\n\
                                   Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\n\
                                   Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
                            .into(),
                    },
                });
                need_update = true;
            }
            if !p.has_pin {
                steps.push(Step {
                    why: "keep the linux-image-amd64 metapackage (the 6.1 kernel) on bookworm".into(),
                    action: Action::Write {
                        path: BACKPORTS_PIN.into(),
                        contents: "# Added by userblk vm setup: the 6.12 kernel is installed by its own package name.\n\
                                   Package: linux-image-amd64\nPin: release n=bookworm-backports\nPin-Priority: -1\n"
                            .into(),
                    },
                });
            }
            packages.extend(
                DEBIAN_EXTRA
                    .iter()
                    .filter(|n| !has(n))
                    .map(|s| s.to_string()),
            );
            let need_612 = !p.kernels.iter().any(|k| k.series() == Some("6.12"));
            let need_qemu = !has("qemu-system-x86");
            let mut later = Vec::new();
            if need_612 {
                let pkg = p.candidate_612.clone();
                match pkg {
                    Some(pkg) => later.push(apt_install(
                        "the 6.12 kernel (bookworm-security; from backports on older mirrors: add -t bookworm-backports)",
                        None,
                        &[pkg],
                    )),
                    None => later.push(run(
                        "the 6.12 kernel: the newest linux-image-6.12.*+deb12-amd64-unsigned apt knows",
                        &[
                            "sh",
                            "-c",
                            "env DEBIAN_FRONTEND=noninteractive INITRD=No apt-get install -y -q --no-install-recommends \
                             \"$(apt-cache pkgnames linux-image-6.12. | grep -E '^linux-image-6\\.12\\.[0-9]+\\+deb12-amd64-unsigned$' | sort -V | tail -n 1)\"",
                        ],
                    )),
                }
            }
            if need_qemu {
                later.push(apt_install(
                    "QEMU from bookworm-backports",
                    Some("bookworm-backports"),
                    &["qemu-system-x86".to_string()],
                ));
            }
            if need_update || !packages.is_empty() || !later.is_empty() {
                let made_policy = !Path::new(POLICY_RC).exists();
                if made_policy {
                    steps.push(Step {
                        why: "keep package scripts from starting services (removed at the end)"
                            .into(),
                        action: Action::Write {
                            path: POLICY_RC.into(),
                            contents: "#!/bin/sh\nexit 101\n".into(),
                        },
                    });
                    steps.push(run(
                        "policy-rc.d must be executable",
                        &["chmod", "755", POLICY_RC],
                    ));
                }
                steps.push(run(
                    "apt lists",
                    &[
                        "env",
                        "DEBIAN_FRONTEND=noninteractive",
                        "apt-get",
                        "update",
                        "-q",
                    ],
                ));
                if !packages.is_empty() {
                    steps.push(apt_install("packages from the release", None, &packages));
                }
                steps.extend(later);
                if made_policy {
                    steps.push(run(
                        "remove the temporary policy-rc.d",
                        &["rm", "-f", POLICY_RC],
                    ));
                }
            }
        }
        Distro::Ubuntu { version, .. } => {
            for k in [
                "qemu-system-x86".to_string(),
                "linux-image-generic".into(),
                format!("linux-image-generic-hwe-{version}"),
            ] {
                if !has(&k) {
                    packages.push(k);
                }
            }
            if !packages.is_empty() {
                steps.push(run(
                    "apt lists",
                    &[
                        "env",
                        "DEBIAN_FRONTEND=noninteractive",
                        "apt-get",
                        "update",
                        "-q",
                    ],
                ));
                steps.push(apt_install(
                    "QEMU, the generic and HWE kernels with their modules, tools",
                    None,
                    &packages,
                ));
                // Ubuntu's kernel images are readable by root only; virtme-ng reads them as the
                // user who runs it (root here, but `userblk vm` may run under sudo -E).
                steps.push(run(
                    "kernel images readable",
                    &["sh", "-c", "chmod 0644 /boot/vmlinuz-*"],
                ));
            }
        }
        Distro::Other(id) => return Err(SetupError::Unsupported(id.clone())),
    }
    if p.vng_version.as_deref() != Some(VNG_VERSION) {
        let venv = prefix().join("venv");
        let py = venv.join("bin/python3");
        let venv_s = venv.display().to_string();
        let py_s = py.display().to_string();
        steps.push(run(
            "a private venv for virtme-ng",
            &["/usr/bin/python3", "-m", "venv", &venv_s],
        ));
        steps.push(run(
            format!("virtme-ng {VNG_VERSION} from PyPI"),
            &[
                &py_s,
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                &format!("virtme-ng=={VNG_VERSION}"),
            ],
        ));
    }
    Ok(steps)
}

/// Looks at the machine (no root needed).
pub fn probe() -> Probe {
    let distro = std::fs::read_to_string("/etc/os-release")
        .map(|t| parse_os_release(&t))
        .unwrap_or_else(|_| Distro::Other("unknown (no /etc/os-release)".into()));
    let installed_packages = known_packages(&distro)
        .into_iter()
        .filter(|p| {
            Command::new("dpkg-query")
                .args(["-W", "-f=${db:Status-Status}", p])
                .stderr(Stdio::null())
                .output()
                .is_ok_and(|o| o.stdout == b"installed")
        })
        .collect();
    let candidate_612 = Command::new("apt-cache")
        .args(["pkgnames", "linux-image-6.12."])
        .stderr(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let mut names: Vec<&str> = text
                .lines()
                .filter(|n| {
                    n.strip_prefix("linux-image-6.12.")
                        .and_then(|r| r.strip_suffix("+deb12-amd64-unsigned"))
                        .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                })
                .collect();
            names.sort_by(|a, b| kernels::compare_releases(a, b));
            names.last().map(|s| s.to_string())
        });
    let has_backports = ["/etc/apt/sources.list", "/etc/apt/sources.list.d"]
        .iter()
        .flat_map(|p| {
            let p = Path::new(p);
            if p.is_dir() {
                std::fs::read_dir(p)
                    .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
                    .unwrap_or_default()
            } else {
                vec![p.to_path_buf()]
            }
        })
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .any(|t| {
            t.lines()
                .any(|l| !l.trim_start().starts_with('#') && l.contains("bookworm-backports"))
        });
    let vng_version = Command::new(default_vng())
        .arg("--version")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))
                .map(str::to_owned)
        });
    Probe {
        distro,
        installed_packages,
        candidate_612,
        has_backports,
        has_pin: Path::new(BACKPORTS_PIN).exists(),
        vng_version,
        kernels: kernels::installed(Path::new("/boot"), Path::new("/lib/modules")),
    }
}

/// Runs one step as root, its output appended to [`LOG`].
fn execute(step: &Step) -> Result<(), SetupError> {
    let io = |what: String, e| SetupError::Io(what, e);
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(LOG)
        .map_err(|e| io(format!("opening {LOG}"), e))?;
    let _ = write!(log, "\n### {step}");
    match &step.action {
        Action::Write { path, contents } => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| io(format!("creating {}", dir.display()), e))?;
            }
            std::fs::write(path, contents).map_err(|e| io(format!("writing {}", path.display()), e))
        }
        Action::Run(argv) => {
            let err_log = log
                .try_clone()
                .map_err(|e| io(format!("opening {LOG}"), e))?;
            let status = Command::new(&argv[0])
                .args(&argv[1..])
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(err_log)
                .status()
                .map_err(|e| io(format!("running {}", argv[0]), e))?;
            if status.success() {
                Ok(())
            } else {
                Err(SetupError::StepFailed {
                    step: format!(
                        "{} ({status})",
                        step.to_string().trim_end().replace('\n', ": ")
                    ),
                    log: LOG.into(),
                })
            }
        }
    }
}

/// The found/missing report.
pub fn kernel_report(p: &Probe) -> String {
    let mut s = String::new();
    if p.kernels.is_empty() {
        s.push_str("kernels found: none\n");
    } else {
        s.push_str("kernels found:\n");
        for k in &p.kernels {
            let ublk = if k.has_module("ublk_drv") {
                ", ublk_drv"
            } else {
                ""
            };
            s.push_str(&format!(
                "  {:<6} {} (nbd{ublk})\n",
                k.short_name(),
                k.image.display()
            ));
        }
    }
    let missing: Vec<String> = expected_kernels(&p.distro)
        .into_iter()
        .filter(|(series, _)| !p.kernels.iter().any(|k| k.series() == Some(series)))
        .map(|(series, pkg)| format!("  {series:<6} {pkg}\n"))
        .collect();
    if !missing.is_empty() {
        s.push_str("kernels missing:\n");
        s.extend(missing);
    }
    s
}

/// `userblk vm setup`: installs (as root) or prints the commands; `print_only` prints even as
/// root. Returns whether the machine is ready.
pub fn setup(print_only: bool) -> Result<bool, SetupError> {
    let before = probe();
    let steps = plan(&before)?;
    let root = nix::unistd::geteuid().is_root();
    if steps.is_empty() {
        print!("{}", kernel_report(&before));
        println!("userblk vm setup: ready (virtme-ng {VNG_VERSION}, QEMU, tools); nothing to do");
        return Ok(!before.kernels.is_empty());
    }
    if print_only || !root {
        print!("{}", kernel_report(&before));
        println!(
            "userblk vm setup: {} step(s) to run as root{}:",
            steps.len(),
            if root {
                ""
            } else {
                " (you are not root; run these, or this command with sudo)"
            }
        );
        for s in &steps {
            print!("{s}");
        }
        return Ok(false);
    }
    for s in &steps {
        println!("userblk vm setup: {} ({LOG})", s.why);
        execute(s)?;
    }
    let after = probe();
    print!("{}", kernel_report(&after));
    let left = plan(&after)?;
    if left.is_empty() && !after.kernels.is_empty() {
        println!("userblk vm setup: ready");
        Ok(true)
    } else {
        println!("userblk vm setup: still missing after installing:");
        for s in &left {
            print!("{s}");
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe_with(distro: Distro, packages: &[&str], kernels: &[&str]) -> Probe {
        Probe {
            distro,
            installed_packages: packages.iter().map(|s| s.to_string()).collect(),
            candidate_612: Some("linux-image-6.12.117+deb12-amd64-unsigned".into()),
            has_backports: true,
            has_pin: true,
            vng_version: Some(VNG_VERSION.into()),
            kernels: kernels
                .iter()
                .map(|r| Kernel {
                    release: Some(r.to_string()),
                    image: format!("/boot/vmlinuz-{r}").into(),
                    modules: None,
                })
                .collect(),
        }
    }

    fn all_debian() -> Vec<&'static str> {
        let mut v: Vec<&str> = COMMON_PACKAGES.to_vec();
        v.extend(DEBIAN_EXTRA);
        v.push("qemu-system-x86");
        v
    }

    #[test]
    fn os_release_is_parsed() {
        let deb = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\nVERSION_CODENAME=bookworm\n";
        assert_eq!(parse_os_release(deb), Distro::Debian("bookworm".into()));
        let ubu = "ID=ubuntu\nVERSION_ID=\"24.04\"\nVERSION_CODENAME=noble\nID_LIKE=debian\n";
        assert_eq!(
            parse_os_release(ubu),
            Distro::Ubuntu {
                version: "24.04".into(),
                codename: "noble".into()
            }
        );
        assert_eq!(
            parse_os_release("ID=fedora\n"),
            Distro::Other("fedora".into())
        );
    }

    #[test]
    fn a_ready_debian_machine_needs_nothing() {
        let p = probe_with(
            Distro::Debian("bookworm".into()),
            &all_debian(),
            &["6.1.0-41-amd64", "6.12.117+deb12-amd64"],
        );
        assert_eq!(plan(&p).unwrap(), []);
        assert!(
            !kernel_report(&p).contains("missing"),
            "{}",
            kernel_report(&p)
        );
    }

    #[test]
    fn a_missing_612_kernel_and_qemu_are_installed_from_their_releases() {
        let mut pk = all_debian();
        pk.retain(|p| *p != "qemu-system-x86" && *p != "fio");
        let p = probe_with(Distro::Debian("bookworm".into()), &pk, &["6.1.0-41-amd64"]);
        let text: String = plan(&p).unwrap().iter().map(|s| s.to_string()).collect();
        assert!(
            text.contains("sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q\n"),
            "{text}"
        );
        assert!(text.contains("--force-confold fio\n"), "{text}");
        assert!(
            text.contains("--force-confold linux-image-6.12.117+deb12-amd64-unsigned\n"),
            "{text}"
        );
        assert!(
            text.contains("-t bookworm-backports qemu-system-x86\n"),
            "{text}"
        );
        assert!(!text.contains("venv"), "vng is there: {text}");
        let report = kernel_report(&p);
        assert!(report.contains("kernels missing:\n  6.12"), "{report}");
        assert!(report.contains("kernels found:\n  6.1 "), "{report}");
    }

    #[test]
    fn a_bare_debian_machine_gets_sources_pin_packages_and_vng() {
        let mut p = probe_with(Distro::Debian("bookworm".into()), &[], &[]);
        p.has_backports = false;
        p.has_pin = false;
        p.vng_version = None;
        p.candidate_612 = None;
        let steps = plan(&p).unwrap();
        let text: String = steps.iter().map(|s| s.to_string()).collect();
        assert!(
            text.contains(&format!(
                "sudo tee {BACKPORTS_SOURCES} >/dev/null <<'EOF'\n"
            )),
            "{text}"
        );
        assert!(text.contains("Suites: bookworm-backports\n"), "{text}");
        assert!(
            text.contains(&format!("sudo tee {BACKPORTS_PIN}")),
            "{text}"
        );
        assert!(
            text.contains("apt-cache pkgnames linux-image-6.12."),
            "{text}"
        );
        assert!(text.contains("virtme-ng==1.42"), "{text}");
        // Sources before the update, the update before installs, vng last.
        let pos = |needle: &str| {
            text.find(needle)
                .unwrap_or_else(|| panic!("{needle} in {text}"))
        };
        assert!(
            pos("Suites:") < pos("apt-get update") && pos("apt-get update") < pos("busybox-static")
        );
        assert!(pos("busybox-static") < pos("-m venv"));
    }

    #[test]
    fn ubuntu_gets_the_generic_and_hwe_kernels() {
        let p = probe_with(
            Distro::Ubuntu {
                version: "24.04".into(),
                codename: "noble".into(),
            },
            COMMON_PACKAGES,
            &[],
        );
        let text: String = plan(&p).unwrap().iter().map(|s| s.to_string()).collect();
        assert!(
            text.contains("qemu-system-x86 linux-image-generic linux-image-generic-hwe-24.04\n"),
            "{text}"
        );
        assert!(!text.contains("backports"), "{text}");
    }

    #[test]
    fn other_distributions_are_told_what_to_install() {
        let p = probe_with(Distro::Other("fedora".into()), &[], &[]);
        let err = plan(&p).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("userblk vm setup knows Debian and Ubuntu, not 'fedora'"),
            "{err}"
        );
    }
}
