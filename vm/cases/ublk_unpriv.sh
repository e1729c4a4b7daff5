# vm/cases/ublk_unpriv.sh - unprivileged ublk devices (UBLK_F_UNPRIVILEGED_DEV, Linux 6.3+),
# sourced by vm/guest.sh after vm/cases/ublk.sh (whose ublk_missing, wait_ublk and
# assert_ublk_gone it uses). A user other than root (uid 1234, no passwd entry needed) serves a
# RAM disk through /dev/ublkbN after root ran `userblk ublk-setup`; without the set-up, the user
# gets the error that names it. Kernels without ublk (Debian's 6.1), without unprivileged devices,
# or without udevd report each case as SKIP with the reason.
# shellcheck shell=bash disable=SC2317

UNPRIV_UID=1234
UNPRIV_OTHER=1235
UNPRIV_RULES=/etc/udev/rules.d/70-userblk-ublk.rules

# as_user UID CMD...: runs CMD as UID (and group UID, no other groups).
as_user() {
    local uid=$1
    shift
    setpriv --reuid="$uid" --regid="$uid" --clear-groups "$@"
}

# The guest's state before the set-up: no rule, /dev/ublk-control root's alone.
unpriv_reset() {
    rm -f "$UNPRIV_RULES"
    udevadm control --reload 2>/dev/null || true
    chown root:root /dev/ublk-control
    chmod 0600 /dev/ublk-control
}

# Why unprivileged devices cannot be tried here, or nothing.
unpriv_missing() {
    local why major minor
    why=$(ublk_missing) && [[ -n $why ]] && { echo "$why"; return; }
    IFS=. read -r major minor _ < /proc/sys/kernel/osrelease
    if ((major < 6 || (major == 6 && minor < 3))); then
        echo "kernel $(uname -r) predates unprivileged ublk devices (UBLK_F_UNPRIVILEGED_DEV, Linux 6.3)"
        return
    fi
    if ! udevadm control --ping >/dev/null 2>&1; then
        echo "no udevd runs in this guest: nothing would apply the set-up's udev rule"
        return
    fi
    command -v setpriv >/dev/null || echo "setpriv (util-linux) is missing: cannot run a command as another user"
}

# Without the set-up, the user is told to run it, and nothing is left behind.
t_ublk_unpriv_no_setup() {
    unpriv_reset
    ls -l /dev/ublk-control
    if as_user "$UNPRIV_UID" "$USERBLK_BIN" serve ram:16M --transport ublk >"$WORK/unpriv.out" 2>&1; then
        echo "serve succeeded for uid $UNPRIV_UID without the set-up"
        return 1
    fi
    cat "$WORK/unpriv.out"
    grep -q "/dev/ublk-control is not accessible to this user (uid $UNPRIV_UID)" "$WORK/unpriv.out"
    grep -q 'sudo userblk ublk-setup' "$WORK/unpriv.out"
    # Not root: the set-up prints its plan and does nothing.
    if as_user "$UNPRIV_UID" "$USERBLK_BIN" ublk-setup >"$WORK/setup.out" 2>&1; then
        echo "ublk-setup claimed success without root"
        return 1
    fi
    cat "$WORK/setup.out"
    grep -q 'not root, so nothing was done' "$WORK/setup.out"
    [[ ! -e $UNPRIV_RULES ]] || { echo "ublk-setup without root wrote $UNPRIV_RULES"; return 1; }
}

# /dev/ublk-control open to users but no udev rule: the device's nodes stay root's, the server
# gives up after its bound with the error naming the set-up; the user cannot delete the device
# (the kernel checks its node), and the set-up, as root, deletes it.
t_ublk_unpriv_no_rule() {
    unpriv_reset
    chmod 0666 /dev/ublk-control
    local before
    before=$(ls /sys/class/ublk-char 2>/dev/null | wc -l)
    if as_user "$UNPRIV_UID" timeout 60 "$USERBLK_BIN" serve ram:16M --transport ublk >"$WORK/unpriv.out" 2>&1; then
        echo "serve succeeded although nothing handed the device over"
        return 1
    fi
    cat "$WORK/unpriv.out"
    grep -q 'did not become usable by this user (uid 1234, gid 1234) within 10 s' "$WORK/unpriv.out"
    grep -q 'run `sudo userblk ublk-setup` once' "$WORK/unpriv.out"
    grep -q 'this user could not delete it' "$WORK/unpriv.out"
    local left
    left=$(ls /sys/class/ublk-char | wc -l)
    ((left == before + 1)) || { echo "expected the abandoned device to remain ($before before, $left now)"; return 1; }
    "$USERBLK_BIN" ublk-setup >"$WORK/setup.out" 2>&1 || { cat "$WORK/setup.out"; return 1; }
    cat "$WORK/setup.out"
    grep -q 'deleted abandoned devices: ublk' "$WORK/setup.out"
    left=$(ls /sys/class/ublk-char | wc -l)
    ((left == before)) || { echo "the set-up left $left ublk devices ($before before)"; ls -l /dev/ublk*; return 1; }
    unpriv_reset
}

# The set-up as root (twice: the second run changes nothing), then uid 1234 serves a RAM disk:
# it owns both nodes, writes and reads back through /dev/ublkbN; another user may not open it;
# SIGTERM removes the device.
t_ublk_unpriv_serve() {
    unpriv_reset
    "$USERBLK_BIN" ublk-setup
    "$USERBLK_BIN" ublk-setup >"$WORK/setup2.out"
    cat "$WORK/setup2.out"
    grep -q "$UNPRIV_RULES is up to date" "$WORK/setup2.out"
    cat "$UNPRIV_RULES"
    [[ $(stat -c %a /dev/ublk-control) == 666 ]] || { ls -l /dev/ublk-control; echo "/dev/ublk-control is not mode 666"; return 1; }
    # setpriv itself, not as_user: the background job must be the server (setpriv execs it), so
    # that SERVE_PID gets the SIGTERM.
    setpriv --reuid="$UNPRIV_UID" --regid="$UNPRIV_UID" --clear-groups \
        "$USERBLK_BIN" serve ram:64M --transport ublk >"$WORK/serve.out" 2>&1 &
    SERVE_PID=$!
    wait_ublk
    local dev=$UBLK_DEV cdev=${UBLK_DEV/ublkb/ublkc}
    ls -l "$dev" "$cdev"
    [[ $(stat -c %u:%g "$dev") == "$UNPRIV_UID:$UNPRIV_UID" ]] || { echo "$dev is not the user's"; return 1; }
    [[ $(stat -c %u:%g "$cdev") == "$UNPRIV_UID:$UNPRIV_UID" ]] || { echo "$cdev is not the user's"; return 1; }
    dd if=/dev/urandom of="$WORK/unpriv.blk" bs=1M count=4 status=none
    chmod 0644 "$WORK/unpriv.blk"
    as_user "$UNPRIV_UID" dd if="$WORK/unpriv.blk" of="$dev" bs=1M seek=3 oflag=direct status=none
    as_user "$UNPRIV_UID" dd if="$dev" bs=1M skip=3 count=4 iflag=direct status=none >"$WORK/unpriv.back"
    cmp "$WORK/unpriv.blk" "$WORK/unpriv.back"
    echo "uid $UNPRIV_UID wrote and read back 4 MiB through $dev"
    # Only the owner (or root) may open an unprivileged device, whatever the node's mode.
    chmod 0666 "$dev"
    if as_user "$UNPRIV_OTHER" dd if="$dev" of=/dev/null bs=4k count=1 iflag=direct status=none 2>"$WORK/other.err"; then
        echo "uid $UNPRIV_OTHER opened uid $UNPRIV_UID's device"
        return 1
    fi
    cat "$WORK/other.err"
    stop_serve TERM
    grep -q "removed" "$WORK/serve.out"
    assert_ublk_gone "$dev"
    unpriv_reset
}

_unpriv_cases=(ublk_unpriv_no_setup ublk_unpriv_no_rule ublk_unpriv_serve)
if _unpriv_why=$(unpriv_missing) && [[ -n $_unpriv_why ]]; then
    for _c in "${_unpriv_cases[@]}"; do
        [[ -z ${USERBLK_VM_ONLY:-} || $_c =~ ${USERBLK_VM_ONLY} ]] && result "SKIP $_c $_unpriv_why"
    done
else
    WORKLOADS+=("${_unpriv_cases[@]}")
fi
