//! Unmounting on SIGINT and SIGTERM: the signals are blocked in the thread that mounts (and so in
//! every thread it starts), and one thread waits for them with `sigwait`. No signal handler runs,
//! so nothing async-signal-unsafe can happen, and DO_IT is never interrupted.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::{io, panic};

use nix::sys::signal::{SigSet, SigmaskHow, Signal};

use super::link::MountHandle;
use super::sys;

/// The signal waiter of one mount. Stopping it, or dropping it (a panic in the mount's callback
/// unwinds through it), ends the waiter and gives the thread that started it its signal mask
/// back, so SIGINT and SIGTERM are neither left blocked nor swallowed after the mount.
///
/// Not `Send`: the mask is per thread, so it must be restored on the thread that blocked it.
#[derive(Debug)]
pub(crate) struct SignalWatch {
    /// `None` once stopped.
    thread: Option<JoinHandle<()>>,
    done: Arc<AtomicBool>,
    previous_mask: SigSet,
    _same_thread: PhantomData<*const ()>,
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
        let stop = Arc::clone(&done);
        let spawned = thread::Builder::new()
            .name("userblk-signals".into())
            .spawn(move || {
                let mut seen = 0;
                loop {
                    let Ok(signal) = set.wait() else {
                        // Never seen in practice (sigwait fails only on a bad set); stay alive
                        // until told to stop.
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
        match spawned {
            Ok(thread) => Ok(SignalWatch {
                thread: Some(thread),
                done,
                previous_mask,
                _same_thread: PhantomData,
            }),
            Err(e) => {
                let _ = previous_mask.thread_set_mask();
                Err(e)
            }
        }
    }

    /// Stops the waiter and restores the calling thread's signal mask; a panic in the waiter
    /// goes on here.
    pub(crate) fn stop(mut self) {
        if let Some(payload) = self.end() {
            panic::resume_unwind(payload);
        }
    }

    /// Ends the waiter (once) and restores the mask; returns the waiter's panic, if any.
    fn end(&mut self) -> Option<Box<dyn std::any::Any + Send>> {
        let thread = self.thread.take()?;
        self.done.store(true, Ordering::SeqCst);
        // SIGTERM is blocked in the waiter, so this only wakes its sigwait, which sees `done`.
        let payload = match sys::signal_thread(&thread, Signal::SIGTERM) {
            Ok(()) => thread.join().err(),
            // Cannot happen for a thread we have not joined; if it did, the waiter would be
            // left detached, parked in sigwait, harmless.
            Err(_) => None,
        };
        let _ = self.previous_mask.thread_set_mask();
        payload
    }
}

impl Drop for SignalWatch {
    fn drop(&mut self) {
        // While unwinding, a second panic would abort: the waiter's is dropped.
        let _ = self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::nbd::MountOptions;
    use std::time::{Duration, Instant};

    fn blocked(signal: Signal) -> bool {
        SigSet::thread_get_mask().unwrap().contains(signal)
    }

    #[test]
    fn a_signal_asks_for_the_unmount_and_stop_ends_the_waiter() {
        // A thread of its own, so that the mask seen is this test's alone.
        thread::spawn(|| {
            let link = MountOptions::new().link();
            let handle = link.handle();
            let watch = SignalWatch::start(handle.clone()).unwrap();
            assert!(blocked(Signal::SIGINT) && blocked(Signal::SIGTERM));
            // Directed at the waiter: a process-wide SIGINT would reach the harness's threads.
            let waiter = watch.thread.as_ref().unwrap();
            sys::signal_thread(waiter, Signal::SIGINT).unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            while handle.signal().is_none() {
                assert!(Instant::now() < deadline, "the waiter never saw SIGINT");
                thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(handle.signal(), Some("SIGINT"));
            watch.stop();
            // The mask is back: the signals are not blocked in this thread any more.
            assert!(!blocked(Signal::SIGINT) && !blocked(Signal::SIGTERM));
        })
        .join()
        .unwrap();
    }

    /// A panic in the mount's callback unwinds through the watch: dropping it must end the
    /// waiter and unblock SIGINT and SIGTERM in the thread, or Ctrl+C would be swallowed for
    /// the rest of the program.
    #[test]
    fn a_watch_dropped_by_a_panic_restores_the_signal_mask() {
        thread::spawn(|| {
            assert!(!blocked(Signal::SIGINT) && !blocked(Signal::SIGTERM));
            let handle = MountOptions::new().link().handle();
            let waiter_alive = std::sync::Mutex::new(None);
            let result = panic::catch_unwind(panic::AssertUnwindSafe(|| {
                let watch = SignalWatch::start(handle.clone()).unwrap();
                assert!(blocked(Signal::SIGINT) && blocked(Signal::SIGTERM));
                *waiter_alive.lock().unwrap() = Some(Arc::clone(&watch.done));
                panic!("the mount callback failed");
            }));
            assert!(result.is_err());
            assert!(
                !blocked(Signal::SIGINT),
                "SIGINT left blocked after the panic"
            );
            assert!(
                !blocked(Signal::SIGTERM),
                "SIGTERM left blocked after the panic"
            );
            // And the waiter was told to stop (and joined, or `drop` would not have returned).
            let done = waiter_alive.lock().unwrap().take().unwrap();
            assert!(done.load(Ordering::SeqCst));
        })
        .join()
        .unwrap();
    }
}
