//! `userblk vm [OPTIONS] -- CMD [ARGS...]`: runs CMD as root in a VM per test kernel (QEMU,
//! virtme-ng) with `nbd` loaded, in the current directory, and reports per kernel;
//! `userblk vm setup` installs what that needs. The work is in [`crate::vm`].

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::vm::kernels::KernelSpec;
use crate::vm::{self, setup, KvmMode, Options};

/// Arguments of `userblk vm`.
#[derive(Debug, clap::Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Examples:\n  userblk vm -- cargo test\n  userblk vm --kernel 6.12 --timeout 10m -- cargo test --test kernel\n  sudo userblk vm setup\n\n\
                  The guest sees the host's / read-only, the current directory (and --rwdir DIRs) read-write at the same \
                  paths, and a writable /tmp of its own. CMD gets this process's environment (less session variables such \
                  as DISPLAY and SSH_AUTH_SOCK) and USERBLK_VM=<kernel series>. Exit status: 0 if CMD passed on every kernel; \
                  1 if it failed, timed out, or a kernel panicked, hung or oopsed on any; 2 for usage or set-up errors."
)]
pub struct Args {
    /// `setup`: install what the VM needs.
    #[command(subcommand)]
    pub action: Option<Action>,
    /// Kernels to boot: series (6.1, 6.12), releases or image paths, comma-separated or repeated.
    /// Default: every installed test kernel (newest of each series whose modules have nbd).
    #[arg(long, value_name = "6.1,6.12|PATH", value_delimiter = ',')]
    pub kernel: Vec<KernelSpec>,
    /// Time per kernel, boot included, before the VM is killed: seconds, or with s, m, h.
    #[arg(long, value_name = "DURATION", default_value = "20m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Guest memory (QEMU syntax: 2G, 512M).
    #[arg(long, default_value = "2G", value_parser = parse_memory)]
    pub memory: String,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub cpus: u32,
    /// Hardware virtualization: auto probes it with a short boot and falls back to TCG.
    #[arg(long, value_enum, default_value_t = KvmMode::Auto)]
    pub kvm: KvmMode,
    /// Keep each boot's console and dmesg in DIR/RELEASE/ (the kernel release).
    #[arg(long, value_name = "DIR")]
    pub keep_log: Option<PathBuf>,
    /// Another host directory the guest may write (e.g. a CARGO_TARGET_DIR outside the current
    /// directory); repeatable.
    #[arg(long, value_name = "DIR")]
    pub rwdir: Vec<PathBuf>,
    /// Show the whole kernel console, not only CMD's output.
    #[arg(long, short)]
    pub verbose: bool,
    /// The command to run in each VM, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub cmd: Vec<OsString>,
}

/// `userblk vm` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Install QEMU, the test kernels, virtme-ng, busybox, fio and e2fsprogs (Debian, Ubuntu);
    /// say which kernels are there and which are missing. Without root, print the commands.
    Setup {
        /// Print the commands even as root.
        #[arg(long)]
        print: bool,
    },
}

/// `600`, `600s`, `10m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (e.g. 600, 90s, 20m, 1h)"))?;
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        _ => None,
    }
    .ok_or_else(|| format!("'{s}' is not a duration (e.g. 600, 90s, 20m, 1h)"))?;
    if secs == 0 {
        return Err("the timeout must be more than 0".into());
    }
    Ok(Duration::from_secs(secs))
}

/// QEMU's memory syntax: a number with an optional K, M, G or T.
pub fn parse_memory(s: &str) -> Result<String, String> {
    let digits = s.trim_end_matches(['K', 'M', 'G', 'T', 'k', 'm', 'g', 't']);
    let ok = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && s.len() - digits.len() <= 1
        && digits.parse::<u64>().is_ok_and(|n| n > 0);
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!("'{s}' is not a memory size (e.g. 2G, 512M)"))
    }
}

/// Runs `userblk vm`.
pub fn run(args: Args) -> ExitCode {
    if let Some(Action::Setup { print }) = args.action {
        return match setup::setup(print) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("userblk vm setup: {e}");
                ExitCode::from(2)
            }
        };
    }
    let opts = Options {
        kernels: args.kernel,
        timeout: args.timeout,
        memory: args.memory,
        cpus: args.cpus,
        kvm: args.kvm,
        keep_log: args.keep_log,
        rwdirs: args.rwdir,
        verbose: args.verbose,
        cmd: args.cmd,
    };
    match vm::run(&opts) {
        Ok(runs) => {
            println!("== summary");
            for r in &runs {
                println!("{}", r.summary());
            }
            if runs.iter().all(|r| r.outcome.passed()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("userblk vm: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        vm: Args,
    }

    fn parse(args: &[&str]) -> Result<Args, String> {
        Cli::try_parse_from(std::iter::once("vm").chain(args.iter().copied()))
            .map(|c| c.vm)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_the_command_after_double_dash() {
        let a = parse(&["--", "cargo", "test", "--", "--nocapture"]).unwrap();
        assert_eq!(a.cmd, ["cargo", "test", "--", "--nocapture"]);
        assert!(a.kernel.is_empty());
        assert_eq!(a.timeout, Duration::from_secs(1200));
        assert_eq!((a.memory.as_str(), a.cpus, a.kvm), ("2G", 2, KvmMode::Auto));
        assert!(a.action.is_none() && a.keep_log.is_none() && !a.verbose);
    }

    #[test]
    fn kernels_are_comma_separated_or_repeated() {
        let a = parse(&[
            "--kernel",
            "6.1,6.12",
            "--kernel",
            "/boot/vmlinuz-x",
            "--",
            "true",
        ])
        .unwrap();
        assert_eq!(
            a.kernel,
            [
                KernelSpec::Name("6.1".into()),
                KernelSpec::Name("6.12".into()),
                KernelSpec::Image("/boot/vmlinuz-x".into())
            ]
        );
        let err = parse(&["--kernel", "newest", "--", "true"]).unwrap_err();
        assert!(err.contains("'newest' is neither"), "{err}");
    }

    #[test]
    fn options() {
        let a = parse(&[
            "--timeout",
            "60",
            "--memory",
            "4G",
            "--cpus",
            "1",
            "--kvm",
            "off",
            "--keep-log",
            "logs",
            "--rwdir",
            "/srv/target",
            "-v",
            "--",
            "sleep",
            "1000",
        ])
        .unwrap();
        assert_eq!(a.timeout, Duration::from_secs(60));
        assert_eq!((a.memory.as_str(), a.cpus, a.kvm), ("4G", 1, KvmMode::Off));
        assert_eq!(a.keep_log, Some(PathBuf::from("logs")));
        assert_eq!(a.rwdir, [PathBuf::from("/srv/target")]);
        assert!(a.verbose);
    }

    #[test]
    fn bad_arguments_are_refused_with_the_reason() {
        let err = parse(&[]).unwrap_err();
        assert!(err.contains("CMD"), "a command is required: {err}");
        let err = parse(&["cargo", "test"]).unwrap_err();
        assert!(
            err.contains("unrecognized subcommand 'cargo'") || err.contains("unexpected argument"),
            "{err}"
        );
        for (args, want) in [
            (
                &["--timeout", "soon", "--", "true"][..],
                "'soon' is not a duration",
            ),
            (&["--timeout", "0", "--", "true"][..], "more than 0"),
            (
                &["--memory", "lots", "--", "true"][..],
                "'lots' is not a memory size",
            ),
            (&["--cpus", "0", "--", "true"][..], "0 is not in 1..=64"),
            (
                &["--kvm", "maybe", "--", "true"][..],
                "invalid value 'maybe'",
            ),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }

    #[test]
    fn setup_is_a_subcommand_and_needs_no_command() {
        let a = parse(&["setup"]).unwrap();
        assert!(matches!(a.action, Some(Action::Setup { print: false })));
        let a = parse(&["setup", "--print"]).unwrap();
        assert!(matches!(a.action, Some(Action::Setup { print: true })));
        // After `--`, "setup" is the command to run, not the subcommand.
        let a = parse(&["--", "setup"]).unwrap();
        assert!(a.action.is_none());
        assert_eq!(a.cmd, ["setup"]);
    }

    #[test]
    fn durations_and_memory_sizes() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("20m"), Ok(Duration::from_secs(1200)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
        assert_eq!(parse_memory("512M"), Ok("512M".into()));
        assert_eq!(parse_memory("2048"), Ok("2048".into()));
        assert!(parse_memory("2GG").is_err());
        assert!(parse_memory("0").is_err());
    }
}
