#!/usr/bin/env bash
# Names each host setting that would cap shardcast's connections or
# throughput, with the value found and the value wanted. Read-only; needs
# no root. Why each setting matters: tuning/TUNING.md.
#
#   tuning/check.sh [--connections N] [--strict]
#   tuning/check.sh --conf FILE [--connections N] [--strict]
#
# --connections N  size the targets for N connections (default 1000000)
# --strict         exit 1 when anything is below target (default: exit 0;
#                  the report is advice)
# --conf FILE      check the sysctl values in FILE (a sysctl.d file such as
#                  tuning/99-shardcast.conf) instead of the live host; CI
#                  uses it to keep the shipped file and these targets in step
#
# Each line: ok (meets the target), LOW (below it: caps connections or
# throughput; counts for --strict), note (advice; never fails), info.
set -euo pipefail

conns=1000000
strict=0
conf=
while [ $# -gt 0 ]; do
    case "$1" in
        --connections) conns=${2:?--connections needs a number}; shift 2 ;;
        --connections=*) conns=${1#*=}; shift ;;
        --strict) strict=1; shift ;;
        --conf) conf=${2:?--conf needs a file}; shift 2 ;;
        --conf=*) conf=${1#*=}; shift ;;
        -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
done
[[ "$conns" =~ ^[1-9][0-9]*$ ]] || { echo "--connections must be a positive number" >&2; exit 2; }
if [ -n "$conf" ] && [ ! -r "$conf" ]; then
    echo "cannot read $conf" >&2
    exit 2
fi

# --- targets, from the connection count -------------------------------------
page=4096
nofile=$((conns + conns / 10))         # descriptors: connections + 10%
file_max=$((2 * nofile))               # server + a load generator beside it
backlog=65535                          # server.backlog's maximum
syn_backlog=65535
netdev_backlog=16384
# tcp_mem: every connection holding data in both directions at the
# 4 KiB minimums = 2 pages each at the pressure mark, 3 at the hard limit.
tcp_mem_pressure=$((2 * conns))
tcp_mem_high=$((3 * conns))
tcp_mem_low=$((tcp_mem_pressure * 3 / 4))
tcp_buf_max=1048576
port_range=50000                       # ephemeral ports per source IP
conntrack=$nofile
memlock_kib=65536                      # io_uring rings, kernels < 5.12
# Memory per connection: ~4 KiB kernel socket state + <= 2.5 KiB shardcast
# + up to 12 KiB of TCP buffers (the tcp_mem hard limit per connection),
# rounded up.
mem_per_conn_kib=20

low=0
notes=0
lows=()
row() { # STATUS NAME FOUND WANT [WHY]
    local status=$1 name=$2 found=$3 want=$4 why=${5:-}
    [ "$status" = LOW ] || [ "$status" = note ] || why=
    printf '%-5s %-34s %-24s %-26s %s\n' "$status" "$name" "$found" "$want" "$why" |
        sed 's/ *$//'
    case "$status" in
        LOW) low=$((low + 1)); lows+=("$name") ;;
        note) notes=$((notes + 1)) ;;
    esac
}

# The value of a sysctl: from the live host, or from the --conf file
# (the last assignment wins, as in sysctl.d). Empty when unknown.
sysctl_value() {
    local key=$1
    if [ -n "$conf" ]; then
        sed -n "s/^-\{0,1\}[[:space:]]*${key//./\\.}[[:space:]]*=[[:space:]]*//p" "$conf" |
            tail -n1 | tr -s ' \t' ' ' | sed 's/[[:space:]]*$//'
    else
        local path=/proc/sys/${key//.//}
        if [ -r "$path" ]; then
            tr -s ' \t' ' ' <"$path" | sed 's/[[:space:]]*$//'
        fi
    fi
}

# Numbers can exceed 64 bits only in theory (fs.file-max is LONG_MAX at
# most), so bash arithmetic is enough; "unlimited" counts as the maximum.
num() { [ "$1" = unlimited ] && echo 9223372036854775807 || echo "$1"; }
at_least() { # NAME FOUND WANT WHY [STATUS-IF-LOW]
    local name=$1 found=$2 want=$3 why=$4 weak=${5:-LOW}
    if [ -z "$found" ]; then
        row "$weak" "$name" "(not set)" ">= $want" "$why"
    elif [ "$(num "$found")" -ge "$want" ]; then
        row ok "$name" "$found" ">= $want"
    else
        row "$weak" "$name" "$found" ">= $want" "$why"
    fi
}

kernel_at_least() { # MAJOR MINOR: is the running kernel at least that?
    local k maj min
    k=$(uname -r)
    maj=${k%%.*}
    min=${k#*.}
    min=${min%%[!0-9]*}
    [ "$maj" -gt "$1" ] || { [ "$maj" -eq "$1" ] && [ "$min" -ge "$2" ]; }
}

if [ -n "$conf" ]; then
    echo "shardcast host check: $conf, for $conns connections"
else
    cores=$(nproc 2>/dev/null || echo '?')
    mem_kib=$(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo)
    echo "shardcast host check: $(uname -n), for $conns connections (--connections N to change)"
    echo "host: Linux $(uname -r), $cores cores, $((mem_kib / 1024 / 1024)) GiB memory" \
        "($((mem_kib / 1024)) MiB)"
fi
echo
printf '%-5s %-34s %-24s %-26s %s\n' "" setting found want "what it caps"

# --- descriptors ---------------------------------------------------------
at_least fs.nr_open "$(sysctl_value fs.nr_open)" "$nofile" \
    "ceiling of every RLIMIT_NOFILE: the unit's LimitNOFILE=1100000 fails to apply (205/LIMITS)"
at_least fs.file-max "$(sysctl_value fs.file-max)" "$file_max" \
    "system-wide open files: accept fails with ENFILE"
if [ -z "$conf" ]; then
    at_least "nofile soft (this shell)" "$(ulimit -Sn)" "$nofile" \
        "shardcast/bench started from this shell hit EMFILE (the systemd unit sets its own)"
    at_least "nofile hard (this shell)" "$(ulimit -Hn)" "$nofile" \
        "soft limit cannot be raised past it; see shardcast.limits.conf"
    if [ "$(ps -p 1 -o comm= 2>/dev/null)" = systemd ] &&
        [ "$(systemctl show -P LoadState shardcast.service 2>/dev/null)" = loaded ]; then
        at_least "LimitNOFILE (shardcast.service)" \
            "$(systemctl show -P LimitNOFILE shardcast.service)" "$nofile" \
            "the installed unit caps the server's descriptors"
    else
        row info "LimitNOFILE (shardcast.service)" "(not installed)" ">= $nofile"
    fi
fi

# --- accept path -----------------------------------------------------------
at_least net.core.somaxconn "$(sysctl_value net.core.somaxconn)" "$backlog" \
    "clamps every listen backlog: reconnect storms overflow it, clients wait on SYN retries"
at_least net.ipv4.tcp_max_syn_backlog "$(sysctl_value net.ipv4.tcp_max_syn_backlog)" \
    "$syn_backlog" "half-open connections per listener (then SYN cookies)"
at_least net.core.netdev_max_backlog "$(sysctl_value net.core.netdev_max_backlog)" \
    "$netdev_backlog" "per-CPU input queue: packets dropped in bursts (and on loopback)"
migrate=$(sysctl_value net.ipv4.tcp_migrate_req)
if [ -z "$conf" ] && [ -z "$migrate" ]; then
    row note net.ipv4.tcp_migrate_req "(no such knob)" "= 1" \
        "kernel < 5.14: a closing SO_REUSEPORT listener resets its pending connections"
elif [ "$migrate" = 1 ]; then
    row ok net.ipv4.tcp_migrate_req "$migrate" "= 1"
else
    row LOW net.ipv4.tcp_migrate_req "${migrate:-(not set)}" "= 1" \
        "pending connections of a closing shard listener are reset, not migrated"
fi
if [ -z "$conf" ]; then
    syncookies=$(sysctl_value net.ipv4.tcp_syncookies)
    if [ "$syncookies" = 0 ]; then
        row note net.ipv4.tcp_syncookies 0 ">= 1" "SYN floods and storms beyond the SYN backlog are dropped"
    else
        row ok net.ipv4.tcp_syncookies "$syncookies" ">= 1"
    fi
    # Column 2 of softnet_stat: packets dropped because the backlog was full.
    drops=0
    while read -r _ d _; do drops=$((drops + 16#$d)); done </proc/net/softnet_stat
    if [ "$drops" -gt 0 ]; then
        row note "softnet backlog drops (boot)" "$drops" "0" "netdev_max_backlog was too small at some point"
    else
        row ok "softnet backlog drops (boot)" 0 0
    fi
fi

# --- TCP memory --------------------------------------------------------------
tcp_mem=$(sysctl_value net.ipv4.tcp_mem)
want_mem="$tcp_mem_low $tcp_mem_pressure $tcp_mem_high"
read -r _ mem_p mem_h <<<"${tcp_mem:-0 0 0}"
if [ -n "$tcp_mem" ] && [ "$mem_p" -ge "$tcp_mem_pressure" ] && [ "$mem_h" -ge "$tcp_mem_high" ]; then
    row ok net.ipv4.tcp_mem "$tcp_mem" ">= $want_mem"
else
    row LOW net.ipv4.tcp_mem "${tcp_mem:-(not set)}" ">= $want_mem" \
        "pages: under pressure the kernel shrinks windows; at the limit it drops (\"TCP: out of memory\")"
fi
if [ -z "$conf" ] && [ -n "$tcp_mem" ] && [ $((mem_h * page / 1024)) -gt $((mem_kib * 6 / 10)) ]; then
    row note "tcp_mem hard limit vs memory" "$((mem_h * page / 1024 / 1024)) MiB" \
        "<= $((mem_kib * 6 / 10 / 1024)) MiB" "above 60% of memory: TCP buffers can starve everything else"
fi
for key in net.ipv4.tcp_rmem net.ipv4.tcp_wmem; do
    v=$(sysctl_value "$key")
    read -r bmin _ bmax <<<"${v:-0 0 0}"
    if [ -z "$v" ]; then
        row note "$key" "(not set)" "4096 16384 $tcp_buf_max" "per-socket buffers; see TUNING.md"
    elif [ "$bmin" -gt 4096 ] || [ "$bmax" -gt "$tcp_buf_max" ]; then
        row note "$key" "$v" "4096 16384 $tcp_buf_max" \
            "min > 4 KiB costs memory on every socket; max > 1 MiB lets slow clients pin more"
    else
        row ok "$key" "$v" "min 4096, max <= $tcp_buf_max"
    fi
done

# --- ports -----------------------------------------------------------------
range=$(sysctl_value net.ipv4.ip_local_port_range)
read -r lo hi <<<"${range:-0 -1}"
at_least "ephemeral ports (port_range)" "$((hi - lo + 1))" "$port_range" \
    "outgoing connections per source IP: load generator or proxy on this host (${range:-unset})"

# --- conntrack ---------------------------------------------------------------
ct=$(sysctl_value net.netfilter.nf_conntrack_max)
if [ -z "$conf" ] && [ -z "$ct" ]; then
    row ok net.netfilter.nf_conntrack_max "(not loaded)" ">= $conntrack"
else
    at_least net.netfilter.nf_conntrack_max "$ct" "$conntrack" \
        "the firewall drops new connections when the table is full"
fi

# --- io_uring ----------------------------------------------------------------
uring=$(sysctl_value kernel.io_uring_disabled)
if [ -z "$conf" ] && [ -z "$uring" ]; then
    if kernel_at_least 5 6; then
        row ok kernel.io_uring_disabled "(no knob: on)" "= 0"
    else
        row LOW "kernel version" "$(uname -r)" ">= 5.6" "io_uring unusable: shardcast runs on epoll"
    fi
elif [ "$uring" = 0 ]; then
    row ok kernel.io_uring_disabled "$uring" "= 0"
else
    why="1 = only kernel.io_uring_group may use it, 2 = off: shardcast falls back to epoll"
    row LOW kernel.io_uring_disabled "${uring:-(not set)}" "= 0" "$why"
fi
if [ -z "$conf" ]; then
    if kernel_at_least 5 12; then
        row ok "memlock (this shell)" "$(ulimit -l) KiB" "(not needed >= 5.12)"
    else
        at_least "memlock KiB (this shell)" "$(ulimit -l)" "$memlock_kib" \
            "kernel < 5.12 charges io_uring rings to memlock: ring setup fails, epoll fallback"
    fi
fi

# --- memory, cores, maps -----------------------------------------------------
if [ -z "$conf" ]; then
    want_kib=$((conns * mem_per_conn_kib))
    if [ "$mem_kib" -ge "$want_kib" ]; then
        row ok "memory" "$((mem_kib / 1024)) MiB" ">= $((want_kib / 1024)) MiB"
    else
        row LOW "memory" "$((mem_kib / 1024)) MiB" ">= $((want_kib / 1024)) MiB" \
            "~20 KiB per connection (kernel socket state, shardcast, TCP buffers up to tcp_mem's limit)"
    fi
    row info "cores (= shards by default)" "$cores" "-"
    maps=$(sysctl_value vm.max_map_count)
    if [ "${maps:-0}" -ge 65530 ]; then
        row ok vm.max_map_count "$maps" ">= 65530"
    else
        row note vm.max_map_count "${maps:-?}" ">= 65530" "below the kernel default: large heaps may fail to map"
    fi
fi

echo
if [ "$low" -eq 0 ]; then
    echo "summary: nothing below target for $conns connections ($notes notes)"
else
    echo "summary: $low below target for $conns connections: ${lows[*]}"
    if [ -z "$conf" ]; then
        echo "fix: tuning/99-shardcast.conf -> /etc/sysctl.d/ (then sysctl --system)," \
            "tuning/shardcast.limits.conf -> /etc/security/limits.d/; see tuning/TUNING.md"
    fi
fi
if [ "$strict" = 1 ] && [ "$low" -gt 0 ]; then
    exit 1
fi
exit 0
