#!/usr/bin/env bash
# scripts/vm-overhead.sh - what booting through `userblk vm` costs against the shell scripts it
# replaced (issue 11: "total CI time does not grow"), for the same work on the same machine.
#
# A: the old boot path, vm/lib.sh's vm_boot as it was before `userblk vm` (commit 7183e08^), taken
#    from git into a temporary directory (TCG: its default, VM_KVM=0).
# B: `userblk vm --kernel K -- CMD`, as vm/run.sh calls it (default --kvm auto).
# Each on each kernel, with the same QEMU, virtme-ng and kernels (no set-up step), for each
# workload:
#   true   the trivial command: a boot and nothing else
#   mkfs   vm/guest.sh with only its mkfs_ramdisk case (modprobe nbd, `userblk serve ram:64M`,
#          mkfs.ext4, a file round trip, fsck, stop): a short real workload
# RUNS rounds, interleaved (round 1: A B, round 2: B A, ...), one VM at a time (each boot takes
# /run/lock/userblk-vm.lock, as vm/run.sh does; time spent waiting for it is not counted).
# Prints every boot's wall time, CPU time (user + system of the boot's processes, QEMU's TCG
# threads above all) and host time (the wall time less the guest's uptime at power-off: what the
# tool, vng and QEMU's start add), then per kernel and workload the medians of A and B and B/A.
# On a machine that other work shares, wall time follows the load: interleaving spreads it over
# A and B alike, and CPU and host time show less of it.
#
# Usage: scripts/vm-overhead.sh [--runs N] [--kernel SERIES]... [--workload true|mkfs]... [--keep]
#   defaults: --runs 3, both 6.1 and 6.12, both workloads; --keep: keep each boot's output and
#   console log (A: DIR/vm-console.log, B: DIR/RELEASE/console.log). Needs root and the VM tools
#   (`userblk vm setup`); builds the release binaries first (not timed). Exit status 1 if a
#   boot failed (its time is still printed, marked FAILED).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OLD_COMMIT=7183e08^

runs=3
keep=0
kernels=()
workloads=()
while (($#)); do
    case $1 in
        --runs) runs=${2:?--runs needs a number}; shift 2 ;;
        --kernel) kernels+=("${2:?--kernel needs a series}"); shift 2 ;;
        --workload) workloads+=("${2:?--workload needs true or mkfs}"); shift 2 ;;
        --keep) keep=1; shift ;;
        -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "vm-overhead.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
((${#kernels[@]})) || kernels=(6.1 6.12)
((${#workloads[@]})) || workloads=(true mkfs)
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "vm-overhead.sh: --runs needs a positive number" >&2; exit 2; }
for w in "${workloads[@]}"; do
    [[ $w == true || $w == mkfs ]] || { echo "vm-overhead.sh: unknown workload $w (true, mkfs)" >&2; exit 2; }
done
((EUID == 0)) || { echo "vm-overhead.sh: needs root (boots VMs)" >&2; exit 2; }

cd "$ROOT"
tmp=$(mktemp -d /tmp/vm-overhead.XXXXXX)
trap '((keep)) || rm -rf "$tmp"' EXIT
if ! git show "$OLD_COMMIT:vm/lib.sh" >"$tmp/lib.sh" 2>/dev/null; then
    echo "vm-overhead.sh: cannot read vm/lib.sh at $OLD_COMMIT (needs the git history)" >&2
    exit 2
fi
# shellcheck source=/dev/null
source "$tmp/lib.sh"
vm_ready

echo "== building the release binaries (not timed)"
export CARGO_TARGET_DIR="$ROOT/target"
cargo build --release -p userblk-harness --bin userblk --quiet
USERBLK=$CARGO_TARGET_DIR/release/userblk

# kimg SERIES: the image the old scripts pick for SERIES (`userblk vm` picks the same one).
kimg() { vm_kernels "$1" | awk 'NR == 1 { print $2 }'; }

# workload_cmd WORKLOAD RESULTS: the command, as an argv, in the array `cmd`.
workload_cmd() {
    case $1 in
        true) cmd=(true) ;;
        mkfs) cmd=(env USERBLK_BIN="$USERBLK" USERBLK_EXAMPLES="$CARGO_TARGET_DIR/release/examples"
            USERBLK_KERNEL_TESTS=/bin/false USERBLK_VM_ONLY='^mkfs_ramdisk$' RESULTS="$2"
            bash "$ROOT/vm/guest.sh") ;;
    esac
}

# boot TOOL SERIES WORKLOAD: one timed boot; prints "WALL CPU GUEST" (seconds; CPU: user + system
# of every process of the boot, QEMU included; GUEST: the guest's uptime at power-off); status
# of the boot.
boot() {
    local tool=$1 series=$2 workload=$3 dir rc t
    dir=$(mktemp -d "$tmp/$tool-$series-$workload.XXXX")
    workload_cmd "$workload" "$dir/results"
    exec 9>/run/lock/userblk-vm.lock
    flock 9
    local TIMEFORMAT='%3R %3U %3S'
    set +e
    if [[ $tool == A ]]; then
        { time vm_boot "$(kimg "$series")" "$dir" "${cmd[@]}" >"$dir/out" 2>&1; } 2>"$dir/time"
    else
        { time "$USERBLK" vm --kernel "$series" --rwdir "$dir" --keep-log "$dir" -- "${cmd[@]}" >"$dir/out" 2>&1; } 2>"$dir/time"
    fi
    rc=$?
    set -e
    exec 9>&-
    if ((rc == 0)) && [[ $workload == mkfs ]] && ! grep -q '^PASS mkfs_ramdisk$' "$dir/results/results" 2>/dev/null; then
        rc=1
    fi
    if ((rc != 0)); then
        echo "boot $tool $series $workload failed (status $rc); last lines:" >&2
        tail -n 15 "$dir/out" >&2
    fi
    read -r -a t <"$dir/time"
    # The guest kernel's clock when it powered off: how long the guest lived. The rest of the
    # wall time is the host's (vng, QEMU's start, the tool itself).
    local g
    g=$(cat "$dir"/vm-console.log "$dir"/*/console.log 2>/dev/null |
        sed -n 's/^\[ *\([0-9.]*\)\] reboot: Power down.*/\1/p' | tail -n 1)
    awk -v r="${t[0]}" -v u="${t[1]}" -v s="${t[2]}" -v g="${g:-0}" \
        'BEGIN { printf "%.1f %.1f %.1f\n", r, u + s, g }'
    return "$rc"
}

declare -A wall=() cpu=() host=()
status=0
echo "== $runs rounds; A = old vm/lib.sh ($OLD_COMMIT), B = userblk vm"
for ((r = 1; r <= runs; r++)); do
    order=(A B)
    ((r % 2)) || order=(B A)
    for series in "${kernels[@]}"; do
        for w in "${workloads[@]}"; do
            for tool in "${order[@]}"; do
                ok=ok
                out=$(boot "$tool" "$series" "$w") || { ok=FAILED; status=1; }
                read -r s c g <<<"$out"
                h=$(awk -v s="$s" -v g="$g" 'BEGIN { printf "%.1f", s - g }')
                wall[$tool/$series/$w]+="$s "
                cpu[$tool/$series/$w]+="$c "
                host[$tool/$series/$w]+="$h "
                printf 'round %d  kernel %-5s %-5s %s  wall %6s s  cpu %6s s  guest %6s s  host %5s s  load %s  %s\n' \
                    "$r" "$series" "$w" "$tool" "$s" "$c" "$g" "$h" "$(cut -d' ' -f1 /proc/loadavg)" "$ok"
            done
        done
    done
done

median() { tr ' ' '\n' | grep . | sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", b / a }'; }
echo "== medians of $runs boots (seconds). wall: the whole boot; cpu: user + system time of its"
echo "   processes (QEMU's above all), steadier than wall time on a shared machine; host: wall time"
echo "   less the guest's uptime at power-off, i.e. what the tool, vng and QEMU's start add"
printf '%-6s %-8s %7s %7s %6s  %7s %7s %6s  %6s %6s\n' kernel workload "wall A" "wall B" "B/A" "cpu A" "cpu B" "B/A" \
    "host A" "host B"
for series in "${kernels[@]}"; do
    for w in "${workloads[@]}"; do
        k=$series/$w
        wa=$(median <<<"${wall[A/$k]}") wb=$(median <<<"${wall[B/$k]}")
        ca=$(median <<<"${cpu[A/$k]}") cb=$(median <<<"${cpu[B/$k]}")
        printf '%-6s %-8s %7s %7s %6s  %7s %7s %6s  %6s %6s\n' "$series" "$w" "$wa" "$wb" "$(ratio "$wa" "$wb")" \
            "$ca" "$cb" "$(ratio "$ca" "$cb")" "$(median <<<"${host[A/$k]}")" "$(median <<<"${host[B/$k]}")"
    done
done
((keep)) && echo "logs: $tmp"
exit "$status"
