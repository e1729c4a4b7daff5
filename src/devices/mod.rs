//! Ready-made devices: [`MemDevice`] (a sparse RAM disk), [`FileDevice`] (a file or block device
//! through pread/pwrite) and [`PatternDevice`] (a read-only constant pattern).

mod file;
mod mem;
mod pattern;

pub use file::FileDevice;
pub use mem::MemDevice;
pub use pattern::PatternDevice;
