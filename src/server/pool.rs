//! The buffers of requests in flight: recycled, and bounded so that memory stays bounded.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// Free buffers kept for reuse beyond those in flight, in bytes: enough for a queue of 128 KiB
/// requests (the kernel's default split) without allocating, and a bound on idle memory.
pub(super) const KEEP_FREE_BYTES: usize = 32 << 20;

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The permits that bound how many requests are in flight, and the recycled buffers they carry.
///
/// A reader takes a permit (with a buffer for READ or WRITE data) for every request it reads,
/// and the permit comes back once the reply is written. So the memory held is at most `limit`
/// requests' data whatever the length of the run, a reader out of permits waits (back-pressure:
/// further requests stay in the socket), and buffers are reused, so steady-state serving does not
/// allocate.
pub(super) struct BufferPool {
    state: Mutex<PoolState>,
    freed: Condvar,
    limit: usize,
    keep_bytes: usize,
}

struct PoolState {
    free: Vec<Vec<u8>>,
    free_bytes: usize,
    in_use: usize,
    /// Readers waiting for a permit: only then does `give` pay for a wake-up.
    waiting: usize,
    closed: bool,
}

impl BufferPool {
    pub(super) fn new(limit: usize, keep_bytes: usize) -> BufferPool {
        BufferPool {
            state: Mutex::new(PoolState {
                free: Vec::with_capacity(limit),
                free_bytes: 0,
                in_use: 0,
                waiting: 0,
                closed: false,
            }),
            freed: Condvar::new(),
            limit: limit.max(1),
            keep_bytes,
        }
    }

    /// Waits for a permit, then returns a buffer of exactly `len` bytes (contents unspecified).
    /// `None` once the pool is closed. `before_wait` runs (once, without the pool's lock) before
    /// waiting: the caller writes the replies it holds back, whose permits may be the ones
    /// missing.
    pub(super) fn take(&self, len: usize, before_wait: impl FnOnce()) -> Option<Vec<u8>> {
        let mut st = lock(&self.state);
        if st.in_use >= self.limit && !st.closed {
            drop(st);
            before_wait();
            st = lock(&self.state);
        }
        while st.in_use >= self.limit && !st.closed {
            st.waiting += 1;
            st = self.freed.wait(st).unwrap_or_else(PoisonError::into_inner);
            st.waiting -= 1;
        }
        if st.closed {
            return None;
        }
        st.in_use += 1;
        let mut buf = Vec::new();
        if len > 0 {
            // The most recently returned buffer that fits: the same size in a steady workload,
            // and still warm in the cache.
            if let Some(i) = st.free.iter().rposition(|b| b.capacity() >= len) {
                buf = st.free.swap_remove(i);
                st.free_bytes -= buf.capacity();
            }
        }
        drop(st);
        buf.resize(len, 0);
        Some(buf)
    }

    /// Returns the permits (and buffers) of finished requests.
    pub(super) fn give(&self, bufs: impl Iterator<Item = Vec<u8>>) {
        // A buffer beyond `keep_bytes` (rare: sizes changed) is freed after the lock is released.
        let mut surplus = None;
        let mut st = lock(&self.state);
        for buf in bufs {
            st.in_use -= 1;
            let cap = buf.capacity();
            if cap == 0 {
                continue;
            }
            if st.free_bytes + cap <= self.keep_bytes {
                st.free_bytes += cap;
                st.free.push(buf);
            } else {
                surplus = Some(buf);
            }
        }
        let wake = st.waiting > 0;
        drop(st);
        if wake {
            self.freed.notify_one();
        }
        drop(surplus);
    }

    /// Refuses further permits and wakes the readers waiting for one.
    pub(super) fn close(&self) {
        lock(&self.state).closed = true;
        self.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_pool_reuses() {
        let pool = BufferPool::new(2, 1 << 20);
        let b = pool.take(4096, || {}).unwrap();
        let ptr = b.as_ptr();
        pool.give(std::iter::once(b));
        let b = pool.take(1024, || {}).unwrap();
        assert_eq!(b.as_ptr(), ptr);
        assert_eq!(b.len(), 1024);
    }

    #[test]
    fn buffer_pool_bounds_permits_and_closes() {
        let pool = BufferPool::new(1, 0);
        let b = pool.take(512, || {}).unwrap();
        std::thread::scope(|s| {
            let waiter = s.spawn(|| pool.take(512, || {}).map(|b| b.len()));
            // The waiter has no permit until `b` comes back.
            pool.give(std::iter::once(b));
            assert_eq!(waiter.join().unwrap(), Some(512));
        });
        pool.close();
        assert!(pool.take(0, || {}).is_none());
    }
}
