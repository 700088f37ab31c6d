#!/usr/bin/env bash
# Checks the unit files: `systemd-analyze verify` on shardcast.service and
# shardcast.socket (any warning counts as a failure), the sandbox's
# exposure score, and the few values the server's behaviour depends on.
#
#   systemd/verify.sh [DIR]    DIR holds the units (default: this folder)
#
# Works without systemd as PID 1 (containers, CI): verify only parses the
# units and resolves their dependencies. It does check that ExecStart= is
# executable, and /usr/local/bin/shardcast is not installed on a build
# machine, so the units are checked as copies whose binary path points at a
# stand-in executable; nothing else in them is changed.
#
# systemd-analyze comes with Debian's `systemd` package. When it is missing
# and this runs as root with CI=true, it is installed; otherwise the script
# says how and fails.
set -euo pipefail

dir=${1:-$(dirname "$0")}
units=(shardcast.service shardcast.socket)
bin=/usr/local/bin/shardcast

# The drain the unit must leave room for: server.drain_window_ms and
# websocket.close_timeout_ms at their defaults, in seconds.
drain_window_s=10
close_timeout_s=5
# `systemd-analyze security` exposure (0 = locked down, 10 = unprotected)
# above which the check fails.
max_exposure=2.5

fail=0
problem() { echo "FAIL: $*"; fail=1; }

if ! command -v systemd-analyze >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && [ "${CI:-}" = true ]; then
        echo "installing systemd (for systemd-analyze)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd >/dev/null
    else
        echo "systemd-analyze not found: install Debian's 'systemd' package" \
            "(apt-get install systemd), or run this as root with CI=true" >&2
        exit 2
    fi
fi
echo "== $(systemd-analyze --version | head -n1)"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/units" "$work/bin"
printf '#!/bin/sh\nexit 0\n' >"$work/bin/shardcast"
chmod 755 "$work/bin/shardcast"
for u in "${units[@]}"; do
    [ -f "$dir/$u" ] || { problem "$dir/$u is missing"; continue; }
    sed "s#$bin#$work/bin/shardcast#g" "$dir/$u" >"$work/units/$u"
done
[ "$fail" = 0 ] || exit 1

echo "== systemd-analyze verify ${units[*]}"
# --man=no: no Documentation= man pages to look up on a build machine.
if ! out=$(cd "$work/units" && systemd-analyze verify --man=no "${units[@]/#/./}" 2>&1); then
    problem "systemd-analyze verify exited non-zero"
fi
if [ -n "$out" ]; then
    # Unknown keys, bad values and missing dependencies are only warnings to
    # systemd; here they are failures. Show them with the real path.
    out=${out//$work\/units\//$dir/}
    echo "${out//$work\/bin\/shardcast/$bin}"
    problem "systemd-analyze verify printed warnings"
else
    echo "ok"
fi

echo "== systemd-analyze security (offline, threshold $max_exposure)"
if systemd-analyze security --help 2>/dev/null | grep -q -- '--offline'; then
    sec=$(cd "$work/units" && systemd-analyze security --offline=yes --no-pager \
        ./shardcast.service 2>&1) || true
    overall=$(echo "$sec" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
    if [ -z "$overall" ]; then
        echo "$sec" | tail -n 5
        problem "could not read the exposure level"
    else
        echo "overall exposure $overall"
        if awk -v a="$overall" -v b="$max_exposure" 'BEGIN { exit !(a > b) }'; then
            echo "$sec" | grep -E '^✗' || true
            problem "exposure $overall is above $max_exposure"
        fi
    fi
else
    echo "skipped: this systemd-analyze has no --offline (systemd < 250)"
fi

echo "== values the server depends on"
svc="$dir/shardcast.service"
value() { sed -n "s/^$1=//p" "$svc" | tail -n1; }
seconds() { # 30s, 1min, 1min 30s, plain seconds
    systemd-analyze timespan "$1" 2>/dev/null |
        sed -n 's/.*μs: *\([0-9]*\).*/\1/p' | awk '{ print int($1 / 1000000) }'
}
[ "$(value Type)" = notify ] || problem "Type= must be notify (READY=1 from the server)"
[ "$(value NotifyAccess)" = main ] || problem "NotifyAccess= must be main"
[ -n "$(value WatchdogSec)" ] || problem "WatchdogSec= is not set"
# systemd/README.md installs shardcast.example.toml as this file.
config=$(value ExecStart | sed -n 's/.*--config \([^ ]*\).*/\1/p')
[ "$config" = /etc/shardcast/shardcast.toml ] ||
    problem "ExecStart= must pass --config /etc/shardcast/shardcast.toml (got '${config}')"
stop=$(seconds "$(value TimeoutStopSec)")
need=$((drain_window_s + close_timeout_s))
if [ -z "$stop" ] || [ "$stop" -le "$need" ]; then
    problem "TimeoutStopSec=${stop:-?}s must exceed drain window + close timeout (${need}s)"
fi
nofile=$(value LimitNOFILE)
if ! [[ "$nofile" =~ ^[0-9]+$ ]] || [ "$nofile" -lt 1000000 ]; then
    problem "LimitNOFILE=$nofile is below 1000000 (one descriptor per connection)"
fi
filter=$(grep '^SystemCallFilter=[^~]' "$svc" || true)
for sc in io_uring_setup io_uring_enter io_uring_register; do
    grep -qw "$sc" <<<"$filter" || problem "SystemCallFilter= does not allow $sc"
done
sock="$dir/shardcast.socket"
grep -q '^ReusePort=yes' "$sock" || problem "shardcast.socket needs ReusePort=yes"
grep -q '^Service=shardcast.service' "$sock" || problem "shardcast.socket must name shardcast.service"
[ "$fail" = 0 ] && echo "ok"

if [ "$fail" != 0 ]; then
    echo "systemd units: FAILED"
    exit 1
fi
echo "systemd units: ok"
