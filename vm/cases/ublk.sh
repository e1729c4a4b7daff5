# vm/cases/ublk.sh - workloads through the ublk driver (/dev/ublkbN), sourced by vm/guest.sh.
# Kernels without ublk_drv (Debian's 6.1) report each case as SKIP with the reason.
# shellcheck shell=bash disable=SC2317

UBLK_DEV=
UBLK_SKIP=

# ublk_missing: the reason ublk cannot run here, or nothing (loads ublk_drv once).
ublk_missing() {
    if [[ -z $UBLK_SKIP ]]; then
        [[ -e /dev/ublk-control ]] || modprobe ublk_drv 2>/dev/null
        if [[ -e /dev/ublk-control ]]; then
            UBLK_SKIP=no
        else
            UBLK_SKIP="kernel $(uname -r) has no ublk driver (ublk_drv, CONFIG_BLK_DEV_UBLK)"
        fi
    fi
    [[ $UBLK_SKIP == no ]] || echo "$UBLK_SKIP"
}

# userblk serve ... --transport ublk in the background; UBLK_DEV is the node it printed.
serve_ublk() {
    "$USERBLK_BIN" serve "$@" --transport ublk >"$WORK/serve.out" 2>&1 &
    SERVE_PID=$!
    wait_ublk
}

# Waits for the server's "serving ... on /dev/ublkbN" line and for the node.
wait_ublk() {
    local i
    UBLK_DEV=
    for i in $(seq 200); do
        UBLK_DEV=$(grep -o '/dev/ublkb[0-9]*' "$WORK/serve.out" | head -n 1 || true)
        if [[ -n $UBLK_DEV && -b $UBLK_DEV ]]; then
            udevadm settle 2>/dev/null || true
            return 0
        fi
        kill -0 "$SERVE_PID" 2>/dev/null || { cat "$WORK/serve.out"; echo "server exited before its ublk device appeared"; return 1; }
        sleep 0.1
    done
    cat "$WORK/serve.out"
    echo "no /dev/ublkbN within 20 s"
    return 1
}

# The ublk device is gone once its server stopped: no block device, no char device.
assert_ublk_gone() {
    local dev=$1 i
    for i in $(seq 50); do
        [[ ! -e $dev && ! -e ${dev/ublkb/ublkc} ]] && return 0
        sleep 0.1
    done
    echo "$dev (or its char device) still exists after the server stopped"
    ls -l /dev/ublk* || true
    return 1
}

fio_verify_on() {
    local dev=$1 rw=$2 bs=$3
    fio --name=verify --filename="$dev" --ioengine=libaio --direct=1 --rw="$rw" --bs="$bs" \
        --iodepth=32 --size=32M --verify=crc32c --verify_fatal=1 --do_verify=1 \
        --output="$WORK/fio.out"
    cat "$WORK/fio.out"
    grep -q 'err= 0' "$WORK/fio.out"
    if grep -qi 'verify.*fail\|bad magic\|crc32c.*mismatch' "$WORK/fio.out"; then
        echo "fio found corrupt data"
        return 1
    fi
}

t_ublk_mkfs() {
    serve_ublk ram:64M
    local dev=$UBLK_DEV
    NBD=$dev fs_roundtrip
    stop_serve INT
    grep -q "removed" "$WORK/serve.out"
    assert_ublk_gone "$dev"
}

t_ublk_fio_verify() {
    serve_ublk ram:64M
    fio_verify_on "$UBLK_DEV" randwrite 4k
    local dev=$UBLK_DEV
    stop_serve INT
    assert_ublk_gone "$dev"
}

t_ublk_fio_verify_two_queues() {
    serve_ublk ram:64M --queues 2
    grep -q '2 queues' "$WORK/serve.out"
    fio_verify_on "$UBLK_DEV" randrw 16k
    local dev=$UBLK_DEV
    stop_serve TERM
    assert_ublk_gone "$dev"
}

t_ublk_read_only() {
    serve_ublk ram:16M --read-only
    [[ $(blockdev --getro "$UBLK_DEV") == 1 ]] || { echo "$UBLK_DEV is not read-only"; return 1; }
    dd if="$UBLK_DEV" of=/dev/null bs=4k count=16 iflag=direct status=none
    if dd if=/dev/zero of="$UBLK_DEV" bs=4k count=1 oflag=direct status=none; then
        echo "a write to a read-only device succeeded"
        return 1
    fi
    stop_serve INT
}

t_ublk_media_error() {
    "$USERBLK_EXAMPLES/badsector" ublk >"$WORK/serve.out" 2>&1 &
    SERVE_PID=$!
    wait_ublk
    if dd if="$UBLK_DEV" of=/dev/null bs=4k skip=256 count=1 iflag=direct 2>"$WORK/dd.err"; then
        echo "dd read the bad sector without an error"
        return 1
    fi
    cat "$WORK/dd.err"
    grep -q 'Input/output error' "$WORK/dd.err"
    # The queue survived: other blocks still read and write.
    dd if=/dev/urandom of="$WORK/blk" bs=4k count=1 status=none
    dd if="$WORK/blk" of="$UBLK_DEV" bs=4k seek=10 count=1 oflag=direct status=none
    dd if="$UBLK_DEV" of="$WORK/back" bs=4k skip=10 count=1 iflag=direct status=none
    cmp "$WORK/blk" "$WORK/back"
    stop_serve INT
}

t_ublk_sigterm_under_load() {
    truncate -s 128M "$WORK/ublk-load.img"
    serve_ublk "file:$WORK/ublk-load.img"
    local dev=$UBLK_DEV
    mkfs.ext4 -q -F "$dev"
    mount "$dev" "$MNT"
    fio --name=load --directory="$MNT" --ioengine=libaio --direct=1 --rw=randwrite \
        --bs=4k --iodepth=16 --size=32M --time_based --runtime=60 >"$WORK/fio.out" 2>&1 &
    local fio=$!
    sleep 5
    # The server stops the device under load: fio gets errors, nothing hangs, the node goes.
    timeout 60 bash -c "kill -TERM $SERVE_PID; while kill -0 $SERVE_PID 2>/dev/null; do sleep 0.2; done"
    wait "$SERVE_PID" || true
    SERVE_PID=
    cat "$WORK/serve.out"
    wait "$fio" || true
    umount -l "$MNT" 2>/dev/null || true
    assert_ublk_gone "$dev"
    # Serve the same file again: journal recovery on mount, then a clean check.
    serve_ublk "file:$WORK/ublk-load.img"
    mount "$UBLK_DEV" "$MNT"
    umount "$MNT"
    fsck.ext4 -fn "$UBLK_DEV"
    stop_serve INT
}

# Recovery: ext4 mounted on a recoverable device, fio writing with crc32c headers; the server is
# killed with SIGKILL mid-write; the device stays (quiesced, requests waiting); a new server
# takes it over with --recover; fio finishes, a verify pass finds every block it wrote, and the
# file system checks clean.
t_ublk_recover() {
    truncate -s 512M "$WORK/ublk-rec.img"
    serve_ublk "file:$WORK/ublk-rec.img" --recoverable
    local dev=$UBLK_DEV id=${UBLK_DEV#/dev/ublkb}
    grep -q recoverable "$WORK/serve.out"
    mkfs.ext4 -q -F "$dev"
    mount "$dev" "$MNT"
    local job=(--name=rec --directory="$MNT" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k
        --iodepth=16 --size=200M --verify=crc32c --randrepeat=1 --verify_fatal=1)
    fio "${job[@]}" --do_verify=0 --output="$WORK/fio-write.out" &
    local fio=$!
    sleep 2
    # The point is I/O in flight when the server dies: fio must still be writing.
    kill -0 "$fio" 2>/dev/null || { echo "fio finished before the kill: nothing was in flight"; return 1; }
    kill -KILL "$SERVE_PID"
    wait "$SERVE_PID" 2>/dev/null || true
    SERVE_PID=
    sleep 1
    [[ -b $dev ]] || { echo "$dev went away with its server although it is recoverable"; return 1; }
    kill -0 "$fio" 2>/dev/null || { echo "fio ended while the device had no server"; return 1; }
    echo "fio is waiting for the device, as it should"
    "$USERBLK_BIN" serve "file:$WORK/ublk-rec.img" --recover "$id" >"$WORK/serve.out" 2>&1 &
    SERVE_PID=$!
    wait_ublk
    [[ $UBLK_DEV == "$dev" ]] || { echo "recovered $UBLK_DEV, not $dev"; return 1; }
    grep -q recovered "$WORK/serve.out"
    wait "$fio"
    cat "$WORK/fio-write.out"
    grep -q 'err= 0' "$WORK/fio-write.out"
    fio "${job[@]}" --verify_only --output="$WORK/fio-verify.out"
    cat "$WORK/fio-verify.out"
    grep -q 'err= 0' "$WORK/fio-verify.out"
    umount "$MNT"
    fsck.ext4 -fn "$dev"
    stop_serve INT
    assert_ublk_gone "$dev"
}

# A device that was not created recoverable cannot be taken over: the error says so.
t_ublk_recover_refused() {
    serve_ublk ram:16M
    local id=${UBLK_DEV#/dev/ublkb}
    if "$USERBLK_BIN" serve ram:16M --recover "$id" >"$WORK/rec.out" 2>&1; then
        echo "--recover took over a device that is not recoverable"
        return 1
    fi
    cat "$WORK/rec.out"
    grep -q 'was not created recoverable' "$WORK/rec.out"
    stop_serve INT
}

# Without root: the error names what is missing (CAP_SYS_ADMIN, or an unprivileged device).
t_ublk_no_permission() {
    if setpriv --reuid=65534 --regid=65534 --clear-groups "$USERBLK_BIN" serve ram:16M --transport ublk >"$WORK/perm.out" 2>&1; then
        echo "serve --transport ublk succeeded without CAP_SYS_ADMIN"
        return 1
    fi
    cat "$WORK/perm.out"
    grep -q 'CAP_SYS_ADMIN' "$WORK/perm.out"
}

# The kernel test binary's cases (conformance suite, concurrent random tests, traces) through
# /dev/ublkbN, as harness/tests/kernel.rs runs them with USERBLK_TEST_UBLK set.
t_ublk_kernel_tests() {
    local log=$RESULTS/logs/ublk-kernel-tests.log rc=0 name line
    local -A seen=()
    env USERBLK_TEST_UBLK=1 RUST_BACKTRACE=1 "$USERBLK_KERNEL_TESTS" ublk --test-threads=1 \
        --include-ignored --show-output >"$log" 2>&1 || rc=$?
    # Each test, and each conformance case from the suite's report, on its own line.
    while read -r _ name _ verdict; do
        case $verdict in
            ok) result "PASS ${name}[ublk]" ;;
            FAILED) result "FAIL ${name}[ublk] (see logs/ublk-kernel-tests.log)" ;;
        esac
    done < <(grep -E '^test .* \.\.\. (ok|FAILED|ignored)' "$log")
    while IFS= read -r line; do
        [[ $line =~ ^\ \ (ok|FAIL|skip|NOT\ RUN)\ +(driver|server)\ +([a-z_0-9]+) ]] || continue
        name=${BASH_REMATCH[3]}
        # Both the suite's test and the random-and-traces test print the suite's report (twice
        # each, once more in a failure's message): one line per case, from its first report.
        [[ -n ${seen[$name]:-} ]] && continue
        seen[$name]=1
        case ${BASH_REMATCH[1]} in
            ok) result "PASS conformance:${name}[ublk]" ;;
            FAIL) result "FAIL conformance:${name}[ublk] (see logs/ublk-kernel-tests.log)" ;;
            skip) result "SKIP conformance:${name}[ublk]" ;;
            "NOT RUN") result "FAIL conformance:${name}[ublk] could not run (see logs/ublk-kernel-tests.log)" ;;
        esac
    done <"$log"
    tail -n 30 "$log"
    # Something ran (a filter that matches nothing passes vacuously), and all of it passed.
    grep -qE '^test .*ublk.* \.\.\. ok' "$log" || { echo "no ublk kernel test ran"; return 1; }
    ((rc == 0)) || { echo "the ublk kernel tests failed (status $rc)"; return 1; }
}

# examples/remote_disk through ublk (storage behind a socket, 5 ms a request), 4 KiB random
# reads at QD 32 served three ways: one request at a time (the sync trait with one worker: what a
# queue did before it served its requests together), the sync trait with 16 workers a queue, and
# as an async device (tasks); the last two after a crc32c write + verify pass. Each concurrent
# mode must reach 3 times the one-at-a-time figure of the same boot (measured under TCG: 13x),
# which also cannot beat 1/latency (printed): no absolute timing, a margin of several times.
t_ublk_remote_concurrent() {
    local latency_ms=5 i dev iops=()
    local names=(serial sync async) labels=("sync trait" "sync trait" async)
    local modes=("--blocking --workers 1" "--blocking --workers 16" "")
    for i in 0 1 2; do
        # shellcheck disable=SC2086
        "$USERBLK_EXAMPLES/remote_disk" --ublk --latency-ms "$latency_ms" ${modes[i]} >"$WORK/serve.out" 2>&1 &
        SERVE_PID=$!
        wait_ublk
        dev=$UBLK_DEV
        grep -q "ublk, ${labels[i]})" "$WORK/serve.out" || { cat "$WORK/serve.out"; echo "not served as ${names[i]}"; return 1; }
        if ((i > 0)); then
            fio --name=verify --filename="$dev" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
                --iodepth=32 --size=8M --verify=crc32c --verify_fatal=1 --do_verify=1 \
                --output="$WORK/fio.out"
            grep -q 'err= 0' "$WORK/fio.out" || { cat "$WORK/fio.out"; echo "the verify pass failed (${names[i]})"; return 1; }
        fi
        fio --name=randread --filename="$dev" --rw=randread --bs=4k --iodepth=32 --direct=1 \
            --ioengine=libaio --runtime=5 --time_based --size=128M --output-format=terse \
            --terse-version=3 >"$WORK/fio.out"
        iops+=("$(cut -d';' -f8 "$WORK/fio.out")")
        stop_serve INT
        assert_ublk_gone "$dev"
    done
    echo "remote disk through ublk, ${latency_ms} ms a request, 4 KiB randread QD32: one at a time ${iops[0]} IOPS (1/latency: $((1000 / latency_ms))), sync trait with 16 workers ${iops[1]}, async ${iops[2]}"
    python3 -c "print('sync: %.1fx, async: %.1fx one at a time' % (${iops[1]} / max(${iops[0]}, 1), ${iops[2]} / max(${iops[0]}, 1)))"
    for i in 1 2; do
        ((${iops[i]:-0} >= 3 * ${iops[0]:-0} && ${iops[i]:-0} > 0)) || { echo "${names[i]}: ${iops[i]} IOPS, not 3x one at a time: requests were not served concurrently"; return 1; }
    done
}

# Each ublk case runs where the kernel has ublk; elsewhere each is reported as skipped, with the
# reason, here (guest.sh's run_test only knows PASS and FAIL).
_ublk_cases=(ublk_kernel_tests ublk_mkfs ublk_fio_verify ublk_fio_verify_two_queues ublk_read_only
    ublk_media_error ublk_sigterm_under_load ublk_recover ublk_recover_refused
    ublk_no_permission ublk_remote_concurrent)
if _ublk_why=$(ublk_missing) && [[ -n $_ublk_why ]]; then
    for _c in "${_ublk_cases[@]}"; do
        [[ -z ${USERBLK_VM_ONLY:-} || $_c =~ ${USERBLK_VM_ONLY} ]] && result "SKIP $_c $_ublk_why"
    done
else
    WORKLOADS+=("${_ublk_cases[@]}")
fi
