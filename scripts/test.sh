#!/usr/bin/env bash
# Runs the whole test suite: unit tests, property tests and the integration
# tests (which start the real binary), once on the io_uring driver and once
# on the epoll fallback. Installs what the tests need when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
# A C compiler for mimalloc and zstd; redis-server for the Redis bus tests
# (each test starts its own on a free loopback port).
command -v cc >/dev/null 2>&1 || need_apt+=(gcc)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "installing: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
    # The package starts a system redis on 6379; the tests never use it.
    if command -v systemctl >/dev/null 2>&1; then systemctl stop redis-server 2>/dev/null || true; fi
fi

echo "== tests (io_uring driver where the kernel allows it)"
cargo test --workspace --all-targets

echo "== integration tests on the epoll fallback (MONOIO_FORCE_LEGACY_DRIVER=1)"
MONOIO_FORCE_LEGACY_DRIVER=1 cargo test --workspace --tests -- --test-threads 4
