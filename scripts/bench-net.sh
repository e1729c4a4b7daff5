#!/usr/bin/env bash
# scripts/bench-net.sh - the network export against nbdkit, on the host, in one run: the same size
# of RAM disk served by `userblk serve ram:SIZE --listen unix:PATH` and by `nbdkit memory SIZE
# --unix PATH`, each measured with the same clients over a Unix socket:
#   nbdcopy write   a SIZE image of random bytes copied in (-C CONNS connections)
#   nbdcopy read    copied out again to a file, then compared with what was written
#   fio             its nbd engine (libnbd; ioengine=nbd, uri=nbd+unix:///?socket=...), one
#                   connection: 4 KiB randread and randwrite at QD 32, 1 MiB sequential read QD 8
# The servers take turns (userblk, nbdkit, userblk, ...) for ROUNDS rounds, each on a fresh disk,
# so that a change in the machine's load hits both; the figure is the median of the rounds.
# Prints a table with the ratio userblk/nbdkit (above 1: userblk is faster).
#
# Usage: scripts/bench-net.sh [--size SIZE] [--conns N] [--runtime SECONDS] [--rounds N]
#   --size     every RAM disk and the image, e.g. 512M (default), 1G
#   --conns    nbdcopy's connections (default 4)
#   --runtime  seconds per fio workload (default 5, after a 1 s ramp)
#   --rounds   rounds (default 3)
# Needs nbdkit, nbdcopy (libnbd-bin) and fio (scripts/setup-interop.sh installs them), and builds
# `userblk` in release mode. No root. Exit status 1 if a server or a client failed, or the data
# read back differs from what was written.
set -euo pipefail
exec </dev/null

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
size=512M
conns=4
runtime=5
rounds=3
while (($#)); do
    case $1 in
        --size) size=${2:?}; shift 2 ;;
        --conns) conns=${2:?}; shift 2 ;;
        --runtime) runtime=${2:?}; shift 2 ;;
        --rounds) rounds=${2:?}; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-net.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

for tool in nbdkit nbdcopy fio python3; do
    command -v "$tool" >/dev/null || { echo "bench-net.sh: $tool is missing (scripts/setup-interop.sh)" >&2; exit 2; }
done
if ! fio --enghelp 2>/dev/null | grep -qw nbd; then
    echo "bench-net.sh: this fio has no nbd engine" >&2
    exit 2
fi

echo "== building userblk (release)"
(cd "$ROOT" && cargo build --release --quiet -p userblk-harness --bin userblk)
USERBLK=${CARGO_TARGET_DIR:-$ROOT/target}/release/userblk

# Files live in tmpfs when there is one, so that the copies measure the servers, not a disk.
base=/dev/shm
[[ -d $base && -w $base ]] || base=${TMPDIR:-/tmp}
dir=$(mktemp -d "$base/userblk-bench-net.XXXXXX")
server_pid=
cleanup() {
    if [[ -n $server_pid ]]; then
        kill -TERM "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$dir"
}
trap cleanup EXIT

bytes=$(numfmt --from=iec "${size%B}")
echo "== image: $size of random bytes in $dir"
head -c "$bytes" /dev/urandom >"$dir/image"

# start NAME: serves a fresh RAM disk of SIZE on $dir/NAME.sock.
start() {
    local name=$1 sock=$dir/$1.sock i
    rm -f "$sock"
    case $name in
        userblk) "$USERBLK" serve "ram:$size" --listen "unix:$sock" >"$dir/$name.log" 2>&1 & ;;
        nbdkit) nbdkit --foreground --unix "$sock" memory "$size" >"$dir/$name.log" 2>&1 & ;;
    esac
    server_pid=$!
    for i in $(seq 100); do
        [[ -S $sock ]] && nbdinfo --size "nbd+unix:///?socket=$sock" >/dev/null 2>&1 && return 0
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.1
    done
    cat "$dir/$name.log" >&2
    echo "bench-net.sh: $name did not come up" >&2
    exit 1
}

stop() {
    kill -TERM "$server_pid"
    wait "$server_pid" || { cat "$dir/$1.log" >&2; echo "bench-net.sh: $1 did not stop cleanly" >&2; exit 1; }
    server_pid=
}

# seconds COMMAND...: runs it and prints its wall-clock seconds.
seconds() {
    local t0 t1
    t0=$(date +%s.%N)
    "$@"
    t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc -l
}

# fio_run NAME JOB RW BS DEPTH: prints IOPS (4 KiB) or MB/s (1 MiB) of one fio job.
fio_run() {
    local name=$1 job=$2 rw=$3 bs=$4 depth=$5
    fio --name="$job" --ioengine=nbd --uri="nbd+unix:///?socket=$dir/$name.sock" \
        --rw="$rw" --bs="$bs" --iodepth="$depth" --size="$bytes" \
        --time_based --runtime="$runtime" --ramp_time=1 \
        --output-format=json --output="$dir/fio.json" >/dev/null
    python3 - "$dir/fio.json" "$bs" <<'EOF'
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
if job["error"]:
    sys.exit(f"fio error {job['error']}")
side = job["read"] if job["read"]["io_bytes"] else job["write"]
print(f"{side['iops']:.0f}" if sys.argv[2] == "4k" else f"{side['bw_bytes'] / 1e6:.1f}")
EOF
}

declare -A results
workloads=(copy_write copy_read randread randwrite seqread)
uri() { echo "nbd+unix:///?socket=$dir/$1.sock"; }

for round in $(seq "$rounds"); do
    for name in userblk nbdkit; do
        echo "== round $round: $name"
        start "$name"
        s=$(seconds nbdcopy -C "$conns" "$dir/image" "$(uri "$name")")
        results[$name,copy_write]+=" $(echo "$bytes / $s / 1000000" | bc -l)"
        rm -f "$dir/out"
        s=$(seconds nbdcopy -C "$conns" "$(uri "$name")" "$dir/out")
        results[$name,copy_read]+=" $(echo "$bytes / $s / 1000000" | bc -l)"
        cmp "$dir/image" "$dir/out" || { echo "bench-net.sh: $name returned other bytes than were written" >&2; exit 1; }
        rm -f "$dir/out"
        results[$name,randread]+=" $(fio_run "$name" randread randread 4k 32)"
        results[$name,randwrite]+=" $(fio_run "$name" randwrite randwrite 4k 32)"
        results[$name,seqread]+=" $(fio_run "$name" seqread read 1m 8)"
        stop "$name"
    done
done

median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
label() {
    case $1 in
        copy_write) echo "nbdcopy write, -C $conns (MB/s)" ;;
        copy_read) echo "nbdcopy read, -C $conns (MB/s)" ;;
        randread) echo "fio 4 KiB randread QD 32 (IOPS)" ;;
        randwrite) echo "fio 4 KiB randwrite QD 32 (IOPS)" ;;
        seqread) echo "fio 1 MiB read QD 8 (MB/s)" ;;
    esac
}

echo
echo "== $size RAM disk over a Unix socket, median of $rounds rounds ($(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg))"
printf '| %-34s | %10s | %10s | %15s |\n' workload userblk nbdkit userblk/nbdkit
printf '| %-34s | %10s | %10s | %15s |\n' --- ---: ---: ---:
for w in "${workloads[@]}"; do
    u=$(median <<<"${results[userblk,$w]}")
    k=$(median <<<"${results[nbdkit,$w]}")
    printf '| %-34s | %10.0f | %10.0f | %14.2fx |\n' "$(label "$w")" "$u" "$k" "$(echo "$u / $k" | bc -l)"
done
echo "each round:"
for w in "${workloads[@]}"; do
    printf '  %-10s userblk%s  nbdkit%s\n' "$w" \
        "$(printf ' %.0f' ${results[userblk,$w]})" "$(printf ' %.0f' ${results[nbdkit,$w]})"
done
