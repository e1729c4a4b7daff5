//! Configuring the driver with the classic ioctls, in the order nbd-client uses: open
//! `/dev/nbdN`, SET_BLKSIZE, SET_SIZE_BLOCKS, CLEAR_SOCK, SET_FLAGS, SET_TIMEOUT, SET_SOCK (each
//! socket), DO_IT, then CLEAR_SOCK and close once DO_IT returns.
//!
//! All of it runs on one thread of its own (the kernel wants SET_SOCK and DO_IT from the task that
//! set the device up), with most signals blocked: a handled signal would abort DO_IT and tear the
//! device down. That thread only configures the device; it never reads or writes it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use nix::sys::signal::{SigSet, Signal};

use super::sys::{nbd_ioctl, NbdIoctl};

/// The NBD driver's block major number.
const NBD_MAJOR: u64 = 43;

/// What the ioctls tell the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IoctlConfig {
    pub(crate) block_size: u32,
    pub(crate) size: u64,
    pub(crate) flags: u64,
    /// Seconds; 0 leaves the kernel's default (no timeout).
    pub(crate) timeout: u64,
}

/// Why set-up failed: the call that failed and its error.
#[derive(Debug)]
pub(crate) struct SetupError {
    /// `None` for opening the device node.
    pub(crate) ioctl: Option<NbdIoctl>,
    pub(crate) source: io::Error,
}

/// The running DO_IT thread. Its result is DO_IT's.
#[derive(Debug)]
pub(crate) struct DoIt {
    /// The device, open read-write; shared so that DISCONNECT, SET_TIMEOUT and fsync can be
    /// issued from other threads while DO_IT blocks.
    pub(crate) fd: Arc<OwnedFd>,
    pub(crate) thread: JoinHandle<io::Result<()>>,
}

/// Opens `path`, checking that it is an NBD device node (block major 43).
fn open_device(path: &Path) -> Result<File, SetupError> {
    let open_err = |source| SetupError {
        ioctl: None,
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_CLOEXEC)
        .open(path)
        .map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    let major = (meta.rdev() >> 8) & 0xfff;
    if !meta.file_type().is_block_device() || major != NBD_MAJOR {
        return Err(open_err(io::Error::from_raw_os_error(nix::libc::ENODEV)));
    }
    Ok(file)
}

/// Blocks every signal that can be blocked except the synchronous ones (a fault must still
/// kill the process rather than hang it).
fn block_signals() {
    let mut set = SigSet::all();
    for s in [
        Signal::SIGSEGV,
        Signal::SIGBUS,
        Signal::SIGFPE,
        Signal::SIGILL,
        Signal::SIGTRAP,
        Signal::SIGABRT,
        Signal::SIGSYS,
    ] {
        set.remove(s);
    }
    // Failure only leaves signals unblocked, as in a process that never asked.
    let _ = set.thread_block();
}

/// Configures `path` and starts DO_IT on a thread of its own. Returns once every ioctl before
/// DO_IT succeeded (DO_IT itself may still fail at once: watch the thread) or with the first
/// failure. The kernel ends are closed here once the kernel holds them.
pub(crate) fn start(
    path: &Path,
    config: IoctlConfig,
    kernel_ends: Vec<UnixStream>,
) -> Result<DoIt, SetupError> {
    let (ready_tx, ready_rx) = mpsc::channel::<Result<Arc<OwnedFd>, SetupError>>();
    let path = path.to_path_buf();
    let thread = thread::Builder::new()
        .name("userblk-nbd-doit".into())
        .spawn(move || -> io::Result<()> {
            block_signals();
            let fd: Arc<OwnedFd> = match open_device(&path) {
                Ok(f) => Arc::new(f.into()),
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Ok(());
                }
            };
            let mut socks_given = 0;
            let setup = configure(&fd, config, &kernel_ends, &mut socks_given);
            drop(kernel_ends);
            if let Err(e) = setup {
                // Release what we set up; with no socket given, the device was never ours (it
                // may be someone else's, being set up), so it is left alone.
                if socks_given > 0 {
                    let _ = nbd_ioctl(fd.as_fd(), NbdIoctl::ClearSock, 0);
                }
                let _ = ready_tx.send(Err(e));
                return Ok(());
            }
            let _ = ready_tx.send(Ok(Arc::clone(&fd)));
            let result = nbd_ioctl(fd.as_fd(), NbdIoctl::DoIt, 0);
            let _ = nbd_ioctl(fd.as_fd(), NbdIoctl::ClearSock, 0);
            result
        })
        .map_err(|source| SetupError {
            ioctl: None,
            source,
        })?;
    match ready_rx.recv() {
        Ok(Ok(fd)) => Ok(DoIt { fd, thread }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            // The thread died before reporting: only a panic can do that.
            let _ = thread.join();
            Err(SetupError {
                ioctl: None,
                source: io::Error::other("the NBD set-up thread stopped unexpectedly"),
            })
        }
    }
}

fn configure(
    fd: &OwnedFd,
    c: IoctlConfig,
    kernel_ends: &[UnixStream],
    socks_given: &mut usize,
) -> Result<(), SetupError> {
    let call = |ioctl: NbdIoctl, arg: u64| {
        nbd_ioctl(fd.as_fd(), ioctl, arg).map_err(|source| SetupError {
            ioctl: Some(ioctl),
            source,
        })
    };
    call(NbdIoctl::SetBlksize, u64::from(c.block_size))?;
    call(NbdIoctl::SetSizeBlocks, c.size / u64::from(c.block_size))?;
    call(NbdIoctl::ClearSock, 0)?;
    call(NbdIoctl::SetFlags, c.flags)?;
    if c.timeout > 0 {
        call(NbdIoctl::SetTimeout, c.timeout)?;
    }
    for s in kernel_ends {
        let raw = u64::try_from(s.as_raw_fd()).map_err(|_| SetupError {
            ioctl: Some(NbdIoctl::SetSock),
            source: io::Error::from_raw_os_error(nix::libc::EBADF),
        })?;
        call(NbdIoctl::SetSock, raw)?;
        *socks_given += 1;
    }
    Ok(())
}
