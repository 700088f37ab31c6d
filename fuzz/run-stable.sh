#!/usr/bin/env bash
# Build and run one fuzz target with the stable toolchain and no cargo-fuzz:
# the same coverage instrumentation cargo-fuzz uses, minus AddressSanitizer
# (a -Z flag; the code under test has no `unsafe`, so ASan adds little here).
#
#   fuzz/run-stable.sh <deframer|handshake|envelope|zstd_inbound|jwt|pusher_message|pusher_http> [seconds=60] [extra libFuzzer flags...]
#
# Corpus grows in fuzz/corpus/<target>, crashes land in fuzz/artifacts/<target>;
# reproduce one with: fuzz/run-stable.sh <target> 0 fuzz/artifacts/<target>/crash-...
set -euo pipefail
cd "$(dirname "$0")"

target=${1:?usage: run-stable.sh <deframer|handshake|envelope|zstd_inbound|jwt|pusher_message|pusher_http> [seconds] [libFuzzer flags...]}
seconds=${2:-60}
shift $(( $# >= 2 ? 2 : 1 ))

triple=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="-Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares \
 --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# --target keeps RUSTFLAGS away from build scripts (they must not be instrumented).
cargo build --bin "$target" --target "$triple"

mkdir -p "corpus/$target" "artifacts/$target"
flags=(-artifact_prefix="artifacts/$target/")
if [[ -f "$target.dict" ]]; then flags+=(-dict="$target.dict"); fi
bin="${CARGO_TARGET_DIR:-target}/$triple/debug/$target"

if [[ $# -gt 0 && -f "$1" ]]; then
  exec "$bin" "$@"  # reproduce: run the given input files once
fi
# libFuzzer exits when a corpus directory is missing; not every target has seeds.
seeds=()
if [[ -d "seeds/$target" ]]; then seeds+=("seeds/$target"); fi
exec "$bin" -max_total_time="$seconds" "${flags[@]}" "$@" "corpus/$target" ${seeds[@]+"${seeds[@]}"}
