//! [`Control`]: the control commands on `/dev/ublk-control` (ADD_DEV, SET_PARAMS, START_DEV,
//! STOP_DEV, DEL_DEV, GET_FEATURES, GET_DEV_INFO(2), START/END_USER_RECOVERY), each waited for,
//! each failure a typed [`UblkError`]. Commands on an unprivileged device carry its char
//! device's path first in their buffer, as the kernel requires (see [`unpriv`](super::unpriv)).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::path::Path;

use zerocopy::{FromBytes, IntoBytes};

use super::sys::{self, CtrlCmd, CtrlRing, DevInfo, Params};
use super::unpriv;
use super::UblkError;

/// The control node.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// A control connection: the node and a ring of its own (one per thread that sends commands).
#[derive(Debug)]
pub(crate) struct Control {
    file: File,
    ring: CtrlRing,
    /// The unprivileged devices this connection added (or was told of): their commands carry
    /// the char device's path.
    unprivileged: Vec<u32>,
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
                return Err(unpriv::control_refused(
                    CONTROL_PATH,
                    sys::effective_ids().0,
                ))
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
        Ok(Control {
            file,
            ring,
            unprivileged: Vec::new(),
        })
    }

    /// Commands on device `id` carry its char device's path from now on.
    pub(crate) fn mark_unprivileged(&mut self, id: u32) {
        if !self.unprivileged.contains(&id) {
            self.unprivileged.push(id);
        }
    }

    /// The command area for device `dev_id` with inline `data` and a buffer of `payload_len`
    /// bytes (after the path when `with_path`); `addr` is filled when sent.
    pub(crate) fn encode(
        dev_id: u32,
        data: u64,
        with_path: bool,
        payload_len: Option<usize>,
    ) -> Result<CtrlCmd, UblkError> {
        let path_len = if with_path { unpriv::DEV_PATH_SLOT } else { 0 };
        let len = path_len + payload_len.unwrap_or(0);
        let too_long = |_| UblkError::InvalidOption(format!("a {len}-byte control buffer"));
        Ok(CtrlCmd {
            dev_id,
            queue_id: u16::MAX,
            len: u16::try_from(len).map_err(too_long)?,
            data,
            dev_path_len: u16::try_from(path_len).map_err(too_long)?,
            ..CtrlCmd::default()
        })
    }

    fn command(
        &mut self,
        name: &'static str,
        op: u32,
        dev_id: u32,
        data: u64,
        buf: Option<Vec<u8>>,
    ) -> Result<Option<Vec<u8>>, UblkError> {
        self.send(op, dev_id, data, buf)?
            .map_err(|errno| UblkError::from_command(name, dev_id, errno))
    }

    /// Sends a command and waits for it: the buffer it wrote, or the errno the kernel answered.
    fn send(
        &mut self,
        op: u32,
        dev_id: u32,
        data: u64,
        buf: Option<Vec<u8>>,
    ) -> Result<Result<Option<Vec<u8>>, i32>, UblkError> {
        let with_path = (self.unprivileged.contains(&dev_id) && unpriv::carries_dev_path(op))
            || op == sys::CMD_GET_DEV_INFO2;
        let cmd = Control::encode(dev_id, data, with_path, buf.as_ref().map(Vec::len))?;
        let buf = if with_path {
            Some(unpriv::with_dev_path(dev_id, buf.as_deref()))
        } else {
            buf
        };
        let (res, buf) = self
            .ring
            .command(self.file.as_fd(), op, cmd, buf)
            .map_err(|source| UblkError::Io {
                op: "waiting for a ublk control command",
                source,
            })?;
        if res < 0 {
            return Ok(Err(-res));
        }
        // What the command wrote follows the path.
        Ok(Ok(match buf {
            Some(mut b) if with_path => Some(b.split_off(unpriv::DEV_PATH_SLOT)),
            other => other,
        }))
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
    ///
    /// A device asked unprivileged (`UBLK_F_UNPRIVILEGED_DEV`) that the kernel made so (it
    /// clears the flag for CAP_SYS_ADMIN) gets the char device's path in its later commands.
    pub(crate) fn add(&mut self, info: &DevInfo) -> Result<DevInfo, UblkError> {
        let asked_unprivileged = info.flags & sys::F_UNPRIVILEGED_DEV != 0;
        let answer = self.send(
            sys::CMD_ADD_DEV,
            info.dev_id,
            0,
            Some(info.as_bytes().to_vec()),
        )?;
        let buf = match answer {
            Ok(buf) => buf,
            Err(errno) if asked_unprivileged => {
                return Err(unpriv::add_dev_error(
                    errno,
                    info.dev_id,
                    &unpriv::kernel_release(),
                ))
            }
            Err(errno) => return Err(UblkError::from_command("ADD_DEV", info.dev_id, errno)),
        };
        let added =
            buf.and_then(|b| DevInfo::read_from_bytes(&b).ok())
                .ok_or(UblkError::Command {
                    command: "ADD_DEV",
                    dev_id: info.dev_id,
                    source: io::Error::other("no device information came back"),
                })?;
        if added.flags & sys::F_UNPRIVILEGED_DEV != 0 {
            self.mark_unprivileged(added.dev_id);
        }
        Ok(added)
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

    /// The device's information by GET_DEV_INFO2, which carries the char device's path and
    /// so works for unprivileged devices whoever asks (with read access to the node); kernels
    /// before 6.3 lack it (EOPNOTSUPP or EINVAL) and get GET_DEV_INFO.
    pub(crate) fn dev_info_with_path(&mut self, dev_id: u32) -> Result<DevInfo, UblkError> {
        let len = size_of::<DevInfo>();
        let buf = match self.send(sys::CMD_GET_DEV_INFO2, dev_id, 0, Some(vec![0u8; len]))? {
            Ok(buf) => buf,
            Err(nix::libc::EOPNOTSUPP | nix::libc::EINVAL) => return self.dev_info(dev_id),
            Err(errno) => return Err(UblkError::from_command("GET_DEV_INFO2", dev_id, errno)),
        };
        buf.and_then(|b| DevInfo::read_from_bytes(&b).ok())
            .ok_or(UblkError::Command {
                command: "GET_DEV_INFO2",
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
