//! [`UblkHandle`]: the remote control of a device served through ublk, and the state the
//! supervisor, its queue threads and the caller share.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::mount::block_device_path;
use crate::link::signals::OnSignal;
use crate::link::Export;

#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) id: Option<u32>,
    pub(super) export: Option<Export>,
    pub(super) queues: u16,
    pub(super) depth: u16,
    pub(super) live: bool,
    pub(super) ended: bool,
    pub(super) stop: bool,
    pub(super) queues_ready: u16,
    /// Queues ready, or ended before they were.
    pub(super) queues_settled: u16,
    pub(super) queue_ended: bool,
    pub(super) signal: Option<&'static str>,
    pub(super) features: Option<u64>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

/// The remote control of a device served through ublk: which device it is, and
/// [`unmount`](Self::unmount) from any thread. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct UblkHandle {
    shared: Arc<Shared>,
}

impl UblkHandle {
    pub(super) fn new() -> UblkHandle {
        UblkHandle::default()
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.lock());
        self.shared.changed.notify_all();
    }

    pub(super) fn wait_until(&self, mut done: impl FnMut(&State) -> bool) {
        let mut state = self.lock();
        while !done(&state) {
            state = self
                .shared
                .changed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// Waits until the device is live (true) or serving ended first (false); `finished` tells
    /// whether the serving thread is gone, checked now and then in case it died unannounced.
    pub(super) fn wait_started(&self, finished: impl Fn() -> bool) -> bool {
        let mut state = self.lock();
        loop {
            if state.live {
                return true;
            }
            if state.ended || finished() {
                return false;
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, Duration::from_millis(100))
                .map(|(s, _)| s)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
        }
    }

    /// The device id, once the kernel gave one.
    pub fn id(&self) -> Option<u32> {
        self.lock().id
    }

    /// The block device, `/dev/ublkbN` (`/dev/ublkb?` before the kernel gave an id).
    pub fn device(&self) -> PathBuf {
        self.id()
            .map_or_else(|| PathBuf::from("/dev/ublkb?"), block_device_path)
    }

    /// The export as served (size, block size, flags), once started.
    pub fn export(&self) -> Option<Export> {
        self.lock().export
    }

    /// Queues and depth as the kernel took them (the queues are capped at the CPUs).
    pub fn queues(&self) -> (u16, u16) {
        let s = self.lock();
        (s.queues, s.depth)
    }

    /// The driver's `UBLK_F_*` feature bits (GET_FEATURES), `None` before Linux 6.5 or before
    /// the control device was opened.
    pub fn kernel_features(&self) -> Option<u64> {
        self.lock().features
    }

    /// Whether `/dev/ublkbN` exists and is being served.
    pub fn is_mounted(&self) -> bool {
        let s = self.lock();
        s.live && !s.ended
    }

    /// The signal that stopped serving, if one did.
    pub fn signal(&self) -> Option<&'static str> {
        self.lock().signal
    }

    /// Asks for the device to be stopped and deleted: `/dev/ublkbN` goes away once the
    /// requests in flight are answered. Returns at once; [`Mounted::unmount`](super::Mounted::unmount) waits.
    pub fn unmount(&self) {
        self.update(|s| s.stop = true);
    }
}

impl OnSignal for UblkHandle {
    fn record(&self, name: &'static str) {
        self.update(|s| {
            s.signal.get_or_insert(name);
        });
    }
    fn stop(&self) {
        self.unmount();
    }
    fn stop_now(&self) {
        self.unmount();
    }
}
