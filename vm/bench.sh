#!/usr/bin/env bash
# vm/bench.sh - the VM benchmark: boots one kernel under QEMU (`userblk vm`, TCG) and runs fio
# (libaio, O_DIRECT, time-based) in the guest, every target in the same boot:
#   userblk-1c, userblk-2c   `userblk serve ram:SIZE` on /dev/nbd0 (1 connection), /dev/nbd1 (2)
#   nbdkit                   nbdkit's memory plugin over a Unix socket, attached by nbd-client
#   sequential               examples/sequential_server (vblk-shaped, one request at a time)
#   ublk-1q, ublk-2q         `userblk serve ram:SIZE --transport ublk --queues 1|2` (/dev/ublkbN);
#                            reported as SKIP, with the reason, on a kernel without ublk_drv (6.1)
#   brd, null_blk            the kernel's own RAM disks (null_blk multi-queue, memory-backed), the
#                            ceilings
#   remote-sync, remote-async  examples/remote_disk on /dev/nbd5 (storage behind a socket, 1 ms per
#                            request) behind the sync trait (--blocking) and as an async device
#   remote-ublk-sync, remote-ublk-async, remote-ublk-serial  the same example through ublk
#                            (/dev/ublkbN): 16 workers a queue behind the sync trait, tasks, or one
#                            worker (a queue's requests one at a time: the old queue loop's bound)
#   (profiling) ublk-1q-plain, ublk-1q-coop  ublk-1q with the queue ring set up without
#                            DEFER_TASKRUN + SINGLE_ISSUER (COOP_TASKRUN alone, or no flag)
# Workloads: 4 KiB randread and randwrite at QD 32 and QD 1, 1 MiB sequential read and write at
# QD 8, after a prefill of the whole device; the remote disk: 4 KiB randread at QD 1, 32, 128.
# Prints a table, each of ours against nbdkit, sequential, brd and null_blk (ublk also against
# userblk-1c), the performance targets with MET / NOT MET (issue 9: ublk >= 0.5x brd and >= 1.5x
# userblk-1c on 4 KiB randread QD32, >= 2x nbdkit on 1 MiB reads; a missed target is reported, it
# does not fail the run), `async/sync at QD128: N.NNx` for the remote disk (issue 12: the same
# direction as `cargo bench --bench remote`), and the peak RSS of each server.
# Under TCG absolute numbers are slow and noisy: the ratios are the result.
#
# Usage: vm/bench.sh [--kernel 6.1|6.12|VMLINUZ] [--runtime SECONDS] [--ramp SECONDS]
#                    [--size SIZE] [--targets "NAME..."] [--no-setup] [--keep]
#   --kernel    kernel series or image (default 6.1)
#   --runtime   seconds measured per workload (default 10); --ramp: seconds before (default 2)
#   --size      size of every RAM disk, with K/M/G suffix (default 256M)
#   --targets   a subset, e.g. "ublk-1q userblk-1c brd" (default: all ten above); for profiling
#               also nbdkit-2c (2 connections) and ramdisk-wW-cC (examples/bench_ramdisk: W
#               server workers, C connections), e.g. --targets "ramdisk-w0-c1 ramdisk-w4-c1 nbdkit"
#   --no-setup  don't run `userblk vm setup` first; --keep: keep the results directory
# Environment: VM_MEMORY (default 2G, more for big --size), VM_CPUS (default 2), WORKLOADS (the
# RAM disks' workloads, e.g. "randread-4k seqread-1m"; see vm/bench-guest.sh).
# Only one VM at a time on this machine: it waits for /run/lock/userblk-vm.lock, as vm/run.sh.
# The whole bench at --runtime 4 --ramp 1 --size 128M took one 13-minute boot on 6.12 under TCG
# (host load 1.5-6); WORKLOADS="randread-4k seqread-1m" about halves it.
# Needs root. Exit status 1 if a target failed to come up or a fio run failed (not for a SKIP).
set -euo pipefail

VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$VM_DIR")

kernel=6.1
runtime=10
ramp=2
size=256M
targets=
setup=1
keep=0
while (($#)); do
    case $1 in
        --kernel) kernel=${2:?--kernel needs a series (6.1, 6.12) or an image path}; shift 2 ;;
        --runtime) runtime=${2:?--runtime needs seconds}; shift 2 ;;
        --ramp) ramp=${2:?--ramp needs seconds}; shift 2 ;;
        --size) size=${2:?--size needs a size such as 256M}; shift 2 ;;
        --targets) targets=${2:?--targets needs names}; shift 2 ;;
        --no-setup) setup=0; shift ;;
        --keep) keep=1; shift ;;
        -h|--help) sed -n '2,38p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "vm/bench.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ $runtime =~ ^[1-9][0-9]*$ ]] || { echo "vm/bench.sh: --runtime must be a positive integer" >&2; exit 2; }
[[ $ramp =~ ^[0-9]+$ ]] || { echo "vm/bench.sh: --ramp must be an integer" >&2; exit 2; }
if [[ $size =~ ^([0-9]+)([KkMmGg]?)$ ]]; then
    case ${BASH_REMATCH[2]} in
        K|k) size_bytes=$((BASH_REMATCH[1] << 10)) ;;
        M|m) size_bytes=$((BASH_REMATCH[1] << 20)) ;;
        G|g) size_bytes=$((BASH_REMATCH[1] << 30)) ;;
        *) size_bytes=${BASH_REMATCH[1]} ;;
    esac
else
    echo "vm/bench.sh: --size: expected a number with an optional K, M or G suffix, got $size" >&2
    exit 2
fi
if ((size_bytes < (16 << 20) || size_bytes % (1 << 20))); then
    echo "vm/bench.sh: --size must be a whole number of MiB, at least 16M" >&2
    exit 2
fi

if ((EUID != 0)); then
    echo "vm/bench.sh: needs root (it installs QEMU, kernels and virtme-ng, and boots VMs); run it with sudo" >&2
    exit 2
fi
echo "== building on the host (the guest runs these binaries from the host's file system)"
cd "$ROOT"
# BENCH_TARGET_DIR: build elsewhere than target/ (e.g. not to contend with other builds).
export CARGO_TARGET_DIR="${BENCH_TARGET_DIR:-$ROOT/target}"
cargo build --release --quiet -p userblk-harness --bin userblk
cargo build --release --quiet -p userblk --example sequential_server --example bench_ramdisk \
    --example remote_disk
bin=$CARGO_TARGET_DIR/release/userblk
examples=$CARGO_TARGET_DIR/release/examples
[[ -x $bin && -x $examples/sequential_server && -x $examples/remote_disk ]] || { echo "vm/bench.sh: build produced no binaries" >&2; exit 1; }
if ((setup)); then
    "$bin" vm setup
fi

# Guest memory: two copies of the device may be resident at once (a server's RAM disk and the
# page cache or brd being freed), plus the guest itself.
size_mib=$((size_bytes >> 20))
if [[ -z ${VM_MEMORY:-} ]]; then
    mem_mib=$((size_mib * 3 + 1024))
    ((mem_mib < 2048)) && mem_mib=2048
    export VM_MEMORY="${mem_mib}M"
fi
ntargets=10
if [[ -n $targets ]]; then ntargets=$(wc -w <<<"$targets"); fi
nworkloads=6
if [[ -n ${WORKLOADS:-} ]]; then nworkloads=$(wc -w <<<"$WORKLOADS"); fi
# Per target: set-up, prefill (TCG: ~100 MB/s), each workload (ramp + runtime + fio start), teardown.
VM_TIMEOUT=$((180 + ntargets * (90 + size_mib / 20 + nworkloads * (runtime + ramp + 15))))

# One VM at a time on this machine (the same lock as vm/run.sh): a second run waits here.
exec 9>/run/lock/userblk-vm.lock
if ! flock -n 9; then
    echo "== another VM is running (vm/run.sh or vm/bench.sh); waiting for it"
    flock 9
fi
results=$(mktemp -d /tmp/userblk-bench.XXXXXX)
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
# Another VM on the same host takes the CPUs our vCPUs need: say so next to the figures.
others=$(pgrep -c qemu-system-x86 || true)
if ((others > 0)); then
    echo "vm/bench.sh: warning: $others other QEMU process(es) running on this host: the figures will be skewed" >&2
fi
echo "== kernel $kernel: ${VM_CPUS:-2} vCPUs, $VM_MEMORY, TCG; ${runtime}s per workload after ${ramp}s ramp, $size devices"
echo "   host: $(nproc) CPUs, load average $load_before; up to ${VM_TIMEOUT}s; results in $results"
guest_env=(USERBLK_BIN="$bin" USERBLK_EXAMPLES="$examples" RESULTS="$results"
    RUNTIME="$runtime" RAMP="$ramp" SIZE_BYTES="$size_bytes")
if [[ -n $targets ]]; then guest_env+=(TARGETS="$targets"); fi
if [[ -n ${WORKLOADS:-} ]]; then guest_env+=(WORKLOADS="$WORKLOADS"); fi
# Host load while the VM runs: TCG vCPUs compete with whatever else the host runs (the second
# column counts QEMU processes, ours included: more than 1 means another VM overlapped).
(
    while :; do
        printf '%s %s %s\n' "$(date +%T)" "$(cut -d' ' -f1 /proc/loadavg)" "$(pgrep -c qemu-system-x86 || true)"
        sleep 10
    done
) >"$results/host-load.log" 2>/dev/null &
sampler=$!
trap 'kill "$sampler" 2>/dev/null || true' EXIT
t0=$SECONDS
set +e
# TCG always: the figures compare with earlier runs only under the same emulation.
"$bin" vm --kernel "$kernel" --kvm off --memory "$VM_MEMORY" --cpus "${VM_CPUS:-2}" \
    --timeout "$VM_TIMEOUT" --keep-log "$results/boot" --rwdir "$results" -- \
    env "${guest_env[@]}" bash "$VM_DIR/bench-guest.sh"
rc=$?
# The release of the kernel that ran: the directory userblk vm kept its logs in.
kver=$(basename "$(find "$results/boot" -mindepth 1 -maxdepth 1 -type d | head -n1)")
set -e
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
kill "$sampler" 2>/dev/null || true
wait "$sampler" 2>/dev/null || true
echo "== VM finished in $((SECONDS - t0))s (status $rc); host load average before $load_before, after $load_after"

status=0
if [[ ! -s $results/targets ]]; then
    echo "vm/bench.sh: the VM did not run the benchmark (userblk vm status $rc); console log: $results/boot/$kver/console.log" >&2
    status=1
fi
if grep -q ' FAIL ' "$results/targets" 2>/dev/null; then
    status=1
    grep ' FAIL ' "$results/targets" | while read -r name _; do
        echo "--- $name failed; last lines of its log:"
        tail -n 15 "$results/logs/$name.log" 2>/dev/null || true
    done
fi

python3 - "$results" "$kver" "$runtime" "$ramp" "$size_bytes" "$load_before" "$load_after" \
    <<'PY' | tee "$results/report.txt"
import json, os, sys

res, kver, runtime, ramp, size, load0, load1 = sys.argv[1:]
size = int(size)
# (workload, fio direction, header); the remote targets run only the randread-4k ones.
W = [("randread-4k", "read", "randread 4K QD32"), ("randwrite-4k", "write", "randwrite 4K QD32"),
     ("seqread-1m", "read", "read 1M QD8"), ("seqwrite-1m", "write", "write 1M QD8"),
     ("randread-4k-qd1", "read", "randread 4K QD1"), ("randwrite-4k-qd1", "write", "randwrite 4K QD1")]
RW = [("randread-4k-qd1", "read", "QD1"), ("randread-4k", "read", "QD32"),
      ("randread-4k-qd128", "read", "QD128")]
status = {}
try:
    for line in open(os.path.join(res, "targets")):
        name, _, rest = line.strip().partition(" ")
        status[name] = rest
except FileNotFoundError:
    pass
T = [t for t in status if not t.startswith("remote-")]
REMOTE = [t for t in status if t.startswith("remote-")]
OURS = [t for t in T if t.startswith(("userblk", "ramdisk", "ublk"))]
UBLK = [t for t in T if t.startswith("ublk")]
REMOTE_UBLK = [t for t in REMOTE if t.startswith("remote-ublk-")]
REMOTE = [t for t in REMOTE if t not in REMOTE_UBLK] + REMOTE_UBLK
NBD_OURS = [t for t in OURS if not t.startswith("ublk")]

def load(t, w):
    try:
        j = json.load(open(os.path.join(res, t, w + ".json")))
    except (OSError, ValueError):
        return None
    return j["jobs"][0]

def metric(t, w, d):
    job = load(t, w)
    if job is None:
        return None
    s = job[d]
    return {"iops": s["iops"], "bw": s["bw_bytes"], "lat": s["lat_ns"]["mean"] / 1e3}

def cpu(t, w):
    try:
        kv = dict(l.strip().split("=", 1) for l in open(os.path.join(res, t, w + ".cpu")) if "=" in l)
    except OSError:
        return None
    tck = int(kv["clk_tck"])
    busy, idle = int(kv["guest_busy"]), int(kv["guest_idle"])
    # Server time over the measured seconds (it works only while fio does I/O).
    return {"server": int(kv["server_ticks"]) / tck / int(runtime) * 100,
            "guest": busy / max(1, busy + idle) * 100}

M = {(t, w): metric(t, w, d) for t in status for (w, d, _) in W + RW}
KERNEL = ("brd", "null_blk")

def fmt_iops(x):
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"

def cell(t, w):
    m = M[(t, w)]
    if m is None:
        st = status.get(t, "")
        return "FAILED" if st.startswith("FAIL") else "skipped" if st.startswith("SKIP") else "-"
    if "-4k" in w:
        return f"{fmt_iops(m['iops'])} IOPS"
    return f"{m['bw'] / 1e6:.0f} MB/s"

print(f"\nkernel {kver}, TCG; {runtime} s per workload after {ramp} s ramp; {size >> 20} MiB devices; "
      f"host load average {load0} -> {load1}")
try:
    samples = [l.split() for l in open(os.path.join(res, "host-load.log")) if len(l.split()) == 3]
except OSError:
    samples = []
if samples:
    loads = [float(s[1]) for s in samples]
    vms = max(int(s[2]) for s in samples)
    print(f"host 1-min load during the VM run: min {min(loads):.1f}, mean {sum(loads) / len(loads):.1f}, "
          f"max {max(loads):.1f} ({len(loads)} samples)"
          + (f"; WARNING: up to {vms - 1} other VM(s) ran at the same time" if vms > 1 else ""))
cw = 19
tw = max([12] + [len(t) + 1 for t in status])
if T:
    print("\n" + "target".ljust(tw) + "".join(h.rjust(cw) for _, _, h in W))
    for t in T:
        print(t.ljust(tw) + "".join(cell(t, w).rjust(cw) for w, _, _ in W))

    print("\nmean latency (us) | server CPU (% of one vCPU) | guest CPU busy (% of all vCPUs)")
    print("target".ljust(tw) + "".join(h.rjust(cw + 3) for _, _, h in W))
    for t in T:
        cells = []
        for w, _, _ in W:
            m, c = M[(t, w)], cpu(t, w)
            if m is None or c is None:
                cells.append("-")
            else:
                srv = f"{c['server']:.0f}%" if t not in KERNEL else "-"
                cells.append(f"{m['lat']:.0f} | {srv} | {c['guest']:.0f}%")
        print(t.ljust(tw) + "".join(x.rjust(cw + 3) for x in cells))

def ratio(a, b, w):
    ma, mb = M.get((a, w)), M.get((b, w))
    if ma is None or mb is None or mb["bw"] == 0:
        return None
    return ma["bw"] / mb["bw"]

if OURS:
    print("\nratios (throughput, same boot)")
    for a in OURS:
        for b in ("userblk-1c", "nbdkit", "nbdkit-2c", "sequential", "brd", "null_blk"):
            if b not in status or b == a or (b == "userblk-1c" and not a.startswith("ublk")):
                continue
            cells = [ratio(a, b, w) for w, _, _ in W]
            if all(r is None for r in cells):
                continue
            print(f"{a}/{b}".ljust(tw + 10) + "".join(("-" if r is None else f"{r:.2f}x").rjust(cw) for r in cells))

print("\ntargets (ratios of throughput in this boot; a missed target is a finding, not a failure)")
goals = [(UBLK, "brd", "randread-4k", 0.5, "issue 9"), (UBLK, "userblk-1c", "randread-4k", 1.5, "issue 9"),
         (UBLK, "nbdkit", "seqread-1m", 2.0, "issue 9"),
         (NBD_OURS, "nbdkit", "randread-4k", 2.0, "NBD"), (NBD_OURS, "nbdkit", "seqread-1m", 2.0, "NBD"),
         (NBD_OURS, "sequential", "randread-4k", 1.5, "NBD"), (NBD_OURS, "sequential", "seqread-1m", 1.5, "NBD")]
for ours, b, w, need, why in goals:
    hdr = dict((x, h) for x, _, h in W)[w]
    parts = []
    for a in ours:
        r = ratio(a, b, w)
        if r is not None:
            parts.append(f"{a} {r:.2f}x {'MET' if r >= need else 'NOT MET'}")
    if ours or why == "issue 9":
        kind = "ublk" if why == "issue 9" else "userblk (NBD)"
        print(f"  {kind} >= {need}x {b} on {hdr}: " + ("; ".join(parts) if parts else "not measured"))

if REMOTE:
    print(f"\nremote disk (examples/remote_disk; remote-*: NBD, 1 connection; remote-ublk-*: ublk, 1 queue), "
          f"4 KiB randread: IOPS (mean latency)")
    print("target".ljust(tw) + "".join(h.rjust(cw) for _, _, h in RW))
    for t in REMOTE:
        cells = []
        for w, _, _ in RW:
            m = M[(t, w)]
            cells.append(cell(t, w) if m is None else f"{m['iops']:.0f} ({m['lat'] / 1000:.1f} ms)")
        print(t.ljust(tw) + "".join(x.rjust(cw) for x in cells))
    for w, _, h in RW:
        r = ratio("remote-async", "remote-sync", w)
        if r is not None:
            print(f"async/sync at {h}: {r:.2f}x")
    r = ratio("remote-async", "remote-sync", "randread-4k-qd128")
    if r is not None:
        print(f"  issue 12, the kernel in the same direction as the loopback (async faster at QD128): "
              f"{'MET' if r > 1 else 'NOT MET'}")
    for a, b in (("remote-ublk-async", "remote-ublk-sync"), ("remote-ublk-sync", "remote-ublk-serial"),
                 ("remote-ublk-async", "remote-ublk-serial"), ("remote-ublk-async", "remote-async"),
                 ("remote-ublk-sync", "remote-sync")):
        cells = [(h, ratio(a, b, w)) for w, _, h in RW]
        if any(r is not None for _, r in cells):
            print(f"{a}/{b}: " + ", ".join(f"{h} {r:.2f}x" for h, r in cells if r is not None))
    r = ratio("remote-ublk-async", "remote-ublk-serial", "randread-4k")
    if r is not None:
        print(f"  ublk queue serves requests together (remote-ublk-async >= 4x one at a time at QD32): "
              f"{'MET' if r >= 4 else 'NOT MET'}")

limit = (size >> 10) + 64 * 1024
for t in status:
    try:
        kv = dict(l.split(":", 1) for l in open(os.path.join(res, t, "hwm")))
    except OSError:
        continue
    hwm = int(kv["VmHWM"].split()[0])
    line = f"  peak RSS (VmHWM) of {t}: {hwm / 1024:.1f} MiB"
    if t in OURS:
        line += f" (limit {limit // 1024} MiB: {'MET' if hwm <= limit else 'NOT MET'})"
    print(line)
for t, s in status.items():
    if s.startswith(("FAIL", "SKIP")):
        print(f"  {t}: {s}")
PY

if ((keep || status)); then
    echo "results and logs: $results"
else
    rm -rf "$results"
fi
exit "$status"
