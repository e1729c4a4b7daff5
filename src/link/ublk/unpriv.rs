//! Unprivileged ublk devices (`UBLK_F_UNPRIVILEGED_DEV`, Linux 6.3+): a user other than root
//! adds a device, the kernel records that user as its owner, and a udev rule (installed once by
//! `userblk ublk-setup`) hands `/dev/ublkcN` and `/dev/ublkbN` to the owner.
//!
//! What the 6.12 driver (`drivers/block/ublk_drv.c`) requires, and this module provides:
//! - ADD_DEV without CAP_SYS_ADMIN must set `UBLK_F_UNPRIVILEGED_DEV`, else EPERM (and before
//!   6.3, EPERM whatever the flags); with CAP_SYS_ADMIN the kernel clears the flag. The kernel
//!   stores the caller's uid and gid as `owner_uid`/`owner_gid`, drops the recovery flags of an
//!   unprivileged device, refuses `UBLK_F_USER_COPY` (EINVAL), and answers EACCES past its
//!   `ublks_max` unprivileged devices.
//! - Every later control command on an unprivileged device (all but ADD_DEV and GET_FEATURES)
//!   has a buffer that starts with the path of the device's char device, `dev_path_len` bytes
//!   long (`ublk_ctrl_uring_cmd_permission`): the kernel checks that the path is the device's
//!   char device and that the caller may read it (GET_*) or read and write it (the others), then
//!   skips the path and hands the rest of the buffer to the command. GET_DEV_INFO2 carries the
//!   path for every device. As ublksrv does, the path takes a 32-byte NUL-padded slot
//!   (`UBLKC_PATH_MAX`), so what follows stays 8-byte aligned.
//! - DEL_DEV_ASYNC is not among the commands an unprivileged device accepts in 6.12 (EINVAL):
//!   [`Control::delete`](super::ctrl::Control) falls back to DEL_DEV.
//! - Only the owner (uid and gid) or CAP_SYS_ADMIN may open `/dev/ublkbN` (`ublk_open`).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use nix::unistd::AccessFlags;

use super::ctrl::Control;
use super::sys;
use super::UblkError;

/// Bytes the char device's path takes at the start of a command's buffer (ublksrv's
/// `UBLKC_PATH_MAX`), NUL included.
pub(crate) const DEV_PATH_SLOT: usize = 32;

/// How long a new device's nodes may take to be handed to their owner by udev.
pub const NODE_HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether control command `op` on an unprivileged device carries the char device's path:
/// all but ADD_DEV (no device yet) and GET_FEATURES (no device at all).
pub(crate) fn carries_dev_path(op: u32) -> bool {
    !matches!(op & 0xff, 0x04 | 0x13)
}

/// The buffer of a command on an unprivileged device `id`: `/dev/ublkc{id}`, NUL-padded to
/// [`DEV_PATH_SLOT`] bytes, then `payload`.
pub(crate) fn with_dev_path(id: u32, payload: Option<&[u8]>) -> Vec<u8> {
    let path = format!("/dev/ublkc{id}");
    let mut buf = vec![0u8; DEV_PATH_SLOT];
    // "/dev/ublkc" and at most 10 digits: 20 bytes, always NUL-terminated in the slot.
    buf[..path.len()].copy_from_slice(path.as_bytes());
    buf.extend_from_slice(payload.unwrap_or_default());
    buf
}

/// Whether to ask for an unprivileged device: as asked, or (`None`) when not root.
pub(crate) fn wants_unprivileged(asked: Option<bool>, euid: u32) -> bool {
    asked.unwrap_or(euid != 0)
}

/// The running kernel's release (`uname -r`), for messages.
pub(crate) fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown release".into())
}

/// The error for ADD_DEV answered with `-errno`, when the device was asked unprivileged.
pub(crate) fn add_dev_error(errno: i32, dev_id: u32, release: &str) -> UblkError {
    match errno {
        // 6.3+ answers EPERM only without the flag, which was set: the kernel predates it.
        nix::libc::EPERM => UblkError::UnprivilegedUnsupported {
            release: release.to_owned(),
        },
        nix::libc::EACCES => UblkError::UnprivilegedLimit,
        _ => UblkError::from_command("ADD_DEV", dev_id, errno),
    }
}

/// The error for `/dev/ublk-control` refused to a process with effective uid `euid`.
pub(crate) fn control_refused(path: &str, euid: u32) -> UblkError {
    if euid == 0 {
        UblkError::PermissionDenied { what: path.into() }
    } else {
        UblkError::ControlNotAccessible {
            path: path.into(),
            uid: euid,
        }
    }
}

/// What a node looks like, for messages: "missing", or its owner and mode.
pub(crate) fn node_state(path: &Path) -> String {
    match fs::metadata(path) {
        Ok(m) => format!(
            "it is owned by {}:{} with mode {:o}",
            m.uid(),
            m.gid(),
            m.permissions().mode() & 0o7777
        ),
        Err(_) => "it does not exist".into(),
    }
}

/// Whether this process may read and write `path`.
fn usable(path: &Path) -> bool {
    nix::unistd::access(path, AccessFlags::R_OK | AccessFlags::W_OK).is_ok()
}

/// Waits up to `timeout` for `path` to be readable and writable by this process (the udev rule
/// chowns it to the device's owner a moment after the kernel creates it).
pub(crate) fn wait_usable(path: &Path, timeout: Duration) -> Result<(), UblkError> {
    let deadline = Instant::now() + timeout;
    loop {
        if usable(path) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let (uid, gid) = sys::effective_ids();
            return Err(UblkError::NodeNotHandedOver {
                path: path.display().to_string(),
                uid,
                gid,
                secs: timeout.as_secs(),
                now: node_state(path),
                deleted: false,
            });
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `e`, saying whether the device could be deleted after it (for [`UblkError::NodeNotHandedOver`];
/// other errors are returned as they are).
pub(crate) fn deleted(e: UblkError, ok: bool) -> UblkError {
    match e {
        UblkError::NodeNotHandedOver {
            path,
            uid,
            gid,
            secs,
            now,
            ..
        } => UblkError::NodeNotHandedOver {
            path,
            uid,
            gid,
            secs,
            now,
            deleted: ok,
        },
        other => other,
    }
}

/// The owner the kernel recorded for device `id` (`owner_uid`, `owner_gid`), or `None` for a
/// device root added (not unprivileged). Asks with GET_DEV_INFO2 (the char device's path in the
/// buffer, which works for both kinds), or GET_DEV_INFO on kernels without it. Needs access to
/// `/dev/ublk-control` and, for an unprivileged device, read access to `/dev/ublkc{id}`: what
/// the udev helper `userblk ublk-chown` has as root.
pub fn device_owner(id: u32) -> Result<Option<(u32, u32)>, UblkError> {
    let mut ctrl = Control::open()?;
    let info = ctrl.dev_info_with_path(id)?;
    Ok((info.flags & sys::F_UNPRIVILEGED_DEV != 0).then_some((info.owner_uid, info.owner_gid)))
}

/// What [`remove_abandoned`] found for one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Abandoned {
    /// Deleted: unprivileged, never started, and the process that added it is gone.
    Deleted(u32),
    /// Left alone, and why.
    Kept(u32, String),
}

/// Deletes the unprivileged devices left behind by servers that died before starting them
/// (e.g. because their nodes were never handed over, so that they could not delete them
/// themselves): state DEAD, and the pid recorded at ADD_DEV no longer running. Needs root.
/// Devices of other kinds, or with a live server, are left alone.
pub fn remove_abandoned() -> Result<Vec<Abandoned>, UblkError> {
    let mut ctrl = Control::open()?;
    let mut out = Vec::new();
    let ids = fs::read_dir("/sys/class/ublk-char")
        .map(|dir| {
            dir.filter_map(|e| {
                let name = e.ok()?.file_name();
                name.to_str()?.strip_prefix("ublkc")?.parse::<u32>().ok()
            })
            .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    for id in ids {
        let info = match ctrl.dev_info_with_path(id) {
            Ok(i) => i,
            Err(e) => {
                out.push(Abandoned::Kept(id, e.to_string()));
                continue;
            }
        };
        let alive =
            info.ublksrv_pid > 0 && Path::new(&format!("/proc/{}", info.ublksrv_pid)).exists();
        if info.flags & sys::F_UNPRIVILEGED_DEV == 0 {
            out.push(Abandoned::Kept(id, "added by root".into()));
        } else if info.state != 0 {
            out.push(Abandoned::Kept(
                id,
                format!("started (state {})", info.state),
            ));
        } else if alive {
            out.push(Abandoned::Kept(
                id,
                format!("its server (pid {}) is running", info.ublksrv_pid),
            ));
        } else {
            ctrl.mark_unprivileged(id);
            out.push(match ctrl.delete(id) {
                Ok(()) => Abandoned::Deleted(id),
                Err(e) => Abandoned::Kept(id, e.to_string()),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::ublk::sys::CtrlCmd;
    use zerocopy::IntoBytes;

    #[test]
    fn unprivileged_flags_and_opcodes_match_the_uapi_header() {
        // include/uapi/linux/ublk_cmd.h: UBLK_F_UNPRIVILEGED_DEV (1UL << 5), UBLK_F_USER_COPY
        // (1UL << 7), UBLK_F_SUPPORT_ZERO_COPY (1ULL << 0), UBLK_CMD_GET_DEV_INFO2 0x12 as
        // _IOR('u', 0x12, struct ublksrv_ctrl_cmd).
        assert_eq!(sys::F_UNPRIVILEGED_DEV, 0x20);
        assert_eq!(sys::F_USER_COPY, 0x80);
        assert_eq!(sys::F_SUPPORT_ZERO_COPY, 0x01);
        assert_eq!(sys::CMD_GET_DEV_INFO2, 0x8020_7512);
    }

    #[test]
    fn which_commands_carry_the_path() {
        assert!(!carries_dev_path(sys::CMD_ADD_DEV));
        assert!(!carries_dev_path(sys::CMD_GET_FEATURES));
        for op in [
            sys::CMD_SET_PARAMS,
            sys::CMD_START_DEV,
            sys::CMD_STOP_DEV,
            sys::CMD_DEL_DEV,
            sys::CMD_DEL_DEV_ASYNC,
            sys::CMD_GET_DEV_INFO,
            sys::CMD_GET_DEV_INFO2,
        ] {
            assert!(carries_dev_path(op), "{op:#x}");
        }
    }

    #[test]
    fn the_path_comes_first_in_a_32_byte_slot() {
        let buf = with_dev_path(3, None);
        let mut want = b"/dev/ublkc3".to_vec();
        want.resize(32, 0);
        assert_eq!(buf, want);
        let buf = with_dev_path(4_000_000_000, Some(&[1, 2, 3]));
        assert_eq!(&buf[..20], b"/dev/ublkc4000000000");
        assert_eq!(&buf[20..32], &[0u8; 12]);
        assert_eq!(&buf[32..], &[1, 2, 3]);
    }

    /// SET_PARAMS on unprivileged device 3, as the 32-byte `struct ublksrv_ctrl_cmd` in the SQE
    /// (addr is the buffer's address, filled when sent: zero here).
    #[test]
    fn control_command_bytes_with_the_dev_path() {
        let cmd = Control::encode(3, 0, true, Some(112)).unwrap();
        #[rustfmt::skip]
        let want: [u8; 32] = [
            3, 0, 0, 0,             // dev_id
            0xff, 0xff,             // queue_id: none
            144, 0,                 // len: 32 (path) + 112 (struct ublk_params)
            0, 0, 0, 0, 0, 0, 0, 0, // addr
            0, 0, 0, 0, 0, 0, 0, 0, // data[0]
            32, 0,                  // dev_path_len
            0, 0,                   // pad
            0, 0, 0, 0,             // reserved
        ];
        assert_eq!(cmd.as_bytes(), want);
        // START_DEV on it: the buffer is the path alone; data[0] the server's pid.
        let cmd = Control::encode(7, 0x1234, true, None).unwrap();
        #[rustfmt::skip]
        let want: [u8; 32] = [
            7, 0, 0, 0, 0xff, 0xff, 32, 0,
            0, 0, 0, 0, 0, 0, 0, 0,
            0x34, 0x12, 0, 0, 0, 0, 0, 0,
            32, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(cmd.as_bytes(), want);
        // The same command on a device root added: no path, no buffer.
        let cmd = Control::encode(7, 0x1234, false, None).unwrap();
        assert_eq!(
            cmd.as_bytes(),
            CtrlCmd {
                dev_id: 7,
                queue_id: u16::MAX,
                data: 0x1234,
                ..CtrlCmd::default()
            }
            .as_bytes()
        );
        assert_eq!(&cmd.as_bytes()[6..8], &[0, 0]);
        assert_eq!(&cmd.as_bytes()[24..26], &[0, 0]);
    }

    #[test]
    fn not_root_means_unprivileged_unless_told() {
        assert!(wants_unprivileged(None, 1000));
        assert!(!wants_unprivileged(None, 0));
        assert!(wants_unprivileged(Some(true), 0));
        assert!(!wants_unprivileged(Some(false), 1000));
    }

    #[test]
    fn errors_say_what_to_do() {
        let cases = [
            (
                add_dev_error(nix::libc::EPERM, u32::MAX, "6.1.0-28-amd64"),
                "this kernel (6.1.0-28-amd64) does not let a user other than root add ublk \
                 devices (UBLK_F_UNPRIVILEGED_DEV needs Linux 6.3 or later)",
            ),
            (
                add_dev_error(nix::libc::EACCES, u32::MAX, "6.12"),
                "/sys/module/ublk_drv/parameters/ublks_max",
            ),
            (
                control_refused("/dev/ublk-control", 1000),
                "/dev/ublk-control is not accessible to this user (uid 1000): an unprivileged \
                 ublk device needs the one-time set-up `sudo userblk ublk-setup`",
            ),
            (
                control_refused("/dev/ublk-control", 0),
                "permission denied for /dev/ublk-control",
            ),
            (
                UblkError::NodeNotHandedOver {
                    path: "/dev/ublkc2".into(),
                    uid: 1000,
                    gid: 1000,
                    secs: 10,
                    now: node_state(Path::new("/nonexistent/ublkc2")),
                    deleted: true,
                },
                "/dev/ublkc2 did not become usable by this user (uid 1000, gid 1000) within 10 s \
                 (it does not exist): nothing hands new unprivileged ublk devices to their \
                 owner; run `sudo userblk ublk-setup` once",
            ),
        ];
        for (e, want) in cases {
            let text = e.to_string();
            assert!(text.contains(want), "{text:?}\nlacks {want:?}");
        }
        // Other errnos keep their command and errno.
        let e = add_dev_error(nix::libc::EINVAL, 5, "6.12").to_string();
        assert!(e.contains("ADD_DEV for device 5 failed"), "{e}");
        // Whether the device could be deleted is said, and what root can do if not.
        let kept = UblkError::NodeNotHandedOver {
            path: "/dev/ublkc2".into(),
            uid: 1000,
            gid: 1000,
            secs: 10,
            now: "it is owned by 0:0 with mode 600".into(),
            deleted: false,
        }
        .to_string();
        assert!(
            kept.contains("(it is owned by 0:0 with mode 600)"),
            "{kept}"
        );
        assert!(kept.contains("could not delete it"), "{kept}");
    }

    #[test]
    fn a_node_is_waited_for_then_reported() {
        let dir = std::env::temp_dir().join(format!("userblk-unpriv-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let node = dir.join("ublkc9");
        // Missing: the wait ends at its bound with the node's state.
        let t = Instant::now();
        let err = wait_usable(&node, Duration::from_millis(100)).unwrap_err();
        assert!(t.elapsed() >= Duration::from_millis(100));
        assert!(err.to_string().contains("it does not exist"), "{err}");
        // Appearing meanwhile (as udev's chown makes it usable): the wait ends early.
        let n = node.clone();
        let maker = thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            fs::write(&n, b"").unwrap();
        });
        wait_usable(&node, Duration::from_secs(10)).unwrap();
        maker.join().unwrap();
        assert!(node_state(&node).starts_with("it is owned by"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
