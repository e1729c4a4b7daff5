#!/usr/bin/env bash
# harness/traces/record.sh - record the shipped traces from real kernels.
#
# Usage: harness/traces/record.sh [SERIES...]       (default: 6.1 6.12)
#
# For each kernel series, boots the Debian kernel under QEMU (`userblk vm`), serves a RAM disk
# on /dev/nbd0 through `userblk record`, runs the workloads below against it, and writes
#   harness/traces/ext4-<series>.ubt   mkfs.ext4, mount, file writes, sync, fstrim, umount
#   harness/traces/fio-<series>.ubt    an fio verify run (random 4 KiB writes, queue depth 16,
#                                      then a read-back of everything)
# Needs `userblk vm setup` to have run (QEMU, virtme-ng, both kernels), and fio and e2fsprogs on the
# host (the guest uses the host's binaries). Takes a few minutes per kernel under TCG.
#
# Environment: CARGO_TARGET_DIR (default target/), KEEP=1 keeps the scratch directory.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
root=$(cd "$here/../.." && pwd -P)

if [[ "${1:-}" == --in-guest ]]; then
    # In the guest: $2 series, $3 output dir, $4 the userblk binary.
    series=$2 out=$3 userblk=$4
    kver=$(uname -r)
    modprobe nbd nbds_max=2
    ready=/tmp/ready
    start() { # NAME SIZE DESCRIPTION
        rm -f "$ready"
        "$userblk" record "ram:$2" -o "$out/$1-$series.ubt" --nbd /dev/nbd0 \
            --ready-file "$ready" --description "$3 (Linux $kver, $(date -u +%Y-%m-%d))" &
        rec=$!
        for _ in $(seq 300); do [[ -s "$ready" ]] && break; sleep 0.1; done
        [[ -s "$ready" ]] || { echo "userblk record did not start" >&2; exit 1; }
        udevadm settle 2>/dev/null || sleep 1
    }
    stop() {
        kill -INT "$rec"
        wait "$rec"
    }

    start ext4 64M "mkfs.ext4 (no lazy init), mount, file writes, sync, fstrim, umount on a 64 MiB RAM disk"
    mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 /dev/nbd0
    mkdir -p /tmp/mnt
    mount /dev/nbd0 /tmp/mnt
    seq 1 150000 >/tmp/mnt/numbers.txt
    mkdir /tmp/mnt/dir
    for i in $(seq 1 200); do echo "file $i" >"/tmp/mnt/dir/f$i"; done
    cp /usr/bin/fio /tmp/mnt/ 2>/dev/null || cp /bin/ls /tmp/mnt/
    sync
    rm -f /tmp/mnt/dir/f1*
    dd if=/dev/zero of=/tmp/mnt/zeroes bs=64k count=64 conv=fsync status=none
    sha256sum /tmp/mnt/numbers.txt >/tmp/mnt/sum
    sync
    fstrim -v /tmp/mnt
    umount /tmp/mnt
    stop

    start fio 32M "fio verify: 16 MiB randwrite 4 KiB, libaio iodepth 16, crc32c over a pattern, then read back"
    cd /tmp
    fio --name=verify --filename=/dev/nbd0 --direct=1 --ioengine=libaio --iodepth=16 \
        --rw=randwrite --bs=4k --size=16M --verify=crc32c --verify_pattern=0x5a5aa5a5 \
        --do_verify=1 --verify_fatal=1 --output=/dev/null
    stop
    exit 0
fi

(( $# )) || set -- 6.1 6.12

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
(cd "$root" && cargo build --release -p userblk-harness --bin userblk)
userblk=$CARGO_TARGET_DIR/release/userblk

scratch=$(mktemp -d "${TMPDIR:-/tmp}/userblk-record.XXXXXX")
[[ "${KEEP:-0}" == 1 ]] || trap 'rm -rf "$scratch"' EXIT
for series in "$@"; do
    echo "== $series"
    (cd "$scratch" && "$userblk" vm --kernel "$series" --keep-log "$scratch/boot" -- \
        /bin/bash "$here/record.sh" --in-guest "$series" "$scratch" "$userblk") ||
        { echo "recording on $series failed; console log in $scratch/boot (KEEP=1 keeps it)" >&2; exit 1; }
    for f in "$scratch"/*-"$series".ubt; do
        cp "$f" "$here/"
        echo "$(basename "$f"): $(stat -c %s "$f") bytes"
    done
done
"$userblk" replay --info "$here"/*.ubt
