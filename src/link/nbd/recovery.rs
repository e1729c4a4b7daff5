//! After a server dies: what the kernel still holds, giving a running device new connections
//! ([`MountOptions::reattach`](super::MountOptions::reattach)), and freeing a device whose server
//! is gone ([`disconnect`]).
//!
//! What the kernel does when the server of a netlink-configured device dies (drivers/block/nbd.c,
//! read in Debian's 6.1.192 and 6.12.117, the kernels of the VM suite; the two agree):
//! - Each connection's receive worker (`recv_work`) reads EOF, marks the socket dead and ends.
//!   Requests already sent stay in flight, unanswered. The device keeps its configuration (the
//!   CONNECT's reference) until a DISCONNECT: it stays busy for any new CONNECT (EBUSY).
//! - A request in flight is dealt with when its timer fires. With a request timeout T (one
//!   connection or more), `nbd_xmit_timeout` requeues it (the connection it went out on is marked
//!   dead if it still is the same one); with no timeout, the block layer's 30 s timer only logs
//!   "Possible stuck request" and restarts, forever, unless the connection was replaced since,
//!   in which case it requeues too. So without a timeout, a dead server's requests never end:
//!   the writers sit in D state.
//! - A requeued or new request finds no live connection and waits for one up to the dead
//!   connection timeout (`wait_for_reconnect`, uninterruptible); without one, or when it
//!   expires, it fails with EIO and the device is marked disconnected, so that later requests
//!   fail at once (until a reattach clears that).
//! - RECONFIGURE with SOCKETS replaces dead connections, one a socket (`nbd_reconnect_socket`),
//!   wakes the waiting requests and sends them on the new connection. It ignores a socket for
//!   which no connection is dead (ENOSPC inside, 0 to the caller). It never changes the server
//!   flags, and it resizes the device if given SIZE_BYTES or BLOCK_SIZE_BYTES: a reattach gives
//!   neither, and checks here that the new server serves the same size, block size and commands.
//!   It fails with EINVAL for a device that is not running or was set up by ioctl.
//!
//! So a request the dead server had received is sent again to the new one: it must be safe to
//! apply twice (writes, trims and zeroes of the same range are), and a write the old server
//! acknowledged is not sent again, so it must have outlived the old process (see
//! [`MountOptions::reattach`](super::MountOptions::reattach)).

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::link::{raw_fds, socket_pairs};
use super::mount::MountOptions;
use super::netlink::{NbdNetlink, ReconfigureRequest, RequestError};
use super::served_by;
use super::sys::{nbd_ioctl, NbdIoctl, NbdNode};
use super::{
    context, device_connected, device_index, device_path, driver_loaded, io_error, request_error,
    sysfs, sysfs_u64, wait_until_free, whole_seconds, Setup, Step,
};
use crate::link::{Export, LinkError};
use crate::proto::TransmissionFlags;

/// Why a reattach was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReattachError {
    /// No device was named.
    #[error("a reattach needs the device node (e.g. /dev/nbd0), not auto")]
    NoDevice,
    /// The device has no configuration: nothing to reattach to.
    #[error("it is not connected (serve it without --reattach)")]
    NotConnected,
    /// The process that started the device still runs.
    #[error("its server (pid {pid}) is still running: stop it first")]
    StillServed {
        /// The server's process id.
        pid: u32,
    },
    /// The kernel found no dead connection for a socket it was given.
    #[error(
        "the kernel has no dead connection to replace: a live server still serves it \
         (or it has fewer connections than --connections)"
    )]
    NoDeadConnection,
    /// The kernel refused RECONFIGURE.
    #[error(
        "the kernel refused (EINVAL): only a running device set up by netlink can be reattached \
         (an ioctl set-up's device is freed when its server dies)"
    )]
    NotNetlink,
    /// The new server's size differs from the device's.
    #[error("the device has {device} bytes and this server {server}")]
    SizeDiffers {
        /// The device's size.
        device: u64,
        /// The new server's.
        server: u64,
    },
    /// The block sizes differ.
    #[error("the device has {device}-byte blocks and this server {server}-byte blocks")]
    BlockSizeDiffers {
        /// The device's block size.
        device: u32,
        /// The new server's.
        server: u32,
    },
    /// The device sends a command the new server does not support.
    #[error("the device sends {command} requests, which this server does not support")]
    Unsupported {
        /// The command, e.g. "TRIM".
        command: &'static str,
    },
    /// The device is writable and the new server read-only.
    #[error("the device is writable and this server is read-only")]
    ReadOnly,
}

/// What the kernel holds for a device, from sysfs (and debugfs for the flags where mounted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct KernelView {
    export: Export,
    /// The process that started the device (`pid`; a reattach does not change it).
    pid: Option<u32>,
}

/// The server flags from debugfs's `flags` file ("Hex: 0x%08x"), when debugfs is mounted.
fn parse_debugfs_flags(text: &str) -> Option<u16> {
    let hex = text.lines().next()?.strip_prefix("Hex: 0x")?;
    u32::from_str_radix(hex.trim(), 16)
        .ok()
        .map(|f| (f & 0xffff) as u16)
}

/// The commands the kernel sends and the read-only flag, from the queue's sysfs attributes
/// (what `nbd_set_size` / `nbd_parse_flags` derive from the server flags).
fn flags_from_sysfs(index: u32) -> TransmissionFlags {
    let mut f = TransmissionFlags::HAS_FLAGS.0;
    if sysfs(index, "ro").as_deref() == Some("1") {
        f |= TransmissionFlags::READ_ONLY.0;
    }
    if sysfs(index, "queue/write_cache").as_deref() == Some("write back") {
        f |= TransmissionFlags::SEND_FLUSH.0;
    }
    if sysfs(index, "queue/fua").as_deref() == Some("1") {
        f |= TransmissionFlags::SEND_FUA.0;
    }
    if sysfs_u64(index, "queue/discard_max_hw_bytes").unwrap_or(0) > 0 {
        f |= TransmissionFlags::SEND_TRIM.0;
    }
    if sysfs_u64(index, "queue/write_zeroes_max_bytes").unwrap_or(0) > 0 {
        f |= TransmissionFlags::SEND_WRITE_ZEROES.0;
    }
    TransmissionFlags(f)
}

/// What the kernel holds for `/dev/nbd{index}`, or `None` when it is not connected.
fn kernel_view(index: u32) -> Option<KernelView> {
    if !device_connected(index) {
        return None;
    }
    let size = sysfs_u64(index, "size")? * 512;
    let block_size = u32::try_from(sysfs_u64(index, "queue/logical_block_size")?).ok()?;
    let flags = std::fs::read_to_string(format!("/sys/kernel/debug/nbd/nbd{index}/flags"))
        .ok()
        .and_then(|t| parse_debugfs_flags(&t))
        .map_or_else(|| flags_from_sysfs(index), TransmissionFlags);
    Some(KernelView {
        export: Export {
            size,
            block_size,
            flags,
        },
        pid: sysfs(index, "pid").and_then(|p| p.parse().ok()),
    })
}

/// Checks that a new server exporting `ours` (as the kernel would be told) may take over a
/// device the kernel holds as `kernel`: the same size and block size, every command the kernel
/// sends supported, not read-only under a writable device. Returns the export to serve.
fn check_compatible(kernel: &Export, ours: &Export) -> Result<Export, ReattachError> {
    if kernel.size != ours.size {
        return Err(ReattachError::SizeDiffers {
            device: kernel.size,
            server: ours.size,
        });
    }
    if kernel.block_size != ours.block_size {
        return Err(ReattachError::BlockSizeDiffers {
            device: kernel.block_size,
            server: ours.block_size,
        });
    }
    let commands = [
        (TransmissionFlags::SEND_FLUSH, "FLUSH"),
        (TransmissionFlags::SEND_FUA, "FUA"),
        (TransmissionFlags::SEND_TRIM, "TRIM"),
        (TransmissionFlags::SEND_WRITE_ZEROES, "WRITE_ZEROES"),
    ];
    for (flag, command) in commands {
        if kernel.flags.contains(flag) && !ours.flags.contains(flag) {
            return Err(ReattachError::Unsupported { command });
        }
    }
    if !kernel.flags.contains(TransmissionFlags::READ_ONLY)
        && ours.flags.contains(TransmissionFlags::READ_ONLY)
    {
        return Err(ReattachError::ReadOnly);
    }
    // The kernel keeps sending what it was configured for; the server checks against both.
    Ok(Export {
        size: kernel.size,
        block_size: kernel.block_size,
        flags: kernel.flags,
    })
}

/// A reattach the kernel took: the device and the server's ends of its new connections.
#[derive(Debug)]
pub(super) struct Reattached {
    pub(super) index: u32,
    /// What the kernel holds, and so what to serve.
    pub(super) export: Export,
    pub(super) conns: Vec<UnixStream>,
}

/// New connections for the running device named in `options`, whose server is gone: checks
/// that it is a netlink device nobody serves and that `export` (as the kernel would be told)
/// fits what it holds, then netlink RECONFIGURE with one new socket a connection.
pub(super) fn reattach(options: &MountOptions, export: &Export) -> Result<Reattached, LinkError> {
    let refuse = |device: String, reason| LinkError::Reattach { device, reason };
    let Some(path) = options.device_path() else {
        return Err(refuse("nbd".into(), ReattachError::NoDevice));
    };
    let index = device_index(path)?;
    let device = device_path(index).display().to_string();
    if options.setup_method() == Setup::Ioctl {
        return Err(refuse(device, ReattachError::NotNetlink));
    }
    let view =
        kernel_view(index).ok_or_else(|| refuse(device.clone(), ReattachError::NotConnected))?;
    if let Some(pid) = served_by::live_server(index) {
        return Err(refuse(device, ReattachError::StillServed { pid }));
    }
    let served =
        check_compatible(&view.export, export).map_err(|reason| refuse(device.clone(), reason))?;
    let cx = context(Some(index), export.block_size);
    let mut nl = NbdNetlink::open().map_err(|e| request_error(Step::Family, e, &cx))?;
    let (server_ends, kernel_ends) = socket_pairs(options.connection_count())?;
    let req = ReconfigureRequest {
        index,
        timeout: options.timeout_value().map(whole_seconds),
        dead_conn_timeout: options.dead_conn_timeout_value().map(whole_seconds),
        fds: raw_fds(&kernel_ends),
    };
    let result = nl.reconfigure(&req);
    drop(kernel_ends);
    result.map_err(|e| reconfigure_error(index, e))?;
    // The kernel ignores a socket for which no connection is dead, and answers success:
    // such a socket is closed on its side by now.
    if server_ends.iter().any(peer_closed) {
        return Err(refuse(device, ReattachError::NoDeadConnection));
    }
    Ok(Reattached {
        index,
        export: served,
        conns: server_ends,
    })
}

/// Whether the peer of `server_end` is closed: the kernel did not keep our end of it.
fn peer_closed(server_end: &UnixStream) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(server_end.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLHUP)),
        Err(_) => false,
    }
}

/// What [`disconnect`] found and did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disconnected {
    /// The device had no configuration: nothing to do.
    AlreadyFree,
    /// Disconnected; the device is free.
    Freed,
    /// Disconnected (its I/O now fails), but something still holds it open, e.g. a mounted file
    /// system: it is free once that closes it.
    StillOpen,
}

/// How long [`disconnect`] waits for the device to be let go.
const FREE_WAIT: Duration = Duration::from_secs(10);

/// Frees `/dev/nbdN` whose server is gone: netlink DISCONNECT (what `nbd-client -d` sends),
/// or, where the kernel has no NBD netlink family, the ioctls `NBD_DISCONNECT` and
/// `NBD_CLEAR_SOCK` on the node. Requests in flight fail with EIO, as do later ones. Needs
/// CAP_SYS_ADMIN.
///
/// A device whose server was killed stays configured (busy) until this is done: see the
/// module's documentation for what the kernel does meanwhile. A device that a live process
/// still serves (the one that connected it, or one that reattached to it) is refused with
/// [`LinkError::Served`]: stop that server instead, or see [`force_disconnect`].
pub fn disconnect(device: &Path) -> Result<Disconnected, LinkError> {
    let index = device_index(device)?;
    if let Some(pid) = served_by::live_server(index) {
        return Err(LinkError::Served {
            device: device_path(index).display().to_string(),
            pid,
        });
    }
    force_disconnect(device)
}

/// [`disconnect`], even under a server that still runs: its connections end (it sees them
/// close) and the I/O in flight fails with EIO.
pub fn force_disconnect(device: &Path) -> Result<Disconnected, LinkError> {
    let index = device_index(device)?;
    let name = device_path(index).display().to_string();
    if !device_connected(index) {
        return Ok(Disconnected::AlreadyFree);
    }
    let cx = context(Some(index), 512);
    match NbdNetlink::open() {
        Ok(mut nl) => nl
            .disconnect(index)
            .map_err(|e| request_error(Step::Other("netlink NBD_CMD_DISCONNECT"), e, &cx))?,
        Err(RequestError::Errno(_) | RequestError::Io(_)) if driver_loaded() => {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(device_path(index))
                .map_err(|e| io_error(Step::Open, e, &cx))?;
            let node = NbdNode::new(file).map_err(|_| LinkError::NotNbdDevice {
                device: name.clone(),
            })?;
            for ioctl in [NbdIoctl::Disconnect, NbdIoctl::ClearSock] {
                nbd_ioctl(&node, ioctl, 0)
                    .map_err(|e| io_error(Step::Other(ioctl.name()), e, &cx))?;
            }
        }
        Err(e) => return Err(request_error(Step::Family, e, &cx)),
    }
    if wait_until_free(index, Instant::now() + FREE_WAIT) {
        Ok(Disconnected::Freed)
    } else {
        Ok(Disconnected::StillOpen)
    }
}

/// The error for a RECONFIGURE the kernel refused.
fn reconfigure_error(index: u32, e: RequestError) -> LinkError {
    let device = device_path(index).display().to_string();
    match e {
        RequestError::Errno(nix::libc::EINVAL) => LinkError::Reattach {
            device,
            reason: ReattachError::NotNetlink,
        },
        e => request_error(
            Step::Other("netlink NBD_CMD_RECONFIGURE"),
            e,
            &context(Some(index), 512),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(size: u64, block_size: u32, flags: u16) -> Export {
        Export {
            size,
            block_size,
            flags: TransmissionFlags(flags),
        }
    }

    const F: TransmissionFlags = TransmissionFlags::SEND_FLUSH;
    const FUA: TransmissionFlags = TransmissionFlags::SEND_FUA;
    const TRIM: TransmissionFlags = TransmissionFlags::SEND_TRIM;
    const RO: TransmissionFlags = TransmissionFlags::READ_ONLY;

    #[test]
    fn the_same_export_may_take_over() {
        let k = export(64 << 20, 4096, F.0 | FUA.0 | TRIM.0);
        assert_eq!(check_compatible(&k, &k).unwrap(), k);
        // A server that supports more than the kernel sends is fine; the kernel's flags stay.
        let more = export(64 << 20, 4096, F.0 | FUA.0 | TRIM.0 | 1 << 6);
        assert_eq!(check_compatible(&k, &more).unwrap(), k);
    }

    #[test]
    fn a_different_geometry_is_refused() {
        let k = export(64 << 20, 4096, F.0);
        let e = check_compatible(&k, &export(32 << 20, 4096, F.0)).unwrap_err();
        assert!(matches!(
            e,
            ReattachError::SizeDiffers {
                device: 67108864,
                server: 33554432
            }
        ));
        assert_eq!(
            e.to_string(),
            "the device has 67108864 bytes and this server 33554432"
        );
        assert!(matches!(
            check_compatible(&k, &export(64 << 20, 512, F.0)),
            Err(ReattachError::BlockSizeDiffers {
                device: 4096,
                server: 512
            })
        ));
    }

    #[test]
    fn a_command_the_kernel_sends_must_be_served() {
        let k = export(1 << 20, 512, F.0 | TRIM.0);
        let e = check_compatible(&k, &export(1 << 20, 512, F.0)).unwrap_err();
        assert!(matches!(e, ReattachError::Unsupported { command: "TRIM" }));
        assert_eq!(
            e.to_string(),
            "the device sends TRIM requests, which this server does not support"
        );
        assert!(matches!(
            check_compatible(&k, &export(1 << 20, 512, TRIM.0)),
            Err(ReattachError::Unsupported { command: "FLUSH" })
        ));
    }

    #[test]
    fn read_only_under_a_writable_device_is_refused() {
        let k = export(1 << 20, 512, F.0);
        assert!(matches!(
            check_compatible(&k, &export(1 << 20, 512, F.0 | RO.0)),
            Err(ReattachError::ReadOnly)
        ));
        // A read-only device may be served by a writable server: the kernel sends no writes.
        let ro = export(1 << 20, 512, RO.0);
        assert!(check_compatible(&ro, &export(1 << 20, 512, 0)).is_ok());
    }

    #[test]
    fn reads_debugfs_flags() {
        let text = "Hex: 0x0000012d\n\nKnown flags:\nNBD_FLAG_HAS_FLAGS\n";
        assert_eq!(parse_debugfs_flags(text), Some(0x12d));
        assert_eq!(parse_debugfs_flags("garbage"), None);
        assert_eq!(parse_debugfs_flags(""), None);
        assert_eq!(parse_debugfs_flags("Hex: 0xzz"), None);
    }

    #[test]
    fn a_closed_peer_is_seen() {
        let (a, b) = UnixStream::pair().unwrap();
        assert!(!peer_closed(&a), "the peer is open");
        drop(b);
        assert!(peer_closed(&a), "the peer was closed");
    }

    #[test]
    fn disconnecting_a_path_that_is_no_nbd_device_is_a_typed_error() {
        assert!(matches!(
            disconnect(Path::new("/dev/sda")),
            Err(LinkError::NotNbdDevice { .. })
        ));
    }
}
