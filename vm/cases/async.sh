# vm/cases/async.sh - sourced by vm/guest.sh: the async example device (examples/remote_disk, storage
# behind a socket with 1 ms of latency per request, served as tasks) on a real /dev/nbd0.

# start_remote [ARGS...]: the example on $NBD, until stop_serve.
start_remote() {
    [[ $(nbd_size "$NBD") == 0 ]] || { echo "$NBD is already connected"; return 1; }
    "$USERBLK_EXAMPLES/remote_disk" --nbd "$NBD" "$@" >"$WORK/serve.out" 2>&1 &
    SERVE_PID=$!
    wait_connected "$NBD"
}

t_async_remote_disk() {
    start_remote
    fs_roundtrip
    stop_serve INT
    assert_free
}

# Random 4 KiB reads at queue depth 128 behind the sync trait and as an async device: figures
# printed for the log (the guest has no timing assertions).
t_async_remote_disk_randread() {
    command -v fio >/dev/null || { echo "no fio in the guest"; return 0; }
    local mode iops=()
    for mode in --blocking ""; do
        # shellcheck disable=SC2086
        start_remote $mode
        fio --name=randread --filename="$NBD" --rw=randread --bs=4k --iodepth=128 --direct=1 \
            --ioengine=libaio --runtime=5 --time_based --size=128M --output-format=terse \
            --terse-version=3 >"$WORK/fio.out"
        iops+=("$(cut -d';' -f8 "$WORK/fio.out")")
        stop_serve INT
        assert_free
    done
    echo "remote disk on $NBD, 4 KiB randread QD128: sync trait ${iops[0]} IOPS, async ${iops[1]} IOPS"
    python3 -c "print('async/sync: %.2fx' % (${iops[1]} / max(${iops[0]}, 1)))"
}

WORKLOADS+=(async_remote_disk async_remote_disk_randread)
