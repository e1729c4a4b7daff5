//! [`UblkError`]: why the ublk link could not add, start, serve or remove a device, each variant
//! saying what to do about it.

use std::io;

/// Why a ublk device could not be set up, served or removed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UblkError {
    /// The kernel has no ublk driver loaded.
    #[error(
        "the ublk_drv kernel module is not loaded: run `modprobe ublk_drv` as root \
         (Linux 6.0+ built with CONFIG_BLK_DEV_UBLK; Debian's 6.1 kernel lacks it, 6.12 has it)"
    )]
    ModuleNotLoaded,
    /// The driver is loaded but its control node is missing.
    #[error(
        "{path} is missing although ublk_drv is loaded: mount devtmpfs on /dev or create the \
         node from /sys/class/misc/ublk-control/dev with mknod"
    )]
    ControlMissing {
        /// The node looked for.
        path: String,
    },
    /// The caller may not do what it asked.
    #[error(
        "permission denied for {what}: ublk devices need CAP_SYS_ADMIN (run as root) unless \
         created unprivileged, which needs Linux 6.3+ and the set-up `sudo userblk ublk-setup` \
         (read-write access to /dev/ublk-control, and a udev rule handing each device to its owner)"
    )]
    PermissionDenied {
        /// What was refused, e.g. "ADD_DEV" or "/dev/ublk-control".
        what: String,
    },
    /// The device id asked for is in use.
    #[error(
        "ublk device {id} already exists: pick another id (--ublk-id) or let the kernel choose"
    )]
    IdTaken {
        /// The id asked for.
        id: u32,
    },
    /// The running kernel lacks a feature that was asked for.
    #[error("this kernel's ublk driver lacks {feature} (it needs Linux {since} or later)")]
    Unsupported {
        /// The feature, e.g. "UBLK_F_USER_RECOVERY".
        feature: &'static str,
        /// The first kernel version that has it.
        since: &'static str,
    },
    /// An option cannot be served.
    #[error("invalid ublk option: {0}")]
    InvalidOption(String),
    /// A control command failed.
    #[error("ublk {command} for device {dev_id} failed: {source}")]
    Command {
        /// The command, e.g. "SET_PARAMS".
        command: &'static str,
        /// The device id (`u32::MAX` for "any").
        dev_id: u32,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// A queue's ring failed, or the kernel refused one of its commands.
    #[error("ublk queue {queue} failed: {source}")]
    Queue {
        /// The queue.
        queue: u16,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Any other system call failure.
    #[error("{op} failed: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The device stopped before it was started (a queue failed, or stop was asked early).
    #[error("the ublk device stopped before it started")]
    NotStarted,
    /// `/dev/ublk-control` exists but this user (not root) may not open it.
    #[error(
        "{path} is not accessible to this user (uid {uid}): an unprivileged ublk device needs \
         the one-time set-up `sudo userblk ublk-setup` (it loads ublk_drv and installs a udev \
         rule opening {path} to users and handing each new device to its owner; after \
         `--group NAME`, only that group's members); or serve as root (CAP_SYS_ADMIN)"
    )]
    ControlNotAccessible {
        /// The control node.
        path: String,
        /// This process's effective user id.
        uid: u32,
    },
    /// A user other than root asked for a device, and the kernel has no unprivileged devices.
    #[error(
        "this kernel ({release}) does not let a user other than root add ublk devices \
         (UBLK_F_UNPRIVILEGED_DEV needs Linux 6.3 or later): serve as root (CAP_SYS_ADMIN)"
    )]
    UnprivilegedUnsupported {
        /// The running kernel's release (`uname -r`).
        release: String,
    },
    /// The kernel's limit of unprivileged devices is reached.
    #[error(
        "the kernel's limit of unprivileged ublk devices is reached (ublk_drv parameter \
         ublks_max, default 64): stop one, or raise it as root, e.g. \
         `echo 128 > /sys/module/ublk_drv/parameters/ublks_max`"
    )]
    UnprivilegedLimit,
    /// An unprivileged device's node did not become this user's in time: no udev rule hands
    /// it over (or udevd is not running).
    #[error(
        "{path} did not become usable by this user (uid {uid}, gid {gid}) within {secs} s \
         ({now}): nothing hands new unprivileged ublk devices to their owner; run \
         `sudo userblk ublk-setup` once (it installs the udev rule that does), and check that \
         udevd runs; {}",
        if *.deleted {
            "the device was deleted"
        } else {
            "this user could not delete it (its node is not theirs): the set-up, run as root, \
             also deletes devices their server left behind"
        }
    )]
    NodeNotHandedOver {
        /// `/dev/ublkcN` or `/dev/ublkbN`.
        path: String,
        /// This process's effective user id.
        uid: u32,
        /// This process's effective group id.
        gid: u32,
        /// How long it waited.
        secs: u64,
        /// What the node looked like at the end, e.g. "it is owned by 0:6 with mode 660".
        now: String,
        /// Whether the device could be deleted afterwards.
        deleted: bool,
    },
}

impl UblkError {
    /// The error for control command `command` answered with `-errno`.
    pub(crate) fn from_command(command: &'static str, dev_id: u32, errno: i32) -> UblkError {
        match errno {
            nix::libc::EPERM | nix::libc::EACCES => UblkError::PermissionDenied {
                what: command.to_owned(),
            },
            nix::libc::EEXIST if command == "ADD_DEV" && dev_id != u32::MAX => {
                UblkError::IdTaken { id: dev_id }
            }
            _ => UblkError::Command {
                command,
                dev_id,
                source: io::Error::from_raw_os_error(errno),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_to_do() {
        let cases = [
            (UblkError::ModuleNotLoaded, "modprobe ublk_drv"),
            (
                UblkError::from_command("ADD_DEV", 3, nix::libc::EEXIST),
                "ublk device 3 already exists",
            ),
            (
                UblkError::from_command("ADD_DEV", 3, nix::libc::EPERM),
                "CAP_SYS_ADMIN (run as root)",
            ),
            (
                UblkError::Unsupported {
                    feature: "UBLK_F_USER_RECOVERY",
                    since: "6.1",
                },
                "needs Linux 6.1",
            ),
            (
                UblkError::ControlMissing {
                    path: "/dev/ublk-control".into(),
                },
                "mknod",
            ),
        ];
        for (e, want) in cases {
            let text = e.to_string();
            assert!(text.contains(want), "{text:?} lacks {want:?}");
        }
        // EEXIST for an automatic id is not "id taken": it keeps the errno.
        let auto = UblkError::from_command("ADD_DEV", u32::MAX, nix::libc::EEXIST);
        assert!(matches!(auto, UblkError::Command { .. }), "{auto:?}");
        let other = UblkError::from_command("SET_PARAMS", 1, nix::libc::EINVAL).to_string();
        assert!(other.contains("SET_PARAMS for device 1"), "{other}");
    }
}
