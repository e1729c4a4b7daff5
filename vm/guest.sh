#!/usr/bin/env bash
# vm/guest.sh - runs inside the VM (vm/run.sh starts it through `userblk vm`): the kernel test
# binary's cases through /dev/nbd0, the driver template's kernel test, then real workloads on
# `userblk serve`. Writes one line per test to $RESULTS/results (PASS name | FAIL name reason |
# SKIP name reason) and each test's output to $RESULTS/logs/; RESULTS defaults to
# $RESULTS_ROOT/$USERBLK_VM (the kernel series `userblk vm` names). Exit status 1 if a test failed.
# Test functions are called indirectly (run_test NAME t_NAME). Workloads are listed in WORKLOADS
# here and in vm/cases/*.sh (one file a topic, each defining its t_* functions and adding their
# names to WORKLOADS). USERBLK_VM_ONLY, an extended regex, runs only the workloads (and the
# kernel-tests[SETUP] groups) whose names match it.
# shellcheck disable=SC2317
set -uo pipefail

: "${USERBLK_BIN:?}" "${USERBLK_EXAMPLES:?}" "${USERBLK_KERNEL_TESTS:?}"
RESULTS=${RESULTS:-${RESULTS_ROOT:?}/${USERBLK_VM:?}}
mkdir -p "$RESULTS/logs"
: >"$RESULTS/results"
NBD=/dev/nbd0
WORK=/tmp/userblk-guest
MNT=$WORK/mnt
mkdir -p "$WORK" "$MNT"
# fio writes its verify state files into the current directory; the host's tree is read-only.
cd "$WORK" || exit 1
SERVE_PID=

say() { printf '%s\n' "$*" >&2; }
result() { printf '%s\n' "$*" >>"$RESULTS/results"; say "$*"; }

# run_test NAME FUNCTION: runs FUNCTION in a subshell with errexit (not inside an `if`, where
# bash would ignore it), its output in logs/NAME.log; on the way out, whatever it left running
# is stopped. Status 0 = PASS.
run_test() {
    local name=$1 fn=$2 log="$RESULTS/logs/$1.log" rc
    (
        set -e
        trap cleanup EXIT
        "$fn"
    ) >"$log" 2>&1
    rc=$?
    if ((rc == 0)); then
        result "PASS $name"
    else
        result "FAIL $name $(tail -n 1 "$log")"
    fi
}

# After a test, pass or fail: unmount the file system, stop the server gracefully (a SIGKILLed
# server leaves a netlink-configured device connected to nothing), and free the device if it is
# still connected, so that one failing test cannot fail the ones after it.
cleanup() {
    # Runs as the test subshell's EXIT trap: with errexit on, a failing step here would replace
    # the test's own exit status.
    set +e
    umount -l "$MNT" >/dev/null 2>&1
    if [[ -n $SERVE_PID ]]; then
        kill -INT "$SERVE_PID" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$SERVE_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$SERVE_PID" 2>/dev/null
        wait "$SERVE_PID" 2>/dev/null
        SERVE_PID=
    fi
    if [[ $(nbd_size "$NBD") != 0 ]]; then
        echo "cleanup: $NBD still connected, disconnecting it"
        nbd-client -d "$NBD" >/dev/null 2>&1
    fi
    true
}

nbd_size() { cat "/sys/block/${1#/dev/}/size" 2>/dev/null || echo 0; }

# serve ARGS...: starts `userblk serve ARGS... --nbd $NBD` and waits until the device has a size.
serve() {
    [[ $(nbd_size "$NBD") == 0 ]] || { echo "$NBD is already connected before serve"; return 1; }
    "$USERBLK_BIN" serve "$@" --nbd "$NBD" >"$WORK/serve.out" 2>&1 &
    SERVE_PID=$!
    wait_connected "$NBD"
}

wait_connected() {
    local i
    for i in $(seq 200); do
        [[ $(nbd_size "$1") != 0 ]] && { udevadm settle 2>/dev/null || true; return 0; }
        kill -0 "$SERVE_PID" 2>/dev/null || { cat "$WORK/serve.out"; echo "server exited before $1 connected"; return 1; }
        sleep 0.1
    done
    cat "$WORK/serve.out"
    echo "$1 did not connect within 20 s"
    return 1
}

# stop_serve [SIGNAL]: signals the server, waits for it, and returns its exit status.
stop_serve() {
    local sig=${1:-INT} rc=0
    [[ -n $SERVE_PID ]] || return 0
    kill "-$sig" "$SERVE_PID" 2>/dev/null
    wait "$SERVE_PID" || rc=$?
    SERVE_PID=
    cat "$WORK/serve.out"
    return "$rc"
}

# The device node is free for the next user: no size, no server attached.
assert_free() {
    local i
    for i in $(seq 50); do
        [[ $(nbd_size "$NBD") == 0 ]] && return 0
        sleep 0.1
    done
    echo "$NBD still connected after the server stopped"
    return 1
}

fs_roundtrip() {
    mkfs.ext4 -q -F "$NBD"
    mount "$NBD" "$MNT"
    dd if=/dev/urandom of="$WORK/payload" bs=1M count=8 status=none
    cp "$WORK/payload" "$MNT/a"
    mkdir "$MNT/dir"
    for i in $(seq 50); do echo "file $i" >"$MNT/dir/f$i"; done
    sync
    umount "$MNT"
    mount "$NBD" "$MNT"
    cmp "$WORK/payload" "$MNT/a"
    [[ $(cat "$MNT/dir/f42") == "file 42" ]]
    umount "$MNT"
    fsck.ext4 -fn "$NBD"
}

t_mkfs_ramdisk() {
    serve ram:64M
    fs_roundtrip
    stop_serve INT
    assert_free
}

t_mkfs_file() {
    truncate -s 64M "$WORK/disk.img"
    serve "file:$WORK/disk.img"
    fs_roundtrip
    stop_serve TERM
    assert_free
    # What the file holds after a clean stop is the file system: check it directly.
    fsck.ext4 -fn "$WORK/disk.img"
}

t_fio_verify() {
    serve ram:64M
    fio --name=verify --filename="$NBD" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
        --iodepth=32 --size=32M --verify=crc32c --verify_fatal=1 --do_verify=1 \
        --output="$WORK/fio.out"
    cat "$WORK/fio.out"
    grep -q 'err= 0' "$WORK/fio.out"
    if grep -qi 'verify.*fail\|bad magic\|crc32c.*mismatch' "$WORK/fio.out"; then
        echo "fio found corrupt data"
        return 1
    fi
    stop_serve INT
}

t_fio_verify_two_connections() {
    serve ram:64M --connections 2
    fio --name=verify --filename="$NBD" --ioengine=libaio --direct=1 --rw=randrw --bs=16k \
        --iodepth=32 --size=32M --verify=crc32c --verify_fatal=1 --output="$WORK/fio.out"
    cat "$WORK/fio.out"
    grep -q 'err= 0' "$WORK/fio.out"
    stop_serve INT
}

t_read_only() {
    serve ram:16M --read-only
    [[ $(blockdev --getro "$NBD") == 1 ]] || { echo "$NBD is not read-only"; return 1; }
    dd if="$NBD" of=/dev/null bs=4k count=16 iflag=direct status=none
    if dd if=/dev/zero of="$NBD" bs=4k count=1 oflag=direct status=none; then
        echo "a write to a read-only device succeeded"
        return 1
    fi
    stop_serve INT
}

t_media_error() {
    # examples/badsector: a RAM disk whose 4 KiB at 1 MiB fail to read with EIO.
    "$USERBLK_EXAMPLES/badsector" "$NBD" >"$WORK/serve.out" 2>&1 &
    SERVE_PID=$!
    wait_connected "$NBD"
    if dd if="$NBD" of=/dev/null bs=4k skip=256 count=1 iflag=direct 2>"$WORK/dd.err"; then
        echo "dd read the bad sector without an error"
        return 1
    fi
    cat "$WORK/dd.err"
    grep -q 'Input/output error' "$WORK/dd.err"
    # The connection survived: other blocks still read and write.
    dd if=/dev/urandom of="$WORK/blk" bs=4k count=1 status=none
    dd if="$WORK/blk" of="$NBD" bs=4k seek=10 count=1 oflag=direct status=none
    dd if="$NBD" of="$WORK/back" bs=4k skip=10 count=1 iflag=direct status=none
    cmp "$WORK/blk" "$WORK/back"
    stop_serve INT
}

t_sigterm_under_load() {
    truncate -s 128M "$WORK/load.img"
    serve "file:$WORK/load.img"
    mkfs.ext4 -q -F "$NBD"
    mount "$NBD" "$MNT"
    fio --name=load --directory="$MNT" --ioengine=libaio --direct=1 --rw=randwrite \
        --bs=4k --iodepth=16 --size=32M --time_based --runtime=60 >"$WORK/fio.out" 2>&1 &
    local fio=$!
    sleep 5
    stop_serve TERM
    wait "$fio" || true
    umount -l "$MNT" 2>/dev/null || true
    assert_free
    # Serve the same file again: journal recovery on mount, then a clean check.
    serve "file:$WORK/load.img"
    mount "$NBD" "$MNT"
    umount "$MNT"
    fsck.ext4 -fn "$NBD"
    stop_serve INT
    assert_free
}

t_busy() {
    serve ram:16M
    if "$USERBLK_BIN" serve ram:16M --nbd "$NBD" >"$WORK/busy.out" 2>&1; then
        echo "a second server attached to a busy $NBD"
        return 1
    fi
    cat "$WORK/busy.out"
    grep -qi 'busy' "$WORK/busy.out"
    stop_serve INT
}

t_no_permission() {
    if setpriv --reuid=65534 --regid=65534 --clear-groups "$USERBLK_BIN" serve ram:16M --nbd "$NBD" >"$WORK/perm.out" 2>&1; then
        echo "serve succeeded without CAP_SYS_ADMIN"
        return 1
    fi
    cat "$WORK/perm.out"
    grep -q 'CAP_SYS_ADMIN' "$WORK/perm.out"
}

t_serve_twice() {
    serve ram:16M
    stop_serve INT
    assert_free
    serve ram:16M
    dd if="$NBD" of=/dev/null bs=4k count=4 iflag=direct status=none
    stop_serve INT
    assert_free
}

# `userblk check --kernel`: the conformance suite, random tests and shipped traces through
# /dev/nbd0, as a driver author runs it.
t_check_kernel() {
    [[ $(nbd_size "$NBD") == 0 ]] || { echo "$NBD is already connected"; return 1; }
    "$USERBLK_BIN" check ram:64M --kernel "$NBD" --runs 5
    assert_free
}

WORKLOADS=(mkfs_ramdisk mkfs_file fio_verify fio_verify_two_connections read_only media_error
    sigterm_under_load busy no_permission serve_twice check_kernel)
for cases in "$(dirname "${BASH_SOURCE[0]}")"/cases/*.sh; do
    [[ -e $cases ]] || continue
    # shellcheck source=/dev/null
    source "$cases"
done

# selected NAME: whether USERBLK_VM_ONLY (unset: everything) selects NAME.
selected() { [[ -z ${USERBLK_VM_ONLY:-} || $1 =~ ${USERBLK_VM_ONLY} ]]; }

say "guest: kernel $(uname -r)"
if ! modprobe nbd; then
    result "FAIL modprobe_nbd could not load the nbd module"
    exit 1
fi

# The same conformance cases cargo test runs through the loopback, through /dev/nbd0, once with
# each way of configuring the driver.
for setup in netlink ioctl; do
    selected "kernel-tests[$setup]" || continue
    say "guest: kernel tests, $setup set-up ($USERBLK_KERNEL_TESTS)"
    log="$RESULTS/logs/kernel-tests-$setup.log"
    env USERBLK_TEST_NBD="$NBD" USERBLK_TEST_NBD_SETUP="$setup" RUST_BACKTRACE=1 \
        "$USERBLK_KERNEL_TESTS" --test-threads=1 --include-ignored --show-output >"$log" 2>&1
    kt=$?
    before=$(grep -c '^FAIL ' "$RESULTS/results")
    while read -r _ name _ verdict; do
        case $verdict in
            ok) result "PASS ${name}[$setup]" ;;
            FAILED) result "FAIL ${name}[$setup] (see logs/kernel-tests-$setup.log)" ;;
            ignored) result "SKIP ${name}[$setup]" ;;
        esac
    done < <(grep -E '^test .* \.\.\. (ok|FAILED|ignored)' "$log")
    # Each conformance case on its own line, from the suite's report
    # ("  ok       driver  read_after_write    12 ms", "  NOT RUN  driver  reopen_after_fua  why").
    while IFS= read -r line; do
        [[ $line =~ ^\ \ (ok|FAIL|skip|NOT\ RUN)\ +(driver|server)\ +([a-z_0-9]+) ]] || continue
        name=${BASH_REMATCH[3]}
        case ${BASH_REMATCH[1]} in
            ok) result "PASS conformance:${name}[$setup]" ;;
            FAIL) result "FAIL conformance:${name}[$setup] (see logs/kernel-tests-$setup.log)" ;;
            skip) result "SKIP conformance:${name}[$setup]" ;;
            "NOT RUN") result "FAIL conformance:${name}[$setup] could not run (see logs/kernel-tests-$setup.log)" ;;
        esac
    done <"$log"
    if ((kt != 0)) && (($(grep -c '^FAIL ' "$RESULTS/results") == before)); then
        result "FAIL kernel-tests[$setup] exited with status $kt without a failing case (see $log)"
    fi
done
# Each case leaves /dev/nbd0 free; if a case left it busy, the workloads below would fail.
[[ $(nbd_size "$NBD") == 0 ]] || result "FAIL kernel-tests left $NBD connected"

# The driver template's kernel test (examples/driver-template/tests/kernel.rs): the entry point
# a driver author calls, userblk_harness::kernel_test::run, through a free /dev/nbdN.
if [[ -n ${USERBLK_TEMPLATE_TESTS:-} ]] && selected template_kernel_test; then
    say "guest: driver template kernel test"
    log="$RESULTS/logs/template-kernel-test.log"
    if "$USERBLK_TEMPLATE_TESTS" --test-threads=1 --nocapture >"$log" 2>&1 && grep -q '^passed$' "$log"; then
        result "PASS template_kernel_test"
    else
        result "FAIL template_kernel_test (see logs/template-kernel-test.log)"
    fi
fi

for t in "${WORKLOADS[@]}"; do
    selected "$t" || continue
    say "guest: $t"
    run_test "$t" "t_$t"
done
! grep -q '^FAIL ' "$RESULTS/results"
