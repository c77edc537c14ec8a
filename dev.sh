#!/usr/bin/env bash
# The two commands of README.md:
#   ./dev.sh demo   set everything up on a fresh machine, then boot the default guest (`bulkhead demo`)
#   ./dev.sh test   set everything up on a fresh machine, then run the whole test suite
# Setup is idempotent and fast when nothing is missing.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

APT_PACKAGES=(build-essential libcap-dev libseccomp-dev acpica-tools
    # the user-mode Linux test bed (tests/linux, benchmarks/linux_blk.py): the UML kernel and its
    # modules, qemu-storage-daemon, and the tools the guest and the host checks run
    user-mode-linux kmod fio qemu-system-common e2fsprogs iperf3 socat iproute2 iputils-ping liburing-dev
    curl)

log() { printf '[dev.sh] %s\n' "$*" >&2; }

setup_apt() {
    # One dpkg-query for all of them; a package it does not know is simply absent from its output.
    local installed missing=() p
    installed="$(dpkg-query -W -f='${Package} ${Status}\n' "${APT_PACKAGES[@]}" 2>/dev/null || true)"
    for p in "${APT_PACKAGES[@]}"; do
        grep -qx "$p install ok installed" <<<"$installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        log "installing Debian packages: ${missing[*]}"
        local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

setup_python() {
    if [ ! -x .venv/bin/python ]; then
        log "creating .venv"
        python3 -m venv .venv
    fi
    local stamp=.venv/.bulkhead-installed
    local stale=0 f
    [ -f "$stamp" ] || stale=1
    [ -x jail/bulkhead-jail-init ] || stale=1
    for f in pyproject.toml setup.py vmm_core/kvm/_build.py jail/_seccomp_build.py jail/pid_init.c ipc_protocol/_atomics_build.py \
             vmm_core/vhost_frontend/_watch_build.py device_procs/virtio/_fastpath_build.py; do
        [ -f "$f" ] && [ "$f" -nt "$stamp" ] && stale=1
    done
    if ((stale)); then
        log "installing Python packages into .venv"
        .venv/bin/pip install -q --upgrade pip >/dev/null
        .venv/bin/pip install -q -e ".[test]"
        # cffi extension modules next to their sources, so the source tree imports them directly.
        .venv/bin/python setup.py -q build_ext --inplace >/dev/null
        touch "$stamp"
    fi
}

setup_guest() {
    log "building the test guest (guest_kit)"
    make -s -C guest_kit
}

setup() { setup_apt; setup_python; setup_guest; }

cmd="${1:-}"; shift || true
case "$cmd" in
    demo) setup; exec .venv/bin/bulkhead demo "$@" ;;
    test) setup; exec .venv/bin/python -m pytest -q "$@" ;;
    setup) setup ;;
    *) echo "usage: ./dev.sh demo|test|setup [args...]" >&2; exit 2 ;;
esac
