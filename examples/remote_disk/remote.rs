//! A remote disk, written the way a user writes one with tokio: the storage is a server task
//! reached over a Unix socket with a protocol of its own, every request waits an injected
//! latency there (a network round trip; a delay line thread keeps it precise), and the device ([`RemoteDisk`]) is an
//! [`AsyncBlockDevice`] that keeps as many requests in flight on one connection as it is given.
//!
//! The protocol: a request is `op u8, id u64, offset u64, len u32` (big-endian) then, for a
//! write, `len` bytes; a reply is `id u64, errno u32` then, for a successful read, `len` bytes.
//! Replies come in any order; the id matches them.
//!
//! [`PageCache`] puts a 4 KiB page cache in front of a device, with a seeded bug on request: a
//! lost update between two tasks writing the same page.
//!
//! Shared by the example, its tests (`harness/tests/remote_disk.rs`) and `benches/remote.rs`,
//! each using part of it.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};

use userblk::async_device::{AsyncBlockDevice, IoBuf};
use userblk::Capabilities;

const OP_READ: u8 = 0;
const OP_WRITE: u8 = 1;
const OP_FLUSH: u8 = 2;
const OP_TRIM: u8 = 3;
const REQUEST_LEN: usize = 21;
const REPLY_LEN: usize = 12;

/// The default injected latency per request.
pub const DEFAULT_LATENCY: Duration = Duration::from_millis(1);

/// A running storage server: its socket, its bytes.
#[derive(Debug)]
pub struct Storage {
    path: PathBuf,
    size: u64,
    _dir: tempfile::TempDir,
}

impl Storage {
    /// Starts a storage server of `size` bytes (zeroes) on `rt`, answering each request after
    /// `latency`, on a socket in a new temporary directory.
    pub fn start(rt: &Handle, size: u64, latency: Duration) -> io::Result<Storage> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("storage.sock");
        let listener = {
            let _in_runtime = rt.enter();
            UnixListener::bind(&path)?
        };
        let bytes = Arc::new(Mutex::new(vec![0u8; size as usize]));
        let delay = delay_line(Arc::clone(&bytes));
        rt.spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve_client(
                    sock,
                    Arc::clone(&bytes),
                    delay.clone(),
                    latency,
                ));
            }
        });
        Ok(Storage {
            path,
            size,
            _dir: dir,
        })
    }

    /// Where clients connect.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// One request on the storage side, due at `due`.
struct Job {
    due: Instant,
    op: u8,
    id: u64,
    offset: u64,
    len: usize,
    payload: Vec<u8>,
    reply: mpsc::UnboundedSender<Vec<u8>>,
}

/// The latency: a delay line. Every request waits the same time, so they come due in the order
/// they arrived, and one thread sleeping until the next is due serves them all, with those due
/// within [`SLACK`] of it (tokio's timer rounds up to whole milliseconds, which would make 1 ms
/// about 2; one sleep per request would cost a context switch each).
fn delay_line(bytes: Arc<Mutex<Vec<u8>>>) -> std::sync::mpsc::Sender<Job> {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    std::thread::spawn(move || {
        let mut next = None;
        loop {
            let Some(job) = next.take().or_else(|| rx.recv().ok()) else {
                return;
            };
            let now = Instant::now();
            if job.due > now + SLACK {
                std::thread::sleep(job.due - now);
            }
            let horizon = Instant::now() + SLACK;
            let mut job = job;
            loop {
                let reply = job.reply.clone();
                let _ = reply.send(execute(&bytes, job));
                match rx.try_recv() {
                    Ok(j) if j.due <= horizon => job = j,
                    Ok(j) => {
                        next = Some(j);
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
    });
    tx
}

/// How early the delay line serves a request that is nearly due.
const SLACK: Duration = Duration::from_micros(50);

/// Does a request on the storage and makes its reply.
fn execute(bytes: &Mutex<Vec<u8>>, job: Job) -> Vec<u8> {
    let Job {
        op,
        id,
        offset,
        len,
        payload,
        ..
    } = job;
    let mut reply = Vec::with_capacity(REPLY_LEN + if op == OP_READ { len } else { 0 });
    reply.extend_from_slice(&id.to_be_bytes());
    let mut data = bytes.lock().unwrap();
    let range = offset as usize..(offset as usize).saturating_add(len);
    let errno: u32 = if range.end > data.len() {
        22 // EINVAL
    } else {
        match op {
            OP_READ | OP_FLUSH => 0,
            OP_WRITE => {
                data[range.clone()].copy_from_slice(&payload);
                0
            }
            OP_TRIM => {
                data[range.clone()].fill(0);
                0
            }
            _ => 22,
        }
    };
    reply.extend_from_slice(&errno.to_be_bytes());
    if op == OP_READ && errno == 0 {
        reply.extend_from_slice(&data[range]);
    }
    reply
}

/// One client of the storage server: each request goes down the delay line (or is done at once
/// without latency); replies go out through one writer task, as many per write as are ready.
async fn serve_client(
    sock: UnixStream,
    bytes: Arc<Mutex<Vec<u8>>>,
    delay: std::sync::mpsc::Sender<Job>,
    latency: Duration,
) {
    let (r, mut w) = sock.into_split();
    let mut r = BufReader::with_capacity(256 << 10, r);
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        let mut out = Vec::new();
        while let Some(reply) = rx.recv().await {
            out.clear();
            out.extend_from_slice(&reply);
            while let Ok(more) = rx.try_recv() {
                out.extend_from_slice(&more);
            }
            if w.write_all(&out).await.is_err() {
                return;
            }
        }
    });
    let mut header = [0u8; REQUEST_LEN];
    while r.read_exact(&mut header).await.is_ok() {
        let op = header[0];
        let len = u32::from_be_bytes(header[17..21].try_into().unwrap()) as usize;
        let mut payload = Vec::new();
        if op == OP_WRITE {
            payload.resize(len, 0);
            if r.read_exact(&mut payload).await.is_err() {
                return;
            }
        }
        let job = Job {
            due: Instant::now() + latency,
            op,
            id: u64::from_be_bytes(header[1..9].try_into().unwrap()),
            offset: u64::from_be_bytes(header[9..17].try_into().unwrap()),
            len,
            payload,
            reply: tx.clone(),
        };
        if latency.is_zero() {
            let _ = tx.send(execute(&bytes, job));
        } else if delay.send(job).is_err() {
            return;
        }
    }
}

/// A request waiting for its reply: where the result goes, with the buffer (a read's reply is
/// read straight into it).
struct Waiting {
    read: bool,
    buf: IoBuf,
    done: oneshot::Sender<(io::Result<()>, IoBuf)>,
}

type Table = Arc<Mutex<HashMap<u64, Waiting>>>;

/// A request on its way to the writer task.
struct Call {
    header: [u8; REQUEST_LEN],
    /// A write's payload (sent, then handed back with the reply), or a read's buffer.
    waiting: Waiting,
    id: u64,
}

/// The device: one connection to the storage server, any number of requests in flight on it.
#[derive(Clone)]
pub struct RemoteDisk {
    calls: mpsc::UnboundedSender<Call>,
    next_id: Arc<AtomicU64>,
    size: u64,
}

impl RemoteDisk {
    /// Connects to the storage server at `path`, of `size` bytes.
    pub async fn connect(path: &Path, size: u64) -> io::Result<RemoteDisk> {
        let sock = UnixStream::connect(path).await?;
        let (r, mut w) = sock.into_split();
        let table: Table = Arc::default();
        let (calls, mut rx) = mpsc::unbounded_channel::<Call>();
        let sending = Arc::clone(&table);
        tokio::spawn(async move {
            let mut out = Vec::new();
            while let Some(call) = rx.recv().await {
                out.clear();
                let mut next = Some(call);
                while let Some(call) = next.take().or_else(|| rx.try_recv().ok()) {
                    out.extend_from_slice(&call.header);
                    if call.header[0] == OP_WRITE {
                        out.extend_from_slice(&call.waiting.buf);
                    }
                    sending.lock().unwrap().insert(call.id, call.waiting);
                }
                if w.write_all(&out).await.is_err() {
                    break;
                }
            }
            // The connection is gone: every waiter's sender drops, and its call fails.
            sending.lock().unwrap().clear();
        });
        tokio::spawn(async move {
            let mut r = BufReader::with_capacity(256 << 10, r);
            let mut header = [0u8; REPLY_LEN];
            while r.read_exact(&mut header).await.is_ok() {
                let id = u64::from_be_bytes(header[..8].try_into().unwrap());
                let errno = u32::from_be_bytes(header[8..].try_into().unwrap());
                let Some(mut w) = table.lock().unwrap().remove(&id) else {
                    break; // a reply to nothing: the stream is out of sync
                };
                if w.read && errno == 0 && r.read_exact(&mut w.buf).await.is_err() {
                    break;
                }
                let result = match errno {
                    0 => Ok(()),
                    e => Err(io::Error::from_raw_os_error(e as i32)),
                };
                let _ = w.done.send((result, w.buf));
            }
            table.lock().unwrap().clear();
        });
        Ok(RemoteDisk {
            calls,
            next_id: Arc::default(),
            size,
        })
    }

    async fn call(&self, op: u8, offset: u64, len: u64, buf: IoBuf) -> (io::Result<()>, IoBuf) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut header = [0u8; REQUEST_LEN];
        header[0] = op;
        header[1..9].copy_from_slice(&id.to_be_bytes());
        header[9..17].copy_from_slice(&offset.to_be_bytes());
        header[17..21].copy_from_slice(&(len as u32).to_be_bytes());
        let (done, reply) = oneshot::channel();
        let waiting = Waiting {
            read: op == OP_READ,
            buf,
            done,
        };
        let gone = || io::Error::new(io::ErrorKind::BrokenPipe, "the storage server is gone");
        if self
            .calls
            .send(Call {
                header,
                waiting,
                id,
            })
            .is_err()
        {
            return (Err(gone()), IoBuf::zeroed(0));
        }
        reply
            .await
            .unwrap_or_else(|_| (Err(gone()), IoBuf::zeroed(0)))
    }
}

impl AsyncBlockDevice for RemoteDisk {
    fn blocks(&self) -> u64 {
        self.size / 512
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            trim: true,
            trim_zeroes: true,
            ..Capabilities::default()
        }
    }
    async fn read(&self, offset: u64, buf: IoBuf) -> (io::Result<()>, IoBuf) {
        let len = buf.len() as u64;
        self.call(OP_READ, offset, len, buf).await
    }
    async fn write(&self, offset: u64, data: IoBuf) -> (io::Result<()>, IoBuf) {
        let len = data.len() as u64;
        self.call(OP_WRITE, offset, len, data).await
    }
    async fn flush(&self) -> io::Result<()> {
        self.call(OP_FLUSH, 0, 0, IoBuf::zeroed(0)).await.0
    }
    async fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        // The protocol's length is 32 bits: larger trims go in pieces.
        let mut done = 0;
        while done < len {
            let n = (len - done).min(1 << 30);
            self.call(OP_TRIM, offset + done, n, IoBuf::zeroed(0))
                .await
                .0?;
            done += n;
        }
        Ok(())
    }
}

/// A cached page (`None` until first written), locked across a read-modify-write.
type Slot = Arc<tokio::sync::Mutex<Option<Vec<u8>>>>;

/// The page a [`PageCache`] keeps.
pub const PAGE: usize = 4096;

/// A write-through cache of 4 KiB pages in front of `D`: reads of cached pages are local; a write
/// updates whole pages, reading a partly written page first (read-modify-write).
///
/// [`PageCache::new`] holds a page's lock across its read-modify-write. [`PageCache::racy`] is the
/// seeded bug: it does not, so two tasks writing different sectors of one page both read the
/// old page across their await, and the second to store its page undoes the first's write (a
/// lost update), though both were acknowledged.
pub struct PageCache<D> {
    inner: D,
    pages: Mutex<HashMap<u64, Slot>>,
    racy: bool,
}

impl<D: AsyncBlockDevice> PageCache<D> {
    /// The correct cache.
    pub fn new(inner: D) -> PageCache<D> {
        PageCache {
            inner,
            pages: Mutex::default(),
            racy: false,
        }
    }

    /// The cache with the seeded lost update.
    pub fn racy(inner: D) -> PageCache<D> {
        PageCache {
            racy: true,
            ..PageCache::new(inner)
        }
    }

    fn slot(&self, page: u64) -> Slot {
        Arc::clone(self.pages.lock().unwrap().entry(page).or_default())
    }

    /// The page's bytes: from the cache, or fetched.
    async fn fetch(&self, page: u64) -> io::Result<Vec<u8>> {
        if let Some(p) = self.slot(page).lock().await.clone() {
            return Ok(p);
        }
        let (r, buf) = self
            .inner
            .read(page * PAGE as u64, IoBuf::zeroed(PAGE))
            .await;
        r.map(|()| buf.into_vec())
    }

    /// Writes `data` at `at` within `page` (read-modify-write of the whole page).
    async fn write_page(&self, page: u64, at: usize, data: &[u8]) -> io::Result<()> {
        let slot = self.slot(page);
        let (mut bytes, guard) = if self.racy {
            // The bug: the page is read, and later stored, without holding its lock between.
            (self.fetch(page).await?, None)
        } else {
            let guard = slot.lock().await;
            let bytes = match guard.clone() {
                Some(p) => p,
                None => {
                    let (r, buf) = self
                        .inner
                        .read(page * PAGE as u64, IoBuf::zeroed(PAGE))
                        .await;
                    r?;
                    buf.into_vec()
                }
            };
            (bytes, Some(guard))
        };
        bytes[at..at + data.len()].copy_from_slice(data);
        let (r, back) = self
            .inner
            .write(page * PAGE as u64, IoBuf::from(bytes))
            .await;
        r?;
        match guard {
            Some(mut g) => *g = Some(back.into_vec()),
            None => *slot.lock().await = Some(back.into_vec()),
        }
        Ok(())
    }
}

impl<D: AsyncBlockDevice> AsyncBlockDevice for PageCache<D> {
    fn blocks(&self) -> u64 {
        // Whole pages only: a partial last page would have nothing to read-modify-write.
        self.inner.blocks() / (PAGE as u64 / 512) * (PAGE as u64 / 512)
    }
    async fn read(&self, offset: u64, mut buf: IoBuf) -> (io::Result<()>, IoBuf) {
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let (page, within) = (at / PAGE as u64, (at % PAGE as u64) as usize);
            let n = (PAGE - within).min(buf.len() - done);
            match self.fetch(page).await {
                Ok(p) => buf[done..done + n].copy_from_slice(&p[within..within + n]),
                Err(e) => return (Err(e), buf),
            }
            done += n;
        }
        (Ok(()), buf)
    }
    async fn write(&self, offset: u64, data: IoBuf) -> (io::Result<()>, IoBuf) {
        let mut done = 0;
        while done < data.len() {
            let at = offset + done as u64;
            let (page, within) = (at / PAGE as u64, (at % PAGE as u64) as usize);
            let n = (PAGE - within).min(data.len() - done);
            if let Err(e) = self.write_page(page, within, &data[done..done + n]).await {
                return (Err(e), data);
            }
            done += n;
        }
        (Ok(()), data)
    }
    async fn flush(&self) -> io::Result<()> {
        self.inner.flush().await
    }
}
