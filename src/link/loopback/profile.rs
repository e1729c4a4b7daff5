//! [`KernelProfile`]: what a named real kernel does on the wire, so that the fake kernel can play
//! it. Every value is taken from that kernel's source; the comment on each says where.
//!
//! Sources read (mainline): `drivers/block/nbd.c` (`nbd_dev_add`, `nbd_set_size`,
//! `nbd_send_cmd`, `nbd_handle_reply`, `nbd_xmit_timeout`) and `block/blk-settings.c`
//! (`blk_validate_limits`, `blk_queue_max_hw_sectors`) of v6.1 and v6.12, with the commits that
//! changed them in between: "nbd: use the atomic queue limits API" (max_user_sectors 256
//! becomes io_opt 128 KiB, 6.9/6.10), Eric Blake's "block nbd: use req.cookie instead of
//! req.handle" (cookie in network byte order, 6.4), Wouter Verhelst's "nbd: implement the
//! WRITE_ZEROES command" (6.12). The ublk profile: `drivers/block/ublk_drv.c` of v6.12
//! (`ublk_ctrl_start_dev`, which turns the server's SET_PARAMS into the queue limits) and what
//! userblk's ublk transport asks for there (`link::ublk`).

use std::fmt;

/// The kernel driver a profile plays. The fake kernel always speaks NBD to the server; a ublk
/// profile gives it the request shapes `ublk_drv` sends (sizes, queue depth, commands).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Transport {
    /// `drivers/block/nbd.c`: requests and replies on a socket per connection.
    Nbd,
    /// `drivers/block/ublk_drv.c`: io_uring commands per queue on `/dev/ublkcN`.
    Ublk,
}

/// How the kernel lays the 8 cookie bytes of a request on the wire.
///
/// The cookie's value is always `cmd_cookie << 32 | hwq << 16 | tag` (`nbd_cmd_handle`, with
/// `blk_mq_unique_tag`): `tag` is the request's tag in its hardware queue, `hwq` that queue
/// (one per connection), `cmd_cookie` a per-tag counter bumped each time the request is sent,
/// so that a reply to an earlier sending of the same tag is recognised as stale.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CookieOrder {
    /// Before 6.4, `nbd_send_cmd` did `memcpy(request.handle, &handle, 8)`: the host's byte
    /// order, little-endian on x86-64 and arm64 (what this profile plays).
    LittleEndian,
    /// From 6.4, `request.cookie = cpu_to_be64(handle)`: network byte order.
    BigEndian,
}

impl CookieOrder {
    /// The wire cookie (as [`Cookie`](crate::proto::Cookie) holds it: the 8 bytes read as a
    /// big-endian number) for a handle value.
    pub fn to_wire(self, handle: u64) -> u64 {
        match self {
            CookieOrder::BigEndian => handle,
            CookieOrder::LittleEndian => handle.swap_bytes(),
        }
    }

    /// The handle value of a wire cookie; the inverse of [`to_wire`](Self::to_wire).
    pub fn from_wire(self, cookie: u64) -> u64 {
        self.to_wire(cookie)
    }
}

/// The parameters by which the kernels the fake kernel plays differ, on the wire and in what
/// they send. Pick one with [`KernelProfile::by_name`] or a constructor, and change fields of a
/// copy to explore (`let mut p = KernelProfile::linux_6_12(); p.max_request = 4096;`).
///
/// What the profiles share is not here but in the fake kernel itself, with its source: FUA
/// only with both `SEND_FLUSH` and `SEND_FUA`, else WRITE then FLUSH (`nbd_parse_flags` in
/// 6.1, `__nbd_set_size` in 6.12: write cache and FUA features, emulated by `blk-flush.c`);
/// FLUSH only with `SEND_FLUSH`; TRIM only with `SEND_TRIM`; and what a timeout does (see
/// [`LoopbackOptions::timeout`](super::LoopbackOptions::timeout)), which is the same in both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct KernelProfile {
    /// `linux-6.1`, `linux-6.12`.
    pub name: &'static str,
    /// The driver.
    pub transport: Transport,
    /// Largest READ or WRITE the block layer sends (`max_sectors`), in bytes; larger ones are
    /// split. Not always a power of two.
    pub max_request: u32,
    /// Largest READ or WRITE the driver accepts (`max_hw_sectors`), in bytes: the ceiling for
    /// `max_sectors_kb` and for requests sent raw.
    pub max_hw_request: u32,
    /// Tags per hardware queue (`tag_set.queue_depth`): requests in flight per connection.
    pub queue_depth: u16,
    /// Largest TRIM, in bytes, before rounding down to the logical block size.
    pub max_discard: u32,
    /// Whether WRITE_ZEROES is sent when the export advertises it; without it the block layer
    /// writes zero-filled buffers (`__blkdev_issue_zero_pages`), split like any WRITE.
    pub write_zeroes: bool,
    /// Largest WRITE_ZEROES, in bytes, before rounding down to the logical block size.
    pub max_write_zeroes: u32,
    /// How the cookie's bytes go on the wire.
    pub cookie_order: CookieOrder,
}

impl KernelProfile {
    /// Linux 6.1 (Debian bookworm's kernel).
    ///
    /// - `max_request` 128 KiB: `nbd_dev_add` sets `disk->queue->limits.max_sectors = 256`
    ///   after `blk_queue_max_hw_sectors(disk->queue, 65536)` (6.1 `drivers/block/nbd.c`).
    /// - `max_hw_request` 32 MiB: the same `blk_queue_max_hw_sectors(.., 65536)`.
    /// - `queue_depth` 128: `nbd->tag_set.queue_depth = 128` in `nbd_dev_add`.
    /// - `max_discard`: `nbd_set_size` sets `blk_queue_max_discard_sectors(q, UINT_MAX)`; the
    ///   block layer caps a discard bio at `bio_allowed_max_sectors`, `UINT_MAX` bytes rounded
    ///   down to the logical block size (6.1 `block/blk.h`, `block/blk-merge.c`).
    /// - No WRITE_ZEROES: `req_to_nbd_cmd_type` knows DISCARD, FLUSH, WRITE and READ only, and
    ///   `max_write_zeroes_sectors` stays 0, so `blkdev_issue_zeroout` writes zero pages.
    /// - Cookie in host order: `memcpy(request.handle, &handle, sizeof(handle))` in
    ///   `nbd_send_cmd`.
    pub const fn linux_6_1() -> KernelProfile {
        KernelProfile {
            name: "linux-6.1",
            transport: Transport::Nbd,
            max_request: 256 << 9,
            max_hw_request: 65536 << 9,
            queue_depth: 128,
            max_discard: u32::MAX,
            write_zeroes: false,
            max_write_zeroes: 0,
            cookie_order: CookieOrder::LittleEndian,
        }
    }

    /// Linux 6.12 (Debian bookworm-security's 6.12).
    ///
    /// - `max_request` 1,280 KiB: `nbd_dev_add` passes `queue_limits` with
    ///   `.max_hw_sectors = 65536, .io_opt = 256 << SECTOR_SHIFT` and no `max_user_sectors`;
    ///   `blk_validate_limits` (6.12 `block/blk-settings.c`) then sets `max_sectors =
    ///   min(max_hw_sectors, BLK_DEF_MAX_SECTORS_CAP)`, 2560 sectors, since `io_opt` is below
    ///   that cap. (The shipped `harness/traces/ext4-6.12.ubt` holds 1,310,720-byte writes.)
    /// - `max_hw_request` 32 MiB and `queue_depth` 128: as 6.1.
    /// - `max_discard` and `max_write_zeroes`: `__nbd_set_size` sets
    ///   `lim.max_hw_discard_sectors` and, with `NBD_FLAG_SEND_WRITE_ZEROES`,
    ///   `lim.max_write_zeroes_sectors` to `UINT_MAX >> SECTOR_SHIFT`.
    /// - WRITE_ZEROES sent when advertised: `req_to_nbd_cmd_type` maps `REQ_OP_WRITE_ZEROES`,
    ///   and `nbd_send_cmd` adds `NBD_CMD_FLAG_NO_HOLE` for `REQ_NOUNMAP`.
    /// - Cookie big-endian: `request.cookie = cpu_to_be64(handle)` (since 6.4).
    pub const fn linux_6_12() -> KernelProfile {
        KernelProfile {
            name: "linux-6.12",
            transport: Transport::Nbd,
            max_request: 2560 << 9,
            max_hw_request: 65536 << 9,
            queue_depth: 128,
            max_discard: (u32::MAX >> 9) << 9,
            write_zeroes: true,
            max_write_zeroes: (u32::MAX >> 9) << 9,
            cookie_order: CookieOrder::BigEndian,
        }
    }

    /// Linux 6.12's `ublk_drv` serving a device that userblk's ublk transport set up with its
    /// defaults (`link::ublk`: 64 tags a queue, 512 KiB requests, 1 GiB TRIM and WRITE_ZEROES).
    /// Unlike NBD, the server chooses the limits in SET_PARAMS, and `ublk_ctrl_start_dev`
    /// (6.12) copies them into the queue limits:
    ///
    /// - `max_request` 512 KiB: `.max_hw_sectors = p->max_sectors` (1024), and
    ///   `blk_validate_limits` keeps `max_sectors` at that, below `BLK_DEF_MAX_SECTORS_CAP`.
    /// - `queue_depth` 64: `ub->dev_info.queue_depth`, what ADD_DEV asked for.
    /// - `max_discard`, `max_write_zeroes` 1 GiB: `lim.max_hw_discard_sectors =
    ///   pd->max_discard_sectors` and `lim.max_write_zeroes_sectors =
    ///   pd->max_write_zeroes_sectors` from the discard parameters; WRITE_ZEROES is sent as
    ///   `UBLK_IO_OP_WRITE_ZEROES` (with `UBLK_IO_F_NOUNMAP` for `REQ_NOUNMAP`).
    /// - FLUSH and FUA as NBD's 6.12 rule: a volatile cache only with `UBLK_ATTR_VOLATILE_CACHE`
    ///   (set where the device serves FLUSH), FUA only with `UBLK_ATTR_FUA` on top of it.
    /// - No cookie on the wire; the fake kernel's cookie is the 6.12 NBD one.
    pub const fn ublk_6_12() -> KernelProfile {
        KernelProfile {
            name: "ublk-6.12",
            transport: Transport::Ublk,
            max_request: 1024 << 9,
            max_hw_request: 1024 << 9,
            queue_depth: 64,
            max_discard: 1 << 30,
            write_zeroes: true,
            max_write_zeroes: 1 << 30,
            cookie_order: CookieOrder::BigEndian,
        }
    }

    /// The newest profile: what [`LoopbackOptions::default`](super::LoopbackOptions) plays.
    pub const fn newest() -> KernelProfile {
        KernelProfile::linux_6_12()
    }

    /// Every named profile: the NBD ones oldest first, then ublk.
    pub fn all() -> &'static [KernelProfile] {
        const ALL: [KernelProfile; 3] = [
            KernelProfile::linux_6_1(),
            KernelProfile::linux_6_12(),
            KernelProfile::ublk_6_12(),
        ];
        &ALL
    }

    /// The profile called `name` (`linux-6.1`, `linux-6.12`, `ublk-6.12`; `6.1` and `6.12` too,
    /// for the NBD ones).
    pub fn by_name(name: &str) -> Option<KernelProfile> {
        let name = name.trim();
        KernelProfile::all()
            .iter()
            .find(|p| p.name == name || p.name.strip_prefix("linux-") == Some(name))
            .copied()
    }

    /// The names of every profile, for error messages (`linux-6.1, linux-6.12, ublk-6.12`).
    pub fn names() -> String {
        KernelProfile::all()
            .iter()
            .map(|p| p.name)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Largest TRIM for a logical block size `bs`, in bytes: a multiple of `bs`.
    pub fn max_discard_for(&self, bs: u32) -> u64 {
        round_down(self.max_discard, bs)
    }

    /// Largest WRITE_ZEROES for a logical block size `bs`, in bytes: a multiple of `bs`.
    pub fn max_write_zeroes_for(&self, bs: u32) -> u64 {
        round_down(self.max_write_zeroes, bs)
    }

    /// Largest READ or WRITE for a logical block size `bs`: `max_request` rounded down to
    /// `bs` (as `blk_validate_limits` rounds `max_sectors`), at least one block.
    pub fn max_request_for(&self, bs: u32) -> u64 {
        round_down(self.max_request.min(self.max_hw_request), bs).max(u64::from(bs.max(1)))
    }
}

fn round_down(v: u32, bs: u32) -> u64 {
    let bs = u64::from(bs.max(1));
    u64::from(v) / bs * bs
}

impl Default for KernelProfile {
    fn default() -> KernelProfile {
        KernelProfile::newest()
    }
}

impl fmt::Display for KernelProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_find_profiles() {
        assert_eq!(
            KernelProfile::by_name("linux-6.1"),
            Some(KernelProfile::linux_6_1())
        );
        assert_eq!(
            KernelProfile::by_name("6.12"),
            Some(KernelProfile::linux_6_12())
        );
        assert_eq!(KernelProfile::by_name("linux-5.15"), None);
        assert_eq!(KernelProfile::default(), KernelProfile::linux_6_12());
        assert_eq!(
            KernelProfile::by_name("ublk-6.12"),
            Some(KernelProfile::ublk_6_12())
        );
        assert_eq!(KernelProfile::names(), "linux-6.1, linux-6.12, ublk-6.12");
    }

    #[test]
    fn limits_round_to_the_block_size() {
        let p = KernelProfile::linux_6_12();
        assert_eq!(p.max_request_for(512), 1_310_720);
        assert_eq!(p.max_request_for(4096), 1_310_720);
        assert_eq!(p.max_discard_for(512), 0xffff_fe00);
        assert_eq!(p.max_discard_for(4096), 0xffff_f000);
        let ublk = KernelProfile::ublk_6_12();
        assert_eq!(ublk.max_request_for(4096), 512 << 10);
        assert_eq!(ublk.max_write_zeroes_for(4096), 1 << 30);
        let old = KernelProfile::linux_6_1();
        assert_eq!(old.max_request_for(512), 128 << 10);
        assert_eq!(old.max_discard_for(512), 0xffff_fe00);
    }

    #[test]
    fn the_ublk_profile_is_what_userblk_asks_ublk_for() {
        use crate::link::ublk;
        let p = KernelProfile::ublk_6_12();
        assert_eq!(p.transport, Transport::Ublk);
        assert_eq!(p.max_request, ublk::DEFAULT_MAX_IO_BYTES);
        assert_eq!(p.queue_depth, ublk::DEFAULT_QUEUE_DEPTH);
        let sectors = u64::from(ublk::frame::MAX_DISCARD_SECTORS) * 512;
        assert_eq!(u64::from(p.max_discard), sectors);
        assert_eq!(u64::from(p.max_write_zeroes), sectors);
    }

    #[test]
    fn cookie_orders_round_trip() {
        let handle = 1u64 << 32 | 1 << 16 | 7;
        for order in [CookieOrder::LittleEndian, CookieOrder::BigEndian] {
            assert_eq!(order.from_wire(order.to_wire(handle)), handle);
        }
        // 6.1 on x86-64: the bytes on the wire are the handle's little-endian bytes.
        let wire = CookieOrder::LittleEndian.to_wire(handle).to_be_bytes();
        assert_eq!(wire, handle.to_le_bytes());
    }
}
