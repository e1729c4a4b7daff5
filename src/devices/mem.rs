//! [`MemDevice`]: a RAM disk that costs only what is written. Memory is allocated in 64 KiB
//! chunks on the first write that touches them, held in a map split into shards by chunk number,
//! each chunk behind its own lock: a 4 TiB disk with nothing written costs a few kilobytes, and
//! concurrent requests to different places take different locks (no global lock on the hot path).

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::device::{BlockDevice, Capabilities, Extent};

/// Allocation and locking granule.
const CHUNK: usize = 64 << 10;

/// Shards of the chunk map. Consecutive chunks fall in consecutive shards, so a sequential
/// request and requests to different places rarely share a shard lock; the shard lock is taken
/// exclusively only to allocate or free a chunk.
const SHARDS: usize = 64;

/// One chunk's bytes, locked on their own: readers of a chunk share it, a writer has it alone.
type Chunk = RwLock<Box<[u8]>>;

/// Chunks of one shard, by chunk number.
type ChunkMap = HashMap<u64, Chunk, BuildHasherDefault<ChunkHasher>>;

/// Hashes a chunk number with splitmix64's finaliser. Keys in one shard share their low bits
/// (they are congruent modulo [`SHARDS`]), which the identity hash or a plain multiply would
/// turn into collisions; SipHash would do but costs more than the lookup it serves.
#[derive(Default)]
struct ChunkHasher(u64);

impl Hasher for ChunkHasher {
    fn finish(&self) -> u64 {
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by `u64` keys; fold anything else in, for completeness.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A sparse in-memory block device. Never-written and trimmed ranges read as zeroes.
pub struct MemDevice {
    shards: Box<[RwLock<ChunkMap>]>,
    size: u64,
    block_size: u32,
}

impl fmt::Debug for MemDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemDevice")
            .field("size", &self.size)
            .field("block_size", &self.block_size)
            .field("allocated", &self.allocated())
            .finish()
    }
}

fn read_lock<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write_lock<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

/// One chunk-bounded piece of a request.
#[derive(Clone, Copy)]
struct Piece {
    /// Chunk number.
    chunk: u64,
    /// Offset in the chunk.
    within: usize,
    /// Offset in the caller's buffer.
    at: usize,
    /// Length.
    len: usize,
}

/// Cuts `offset..offset+len` at chunk boundaries.
fn pieces(offset: u64, len: usize) -> impl Iterator<Item = Piece> {
    let mut done = 0usize;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let pos = offset + done as u64;
        let within = (pos % CHUNK as u64) as usize;
        let n = (CHUNK - within).min(len - done);
        let piece = Piece {
            chunk: pos / CHUNK as u64,
            within,
            at: done,
            len: n,
        };
        done += n;
        Some(piece)
    })
}

impl MemDevice {
    /// A RAM disk of `size` bytes (rounded down to whole 512-byte blocks). Nothing is allocated
    /// until it is written, so any size fits.
    pub fn new(size: u64) -> MemDevice {
        MemDevice::with_block_size(size, 512)
    }

    /// A RAM disk of `size` bytes (rounded down to whole blocks) with the given logical block
    /// size. A block size the server cannot serve is reported when serving starts.
    pub fn with_block_size(size: u64, block_size: u32) -> MemDevice {
        let bs = u64::from(block_size.max(1));
        MemDevice {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            size: size / bs * bs,
            block_size,
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes of memory holding data (written and not since trimmed), in whole 64 KiB chunks.
    pub fn allocated(&self) -> u64 {
        let chunks: usize = self.shards.iter().map(|s| read_lock(s).len()).sum();
        (chunks * CHUNK) as u64
    }

    /// A copy of the disk as it is now, costing only what is allocated: each 64 KiB chunk is
    /// copied under its own lock, so a copy taken while writes are in flight holds every chunk
    /// (and so every block, which never straddles a chunk) as it was at some moment of the call.
    /// Later writes to either device do not change the other. This is what a simulated power
    /// loss of a device without a volatile cache keeps.
    pub fn snapshot(&self) -> MemDevice {
        let copy = MemDevice::with_block_size(self.size, self.block_size);
        for (from, to) in self.shards.iter().zip(copy.shards.iter()) {
            let map = read_lock(from);
            let mut into = write_lock(to);
            into.reserve(map.len());
            for (&n, chunk) in map.iter() {
                into.insert(n, RwLock::new(read_lock(chunk).clone()));
            }
        }
        copy
    }

    fn shard(&self, chunk: u64) -> &RwLock<ChunkMap> {
        &self.shards[(chunk % SHARDS as u64) as usize]
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::from_raw_os_error(22)),
        }
    }

    /// Copies `src` into the piece's place, allocating the chunk if it has none.
    fn store(&self, p: Piece, src: &[u8]) {
        let shard = self.shard(p.chunk);
        {
            let map = read_lock(shard);
            if let Some(chunk) = map.get(&p.chunk) {
                write_lock(chunk)[p.within..p.within + p.len].copy_from_slice(src);
                return;
            }
        }
        // First write here: allocate under the shard's write lock (another writer may have
        // been first between the two locks; `entry` keeps theirs).
        let mut map = write_lock(shard);
        let chunk = map
            .entry(p.chunk)
            .or_insert_with(|| RwLock::new(vec![0u8; CHUNK].into_boxed_slice()));
        chunk.get_mut().unwrap_or_else(PoisonError::into_inner)[p.within..p.within + p.len]
            .copy_from_slice(src);
    }

    /// Sets a range to zeroes, freeing whole chunks; never allocates.
    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        // Whole chunks first, without touching the bytes of the partial ones: a 4 GiB
        // write-zeroes over a sparse disk costs one map lookup per chunk.
        let first_whole = offset.div_ceil(CHUNK as u64);
        let end = offset + len;
        let last_whole = end / CHUNK as u64; // exclusive
        for chunk in first_whole..last_whole.max(first_whole) {
            let shard = self.shard(chunk);
            if read_lock(shard).contains_key(&chunk) {
                write_lock(shard).remove(&chunk);
            }
        }
        let partial = |from: u64, to: u64| {
            if from >= to {
                return;
            }
            let chunk = from / CHUNK as u64;
            let within = (from % CHUNK as u64) as usize;
            let n = (to - from) as usize;
            if let Some(c) = read_lock(self.shard(chunk)).get(&chunk) {
                write_lock(c)[within..within + n].fill(0);
            }
        };
        if first_whole > last_whole {
            // Inside one chunk.
            partial(offset, end);
        } else {
            partial(offset, first_whole * CHUNK as u64);
            partial((last_whole * CHUNK as u64).max(offset), end);
        }
        Ok(())
    }
}

impl BlockDevice for MemDevice {
    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn blocks(&self) -> u64 {
        self.size / u64::from(self.block_size.max(1))
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            flush: true,
            fua: true,
            trim: true,
            trim_zeroes: true,
            write_zeroes: true,
            never_blocks: true,
            ..Capabilities::default()
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        for p in pieces(offset, buf.len()) {
            let dst = &mut buf[p.at..p.at + p.len];
            let map = read_lock(self.shard(p.chunk));
            match map.get(&p.chunk) {
                Some(chunk) => dst.copy_from_slice(&read_lock(chunk)[p.within..p.within + p.len]),
                None => dst.fill(0),
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check(offset, data.len() as u64)?;
        for p in pieces(offset, data.len()) {
            self.store(p, &data[p.at..p.at + p.len]);
        }
        Ok(())
    }

    fn write_fua(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        // Memory has no cache to bypass.
        self.write(offset, data)
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.zero(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool) -> io::Result<()> {
        self.zero(offset, len)
    }

    /// Chunks never written (or freed by a trim or write-zeroes) are holes that read as zeroes;
    /// allocated ones are data. Neighbours of one kind are merged.
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.check(offset, len)?;
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let chunk = pos / CHUNK as u64;
            let next = ((chunk + 1) * CHUNK as u64).min(end);
            let hole = !read_lock(self.shard(chunk)).contains_key(&chunk);
            match out.last_mut() {
                Some(e) if e.hole == hole => e.len += next - pos,
                _ if hole => out.push(Extent::hole(next - pos)),
                _ => out.push(Extent::data(next - pos)),
            }
            pos = next;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::thread;

    use super::*;

    const C: u64 = CHUNK as u64;

    fn bytes(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i % 251) as u8 ^ seed.wrapping_mul(37))
            .collect()
    }

    #[test]
    fn reads_back_across_chunks_and_frees_on_trim() {
        let dev = MemDevice::new(4 * C);
        let data = bytes(1, CHUNK + 1024);
        dev.write(C - 512, &data).unwrap();
        let mut back = vec![0u8; data.len()];
        dev.read(C - 512, &mut back).unwrap();
        assert_eq!(back, data);
        assert_eq!(dev.allocated(), 3 * C);
        dev.trim(C, C).unwrap();
        assert_eq!(dev.allocated(), 2 * C);
        dev.read(C - 512, &mut back).unwrap();
        assert_eq!(back[..512], data[..512]);
        assert!(back[512..512 + CHUNK].iter().all(|&b| b == 0));
        assert_eq!(back[512 + CHUNK..], data[512 + CHUNK..]);
    }

    #[test]
    fn block_status_reports_allocated_chunks_as_data_and_the_rest_as_holes() {
        let dev = MemDevice::new(8 * C);
        assert_eq!(dev.block_status(0, 8 * C).unwrap(), [Extent::hole(8 * C)]);
        dev.write(C + 512, &[1; 512]).unwrap();
        dev.write(2 * C, &[1; 512]).unwrap();
        dev.write(5 * C, &[1; 512]).unwrap();
        assert_eq!(
            dev.block_status(512, 8 * C - 1024).unwrap(),
            [
                Extent::hole(C - 512),
                Extent::data(2 * C),
                Extent::hole(2 * C),
                Extent::data(C),
                Extent::hole(2 * C - 512),
            ]
        );
        dev.trim(C, 2 * C).unwrap();
        assert_eq!(dev.block_status(0, 4 * C).unwrap(), [Extent::hole(4 * C)]);
        assert!(dev.block_status(8 * C, 512).is_err());
    }

    #[test]
    fn reads_of_unwritten_chunks_are_zeroes_and_allocate_nothing() {
        let dev = MemDevice::new(1 << 40);
        let mut buf = vec![0xffu8; 3 * CHUNK];
        dev.read((1 << 39) - 512, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(dev.allocated(), 0);
    }

    #[test]
    fn zeroing_frees_whole_chunks_and_zeroes_partial_ones() {
        let dev = MemDevice::new(8 * C);
        let data = bytes(2, 8 * CHUNK);
        dev.write(0, &data).unwrap();
        assert_eq!(dev.allocated(), 8 * C);
        // From the middle of chunk 1 to the middle of chunk 5: chunks 2..=4 freed, 1 and 5 kept
        // with their halves zeroed.
        dev.write_zeroes(C + C / 2, 4 * C, false).unwrap();
        assert_eq!(dev.allocated(), 5 * C);
        let mut want = data.clone();
        want[CHUNK + CHUNK / 2..5 * CHUNK + CHUNK / 2].fill(0);
        let mut back = vec![0u8; 8 * CHUNK];
        dev.read(0, &mut back).unwrap();
        assert_eq!(back, want);
        // Inside one chunk.
        dev.trim(7 * C + 512, 1024).unwrap();
        want[7 * CHUNK + 512..7 * CHUNK + 1536].fill(0);
        dev.read(0, &mut back).unwrap();
        assert_eq!(back, want);
        // Zeroing never-written space allocates nothing.
        let sparse = MemDevice::new(1 << 40);
        sparse.write_zeroes(512, (1 << 32) - 1024, true).unwrap();
        assert_eq!(sparse.allocated(), 0);
    }

    #[test]
    fn far_offsets_do_not_alias() {
        let dev = MemDevice::new(1 << 45);
        let places = [
            4096u64,
            (1 << 32) + 4096,
            (1 << 41) + 4096,
            (1 << 44) + 4096,
        ];
        for (i, &o) in places.iter().enumerate() {
            dev.write(o, &bytes(i as u8 + 1, 512)).unwrap();
        }
        for (i, &o) in places.iter().enumerate() {
            let mut back = [0u8; 512];
            dev.read(o, &mut back).unwrap();
            assert_eq!(back[..], bytes(i as u8 + 1, 512)[..], "at {o}");
        }
        assert_eq!(dev.allocated(), 4 * C);
    }

    #[test]
    fn concurrent_writers_to_one_chunk_and_to_many() {
        let dev = Arc::new(MemDevice::new(64 * C));
        let handles: Vec<_> = (0..8u8)
            .map(|t| {
                let dev = Arc::clone(&dev);
                thread::spawn(move || {
                    for round in 0..50u64 {
                        // Each thread owns 512-byte slots in chunk 0 and a chunk of its own,
                        // trimmed and rewritten to race allocation against frees elsewhere.
                        let slot = u64::from(t) * 512;
                        dev.write(slot, &bytes(t, 512)).unwrap();
                        let own = (1 + u64::from(t)) * C;
                        dev.write(own + round * 512 % C, &bytes(t, 512)).unwrap();
                        if round % 10 == 9 {
                            dev.trim(own, C).unwrap();
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        for t in 0..8u8 {
            let mut back = [0u8; 512];
            dev.read(u64::from(t) * 512, &mut back).unwrap();
            assert_eq!(back[..], bytes(t, 512)[..]);
        }
        // Every thread's own chunk was trimmed after its last write.
        assert_eq!(dev.allocated(), C);
    }

    #[test]
    fn out_of_range_is_einval_not_panic() {
        let dev = MemDevice::new(8192);
        let mut buf = [0u8; 1024];
        assert_eq!(
            dev.read(7680, &mut buf).unwrap_err().raw_os_error(),
            Some(22)
        );
        assert_eq!(
            dev.write(u64::MAX - 10, &buf).unwrap_err().raw_os_error(),
            Some(22)
        );
        assert_eq!(
            dev.trim(u64::MAX - 511, 1024).unwrap_err().raw_os_error(),
            Some(22)
        );
    }

    #[test]
    fn snapshots_are_independent_and_sparse() {
        let dev = MemDevice::new(4 << 40);
        let far = (4 << 40) - (1 << 20);
        dev.write(far, &bytes(1, 8192)).unwrap();
        dev.write(4096, &bytes(2, 512)).unwrap();
        let snap = dev.snapshot();
        assert_eq!(snap.size(), dev.size());
        assert_eq!(snap.allocated(), dev.allocated());
        // Later writes and trims on either side do not reach the other.
        dev.write(far, &bytes(3, 8192)).unwrap();
        snap.trim(4096, 512).unwrap();
        let mut buf = vec![0u8; 8192];
        snap.read(far, &mut buf).unwrap();
        assert_eq!(buf, bytes(1, 8192));
        dev.read(4096, &mut buf[..512]).unwrap();
        assert_eq!(buf[..512], bytes(2, 512)[..]);
    }

    #[test]
    fn size_rounds_down_to_blocks() {
        assert_eq!(MemDevice::new(1000).blocks(), 1);
        assert_eq!(MemDevice::with_block_size(10_000, 4096).size(), 8192);
        assert_eq!(MemDevice::new(u64::MAX).size(), u64::MAX / 512 * 512);
    }
}
