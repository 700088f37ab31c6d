#!/usr/bin/env bash
# Regenerate the committed Rust code of the native wire protocol.
#
#   schemas/generate.sh           rewrite src/protocol/wire/shardcast_generated.rs
#   schemas/generate.sh --check   regenerate into a temp dir; exit 1 if the
#                                 committed file differs (for CI)
#
# The flatc used is 23.5.26, built from source by the crates.io `flatc` crate
# through the helper project schemas/flatc-bin (needs cmake and a C++
# compiler; 2-3 minutes on 2 cores, once) and cached as
# target/flatc/flatc-23.5.26. Its Rust output compiles against the
# `flatbuffers` 25.x crate; Debian's flatc 2.0.8 output does not, so a flatc
# from PATH is never used. FLATC=/path/to/flatc overrides the binary, but only
# a 23.5.26 one is accepted. With CI=true and root, a missing cmake is
# installed with apt-get.
set -euo pipefail

FLATC_VERSION="23.5.26"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCHEMA="$ROOT/schemas/shardcast.fbs"
OUT="$ROOT/src/protocol/wire/shardcast_generated.rs"
CACHE="$ROOT/target/flatc"

check=0
case "${1:-}" in
  "") ;;
  --check) check=1 ;;
  -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

build_flatc() {
  if ! command -v cmake >/dev/null 2>&1; then
    # In CI (fresh machine, root) install it; elsewhere say what is missing.
    if [ "${CI:-}" = "true" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "generate.sh: installing cmake (needed to build flatc)" >&2
      DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >&2
    else
      echo "generate.sh: cmake is needed to build flatc $FLATC_VERSION (Debian: apt-get install -y cmake)" >&2
      exit 1
    fi
  fi
  echo "generate.sh: building flatc $FLATC_VERSION (crates.io flatc crate, one-time, a few minutes)..." >&2
  local built
  built="$(CARGO_TARGET_DIR="$CACHE/build" cargo run --quiet --locked \
    --manifest-path "$ROOT/schemas/flatc-bin/Cargo.toml")"
  mkdir -p "$CACHE"
  cp "$built" "$CACHE/flatc-$FLATC_VERSION.tmp"
  mv "$CACHE/flatc-$FLATC_VERSION.tmp" "$CACHE/flatc-$FLATC_VERSION"
}

FLATC="${FLATC:-$CACHE/flatc-$FLATC_VERSION}"
if [ ! -x "$FLATC" ]; then
  if [ "$FLATC" != "$CACHE/flatc-$FLATC_VERSION" ]; then
    echo "generate.sh: FLATC=$FLATC is not an executable" >&2
    exit 1
  fi
  build_flatc
fi
got="$("$FLATC" --version 2>/dev/null || true)"
if [ "$got" != "flatc version $FLATC_VERSION" ]; then
  echo "generate.sh: $FLATC reports '$got', need 'flatc version $FLATC_VERSION'" >&2
  exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$FLATC" --rust -o "$tmp" "$SCHEMA"
{
  echo "// GENERATED FILE, DO NOT EDIT. Source: schemas/shardcast.fbs."
  echo "// Regenerate with schemas/generate.sh (flatc $FLATC_VERSION); CI runs"
  echo "// schemas/generate.sh --check. Formatting and lints are relaxed for this"
  echo "// file by the attributes on its \`mod\` item in src/protocol/wire/mod.rs."
  cat "$tmp/shardcast_generated.rs"
} > "$tmp/out.rs"

rel="${OUT#"$ROOT"/}"
if [ "$check" = 1 ]; then
  if [ ! -f "$OUT" ]; then
    echo "generate.sh --check: $rel is missing; run schemas/generate.sh" >&2
    exit 1
  fi
  if ! cmp -s "$tmp/out.rs" "$OUT"; then
    echo "generate.sh --check: $rel is out of date with schemas/shardcast.fbs" >&2
    echo "(or was edited by hand); run schemas/generate.sh and commit the result." >&2
    diff -u "$OUT" "$tmp/out.rs" | head -n 60 >&2 || true
    exit 1
  fi
  echo "generate.sh --check: $rel is up to date"
else
  cp "$tmp/out.rs" "$OUT"
  echo "generate.sh: wrote $rel"
fi
