//! `userblk ublk-setup`: what root does once so that other users can serve unprivileged ublk
//! devices (`UBLK_F_UNPRIVILEGED_DEV`, Linux 6.3+); and `userblk ublk-chown NAME`, the hidden
//! helper its udev rule runs for each new `/dev/ublkcN` and `/dev/ublkbN`.
//!
//! The set-up (idempotent): loads ublk_drv now and at boot, installs a udev rule that opens
//! `/dev/ublk-control` to every user (or one group) and runs this binary's `ublk-chown %k` on
//! each new ublk node, reloads udev, applies the mode to the existing control node, and deletes
//! the unprivileged devices that servers left behind. The rule is ublksrv's
//! (`utils/ublk_dev.rules`) with this binary in place of `ublk_chown.sh` and `ublk_user_id`.

use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use userblk::link::ublk::{self, Abandoned};

/// Where the set-up writes its udev rule.
pub const RULES_PATH: &str = "/etc/udev/rules.d/70-userblk-ublk.rules";
/// Where the set-up asks for ublk_drv at boot.
pub const MODULES_LOAD_PATH: &str = "/etc/modules-load.d/userblk-ublk.conf";

/// Arguments of `userblk ublk-setup`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Run once as root (sudo userblk ublk-setup); then any user (or the users of --group) can serve
a device with `userblk serve ... --transport ublk` and owns its /dev/ublkbN. Needs Linux 6.3+
(Debian 12's 6.1 has no ublk at all; 6.12 has it) and udevd running. What it does:
  modprobe ublk_drv, and ublk_drv in /etc/modules-load.d/userblk-ublk.conf (loaded at boot)
  /etc/udev/rules.d/70-userblk-ublk.rules: /dev/ublk-control mode 0666 (or 0660 and --group),
    and `<this binary> ublk-chown %k` for each new /dev/ublkcN and /dev/ublkbN, which gives both
    to the user and group the kernel recorded as the device's owner
  udevadm control --reload; /dev/ublk-control gets its mode now
  deletes unprivileged devices whose server died before starting them
Running it again changes nothing that is already so. Without root it prints what it would do.
The rule runs this binary by its absolute path: keep it there (or run the set-up again).")]
pub struct Args {
    /// Open /dev/ublk-control to this group only (mode 0660) instead of every user (0666).
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
    /// Print what would be done, and do nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// The userblk binary the udev rule runs (default: this one).
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
}

/// Arguments of the hidden `userblk ublk-chown`.
#[derive(Debug, clap::Args)]
pub struct ChownArgs {
    /// The kernel's name of the new node (udev's %k): ublkcN or ublkbN.
    #[arg(value_name = "NAME")]
    pub name: String,
}

/// Why the set-up cannot be planned.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SetupError {
    /// The binary's path cannot go into a udev rule.
    #[error(
        "{0}: the udev rule runs userblk by an absolute path without spaces, quotes, '%' or '$'; \
         pass --binary with such a path (e.g. copy userblk to /usr/local/bin)"
    )]
    BadBinary(String),
    /// The group named does not exist.
    #[error("no group named {0:?} (create it with `groupadd {0}`, or leave --group out)")]
    NoSuchGroup(String),
    /// A kernel name that is not a ublk node.
    #[error("{0:?} is not a ublk device node name (ublkcN or ublkbN)")]
    NotUblk(String),
}

/// The udev rule: ublksrv's `utils/ublk_dev.rules`, with `binary ublk-chown %k` as the helper.
pub fn rule_text(binary: &Path, group: Option<&str>) -> String {
    let control = match group {
        Some(g) => format!("GROUP=\"{g}\", MODE=\"0660\""),
        None => "MODE=\"0666\"".to_owned(),
    };
    format!(
        "# Written by `userblk ublk-setup`: unprivileged ublk devices (UBLK_F_UNPRIVILEGED_DEV).\n\
         # /dev/ublk-control for {who}; each new /dev/ublkcN and /dev/ublkbN to the user and\n\
         # group the kernel recorded as the device's owner (devices root adds stay root's).\n\
         KERNEL==\"ublk-control\", {control}, OPTIONS+=\"static_node=ublk-control\"\n\
         ACTION==\"add\", KERNEL==\"ublk[bc][0-9]*\", RUN+=\"{bin} ublk-chown %k\"\n",
        who = match group {
            Some(g) => format!("the users of group {g}"),
            None => "every user".to_owned(),
        },
        bin = binary.display(),
    )
}

/// The device id in a node name (`ublkc3`, `ublkb3`: 3).
pub fn node_id(name: &str) -> Result<u32, SetupError> {
    name.strip_prefix("ublkc")
        .or_else(|| name.strip_prefix("ublkb"))
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| SetupError::NotUblk(name.to_owned()))
}

/// Whether `binary` can go into the rule as it is.
pub fn check_binary(binary: &Path) -> Result<(), SetupError> {
    let text = binary.to_str().unwrap_or("");
    let bad = !binary.is_absolute()
        || text.is_empty()
        || text
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '"' | '\'' | '%' | '$' | '\\'));
    if bad {
        return Err(SetupError::BadBinary(binary.display().to_string()));
    }
    Ok(())
}

/// One step of the set-up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Run a command; `must` says whether its failure fails the set-up.
    Run {
        /// The command and its arguments.
        argv: Vec<String>,
        /// Whether its failure fails the set-up.
        must: bool,
    },
    /// Write a file (unless it already says this).
    Write {
        /// Where.
        path: PathBuf,
        /// What.
        contents: String,
    },
    /// Give `/dev/ublk-control` the rule's mode (and group) now.
    ControlAccess {
        /// The group, or every user.
        group: Option<String>,
    },
    /// Delete unprivileged devices whose server died before starting them.
    RemoveAbandoned,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Run { argv, .. } => write!(f, "run: {}", argv.join(" ")),
            Step::Write { path, contents } => {
                write!(f, "write {}:", path.display())?;
                for line in contents.lines() {
                    write!(f, "\n    {line}")?;
                }
                Ok(())
            }
            Step::ControlAccess { group: Some(g) } => {
                write!(
                    f,
                    "chgrp {g} /dev/ublk-control; chmod 0660 /dev/ublk-control"
                )
            }
            Step::ControlAccess { group: None } => write!(f, "chmod 0666 /dev/ublk-control"),
            Step::RemoveAbandoned => write!(
                f,
                "delete unprivileged ublk devices whose server died before starting them"
            ),
        }
    }
}

fn run(argv: &[&str], must: bool) -> Step {
    Step::Run {
        argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        must,
    }
}

/// The set-up's steps, in order.
pub fn plan(binary: &Path, group: Option<&str>) -> Vec<Step> {
    vec![
        run(&["modprobe", "ublk_drv"], true),
        Step::Write {
            path: MODULES_LOAD_PATH.into(),
            contents: "# Written by `userblk ublk-setup`.\nublk_drv\n".into(),
        },
        Step::Write {
            path: RULES_PATH.into(),
            contents: rule_text(binary, group),
        },
        run(&["udevadm", "control", "--reload"], true),
        run(
            &[
                "udevadm",
                "trigger",
                "--action=add",
                "--sysname-match=ublk-control",
            ],
            false,
        ),
        Step::ControlAccess {
            group: group.map(str::to_owned),
        },
        Step::RemoveAbandoned,
    ]
}

fn group_id(name: &str) -> Result<u32, SetupError> {
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        _ => Err(SetupError::NoSuchGroup(name.to_owned())),
    }
}

/// Carries out one step: what it did, or why it failed.
fn execute(step: &Step) -> Result<String, String> {
    match step {
        Step::Run { argv, .. } => {
            let out = Command::new(&argv[0])
                .args(&argv[1..])
                .output()
                .map_err(|e| format!("{}: {e}", argv[0]))?;
            if out.status.success() {
                Ok(format!("ran {}", argv.join(" ")))
            } else {
                Err(format!(
                    "{} failed ({}): {}",
                    argv.join(" "),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        }
        Step::Write { path, contents } => {
            if fs::read_to_string(path).is_ok_and(|old| old == *contents) {
                return Ok(format!("{} is up to date", path.display()));
            }
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            }
            fs::write(path, contents).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(format!("wrote {}", path.display()))
        }
        Step::ControlAccess { group } => {
            let control = Path::new(ublk::CONTROL_PATH);
            let mode = if let Some(g) = group {
                let gid = group_id(g).map_err(|e| e.to_string())?;
                std::os::unix::fs::chown(control, None, Some(gid))
                    .map_err(|e| format!("chgrp {g} {}: {e}", control.display()))?;
                0o660
            } else {
                0o666
            };
            fs::set_permissions(control, fs::Permissions::from_mode(mode))
                .map_err(|e| format!("chmod {mode:o} {}: {e}", control.display()))?;
            Ok(format!("{} has mode {mode:o}", control.display()))
        }
        Step::RemoveAbandoned => {
            let found = ublk::remove_abandoned().map_err(|e| e.to_string())?;
            let deleted: Vec<String> = found
                .iter()
                .filter_map(|a| match a {
                    Abandoned::Deleted(id) => Some(format!("ublk{id}")),
                    Abandoned::Kept(..) => None,
                })
                .collect();
            Ok(if deleted.is_empty() {
                "no abandoned unprivileged device".to_owned()
            } else {
                format!("deleted abandoned devices: {}", deleted.join(", "))
            })
        }
    }
}

/// Runs `userblk ublk-setup`.
pub fn run_setup(args: Args) -> ExitCode {
    let binary = match args.binary.clone().map_or_else(std::env::current_exe, Ok) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("userblk ublk-setup: cannot tell where this binary is ({e}): pass --binary");
            return ExitCode::FAILURE;
        }
    };
    let checked = check_binary(&binary).and_then(|()| match &args.group {
        Some(g) => group_id(g).map(drop),
        None => Ok(()),
    });
    if let Err(e) = checked {
        eprintln!("userblk ublk-setup: {e}");
        return ExitCode::FAILURE;
    }
    let steps = plan(&binary, args.group.as_deref());
    let root = nix::unistd::geteuid().is_root();
    if args.dry_run || !root {
        if !root && !args.dry_run {
            println!("userblk ublk-setup: not root, so nothing was done; as root it would:");
        } else {
            println!("userblk ublk-setup would:");
        }
        for step in &steps {
            println!("  {step}");
        }
        return if root || args.dry_run {
            ExitCode::SUCCESS
        } else {
            println!("run it with sudo: sudo {} ublk-setup", binary.display());
            ExitCode::FAILURE
        };
    }
    let mut failed = false;
    for step in &steps {
        match execute(step) {
            Ok(done) => println!("userblk ublk-setup: {done}"),
            Err(why) => {
                let must = !matches!(step, Step::Run { must: false, .. });
                eprintln!(
                    "userblk ublk-setup: {}{why}",
                    if must { "" } else { "warning: " }
                );
                if matches!(step, Step::Run { argv, .. } if argv[0] == "udevadm") {
                    eprintln!(
                        "userblk ublk-setup: is udevd running? The rule is installed, but only \
                         udevd applies it: without it no device is handed to its owner"
                    );
                }
                failed |= must;
            }
        }
    }
    if failed {
        return ExitCode::FAILURE;
    }
    println!(
        "userblk ublk-setup: done: {} may now serve ublk devices as themselves",
        args.group
            .as_deref()
            .map_or("every user".to_owned(), |g| format!(
                "the users of group {g}"
            ))
    );
    ExitCode::SUCCESS
}

/// Runs the hidden `userblk ublk-chown NAME`: gives `/dev/ublkcN` and `/dev/ublkbN` (those that
/// exist) to the owner the kernel recorded for device N, if it is unprivileged.
pub fn run_chown(args: ChownArgs) -> ExitCode {
    let result = node_id(&args.name)
        .map_err(|e| e.to_string())
        .and_then(|id| {
            let owner = ublk::device_owner(id).map_err(|e| e.to_string())?;
            let Some((uid, gid)) = owner else {
                return Ok(());
            };
            for node in [ublk::char_device_path(id), ublk::block_device_path(id)] {
                if node.exists() {
                    std::os::unix::fs::chown(&node, Some(uid), Some(gid))
                        .map_err(|e| format!("chown {uid}:{gid} {}: {e}", node.display()))?;
                }
            }
            Ok(())
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("userblk ublk-chown {}: {e}", args.name);
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_hands_nodes_over_with_this_binary() {
        let text = rule_text(Path::new("/usr/local/bin/userblk"), None);
        assert_eq!(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>(),
            [
                r#"KERNEL=="ublk-control", MODE="0666", OPTIONS+="static_node=ublk-control""#,
                r#"ACTION=="add", KERNEL=="ublk[bc][0-9]*", RUN+="/usr/local/bin/userblk ublk-chown %k""#,
            ]
        );
        let text = rule_text(Path::new("/opt/userblk"), Some("ublk"));
        assert!(
            text.contains(r#"KERNEL=="ublk-control", GROUP="ublk", MODE="0660", "#),
            "{text}"
        );
        assert!(text.contains("the users of group ublk"), "{text}");
    }

    #[test]
    fn node_names() {
        assert_eq!(node_id("ublkc0"), Ok(0));
        assert_eq!(node_id("ublkb17"), Ok(17));
        for bad in [
            "ublk-control",
            "ublkc",
            "ublkc-1",
            "ublkd3",
            "nbd0",
            "ublkc3p1",
        ] {
            assert_eq!(node_id(bad), Err(SetupError::NotUblk(bad.into())), "{bad}");
        }
        assert!(SetupError::NotUblk("x".into())
            .to_string()
            .contains("ublkcN or ublkbN"));
    }

    #[test]
    fn only_a_plain_absolute_binary_path_goes_into_the_rule() {
        check_binary(Path::new("/work/target/release/userblk")).unwrap();
        for bad in [
            "userblk",
            "target/userblk",
            "/my dir/userblk",
            "/a\"b",
            "/a%k",
            "/$HOME/u",
        ] {
            let e = check_binary(Path::new(bad)).unwrap_err().to_string();
            assert!(e.contains("pass --binary"), "{bad}: {e}");
        }
        let e = group_id("no-such-group-userblk").unwrap_err().to_string();
        assert!(e.contains("groupadd no-such-group-userblk"), "{e}");
    }

    #[test]
    fn the_plan_loads_installs_reloads_and_cleans_up() {
        let steps = plan(Path::new("/usr/bin/userblk"), Some("disk"));
        let text: Vec<String> = steps.iter().map(ToString::to_string).collect();
        assert_eq!(text[0], "run: modprobe ublk_drv");
        assert!(text[1].starts_with("write /etc/modules-load.d/userblk-ublk.conf:"));
        assert!(text[1].ends_with("\n    ublk_drv"), "{}", text[1]);
        assert!(text[2].starts_with("write /etc/udev/rules.d/70-userblk-ublk.rules:"));
        assert!(text[2].contains("RUN+=\"/usr/bin/userblk ublk-chown %k\""));
        assert_eq!(text[3], "run: udevadm control --reload");
        assert!(text[4].contains("--sysname-match=ublk-control"));
        assert_eq!(
            text[5],
            "chgrp disk /dev/ublk-control; chmod 0660 /dev/ublk-control"
        );
        assert!(text[6].contains("delete unprivileged ublk devices"));
        // A failing trigger is a warning; a failing reload (no udevd) fails the set-up.
        assert!(matches!(&steps[3], Step::Run { must: true, .. }));
        assert!(matches!(&steps[4], Step::Run { must: false, .. }));
    }

    /// Writing is idempotent: the same contents are left as they are.
    #[test]
    fn writing_twice_changes_nothing() {
        let dir = std::env::temp_dir().join(format!("userblk-setup-{}", std::process::id()));
        let step = Step::Write {
            path: dir.join("rules.d/70-userblk-ublk.rules"),
            contents: rule_text(Path::new("/usr/bin/userblk"), None),
        };
        assert!(execute(&step).unwrap().starts_with("wrote "));
        assert!(execute(&step).unwrap().ends_with("is up to date"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
