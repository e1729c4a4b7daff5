//! Scripts with requests in flight together (`together { .. }`) and `any-of` expectations:
//! groups really are concurrent at the device, a device that tears blocks under a racing read
//! is caught (and its locked twin passes), replies are matched by cookie in any order, and a
//! script prints in a text that parses back to the same script.

use std::io::{self, Read, Write};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::thread;
use std::time::Duration;

use userblk::link::loopback::LoopbackLink;
use userblk::proto::{Command, CommandFlags, Cookie, Errno, Reply, Request, REQUEST_LEN};
use userblk::server::export_of;
use userblk::{BlockDevice, Capabilities, KernelLink, LoopbackOptions, MemDevice};
use userblk_harness::script::{Data, Expect, Pattern, Pos, Script, ScriptError, Segment};

const SIZE: u64 = 8 << 20;
/// How long a test device waits for the request it is designed to race with. Long enough never
/// to run out when requests are concurrent; short, when they are not, to fail quickly.
const PATIENT: Duration = Duration::from_secs(10);
const IMPATIENT: Duration = Duration::from_millis(200);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Replays through the fake kernel and through a raw socket; the two results.
fn both<D: BlockDevice + 'static>(
    script: &Script,
    device: impl Fn() -> D,
) -> [Result<(), ScriptError>; 2] {
    [
        script.replay_loopback(device(), LoopbackOptions::default()),
        script.replay_raw(device()),
    ]
}

// ---------------------------------------------------------------------------------------------
// Groups on a correct device.

const RACE: &str = "
write 0 4K seed:9
together {
  write 0 8K seed:1
  write 4K 8K seed:2
  read 0 12K => any-of(4K*seed:9 fill:0 | seed:1 | 4K*any seed:2)
}
read 0 12K => any-of(8K*seed:1 seed:2 | 4K*seed:1 seed:2)
";

/// MemDevice with `never_blocks` off, so the server calls it from several threads at once.
struct Threaded(MemDevice);

impl BlockDevice for Threaded {
    fn block_size(&self) -> u32 {
        self.0.block_size()
    }
    fn blocks(&self) -> u64 {
        self.0.blocks()
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            never_blocks: false,
            ..self.0.capabilities()
        }
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write(offset, data)
    }
}

#[test]
fn racing_writes_and_a_read_pass_on_memdevice() {
    let script = Script::parse(RACE).unwrap();
    for r in both(&script, || MemDevice::new(SIZE)) {
        r.unwrap();
    }
    for r in both(&script, || Threaded(MemDevice::new(SIZE))) {
        r.unwrap();
    }
}

#[test]
fn a_wrong_alternative_set_fails_naming_the_group_and_step() {
    // The alternatives miss the second write's data past 8 KiB: blocks 16.. can only be
    // seed:2, which none allows.
    let text = RACE.replace(
        "read 0 12K => any-of(8K*seed:1 seed:2 | 4K*seed:1 seed:2)",
        "read 0 12K => any-of(8K*seed:1 fill:0 | 4K*seed:1 4K*seed:2 fill:0)",
    );
    let script = Script::parse(&text).unwrap();
    for r in both(&script, || MemDevice::new(SIZE)) {
        let err = r.unwrap_err().to_string();
        let first = err.lines().next().unwrap();
        assert_eq!(
            first,
            "step 5 (line 8): block 16 (device bytes 8192..8704, 512-byte blocks) matches none \
             of the 2 alternatives: a torn write, or data from none of them",
            "{err}"
        );
        for alt in ["8K*seed:1 fill:0x00", "4K*seed:1 4K*seed:2 fill:0x00"] {
            assert!(
                err.contains(&format!("against `{alt}`: first difference at byte 8192")),
                "{err}"
            );
        }
    }

    // A step in a group names its group. Block 0 is seed:9 or seed:1, never zeroes or seed:3.
    let text = RACE.replace(
        "any-of(4K*seed:9 fill:0 | seed:1 | 4K*any seed:2)",
        "any-of(fill:0 | seed:3)",
    );
    let script = Script::parse(&text).unwrap();
    for r in both(&script, || MemDevice::new(SIZE)) {
        let err = r.unwrap_err().to_string();
        assert!(
            err.starts_with(
                "step 4 (line 6) in group 1 (steps 2-4, lines 4-6): block 0 (device bytes 0..512"
            ),
            "{err}"
        );
        assert!(
            err.contains("\n  step:     read 0 12K => any-of(fill:0x00 | seed:3)\n"),
            "{err}"
        );
    }
}

#[test]
fn errors_in_a_group_are_judged_per_step() {
    let script = Script::new().write(0, 4096, Data::seed(1)).together(
        Script::new()
            .read(SIZE, 512)
            .errno(Errno::EINVAL)
            .read(0, 4096)
            .data(Data::seed(1))
            .write(SIZE - 512, 1024, Data::fill(1))
            .errno(Errno::ENOSPC)
            .flush(),
    );
    for r in both(&script, || MemDevice::new(SIZE)) {
        r.unwrap();
    }
    let wrong = script.clone().together(Script::new().read(SIZE, 512).ok());
    for r in both(&wrong, || MemDevice::new(SIZE)) {
        let err = r.unwrap_err().to_string();
        assert!(
            err.starts_with("step 6 in group 2 (steps 6-6): expected ok, got error EINVAL (22)"),
            "{err}"
        );
    }
}

#[test]
fn steps_without_meaning_in_a_group_are_refused_when_built() {
    let cases = [
        (Script::new().disc(), "disc cannot be in a group"),
        (Script::new().eof(), "eof cannot be in a group"),
        (
            Script::new().raw(&[0; 28]),
            "a raw step cannot be in a group",
        ),
        (
            Script::new().read(0, 512).closed(),
            "`closed` and `none` cannot be expected in a group",
        ),
    ];
    for (group, why) in cases {
        let script = Script::new().read(0, 512).together(group);
        let err = script.replay_raw(MemDevice::new(SIZE)).unwrap_err();
        let ScriptError::Step(f) = &err else {
            panic!("{err}")
        };
        assert_eq!(
            (f.step, f.summary.as_str()),
            (2, &*format!("not sent: {why}"))
        );
    }
}

#[test]
fn a_group_larger_than_the_fake_kernels_tags_fails_instead_of_hanging() {
    let mut group = Script::new();
    for i in 0..5u64 {
        group = group.write(i * 512, 512, Data::seed(i));
    }
    let options = LoopbackOptions {
        queue_depth: 4,
        ..LoopbackOptions::default()
    };
    let err = Script::new()
        .together(group)
        .replay_loopback(MemDevice::new(SIZE), options)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("a group of 5 requests is more than the fake kernel's 4 tags"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Requests of a group reach the device together.

/// Holds its first request until a second one arrives: concurrent requests pass, requests sent
/// one at a time fail the first with EIO once `wait` runs out (a timeout in the device, so a
/// sequential replay fails instead of hanging).
struct Rendezvous {
    mem: MemDevice,
    arrived: Mutex<u64>,
    changed: Condvar,
    wait: Duration,
}

impl Rendezvous {
    fn new(wait: Duration) -> Rendezvous {
        Rendezvous {
            mem: MemDevice::new(SIZE),
            arrived: Mutex::new(0),
            changed: Condvar::new(),
            wait,
        }
    }

    fn arrive(&self) -> io::Result<()> {
        let mut n = lock(&self.arrived);
        *n += 1;
        self.changed.notify_all();
        if *n > 1 {
            return Ok(());
        }
        let (n, _) = self
            .changed
            .wait_timeout_while(n, self.wait, |n| *n < 2)
            .unwrap_or_else(PoisonError::into_inner);
        if *n < 2 {
            return Err(io::Error::from_raw_os_error(5));
        }
        Ok(())
    }
}

impl BlockDevice for Rendezvous {
    fn blocks(&self) -> u64 {
        self.mem.blocks()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.arrive()?;
        self.mem.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.arrive()?;
        self.mem.write(offset, data)
    }
}

#[test]
fn a_groups_requests_are_in_flight_together_at_the_device() {
    let text = "
        together {
          write 0 4K seed:1
          read 8K 4K => fill:0
        }
        read 0 4K => seed:1
    ";
    let script = Script::parse(text).unwrap();
    for r in both(&script, || Rendezvous::new(PATIENT)) {
        r.unwrap();
    }
    // The same requests one at a time: the first waits for a second that never comes.
    let one_by_one = text.replace("together {", "").replace('}', "");
    let script = Script::parse(&one_by_one).unwrap();
    for r in both(&script, || Rendezvous::new(IMPATIENT)) {
        let err = r.unwrap_err().to_string();
        assert!(
            err.starts_with("step 1 (line 3): expected ok, got error EIO (5)"),
            "{err}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// A device that tears blocks, caught by a group with any-of; its locked twin passes.

/// 4 KiB logical blocks; copies a write in two halves of its bytes, so a 12 KiB write is
/// half-done in the middle of block 1. Without `locked`, nothing keeps a read out between the
/// halves: a racing read returns a block that is half new, half old, which no disk returns.
///
/// To make that interleaving certain rather than likely, a read waits (at most `wait`) until a
/// write is half done, and the unlocked write waits (at most `wait`) for that read before its
/// second half: a slow copy, made deterministic. The locked write cannot let a read in, so it
/// does not wait.
struct TwoHalves {
    mem: MemDevice,
    lock: Option<RwLock<()>>,
    /// A write is half done; reads finished.
    state: Mutex<(bool, u64)>,
    changed: Condvar,
    wait: Duration,
}

impl TwoHalves {
    fn new(locked: bool, wait: Duration) -> TwoHalves {
        TwoHalves {
            mem: MemDevice::with_block_size(SIZE, 4096),
            lock: locked.then(|| RwLock::new(())),
            state: Mutex::new((false, 0)),
            changed: Condvar::new(),
            wait,
        }
    }
}

impl BlockDevice for TwoHalves {
    fn block_size(&self) -> u32 {
        4096
    }
    fn blocks(&self) -> u64 {
        self.mem.blocks()
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let st = lock(&self.state);
        let (mut st, _) = self
            .changed
            .wait_timeout_while(st, self.wait, |st| !st.0)
            .unwrap_or_else(PoisonError::into_inner);
        drop(st);
        {
            let _shared = self.lock.as_ref().map(|l| l.read());
            self.mem.read(offset, buf)?;
        }
        st = lock(&self.state);
        st.1 += 1;
        self.changed.notify_all();
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let _excl = self.lock.as_ref().map(|l| l.write());
        let half = data.len() / 2;
        self.mem.write(offset, &data[..half])?;
        let mut st = lock(&self.state);
        st.0 = true;
        self.changed.notify_all();
        if self.lock.is_none() {
            let reads = st.1;
            st = self
                .changed
                .wait_timeout_while(st, self.wait, |st| st.1 == reads)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        drop(st);
        self.mem.write(offset + half as u64, &data[half..])
    }
}

const TEAR: &str = "
together {
  write 0 12K seed:1
  read 0 12K => any-of(fill:0 | seed:1)
}
read 0 12K => seed:1
";

#[test]
fn the_unlocked_device_really_returns_a_torn_block() {
    let dev = TwoHalves::new(false, PATIENT);
    let data = Pattern::Seed(1).bytes(0, 12 << 10);
    let mut got = vec![0u8; data.len()];
    thread::scope(|s| {
        s.spawn(|| dev.write(0, &data).unwrap());
        dev.read(0, &mut got).unwrap();
    });
    // Block 1 (4096..8192) is half the new data, half the old zeroes: neither write's.
    assert_eq!(got[..6144], data[..6144]);
    assert!(got[6144..].iter().all(|&b| b == 0));
}

#[test]
fn a_device_that_tears_blocks_is_caught_by_a_group_with_any_of() {
    let script = Script::parse(TEAR).unwrap();
    for r in both(&script, || TwoHalves::new(false, PATIENT)) {
        let err = r.unwrap_err().to_string();
        // Blocks come from the export: in 512-byte blocks, 6 KiB is a block boundary and the
        // tear would pass unseen.
        assert!(
            err.starts_with(
                "step 2 (line 4) in group 1 (steps 1-2, lines 3-4): block 1 (device bytes \
                 4096..8192, 4096-byte blocks) matches none of the 2 alternatives"
            ),
            "{err}"
        );
        assert!(
            err.contains("against `fill:0x00`: first difference at byte 4096"),
            "{err}"
        );
        assert!(
            err.contains("against `seed:1`: first difference at byte 6144"),
            "{err}"
        );
    }
}

#[test]
fn the_same_device_with_a_lock_passes() {
    let script = Script::parse(TEAR).unwrap();
    for r in both(&script, || TwoHalves::new(true, PATIENT)) {
        r.unwrap();
    }
}

#[test]
fn without_a_group_the_tear_goes_unseen() {
    // Sent one at a time, the read comes after the write: the group is what catches the bug.
    let text = TEAR.replace("together {", "").replace('}', "");
    let script = Script::parse(&text).unwrap();
    for r in both(&script, || TwoHalves::new(false, IMPATIENT)) {
        r.unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Raw sockets: replies in any order, matched by cookie.

/// A server that reads `n` requests, then replies to them in reverse order (zeroes for READs),
/// `cookie` replacing the last reply's cookie when set; then serves until EOF, in order.
fn reverse_server(
    mut link: LoopbackLink,
    export: userblk::Export,
    mut n: usize,
    cookie: Option<u64>,
) -> Result<(), userblk::ServerError> {
    let mut socks = link.start(&export)?.conns;
    let mut s = socks.remove(0);
    let mut held = Vec::new();
    let mut header = [0u8; REQUEST_LEN];
    while s.read_exact(&mut header).is_ok() {
        let Ok(req) = Request::parse(&header) else {
            break;
        };
        if req.command == Command::Write {
            let mut payload = vec![0u8; req.len as usize];
            let _ = s.read_exact(&mut payload);
        }
        held.push(req);
        if held.len() < n {
            continue;
        }
        for (i, req) in held.drain(..).rev().enumerate() {
            let c = cookie.filter(|_| i + 1 == n).map_or(req.cookie, Cookie);
            let _ = s.write_all(&Reply::ok(c).encode());
            if req.command == Command::Read {
                let _ = s.write_all(&vec![0u8; req.len as usize]);
            }
        }
        n = 1;
    }
    Ok(())
}

fn on_reverse_server(script: &Script, n: usize, cookie: Option<u64>) -> Result<(), ScriptError> {
    let export = export_of(&MemDevice::new(SIZE)).unwrap();
    let (link, mut ends) = LoopbackLink::new(1).unwrap();
    let server = thread::spawn(move || reverse_server(link, export, n, cookie));
    let r = script.replay_socket(ends.remove(0), SIZE);
    server.join().unwrap().unwrap();
    r
}

#[test]
fn replies_to_a_group_are_matched_by_cookie_in_any_order() {
    let group = Script::new()
        .write(0, 512, Data::fill(1))
        .read(4096, 1024)
        .data(Data::fill(0))
        .read(0, 4096)
        .any_of(vec![Data::seed(3), Data::fill(0)]);
    let script = Script::new()
        .together(group)
        .read(0, 512)
        .data(Data::fill(0));
    on_reverse_server(&script, 3, None).unwrap();

    // A reply for a request never sent is a protocol violation, named as such.
    let err = on_reverse_server(&script, 3, Some(99))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("protocol violation: a reply with cookie 0x0000000000000063 matches no request of the group"),
        "{err}"
    );
    // Replying twice to one request is too (the last reply takes the first one's cookie).
    let err = on_reverse_server(&script, 3, Some(3))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("answers a request of the group already answered"),
        "{err}"
    );
}

#[test]
fn large_groups_do_not_deadlock_the_raw_socket() {
    // Reads and writes of 2 MiB, ten times a socket buffer: the replies' data fills the socket
    // while requests are still being written, so they must be read while writing.
    let len = 2 << 20;
    let group = Script::new()
        .write(0, len, Data::seed(1))
        .read(0, len)
        .any_of(vec![Data::seed(1), Data::fill(0)])
        .write(u64::from(len), len, Data::seed(2))
        .read(u64::from(len), len)
        .any_of(vec![Data::seed(2), Data::fill(0)]);
    let script = Script::new().together(group);
    script
        .replay_raw(MemDevice::new(4 * u64::from(len)))
        .unwrap();
    // MemDevice is served inline: one thread reads requests and writes replies in turn.
    script
        .replay_raw(Threaded(MemDevice::new(4 * u64::from(len))))
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Printing and parsing back.

#[test]
fn scripts_print_and_parse_back_equal_table() {
    let cases = [
        Script::new(),
        Script::new().together(Script::new().read(0, 512)),
        Script::new()
            .together(Script::new().write(0, 512, Data::fill(1)))
            .together(Script::new().write(0, 512, Data::fill(2)))
            .read(0, 512)
            .any_of(vec![Data::fill(1), Data::fill(2)]),
        Script::new().together(
            Script::new()
                .together(Script::new().flush().flush())
                .trim(Pos::FromEnd(-4096), 4096)
                .errno(Errno(77)),
        ),
        Script::new()
            .read(Pos::FromEnd(i64::MIN), u32::MAX)
            .any_of(vec![Data(vec![])
                .then(7, Pattern::Hex(vec![0, 0xff]))
                .then(u64::from(u32::MAX) - 7, Pattern::Any)]),
        Script::new().raw(&[1, 2, 3, 4, 5]).eof().disc(),
    ];
    for s in cases {
        let text = s.to_string();
        let back = Script::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(back, s, "{text}");
    }
}

/// A small deterministic generator, for proptest-like coverage without the dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize].clone()
    }
}

fn any_number(r: &mut Rng) -> u64 {
    match r.below(4) {
        0 => r.below(64) * 512,
        1 => r.below(8) << r.pick(&[10, 20, 30]),
        2 => r.next(),
        _ => r.below(100_000),
    }
}

fn pattern(r: &mut Rng, any: bool) -> Pattern {
    match r.below(if any { 4 } else { 3 }) {
        0 => Pattern::Fill(r.next() as u8),
        1 => Pattern::Seed(any_number(r)),
        2 => Pattern::Hex((0..1 + r.below(6)).map(|_| r.next() as u8).collect()),
        _ => Pattern::Any,
    }
}

/// Data adding up to `len`: fixed segments, then one open-ended or of the bytes left.
fn data(r: &mut Rng, len: u32, any: bool) -> Data {
    let mut segs = Vec::new();
    let mut left = u64::from(len);
    for _ in 0..r.below(4) {
        let n = r.below(left + 1);
        segs.push(Segment {
            len: Some(n),
            pattern: pattern(r, any),
        });
        left -= n;
    }
    if segs.is_empty() || left > 0 || r.below(2) == 0 {
        let len = (r.below(2) == 0).then_some(left);
        segs.push(Segment {
            len,
            pattern: pattern(r, any),
        });
    }
    Data(segs)
}

fn step(r: &mut Rng, s: Script, in_group: bool) -> Script {
    let pos = |r: &mut Rng| match r.below(3) {
        0 => Pos::FromEnd(-(r.below(1 << 20) as i64)),
        1 => Pos::FromEnd(r.next() as i64),
        _ => Pos::Abs(any_number(r)),
    };
    let len = |r: &mut Rng| (any_number(r) % (1 << 20)) as u32;
    let mut s = match r.below(if in_group { 7 } else { 10 }) {
        0 | 1 => {
            let (o, l) = (pos(r), len(r));
            let d = data(r, l, false);
            s.write(o, l, d)
        }
        2 | 3 => {
            let (o, l) = (pos(r), len(r));
            let s = s.read(o, l);
            match r.below(4) {
                0 => s,
                1 => {
                    let d = data(r, l, true);
                    s.data(d)
                }
                _ => {
                    let alts = (0..1 + r.below(3)).map(|_| data(r, l, true)).collect();
                    s.any_of(alts)
                }
            }
        }
        4 => s.flush(),
        5 => {
            let (o, l) = (pos(r), len(r));
            s.trim(o, l)
        }
        6 => {
            let (o, l, h) = (pos(r), len(r), r.below(2) == 0);
            s.zeroes(o, l, h)
        }
        7 => s.disc(),
        8 => s.eof(),
        _ => {
            let bytes: Vec<u8> = (0..1 + r.below(40)).map(|_| r.next() as u8).collect();
            s.raw(&bytes)
        }
    };
    if r.below(4) == 0 {
        s = s.with_flags(CommandFlags(r.next() as u16));
    }
    let errno = Errno(r.pick(&[1, 5, 22, 28, 95, 108, 0, 3, 1000, u32::MAX]));
    match (in_group, r.below(8)) {
        (_, 0) => s.errno(errno),
        (_, 1) => s.ok(),
        (false, 2) => s.closed(),
        (false, 3) => s.expect(Expect::Nothing),
        _ => s,
    }
}

#[test]
fn random_scripts_print_and_parse_back_equal() {
    let mut r = Rng(0x005c_4197);
    for case in 0..2000 {
        let mut s = Script::new();
        for _ in 0..r.below(8) {
            if r.below(3) == 0 {
                let mut g = Script::new();
                for _ in 0..1 + r.below(4) {
                    g = step(&mut r, g, true);
                }
                s = s.together(g);
            } else {
                s = step(&mut r, s, false);
            }
        }
        let text = s.to_string();
        let back = Script::parse(&text).unwrap_or_else(|e| panic!("case {case}: {e}\n{text}"));
        assert_eq!(back, s, "case {case}:\n{text}");
        assert_eq!(back.to_string(), text, "case {case}");
        // Every group is printed as one: as many `together` lines as groups.
        let groups = s.steps.iter().filter_map(|st| st.group).max().unwrap_or(0);
        assert_eq!(text.matches("together {").count(), groups, "case {case}");
    }
}

#[test]
fn parse_never_panics_on_mangled_scripts() {
    // Cut and spliced printed scripts: errors or scripts, never a panic.
    let mut r = Rng(7);
    let base = format!(
        "{RACE}{TEAR}together {{\nraw 25609513\n}}\nread 0 1K => any-of(seed:1 | fill:0 |)\n"
    );
    let chars: Vec<char> = base.chars().collect();
    for _ in 0..3000 {
        let mut text: Vec<char> = chars.clone();
        for _ in 0..1 + r.below(4) {
            let at = r.below(text.len() as u64 + 1) as usize;
            match r.below(3) {
                0 if at < text.len() => {
                    text.remove(at);
                }
                1 => text.insert(
                    at,
                    r.pick(&['{', '}', '|', '(', ')', '*', '\n', 'é', '#', '=']),
                ),
                _ => {
                    let from = r.below(chars.len() as u64) as usize;
                    let n = r.below(12) as usize;
                    for (k, c) in chars[from..(from + n).min(chars.len())].iter().enumerate() {
                        text.insert((at + k).min(text.len()), *c);
                    }
                }
            }
        }
        let text: String = text.into_iter().collect();
        let _ = Script::parse(&text);
    }
}
