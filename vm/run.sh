#!/usr/bin/env bash
# vm/run.sh - the real-kernel suite: `userblk vm` boots each test kernel under QEMU (virtme-ng;
# TCG where KVM does not work), loads nbd, and runs vm/guest.sh in it: the same conformance
# cases `cargo test` runs through the loopback kernel, now through /dev/nbd0, plus real
# workloads (mkfs.ext4 + fsck, fio verify, read-only, media errors, SIGTERM under load).
# Prints one summary line per kernel.
#
# Usage: vm/run.sh [--kernel SERIES|VMLINUZ]... [--only REGEX] [--no-setup] [--keep] [--template]
#   --kernel 6.1 | 6.12 | /boot/vmlinuz-...   test only this kernel (repeatable)
#   --only REGEX                               only the tests whose names match (extended regex:
#                                              'ublk_', 'kernel-tests\[netlink', 'fio_verify$')
#   --no-setup                                 don't run `userblk vm setup` first
#   --keep                                     keep the results directory
#   --template                                 also the driver template's kernel test
#                                              (kernel_test::run; ~1.5 min more per kernel)
# Needs root (to install packages and boot VMs); `userblk vm setup` installs the rest.
set -euo pipefail

VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$VM_DIR")

kernels=()
setup=1
keep=0
template=0
only=
while (($#)); do
    case $1 in
        --kernel) kernels+=(--kernel "${2:?--kernel needs a series (6.1, 6.12) or an image path}"); shift 2 ;;
        --only) only=${2:?--only needs a regex}; shift 2 ;;
        --no-setup) setup=0; shift ;;
        --keep) keep=1; shift ;;
        --template) template=1; shift ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "vm/run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

if ((EUID != 0)); then
    echo "vm/run.sh: needs root (it installs QEMU, kernels and virtme-ng, and boots VMs); run it with sudo" >&2
    exit 2
fi

echo "== building on the host (the guest runs these binaries from the host's file system)"
cd "$ROOT"
export CARGO_TARGET_DIR="$ROOT/target"

# The executables of the test targets cargo builds, from the JSON it prints.
test_executables() {
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and "test" in m.get("target", {}).get("kind", []) and m.get("executable"):
        print(m["executable"])'
}
# One cargo command for the binaries, the examples and harness/tests/kernel.rs (run in the guest
# with USERBLK_TEST_NBD set): a second command for the test alone (`cargo test -p
# userblk-harness`) resolves dependency features differently and builds userblk and the harness
# a second time.
kernel_tests=$(cargo build --release --workspace --bins --examples --test kernel --quiet \
    --message-format=json-render-diagnostics | test_executables)
[[ -x $kernel_tests ]] || { echo "vm/run.sh: could not build the kernel test binary" >&2; exit 1; }
USERBLK=$CARGO_TARGET_DIR/release/userblk
if ((setup)); then
    "$USERBLK" vm setup
fi

# The driver template's kernel test (a standalone crate, with its own lock file: its userblk is a
# build of its own). It checks what `userblk check --kernel` checks, through the entry point a
# driver author calls: off by default, to keep the suite's time.
template_tests=
if ((template)); then
    template_tests=$(cargo test --release --manifest-path examples/driver-template/Cargo.toml --test kernel --no-run \
        --message-format=json 2>/dev/null | test_executables)
    [[ -x $template_tests ]] || { echo "vm/run.sh: could not build the driver template's kernel test" >&2; exit 1; }
fi

results=$(mktemp -d /tmp/userblk-vm.XXXXXX)
# One VM at a time on this machine: a second run waits here for the first to finish.
exec 9>/run/lock/userblk-vm.lock
if ! flock -n 9; then
    echo "== another vm/run.sh is booting a VM; waiting for it"
    flock 9
fi
set +e
# Each kernel's guest writes to $results/<series> (userblk vm sets USERBLK_VM to the series).
"$USERBLK" vm "${kernels[@]}" --timeout 20m --keep-log "$results/boot" --rwdir "$results" -- \
    env USERBLK_BIN="$USERBLK" USERBLK_EXAMPLES="$CARGO_TARGET_DIR/release/examples" \
    USERBLK_KERNEL_TESTS="$kernel_tests" USERBLK_TEMPLATE_TESTS="$template_tests" USERBLK_VM_ONLY="$only" \
    KILL_ITERATIONS="${KILL_ITERATIONS:-}" \
    RESULTS_ROOT="$results" bash "$VM_DIR/guest.sh"
vm_status=$?
set -e

status=$vm_status
summary=()
for out in "$results"/*/; do
    out=${out%/}
    [[ -f $out/results ]] || continue
    series=${out##*/}
    passed=$(grep -c '^PASS ' "$out/results" || true)
    failed=$(grep -c '^FAIL ' "$out/results" || true)
    skipped=$(grep -c '^SKIP ' "$out/results" || true)
    if ((failed > 0)); then
        status=1
        grep '^FAIL ' "$out/results" | while read -r _ name _; do
            echo "--- $name (kernel $series), last lines of its log:"
            tail -n 25 "$out/logs/${name%%\[*}.log" 2>/dev/null || true
        done
    fi
    line="kernel $series: $passed passed, $failed failed"
    ((skipped > 0)) && line+=", $skipped skipped"
    summary+=("$line")
done
((${#summary[@]} > 0)) || { echo "vm/run.sh: no kernel ran the suite (userblk vm status $vm_status)" >&2; status=1; }

echo "== summary"
printf '%s\n' "${summary[@]}"
if ((keep || status)); then
    echo "results and logs: $results"
else
    rm -rf "$results"
fi
exit "$status"
