#!/usr/bin/env bash
# vm/setup.sh - install what the VM test suite needs (idempotent, run as root).
#
# Installs on a Debian bookworm machine:
#   - apt (bookworm): busybox-static kmod fio e2fsprogs nbdkit nbd-client
#     util-linux python3-venv linux-image-amd64 (the 6.1 kernel)
#   - the 6.12 kernel: the newest linux-image-6.12.*+deb12-amd64-unsigned
#     (bookworm-security carries linux-6.12 as ~deb12uN; else backports ~bpo12)
#   - apt (bookworm-backports, added here): qemu-system-x86
#   - virtme-ng (PyPI, pinned) in a venv at $USERBLK_VM_PREFIX/venv, and a
#     wrapper /usr/local/bin/vng that runs it
#
# A second run checks everything and exits without touching apt or pip.
#
# Usage: vm/setup.sh                install (or check) everything
#        vm/setup.sh --list-kernels print the kernel image paths to test
#        vm/setup.sh --help
#
# Environment:
#   USERBLK_VM_PREFIX      where the virtme-ng venv lives (default /opt/userblk-vm)
#   USERBLK_VM_612_PACKAGE exact 6.12 kernel package to install (default: the
#                          newest linux-image-6.12.*+deb12-amd64-unsigned)
set -euo pipefail

VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$VM_DIR/lib.sh"

VNG_VERSION=1.42
BACKPORTS_SOURCES=/etc/apt/sources.list.d/userblk-bookworm-backports.sources
BACKPORTS_PIN=/etc/apt/preferences.d/userblk-bookworm-backports
# Packages from bookworm (the default release).
APT_PACKAGES=(busybox-static kmod fio e2fsprogs nbdkit nbd-client util-linux
    python3-venv linux-image-amd64)
# Packages from bookworm-backports. qemu-system-x86 comes from there because
# the machine's qemu-utils is the backports one, which Breaks bookworm's
# qemu-system-common.
BPO_PACKAGES=(qemu-system-x86)
APT_LOG=/var/log/userblk-vm-setup.log

say() { printf 'setup.sh: %s\n' "$*"; }
die() { printf 'setup.sh: error: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'
}

pkg_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == installed ]]
}

have_backports_source() {
    grep -rqsE '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/
}

# The installed 6.12 kernel package, if any.
installed_612_package() {
    dpkg-query -W -f='${db:Status-Status} ${Package}\n' 'linux-image-6.12.*' 2>/dev/null |
        awk '$1 == "installed" && $2 ~ /^linux-image-6\.12\.[0-9]+\+deb12-amd64(-unsigned)?$/ { print $2 }' |
        sort -V | tail -n 1
}

# The newest 6.12 amd64 kernel package that apt knows about (needs the
# backports lists).
candidate_612_package() {
    if [[ -n "${USERBLK_VM_612_PACKAGE:-}" ]]; then
        echo "$USERBLK_VM_612_PACKAGE"
        return
    fi
    apt-cache pkgnames linux-image-6.12. |
        grep -E '^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$' | sort -V | tail -n 1
}

# Run a command with its output appended to $APT_LOG; show the end of it and
# stop if it fails.
logged() {
    printf '\n### %s\n' "$*" >>"$APT_LOG"
    if ! "$@" >>"$APT_LOG" 2>&1; then
        tail -n 30 "$APT_LOG" >&2
        die "failed: $* (full output: $APT_LOG)"
    fi
}

# Like logged, but only returns non-zero on failure.
logged_try() {
    printf '\n### %s\n' "$*" >>"$APT_LOG"
    "$@" >>"$APT_LOG" 2>&1
}

apt_args() {
    # Non-interactive, keep existing config files, no recommends. INITRD=No:
    # the kernel postinst hook skips update-initramfs (virtme-ng builds its
    # own initramfs; no grub or initrd is needed). policy-rc.d (set up by
    # main) keeps services such as nbd-client from starting.
    APT_CMD=(env DEBIAN_FRONTEND=noninteractive INITRD=No
        apt-get install -y -q --no-install-recommends
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@")
}

apt_install() {
    apt_args "$@"
    logged "${APT_CMD[@]}"
}

apt_try_install() {
    apt_args "$@"
    logged_try "${APT_CMD[@]}"
}


list_kernels() {
    local kver kimg
    while read -r kver kimg; do
        echo "$kimg"
    done < <(vm_kernels)
}

main() {
    case "${1:-}" in
        --list-kernels) list_kernels; return ;;
        -h|--help) usage; return ;;
        "") ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac

    [[ $EUID -eq 0 ]] || die "must run as root (apt-get and /boot); try: sudo $0"
    [[ -r /etc/debian_version ]] || die "needs Debian (bookworm)"

    local missing_apt=() missing_bpo=() need_update=0 need_612=0 p
    for p in "${APT_PACKAGES[@]}"; do
        pkg_installed "$p" || missing_apt+=("$p")
    done
    for p in "${BPO_PACKAGES[@]}"; do
        pkg_installed "$p" || missing_bpo+=("$p")
    done
    if [[ -z "$(installed_612_package)" ]]; then
        need_612=1
    fi

    if ! have_backports_source; then
        say "adding apt source bookworm-backports ($BACKPORTS_SOURCES)"
        cat >"$BACKPORTS_SOURCES" <<'EOF'
# Added by userblk vm/setup.sh: QEMU (and maybe the 6.12 kernel) come from here.
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
        need_update=1
    fi
    if [[ ! -e "$BACKPORTS_PIN" ]]; then
        say "pinning linux-image-amd64 to bookworm ($BACKPORTS_PIN)"
        cat >"$BACKPORTS_PIN" <<'EOF'
# Added by userblk vm/setup.sh: keep the linux-image-amd64 metapackage (the
# 6.1 kernel) on bookworm; the 6.12 kernel is installed by its own versioned
# package name.
Package: linux-image-amd64
Pin: release n=bookworm-backports
Pin-Priority: -1
EOF
    fi

    if (( ${#missing_apt[@]} + ${#missing_bpo[@]} + need_612 > 0 || need_update )); then
        # Keep package maintainer scripts from starting services.
        local made_policy=0
        if [[ ! -e /usr/sbin/policy-rc.d ]]; then
            printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
            chmod 755 /usr/sbin/policy-rc.d
            made_policy=1
            trap 'rm -f /usr/sbin/policy-rc.d' EXIT
        fi
        say "running apt-get update (apt output goes to $APT_LOG)"
        logged env DEBIAN_FRONTEND=noninteractive apt-get update -q
        if (( ${#missing_apt[@]} > 0 )); then
            for p in "${missing_apt[@]}"; do say "installing $p (bookworm)"; done
            apt_install "${missing_apt[@]}"
        fi
        if (( need_612 )); then
            local k612
            k612=$(candidate_612_package)
            [[ -n "$k612" ]] || die "no linux-image-6.12.*+deb12-amd64-unsigned in the apt lists"
            # bookworm(-security) itself now carries linux-6.12 (~deb12uN);
            # older mirrors only have it in backports (~bpo12), where it
            # needs backports' linux-base: then retry with -t.
            say "installing $k612 (bookworm, else bookworm-backports)"
            if ! apt_try_install "$k612"; then
                say "retrying $k612 with -t bookworm-backports"
                apt_install -t bookworm-backports "$k612"
            fi
        fi
        if (( ${#missing_bpo[@]} > 0 )); then
            for p in "${missing_bpo[@]}"; do say "installing $p (bookworm-backports)"; done
            apt_install -t bookworm-backports "${missing_bpo[@]}"
        fi
        if (( made_policy )); then
            rm -f /usr/sbin/policy-rc.d
            trap - EXIT
        fi
    fi

    # virtme-ng, pinned, in its own venv (Debian's python3, not pyenv's).
    local prefix=${USERBLK_VM_PREFIX:-/opt/userblk-vm}
    local venv=$prefix/venv
    if [[ "$("$venv/bin/vng" --version 2>/dev/null || true)" != *"$VNG_VERSION"* ]]; then
        say "installing virtme-ng==$VNG_VERSION (PyPI) in $venv"
        [[ -x "$venv/bin/python3" ]] || logged /usr/bin/python3 -m venv "$venv"
        logged "$venv/bin/python3" -m pip install -q --disable-pip-version-check \
            "virtme-ng==$VNG_VERSION"
        "$venv/bin/vng" --version >/dev/null || die "vng does not run from $venv"
    fi
    # /usr/local/bin/vng for use by hand: a wrapper, because vng runs
    # virtme-run by name from PATH.
    local wrapper
    # shellcheck disable=SC2016 # $PATH and $@ are for the wrapper
    wrapper=$(printf '#!/bin/sh\n# Installed by userblk vm/setup.sh\nPATH=%s/bin:$PATH exec %s/bin/vng "$@"\n' "$venv" "$venv")
    if [[ "$(cat /usr/local/bin/vng 2>/dev/null || true)" != "$wrapper" ]]; then
        if [[ -e /usr/local/bin/vng && "$(readlink -f /usr/local/bin/vng)" != "$venv/bin/vng" ]] &&
            ! grep -q 'userblk vm/setup.sh' /usr/local/bin/vng; then
            say "leaving /usr/local/bin/vng alone (not ours); lib.sh uses $venv/bin/vng"
        else
            say "writing /usr/local/bin/vng (runs $venv/bin/vng)"
            rm -f /usr/local/bin/vng
            printf '%s\n' "$wrapper" >/usr/local/bin/vng
            chmod 755 /usr/local/bin/vng
        fi
    fi

    # Final check: both kernels are there with their modules (nbd, brd).
    local n=0 kver kimg m
    while read -r kver kimg; do
        [[ -s "/lib/modules/$kver/modules.dep" ]] || die "no modules.dep for $kver (depmod)"
        for m in nbd brd; do
            compgen -G "/lib/modules/$kver/kernel/drivers/block/$m.ko*" >/dev/null ||
                die "module $m missing for $kver"
        done
        n=$((n + 1))
    done < <(vm_kernels)
    (( n == 2 )) || die "expected the 6.1 and the 6.12 kernel, found $n: $(vm_kernels | tr '\n' ' ')"
    say "ready: vng $VNG_VERSION, kernels: $(list_kernels | tr '\n' ' ')"
}

main "$@"
