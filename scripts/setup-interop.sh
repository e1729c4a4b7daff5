#!/usr/bin/env bash
# scripts/setup-interop.sh - install the third-party NBD tools the network interop tests use
# (idempotent; run as root, or it uses sudo).
#
# Installs from Debian (bookworm):
#   libnbd-bin  nbdinfo, nbdcopy, nbdsh (the libnbd client tools)
#   nbdkit      a third-party NBD server (the memory plugin)
#   qemu-utils  qemu-img, qemu-io, qemu-nbd (left alone when already installed,
#               e.g. from bookworm-backports by vm/setup.sh)
#   fio         its nbd engine (libnbd)
#   openssl     test certificates for the TLS tests
#
# A second run finds everything installed and touches nothing. `apt-get update` runs only
# when a package is not found in the current lists.
#
# Usage: scripts/setup-interop.sh [--check]   (--check: only report what is missing; exit 1 if any)
set -euo pipefail

PACKAGES=(libnbd-bin nbdkit qemu-utils fio openssl)
# The commands the tests look for; each names the package that brings it.
declare -A COMMAND_OF=(
    [libnbd-bin]=nbdinfo [nbdkit]=nbdkit [qemu-utils]=qemu-img [fio]=fio [openssl]=openssl
)

say() { printf 'setup-interop.sh: %s\n' "$*"; }
die() { printf 'setup-interop.sh: error: %s\n' "$*" >&2; exit 1; }

installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == installed ]] ||
        command -v "${COMMAND_OF[$1]}" >/dev/null 2>&1
}

missing=()
for p in "${PACKAGES[@]}"; do
    installed "$p" || missing+=("$p")
done

if [[ "${1:-}" == --check ]]; then
    if ((${#missing[@]})); then
        say "missing: ${missing[*]}"
        exit 1
    fi
    say "all installed: ${PACKAGES[*]}"
    exit 0
fi
if ((${#missing[@]} == 0)); then
    say "all installed: ${PACKAGES[*]}"
    exit 0
fi

SUDO=()
if ((EUID != 0)); then
    command -v sudo >/dev/null || die "not root and no sudo: run as root"
    SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive

# Update the lists only when a package is unknown to them (a fresh machine has none).
for p in "${missing[@]}"; do
    if ! apt-cache show "$p" >/dev/null 2>&1; then
        say "updating the package lists ($p not found)"
        "${SUDO[@]}" apt-get update -qq
        break
    fi
done

say "installing: ${missing[*]}"
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
    die "apt-get install ${missing[*]} failed"

for p in "${missing[@]}"; do
    command -v "${COMMAND_OF[$p]}" >/dev/null || die "$p installed but ${COMMAND_OF[$p]} not found"
done
say "installed: ${missing[*]}"
