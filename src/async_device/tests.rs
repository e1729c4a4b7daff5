use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Barrier;

use super::*;
use crate::link::loopback::{LoopbackOptions, Op};
use crate::proto::Errno;
use crate::server::{dispatch_async, IoFlags, IoOp, IoRequest, ServerOptions};
use crate::{LoopbackError, LoopbackKernel};

/// RAM behind async methods, with knobs: reads wait at a barrier of `meet` requests (so they
/// complete only if that many are in flight at once), a read at `panic_at` panics, a read at
/// `short_at` returns a shorter buffer. Writes are recorded.
struct Ram {
    data: Mutex<Vec<u8>>,
    meet: Option<Arc<Barrier>>,
    panic_at: Option<u64>,
    short_at: Option<u64>,
    calls: Mutex<Vec<String>>,
    peak: AtomicUsize,
    now: AtomicUsize,
}

impl Ram {
    fn new(size: usize) -> Ram {
        Ram {
            data: Mutex::new(vec![0; size]),
            meet: None,
            panic_at: None,
            short_at: None,
            calls: Mutex::new(Vec::new()),
            peak: AtomicUsize::new(0),
            now: AtomicUsize::new(0),
        }
    }
}

impl AsyncBlockDevice for Ram {
    fn blocks(&self) -> u64 {
        self.data.lock().unwrap().len() as u64 / 512
    }
    async fn read(&self, offset: u64, mut buf: IoBuf) -> (io::Result<()>, IoBuf) {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(n, Ordering::SeqCst);
        if let Some(b) = &self.meet {
            b.wait().await;
        }
        self.now.fetch_sub(1, Ordering::SeqCst);
        assert_ne!(Some(offset), self.panic_at, "the device panics");
        if Some(offset) == self.short_at {
            buf.truncate(buf.len() / 2);
        }
        let o = offset as usize;
        let len = buf.len();
        buf.copy_from_slice(&self.data.lock().unwrap()[o..o + len]);
        (Ok(()), buf)
    }
    async fn write(&self, offset: u64, data: IoBuf) -> (io::Result<()>, IoBuf) {
        tokio::task::yield_now().await;
        self.calls
            .lock()
            .unwrap()
            .push(format!("write {offset} {}", data.len()));
        let o = offset as usize;
        self.data.lock().unwrap()[o..o + data.len()].copy_from_slice(&data);
        (Ok(()), data)
    }
    async fn flush(&self) -> io::Result<()> {
        self.calls.lock().unwrap().push("flush".into());
        Ok(())
    }
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// 64 reads that can only complete together: the sync path's 4 threads would stall on them.
#[test]
fn a_connection_keeps_the_whole_queue_in_flight_as_tasks() {
    let depth = 64;
    let mut ram = Ram::new(1 << 20);
    ram.meet = Some(Arc::new(Barrier::new(depth)));
    let dev = AsyncDevice::new(ram);
    let options = LoopbackOptions {
        server: ServerOptions {
            workers: 4,
            ..ServerOptions::default()
        },
        stall_limit: Some(Duration::from_secs(20)),
        ..LoopbackOptions::default()
    };
    let k = LoopbackKernel::with_options(dev.clone(), options).unwrap();
    let tickets: Vec<_> = (0..depth as u64)
        .map(|i| k.submit(Op::read(i * 4096, 4096)).unwrap())
        .collect();
    for t in tickets {
        assert_eq!(k.wait(t).unwrap(), vec![0; 4096]);
    }
    k.shutdown().unwrap();
    assert_eq!(dev.device().peak.load(Ordering::SeqCst), depth);
}

/// A panicking future, and one returning a short READ buffer, fail their own request with EIO;
/// the others go on, and serving ends cleanly (every buffer back in the pool).
#[test]
fn a_panic_or_a_short_buffer_fails_only_its_request() {
    let mut ram = Ram::new(1 << 20);
    ram.panic_at = Some(8192);
    ram.short_at = Some(16384);
    let k = LoopbackKernel::start(AsyncDevice::new(ram)).unwrap();
    k.write(0, &[5; 4096]).unwrap();
    let errno = |r: Result<Vec<u8>, LoopbackError>| r.unwrap_err().errno();
    assert_eq!(errno(k.read(8192, 4096)), Some(Errno::EIO.0 as i32));
    assert_eq!(errno(k.read(16384, 4096)), Some(Errno::EIO.0 as i32));
    assert_eq!(k.read(0, 4096).unwrap(), vec![5; 4096]);
    assert!(k.violations().is_empty());
    k.shutdown().unwrap();
}

/// The defaults are BlockDevice's: FUA is write then flush, write-zeroes writes 64 KiB pieces
/// of zeroes, trim is ENOTSUP.
#[test]
fn defaults_match_the_sync_trait() {
    let ram = Ram::new(1 << 20);
    ram.data.lock().unwrap().fill(0xff);
    let rt = current_thread();
    let fua = IoRequest::new(IoOp::Write, 512, 512).with(IoFlags::FUA);
    let (r, _) = rt.block_on(dispatch_async(&ram, fua, IoBuf::from(vec![1; 512]), false));
    assert_eq!(r, Ok(512));
    let zeroes = IoRequest::new(IoOp::WriteZeroes, 4096, 130 << 10);
    assert_eq!(
        rt.block_on(dispatch_async(&ram, zeroes, IoBuf::zeroed(0), false))
            .0,
        Ok(0)
    );
    let trim = IoRequest::new(IoOp::Trim, 0, 512);
    assert_eq!(
        rt.block_on(dispatch_async(&ram, trim, IoBuf::zeroed(0), false))
            .0,
        Err(Errno::ENOTSUP)
    );
    let calls = ram.calls.lock().unwrap().clone();
    assert_eq!(
        calls,
        [
            "write 512 512",
            "flush",
            "write 4096 65536",
            "write 69632 65536",
            "write 135168 2048"
        ]
    );
    let data = ram.data.lock().unwrap();
    assert!(data[4096..4096 + (130 << 10)].iter().all(|&b| b == 0));
    assert_eq!(data[4095], 0xff);
    assert_eq!(data[4096 + (130 << 10)], 0xff);
    assert_eq!(
        zero_chunks(0, 130 << 10).collect::<Vec<_>>(),
        [(0, 65536), (65536, 65536), (131072, 2048)]
    );
}

/// The blocking bridge: an async device called as a BlockDevice from plain threads; inside a
/// current-thread runtime the call fails rather than deadlock.
#[test]
fn the_blocking_bridge_calls_through_and_refuses_to_deadlock() {
    let dev = AsyncDevice::new(Ram::new(1 << 20)).blocking();
    assert!(dev.asynchronous().is_none(), "served by threads");
    BlockDevice::write(&dev, 4096, &[3; 512]).unwrap();
    let mut buf = [0u8; 512];
    BlockDevice::read(&dev, 4096, &mut buf).unwrap();
    assert_eq!(buf, [3; 512]);
    let rt = current_thread();
    let inside = rt.block_on(async { BlockDevice::read(&dev, 4096, &mut buf).unwrap_err().kind() });
    assert_eq!(inside, io::ErrorKind::WouldBlock);
}

/// A sync device through the async path: the blanket impl.
#[test]
fn a_sync_device_is_an_async_one() {
    let mem = crate::MemDevice::new(1 << 20);
    let rt = current_thread();
    let (r, back) = rt.block_on(AsyncBlockDevice::write(&mem, 0, IoBuf::from(vec![9; 512])));
    r.unwrap();
    assert_eq!(back.len(), 512);
    let (r, buf) = rt.block_on(AsyncBlockDevice::read(&mem, 0, IoBuf::zeroed(512)));
    r.unwrap();
    assert_eq!(buf.into_vec(), vec![9; 512]);
    assert_eq!(AsyncBlockDevice::blocks(&mem), 2048);
}

/// DISC right behind a slow READ: serve returns only after the READ's task has replied (the
/// reply is in the socket when the serving thread is joined).
#[test]
fn serve_returns_only_when_every_task_has_replied() {
    use crate::proto::{Command, Cookie, Reply, Request, REPLY_LEN};
    use crate::server::{export_of, serve, Dispatcher};
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    struct Slow;
    impl AsyncBlockDevice for Slow {
        fn blocks(&self) -> u64 {
            64
        }
        async fn read(&self, _: u64, mut buf: IoBuf) -> (io::Result<()>, IoBuf) {
            tokio::time::sleep(Duration::from_millis(300)).await;
            buf.fill(7);
            (Ok(()), buf)
        }
    }
    let dev = AsyncDevice::new(Slow);
    let export = export_of(&dev).unwrap();
    let (mut client, server_end) = UnixStream::pair().unwrap();
    let server = std::thread::spawn(move || {
        serve(
            Dispatcher::new(&dev),
            &export,
            &[server_end],
            &ServerOptions::default(),
        )
    });
    client
        .write_all(&Request::new(Command::Read, Cookie(1), 0, 512).encode())
        .unwrap();
    client
        .write_all(&Request::new(Command::Disc, Cookie(2), 0, 0).encode())
        .unwrap();
    server.join().unwrap().unwrap();
    client.set_nonblocking(true).unwrap();
    let mut reply = [0u8; REPLY_LEN + 512];
    client.read_exact(&mut reply).unwrap();
    assert_eq!(Reply::parse(&reply).unwrap(), Reply::ok(Cookie(1)));
    assert_eq!(reply[REPLY_LEN..], [7; 512]);
}
