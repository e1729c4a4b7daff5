//! Configuring the driver with the classic ioctls: open `/dev/nbdN`, SET_SOCK (the first socket),
//! SET_BLKSIZE, SET_SIZE_BLOCKS, SET_FLAGS, SET_TIMEOUT, SET_SOCK (the other sockets), DO_IT, then
//! CLEAR_SOCK and close once DO_IT returns.
//!
//! The first SET_SOCK claims the device before anything changes it: the kernel takes it for the
//! calling task only if no other task is setting it up and it is not running, and fails with
//! EBUSY otherwise (`nbd_add_socket`, `task_setup`, drivers/block/nbd.c). nbd-client sends
//! CLEAR_SOCK first instead, but CLEAR_SOCK shuts down the sockets of whoever holds the device,
//! even a device started by netlink (`nbd_ioctl` lets CLEAR_SOCK through on a bound device;
//! `nbd_clear_sock_ioctl` -> `sock_shutdown`), so with an automatically picked device it could
//! tear down another process's. Nothing is cleared here before the claim, and after a failure
//! only our own claim is.
//!
//! All of it runs on one thread of its own (the kernel wants SET_SOCK and DO_IT from the task that
//! set the device up), with most signals blocked: a handled signal would abort DO_IT and tear the
//! device down. That thread only configures the device; it never reads or writes it.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::TimeVal;

use super::sys::{nbd_ioctl, NbdIoctl, NbdNode};

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
    pub(crate) fd: Arc<NbdNode>,
    pub(crate) thread: JoinHandle<io::Result<()>>,
}

/// Opens `path`, checking that it is an NBD device node (block major 43); anything else is
/// ENODEV, which the caller reports as "not an NBD device".
fn open_device(path: &Path) -> Result<NbdNode, SetupError> {
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
    NbdNode::new(file).map_err(|e| {
        open_err(match e {
            super::blk::NodeError::Stat(source) => source,
            _ => io::Error::from_raw_os_error(nix::libc::ENODEV),
        })
    })
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

/// How long the kernel may block sending on a connection whose server reads nothing, when no
/// request timeout is set (with one, the kernel uses it instead: `nbd_start_device`).
///
/// Without it, `kill -9` of the serving process could leave it unkillable (seen one run in five
/// under a metadata workload): the kill interrupts DO_IT, whose clean-up
/// (`nbd_start_device_ioctl` -> `sock_shutdown`, drivers/block/nbd.c, 6.1 and 6.12 alike) takes
/// each connection's `tx_lock`; a task writing a request to the device may hold that lock while
/// blocked in `sendmsg` on a full socket, and the kernel sets no send timeout without a request
/// timeout. The socket would drain only when its server end closes, which happens when the
/// process's descriptor table is released, which waits for every thread, the DO_IT thread
/// included: a deadlock. With a send timeout the blocked sender gives up (EAGAIN: "Send control
/// failed", the request requeued and then failed), the clean-up goes on and fails what is in
/// flight with EIO (`nbd_clear_que`), and the process exits.
///
/// (Giving the DO_IT thread a descriptor table of its own, so that the server ends close at
/// once, is no cure: the receive workers then see EOF and DO_IT may return normally before the
/// kill interrupts it, skipping that clean-up; with no request timeout the requests in flight
/// then never end. Seen in the VM suite on 6.1.)
pub(crate) const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Configures `path` and starts DO_IT on a thread of its own. Returns once every ioctl before
/// DO_IT succeeded (DO_IT itself may still fail at once: watch the thread) or with the first
/// failure. The kernel ends are closed here once the kernel holds them; each gets the
/// [`SEND_TIMEOUT`] first.
pub(crate) fn start(
    path: &Path,
    config: IoctlConfig,
    kernel_ends: Vec<UnixStream>,
) -> Result<DoIt, SetupError> {
    for end in &kernel_ends {
        let secs = i64::try_from(SEND_TIMEOUT.as_secs()).unwrap_or(i64::MAX);
        setsockopt(end, sockopt::SendTimeout, &TimeVal::new(secs, 0)).map_err(|e| SetupError {
            ioctl: Some(NbdIoctl::SetSock),
            source: e.into(),
        })?;
    }
    let (ready_tx, ready_rx) = mpsc::channel::<Result<Arc<NbdNode>, SetupError>>();
    let path = path.to_path_buf();
    let thread = thread::Builder::new()
        .name("userblk-nbd-doit".into())
        .spawn(move || -> io::Result<()> {
            block_signals();
            let node = match open_device(&path) {
                Ok(n) => Arc::new(n),
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Ok(());
                }
            };
            let setup =
                socket_args(&kernel_ends).and_then(|socks| configure(&mut &*node, config, &socks));
            drop(kernel_ends);
            if let Err(e) = setup {
                let _ = ready_tx.send(Err(e));
                return Ok(());
            }
            let _ = ready_tx.send(Ok(Arc::clone(&node)));
            let result = nbd_ioctl(&node, NbdIoctl::DoIt, 0);
            let _ = nbd_ioctl(&node, NbdIoctl::ClearSock, 0);
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

/// The NBD ioctls the set-up issues: on the device, or in tests on a recorder.
pub(crate) trait NbdCalls {
    /// Issues `ioctl` with `arg`.
    fn call(&mut self, ioctl: NbdIoctl, arg: u64) -> io::Result<()>;
}

impl NbdCalls for &NbdNode {
    fn call(&mut self, ioctl: NbdIoctl, arg: u64) -> io::Result<()> {
        nbd_ioctl(self, ioctl, arg)
    }
}

/// The kernel ends' descriptors as SET_SOCK arguments.
fn socket_args(kernel_ends: &[UnixStream]) -> Result<Vec<u64>, SetupError> {
    kernel_ends
        .iter()
        .map(|s| {
            u64::try_from(s.as_raw_fd()).map_err(|_| SetupError {
                ioctl: Some(NbdIoctl::SetSock),
                source: io::Error::from_raw_os_error(nix::libc::EBADF),
            })
        })
        .collect()
}

/// Everything before DO_IT. The first SET_SOCK claims the device (EBUSY if another task is
/// setting it up or it runs), so nothing changes a device that is not ours; on a failure after
/// the claim, CLEAR_SOCK releases it (our sockets only).
pub(crate) fn configure(
    calls: &mut impl NbdCalls,
    c: IoctlConfig,
    socks: &[u64],
) -> Result<(), SetupError> {
    let mut call = |ioctl: NbdIoctl, arg: u64| {
        calls.call(ioctl, arg).map_err(|source| SetupError {
            ioctl: Some(ioctl),
            source,
        })
    };
    let Some((&first, rest)) = socks.split_first() else {
        return Err(SetupError {
            ioctl: Some(NbdIoctl::SetSock),
            source: io::Error::from_raw_os_error(nix::libc::EINVAL),
        });
    };
    call(NbdIoctl::SetSock, first)?;
    let claimed = (|| {
        call(NbdIoctl::SetBlksize, u64::from(c.block_size))?;
        call(NbdIoctl::SetSizeBlocks, c.size / u64::from(c.block_size))?;
        call(NbdIoctl::SetFlags, c.flags)?;
        if c.timeout > 0 {
            call(NbdIoctl::SetTimeout, c.timeout)?;
        }
        for &s in rest {
            call(NbdIoctl::SetSock, s)?;
        }
        Ok(())
    })();
    if claimed.is_err() {
        let _ = calls.call(NbdIoctl::ClearSock, 0);
    }
    claimed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the calls, failing the `nth` call to `fail_on` with `errno`.
    #[derive(Default)]
    struct Recorder {
        calls: Vec<(NbdIoctl, u64)>,
        fail: Option<(NbdIoctl, usize, i32)>,
    }

    impl NbdCalls for Recorder {
        fn call(&mut self, ioctl: NbdIoctl, arg: u64) -> io::Result<()> {
            self.calls.push((ioctl, arg));
            if let Some((which, nth, errno)) = self.fail {
                let seen = self.calls.iter().filter(|(i, _)| *i == which).count();
                if which == ioctl && seen == nth {
                    return Err(io::Error::from_raw_os_error(errno));
                }
            }
            Ok(())
        }
    }

    const CONFIG: IoctlConfig = IoctlConfig {
        block_size: 4096,
        size: 64 << 20,
        flags: 0x10d,
        timeout: 30,
    };

    #[test]
    fn the_first_call_claims_the_device_and_nothing_clears_it() {
        let mut r = Recorder::default();
        configure(&mut r, CONFIG, &[5, 6]).unwrap();
        use NbdIoctl::*;
        assert_eq!(
            r.calls,
            [
                (SetSock, 5),
                (SetBlksize, 4096),
                (SetSizeBlocks, 16384),
                (SetFlags, 0x10d),
                (SetTimeout, 30),
                (SetSock, 6),
            ]
        );
    }

    /// Another task is setting the device up (or runs it): the kernel refuses our SET_SOCK with
    /// EBUSY, and then nothing else is sent: no size, and above all no CLEAR_SOCK, which would
    /// have shut down the other task's sockets.
    #[test]
    fn a_device_claimed_by_another_task_is_left_alone() {
        let mut r = Recorder {
            fail: Some((NbdIoctl::SetSock, 1, nix::libc::EBUSY)),
            ..Recorder::default()
        };
        let e = configure(&mut r, CONFIG, &[5]).unwrap_err();
        assert_eq!(e.ioctl, Some(NbdIoctl::SetSock));
        assert_eq!(e.source.raw_os_error(), Some(nix::libc::EBUSY));
        assert_eq!(r.calls, [(NbdIoctl::SetSock, 5)]);
    }

    /// A failure once the device is ours releases it: CLEAR_SOCK, last and once.
    #[test]
    fn a_failure_after_the_claim_releases_our_claim_only() {
        for (fail, nth) in [(NbdIoctl::SetBlksize, 1), (NbdIoctl::SetSock, 2)] {
            let mut r = Recorder {
                fail: Some((fail, nth, nix::libc::EINVAL)),
                ..Recorder::default()
            };
            let e = configure(&mut r, CONFIG, &[5, 6]).unwrap_err();
            assert_eq!(e.ioctl, Some(fail));
            assert_eq!(r.calls.first(), Some(&(NbdIoctl::SetSock, 5)));
            assert_eq!(r.calls.last(), Some(&(NbdIoctl::ClearSock, 0)));
            let clears = r.calls.iter().filter(|(i, _)| *i == NbdIoctl::ClearSock);
            assert_eq!(clears.count(), 1, "{fail:?}: {:?}", r.calls);
        }
    }

    #[test]
    fn no_socket_is_an_error_before_any_call() {
        let mut r = Recorder::default();
        assert!(configure(&mut r, CONFIG, &[]).is_err());
        assert!(r.calls.is_empty());
    }
}
