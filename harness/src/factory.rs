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
//!
//! The crash checker ([`crate::crash`]) needs devices whose power loss it can simulate
//! ([`Crashable`]). A factory says it makes them with [`crashable`] (fresh devices) or
//! [`Reopen::crashable`] (re-openable storage too); the same factory then serves every check:
//!
//! ```
//! use userblk::MemDevice;
//! use userblk_harness::crash::{self, CrashOptions};
//! use userblk_harness::factory::{self, DeviceFactory};
//!
//! let factory = factory::crashable(|| MemDevice::new(1 << 20));
//! assert!(factory.create_crashable().is_some());
//! let ops = crash::random_ops(1, 1 << 20, 512, 50);
//! crash::check(&factory, &ops, &CrashOptions::default())?;
//!
//! // RAM whose storage can be re-opened and crashed: what `userblk check ram:SIZE` uses.
//! let ram = factory::mem(1 << 20);
//! assert!(ram.storage().is_some() && ram.create_crashable().is_some());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::io;
use std::sync::Arc;

use userblk::{BlockDevice, MemDevice};

use crate::crash::Crashable;

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

    /// A device on new storage whose power loss the crash checker can simulate, shared so that
    /// the checker can serve it and cut its power. `None` when the factory's devices are not
    /// [`Crashable`] (the default); crash checks then report that they could not run.
    fn create_crashable(&self) -> Option<io::Result<Arc<dyn Crashable>>> {
        None
    }
}

/// Storage that outlives the devices opened on it.
pub trait Storage: Send + Sync {
    /// Opens a device on this storage. After the previous device was unmounted and dropped,
    /// the new one must hold everything the old one acknowledged.
    fn open(&self) -> io::Result<Box<dyn BlockDevice>>;
}

/// Any closure returning a device makes fresh devices: a [`BlockDevice`] (boxed or not), or an
/// [`AsyncBlockDevice`](userblk::AsyncBlockDevice), which is served as an
/// [`AsyncDevice`](userblk::AsyncDevice) (on the tokio runtime the closure runs in, or
/// userblk's) through [`into_block_device`](userblk::AsyncBlockDevice::into_block_device).
impl<F, D> DeviceFactory for F
where
    F: Fn() -> D + Send + Sync,
    // Named in full: with both device traits in scope, calls on a sync device are ambiguous.
    D: userblk::AsyncBlockDevice + 'static,
{
    fn create(&self) -> io::Result<Box<dyn BlockDevice>> {
        Ok(userblk::AsyncBlockDevice::into_block_device(self()))
    }
}

/// Opens a device `D` on storage `S`.
type OpenFn<S, D> = dyn Fn(&S) -> io::Result<D> + Send + Sync;

/// A factory of re-openable storage, from a closure making new storage `S` and one opening a
/// device `D` on it, sync or async (as for closures). (See the [module](self) example.)
pub struct Reopen<S, D> {
    new_storage: Box<dyn Fn() -> io::Result<S> + Send + Sync>,
    open: Arc<OpenFn<S, D>>,
    /// Set by [`Reopen::crashable`]: shares a device `D` as a [`Crashable`].
    crashable: Option<fn(D) -> Arc<dyn Crashable>>,
}

impl<S, D> fmt::Debug for Reopen<S, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reopen").finish_non_exhaustive()
    }
}

impl<S, D> Reopen<S, D>
where
    S: Send + Sync + 'static,
    D: userblk::AsyncBlockDevice + 'static,
{
    /// `new_storage` makes storage; `open` opens a device on it, as often as asked.
    pub fn new(
        new_storage: impl Fn() -> io::Result<S> + Send + Sync + 'static,
        open: impl Fn(&S) -> io::Result<D> + Send + Sync + 'static,
    ) -> Reopen<S, D> {
        Reopen {
            new_storage: Box::new(new_storage),
            open: Arc::new(open),
            crashable: None,
        }
    }

    /// The same factory, saying that its devices are [`Crashable`]: crash checks then run on
    /// fresh devices on new storage.
    pub fn crashable(self) -> Reopen<S, D>
    where
        D: Crashable,
    {
        Reopen {
            crashable: Some(share::<D>),
            ..self
        }
    }
}

/// `D` as a shared [`Crashable`] (a function, so that [`Reopen`] can hold it without knowing
/// whether `D` is one).
fn share<D: Crashable + 'static>(device: D) -> Arc<dyn Crashable> {
    Arc::new(device)
}

struct Opened<S, D> {
    storage: S,
    open: Arc<OpenFn<S, D>>,
}

impl<S, D> Storage for Opened<S, D>
where
    S: Send + Sync,
    D: userblk::AsyncBlockDevice + 'static,
{
    fn open(&self) -> io::Result<Box<dyn BlockDevice>> {
        Ok(userblk::AsyncBlockDevice::into_block_device((self.open)(
            &self.storage,
        )?))
    }
}

impl<S, D> DeviceFactory for Reopen<S, D>
where
    S: Send + Sync + 'static,
    D: userblk::AsyncBlockDevice + 'static,
{
    fn create(&self) -> io::Result<Box<dyn BlockDevice>> {
        let storage = (self.new_storage)()?;
        Ok(userblk::AsyncBlockDevice::into_block_device((self.open)(
            &storage,
        )?))
    }

    fn storage(&self) -> Option<io::Result<Box<dyn Storage>>> {
        Some((self.new_storage)().map(|storage| {
            Box::new(Opened {
                storage,
                open: Arc::clone(&self.open),
            }) as Box<dyn Storage>
        }))
    }

    fn create_crashable(&self) -> Option<io::Result<Arc<dyn Crashable>>> {
        let share = self.crashable?;
        Some((|| {
            let storage = (self.new_storage)()?;
            Ok(share((self.open)(&storage)?))
        })())
    }
}

/// A factory of fresh [`Crashable`] devices, from a closure making one: see [`crashable`].
#[derive(Clone, Copy)]
pub struct CrashableFactory<F>(F);

impl<F> fmt::Debug for CrashableFactory<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CrashableFactory").finish_non_exhaustive()
    }
}

/// A factory of fresh devices from `make`, saying that they are [`Crashable`]: the
/// conformance suite, random tests and the crash checker all take it.
pub fn crashable<F, D>(make: F) -> CrashableFactory<F>
where
    F: Fn() -> D + Send + Sync,
    D: Crashable + 'static,
{
    CrashableFactory(make)
}

impl<F, D> DeviceFactory for CrashableFactory<F>
where
    F: Fn() -> D + Send + Sync,
    D: Crashable + 'static,
{
    fn create(&self) -> io::Result<Box<dyn BlockDevice>> {
        Ok(Box::new((self.0)()))
    }

    fn create_crashable(&self) -> Option<io::Result<Arc<dyn Crashable>>> {
        Some(Ok(Arc::new((self.0)())))
    }
}

/// A re-openable RAM disk of `size` bytes with 512-byte blocks: each storage is one
/// [`MemDevice`], served again on re-open, and crashable (it has no volatile cache; a simulated
/// power loss is a [`MemDevice::snapshot`]). Sparse: any size costs what is written.
pub fn mem(size: u64) -> impl DeviceFactory {
    mem_with_block_size(size, 512)
}

/// [`mem`] with another logical block size.
pub fn mem_with_block_size(size: u64, block_size: u32) -> impl DeviceFactory {
    Reopen::new(
        move || Ok(Arc::new(MemDevice::with_block_size(size, block_size))),
        |ram: &Arc<MemDevice>| Ok(Arc::clone(ram)),
    )
    .crashable()
}
