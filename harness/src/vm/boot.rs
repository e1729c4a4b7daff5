//! Boots one kernel under QEMU with virtme-ng and runs one command in it: the guest-side
//! wrapper script, the `vng` command line, streaming the guest's output with a prefix, the
//! timeout, and what is left afterwards (exit status, console, dmesg, findings).
//!
//! What the guest sees (virtme-ng): the host's `/` read-only over 9p, so host binaries run as
//! they are; a writable overlay on `/tmp`, `/etc`, `/var`, `/home`... that the host does not see;
//! each `--rwdir` read-write at its own path. CMD's stdout is vng's stdout; its stderr and the
//! serial console (the kernel log) both arrive on vng's stderr, where kernel lines carry a
//! `[    1.234567] ` time stamp and the wrapper writes a marker line before CMD starts.

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, Once, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, SigSet, Signal};
use nix::unistd::Pid;

use super::kernels::Kernel;
use super::scan::{self, Finding, Source};
use super::VmError;

/// The line the guest wrapper writes to stderr just before CMD: CMD's stderr follows it.
pub const START_MARKER: &str = "userblk-vm: starting the command";

/// How the guest CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// QEMU's software emulation (TCG): slow, works everywhere.
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// One boot.
#[derive(Clone, Debug)]
pub struct Boot {
    /// The `vng` to run.
    pub vng: PathBuf,
    /// The kernel.
    pub kernel: Kernel,
    /// Prefix of every output line (`[6.12] `).
    pub label: String,
    /// The directory CMD runs in; shared read-write.
    pub cwd: PathBuf,
    /// More directories shared read-write.
    pub rwdirs: Vec<PathBuf>,
    /// Guest memory (qemu -m syntax, `2G`).
    pub memory: String,
    /// Guest vCPUs.
    pub cpus: u32,
    /// Time for the whole boot, command included, before the VM is killed.
    pub timeout: Duration,
    /// How the guest CPU runs.
    pub accel: Accel,
    /// Environment of CMD in the guest (it does not inherit the host's).
    pub env: Vec<(OsString, OsString)>,
    /// Kernel modules to load before CMD (`nbd`); loading failure is fatal.
    pub modules: Vec<String>,
    /// The command.
    pub cmd: Vec<OsString>,
    /// Copy the whole console to stderr (prefixed), not just CMD's stderr.
    pub verbose: bool,
}

/// How a boot ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ended {
    /// CMD ran and exited with this status.
    Exited(i32),
    /// Loading a module the run needs failed (its message).
    ModuleFailed(String),
    /// The timeout passed; the VM was killed. `started`: CMD had begun (else it was still
    /// booting).
    TimedOut {
        /// The timeout.
        after: Duration,
        /// Whether CMD had started.
        started: bool,
    },
    /// We were asked to stop (this signal); the VM was killed.
    Interrupted(&'static str),
    /// The guest went down while CMD ran (a panic, usually).
    DiedDuringCommand,
    /// The guest never started CMD (no boot).
    NeverStarted,
}

/// What a boot left.
#[derive(Debug)]
pub struct Outcome {
    /// How it ended.
    pub ended: Ended,
    /// From start to end.
    pub elapsed: Duration,
    /// vng's stderr, line by line: the console and CMD's stderr.
    pub console: Vec<String>,
    /// The guest's dmesg after CMD (none if CMD never returned).
    pub dmesg: Option<String>,
    /// What the kernel logs reported.
    pub findings: Vec<Finding>,
    /// The vng command line, for the log.
    pub command_line: String,
    /// How vng itself exited (None if it was killed).
    pub vng_status: Option<ExitStatus>,
}

impl Outcome {
    /// Whether the run on this kernel counts as passed.
    pub fn passed(&self) -> bool {
        self.ended == Ended::Exited(0) && !self.findings.iter().any(|f| f.problem.fails())
    }
}

/// Quotes `s` for bash: one single-quoted word.
pub fn shell_quote(s: &OsStr) -> String {
    let bytes = s.as_bytes();
    if !bytes.is_empty()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(b))
    {
        return String::from_utf8_lossy(bytes).into_owned();
    }
    let text = String::from_utf8_lossy(bytes);
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// Whether `name` can be exported by a shell.
fn valid_env_name(name: &OsStr) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && !b[0].is_ascii_digit()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// The guest wrapper: exports the environment, loads the modules, writes the marker, runs CMD
/// in `cwd`, saves dmesg and CMD's status into `state`.
pub fn guest_script(boot: &Boot, state: &Path) -> String {
    let q = |p: &Path| shell_quote(p.as_os_str());
    let st = q(state);
    let mut s = String::from("#!/bin/bash\n# Written by userblk vm: runs in the guest.\n");
    for (k, v) in &boot.env {
        if valid_env_name(k) {
            let _ = writeln!(s, "export {}={}", k.to_string_lossy(), shell_quote(v));
        }
    }
    let _ = writeln!(
        s,
        "export USERBLK_VM={}",
        shell_quote(OsStr::new(&boot.kernel.short_name()))
    );
    let _ = writeln!(s, ": >{st}/booted");
    for m in &boot.modules {
        let m = shell_quote(OsStr::new(m));
        let _ = writeln!(
            s,
            "if ! out=$(modprobe {m} 2>&1); then printf '%s\\n' \"$out\" >{st}/module-failed; echo {m} >>{st}/module-failed; exit 125; fi"
        );
    }
    let _ = writeln!(s, "cd {} || exit 125", q(&boot.cwd));
    let _ = writeln!(s, ": >{st}/started");
    let _ = writeln!(s, "echo {} >&2", shell_quote(OsStr::new(START_MARKER)));
    let cmd: Vec<String> = boot.cmd.iter().map(|a| shell_quote(a)).collect();
    let _ = writeln!(s, "{} </dev/null", cmd.join(" "));
    let _ = writeln!(s, "rc=$?");
    let _ = writeln!(s, "dmesg >{st}/dmesg 2>&1");
    let _ = writeln!(s, "echo \"$rc\" >{st}/status");
    let _ = writeln!(s, "exit \"$rc\"");
    s
}

/// `vng`'s arguments for this boot.
pub fn vng_args(boot: &Boot, state: &Path, script: &Path) -> Result<Vec<OsString>, VmError> {
    let mut a: Vec<OsString> = ["--verbose", "--run"].map(OsString::from).to_vec();
    a.push(boot.kernel.image.clone().into_os_string());
    if boot.accel == Accel::Tcg {
        a.push("--disable-kvm".into());
    }
    a.extend(["--force-9p", "--memory"].map(OsString::from));
    a.push(boot.memory.clone().into());
    a.push("--cpus".into());
    a.push(boot.cpus.to_string().into());
    let mut dirs = vec![boot.cwd.as_path()];
    dirs.extend(boot.rwdirs.iter().map(PathBuf::as_path));
    dirs.push(state);
    for d in dirs {
        check_rwdir(d)?;
        let mut arg = OsString::from("--rwdir=");
        arg.push(d);
        a.push(arg);
    }
    a.push("--cwd".into());
    a.push(boot.cwd.clone().into_os_string());
    a.push("--exec".into());
    a.push(format!("/bin/bash {}", shell_quote(script.as_os_str())).into());
    Ok(a)
}

/// vng's `--rwdir` takes `path` or `guest=host`, and the kernel command line carries it: no `=`,
/// `,`, spaces or quotes, and not `/` itself.
pub fn check_rwdir(dir: &Path) -> Result<(), VmError> {
    let bad = dir
        .as_os_str()
        .as_bytes()
        .iter()
        .any(|b| b"=, \t\n\"'`".contains(b))
        || dir == Path::new("/")
        || !dir.is_absolute();
    if bad {
        return Err(VmError::BadDirectory(dir.to_path_buf()));
    }
    Ok(())
}

/// Reads `from` line by line (lossy UTF-8), handing each line to `each`.
fn pump(from: impl Read, mut each: impl FnMut(String)) {
    let mut r = BufReader::new(from);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                while buf.last().is_some_and(|&b| b == b'\n' || b == b'\r') {
                    buf.pop();
                }
                each(String::from_utf8_lossy(&buf).into_owned());
            }
        }
    }
}

/// The signal (SIGINT, SIGTERM, SIGHUP) that asked us to stop, or 0.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);
/// The process group of the VM running now, or 0.
static VM_GROUP: AtomicI32 = AtomicI32::new(0);

/// Catches SIGINT, SIGTERM and SIGHUP for the whole process: the VM runs in a process group of
/// its own (so that a timeout can kill QEMU with vng), where a Ctrl+C at the terminal would not
/// reach it. A thread waits for them and stops the VM; [`run`] then reports the boot as
/// interrupted. Call before starting other threads (they inherit the blocked mask; children do
/// not: std resets it when it spawns).
pub fn catch_stop_signals() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let set = SigSet::from_iter([Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP]);
        if set.thread_block().is_err() {
            return;
        }
        thread::spawn(move || {
            while let Ok(sig) = set.wait() {
                STOP_SIGNAL.store(sig as i32, Ordering::SeqCst);
                let group = VM_GROUP.load(Ordering::SeqCst);
                if group > 0 {
                    let _ = killpg(Pid::from_raw(group), Signal::SIGTERM);
                }
            }
        });
    });
}

/// The signal that asked us to stop, if one did.
pub fn stop_signal() -> Option<Signal> {
    Signal::try_from(STOP_SIGNAL.load(Ordering::SeqCst)).ok()
}

/// Sends `sig` to the child's process group (vng and the QEMU it started).
fn signal_group(child: &Child, sig: Signal) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = killpg(Pid::from_raw(pid), sig);
    }
}

/// Waits for `child` until `deadline`; then SIGTERM to its group, and SIGKILL 10 s later.
/// `None` status: it had to be killed.
fn wait_until(child: &mut Child, deadline: Instant) -> (Option<ExitStatus>, bool) {
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return (Some(st), false),
            Ok(None) if Instant::now() < deadline && stop_signal().is_none() => {
                thread::sleep(Duration::from_millis(100))
            }
            Ok(None) | Err(_) => break,
        }
    }
    signal_group(child, Signal::SIGTERM);
    let grace = Instant::now() + Duration::from_secs(10);
    while Instant::now() < grace {
        if let Ok(Some(_)) = child.try_wait() {
            // vng is gone; make sure QEMU is too.
            signal_group(child, Signal::SIGKILL);
            return (None, true);
        }
        thread::sleep(Duration::from_millis(100));
    }
    signal_group(child, Signal::SIGKILL);
    let _ = child.wait();
    (None, true)
}

/// Boots, runs the command, and reports. Output streams to our stdout and stderr as it comes,
/// each line prefixed with `boot.label`.
pub fn run(boot: &Boot) -> Result<Outcome, VmError> {
    let state_dir = tempfile::Builder::new()
        .prefix("userblk-vm.")
        .tempdir()
        .map_err(|e| VmError::Io("creating a state directory".into(), e))?;
    let state = state_dir.path().to_path_buf();
    let script = state.join("guest.sh");
    fs::write(&script, guest_script(boot, &state))
        .map_err(|e| VmError::Io(format!("writing {}", script.display()), e))?;
    let args = vng_args(boot, &state, &script)?;
    let command_line = std::iter::once(boot.vng.as_os_str())
        .chain(args.iter().map(OsString::as_os_str))
        .map(shell_quote)
        .collect::<Vec<_>>()
        .join(" ");

    // vng runs virtme-run and friends by name: they live beside it.
    let mut path = OsString::new();
    if let Some(dir) = fs::canonicalize(&boot.vng)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        path.push(dir);
        path.push(":");
    }
    path.push(std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()));

    let started = Instant::now();
    let mut child = Command::new(&boot.vng)
        .args(&args)
        .env("PATH", path)
        .current_dir(&boot.cwd)
        .stdin(Stdio::null())
        // Pipes, not files: QEMU reopens the guest's output path with O_TRUNC, which would wipe
        // what was written before when our stdout is a file (a CI log).
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that a timeout kills QEMU with it.
        .process_group(0)
        .spawn()
        .map_err(|e| VmError::Spawn(boot.vng.clone(), e))?;
    VM_GROUP.store(i32::try_from(child.id()).unwrap_or(0), Ordering::SeqCst);

    let label = boot.label.clone();
    let out = child.stdout.take();
    let out_thread = thread::spawn(move || {
        if let Some(out) = out {
            pump(out, |line| {
                let mut o = io::stdout().lock();
                let _ = writeln!(o, "{label}{line}");
                let _ = o.flush();
            });
        }
    });
    let console = Arc::new(Mutex::new(Vec::<String>::new()));
    let err = child.stderr.take();
    let (label, verbose, lines) = (boot.label.clone(), boot.verbose, Arc::clone(&console));
    let err_thread = thread::spawn(move || {
        let mut in_cmd = false;
        if let Some(err) = err {
            pump(err, |line| {
                let kernel = scan::kernel_text(&line, Source::Console).is_some();
                if verbose || (in_cmd && !kernel) {
                    let mut e = io::stderr().lock();
                    let _ = writeln!(e, "{label}{line}");
                    let _ = e.flush();
                }
                if !kernel && line == START_MARKER {
                    in_cmd = true;
                }
                lines
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(line);
            });
        }
    });

    let (vng_status, timed_out) = wait_until(&mut child, started + boot.timeout);
    VM_GROUP.store(0, Ordering::SeqCst);
    let elapsed = started.elapsed();
    let _ = out_thread.join();
    let _ = err_thread.join();
    let console = std::mem::take(&mut *console.lock().unwrap_or_else(PoisonError::into_inner));

    let read = |name: &str| fs::read_to_string(state.join(name)).ok();
    let dmesg = read("dmesg");
    let status = read("status").and_then(|s| s.trim().parse::<i32>().ok());
    let ended = if let Some(code) = status {
        Ended::Exited(code)
    } else if let Some(msg) = read("module-failed") {
        Ended::ModuleFailed(msg.trim().replace('\n', "; "))
    } else if let Some(sig) = stop_signal() {
        Ended::Interrupted(sig.as_str())
    } else if timed_out {
        Ended::TimedOut {
            after: boot.timeout,
            started: state.join("started").exists(),
        }
    } else if state.join("started").exists() {
        Ended::DiedDuringCommand
    } else {
        Ended::NeverStarted
    };
    let findings = scan::merge(
        scan::scan(&console.join("\n"), Source::Console),
        dmesg
            .as_deref()
            .map(|d| scan::scan(d, Source::Dmesg))
            .unwrap_or_default(),
    );
    Ok(Outcome {
        ended,
        elapsed,
        console,
        dmesg,
        findings,
        command_line,
        vng_status,
    })
}

/// Whether KVM boots `kernel`: a short boot running `true`. Here it fails at once (QEMU asserts
/// in kvm_buf_set_msrs); where KVM works it takes seconds.
pub fn kvm_boots(vng: &Path, kernel: &Kernel) -> Result<bool, String> {
    let kvm = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    if let Err(e) = kvm {
        return Err(format!("/dev/kvm: {e}"));
    }
    let mut path = OsString::new();
    if let Some(dir) = fs::canonicalize(vng)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        path.push(dir);
        path.push(":");
    }
    path.push(std::env::var_os("PATH").unwrap_or_default());
    let mut child = Command::new(vng)
        .args(["--run"])
        .arg(&kernel.image)
        .args(["--force-9p", "--memory", "512M", "--exec", "true"])
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("running {}: {e}", vng.display()))?;
    let err = child.stderr.take();
    let tail = thread::spawn(move || {
        let mut last = Vec::new();
        if let Some(err) = err {
            pump(err, |l| {
                last.push(l);
                if last.len() > 3 {
                    last.remove(0);
                }
            });
        }
        last
    });
    let (status, killed) = wait_until(&mut child, Instant::now() + Duration::from_secs(60));
    let last = tail.join().unwrap_or_default();
    match status {
        Some(s) if s.success() => Ok(true),
        _ if killed => Err("the probe boot did not finish within 60 s".into()),
        // QEMU's own words, e.g. "error: failed to set MSR 0x10a": the line with "error".
        _ => Err(last
            .iter()
            .find(|l| l.contains("error"))
            .or(last.last())
            .cloned()
            .unwrap_or_else(|| "the probe boot failed".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot() -> Boot {
        Boot {
            vng: "/opt/userblk-vm/venv/bin/vng".into(),
            kernel: Kernel {
                release: Some("6.12.117+deb12-amd64".into()),
                image: "/boot/vmlinuz-6.12.117+deb12-amd64".into(),
                modules: None,
            },
            label: "[6.12] ".into(),
            cwd: "/work/my driver".into(),
            rwdirs: vec!["/work/target".into()],
            memory: "2G".into(),
            cpus: 2,
            timeout: Duration::from_secs(60),
            accel: Accel::Tcg,
            env: vec![
                ("PATH".into(), "/root/.cargo/bin:/usr/bin".into()),
                ("QUOTE".into(), "it's".into()),
                ("BAD-NAME".into(), "x".into()),
            ],
            modules: vec!["nbd".into()],
            cmd: vec!["cargo".into(), "test".into(), "a b".into()],
            verbose: false,
        }
    }

    #[test]
    fn quoting_keeps_words_whole() {
        assert_eq!(shell_quote(OsStr::new("cargo")), "cargo");
        assert_eq!(shell_quote(OsStr::new("a b")), "'a b'");
        assert_eq!(shell_quote(OsStr::new("it's")), r"'it'\''s'");
        assert_eq!(shell_quote(OsStr::new("")), "''");
        assert_eq!(shell_quote(OsStr::new("$HOME")), "'$HOME'");
    }

    #[test]
    fn the_guest_script_exports_loads_marks_and_runs() {
        let s = guest_script(&boot(), Path::new("/tmp/userblk-vm.x"));
        assert!(s.contains("export PATH=/root/.cargo/bin:/usr/bin\n"), "{s}");
        assert!(s.contains(r"export QUOTE='it'\''s'"), "{s}");
        assert!(!s.contains("BAD-NAME"), "{s}");
        assert!(s.contains("export USERBLK_VM=6.12\n"), "{s}");
        assert!(s.contains("modprobe nbd"), "{s}");
        assert!(s.contains("cd '/work/my driver' || exit 125"), "{s}");
        let marker = s.find(START_MARKER).unwrap();
        let cmd = s.find("cargo test 'a b' </dev/null").unwrap();
        let modprobe = s.find("modprobe nbd").unwrap();
        assert!(modprobe < marker && marker < cmd, "{s}");
        assert!(s.contains("echo \"$rc\" >/tmp/userblk-vm.x/status"), "{s}");
    }

    #[test]
    fn vng_arguments() {
        let mut b = boot();
        b.cwd = "/work/driver".into();
        let a = vng_args(&b, Path::new("/tmp/s"), Path::new("/tmp/s/guest.sh")).unwrap();
        let a: Vec<String> = a.iter().map(|s| s.to_string_lossy().into_owned()).collect();
        assert_eq!(
            a.join(" "),
            "--verbose --run /boot/vmlinuz-6.12.117+deb12-amd64 --disable-kvm --force-9p --memory 2G --cpus 2 \
             --rwdir=/work/driver --rwdir=/work/target --rwdir=/tmp/s --cwd /work/driver --exec /bin/bash /tmp/s/guest.sh"
        );
        b.accel = Accel::Kvm;
        let a = vng_args(&b, Path::new("/tmp/s"), Path::new("/tmp/s/guest.sh")).unwrap();
        assert!(!a.iter().any(|s| s == "--disable-kvm"));
    }

    #[test]
    fn directories_vng_cannot_share_are_refused() {
        for bad in ["/work/my driver", "/a=b", "/a,b", "/", "relative"] {
            let err = check_rwdir(Path::new(bad)).unwrap_err();
            assert!(matches!(err, VmError::BadDirectory(_)), "{bad}: {err}");
        }
        check_rwdir(Path::new("/work/wt/vm")).unwrap();
        let mut b = boot();
        b.cwd = "/work/my driver".into();
        assert!(vng_args(&b, Path::new("/tmp/s"), Path::new("/tmp/s/g")).is_err());
    }

    #[test]
    fn passing_needs_a_zero_status_and_no_failing_finding() {
        let finding = |problem| Finding {
            problem,
            line: "x".into(),
            context: vec![],
        };
        let mut o = Outcome {
            ended: Ended::Exited(0),
            elapsed: Duration::ZERO,
            console: vec![],
            dmesg: None,
            findings: vec![],
            command_line: String::new(),
            vng_status: None,
        };
        assert!(o.passed());
        o.findings.push(finding(scan::Problem::Warning));
        assert!(o.passed(), "a warning alone does not fail");
        o.findings.push(finding(scan::Problem::HungTask));
        assert!(!o.passed());
        o.findings.clear();
        o.ended = Ended::Exited(101);
        assert!(!o.passed());
        o.ended = Ended::TimedOut {
            after: Duration::from_secs(60),
            started: true,
        };
        assert!(!o.passed());
    }
}
