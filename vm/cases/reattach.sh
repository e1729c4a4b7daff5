# vm/cases/reattach.sh - a server killed with SIGKILL under load (sourced by vm/guest.sh).
#   reattach     ext4 on /dev/nbd0 served from a file with a dead-connection timeout, fio verify
#                (crc32c) on a file in it, kill -9 of the server, `serve --reattach` within the
#                timeout: no I/O error, the verify passes, fsck is clean.
#   kill_netlink, kill_ioctl
#                KILL_ITERATIONS (default 3, to keep CI's time; `KILL_ITERATIONS=10 vm/run.sh
#                --only kill_` for a longer run) kills of the server under a data (fio, buffered and
#                direct) and metadata (creates, renames, unlinks, fsyncs in bash) workload on
#                ext4; netlink alternates a reattach and a bounded failure (requests time out,
#                wait for a reattach, fail; `serve` then says the device is orphaned and
#                `userblk disconnect` frees it), ioctl always fails bounded (the device is freed
#                with the process). After each: the server process is gone, no task is left in D
#                state, and the device is served again by userblk alone. netlink's first
#                iteration uses the default timeouts; ioctl's use --timeout 0, the setting that
#                deadlocked one run in five before the kernel ends got a send timeout.
# fsstress is not packaged for Debian bookworm (it ships with xfstests, built from source), so
# the metadata workload is the bash loop meta_load below.
# shellcheck disable=SC2317

KILL_ITERATIONS=${KILL_ITERATIONS:-3}

# The tasks in uninterruptible sleep (state D): "pid comm wchan" a line.
d_tasks() {
    local f s pid
    for f in /proc/[0-9]*/stat; do
        read -r s 2>/dev/null <"$f" || continue
        pid=${s%% *}
        s=${s##*) }
        [[ ${s%% *} == D ]] || continue
        echo "$pid $(cat "/proc/$pid/comm" 2>/dev/null) $(cat "/proc/$pid/wchan" 2>/dev/null)"
    done
}

# no_d_state SECONDS: waits until no task is in D state; otherwise prints them with their stacks.
no_d_state() {
    local i left
    for i in $(seq $(($1 * 10))); do
        left=$(d_tasks)
        [[ -z $left ]] && return 0
        sleep 0.1
    done
    echo "tasks still in D state after $1 s:"
    echo "$left"
    while read -r pid _; do cat "/proc/$pid/stack" 2>/dev/null; done <<<"$left"
    return 1
}

# gone PID: whether the process no longer runs (exited, or a zombie waiting to be reaped). Every
# thread counts: a killed process whose main thread has exited shows Z in /proc/PID/stat while
# another thread (the ioctl set-up's DO_IT thread, blocked in the kernel) still runs.
gone() {
    local t s
    [[ -d /proc/$1 ]] || return 0
    for t in /proc/"$1"/task/*/stat; do
        read -r s 2>/dev/null <"$t" || continue
        s=${s##*) }
        [[ ${s%% *} == Z ]] || return 1
    done
    return 0
}

# wait_gone PID SECONDS: waits for PID to end (status 1 if it is still running then).
wait_gone() {
    local i
    for i in $(seq $(($2 * 10))); do
        gone "$1" && return 0
        sleep 0.1
    done
    return 1
}

# meta_load DIR: creates, renames, unlinks and fsyncs small files until $WORK/stop_meta exists
# or 20 operations failed; keeps how many failed in $WORK/meta.errors.
meta_load() {
    local d=$1 i=0 errs=0 sub
    echo 0 >"$WORK/meta.errors"
    mkdir -p "$d" || errs=1
    while [[ ! -e $WORK/stop_meta ]] && ((errs < 20)); do
        i=$((i + 1))
        sub=$d/$((i % 8))
        {
            mkdir -p "$sub" &&
                echo "file $i" >"$sub/new$i" &&
                mv "$sub/new$i" "$sub/f$i" &&
                if ((i % 4 == 0)); then dd if=/dev/zero of="$sub/big$i" bs=16k count=4 conv=fsync status=none; else true; fi &&
                if ((i > 6)); then rm -f "$d/$(((i - 6) % 8))/f$((i - 6))" "$d/$(((i - 6) % 8))/big$((i - 6))"; else true; fi
        } 2>/dev/null || { errs=$((errs + 1)); echo "$errs" >"$WORK/meta.errors"; }
    done
    echo "meta_load: $i rounds, $errs failed" >&2
}

LOAD_PIDS=()
# start_loads: the data and metadata workloads on $MNT, in the background.
start_loads() {
    rm -f "$WORK/stop_meta" "$WORK/meta.errors"
    fio --name=buffered --directory="$MNT" --numjobs=2 --size=16M --rw=randwrite --bsrange=4k-64k \
        --ioengine=psync --fsync=16 --time_based --runtime=600 --group_reporting \
        --name=direct --directory="$MNT" --size=16M --rw=randrw --bs=4k --ioengine=libaio \
        --direct=1 --iodepth=16 --time_based --runtime=600 >"$WORK/load.fio" 2>&1 &
    LOAD_PIDS=($!)
    meta_load "$MNT/meta" &
    LOAD_PIDS+=($!)
}

# stop_loads [SECONDS]: stops the workloads (fio with SIGINT, the loop by its stop file), kills
# what is left after SECONDS (default 30) and fails if a workload cannot be killed.
stop_loads() {
    local p ok=0
    touch "$WORK/stop_meta"
    # A workload that already ended may be reaped already: kill fails then, harmlessly.
    for p in "${LOAD_PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    for p in "${LOAD_PIDS[@]}"; do
        wait_gone "$p" "${1:-30}" && continue
        echo "workload $p ($(cat "/proc/$p/comm" 2>/dev/null), $(cat "/proc/$p/wchan" 2>/dev/null)) did not stop within ${1:-30} s: SIGKILL"
        kill -KILL "$p" 2>/dev/null || true
        if ! wait_gone "$p" 10; then
            echo "workload $p cannot be killed"
            ok=1
        fi
    done
    for p in "${LOAD_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    LOAD_PIDS=()
    return "$ok"
}

# reserve ARGS...: `userblk serve ARGS... --nbd $NBD --reattach`, waiting until it has reattached.
reserve() {
    "$USERBLK_BIN" serve "$@" --nbd "$NBD" --reattach >"$WORK/serve.out" 2>&1 &
    SERVE_PID=$!
    local i
    for i in $(seq 200); do
        grep -q '^userblk: reattached' "$WORK/serve.out" && return 0
        gone "$SERVE_PID" && { cat "$WORK/serve.out"; echo "the reattaching server exited"; return 1; }
        sleep 0.1
    done
    cat "$WORK/serve.out"
    echo "no reattach within 20 s"
    return 1
}

# kill_server: SIGKILL, and the process must be gone within 60 s (the ioctl deadlock kept it for
# good; now the kernel's send timeout, 30 s, ends it). Prints how long it took.
kill_server() {
    local t0=$SECONDS
    kill -KILL "$SERVE_PID"
    if wait_gone "$SERVE_PID" 60; then
        echo "server gone $((SECONDS - t0)) s after SIGKILL"
    else
        echo "the server (pid $SERVE_PID) did not exit within 60 s of SIGKILL:"
        cat "/proc/$SERVE_PID/status" 2>/dev/null | head -5
        for t in /proc/"$SERVE_PID"/task/*; do echo "${t##*/} $(cat "$t/comm") $(cat "$t/wchan")"; cat "$t/stack" 2>/dev/null; done
        # cleanup would wait for it forever.
        SERVE_PID=
        return 1
    fi
    wait "$SERVE_PID" 2>/dev/null || true
    SERVE_PID=
}

# free_nbd: a test before may have left $NBD connected (a failure's clean-up races udev): free it.
free_nbd() {
    [[ $(nbd_size "$NBD") == 0 ]] && return 0
    echo "$NBD was left connected: userblk disconnect"
    "$USERBLK_BIN" disconnect "$NBD"
    assert_free
}

io_errors() { dmesg | grep -cE 'I/O error|EXT4-fs error|Buffer I/O' || true; }

t_reattach() {
    trap 'stop_loads 5; cleanup' EXIT
    local img=$WORK/reattach.img opts=(--timeout 10 --dead-conn-timeout 60)
    rm -f "$img"
    truncate -s 256M "$img"
    free_nbd
    serve "file:$img" "${opts[@]}"
    mkfs.ext4 -q -F "$NBD"
    mount "$NBD" "$MNT"
    local errors_before
    errors_before=$(io_errors)
    # Rate-limited so that the kill lands in the write phase; the verify reads it all back.
    fio --name=verify --filename="$MNT/verify.dat" --size=48M --ioengine=libaio --direct=1 \
        --rw=randwrite --bs=4k --iodepth=16 --rate=6m --verify=crc32c --verify_fatal=1 \
        --do_verify=1 --output="$WORK/fio.out" &
    local fio=$!
    LOAD_PIDS=("$fio")
    sleep 3
    gone "$fio" && { cat "$WORK/fio.out"; echo "fio ended before the kill"; return 1; }
    kill_server
    echo "killed the server; fio waits"
    sleep 2
    gone "$fio" && { cat "$WORK/fio.out"; echo "fio ended while the server was dead"; return 1; }
    reserve "file:$img" "${opts[@]}"
    cat "$WORK/serve.out"
    local rc=0
    wait "$fio" || rc=$?
    LOAD_PIDS=()
    cat "$WORK/fio.out"
    ((rc == 0)) || { echo "fio failed with status $rc"; return 1; }
    grep -q 'err= 0' "$WORK/fio.out"
    if grep -qi 'verify.*fail\|bad magic\|crc32c.*mismatch' "$WORK/fio.out"; then
        echo "fio found corrupt data"
        return 1
    fi
    dmesg | grep -E 'nbd0|reconnected' | tail -n 8
    local errors_after
    errors_after=$(io_errors)
    ((errors_after == errors_before)) || { dmesg | grep -E 'I/O error|EXT4-fs error' | tail; echo "the kernel logged I/O errors"; return 1; }
    # The kernel's pid attribute still names the killed server; the reattached one is known as
    # the device's server all the same: disconnect refuses it, serve calls the device busy.
    if "$USERBLK_BIN" disconnect "$NBD" >"$WORK/disc.out" 2>&1; then
        cat "$WORK/disc.out"; echo "disconnect took the device from its reattached server"; return 1
    fi
    cat "$WORK/disc.out"
    grep -q "served by a running process (pid $SERVE_PID)" "$WORK/disc.out"
    if "$USERBLK_BIN" serve "file:$img" --nbd "$NBD" >"$WORK/busy.out" 2>&1; then
        echo "a second server attached to a served device"; return 1
    fi
    cat "$WORK/busy.out"
    ! grep -q "held by a server that is gone" "$WORK/busy.out"
    umount "$MNT"
    fsck.ext4 -fn "$NBD"
    stop_serve INT
    assert_free
}

# kill_loop SETUP: see the header.
kill_loop() {
    trap 'stop_loads 5; cleanup' EXIT
    local setup=$1 img=$WORK/kill-$1.img i opts
    rm -f "$img"
    truncate -s 256M "$img"
    mkfs.ext4 -q -F "$img"
    free_nbd
    for i in $(seq "$KILL_ITERATIONS"); do
        case $setup in
            netlink) if ((i == 1)); then opts=(); else opts=(--timeout 5 --dead-conn-timeout 15); fi ;;
            ioctl) opts=(--timeout 0) ;;
        esac
        echo "== iteration $i ($setup ${opts[*]:-defaults})"
        serve "file:$img" --setup "$setup" "${opts[@]}"
        grep -q "set up by $setup" "$WORK/serve.out" || { cat "$WORK/serve.out"; return 1; }
        mount "$NBD" "$MNT"
        start_loads
        sleep 4
        local timed_out
        timed_out=$(dmesg | grep -cE 'Send (control|data) failed \(result -11\)' || true)
        kill_server
        local started=$SECONDS
        if (($(dmesg | grep -cE 'Send (control|data) failed \(result -11\)' || true) > timed_out)); then
            echo "a sender blocked on a full socket timed out (where DO_IT used to deadlock)"
        fi
        if [[ $setup == netlink ]] && ((i % 2 == 0)); then
            sleep 1
            reserve "file:$img" "${opts[@]}"
            sleep 3
            # An fsync waits for the journal to write back what fio dirtied: slow under TCG.
            stop_loads 90
            local errs
            errs=$(cat "$WORK/meta.errors" 2>/dev/null || echo missing)
            [[ $errs == 0 ]] || { tail "$WORK/load.fio"; echo "the metadata workload saw $errs errors across the reattach"; return 1; }
            if grep -qE 'err= *[1-9]' "$WORK/load.fio" || ! grep -q 'err= 0' "$WORK/load.fio"; then
                cat "$WORK/load.fio"; echo "fio saw an error across the reattach"; return 1
            fi
            umount "$MNT"
            stop_serve INT >/dev/null
            assert_free
            echo "reattached; workloads saw no error; device freed by the reattached server"
        else
            # Bounded failure: every workload ends (or can be killed) in time.
            stop_loads 90
            echo "workloads ended $((SECONDS - started)) s after the kill"
            umount "$MNT" || umount -l "$MNT"
            if [[ $setup == netlink ]]; then
                # The device outlives its server: serve says so and names the way out.
                if "$USERBLK_BIN" serve "file:$img" --nbd "$NBD" >"$WORK/busy.out" 2>&1; then
                    echo "serve attached to an orphaned device"; return 1
                fi
                cat "$WORK/busy.out"
                grep -q "userblk disconnect $NBD" "$WORK/busy.out"
                "$USERBLK_BIN" disconnect "$NBD"
            fi
            assert_free
        fi
        no_d_state 20
        # What the kill left on the file system: the journal replays, fsck repairs the rest.
        fsck.ext4 -fy "$img" >/dev/null 2>&1 || true
        fsck.ext4 -fn "$img" >/dev/null
    done
    # Served again by userblk alone, and the file system is sound.
    serve "file:$img" --setup "$setup"
    mount "$NBD" "$MNT"
    echo again >"$MNT/again"
    sync
    umount "$MNT"
    fsck.ext4 -fn "$NBD"
    stop_serve INT
    assert_free
    echo "$KILL_ITERATIONS kills with $setup set-up: no wedge"
}

t_kill_netlink() { kill_loop netlink; }
t_kill_ioctl() { kill_loop ioctl; }

WORKLOADS+=(reattach kill_netlink kill_ioctl)
