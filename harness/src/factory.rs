//! [`DeviceFactory`]: where the devices under test come from. Every check takes one: the
//! conformance suite, random tests, trace replays and the crash checker make a fresh device
//! for each case from it, and checks of durability across a disconnect ask it for
//! [`Storage`] that can be opened again.
//!
//! A closure returning a device is a factory that makes fresh devices only:
//!
//! ```
//! use userblk::{BlockDevice, MemDevice};
//! use userblk_harness::factory::DeviceFactory;
//!
//! let factory = || MemDevice::new(1 << 20);
//! assert_eq!(factory.create()?.blocks(), 2048);
//! assert!(factory.storage().is_none()); // cannot re-open: durability checks report it
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! [`Reopen`] makes one that can also re-open the same storage, from two closures: one that
//! makes new storage (a temporary file, a directory, a handle to the user's store) and one
//! that opens a device on it:
//!
//! ```
//! use std::sync::Arc;
//! use userblk::{BlockDevice, FileDevice};
//! use userblk_harness::factory::{DeviceFactory, Reopen};
//!
//! let factory = Reopen::new(
//!     || tempfile::NamedTempFile::new().and_then(|f| { f.as_file().set_len(1 << 20)?; Ok(f) }),
//!     |file: &tempfile::NamedTempFile| FileDevice::open(file.path()),
//! );
//! let storage = factory.storage().expect("re-openable")?;
//! let first = storage.open()?;
//! first.write(0, &[7; 512])?;
//! first.unmount();
//! drop(first);
//! let mut buf = [0; 512];
//! storage.open()?.read(0, &mut buf)?;
//! assert_eq!(buf, [7; 512]);
//! # Ok::<(), std::io::Error>(())
//! ```

use std::fmt;
use std::io;
use std::sync::Arc;

use userblk::BlockDevice;

/// Makes devices under test.
pub trait DeviceFactory: Send + Sync {
    /// A device on new storage, never used before.
    fn create(&self) -> io::Result<Box<dyn BlockDevice>>;

    /// New storage that can be opened more than once, for checks that disconnect a device and
    /// open the same storage again. `None` when the factory cannot do that (the default);
    /// those checks then report that they could not run.
    fn storage(&self) -> Option<io::Result<Box<dyn Storage>>> {
        None
    }
}

/// Storage that outlives the devices opened on it.
pub trait Storage: Send + Sync {
    /// Opens a device on this storage. After the previous device was unmounted and dropped,
    /// the new one must hold everything the old one acknowledged.
    fn open(&self) -> io::Result<Box<dyn BlockDevice>>;
}

/// Any closure returning a device (boxed or not) makes fresh devices.
impl<F, D> DeviceFactory for F
where
    F: Fn() -> D + Send + Sync,
    D: BlockDevice + 'static,
{
    fn create(&self) -> io::Result<Box<dyn BlockDevice>> {
        Ok(Box::new(self()))
    }
}

/// Opens a device `D` on storage `S`.
type OpenFn<S, D> = dyn Fn(&S) -> io::Result<D> + Send + Sync;

/// A factory of re-openable storage, from a closure making new storage `S` and one opening a
/// device `D` on it. (See the [module](self) example.)
pub struct Reopen<S, D> {
    new_storage: Box<dyn Fn() -> io::Result<S> + Send + Sync>,
    open: Arc<OpenFn<S, D>>,
}

impl<S, D> fmt::Debug for Reopen<S, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reopen").finish_non_exhaustive()
    }
}

impl<S, D> Reopen<S, D>
where
    S: Send + Sync + 'static,
    D: BlockDevice + 'static,
{
    /// `new_storage` makes storage; `open` opens a device on it, as often as asked.
    pub fn new(
        new_storage: impl Fn() -> io::Result<S> + Send + Sync + 'static,
        open: impl Fn(&S) -> io::Result<D> + Send + Sync + 'static,
    ) -> Reopen<S, D> {
        Reopen {
            new_storage: Box::new(new_storage),
            open: Arc::new(open),
        }
    }
}

struct Opened<S, D> {
    storage: S,
    open: Arc<OpenFn<S, D>>,
}

impl<S, D> Storage for Opened<S, D>
where
    S: Send + Sync,
    D: BlockDevice + 'static,
{
    fn open(&self) -> io::Result<Box<dyn BlockDevice>> {
        Ok(Box::new((self.open)(&self.storage)?))
    }
}

impl<S, D> DeviceFactory for Reopen<S, D>
where
    S: Send + Sync + 'static,
    D: BlockDevice + 'static,
{
    fn create(&self) -> io::Result<Box<dyn BlockDevice>> {
        let storage = (self.new_storage)()?;
        Ok(Box::new((self.open)(&storage)?))
    }

    fn storage(&self) -> Option<io::Result<Box<dyn Storage>>> {
        Some((self.new_storage)().map(|storage| {
            Box::new(Opened {
                storage,
                open: Arc::clone(&self.open),
            }) as Box<dyn Storage>
        }))
    }
}
