#!/usr/bin/env bash
# vm/bench-guest.sh - runs inside the VM (vm/bench.sh boots it): for each benchmark target, sets
# up a RAM-backed block device, prefills it, runs the fio workloads on it, tears it down.
#
# Environment (all set by vm/bench.sh):
#   USERBLK_BIN        the `userblk` binary (userblk serve)
#   USERBLK_EXAMPLES   the release examples directory (sequential_server)
#   RESULTS            output directory (shared with the host)
#   RUNTIME RAMP       fio seconds measured per workload, and seconds of ramp before
#   SIZE_BYTES         size of every RAM disk
#   TARGETS            targets to run, space-separated (default: all of the list below but the
#                      profiling ones, in order)
#   WORKLOADS          workloads of the RAM-backed targets (default: randread-4k randwrite-4k
#                      seqread-1m seqwrite-1m randread-4k-qd1 randwrite-4k-qd1; randread-4k and
#                      randwrite-4k are at QD 32, the 1 MiB ones at QD 8, NAME-qdN at QD N)
#   REMOTE_LATENCY_MS  the remote disk's injected latency (default 1)
#
# Targets: userblk-1c, userblk-2c (userblk serve ram:SIZE over NBD, 1 or 2 connections), nbdkit
# (memory plugin, nbd-client over a Unix socket), sequential (examples/sequential_server), ublk-1q,
# ublk-2q (userblk serve ram:SIZE --transport ublk --queues 1|2, /dev/ublkbN; SKIP where the
# kernel has no ublk_drv), brd (the kernel's RAM disk), null_blk (memory-backed, multi-queue: the
# kernel's other ceiling), remote-sync, remote-async (examples/remote_disk on /dev/nbd5 at
# REMOTE_LATENCY_MS per request, behind the sync trait (--blocking) or as an async device; 4 KiB
# randread at QD 1, 32 and 128, no prefill: its storage answers after the latency whatever it
# holds); remote-ublk-sync, remote-ublk-async (the same example through ublk, /dev/ublkbN: 16
# worker threads a queue behind the sync trait, or tasks), remote-ublk-serial (the sync trait with
# one worker: a queue's requests one at a time, as before the queues served them together).
# Extra ones, for profiling: nbdkit-2c (two connections), ramdisk-wW-cC
# (examples/bench_ramdisk with W server workers and C connections), ublk-1q-plain and
# ublk-1q-coop (ublk-1q with the queue ring set up without DEFER_TASKRUN/SINGLE_ISSUER, or with
# COOP_TASKRUN alone: USERBLK_UBLK_RING).
#
# Writes to $RESULTS:
#   targets                  one line per target: "NAME ok", "NAME FAIL reason" or "NAME SKIP reason"
#   NAME/WORKLOAD.json       fio's JSON output
#   NAME/WORKLOAD.cpu        key=value: wall seconds, guest CPU ticks (busy, idle), server ticks
#   NAME/WORKLOAD.threads    the server's threads: "comm ticks" over the workload
#   NAME/hwm                 VmHWM/VmRSS of the serving process after the runs (kB)
#   logs/NAME.log            everything the target's setup, fio and teardown printed
# Functions are called indirectly.
# shellcheck disable=SC2317
set -euo pipefail

: "${USERBLK_BIN:?}" "${USERBLK_EXAMPLES:?}" "${RESULTS:?}" "${RUNTIME:?}" "${RAMP:?}" "${SIZE_BYTES:?}"
TARGETS=${TARGETS:-userblk-1c userblk-2c nbdkit sequential ublk-1q ublk-2q brd null_blk remote-sync remote-async}
WORKLOADS=${WORKLOADS:-randread-4k randwrite-4k seqread-1m seqwrite-1m randread-4k-qd1 randwrite-4k-qd1}
REMOTE_WORKLOADS="randread-4k-qd1 randread-4k randread-4k-qd128"
REMOTE_LATENCY_MS=${REMOTE_LATENCY_MS:-1}
WORK=/tmp/userblk-bench
mkdir -p "$WORK" "$RESULTS/logs"
: >"$RESULTS/targets"
SIZE_MIB=$((SIZE_BYTES >> 20))
SIZE_KIB=$((SIZE_BYTES >> 10))

# State of the target being run: its device, the process serving it (for CPU and memory), the
# bytes fio works on, and every background process started, which the EXIT trap kills.
DEV=
SERVER_PID=
FIO_SIZE=$SIZE_BYTES
BG_PIDS=()

say() { printf 'bench-guest: %s %s\n' "$(date +%T)" "$*" >&2; }

cleanup() {
    local pid
    for pid in "${BG_PIDS[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    for pid in "${BG_PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    BG_PIDS=()
}
trap cleanup EXIT

nbd_size() { cat "/sys/block/${1#/dev/}/size" 2>/dev/null || echo 0; }

# wait_connected DEV PID LOG: until DEV has a size; fails if PID exits first or after 30 s.
wait_connected() {
    local dev=$1 pid=$2 log=$3 i
    for ((i = 0; i < 300; i++)); do
        if [[ $(nbd_size "$dev") != 0 ]]; then
            udevadm settle 2>/dev/null || true
            return 0
        fi
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            cat "$log" 2>/dev/null || true
            echo "the server exited before $dev connected"
            return 1
        fi
        sleep 0.1
    done
    cat "$log" 2>/dev/null || true
    echo "$dev did not connect within 30 s"
    return 1
}

# stop_pid PID [SIGNAL]: signals PID, waits up to 20 s for it to exit, then kills it.
stop_pid() {
    local pid=$1 sig=${2:-TERM} i rc=0
    kill "-$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < 200; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "pid $pid still running 20 s after SIG$sig: killing it"
        kill -KILL "$pid" 2>/dev/null || true
        rc=1
    fi
    wait "$pid" 2>/dev/null || true
    local keep=() p
    for p in "${BG_PIDS[@]}"; do
        [[ $p == "$pid" ]] || keep+=("$p")
    done
    BG_PIDS=("${keep[@]}")
    return "$rc"
}

# Leaves an NBD device free, whatever state it was left in.
nbd_release() {
    local dev=$1 i
    for ((i = 0; i < 50; i++)); do
        [[ $(nbd_size "$dev") == 0 ]] && return 0
        sleep 0.1
    done
    echo "$dev still connected: nbd-client -d"
    nbd-client -d "$dev" || true
    sleep 1
    [[ $(nbd_size "$dev") == 0 ]]
}

# --- targets: setup_* sets DEV (and SERVER_PID); teardown_* undoes it ------------------------

start_userblk() {
    local nbd=$1 conns=$2
    "$USERBLK_BIN" serve "ram:$SIZE_BYTES" --nbd "$nbd" --connections "$conns" >"$WORK/serve.out" 2>&1 &
    SERVER_PID=$!
    BG_PIDS+=("$SERVER_PID")
    DEV=$nbd
    wait_connected "$DEV" "$SERVER_PID" "$WORK/serve.out" || return 1
    cat "$WORK/serve.out"
}

stop_server_on() {
    local rc=0
    stop_pid "$SERVER_PID" TERM || rc=1
    cat "$WORK/serve.out" 2>/dev/null || true
    nbd_release "$DEV" || rc=1
    return "$rc"
}

setup_ramdisk() {
    local workers=$1 conns=$2
    DEV=/dev/nbd4
    "$USERBLK_EXAMPLES/bench_ramdisk" "$DEV" "$SIZE_MIB" --workers "$workers" --connections "$conns" \
        >"$WORK/serve.out" 2>&1 &
    SERVER_PID=$!
    BG_PIDS+=("$SERVER_PID")
    wait_connected "$DEV" "$SERVER_PID" "$WORK/serve.out" || return 1
    cat "$WORK/serve.out"
}

setup_sequential() {
    DEV=/dev/nbd3
    "$USERBLK_EXAMPLES/sequential_server" "$DEV" "$SIZE_MIB" >"$WORK/serve.out" 2>&1 &
    SERVER_PID=$!
    BG_PIDS+=("$SERVER_PID")
    wait_connected "$DEV" "$SERVER_PID" "$WORK/serve.out" || return 1
    cat "$WORK/serve.out"
}

setup_nbdkit() {
    local conns=$1
    DEV=/dev/nbd2
    local sock=$WORK/nbdkit.sock i
    rm -f "$sock"
    nbdkit --version
    nbdkit --unix "$sock" --foreground memory "$SIZE_BYTES" >"$WORK/serve.out" 2>&1 &
    SERVER_PID=$!
    BG_PIDS+=("$SERVER_PID")
    for ((i = 0; i < 100; i++)); do
        [[ -S $sock ]] && break
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/serve.out"; echo "nbdkit exited"; return 1; }
        sleep 0.1
    done
    [[ -S $sock ]] || { cat "$WORK/serve.out"; echo "nbdkit made no socket in 10 s"; return 1; }
    # nbd-client (netlink) hands the socket to the kernel and exits.
    nbd-client -unix "$sock" "$DEV" -connections "$conns" || { cat "$WORK/serve.out"; echo "nbd-client failed"; return 1; }
    wait_connected "$DEV" "$SERVER_PID" "$WORK/serve.out" || return 1
}
teardown_nbdkit() {
    local rc=0
    nbd-client -d "$DEV" || rc=1
    nbd_release "$DEV" || rc=1
    stop_pid "$SERVER_PID" TERM || rc=1
    cat "$WORK/serve.out" 2>/dev/null || true
    return "$rc"
}

setup_brd() {
    SERVER_PID=
    modprobe brd rd_nr=1 rd_size="$SIZE_KIB" max_part=0 || { echo "modprobe brd failed"; return 1; }
    DEV=/dev/ram0
    local i
    for ((i = 0; i < 50; i++)); do
        [[ -b $DEV ]] && break
        sleep 0.1
    done
    [[ -b $DEV ]] || { echo "no $DEV after modprobe brd"; return 1; }
    blockdev --getsize64 "$DEV"
}
teardown_brd() {
    local i
    for ((i = 0; i < 50; i++)); do
        rmmod brd 2>/dev/null && return 0
        sleep 0.2
    done
    rmmod brd
}

# The kernel's other RAM-backed ceiling: null_blk, multi-queue (queue_mode=2), memory-backed so
# that it copies data as brd does, one hardware queue per vCPU. Its size is in GiB (gb=1): fio
# works on the first SIZE_BYTES of it, like on the others.
setup_null_blk() {
    SERVER_PID=
    modprobe null_blk nr_devices=1 queue_mode=2 gb=1 bs=4096 memory_backed=1 \
        submit_queues="$(nproc)" hw_queue_depth=64 || { echo "modprobe null_blk failed"; return 1; }
    DEV=/dev/nullb0
    local i
    for ((i = 0; i < 50; i++)); do
        [[ -b $DEV ]] && break
        sleep 0.1
    done
    [[ -b $DEV ]] || { echo "no $DEV after modprobe null_blk"; return 1; }
    grep -H . /sys/module/null_blk/parameters/{queue_mode,memory_backed,submit_queues,hw_queue_depth,irqmode} || true
}
teardown_null_blk() {
    local i
    for ((i = 0; i < 50; i++)); do
        rmmod null_blk 2>/dev/null && return 0
        sleep 0.2
    done
    rmmod null_blk
}

# ublk_missing: the reason this kernel cannot serve ublk, or nothing (tries modprobe ublk_drv).
ublk_missing() {
    [[ -e /dev/ublk-control ]] || modprobe ublk_drv 2>/dev/null || true
    [[ -e /dev/ublk-control ]] || echo "kernel $(uname -r) has no ublk driver (ublk_drv, CONFIG_BLK_DEV_UBLK)"
}

# userblk serve over ublk with QUEUES queues (the queue ring's set-up flags RING: defer, coop,
# plain); DEV is the /dev/ublkbN it prints. Status 3: no ublk.
setup_ublk() {
    local queues=$1 ring=${2:-defer} missing
    missing=$(ublk_missing)
    [[ -z $missing ]] || { echo "SKIP: $missing"; return 3; }
    USERBLK_UBLK_RING=$ring "$USERBLK_BIN" serve "ram:$SIZE_BYTES" --transport ublk --queues "$queues" >"$WORK/serve.out" 2>&1 &
    SERVER_PID=$!
    BG_PIDS+=("$SERVER_PID")
    wait_ublk
}

# Waits for the /dev/ublkbN the server printed in $WORK/serve.out.
wait_ublk() {
    local i
    for ((i = 0; i < 300; i++)); do
        DEV=$(grep -o '/dev/ublkb[0-9]*' "$WORK/serve.out" | head -n 1 || true)
        if [[ -n $DEV && -b $DEV ]]; then
            udevadm settle 2>/dev/null || true
            cat "$WORK/serve.out"
            return 0
        fi
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/serve.out"; echo "the server exited before its ublk device appeared"; return 1; }
        sleep 0.1
    done
    cat "$WORK/serve.out"
    echo "no /dev/ublkbN within 30 s"
    return 1
}
teardown_ublk() {
    local rc=0 i dev=$DEV
    stop_pid "$SERVER_PID" TERM || rc=1
    cat "$WORK/serve.out" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        [[ -z $dev || (! -e $dev && ! -e ${dev/ublkb/ublkc}) ]] && return "$rc"
        sleep 0.1
    done
    echo "$dev (or its char device) still exists after its server stopped"
    return 1
}

# examples/remote_disk on /dev/nbd5: MODE is --blocking (the sync trait) or empty (async).
setup_remote() {
    local mode=$1
    DEV=/dev/nbd5
    # shellcheck disable=SC2086
    "$USERBLK_EXAMPLES/remote_disk" --nbd "$DEV" --latency-ms "$REMOTE_LATENCY_MS" $mode \
        >"$WORK/serve.out" 2>&1 &
    SERVER_PID=$!
    BG_PIDS+=("$SERVER_PID")
    wait_connected "$DEV" "$SERVER_PID" "$WORK/serve.out" || return 1
    cat "$WORK/serve.out"
    # Its size is its own (256 MiB): fio stays within it.
    local dev_size
    dev_size=$(blockdev --getsize64 "$DEV")
    ((dev_size < FIO_SIZE)) && FIO_SIZE=$dev_size
    return 0
}
# examples/remote_disk through ublk with ARGS (--blocking --workers N: the sync trait; none:
# async); it stops on SIGTERM as `userblk serve` does (teardown_ublk).
setup_remote_ublk() {
    local missing
    missing=$(ublk_missing)
    [[ -z $missing ]] || { echo "SKIP: $missing"; return 3; }
    # shellcheck disable=SC2068
    "$USERBLK_EXAMPLES/remote_disk" --ublk --latency-ms "$REMOTE_LATENCY_MS" $@ \
        >"$WORK/serve.out" 2>&1 &
    SERVER_PID=$!
    BG_PIDS+=("$SERVER_PID")
    wait_ublk || return 1
    local dev_size
    dev_size=$(blockdev --getsize64 "$DEV")
    ((dev_size < FIO_SIZE)) && FIO_SIZE=$dev_size
    return 0
}
# The example unmounts on SIGINT (its mount's signal watch) and exits.
teardown_remote() {
    local rc=0
    stop_pid "$SERVER_PID" INT || rc=1
    cat "$WORK/serve.out" 2>/dev/null || true
    nbd_release "$DEV" || rc=1
    return "$rc"
}

# --- measurement ------------------------------------------------------------------------------

# Ticks (1/CLK_TCK s) of user+system time of a process or thread, from its stat file.
stat_ticks() {
    local rest
    rest=$(cat "$1" 2>/dev/null) || { echo 0; return 0; }
    rest=${rest##*) }
    # Fields after the comm: state(3) ... utime(14) stime(15) -> 12th and 13th here.
    awk '{ print $12 + $13 }' <<<"$rest"
}

# "busy idle" ticks of the whole guest, from /proc/stat (iowait counts as idle).
guest_ticks() {
    awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6; exit }' /proc/stat
}

# "tid comm ticks" per thread of $SERVER_PID.
thread_ticks() {
    local t comm
    [[ -n $SERVER_PID ]] || return 0
    for t in /proc/"$SERVER_PID"/task/*; do
        [[ -r $t/stat ]] || continue
        comm=$(cat "$t/comm" 2>/dev/null || echo '?')
        printf '%s %s %s\n' "${t##*/}" "${comm// /_}" "$(stat_ticks "$t/stat")"
    done
}

fio_run() {
    local name=$1 rw=$2 bs=$3 qd=$4
    shift 4
    timeout --kill-after=10 "$((RUNTIME + RAMP + 90))" \
        fio --name="$name" --filename="$DEV" --ioengine=libaio --direct=1 --rw="$rw" --bs="$bs" \
        --iodepth="$qd" --numjobs=1 --norandommap --randrepeat=0 --size="$FIO_SIZE" "$@"
}

# run_workload NAME: one fio job, time-based, with the CPU it cost the guest and the server.
run_workload() {
    local w=$1 out=$RESULTS/$TARGET rw bs qd
    case $w in
        randread-4k) rw=randread bs=4k qd=32 ;;
        randwrite-4k) rw=randwrite bs=4k qd=32 ;;
        seqread-1m) rw=read bs=1M qd=8 ;;
        seqwrite-1m) rw=write bs=1M qd=8 ;;
        randread-4k-qd[1-9]*) rw=randread bs=4k qd=${w#randread-4k-qd} ;;
        randwrite-4k-qd[1-9]*) rw=randwrite bs=4k qd=${w#randwrite-4k-qd} ;;
        *) echo "unknown workload $w"; return 1 ;;
    esac
    local g0 g1 s0 s1 t0 t1 gb0 gi0 gb1 gi1
    # The ramp is run as its own job so that the CPU figures cover only the measured seconds.
    if ((RAMP > 0)); then
        fio_run "$w-ramp" "$rw" "$bs" "$qd" --time_based --runtime="$RAMP" --output=/dev/null ||
            { echo "fio failed (ramp of $w)"; return 1; }
    fi
    thread_ticks >"$WORK/threads0"
    g0=$(guest_ticks)
    s0=$([[ -n $SERVER_PID ]] && stat_ticks "/proc/$SERVER_PID/stat" || echo 0)
    t0=$(date +%s.%N)
    fio_run "$w" "$rw" "$bs" "$qd" --time_based --runtime="$RUNTIME" \
        --output-format=json --output="$out/$w.json" || { echo "fio failed ($w)"; return 1; }
    t1=$(date +%s.%N)
    s1=$([[ -n $SERVER_PID ]] && stat_ticks "/proc/$SERVER_PID/stat" || echo 0)
    g1=$(guest_ticks)
    thread_ticks >"$WORK/threads1"
    read -r gb0 gi0 <<<"$g0"
    read -r gb1 gi1 <<<"$g1"
    {
        echo "wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')"
        echo "guest_busy=$((gb1 - gb0))"
        echo "guest_idle=$((gi1 - gi0))"
        echo "server_ticks=$((s1 - s0))"
        echo "clk_tck=$(getconf CLK_TCK)"
    } >"$out/$w.cpu"
    # Per-thread deltas, by comm (threads with the same name are summed).
    awk 'NR == FNR { before[$1] = $3; next } { d[$2] += $3 - before[$1] } END { for (c in d) print c, d[c] }' \
        "$WORK/threads0" "$WORK/threads1" | sort -k2,2nr >"$out/$w.threads"
    grep -q '"error" : 0' "$out/$w.json" || { echo "fio reported an error in $w"; return 1; }
}

# run_target NAME: set up, prefill, the workloads, memory, teardown. Status 0 = all ran.
run_target() {
    TARGET=$1
    DEV=
    SERVER_PID=
    FIO_SIZE=$SIZE_BYTES
    mkdir -p "$RESULTS/$TARGET"
    echo "== $TARGET: setup"
    local setup teardown workloads=$WORKLOADS prefill=1
    case $TARGET in
        userblk-1c) setup=(start_userblk /dev/nbd0 1) teardown=stop_server_on ;;
        userblk-2c) setup=(start_userblk /dev/nbd1 2) teardown=stop_server_on ;;
        nbdkit) setup=(setup_nbdkit 1) teardown=teardown_nbdkit ;;
        nbdkit-2c) setup=(setup_nbdkit 2) teardown=teardown_nbdkit ;;
        sequential) setup=(setup_sequential) teardown=stop_server_on ;;
        brd) setup=(setup_brd) teardown=teardown_brd ;;
        null_blk) setup=(setup_null_blk) teardown=teardown_null_blk ;;
        ublk-1q) setup=(setup_ublk 1) teardown=teardown_ublk ;;
        ublk-2q) setup=(setup_ublk 2) teardown=teardown_ublk ;;
        ublk-1q-plain) setup=(setup_ublk 1 plain) teardown=teardown_ublk ;;
        ublk-1q-coop) setup=(setup_ublk 1 coop) teardown=teardown_ublk ;;
        remote-ublk-sync) setup=(setup_remote_ublk --blocking --workers 16) teardown=teardown_ublk
            workloads=$REMOTE_WORKLOADS prefill=0 ;;
        remote-ublk-serial) setup=(setup_remote_ublk --blocking --workers 1) teardown=teardown_ublk
            workloads=$REMOTE_WORKLOADS prefill=0 ;;
        remote-ublk-async) setup=(setup_remote_ublk) teardown=teardown_ublk
            workloads=$REMOTE_WORKLOADS prefill=0 ;;
        remote-sync) setup=(setup_remote --blocking) teardown=teardown_remote
            workloads=$REMOTE_WORKLOADS prefill=0 ;;
        remote-async) setup=(setup_remote "") teardown=teardown_remote
            workloads=$REMOTE_WORKLOADS prefill=0 ;;
        ramdisk-w*-c*)
            local spec=${TARGET#ramdisk-w}
            setup=(setup_ramdisk "${spec%-c*}" "${spec#*-c}") teardown=stop_server_on ;;
        *) echo "unknown target $TARGET"; return 2 ;;
    esac
    local src=0
    "${setup[@]}" || src=$?
    if ((src == 3)); then
        return 3
    elif ((src != 0)); then
        echo "setup failed"
        "$teardown" || true
        return 2
    fi
    echo "== $TARGET: $DEV ($(blockdev --getsize64 "$DEV") bytes), server pid ${SERVER_PID:-none}"
    # Everyone reads real data: write the whole device once.
    local t0=$SECONDS rc=0 w
    if ((prefill)); then
        echo "== $TARGET: prefill"
        fio_run prefill write 1M 8 --output-format=terse --output=/dev/null || rc=1
        echo "prefill took $((SECONDS - t0)) s"
    fi
    if ((rc == 0)); then
        for w in $workloads; do
            echo "== $TARGET: $w"
            run_workload "$w" || { rc=1; break; }
            cat "$RESULTS/$TARGET/$w.cpu" "$RESULTS/$TARGET/$w.threads"
        done
    fi
    if [[ -n $SERVER_PID ]] && [[ -r /proc/$SERVER_PID/status ]]; then
        grep -E '^Vm(HWM|RSS|Peak|Size):' "/proc/$SERVER_PID/status" | tee "$RESULTS/$TARGET/hwm"
    fi
    echo "== $TARGET: teardown"
    "$teardown" || { echo "teardown failed"; rc=1; }
    return "$rc"
}

say "kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ { print $2 " kB" }' /proc/meminfo); runtime ${RUNTIME}s + ${RAMP}s ramp, size $SIZE_BYTES"
{ uname -r; nproc; fio --version; } >"$RESULTS/guest-info"
kept=()
if ! modprobe nbd nbds_max=16; then
    for t in $TARGETS; do
        case $t in
            brd | null_blk | ublk-* | remote-ublk-*) kept+=("$t") ;;
            *) echo "$t FAIL modprobe nbd failed" >>"$RESULTS/targets" ;;
        esac
    done
    TARGETS="${kept[*]}"
fi

for t in $TARGETS; do
    if [[ ! $t =~ ^(userblk-1c|userblk-2c|nbdkit|nbdkit-2c|sequential|ublk-1q|ublk-2q|ublk-1q-plain|ublk-1q-coop|brd|null_blk|remote-sync|remote-async|remote-ublk-sync|remote-ublk-serial|remote-ublk-async|ramdisk-w[0-9]+-c[1-9][0-9]*)$ ]]; then
        echo "$t FAIL unknown target" >>"$RESULTS/targets"
        continue
    fi
    say "$t"
    rc=0
    run_target "$t" >"$RESULTS/logs/$t.log" 2>&1 || rc=$?
    cleanup
    case $rc in
        0) echo "$t ok" >>"$RESULTS/targets" ;;
        2) echo "$t FAIL did not come up: $(tail -n 2 "$RESULTS/logs/$t.log" | head -n 1)" >>"$RESULTS/targets" ;;
        3) echo "$t SKIP $(sed -n 's/^SKIP: //p' "$RESULTS/logs/$t.log" | tail -n 1)" >>"$RESULTS/targets" ;;
        *) echo "$t FAIL $(tail -n 1 "$RESULTS/logs/$t.log")" >>"$RESULTS/targets" ;;
    esac
    say "$(tail -n 1 "$RESULTS/targets")"
done
exit 0
