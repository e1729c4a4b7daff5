//! Unmounting on SIGINT and SIGTERM: the signals are blocked in the thread that mounts (and so in
//! every thread it starts), and one thread waits for them with `sigwait`. No signal handler runs,
//! so nothing async-signal-unsafe can happen, and DO_IT is never interrupted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::{io, panic};

use nix::sys::signal::{SigSet, SigmaskHow, Signal};

use super::link::MountHandle;
use super::sys::{self, PthreadId};

/// The signal waiter of one mount.
#[derive(Debug)]
pub(crate) struct SignalWatch {
    thread: JoinHandle<()>,
    waiter: PthreadId,
    done: Arc<AtomicBool>,
    previous_mask: SigSet,
}

fn watched() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set
}

impl SignalWatch {
    /// Blocks SIGINT and SIGTERM in the calling thread and starts the waiter: the first signal
    /// unmounts (flush, then DISC) from a thread of its own; a second disconnects at once.
    pub(crate) fn start(handle: MountHandle) -> io::Result<SignalWatch> {
        let set = watched();
        let previous_mask = set.thread_swap_mask(SigmaskHow::SIG_BLOCK)?;
        let done = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let stop = Arc::clone(&done);
        let spawned = thread::Builder::new()
            .name("userblk-signals".into())
            .spawn(move || {
                let _ = tx.send(sys::current_thread());
                let mut seen = 0;
                loop {
                    let Ok(signal) = set.wait() else {
                        // Never seen in practice (sigwait fails only on a bad set); stay alive
                        // until told to stop, as `stop` relies on.
                        while !stop.load(Ordering::SeqCst) {
                            thread::park_timeout(std::time::Duration::from_millis(100));
                        }
                        return;
                    };
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    seen += 1;
                    handle.record_signal(signal.as_str());
                    if seen == 1 {
                        let h = handle.clone();
                        // The flush may take a while; the next signal must still be heard.
                        let _ = thread::Builder::new().name("userblk-unmount".into()).spawn(
                            move || {
                                let _ = h.unmount();
                            },
                        );
                    } else {
                        let _ = handle.disconnect();
                    }
                }
            });
        let thread = match spawned {
            Ok(t) => t,
            Err(e) => {
                let _ = previous_mask.thread_set_mask();
                return Err(e);
            }
        };
        let Ok(waiter) = rx.recv() else {
            let _ = previous_mask.thread_set_mask();
            return Err(io::Error::other("the signal thread stopped unexpectedly"));
        };
        Ok(SignalWatch {
            thread,
            waiter,
            done,
            previous_mask,
        })
    }

    /// Stops the waiter and restores the calling thread's signal mask. Call it from the thread
    /// that called `start`.
    pub(crate) fn stop(self) {
        self.done.store(true, Ordering::SeqCst);
        // The waiter only returns after `done`, so it is alive to receive this.
        if sys::signal_thread(self.waiter, Signal::SIGTERM).is_ok() {
            if let Err(payload) = self.thread.join() {
                panic::resume_unwind(payload);
            }
        }
        let _ = self.previous_mask.thread_set_mask();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::nbd::MountOptions;
    use std::time::{Duration, Instant};

    #[test]
    fn a_signal_asks_for_the_unmount_and_stop_ends_the_waiter() {
        let link = MountOptions::new().link();
        let handle = link.handle();
        let watch = SignalWatch::start(handle.clone()).unwrap();
        // Directed at the waiter: a process-wide SIGINT would reach the test harness's threads.
        sys::signal_thread(watch.waiter, Signal::SIGINT).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while handle.signal().is_none() {
            assert!(Instant::now() < deadline, "the waiter never saw SIGINT");
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(handle.signal(), Some("SIGINT"));
        watch.stop();
        // The mask is back: SIGINT is not blocked in this thread any more.
        let mask = SigSet::thread_get_mask().unwrap();
        assert!(!mask.contains(Signal::SIGINT));
    }
}
