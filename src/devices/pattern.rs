//! [`PatternDevice`]: a read-only device whose every byte is part of a repeating 4-byte pattern
//! (0xdeadbeef by default), for tests and demonstrations that need no storage.

use std::io;

use crate::device::{BlockDevice, Capabilities};

/// A read-only device filled with a repeating 4-byte pattern.
#[derive(Clone, Copy, Debug)]
pub struct PatternDevice {
    size: u64,
    pattern: [u8; 4],
}

impl PatternDevice {
    /// `size` bytes (rounded down to 512-byte blocks) of 0xdeadbeef.
    pub fn new(size: u64) -> PatternDevice {
        PatternDevice::with_pattern(size, [0xde, 0xad, 0xbe, 0xef])
    }

    /// `size` bytes of `pattern`, repeating from offset 0.
    pub fn with_pattern(size: u64, pattern: [u8; 4]) -> PatternDevice {
        PatternDevice {
            size: size / 512 * 512,
            pattern,
        }
    }

    /// The bytes the device holds at `offset..offset+len`.
    pub fn expected(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.fill(offset, &mut out);
        out
    }

    fn fill(&self, offset: u64, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = self.pattern[((offset + i as u64) % 4) as usize];
        }
    }
}

impl BlockDevice for PatternDevice {
    fn blocks(&self) -> u64 {
        self.size / 512
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: true,
            flush: false,
            ..Capabilities::default()
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.fill(offset, buf);
        Ok(())
    }
}
