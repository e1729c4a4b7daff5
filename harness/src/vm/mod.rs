//! `userblk vm`: boots real kernels under QEMU with virtme-ng and runs a command in each, for
//! the project's own real-kernel suite and for a driver author's `cargo test`.
//!
//! - [`kernels`]: which kernels are installed and which `--kernel` selects;
//! - [`boot`]: one boot, the command in it, its output and how it ended;
//! - [`scan`]: panics, hung tasks, oopses and BUGs in the kernel log;
//! - [`setup`]: what `userblk vm setup` installs (QEMU, kernels, virtme-ng, tools).
//!
//! [`run`] ties them together: each kernel in turn (one VM at a time), its output prefixed by
//! the kernel, one summary line per kernel at the end.

pub mod boot;
pub mod kernels;
pub mod scan;
pub mod setup;

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use boot::{Accel, Boot, Ended, Outcome};
use kernels::{Kernel, KernelSpec};

/// What can stop `userblk vm` before or around a boot (a failing command is not an error: it
/// is in the [`KernelRun`]).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// No test kernel is installed.
    #[error("no test kernel installed (a /boot/vmlinuz-* whose /lib/modules has nbd); `userblk vm setup` installs them")]
    NoKernels,
    /// `--kernel NAME` matches no installed test kernel.
    #[error("no installed test kernel matches {wanted} (installed: {}); `userblk vm setup` installs the test kernels", if installed.is_empty() { "none".to_string() } else { installed.join(", ") })]
    KernelNotInstalled {
        /// What was asked for.
        wanted: String,
        /// What there is.
        installed: Vec<String>,
    },
    /// `--kernel PATH` is not a file.
    #[error("no kernel image {}", .0.display())]
    NoImage(PathBuf),
    /// No `vng` found.
    #[error("virtme-ng (vng) not found in $VNG, {} or PATH; `userblk vm setup` installs it", setup::default_vng().display())]
    NoVng,
    /// QEMU is not installed.
    #[error("qemu-system-x86_64 not found on PATH; `userblk vm setup` installs it")]
    NoQemu,
    /// A directory vng cannot share read-write.
    #[error("cannot share {} with the guest: vng needs an absolute path other than / without '=', ',', quotes or white space", .0.display())]
    BadDirectory(PathBuf),
    /// `vng` could not be started.
    #[error("cannot run {}: {}", .0.display(), .1)]
    Spawn(PathBuf, #[source] io::Error),
    /// A file operation on the host.
    #[error("{0}: {1}")]
    Io(String, #[source] io::Error),
    /// KVM was required and does not boot the kernel.
    #[error("--kvm on: KVM does not boot {kernel}: {why}")]
    KvmUnusable {
        /// The kernel.
        kernel: String,
        /// What the probe boot said.
        why: String,
    },
}

/// `--kvm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KvmMode {
    /// A short probe boot with KVM per kernel; TCG when it fails.
    Auto,
    /// KVM, without a probe.
    On,
    /// TCG (software emulation) only.
    Off,
}

/// Everything `userblk vm -- CMD` needs.
#[derive(Clone, Debug)]
pub struct Options {
    /// `--kernel` items; empty: every installed test kernel.
    pub kernels: Vec<KernelSpec>,
    /// Per kernel, boot and command together.
    pub timeout: Duration,
    /// Guest memory.
    pub memory: String,
    /// Guest vCPUs.
    pub cpus: u32,
    /// KVM or not.
    pub kvm: KvmMode,
    /// Where to keep each boot's console and dmesg (a directory per kernel).
    pub keep_log: Option<PathBuf>,
    /// More host directories the guest may write.
    pub rwdirs: Vec<PathBuf>,
    /// Show the whole kernel console.
    pub verbose: bool,
    /// The command.
    pub cmd: Vec<OsString>,
}

/// One kernel's run.
#[derive(Debug)]
pub struct KernelRun {
    /// The kernel.
    pub kernel: Kernel,
    /// KVM or TCG.
    pub accel: Accel,
    /// What happened.
    pub outcome: Outcome,
}

impl KernelRun {
    /// `kernel 6.12 (6.12.117+deb12-amd64, tcg): ok in 95.3 s`, or the reason it failed.
    pub fn summary(&self) -> String {
        let o = &self.outcome;
        let secs = o.elapsed.as_secs_f64();
        let verdict = match &o.ended {
            Ended::Exited(0) if o.passed() => format!("ok in {secs:.1} s"),
            Ended::Exited(0) => {
                "FAILED: the command passed but the kernel reported problems".into()
            }
            Ended::Exited(c) => {
                format!("FAILED: the command exited with status {c} after {secs:.1} s")
            }
            Ended::ModuleFailed(m) => format!("FAILED: could not load a kernel module: {m}"),
            Ended::Interrupted(sig) => format!("FAILED: interrupted by {sig} after {secs:.1} s"),
            Ended::TimedOut { after, started } => format!(
                "FAILED: timed out after {} s (--timeout), {}",
                after.as_secs(),
                if *started {
                    "while the command ran"
                } else {
                    "still booting"
                }
            ),
            Ended::DiedDuringCommand => {
                format!("FAILED: the guest died while the command ran, after {secs:.1} s")
            }
            Ended::NeverStarted => format!(
                "FAILED: the guest did not boot (vng status {})",
                status_text(o)
            ),
        };
        let mut problems: Vec<String> = Vec::new();
        for f in &o.findings {
            let p = f.problem.to_string();
            if !problems.contains(&p) {
                problems.push(p);
            }
        }
        let extra = if problems.is_empty() {
            String::new()
        } else {
            format!(" [{}]", problems.join(", "))
        };
        format!(
            "kernel {} ({}, {}): {verdict}{extra}",
            self.kernel.short_name(),
            self.kernel,
            self.accel
        )
    }
}

fn status_text(o: &Outcome) -> String {
    match o.vng_status {
        Some(s) => s.code().map_or_else(|| s.to_string(), |c| c.to_string()),
        None => "killed".into(),
    }
}

/// The `vng` to use: `$VNG`, the one `userblk vm setup` installs, or one on PATH.
pub fn find_vng() -> Option<PathBuf> {
    let env = std::env::var_os("VNG").map(PathBuf::from);
    let on_path = find_on_path("vng");
    [env, Some(setup::default_vng()), on_path]
        .into_iter()
        .flatten()
        .find(|p| is_executable(p))
}

/// `name` in a PATH directory.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Environment variables of this process not passed to the guest: they describe this session
/// (terminal, display, ssh agent, runtime directories) and mean nothing, or harm, there.
const HOST_ONLY_ENV: &[&str] = &[
    "PWD",
    "OLDPWD",
    "SHLVL",
    "_",
    "DISPLAY",
    "WAYLAND_DISPLAY",
    "XAUTHORITY",
    "XDG_RUNTIME_DIR",
    "DBUS_SESSION_BUS_ADDRESS",
    "SSH_AUTH_SOCK",
    "SSH_AGENT_PID",
    "SSH_CONNECTION",
    "SSH_CLIENT",
    "SSH_TTY",
    "TMUX",
    "TMUX_PANE",
    "STY",
    "HOSTNAME",
    "TMPDIR",
    "USERBLK_VM",
    "INVOCATION_ID",
    "JOURNAL_STREAM",
    "NOTIFY_SOCKET",
    "LISTEN_PID",
    "LISTEN_FDS",
];

/// The environment CMD gets in the guest: ours, less the session variables (`DISPLAY`,
/// `SSH_AUTH_SOCK`, `XDG_RUNTIME_DIR`, `TMPDIR`...) and `XDG_SESSION_*`, so
/// that `cargo` and `rustup` are found and behave as on the host.
pub fn guest_env() -> Vec<(OsString, OsString)> {
    std::env::vars_os()
        .filter(|(k, _)| {
            let k = k.to_string_lossy();
            !HOST_ONLY_ENV.contains(&k.as_ref()) && !k.starts_with("XDG_SESSION_")
        })
        .collect()
}

/// The labels of the kernels: the series, or the release when two share a series.
pub fn labels(kernels: &[Kernel]) -> Vec<String> {
    kernels
        .iter()
        .map(|k| {
            let short = k.short_name();
            if kernels.iter().filter(|o| o.short_name() == short).count() > 1 {
                k.to_string()
            } else {
                short
            }
        })
        .collect()
}

/// Runs `opts.cmd` on each selected kernel, one after the other. Prints headers, the
/// command's output (prefixed), what went wrong and the summary; returns each kernel's run.
pub fn run(opts: &Options) -> Result<Vec<KernelRun>, VmError> {
    let modules_root = Path::new("/lib/modules");
    let installed = kernels::installed(Path::new("/boot"), modules_root);
    let selected = kernels::select(&opts.kernels, &installed, modules_root)?;
    let vng = find_vng().ok_or(VmError::NoVng)?;
    if find_on_path("qemu-system-x86_64").is_none() {
        return Err(VmError::NoQemu);
    }
    let cwd =
        std::env::current_dir().map_err(|e| VmError::Io("the current directory".into(), e))?;
    boot::check_rwdir(&cwd)?;
    for d in &opts.rwdirs {
        boot::check_rwdir(d)?;
    }
    let env = guest_env();
    let labels = labels(&selected);
    boot::catch_stop_signals();
    let mut runs = Vec::new();
    for (kernel, label) in selected.into_iter().zip(labels) {
        if let Some(sig) = boot::stop_signal() {
            println!("== kernel {label}: not booted: interrupted by {sig}");
            break;
        }
        let accel = match opts.kvm {
            KvmMode::Off => Accel::Tcg,
            KvmMode::On => Accel::Kvm,
            KvmMode::Auto => match boot::kvm_boots(&vng, &kernel) {
                Ok(_) => Accel::Kvm,
                Err(why) => {
                    println!("== kernel {label}: KVM does not boot it here ({why}); using TCG");
                    Accel::Tcg
                }
            },
        };
        let mut modules = vec!["nbd".to_string()];
        if kernel.has_module("ublk_drv") {
            modules.push("ublk_drv".into());
        }
        if kernel.modules.is_none() {
            println!(
                "== kernel {label}: warning: no /lib/modules for {}: modprobe nbd will fail in the guest",
                kernel.image.display()
            );
        }
        println!(
            "== kernel {label} ({kernel}): booting {} ({accel}, {} vCPUs, {}), then: {}",
            kernel.image.display(),
            opts.cpus,
            opts.memory,
            opts.cmd
                .iter()
                .map(|a| boot::shell_quote(a))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let b = Boot {
            vng: vng.clone(),
            kernel: kernel.clone(),
            label: format!("[{label}] "),
            cwd: cwd.clone(),
            rwdirs: opts.rwdirs.clone(),
            memory: opts.memory.clone(),
            cpus: opts.cpus,
            timeout: opts.timeout,
            accel,
            env: env.clone(),
            modules,
            cmd: opts.cmd.clone(),
            verbose: opts.verbose,
        };
        let outcome = boot::run(&b)?;
        let run = KernelRun {
            kernel,
            accel,
            outcome,
        };
        if let Some(dir) = &opts.keep_log {
            match keep_logs(dir, &run) {
                Ok(d) => println!("== kernel {label}: console and dmesg in {}", d.display()),
                Err(e) => eprintln!("userblk vm: {e}"),
            }
        }
        print!("{}", explain(&run, &label));
        println!("{}", run.summary());
        runs.push(run);
    }
    Ok(runs)
}

/// Console lines shown when a boot went wrong.
pub const TAIL_LINES: usize = 30;

/// What to show after a kernel's run: the kernel's findings, and the console's last lines when
/// the guest timed out, died or never ran the command.
pub fn explain(run: &KernelRun, label: &str) -> String {
    let mut s = String::new();
    for f in &run.outcome.findings {
        let _ = write!(s, "== kernel {label}: {f}");
    }
    let show_tail = !matches!(run.outcome.ended, Ended::Exited(_) | Ended::Interrupted(_))
        || run.outcome.findings.iter().any(|f| f.problem.fails());
    if show_tail {
        let c = &run.outcome.console;
        let from = c.len().saturating_sub(TAIL_LINES);
        let _ = writeln!(
            s,
            "== kernel {label}: the console's last {} lines:",
            c.len() - from
        );
        for l in &c[from..] {
            let _ = writeln!(s, "  | {l}");
        }
    }
    s
}

/// Writes `DIR/RELEASE/{console.log,dmesg.log}`; returns the directory.
pub fn keep_logs(dir: &Path, run: &KernelRun) -> Result<PathBuf, VmError> {
    let name = run
        .kernel
        .release
        .clone()
        .unwrap_or_else(|| run.kernel.short_name().replace('/', "_"));
    let d = dir.join(name);
    let io = |what: &Path, e| VmError::Io(format!("writing {}", what.display()), e);
    std::fs::create_dir_all(&d).map_err(|e| io(&d, e))?;
    let mut console = format!("# {}\n", run.outcome.command_line);
    for l in &run.outcome.console {
        console.push_str(l);
        console.push('\n');
    }
    let _ = writeln!(console, "# {}", run.summary());
    let p = d.join("console.log");
    std::fs::write(&p, console).map_err(|e| io(&p, e))?;
    let p = d.join("dmesg.log");
    match &run.outcome.dmesg {
        Some(m) => std::fs::write(&p, m).map_err(|e| io(&p, e))?,
        None => {
            // A stale one from an earlier run would mislead.
            let _ = std::fs::remove_file(&p);
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn kernel(release: &str) -> Kernel {
        Kernel {
            release: Some(release.into()),
            image: format!("/boot/vmlinuz-{release}").into(),
            modules: None,
        }
    }

    fn run_with(ended: Ended, findings: Vec<scan::Finding>, console: &[&str]) -> KernelRun {
        KernelRun {
            kernel: kernel("6.12.117+deb12-amd64"),
            accel: Accel::Tcg,
            outcome: Outcome {
                ended,
                elapsed: Duration::from_millis(95_300),
                console: console.iter().map(|s| s.to_string()).collect(),
                dmesg: None,
                findings,
                command_line: "vng ...".into(),
                vng_status: None,
            },
        }
    }

    #[test]
    fn labels_are_series_unless_two_share_one() {
        let ks = [kernel("6.1.0-41-amd64"), kernel("6.12.117+deb12-amd64")];
        assert_eq!(labels(&ks), ["6.1", "6.12"]);
        let ks = [
            kernel("6.12.95+deb12-amd64"),
            kernel("6.12.117+deb12-amd64"),
        ];
        assert_eq!(labels(&ks), ["6.12.95+deb12-amd64", "6.12.117+deb12-amd64"]);
    }

    #[test]
    fn summaries_say_why() {
        let ok = run_with(Ended::Exited(0), vec![], &[]);
        assert_eq!(
            ok.summary(),
            "kernel 6.12 (6.12.117+deb12-amd64, tcg): ok in 95.3 s"
        );
        let failed = run_with(Ended::Exited(101), vec![], &[]);
        assert_eq!(
            failed.summary(),
            "kernel 6.12 (6.12.117+deb12-amd64, tcg): FAILED: the command exited with status 101 after 95.3 s"
        );
        let t = Ended::TimedOut {
            after: Duration::from_secs(60),
            started: true,
        };
        let t = run_with(t, vec![], &[]);
        assert!(
            t.summary()
                .ends_with("FAILED: timed out after 60 s (--timeout), while the command ran"),
            "{}",
            t.summary()
        );
        let panic = scan::scan(
            "[   21.1] Kernel panic - not syncing: sysrq triggered crash\n",
            scan::Source::Console,
        );
        let died = run_with(Ended::DiedDuringCommand, panic, &[]);
        assert!(
            died.summary().ends_with(
                "FAILED: the guest died while the command ran, after 95.3 s [kernel panic]"
            ),
            "{}",
            died.summary()
        );
        let hung = scan::scan(
            "INFO: task fio:1 blocked for more than 120 seconds.\n",
            scan::Source::Dmesg,
        );
        let hung = run_with(Ended::Exited(0), hung, &[]);
        assert!(
            hung.summary().ends_with(
                "FAILED: the command passed but the kernel reported problems [hung task]"
            ),
            "{}",
            hung.summary()
        );
    }

    #[test]
    fn explain_shows_the_console_tail_when_the_guest_went_wrong() {
        let console: Vec<String> = (0..40).map(|i| format!("[ {i}.000000] line {i}")).collect();
        let refs: Vec<&str> = console.iter().map(String::as_str).collect();
        let ended = Ended::TimedOut {
            after: Duration::from_secs(60),
            started: false,
        };
        let t = run_with(ended, vec![], &refs);
        let s = explain(&t, "6.12");
        assert!(s.contains("the console's last 30 lines:"), "{s}");
        assert!(
            s.contains("  | [ 39.000000] line 39") && !s.contains("line 9\n"),
            "{s}"
        );
        // A command that failed on its own: its output said why; no console.
        let f = run_with(Ended::Exited(1), vec![], &refs);
        assert_eq!(explain(&f, "6.12"), "");
    }

    #[test]
    fn logs_are_kept_per_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = run_with(Ended::Exited(0), vec![], &["[ 1.0] boot", "hello"]);
        r.outcome.dmesg = Some("[ 1.0] boot\n".into());
        let d = keep_logs(dir.path(), &r).unwrap();
        assert_eq!(d, dir.path().join("6.12.117+deb12-amd64"));
        let console = std::fs::read_to_string(d.join("console.log")).unwrap();
        assert!(
            console.starts_with("# vng ...\n[ 1.0] boot\nhello\n# kernel 6.12"),
            "{console}"
        );
        assert_eq!(
            std::fs::read_to_string(d.join("dmesg.log")).unwrap(),
            "[ 1.0] boot\n"
        );
    }

    #[test]
    fn the_guest_environment_leaves_out_the_session() {
        let env = guest_env();
        assert!(env
            .iter()
            .all(|(k, _)| k != "PWD" && k != "SSH_AUTH_SOCK" && k != "TMPDIR"));
        if std::env::var_os("PATH").is_some() {
            assert!(env.iter().any(|(k, _)| k == "PATH"));
        }
    }
}
