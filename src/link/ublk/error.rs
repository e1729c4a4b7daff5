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
         created unprivileged, which needs Linux 6.3+ and read-write access to /dev/ublk-control"
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
