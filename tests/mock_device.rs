//! A mockall device proves the server calls exactly the right device methods with the right
//! ranges, and nothing else: any unexpected call fails the mock (and shows up as EIO).

use std::io;

use mockall::predicate::eq;
use mockall::Sequence;
use userblk::link::loopback::RawKernel;
use userblk::proto::{Command, CommandFlags, Cookie, Errno, Request};
use userblk::{BlockDevice, Capabilities, LoopbackKernel};

mockall::mock! {
    Dev {}
    impl BlockDevice for Dev {
        fn block_size(&self) -> u32;
        fn blocks(&self) -> u64;
        fn capabilities(&self) -> Capabilities;
        fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
        fn write(&self, offset: u64, data: &[u8]) -> io::Result<()>;
        fn write_fua(&self, offset: u64, data: &[u8]) -> io::Result<()>;
        fn flush(&self) -> io::Result<()>;
        fn trim(&self, offset: u64, len: u64) -> io::Result<()>;
        fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()>;
        fn unmount(&self);
    }
}

fn geometry(dev: &mut MockDev, caps: Capabilities) {
    dev.expect_block_size().return_const(4096u32);
    dev.expect_blocks().return_const(256u64); // 1 MiB
    dev.expect_capabilities().return_const(caps);
}

fn full_caps() -> Capabilities {
    Capabilities {
        fua: true,
        trim: true,
        write_zeroes: true,
        ..Capabilities::default()
    }
}

#[test]
fn each_command_calls_exactly_its_method_with_its_range() {
    let mut dev = MockDev::new();
    geometry(&mut dev, full_caps());
    let mut seq = Sequence::new();
    dev.expect_write()
        .withf(|off, data| *off == 8192 && data.len() == 8192 && data.iter().all(|&b| b == 3))
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _| Ok(()));
    dev.expect_read()
        .withf(|off, buf| *off == 8192 && buf.len() == 4096)
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, buf| {
            buf.fill(3);
            Ok(())
        });
    dev.expect_write_fua()
        .withf(|off, data| *off == 0 && data.len() == 4096)
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _| Ok(()));
    dev.expect_flush()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|| Ok(()));
    dev.expect_trim()
        .with(eq(65536), eq(131072))
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _| Ok(()));
    dev.expect_write_zeroes()
        .with(eq(4096), eq(4096), eq(false))
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _, _| Ok(()));
    dev.expect_write_zeroes()
        .with(eq(0), eq(1 << 20), eq(true))
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _, _| Ok(()));
    dev.expect_unmount()
        .times(1)
        .in_sequence(&mut seq)
        .return_const(());

    let k = LoopbackKernel::start(dev).unwrap();
    k.write(8192, &[3; 8192]).unwrap();
    assert_eq!(k.read(8192, 4096).unwrap(), vec![3; 4096]);
    k.write_fua(0, &[1; 4096]).unwrap();
    k.flush().unwrap();
    k.trim(65536, 131072).unwrap();
    k.write_zeroes(4096, 4096, true).unwrap();
    k.write_zeroes(0, 1 << 20, false).unwrap();
    k.shutdown().unwrap();
}

#[test]
fn fua_on_trim_and_zeroes_is_followed_by_flush() {
    let mut dev = MockDev::new();
    geometry(&mut dev, full_caps());
    let mut seq = Sequence::new();
    dev.expect_trim()
        .with(eq(0), eq(4096))
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _| Ok(()));
    dev.expect_flush()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|| Ok(()));
    dev.expect_unmount().times(1).return_const(());
    let mut raw = RawKernel::start(dev).unwrap();
    let mut r = Request::new(Command::Trim, Cookie(1), 0, 4096);
    r.flags = CommandFlags::FUA;
    raw.send_request(&r, &[]).unwrap();
    assert_eq!(raw.recv_reply().unwrap().errno(), None);
    raw.disconnect().unwrap();
}

#[test]
fn invalid_requests_never_reach_the_device() {
    let mut dev = MockDev::new();
    geometry(
        &mut dev,
        Capabilities {
            read_only: true,
            ..Capabilities::default()
        },
    );
    // No read, write, flush, trim or zeroes expectation: any such call fails the test.
    dev.expect_unmount().times(1).return_const(());
    let mut raw = RawKernel::start(dev).unwrap();
    for (i, (cmd, off, len, errno)) in [
        (Command::Read, 1 << 20, 4096, Errno::EINVAL),
        (Command::Read, 512, 4096, Errno::EINVAL), // not 4 KiB aligned
        (Command::Write, 0, 4096, Errno::EPERM),
        (Command::Trim, 0, 4096, Errno::EPERM),
        (Command::WriteZeroes, 0, 4096, Errno::EPERM),
    ]
    .into_iter()
    .enumerate()
    {
        let r = Request::new(cmd, Cookie(i as u64), off, len);
        raw.send_request(&r, &vec![0; r.payload_len()]).unwrap();
        let reply = raw.recv_reply().unwrap();
        assert_eq!(
            (reply.cookie, reply.errno()),
            (Cookie(i as u64), Some(errno))
        );
    }
    raw.disconnect().unwrap();
}
