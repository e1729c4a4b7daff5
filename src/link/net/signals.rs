//! Stopping a listener on SIGINT and SIGTERM: the signals are blocked in the thread that listens
//! (and so in every thread it starts), and one thread waits for them with `sigwait`. No handler
//! runs, so nothing async-signal-unsafe can happen. The first signal stops cleanly; a second
//! closes every connection at once.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};

use nix::sys::pthread::{pthread_kill, pthread_self, Pthread};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};

use super::listener::NetHandle;

/// The signal waiter of one listener.
#[derive(Debug)]
pub(crate) struct SignalWatch {
    thread: JoinHandle<()>,
    waiter: Pthread,
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
    /// Blocks SIGINT and SIGTERM in the calling thread and starts the waiter.
    pub(crate) fn start(handle: NetHandle) -> io::Result<SignalWatch> {
        let set = watched();
        let previous_mask = set.thread_swap_mask(SigmaskHow::SIG_BLOCK)?;
        let done = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&done);
        let (tx, rx) = mpsc::channel();
        let spawned = thread::Builder::new()
            .name("userblk-signals".into())
            .spawn(move || {
                let _ = tx.send(pthread_self());
                let mut seen = 0;
                loop {
                    let Ok(signal) = set.wait() else {
                        // sigwait fails only on a bad set; stay until told to stop.
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
                        handle.stop();
                    } else {
                        handle.stop_now();
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
        let waiter = rx
            .recv()
            .map_err(|_| io::Error::other("the signal thread died at start"))?;
        Ok(SignalWatch {
            thread,
            waiter,
            done,
            previous_mask,
        })
    }

    /// Ends the waiter and restores the calling thread's signal mask.
    pub(crate) fn stop(self) {
        self.done.store(true, Ordering::SeqCst);
        // The waiter is in sigwait: a SIGTERM aimed at that thread alone wakes it.
        let _ = pthread_kill(self.waiter, Signal::SIGTERM);
        self.thread.thread().unpark();
        let _ = self.thread.join();
        let _ = self.previous_mask.thread_set_mask();
    }
}
