//! 4 KiB random reads through a [`LoopbackKernel`], kept `qd` in flight: the load both
//! `benches/remote.rs` and `benches/async_mem.rs` drive (included by `#[path]`).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use userblk::link::loopback::Op;
use userblk::LoopbackKernel;

/// Offsets of 4 KiB blocks spread over a disk of `size` bytes (xorshift, fixed seed).
struct Offsets {
    state: u64,
    blocks: u64,
}

impl Offsets {
    fn next(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        (self.state % self.blocks) * 4096
    }
}

/// Reads done and the time they took: 4 KiB random reads of a `size`-byte disk, `qd` in
/// flight, for `dur`.
pub(crate) fn drive(
    kernel: &LoopbackKernel,
    size: u64,
    qd: usize,
    dur: Duration,
) -> (u64, Duration) {
    let mut offsets = Offsets {
        state: 0x9e37_79b9_7f4a_7c15,
        blocks: size / 4096,
    };
    let mut ring = VecDeque::with_capacity(qd);
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed() < dur {
        while ring.len() < qd {
            ring.push_back(
                kernel
                    .submit(Op::read(offsets.next(), 4096))
                    .expect("submit"),
            );
        }
        if let Some(t) = ring.pop_front() {
            kernel.recycle(kernel.wait(t).expect("read failed"));
            done += 1;
        }
    }
    for t in ring {
        kernel.wait(t).expect("read failed");
        done += 1;
    }
    (done, start.elapsed())
}
