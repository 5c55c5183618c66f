#!/usr/bin/env bash
# Set up a storaged development/test machine (Debian 12, run as root).
#
#   1. apt packages: build tools and the real peers the tests drive
#      (skipped when all are already installed);
#   2. a virtualenv in .venv at the repo root;
#   3. pip install -e '.[test]' (builds the Cython fast path in place;
#      skipped when nothing that affects the build changed since last time).
#
# Idempotent: rerunning on a set-up machine takes a second or two.
# Environment: PYTHON (interpreter for the venv, default python3),
# STORAGED_NO_EXTENSIONS=1 (install without compiled extensions),
# STORAGED_SETUP_ROLE=lab-client|lab-storage (a VM of vagrant/: see vagrant/README.md).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
VENV=$ROOT/.venv
PYTHON=${PYTHON:-python3}
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

APT_PACKAGES=(
    python3 python3-venv python3-dev gcc
    libiscsi-bin qemu-utils qemu-block-extra tgt mdadm libnfs-utils libnfs-dev
    etcd-server
    nfs-ganesha nfs-ganesha-vfs
    libisal2
    fuse3 ctdb bindfs
    pacemaker-cli-utils resource-agents libxml2-utils fence-agents
    corosync libcpg4 libquorum5 libvotequorum8 libcmap4 libcorosync-common4 pacemaker
    iproute2
)
# The lab (storaged lab, vagrant/): vagrant + vagrant-libvirt for `vagrant validate` of
# vagrant/Vagrantfile (the plugin makes a provider usable without a hypervisor).  The
# lab's VMs run this same script with STORAGED_SETUP_ROLE set: they need no vagrant, and
# the client VMs add the kernel initiator and multipath (ALUA prio).
case "${STORAGED_SETUP_ROLE:-}" in
    "") APT_PACKAGES+=(vagrant vagrant-libvirt) ;;
    lab-client) APT_PACKAGES+=(open-iscsi multipath-tools) ;;
    lab-storage) ;;
    *) printf 'ERROR: STORAGED_SETUP_ROLE=%s: expected lab-client or lab-storage\n' \
           "$STORAGED_SETUP_ROLE" >&2; exit 2 ;;
esac

log() { printf '\033[1m==> %s\033[0m\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

# ------------------------------------------------------------------ apt
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo env DEBIAN_FRONTEND=noninteractive "$@"
    else
        die "need root to run: $* (rerun with sudo)"
    fi
}

is_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

if ! command -v dpkg-query >/dev/null 2>&1; then
    warn "not a Debian system: install by hand: ${APT_PACKAGES[*]}"
else
    missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        is_installed "$pkg" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        log "apt: all ${#APT_PACKAGES[@]} packages already installed"
    else
        log "apt: installing ${missing[*]}"
        as_root apt-get update
        installable=()
        for pkg in "${missing[@]}"; do
            candidate=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')
            if [ -z "$candidate" ] || [ "$candidate" = "(none)" ]; then
                warn "apt: no installation candidate for $pkg on this system, skipping it"
            else
                installable+=("$pkg")
            fi
        done
        if [ ${#installable[@]} -gt 0 ]; then
            # The peers (tgt, nfs-ganesha, rpcbind, etcd, corosync, pacemaker) are only
            # started by the tests and benchmarks, on their own ports or in their own
            # network namespaces: keep their packages from starting system services
            # that would hold 3260, 2049, 111, 2379 or 5405.
            policy=/usr/sbin/policy-rc.d
            made_policy=0
            if [ ! -e "$policy" ]; then
                printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
                as_root chmod +x "$policy"
                made_policy=1
            fi
            rc=0
            DEBIAN_FRONTEND=noninteractive as_root apt-get install -y --no-install-recommends \
                "${installable[@]}" || rc=$?
            if [ "$made_policy" = 1 ]; then
                as_root rm -f "$policy"
            fi
            if [ "$rc" -ne 0 ]; then
                die "apt-get install failed ($rc)"
            fi
        fi
    fi
fi

# ------------------------------------------------------------------ venv
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set PYTHON=...)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1); storaged needs Python >= 3.11"

venv_ok() {
    [ -x "$VENV/bin/python" ] \
        && "$VENV/bin/python" -c 'import sys, pip; sys.exit(sys.version_info < (3, 11))' \
            >/dev/null 2>&1
}
if venv_ok; then
    log "venv: reusing $VENV ($("$VENV/bin/python" -V 2>&1))"
else
    log "venv: creating $VENV with $PYTHON ($("$PYTHON" -V 2>&1))"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
fi

# ------------------------------------------------------------------ install
# Everything that changes what `pip install -e` produces.
stamp_inputs() {
    "$VENV/bin/python" -V 2>&1
    echo "STORAGED_NO_EXTENSIONS=${STORAGED_NO_EXTENSIONS:-}"
    find pyproject.toml setup.py _fastio -type f \
        \( -name '*.toml' -o -name '*.py' -o -name '*.pyx' -o -name '*.pxd' \
           -o -name '*.h' -o -path '_fastio/src/*.c' \) -print0 \
        | sort -z | xargs -0 sha256sum
}
STAMP=$VENV/.storaged-install-stamp
want=$(stamp_inputs | sha256sum | cut -d' ' -f1)
installed_here() {
    # the editable install must point at this checkout (run outside it to be sure)
    (cd / && "$VENV/bin/python" -c 'import storaged, storaged.fastio; print(storaged.__file__)' \
        2>/dev/null) | grep -q "^$ROOT/"
}
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && installed_here; then
    log "pip: storaged already installed (editable), build inputs unchanged"
else
    log "pip: installing storaged in editable mode with test extras"
    rm -f "$STAMP"
    "$VENV/bin/python" -m pip install --progress-bar off -e "$ROOT[test]"
    installed_here || die "storaged is not importable from $VENV after pip install"
    echo "$want" >"$STAMP"
fi

impl=$(cd / && "$VENV/bin/python" -c 'import storaged.fastio as f; print(f.IMPLEMENTATION)')
if [ "$impl" = compiled ]; then
    log "fast path: compiled (_fastio)"
elif [ -n "${STORAGED_NO_EXTENSIONS:-}" ] && [ "${STORAGED_NO_EXTENSIONS}" != 0 ]; then
    log "fast path: pure Python (STORAGED_NO_EXTENSIONS is set)"
else
    warn "fast path: pure Python: the Cython extensions did not build;" \
        "see: $VENV/bin/python -m pip install -v -e '$ROOT'"
fi
log "setup done: activate with 'source .venv/bin/activate'"
