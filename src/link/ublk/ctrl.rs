//! [`Control`]: the control commands on `/dev/ublk-control` (ADD_DEV, SET_PARAMS, START_DEV,
//! STOP_DEV, DEL_DEV, GET_FEATURES, GET_DEV_INFO, START/END_USER_RECOVERY), each waited for, each failure a typed
//! [`UblkError`].

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::path::Path;

use zerocopy::{FromBytes, IntoBytes};

use super::sys::{self, CtrlCmd, CtrlRing, DevInfo, Params};
use super::UblkError;

/// The control node.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// A control connection: the node and a ring of its own (one per thread that sends commands).
#[derive(Debug)]
pub(crate) struct Control {
    file: File,
    ring: CtrlRing,
}

impl Control {
    /// Opens `/dev/ublk-control`, telling a missing module from a missing node and a refusal.
    pub(crate) fn open() -> Result<Control, UblkError> {
        let file = match OpenOptions::new().read(true).write(true).open(CONTROL_PATH) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(if Path::new("/sys/module/ublk_drv").exists() {
                    UblkError::ControlMissing {
                        path: CONTROL_PATH.into(),
                    }
                } else {
                    UblkError::ModuleNotLoaded
                });
            }
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(UblkError::PermissionDenied {
                    what: CONTROL_PATH.into(),
                })
            }
            Err(source) => {
                return Err(UblkError::Io {
                    op: "opening /dev/ublk-control",
                    source,
                })
            }
        };
        let ring = CtrlRing::new().map_err(|source| UblkError::Io {
            op: "creating the ublk control ring (io_uring with 128-byte entries)",
            source,
        })?;
        Ok(Control { file, ring })
    }

    fn command(
        &mut self,
        name: &'static str,
        op: u32,
        dev_id: u32,
        data: u64,
        buf: Option<Vec<u8>>,
    ) -> Result<Option<Vec<u8>>, UblkError> {
        let cmd = CtrlCmd {
            dev_id,
            queue_id: u16::MAX,
            data,
            ..CtrlCmd::default()
        };
        let (res, buf) = self
            .ring
            .command(self.file.as_fd(), op, cmd, buf)
            .map_err(|source| UblkError::Io {
                op: "waiting for a ublk control command",
                source,
            })?;
        if res < 0 {
            return Err(UblkError::from_command(name, dev_id, -res));
        }
        Ok(buf)
    }

    /// The driver's `UBLK_F_*` features, or `None` before Linux 6.5 (no GET_FEATURES).
    pub(crate) fn features(&mut self) -> Option<u64> {
        let buf = self
            .command(
                "GET_FEATURES",
                sys::CMD_GET_FEATURES,
                u32::MAX,
                0,
                Some(vec![0u8; 8]),
            )
            .ok()??;
        u64::read_from_bytes(&buf).ok()
    }

    /// Adds a device as `info` asks (`dev_id` `u32::MAX` for the kernel's choice) and returns
    /// what the kernel made of it (its id, queues clamped to the CPUs, buffer size, flags).
    pub(crate) fn add(&mut self, info: &DevInfo) -> Result<DevInfo, UblkError> {
        let buf = self.command(
            "ADD_DEV",
            sys::CMD_ADD_DEV,
            info.dev_id,
            0,
            Some(info.as_bytes().to_vec()),
        )?;
        buf.and_then(|b| DevInfo::read_from_bytes(&b).ok())
            .ok_or(UblkError::Command {
                command: "ADD_DEV",
                dev_id: info.dev_id,
                source: io::Error::other("no device information came back"),
            })
    }

    pub(crate) fn set_params(&mut self, dev_id: u32, params: &Params) -> Result<(), UblkError> {
        let buf = Some(params.as_bytes().to_vec());
        self.command("SET_PARAMS", sys::CMD_SET_PARAMS, dev_id, 0, buf)
            .map(drop)
    }

    /// Starts the device: blocks until every queue has fetched every tag, then adds
    /// `/dev/ublkb{dev_id}`.
    pub(crate) fn start(&mut self, dev_id: u32) -> Result<(), UblkError> {
        let pid = u64::from(std::process::id());
        self.command("START_DEV", sys::CMD_START_DEV, dev_id, pid, None)
            .map(drop)
    }

    /// Removes `/dev/ublkb{dev_id}` (waiting for the requests in flight, so the queues must go
    /// on serving meanwhile), then aborts every fetch.
    pub(crate) fn stop(&mut self, dev_id: u32) -> Result<(), UblkError> {
        self.command("STOP_DEV", sys::CMD_STOP_DEV, dev_id, 0, None)
            .map(drop)
    }

    /// Deletes the device (its char device and id), once its server has closed it. Plain
    /// DEL_DEV waits until nobody holds the block device open, which a file system still
    /// mounted on it would make for ever: DEL_DEV_ASYNC (Linux 6.9+) removes it and lets the id
    /// go when the last user does; older kernels get DEL_DEV.
    pub(crate) fn delete(&mut self, dev_id: u32) -> Result<(), UblkError> {
        match self.command("DEL_DEV", sys::CMD_DEL_DEV_ASYNC, dev_id, 0, None) {
            Err(UblkError::Command { source, .. })
                if matches!(
                    source.raw_os_error(),
                    Some(nix::libc::EOPNOTSUPP | nix::libc::EINVAL)
                ) =>
            {
                self.command("DEL_DEV", sys::CMD_DEL_DEV, dev_id, 0, None)
                    .map(drop)
            }
            other => other.map(drop),
        }
    }

    /// The device's information as the kernel has it now (its queues, depth, buffer size,
    /// flags and state).
    pub(crate) fn dev_info(&mut self, dev_id: u32) -> Result<DevInfo, UblkError> {
        let buf = self.command(
            "GET_DEV_INFO",
            sys::CMD_GET_DEV_INFO,
            dev_id,
            0,
            Some(vec![0u8; size_of::<DevInfo>()]),
        )?;
        buf.and_then(|b| DevInfo::read_from_bytes(&b).ok())
            .ok_or(UblkError::Command {
                command: "GET_DEV_INFO",
                dev_id,
                source: io::Error::other("no device information came back"),
            })
    }

    /// Makes a quiesced recoverable device ready for a new server's queues (EBUSY while the
    /// old server's char device is still open or the device is not quiesced yet).
    pub(crate) fn start_recovery(&mut self, dev_id: u32) -> Result<(), UblkError> {
        self.command(
            "START_USER_RECOVERY",
            sys::CMD_START_USER_RECOVERY,
            dev_id,
            0,
            None,
        )
        .map(drop)
    }

    /// Hands the device to this server once every queue has fetched every tag: the requests
    /// queued meanwhile (and those re-issued) start flowing.
    pub(crate) fn end_recovery(&mut self, dev_id: u32) -> Result<(), UblkError> {
        let pid = u64::from(std::process::id());
        self.command(
            "END_USER_RECOVERY",
            sys::CMD_END_USER_RECOVERY,
            dev_id,
            pid,
            None,
        )
        .map(drop)
    }
}
