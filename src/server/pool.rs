//! [`BufferPool`]: the memory of the requests in flight, bounded in bytes and recycled.
//!
//! Every request read from a connection is charged to the pool from its header until its reply
//! has been written: its data buffer (READ or WRITE) plus a fixed amount for its bookkeeping. A
//! reader whose request does not fit waits (back-pressure: further requests stay in the socket,
//! and the kernel waits), so the memory held is bounded however long the run and whatever the
//! request sizes. The bound counts the free buffers kept for reuse too: the pool never holds
//! more than its limit. A request larger than the whole limit is admitted alone, when nothing
//! else is in flight, so that no request can wait forever.
//!
//! Buffers come in power-of-two sizes and are recycled by size, so a warm pool serves a request
//! with no allocation and no clearing: a buffer comes back with whatever its last request left in
//! it (the dispatcher fills READ buffers before the device sees them).
//!
//! Waiters are served in arrival order, and returning memory wakes every waiter that can then
//! proceed (each admitted waiter passes the turn to the next), so a large request is not starved
//! by small ones.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// What a request costs beyond its data buffer: its reply header and bookkeeping. Small, but not
/// zero, so that a flood of FLUSH or rejected requests whose replies cannot be written (a client
/// that does not read) is bounded too.
pub(super) const REQUEST_OVERHEAD: usize = 64;

/// The smallest buffer: one 512-byte block.
const MIN_CLASS: u32 = 9;

/// Size classes: `1 << class` bytes, up to 4 GiB (a u32 length rounded up).
const CLASSES: usize = 33;

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A request's data buffer, charged to the pool until given back.
#[derive(Debug)]
pub(crate) struct Buffer {
    /// `1 << class` bytes long (empty for a request without data); only `..len` is the request's.
    /// (A buffer an asynchronous device made itself may be any length: it is freed, not kept.)
    data: Vec<u8>,
    len: usize,
    /// What the pool charged for it: its allocation plus the request's overhead, or 0 while the
    /// charge is held elsewhere (an [`IoBuf`](crate::async_device::IoBuf) lent to a device).
    charge: usize,
}

impl Buffer {
    /// A buffer outside the pool, charged nothing: `data` whole is the request's.
    pub(crate) fn from_vec(data: Vec<u8>) -> Buffer {
        let len = data.len();
        Buffer {
            data,
            len,
            charge: 0,
        }
    }

    /// The bytes and their length, for a buffer leaving the pool's accounting.
    pub(crate) fn into_parts(self) -> (Vec<u8>, usize) {
        (self.data, self.len)
    }

    /// Shortens the request's part to `len` bytes (no-op if longer).
    pub(crate) fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Moves the pool's charge out (the buffer is being lent), or back in.
    pub(crate) fn take_charge(&mut self) -> usize {
        std::mem::take(&mut self.charge)
    }

    /// See [`take_charge`](Self::take_charge).
    pub(crate) fn add_charge(&mut self, charge: usize) {
        self.charge += charge;
    }

    /// An empty buffer carrying `charge`: what is given back for a lent buffer that never came
    /// back (the device's future panicked or was dropped with it).
    pub(crate) fn lost(charge: usize) -> Buffer {
        Buffer {
            data: Vec::new(),
            len: 0,
            charge,
        }
    }

    /// The request's bytes.
    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.data[..self.len]
    }

    /// The request's bytes, to fill.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.data[..self.len]
    }
}

/// The memory of one server's requests in flight: see the module documentation.
#[derive(Debug)]
pub(super) struct BufferPool {
    state: Mutex<PoolState>,
    turn: Condvar,
    limit: usize,
}

#[derive(Debug)]
struct PoolState {
    /// Free buffers by size class; a buffer in `free[c]` is `1 << c` bytes.
    free: Vec<Vec<Vec<u8>>>,
    free_bytes: usize,
    /// Bytes charged to requests in flight.
    in_use: usize,
    /// Requests in flight.
    requests: usize,
    /// Waiters are served in ticket order: `next_ticket` is the next to hand out, `serving` the
    /// one whose turn it is.
    next_ticket: u64,
    serving: u64,
    closed: bool,
}

impl PoolState {
    fn waiting(&self) -> bool {
        self.serving != self.next_ticket
    }
}

/// The size class of a `len`-byte buffer.
fn class_of(len: usize) -> usize {
    let bits = usize::BITS - len.saturating_sub(1).leading_zeros();
    bits.max(MIN_CLASS) as usize
}

impl BufferPool {
    /// A pool holding at most `limit` bytes (in flight and free), beyond one oversized request.
    pub(super) fn new(limit: usize) -> BufferPool {
        BufferPool {
            state: Mutex::new(PoolState {
                free: (0..CLASSES).map(|_| Vec::new()).collect(),
                free_bytes: 0,
                in_use: 0,
                requests: 0,
                next_ticket: 0,
                serving: 0,
                closed: false,
            }),
            turn: Condvar::new(),
            limit,
        }
    }

    /// Waits until a request with `len` bytes of data fits, then returns its buffer (contents
    /// unspecified). `None` once the pool is closed. `before_wait` runs (once, without the pool's
    /// lock) before waiting: the caller writes the replies it holds back, whose memory may be what
    /// is missing.
    pub(super) fn take(&self, len: usize, before_wait: impl FnOnce()) -> Option<Buffer> {
        let class = (len > 0).then(|| class_of(len)).filter(|&c| c < CLASSES);
        let size = class.map_or(0, |c| 1usize << c);
        if len > 0 && class.is_none() {
            // Larger than any buffer the pool makes (validation keeps this from happening).
            return None;
        }
        let charge = size + REQUEST_OVERHEAD;
        let mut st = lock(&self.state);
        if !st.closed && (st.waiting() || !self.fits(&st, charge)) {
            drop(st);
            before_wait();
            st = lock(&self.state);
            let ticket = st.next_ticket;
            st.next_ticket += 1;
            while !st.closed && (st.serving != ticket || !self.fits(&st, charge)) {
                st = self.turn.wait(st).unwrap_or_else(PoisonError::into_inner);
            }
            if !st.closed {
                st.serving += 1;
                if st.waiting() {
                    // The next waiter may fit too.
                    self.turn.notify_all();
                }
            }
        }
        if st.closed {
            return None;
        }
        st.in_use += charge;
        st.requests += 1;
        let Some(class) = class else {
            return Some(Buffer {
                data: Vec::new(),
                len: 0,
                charge,
            });
        };
        if let Some(data) = st.free[class].pop() {
            st.free_bytes -= size;
            return Some(Buffer { data, len, charge });
        }
        // A new buffer: make room among the free ones first, so that the pool's total stays
        // within its limit. (Rare: only when the mix of request sizes changes.)
        let mut c = CLASSES;
        while st.in_use + st.free_bytes > self.limit && st.free_bytes > 0 && c > 0 {
            c -= 1;
            while st.in_use + st.free_bytes > self.limit {
                let Some(evicted) = st.free[c].pop() else {
                    break;
                };
                st.free_bytes -= evicted.len();
            }
        }
        drop(st);
        Some(Buffer {
            data: vec![0u8; size],
            len,
            charge,
        })
    }

    /// Whether a request charged `charge` may be admitted now: it fits beside those in flight,
    /// or nothing else is in flight (a request larger than the limit goes alone).
    fn fits(&self, st: &PoolState, charge: usize) -> bool {
        st.in_use == 0 || st.in_use + charge <= self.limit
    }

    /// Returns the buffers of finished requests (one lock for all of them).
    pub(super) fn give(&self, bufs: impl Iterator<Item = Buffer>) {
        let mut st = lock(&self.state);
        for buf in bufs {
            st.in_use -= buf.charge;
            st.requests -= 1;
            let size = buf.data.len();
            if size < 1 << MIN_CLASS || !size.is_power_of_two() || class_of(size) >= CLASSES {
                // Empty, or a device's own buffer of another shape: not one the pool reuses.
                continue;
            }
            // Kept for reuse while the pool stays within its limit; freed otherwise.
            if st.in_use + st.free_bytes + size <= self.limit {
                st.free_bytes += size;
                st.free[class_of(size)].push(buf.data);
            }
        }
        let wake = st.waiting();
        drop(st);
        if wake {
            self.turn.notify_all();
        }
    }

    /// Refuses further requests and wakes every waiter.
    pub(super) fn close(&self) {
        lock(&self.state).closed = true;
        self.turn.notify_all();
    }

    /// Requests in flight (taken and not given back).
    pub(super) fn in_flight(&self) -> usize {
        lock(&self.state).requests
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    const K: usize = 1024;

    #[test]
    fn classes_are_powers_of_two_from_one_block() {
        assert_eq!(class_of(1), 9);
        assert_eq!(class_of(512), 9);
        assert_eq!(class_of(513), 10);
        assert_eq!(class_of(4096), 12);
        assert_eq!(class_of(32 << 20), 25);
        assert_eq!(class_of(u32::MAX as usize), 32);
    }

    #[test]
    fn buffers_are_reused_by_size() {
        let pool = BufferPool::new(1 << 20);
        let b = pool.take(4096, || {}).unwrap();
        let ptr = b.as_slice().as_ptr();
        pool.give(std::iter::once(b));
        let b = pool.take(3 * K, || {}).unwrap();
        assert_eq!(b.as_slice().as_ptr(), ptr, "same class, same buffer");
        assert_eq!(b.as_slice().len(), 3 * K);
        let c = pool.take(64 * K, || {}).unwrap();
        assert_ne!(c.as_slice().as_ptr(), ptr);
        pool.give([b, c].into_iter());
        assert_eq!(pool.in_flight(), 0);
    }

    /// The limit counts data and overhead: a reader that does not fit waits until enough comes
    /// back, and then every waiter that fits proceeds, in order.
    #[test]
    fn memory_is_bounded_in_bytes_and_freed_memory_wakes_every_waiter_that_fits() {
        let pool = BufferPool::new(64 * K + 4 * REQUEST_OVERHEAD);
        let big = pool.take(64 * K, || {}).unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|s| {
            for i in 0..3 {
                let (pool, tx) = (&pool, tx.clone());
                s.spawn(move || {
                    let b = pool.take(16 * K, || {}).unwrap();
                    tx.send(i).unwrap();
                    // Held until all three are in: they fit together.
                    std::thread::sleep(Duration::from_millis(100));
                    pool.give(std::iter::once(b));
                });
            }
            // Nobody fits beside the 64 KiB request.
            assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
            pool.give(std::iter::once(big));
            // One give admits all three: 48 KiB fit in 64 KiB.
            let mut got: Vec<_> = (0..3).map(|_| rx.recv().unwrap()).collect();
            got.sort();
            assert_eq!(got, [0, 1, 2]);
        });
        assert_eq!(pool.in_flight(), 0);
    }

    /// A request larger than the whole limit waits until nothing else is in flight, then goes
    /// alone; later ones wait behind it (no starvation).
    #[test]
    fn an_oversized_request_goes_alone_and_is_not_overtaken() {
        let pool = BufferPool::new(8 * K);
        let small = pool.take(4 * K, || {}).unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|s| {
            let (p, t) = (&pool, tx.clone());
            s.spawn(move || {
                let b = p.take(1 << 20, || {}).unwrap();
                t.send("big").unwrap();
                std::thread::sleep(Duration::from_millis(50));
                p.give(std::iter::once(b));
            });
            std::thread::sleep(Duration::from_millis(50));
            let (p, t) = (&pool, tx.clone());
            s.spawn(move || {
                let b = p.take(512, || {}).unwrap();
                t.send("small").unwrap();
                p.give(std::iter::once(b));
            });
            // The late small request fits beside `small`, but the big one is first in line.
            assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
            pool.give(std::iter::once(small));
            assert_eq!(rx.recv().unwrap(), "big");
            assert_eq!(rx.recv().unwrap(), "small");
        });
    }

    #[test]
    fn the_pool_never_holds_more_than_its_limit() {
        let pool = BufferPool::new(256 * K);
        // Warm up with 128 KiB buffers, then switch to 64 KiB ones: the free 128 KiB buffers
        // make way rather than pile up.
        let a: Vec<_> = (0..1).map(|_| pool.take(128 * K, || {}).unwrap()).collect();
        pool.give(a.into_iter());
        let b: Vec<_> = (0..3).map(|_| pool.take(64 * K, || {}).unwrap()).collect();
        let st = lock(&pool.state);
        assert!(st.in_use + st.free_bytes <= 256 * K, "{st:?}");
        drop(st);
        pool.give(b.into_iter());
        let st = lock(&pool.state);
        assert!(st.free_bytes <= 256 * K);
    }

    #[test]
    fn closing_wakes_waiters_and_refuses_more() {
        let pool = BufferPool::new(K);
        let b = pool.take(512, || {}).unwrap();
        let mut flushed = false;
        std::thread::scope(|s| {
            let waiter = s.spawn(|| pool.take(4 * K, || flushed = true).is_none());
            std::thread::sleep(Duration::from_millis(50));
            pool.close();
            assert!(waiter.join().unwrap());
        });
        assert!(flushed, "before_wait ran before waiting");
        assert!(pool.take(0, || {}).is_none());
        pool.give(std::iter::once(b));
        assert_eq!(pool.in_flight(), 0);
    }
}
