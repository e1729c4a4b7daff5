# shellcheck shell=bash
# vm/lib.sh - boot the Debian test kernels under QEMU with virtme-ng.
#
# Source it from bash (vm/run.sh, vm/bench.sh):  source "$VM_DIR/lib.sh"
# vm/setup.sh installs what it needs (QEMU, the kernels, virtme-ng).
#
# Functions:
#   vm_kernels [SERIES...]       print "KVER KIMG" per kernel to test, one a
#                                line, oldest series first; default series
#                                6.1 (bookworm) and 6.12 (bookworm-backports),
#                                e.g. "6.12.117+deb12-amd64 /boot/vmlinuz-6.12.117+deb12-amd64"
#   vm_vng                       print the path of the vng to use (status 1 if none)
#   vm_ready                     status 0 if vng and both kernels are installed,
#                                else a hint to run vm/setup.sh on stderr
#   vm_boot KIMG RWDIR CMD [ARG...]
#                                boot KIMG, run CMD ARG... (an argv, not a shell
#                                string: use `bash -c '...'` for shell syntax) as
#                                root in the guest, return its exit status
#
# The guest sees the host's / read-only over 9p (host binaries run as they
# are), a writable tmpfs overlay on /tmp, /etc, /var, /home, ... that the host
# does not see, and RWDIR read-write at the same path as on the host. The
# guest starts in the caller's current directory. CMD's stdout goes to
# vm_boot's stdout and its stderr to vm_boot's stderr; host environment
# variables are NOT passed in (use `env VAR=value CMD...`).
#
# vm_boot statuses: CMD's own exit status; 124 if the VM timed out; 125 if
# the guest never ran CMD or died before CMD finished (no boot, kernel panic).
# Files it leaves in RWDIR (override the first with VM_LOG):
#   RWDIR/vm-console.log  full serial console: kernel log from the first
#                         line, virtme-ng-init messages, CMD's stderr
#   RWDIR/vm-dmesg.log    the guest's dmesg taken after CMD returned
#   RWDIR/.vm_boot/       the guest-side wrapper script and its status files
#
# Settings (environment):
#   VM_TIMEOUT=600   seconds before the whole VM is killed
#   VM_MEMORY=2G     guest memory (qemu -m)
#   VM_CPUS=2        guest vCPUs
#   VM_KVM=0         1 = try KVM: a short probe boot checks that it works with
#                    this kernel, else TCG is used. Default: TCG only
#                    (--disable-kvm): /dev/kvm exists on these machines but a
#                    stock kernel does not boot with it
#   VM_VERBOSE=0     1 = also copy the kernel console to stderr
#   VM_LOG           console log path (default RWDIR/vm-console.log)
#   VNG              vng to use (default: $USERBLK_VM_PREFIX/venv/bin/vng,
#                    USERBLK_VM_PREFIX=/opt/userblk-vm, else vng on PATH)

vm__err() { printf 'vm: %s\n' "$*" >&2; }

vm_kernels() {
    local series img kver best
    local -a want=("$@")
    (( ${#want[@]} )) || want=(6.1 6.12)
    for series in "${want[@]}"; do
        best=
        # Only the generic amd64 flavour (not cloud/rt), with its modules.
        while read -r img; do
            kver=${img#/boot/vmlinuz-}
            [[ -d "/lib/modules/$kver/kernel" ]] && best=$kver
        done < <(compgen -G "/boot/vmlinuz-$series.*-amd64" | grep -E "^/boot/vmlinuz-${series//./\\.}\.[0-9]+[-+]" | sort -V)
        [[ -n "$best" ]] && echo "$best /boot/vmlinuz-$best"
    done
    return 0
}

vm_vng() {
    local c
    for c in "${VNG:-}" "${USERBLK_VM_PREFIX:-/opt/userblk-vm}/venv/bin/vng" "$(command -v vng 2>/dev/null || true)"; do
        if [[ -n "$c" && -x "$c" ]]; then
            echo "$c"
            return 0
        fi
    done
    return 1
}

vm_ready() {
    local n
    n=$(vm_kernels 6.1 6.12 | wc -l)
    if ! vm_vng >/dev/null || (( n < 2 )) || ! command -v qemu-system-x86_64 >/dev/null; then
        vm__err "VM tools missing (vng: $(vm_vng || echo none), kernels: $n of 2, qemu: $(command -v qemu-system-x86_64 || echo none)); run: sudo vm/setup.sh"
        return 1
    fi
}

# Set VM__ACCEL to the accelerator flags for KIMG: --disable-kvm unless
# VM_KVM=1 and a probe boot with KVM works (cached per kernel in this shell).
# Here KVM fails fast: qemu asserts in kvm_buf_set_msrs (failed to set MSR 0x10a).
declare -gA VM__KVM_OK=()
VM__ACCEL=()
vm__accel() {
    local kimg=$1 vng=$2
    VM__ACCEL=(--disable-kvm)
    [[ "${VM_KVM:-0}" == 1 ]] || return 0
    if [[ -z "${VM__KVM_OK[$kimg]:-}" ]]; then
        VM__KVM_OK[$kimg]=0
        if [[ -r /dev/kvm && -w /dev/kvm ]] &&
            PATH="$(dirname "$(readlink -f "$vng")"):$PATH" \
                timeout --kill-after=5 60 "$vng" --run "$kimg" --force-9p --memory 512M \
                --exec true </dev/null >/dev/null 2>&1; then
            VM__KVM_OK[$kimg]=1
        else
            vm__err "KVM requested but does not boot $kimg; using TCG"
        fi
    fi
    if (( VM__KVM_OK[$kimg] )); then
        VM__ACCEL=()
    fi
}

# stdin: the VM's stderr (console + CMD's stderr). Append it all to $1; pass
# on to stdout only CMD's stderr: lines after virtme-ng-init starts the script
# that are not kernel messages (or everything with VM_VERBOSE=1).
vm__console_filter() {
    local log=$1
    awk -v logf="$log" -v verbose="${VM_VERBOSE:-0}" '
        { print >> logf; fflush(logf) }
        verbose == 1 { print; fflush(); next }
        started && $0 !~ /^\[ *[0-9]+\.[0-9]+\] / { print; fflush() }
        /virtme-ng-init: starting script/ { started = 1 }
    '
}

vm_boot() {
    if (( $# < 3 )); then
        vm__err "usage: vm_boot KERNEL_IMAGE RWDIR CMD [ARG...]"
        return 2
    fi
    local kimg=$1 rwdir=$2
    shift 2
    local vng kver
    if [[ ! -f "$kimg" ]]; then
        vm__err "no kernel image $kimg"
        return 2
    fi
    kver=${kimg##*/vmlinuz-}
    if [[ "$kver" == "$kimg" || ! -d "/lib/modules/$kver" ]]; then
        vm__err "warning: no /lib/modules for $kimg: modprobe will fail in the guest"
    fi
    if ! vng=$(vm_vng); then
        vm__err "vng not found; run: sudo vm/setup.sh"
        return 2
    fi
    mkdir -p "$rwdir"
    rwdir=$(cd "$rwdir" && pwd -P)
    if [[ "$rwdir" == *[=,\ ]* ]]; then
        vm__err "RWDIR must not contain '=', ',' or spaces (vng --rwdir syntax): $rwdir"
        return 2
    fi
    local state=$rwdir/.vm_boot log=${VM_LOG:-$rwdir/vm-console.log}
    local dmesg=$rwdir/vm-dmesg.log timeout_s=${VM_TIMEOUT:-600}
    rm -rf "$state"
    mkdir -p "$state" "$(dirname "$log")"
    : >"$log"
    rm -f "$dmesg"

    # Guest-side wrapper: marks the start, runs CMD, saves dmesg and status.
    # shellcheck disable=SC2016 # the $ are for the guest script
    {
        echo '#!/bin/bash'
        printf 'state=%q\n' "$state"
        echo ': >"$state/started"'
        printf '%q ' "$@"
        echo
        echo 'rc=$?'
        printf 'dmesg >%q 2>&1 || true\n' "$dmesg"
        echo 'echo "$rc" >"$state/status"'
        echo 'exit "$rc"'
    } >"$state/guest.sh"

    local -a cmd
    vm__accel "$kimg" "$vng"
    cmd=(timeout --kill-after=20 "$timeout_s" "$vng" --verbose --run "$kimg"
        "${VM__ACCEL[@]}" --force-9p --memory "${VM_MEMORY:-2G}"
        --cpus "${VM_CPUS:-2}" --rwdir "$rwdir"
        --exec "/bin/bash $(printf %q "$state/guest.sh")")
    printf '# %s\n' "${cmd[*]}" >>"$log"

    local vng_rc=0 t0=$SECONDS
    local -a ps
    # vng calls virtme-run by name: put its bin dir on PATH. stdout -> our
    # stdout, through a pipe: QEMU reopens the guest's output path with O_TRUNC,
    # which would wipe everything written before when our stdout is a file (a CI
    # log); stderr (console + CMD's stderr) -> the filter.
    local out_pid
    exec 3> >(cat)
    out_pid=$!
    {
        PATH="$(dirname "$(readlink -f "$vng")"):$PATH" "${cmd[@]}" </dev/null 2>&1 >&3 3>&- |
            vm__console_filter "$log" >&2 3>&-
        ps=("${PIPESTATUS[@]}")
    } || true
    exec 3>&-
    wait "$out_pid" 2>/dev/null || true
    vng_rc=${ps[0]:-125}
    printf '# vng exit status %s after %ss\n' "$vng_rc" "$((SECONDS - t0))" >>"$log"

    if [[ -f "$state/status" ]]; then
        return "$(<"$state/status")"
    fi
    if (( vng_rc == 124 || vng_rc == 137 )); then
        vm__err "VM timed out after ${timeout_s}s ($kimg); console log: $log"
        return 124
    fi
    if [[ -f "$state/started" ]]; then
        vm__err "guest died while running the command (vng status $vng_rc); console log: $log"
    else
        vm__err "guest never ran the command (vng status $vng_rc); console log: $log"
    fi
    tail -n 25 "$log" | sed 's/^/vm: | /' >&2
    return 125
}
