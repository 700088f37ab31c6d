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
# Node.js and npm run the real Pusher SDKs the Pusher-protocol tests drive
# (pusher-js, laravel-echo, pusher-http-node; tests/sdk/package.json).
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
# Python with venv (ensurepip) for the PyPI pusher SDK, kept in its own venv.
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3 python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "installing: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
    # The package starts a system redis on 6379; the tests never use it.
    if command -v systemctl >/dev/null 2>&1; then systemctl stop redis-server 2>/dev/null || true; fi
fi

# The SDKs themselves, at the versions the lock files pin; reinstalled only
# when a lock file changes (the stamp is a copy of the one installed).
sdk=tests/sdk
if ! cmp -s "$sdk/package-lock.json" "$sdk/node_modules/.installed-lock.json" 2>/dev/null; then
    echo "installing: npm packages of $sdk (npm ci)"
    npm ci --prefix "$sdk" --no-audit --no-fund --loglevel=error >/dev/null
    cp "$sdk/package-lock.json" "$sdk/node_modules/.installed-lock.json"
fi
if ! cmp -s "$sdk/requirements.txt" "$sdk/.venv/installed-requirements.txt" 2>/dev/null; then
    echo "installing: PyPI pusher SDK into $sdk/.venv"
    python3 -m venv --clear "$sdk/.venv"
    "$sdk/.venv/bin/pip" install -q --disable-pip-version-check -r "$sdk/requirements.txt"
    cp "$sdk/requirements.txt" "$sdk/.venv/installed-requirements.txt"
fi

echo "== tests (io_uring driver where the kernel allows it)"
cargo test --workspace --all-targets

echo "== integration tests on the epoll fallback (MONOIO_FORCE_LEGACY_DRIVER=1)"
MONOIO_FORCE_LEGACY_DRIVER=1 cargo test --workspace --tests -- --test-threads 4
