//! [`LoopbackKernel`]: the fake kernel's block operations (read, write, FUA, flush, trim,
//! write-zeroes) made into NBD requests as the profile's kernel makes them, raw requests for
//! tests, and start and shutdown.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Write};
use std::net::Shutdown;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::error::{LoopbackError, Violation};
use super::inflight::{lock, Inner, State};
use super::jitter::JitterSource;
use super::latency::LatencyReport;
use super::profile::KernelProfile;
use super::timeouts::wait_for_end;
use super::{LoopbackLink, LoopbackOptions, LoopbackStats, Op, Ticket};
use crate::device::BlockDevice;
use crate::link::Export;
use crate::proto::{Command, CommandFlags, Cookie, Request, TransmissionFlags};
use crate::server::{export_of, Server, ServerError};

/// The fake kernel. Block operations may be called from several threads at once.
///
/// ```
/// use userblk::{LoopbackKernel, MemDevice};
///
/// let kernel = LoopbackKernel::start(MemDevice::new(8 << 20))?;
/// let data = vec![0xabu8; 2 << 20]; // a 1,280 KiB WRITE and a 768 KiB one, as 6.12 splits
/// kernel.write(1 << 20, &data)?;
/// kernel.flush()?;
/// assert_eq!(kernel.read(1 << 20, data.len())?, data);
/// println!("{}", kernel.latency()); // p50, p99, max per command
/// kernel.shutdown()?; // DISC; the server unmounts the device and stops
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct LoopbackKernel {
    inner: Arc<Inner>,
    export: Export,
    options: LoopbackOptions,
    server: Option<JoinHandle<Result<(), ServerError>>>,
    /// Signalled when the server thread ends, to wait for it with a limit.
    server_done: Mutex<mpsc::Receiver<()>>,
    readers: Vec<JoinHandle<()>>,
    timer: Option<JoinHandle<()>>,
}

impl fmt::Debug for LoopbackKernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoopbackKernel")
            .field("export", &self.export)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl LoopbackKernel {
    /// Starts a [`Server`] for `device` in a thread, with default options (`linux-6.12`).
    pub fn start<D: BlockDevice + 'static>(device: D) -> Result<LoopbackKernel, LoopbackError> {
        LoopbackKernel::with_options(device, LoopbackOptions::default())
    }

    /// Starts a [`Server`] for `device` in a thread, playing `profile`.
    pub fn with_profile<D: BlockDevice + 'static>(
        device: D,
        profile: KernelProfile,
    ) -> Result<LoopbackKernel, LoopbackError> {
        LoopbackKernel::with_options(device, LoopbackOptions::for_profile(profile))
    }

    /// Starts a [`Server`] for `device` in a thread.
    pub fn with_options<D: BlockDevice + 'static>(
        device: D,
        options: LoopbackOptions,
    ) -> Result<LoopbackKernel, LoopbackError> {
        let export = export_of(&device)?;
        let server_options = options.server;
        LoopbackKernel::with_server(export, options, move |link| {
            Server::with_options(device, link, server_options)?.run()
        })
    }

    /// Starts the fake kernel in front of a server of the caller's own: `serve` runs in a thread
    /// with the link (whose [`KernelLink::start`](crate::KernelLink::start) hands over the
    /// server ends of the connections) and returns when it has stopped serving. `export` is
    /// what the kernel side assumes was advertised. This puts another NBD server behind exactly
    /// the same kernel side, to check it or to compare its speed with [`Server`]'s.
    /// (`options.server` is not used.)
    pub fn with_server<F>(
        export: Export,
        options: LoopbackOptions,
        serve: F,
    ) -> Result<LoopbackKernel, LoopbackError>
    where
        F: FnOnce(LoopbackLink) -> Result<(), ServerError> + Send + 'static,
    {
        let profile = options.resolved_profile();
        // A zero timeout is the kernel's "none"; a zero stall limit likewise turns it off.
        let timeout = options.timeout.filter(|d| !d.is_zero());
        let stall_limit = options.stall_limit.filter(|d| !d.is_zero());
        let (link, kernel_ends) = LoopbackLink::new(options.connections)?;
        // A send blocked this long fails: the kernel's own timeout (`sk_sndtimeo`, set by
        // `nbd_start_device` to the request timeout) or else the stall watchdog.
        let send_timeout = timeout.or(stall_limit);
        let mut writers = Vec::new();
        let mut closers = Vec::new();
        let mut reader_socks = Vec::new();
        for s in kernel_ends {
            s.set_write_timeout(send_timeout)?;
            reader_socks.push(s.try_clone()?);
            closers.push(s.try_clone()?);
            writers.push(Mutex::new(s));
        }
        let (done_tx, server_done) = mpsc::channel();
        let server = thread::Builder::new()
            .name("userblk-loopback-server".into())
            .spawn(move || {
                let result = serve(link);
                let _ = done_tx.send(());
                result
            })?;
        let depth = usize::from(profile.queue_depth.max(1));
        let inner = Arc::new(Inner {
            state: Mutex::new(State::new(writers.len(), depth)),
            changed: Condvar::new(),
            timer: Condvar::new(),
            writers,
            closers,
            spare: Mutex::new(Vec::new()),
            profile,
            timeout,
            stall_limit,
            jitter: options.jitter.map(JitterSource::new),
        });
        let mut kernel = LoopbackKernel {
            inner: Arc::clone(&inner),
            export,
            options,
            server: Some(server),
            server_done: Mutex::new(server_done),
            readers: Vec::new(),
            timer: None,
        };
        for (conn, sock) in reader_socks.into_iter().enumerate() {
            let inner = Arc::clone(&inner);
            kernel.readers.push(
                thread::Builder::new()
                    .name(format!("userblk-loopback-reply{conn}"))
                    .spawn(move || inner.read_replies(conn, sock))?,
            );
        }
        if let Some(timeout) = timeout {
            let inner = Arc::clone(&inner);
            kernel.timer = Some(
                thread::Builder::new()
                    .name("userblk-loopback-timer".into())
                    .spawn(move || inner.run_timer(timeout))?,
            );
        }
        Ok(kernel)
    }

    /// What the server advertised.
    pub fn export(&self) -> &Export {
        &self.export
    }

    /// The device size in bytes.
    pub fn size(&self) -> u64 {
        self.export.size
    }

    /// The kernel played, with the options' overrides applied.
    pub fn profile(&self) -> &KernelProfile {
        &self.inner.profile
    }

    /// The options it was started with.
    pub fn options(&self) -> &LoopbackOptions {
        &self.options
    }

    /// Counters so far.
    pub fn stats(&self) -> LoopbackStats {
        lock(&self.inner.state).stats
    }

    /// Request latency per command so far: from sending each request to reading its reply.
    pub fn latency(&self) -> LatencyReport {
        lock(&self.inner.state).latency.report()
    }

    /// Protocol violations seen so far.
    pub fn violations(&self) -> Vec<Violation> {
        lock(&self.inner.state).violations.clone()
    }

    /// Sends one request as the kernel would, without the block layer's checks or splitting,
    /// and returns its ticket. Waits while every tag of every connection is in flight (up to
    /// the stall limit).
    pub fn submit(&self, op: Op<'_>) -> Result<Ticket, LoopbackError> {
        self.inner
            .send(op, true)?
            .ok_or_else(|| LoopbackError::Io(io::Error::other("no tag free")))
    }

    /// Sends one request if a tag is free now; `Ok(None)` if every tag is in flight.
    pub fn try_submit(&self, op: Op<'_>) -> Result<Option<Ticket>, LoopbackError> {
        self.inner.send(op, false)
    }

    /// Hands back a buffer returned by [`wait`](Self::wait) (or any `Vec`), to hold a later READ's
    /// data. Optional: it spares a benchmark from measuring the allocator.
    pub fn recycle(&self, buf: Vec<u8>) {
        self.inner.recycle(buf);
    }

    /// Waits for a request's reply: its data (empty but for READ) or its error. Fails with
    /// [`LoopbackError::Stalled`] once the request has been in flight longer than the stall
    /// limit.
    pub fn wait(&self, ticket: Ticket) -> Result<Vec<u8>, LoopbackError> {
        self.inner.wait(ticket)
    }

    /// Submits every op (waiting for tags as needed), waits for all, and returns their data in
    /// order, or the first error. With jitter, the ops leave in a shuffled order.
    fn all<'a>(
        &self,
        ops: impl IntoIterator<Item = Op<'a>>,
    ) -> Result<Vec<Vec<u8>>, LoopbackError> {
        let ops = ops.into_iter().enumerate();
        match &self.inner.jitter {
            None => self.all_in(ops),
            Some(j) => {
                let mut ops: Vec<_> = ops.collect();
                j.shuffle(&mut ops);
                self.all_in(ops)
            }
        }
    }

    fn all_in<'a>(
        &self,
        ops: impl IntoIterator<Item = (usize, Op<'a>)>,
    ) -> Result<Vec<Vec<u8>>, LoopbackError> {
        let mut pending = VecDeque::new();
        let mut out = Vec::new();
        let mut first_err = None;
        let reap = |(i, t), out: &mut Vec<(usize, Vec<u8>)>, first_err: &mut Option<_>| match self
            .wait(t)
        {
            Ok(d) => out.push((i, d)),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        };
        // When every tag is taken, complete our oldest request before sending more: blocking for
        // a tag while holding unreaped tickets deadlocks once an operation needs more requests
        // than there are tags.
        'ops: for (i, op) in ops {
            loop {
                match self.inner.send(op, pending.is_empty()) {
                    Ok(Some(t)) => {
                        pending.push_back((i, t));
                        continue 'ops;
                    }
                    Ok(None) => {
                        if let Some(p) = pending.pop_front() {
                            reap(p, &mut out, &mut first_err);
                        }
                    }
                    Err(e) => {
                        first_err = Some(e);
                        break 'ops;
                    }
                }
            }
        }
        for p in pending {
            reap(p, &mut out, &mut first_err);
        }
        match first_err {
            Some(e) => Err(e),
            None => {
                out.sort_unstable_by_key(|&(i, _)| i);
                Ok(out.into_iter().map(|(_, d)| d).collect())
            }
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), LoopbackError> {
        let bs = u64::from(self.export.block_size);
        if offset % bs != 0 || len % bs != 0 {
            return Err(LoopbackError::Refused {
                errno: 22,
                reason: "offset or length not a multiple of the logical block size",
            });
        }
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.export.size)
        {
            return Err(LoopbackError::Refused {
                errno: 5,
                reason: "beyond the end of the device",
            });
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<(), LoopbackError> {
        if self.export.flags.contains(TransmissionFlags::READ_ONLY) {
            return Err(LoopbackError::Refused {
                errno: 5,
                reason: "the device is read-only",
            });
        }
        Ok(())
    }

    /// Splits `offset..offset+len` into pieces of at most `max` bytes.
    fn pieces(offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u32)> {
        (0..len.div_ceil(max)).map(move |i| {
            let start = i * max;
            (offset + start, (len - start).min(max) as u32)
        })
    }

    /// Largest READ or WRITE request for this export.
    fn max_request(&self) -> u64 {
        self.inner.profile.max_request_for(self.export.block_size)
    }

    /// Reads `len` bytes at `offset`, split into requests of at most the profile's
    /// `max_request` bytes.
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, LoopbackError> {
        self.check_range(offset, len as u64)?;
        let max = self.max_request();
        let parts = self.all(Self::pieces(offset, len as u64, max).map(|(o, l)| Op::read(o, l)))?;
        Ok(parts.concat())
    }

    fn write_with(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), LoopbackError> {
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        let flags = self.export.flags;
        let send_fua =
            fua && flags.contains(TransmissionFlags::SEND_FLUSH | TransmissionFlags::SEND_FUA);
        let max = self.max_request();
        self.all(Self::pieces(offset, data.len() as u64, max).map(|(o, l)| {
            let start = (o - offset) as usize;
            Op {
                flags: if send_fua {
                    CommandFlags::FUA
                } else {
                    CommandFlags::NONE
                },
                ..Op::write(o, &data[start..start + l as usize])
            }
        }))?;
        // With a write cache but no FUA support, the block layer follows the write with a flush.
        if fua && !send_fua && flags.contains(TransmissionFlags::SEND_FLUSH) {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes `data` at `offset`, split into requests of at most the profile's `max_request`
    /// bytes.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), LoopbackError> {
        self.write_with(offset, data, false)
    }

    /// Writes with FUA: as FUA requests when the export supports it, else as WRITE then FLUSH.
    pub fn write_fua(&self, offset: u64, data: &[u8]) -> Result<(), LoopbackError> {
        self.write_with(offset, data, true)
    }

    /// Flushes; without `SEND_FLUSH` the device has no write cache and nothing is sent.
    pub fn flush(&self) -> Result<(), LoopbackError> {
        if !self.export.flags.contains(TransmissionFlags::SEND_FLUSH) {
            return Ok(());
        }
        self.all([Op::flush()]).map(drop)
    }

    /// Discards a range in requests of at most the profile's `max_discard`; EOPNOTSUPP without
    /// `SEND_TRIM`, as the block layer does.
    pub fn trim(&self, offset: u64, len: u64) -> Result<(), LoopbackError> {
        self.check_writable()?;
        if !self.export.flags.contains(TransmissionFlags::SEND_TRIM) {
            return Err(LoopbackError::Refused {
                errno: 95,
                reason: "the device does not support discard",
            });
        }
        self.check_range(offset, len)?;
        let max = self.inner.profile.max_discard_for(self.export.block_size);
        self.all(Self::pieces(offset, len, max).map(|(o, l)| Op::trim(o, l)))
            .map(drop)
    }

    /// Zeroes a range: WRITE_ZEROES (with NO_HOLE when `no_hole`) when the export supports it
    /// and the profile sends it (6.12, unless `send_write_zeroes` is off), else zero-filled
    /// WRITEs as the block layer's fallback writes them.
    pub fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> Result<(), LoopbackError> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let profile = &self.inner.profile;
        let bs = self.export.block_size;
        if !(profile.write_zeroes
            && profile.max_write_zeroes_for(bs) > 0
            && self
                .export
                .flags
                .contains(TransmissionFlags::SEND_WRITE_ZEROES))
        {
            let max = self.max_request();
            let zeroes = vec![0u8; max.min(len) as usize];
            return self
                .all(
                    Self::pieces(offset, len, max)
                        .map(|(o, l)| Op::write(o, &zeroes[..l as usize])),
                )
                .map(drop);
        }
        let max = profile.max_write_zeroes_for(bs);
        self.all(Self::pieces(offset, len, max).map(|(o, l)| Op::write_zeroes(o, l, no_hole)))
            .map(drop)
    }

    /// Sends DISC on every connection, waits for the server to answer what is in flight and
    /// stop, and returns its result; a protocol violation seen at any time is an error too.
    ///
    /// Never hangs while the stall limit is set: a server still busy that long after DISC
    /// (a device call that does not return) is abandoned, its thread left running and not
    /// joined, and the result is [`LoopbackError::Stuck`] naming the requests unanswered.
    pub fn shutdown(mut self) -> Result<(), LoopbackError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), LoopbackError> {
        let Some(server) = self.server.take() else {
            return Ok(());
        };
        // Like the kernel, wait for nothing: DISC goes out at once, behind what was sent.
        let disc = Request::new(Command::Disc, Cookie(0), 0, 0).encode();
        for w in &self.inner.writers {
            let mut w = lock(w);
            let _ = w.write_all(&disc);
            let _ = w.shutdown(Shutdown::Write);
        }
        let ended = wait_for_end(&lock(&self.server_done), self.inner.stall_limit);
        let stuck = if ended {
            None
        } else {
            let st = lock(&self.inner.state);
            Some(st.unanswered(Instant::now()))
        };
        // Stop the timer. The readers end at EOF once the server has closed its ends; if it
        // was abandoned (or left a socket open), shutting ours makes them return at once.
        lock(&self.inner.state).stopping = true;
        self.inner.timer.notify_all();
        if stuck.is_some() || !finished_within(&self.readers, self.inner.stall_limit) {
            for c in &self.inner.closers {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
        if let Some(t) = self.timer.take() {
            let _ = t.join();
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        if let Some(requests) = stuck {
            // Abandoned: dropping the handle detaches the thread.
            drop(server);
            return Err(LoopbackError::Stuck {
                grace: self.inner.stall_limit.unwrap_or_default(),
                requests,
            });
        }
        let result = server.join().unwrap_or_else(|_| {
            Err(ServerError::Io {
                conn: 0,
                source: io::Error::other("server thread panicked"),
            })
        });
        result?;
        if let Some(v) = self.violations().into_iter().next() {
            return Err(LoopbackError::Violation(v));
        }
        Ok(())
    }
}

/// Whether every thread in `handles` finishes within `limit` (`None`: waits as long as it
/// takes).
fn finished_within(handles: &[JoinHandle<()>], limit: Option<Duration>) -> bool {
    let start = Instant::now();
    let mut pause = Duration::from_micros(50);
    while !handles.iter().all(JoinHandle::is_finished) {
        if limit.is_some_and(|l| start.elapsed() >= l) {
            return false;
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    }
    true
}

impl Drop for LoopbackKernel {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
