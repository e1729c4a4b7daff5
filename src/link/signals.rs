//! Acting on SIGINT and SIGTERM, for every link: the signals are blocked in the thread that
//! serves (and so in every thread it starts), and one thread waits for them with `sigwait`. No
//! signal handler runs, so nothing async-signal-unsafe can happen and no system call of the
//! link is interrupted. What a signal does is the link's: the first asks for a clean stop, a
//! second for an immediate one ([`OnSignal`]).

use std::marker::PhantomData;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;
use std::{io, panic};

use nix::sys::pthread::pthread_kill;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};

/// What a link does when SIGINT or SIGTERM arrives. Called on the waiter thread, so
/// [`stop`](Self::stop) must return promptly: the next signal is only heard once it has.
pub(crate) trait OnSignal: Send + 'static {
    /// Notes the signal (`"SIGINT"` or `"SIGTERM"`), before it is acted on.
    fn record(&self, name: &'static str);
    /// The first signal: stop cleanly, finishing what is in flight.
    fn stop(&self);
    /// Every later signal: stop at once.
    fn stop_now(&self);
}

/// The signal waiter of one serving run. Stopping it, or dropping it (a panic in the user's
/// callback unwinds through it), ends the waiter and gives the thread that started it its
/// signal mask back, so SIGINT and SIGTERM are neither left blocked nor swallowed afterwards.
///
/// Not `Send`: the mask is per thread, so it must be restored on the thread that blocked it.
#[derive(Debug)]
pub(crate) struct SignalWatch {
    /// `None` once ended.
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
    /// Blocks SIGINT and SIGTERM in the calling thread and starts the waiter, which calls
    /// `on.stop()` on the first signal and `on.stop_now()` on every later one.
    pub(crate) fn start(on: impl OnSignal) -> io::Result<SignalWatch> {
        let set = watched();
        let previous_mask = set.thread_swap_mask(SigmaskHow::SIG_BLOCK)?;
        let done = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&done);
        let spawned = thread::Builder::new()
            .name("userblk-signals".into())
            .spawn(move || {
                let mut seen = 0u32;
                loop {
                    let Ok(signal) = set.wait() else {
                        // sigwait fails only on a bad set, never seen in practice; stay alive
                        // until told to stop.
                        while !stop.load(Ordering::SeqCst) {
                            thread::park_timeout(Duration::from_millis(100));
                        }
                        return;
                    };
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    seen = seen.saturating_add(1);
                    on.record(signal.as_str());
                    if seen == 1 {
                        on.stop();
                    } else {
                        on.stop_now();
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
        // The id is valid: a JoinHandle neither joined (that consumes it) nor dropped (that
        // detaches the thread) keeps its pthread_t alive even after the thread has returned.
        let payload = match pthread_kill(thread.as_pthread_t(), Signal::SIGTERM) {
            Ok(()) => {
                thread.thread().unpark();
                thread.join().err()
            }
            // Cannot happen for a thread not yet joined; if it did, the waiter would be left
            // detached, parked in sigwait, harmless.
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
    use std::sync::mpsc::{self, Receiver, Sender};
    use std::time::Instant;

    fn blocked(signal: Signal) -> bool {
        SigSet::thread_get_mask().unwrap().contains(signal)
    }

    /// Sends `signal` to the waiter alone: a process-wide one would reach the test harness.
    fn signal_waiter(watch: &SignalWatch, signal: Signal) {
        let waiter = watch.thread.as_ref().unwrap();
        pthread_kill(waiter.as_pthread_t(), signal).unwrap();
    }

    /// Tells the test what the waiter called, in order.
    struct Calls(Sender<String>);

    impl OnSignal for Calls {
        fn record(&self, name: &'static str) {
            let _ = self.0.send(format!("record {name}"));
        }
        fn stop(&self) {
            let _ = self.0.send("stop".into());
        }
        fn stop_now(&self) {
            let _ = self.0.send("stop_now".into());
        }
    }

    fn next(calls: &Receiver<String>) -> String {
        // A timeout only so that a broken waiter fails the test instead of hanging it.
        calls
            .recv_timeout(Duration::from_secs(10))
            .expect("the waiter did not act on the signal")
    }

    #[test]
    fn the_first_signal_stops_and_a_second_stops_at_once() {
        // A thread of its own, so that the mask seen is this test's alone.
        thread::spawn(|| {
            let (tx, calls) = mpsc::channel();
            let watch = SignalWatch::start(Calls(tx)).unwrap();
            assert!(blocked(Signal::SIGINT) && blocked(Signal::SIGTERM));
            signal_waiter(&watch, Signal::SIGINT);
            assert_eq!(next(&calls), "record SIGINT");
            assert_eq!(next(&calls), "stop");
            signal_waiter(&watch, Signal::SIGTERM);
            assert_eq!(next(&calls), "record SIGTERM");
            assert_eq!(next(&calls), "stop_now");
            signal_waiter(&watch, Signal::SIGINT);
            assert_eq!(next(&calls), "record SIGINT");
            assert_eq!(next(&calls), "stop_now");
            watch.stop();
            assert!(!blocked(Signal::SIGINT) && !blocked(Signal::SIGTERM));
            // Stopping the watch is not a signal: the waiter ended without calling anything.
            assert!(calls.recv().is_err(), "the waiter acted on its own wake-up");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_signal_asks_the_nbd_link_for_the_unmount_and_stop_ends_the_waiter() {
        thread::spawn(|| {
            let handle = MountOptions::new().link().handle();
            let watch = SignalWatch::start(handle.clone()).unwrap();
            assert!(blocked(Signal::SIGINT) && blocked(Signal::SIGTERM));
            signal_waiter(&watch, Signal::SIGINT);
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

    /// A panic in the user's callback unwinds through the watch: dropping it must end the
    /// waiter and unblock SIGINT and SIGTERM in the thread, or Ctrl+C would be swallowed for
    /// the rest of the program.
    #[test]
    fn a_watch_dropped_by_a_panic_restores_the_signal_mask() {
        thread::spawn(|| {
            assert!(!blocked(Signal::SIGINT) && !blocked(Signal::SIGTERM));
            let (tx, calls) = mpsc::channel();
            let waiter_told = std::sync::Mutex::new(None);
            let result = panic::catch_unwind(panic::AssertUnwindSafe(|| {
                let watch = SignalWatch::start(Calls(tx)).unwrap();
                assert!(blocked(Signal::SIGINT) && blocked(Signal::SIGTERM));
                *waiter_told.lock().unwrap() = Some(Arc::clone(&watch.done));
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
            // And the waiter was told to stop and joined: its end of the channel is gone.
            let done = waiter_told.lock().unwrap().take().unwrap();
            assert!(done.load(Ordering::SeqCst));
            assert!(calls.recv().is_err(), "the waiter outlived the watch");
        })
        .join()
        .unwrap();
    }
}
