#!/usr/bin/env bash
# vm/run.sh - the real-kernel suite: boots each Debian test kernel under QEMU (virtme-ng, TCG),
# loads nbd, and runs inside it the same conformance cases `cargo test` runs through the loopback
# kernel, now through /dev/nbd0, plus real workloads (mkfs.ext4 + fsck, fio verify, read-only,
# media errors, SIGTERM under load). Prints one summary line per kernel.
#
# Usage: vm/run.sh [--kernel SERIES|VMLINUZ]... [--no-setup] [--keep]
#   --kernel 6.1 | 6.12 | /boot/vmlinuz-...   test only this kernel (repeatable)
#   --no-setup                                 don't run vm/setup.sh first
#   --keep                                     keep the results directory
# Needs root (to install packages); everything else it needs, vm/setup.sh installs.
set -euo pipefail

VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$VM_DIR")
# shellcheck source=vm/lib.sh
source "$VM_DIR/lib.sh"

kernels=()
setup=1
keep=0
while (($#)); do
    case $1 in
        --kernel) kernels+=("${2:?--kernel needs a series (6.1, 6.12) or an image path}"); shift 2 ;;
        --no-setup) setup=0; shift ;;
        --keep) keep=1; shift ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "vm/run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

if ((EUID != 0)); then
    echo "vm/run.sh: needs root (it installs QEMU, kernels and virtme-ng, and boots VMs); run it with sudo" >&2
    exit 2
fi
if ((setup)); then
    bash "$VM_DIR/setup.sh"
fi
vm_ready

echo "== building on the host (the guest runs these binaries from the host's file system)"
cd "$ROOT"
export CARGO_TARGET_DIR="$ROOT/target"
cargo build --release --workspace --bins --examples --quiet
# The kernel tests: harness/tests/kernel.rs, run in the guest with USERBLK_TEST_NBD set.
kernel_tests=$(cargo test --release -p userblk-harness --test kernel --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "kernel" and m.get("executable"):
        print(m["executable"])')
[[ -x "$kernel_tests" ]] || { echo "vm/run.sh: could not build the kernel test binary" >&2; exit 1; }

# Which kernels.
declare -a plan=()
if ((${#kernels[@]} == 0)); then
    while read -r kver kimg; do plan+=("$kver $kimg"); done < <(vm_kernels)
else
    for k in "${kernels[@]}"; do
        if [[ -f $k ]]; then
            plan+=("${k#/boot/vmlinuz-} $k")
        else
            line=$(vm_kernels "$k" | head -n1)
            [[ -n $line ]] || { echo "vm/run.sh: no installed kernel for series $k" >&2; exit 2; }
            plan+=("$line")
        fi
    done
fi

results=$(mktemp -d /tmp/userblk-vm.XXXXXX)
status=0
summary=()
for entry in "${plan[@]}"; do
    read -r kver kimg <<<"$entry"
    out="$results/$kver"
    mkdir -p "$out"
    echo "== kernel $kver: booting $kimg"
    set +e
    vm_boot "$kimg" "$out" env USERBLK_BIN="$CARGO_TARGET_DIR/release/userblk" \
        USERBLK_EXAMPLES="$CARGO_TARGET_DIR/release/examples" \
        USERBLK_KERNEL_TESTS="$kernel_tests" RESULTS="$out" \
        bash "$VM_DIR/guest.sh"
    rc=$?
    set -e
    passed=$(grep -c '^PASS ' "$out/results" 2>/dev/null || true)
    failed=$(grep -c '^FAIL ' "$out/results" 2>/dev/null || true)
    skipped=$(grep -c '^SKIP ' "$out/results" 2>/dev/null || true)
    if [[ ! -s $out/results ]] || ((rc != 0 && failed == 0)); then
        echo "kernel $kver: the VM did not run the suite (vm_boot status $rc); console log: $out/vm-console.log" >&2
        tail -n 30 "$out/vm-console.log" >&2 || true
        failed=$((failed + 1))
    fi
    if ((failed > 0)); then
        status=1
        grep '^FAIL ' "$out/results" 2>/dev/null | while read -r _ name _; do
            echo "--- $name (kernel $kver), last lines of its log:"
            tail -n 25 "$out/logs/$name.log" 2>/dev/null || true
        done
    fi
    line="kernel $kver: $passed passed, $failed failed"
    ((skipped > 0)) && line+=", $skipped skipped"
    summary+=("$line")
    echo "$line"
done

echo "== summary"
printf '%s\n' "${summary[@]}"
if ((keep || status)); then
    echo "results and logs: $results"
else
    rm -rf "$results"
fi
exit "$status"
