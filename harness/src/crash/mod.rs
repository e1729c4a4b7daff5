//! Crash-consistency checker: drives a device from a [`DeviceFactory`](crate::factory::DeviceFactory)
//! with writes, FUA writes and flushes, from one thread ([`check`]) or from several at once
//! ([`check_concurrent`]: writes racing flushes), cuts the power in simulation
//! ([`Crashable::crash`]) and checks that what survives is a state the write-cache rules allow.
//!
//! # The rules
//!
//! Per logical block of the device, for a power loss at a point of the history:
//! 1. a write (or write-zeroes, or trim) that **completed before a flush was sent**, where that
//!    flush completed before the power loss, is durable;
//! 2. a FUA write is durable once it **completed**;
//! 3. on a device that advertises no flush (it says it has no volatile cache), every write is
//!    durable once completed;
//! 4. a durable write supersedes every write to the block that completed before it was sent:
//!    those never come back;
//! 5. any other write (completed but not covered by a completed flush, racing a flush, or in
//!    flight during the power loss) may survive or vanish, **each block on its own**: a write of
//!    several blocks may be torn, some blocks surviving and others not (unless the device
//!    promises whole writes: [`CrashOptions::atomic_writes`]).
//!
//! So a block may hold the value of any write to it sent before the power loss ended, except
//! those that completed before the newest durable write to it was sent; or, while no write to
//! it is durable, its content before the run. A trim allows anything until superseded.
//!
//! "Before" is real time on one clock: an op is sent after its invocation is stamped and
//! completes when its reply has arrived; a power loss lasts the call to [`Crashable::crash`].
//! A write still in flight when a flush is sent is not covered by that flush: the server covers
//! what it completed before *processing* the flush, which a client cannot observe, so only
//! writes completed before the flush was sent are certain to be covered. The logical block is
//! the unit: a device that tears a single block shows data no write wrote.
//!
//! # Sources
//!
//! The NBD protocol, `doc/proto.md` (NetworkBlockDevice/nbd at 89ba7b53), "Ordering of messages
//! and writes":
//!
//! > All write commands (that includes `NBD_CMD_WRITE`, `NBD_CMD_WRITE_ZEROES` and
//! > `NBD_CMD_TRIM`) that the server completes (i.e. replies to) prior to processing a
//! > `NBD_CMD_FLUSH` MUST be written to non-volatile storage prior to replying to that
//! > `NBD_CMD_FLUSH`.
//!
//! > A server MUST NOT reply to a command that has `NBD_CMD_FLAG_FUA` set in its command flags
//! > until the data (if any) written by that command is persisted to non-volatile storage.
//!
//! and for `NBD_CMD_WRITE`: "The server MAY send the reply message before the data has reached
//! permanent storage, unless `NBD_CMD_FLAG_FUA` is in use."
//!
//! Linux, `Documentation/block/writeback_cache_control.rst` (torvalds/linux at 0a255400), on
//! REQ_PREFLUSH: "This explicitly guarantees that previously completed write requests are on
//! non-volatile storage before the flagged bio starts."; on REQ_FUA: "will make sure that I/O
//! completion for this request is only signaled after the data has been committed to
//! non-volatile storage."; and "If the FUA bit is not natively supported the block layer turns
//! it into an empty REQ_OP_FLUSH request after the actual write." (so through a kernel, a FUA
//! write to a device with a cache but without FUA also acts as a flush).
//!
//! # What it catches
//!
//! A flush acknowledged before the data is durable; a FUA write that was only cached; a cache
//! that marks a page clean after writing it back although a write changed it meanwhile (a write
//! racing the write-back, lost behind the next flush: [`check_concurrent`] finds it); torn
//! writes on devices that promise whole ones. It accepts any correct write-back cache, whatever
//! subset of unflushed writes it persists. The device says what survives through
//! [`Crashable::crash`]; the checker never makes the device really lose its state, so one run
//! checks many power losses.

mod concurrent;
mod model;
mod ops;
mod run;

use std::future::Future;
use std::io;
use std::sync::Arc;

use userblk::{AsyncDevice, BlockDevice, MemDevice};

use crate::target::OpError;

pub use concurrent::{check_concurrent, check_concurrent_on, check_streams, ConcurrentOptions};
pub use model::{Violation, ViolationKind};
pub use ops::{concurrent_ops, ops_from_trace, random_ops, CrashOp};
pub use run::{check, check_device, check_on, CrashOptions, CrashPoints, CrashReport};

/// A device whose power can be cut in simulation.
pub trait Crashable: BlockDevice {
    /// The device as it would come back after a power loss now: a device holding exactly what
    /// this one has made durable (a device may keep any subset of its unflushed writes, as a
    /// real write-back cache might). It must not change `self`: the run goes on after each
    /// simulated crash. In concurrent runs it is called while other requests are in flight, so
    /// it must return a copy that later writes do not change, each block as it was at some
    /// moment during the call.
    fn crash(&self) -> io::Result<Box<dyn BlockDevice>>;
}

/// An async device whose power can be cut in simulation: [`Crashable`] for an
/// [`AsyncBlockDevice`](userblk::AsyncBlockDevice). Its [`AsyncDevice`] is then [`Crashable`],
/// so `factory::crashable(|| AsyncDevice::new(dev))` and [`Reopen::crashable`] take it.
///
/// [`Reopen::crashable`]: crate::factory::Reopen::crashable
pub trait AsyncCrashable: userblk::AsyncBlockDevice {
    /// The device as it would come back after a power loss now: see [`Crashable::crash`].
    fn crash(&self) -> impl Future<Output = io::Result<Box<dyn BlockDevice>>> + Send;
}

impl<D: AsyncCrashable + 'static> Crashable for AsyncDevice<D> {
    fn crash(&self) -> io::Result<Box<dyn BlockDevice>> {
        self.block_on(AsyncCrashable::crash(self.device()))?
    }
}

/// A [`MemDevice`] has no volatile cache: all of it survives. The copy is a
/// [`MemDevice::snapshot`], which costs what is allocated, whatever the disk's size.
impl Crashable for MemDevice {
    fn crash(&self) -> io::Result<Box<dyn BlockDevice>> {
        Ok(Box::new(self.snapshot()))
    }
}

impl<T: Crashable + ?Sized> Crashable for Arc<T> {
    fn crash(&self) -> io::Result<Box<dyn BlockDevice>> {
        (**self).crash()
    }
}

impl<T: Crashable + ?Sized> Crashable for Box<T> {
    fn crash(&self) -> io::Result<Box<dyn BlockDevice>> {
        (**self).crash()
    }
}

/// Why a crash check failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CrashError {
    /// The factory does not say its devices are [`Crashable`].
    #[error(
        "the factory makes devices the crash checker cannot cut the power of: for a device that \
         implements crash::Crashable, build the factory with factory::crashable(|| MyDevice::new(..)) \
         or Reopen::new(..).crashable()"
    )]
    NotCrashable,
    /// The factory failed to make a device.
    #[error("the factory could not make a device: {0}")]
    Factory(#[source] io::Error),
    /// The device could not be served, or a block could not be read before the run.
    #[error("setting up: {0}")]
    Setup(OpError),
    /// An op of the stream failed.
    #[error("op #{index} ({op}) failed: {source}")]
    Op {
        /// Index in the stream (in a concurrent run: in the streams one after another).
        index: usize,
        /// The op, described.
        op: String,
        /// The error.
        #[source]
        source: OpError,
    },
    /// [`Crashable::crash`] failed, or the device it returned could not be read.
    #[error("simulating a power loss after op #{after}: {source}")]
    Crash {
        /// The op after which it happened.
        after: usize,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Serving ended with an error at the disconnect after the run.
    #[error("disconnecting after the run: {0}")]
    Detach(OpError),
    /// The surviving content breaks the write-cache rules; the report's first line says how
    /// (`lost after flush: ...`).
    #[error("{0}")]
    Violation(Box<Violation>),
}
