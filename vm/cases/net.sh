# vm/cases/net.sh - the network export in the guest (sourced by vm/guest.sh): `userblk serve
# --listen` on the guest's loopback over TCP, the kernel's own NBD client attached to it with
# `nbd-client` (Debian's nbd-client, 3.2x: `nbd-client HOST PORT DEV -N NAME`, fixed newstyle,
# NBD_OPT_GO, netlink set-up), and ext4 on top: files written with checksums, read back after a
# remount with the page cache dropped, fsck clean, `nbd-client -d`, then the server stopped by a
# signal with every client counted. The devices used here are /dev/nbd1 and /dev/nbd2, so a
# failure cannot leave guest.sh's /dev/nbd0 busy.
# shellcheck shell=bash disable=SC2317

NET_NBD=/dev/nbd1
NET_NBD2=/dev/nbd2
NET_EXPORT=disk
NET_PORT=

# net_serve SPEC [ARGS...]: starts `userblk serve SPEC ARGS... --listen 127.0.0.1:0` (the port the
# system picks, read from the server's "serving ... on 127.0.0.1:PORT" line) into SERVE_PID, so
# that guest.sh's stop_serve and cleanup handle it.
net_serve() {
    ip link set lo up 2>/dev/null || true
    "$USERBLK_BIN" serve "$@" --listen 127.0.0.1:0 --export "$NET_EXPORT" >"$WORK/serve.out" 2>&1 &
    SERVE_PID=$!
    local i
    for i in $(seq 200); do
        NET_PORT=$(sed -n 's/.* on 127\.0\.0\.1:\([0-9][0-9]*\) .*/\1/p' "$WORK/serve.out" | head -n 1)
        [[ -n $NET_PORT ]] && { echo "serving on 127.0.0.1:$NET_PORT"; return 0; }
        kill -0 "$SERVE_PID" 2>/dev/null || { cat "$WORK/serve.out"; echo "server exited before listening"; return 1; }
        sleep 0.1
    done
    cat "$WORK/serve.out"
    echo "server did not listen within 20 s"
    return 1
}

# net_attach DEV: the kernel's NBD client on DEV, connected to the server over TCP.
net_attach() {
    local dev=$1
    [[ $(nbd_size "$dev") == 0 ]] || { echo "$dev is already connected"; return 1; }
    nbd-client 127.0.0.1 "$NET_PORT" "$dev" -N "$NET_EXPORT" -b 4096
    local i
    for i in $(seq 100); do
        [[ $(nbd_size "$dev") != 0 ]] && { udevadm settle 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    echo "$dev has no size after nbd-client"
    return 1
}

# net_detach DEV: `nbd-client -d`, then the device has no size.
net_detach() {
    local dev=$1 i
    nbd-client -d "$dev"
    for i in $(seq 100); do
        [[ $(nbd_size "$dev") == 0 ]] && return 0
        sleep 0.1
    done
    echo "$dev still has a size after nbd-client -d"
    return 1
}

# Run as a test's EXIT trap before guest.sh's cleanup: frees the devices this file uses.
net_cleanup() {
    set +e
    umount -l "$MNT" >/dev/null 2>&1
    local d
    for d in "$NET_NBD" "$NET_NBD2"; do
        [[ $(nbd_size "$d") != 0 ]] && nbd-client -d "$d" >/dev/null 2>&1
    done
    cleanup
}

# net_fs_roundtrip DEV: ext4 on DEV, files of several sizes written with their SHA-256 sums,
# then read back after a remount with the page cache dropped; fsck -n clean.
net_fs_roundtrip() {
    local dev=$1 i
    mkfs.ext4 -q -F "$dev"
    mount "$dev" "$MNT"
    mkdir "$MNT/data"
    for i in 1 2 3 4 5 6 7 8; do
        # 4 KiB to 16 MiB, and one odd size that ends inside a block.
        dd if=/dev/urandom of="$MNT/data/f$i" bs=4k count=$((1 << (i + 1))) status=none
    done
    head -c 1234567 /dev/urandom >"$MNT/data/odd"
    (cd "$MNT/data" && sha256sum -- *) >"$WORK/net.sums"
    sync
    umount "$MNT"
    echo 3 >/proc/sys/vm/drop_caches
    mount "$dev" "$MNT"
    (cd "$MNT/data" && sha256sum -c --quiet "$WORK/net.sums")
    umount "$MNT"
    fsck.ext4 -fn "$dev"
}

# The server ended on its signal, cleanly, having served COUNT clients.
net_stop_expect() {
    local sig=$1 count=$2
    stop_serve "$sig"
    grep -q "stopped on SIG$sig: $count clients served, 0 handshakes failed; device flushed" "$WORK/serve.out" ||
        { echo "the server's last words are not a clean stop after $count clients"; return 1; }
}

t_net_nbd_client_ext4() {
    trap net_cleanup EXIT
    net_serve ram:256M
    net_attach "$NET_NBD"
    net_fs_roundtrip "$NET_NBD"
    net_detach "$NET_NBD"
    net_stop_expect INT 1
}

# A file behind the export: after the clean stop, the file itself holds the file system.
t_net_nbd_client_file() {
    trap net_cleanup EXIT
    rm -f "$WORK/net.img"
    truncate -s 128M "$WORK/net.img"
    net_serve "file:$WORK/net.img"
    net_attach "$NET_NBD"
    net_fs_roundtrip "$NET_NBD"
    net_detach "$NET_NBD"
    net_stop_expect TERM 1
    fsck.ext4 -fn "$WORK/net.img"
    debugfs -R "dump /data/f5 $WORK/net.f5" "$WORK/net.img"
    (cd "$WORK" && grep ' f5$' net.sums | sed 's/ f5$/ net.f5/' | sha256sum -c)
}

# Two kernel clients of one server at once: what one writes (O_DIRECT) the other reads.
t_net_two_clients() {
    trap net_cleanup EXIT
    net_serve ram:64M
    net_attach "$NET_NBD"
    net_attach "$NET_NBD2"
    dd if=/dev/urandom of="$WORK/net.blk" bs=1M count=4 status=none
    dd if="$WORK/net.blk" of="$NET_NBD" bs=1M seek=8 oflag=direct status=none
    dd if="$NET_NBD2" of="$WORK/net.back" bs=1M skip=8 count=4 iflag=direct status=none
    cmp "$WORK/net.blk" "$WORK/net.back"
    net_detach "$NET_NBD"
    net_detach "$NET_NBD2"
    net_stop_expect INT 2
}

WORKLOADS+=(net_nbd_client_ext4 net_nbd_client_file net_two_clients)
