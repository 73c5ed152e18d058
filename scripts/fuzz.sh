#!/usr/bin/env bash
# Coverage-guided fuzzing of the message parsers and the image decoders (docs/fuzzing.md).
#
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Builds fuzz/ with the stable toolchain: libFuzzer (libfuzzer-sys, compiled from source
# with the system C++ compiler) and LLVM's SanitizerCoverage pass turned on through plain
# -C codegen flags, the flags `cargo fuzz build -s none` passes, without the -Z sanitizer
# flags that need nightly. Each target then runs for SECONDS_PER_TARGET (default
# $FUZZ_SECONDS, else 600) on its corpus in $CINFLOW_CACHE/fuzz (kept between runs),
# seeded from fuzz/seeds/<target>. Exits non-zero when any target finds a crash, a
# timeout or an out-of-memory input; the input is saved under
# $CINFLOW_CACHE/fuzz/artifacts/<target>/ and its path printed.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cache="${CINFLOW_CACHE:-$HOME/.cache/cinflow}"
seconds="${1:-${FUZZ_SECONDS:-600}}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(job train decode_jpeg decode_png decode_tiff)

log() { printf '[fuzz] %s\n' "$*" >&2; }

# libFuzzer is C++; mozjpeg-sys (libjpeg-turbo) needs the C compiler as the main build does.
if ! command -v c++ >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing g++ (apt-get) for libFuzzer"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++; } >/dev/null
  else
    echo "no C++ compiler: libFuzzer needs one (Debian: apt-get install g++)" >&2
    exit 1
  fi
fi

host="$(rustc -vV | sed -n 's/^host: //p')"
# Its own target folder: these flags would rebuild everything in the shared one.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$cache/target-fuzz}"
# Instrumentation for the target crates only: with --target, RUSTFLAGS skip build
# scripts and proc macros, which must not link against libFuzzer.
export RUSTFLAGS="-Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares \
 --cfg fuzzing -Cforce-frame-pointers"
log "building fuzz targets ($CARGO_TARGET_DIR)"
start=$(date +%s)
cargo build --release --locked --manifest-path fuzz/Cargo.toml --target "$host" --bins
log "built in $(( $(date +%s) - start )) s"
bin="$CARGO_TARGET_DIR/$host/release"

failed=()
summary="$cache/fuzz/last-run.txt"
mkdir -p "$cache/fuzz"
printf '%-12s %8s %14s %10s %8s  %s\n' target seconds executions exec/s corpus result | tee "$summary"
for t in "${targets[@]}"; do
  corpus="$cache/fuzz/corpus/$t"
  artifacts="$cache/fuzz/artifacts/$t"
  out="$cache/fuzz/$t.log"
  mkdir -p "$corpus" "$artifacts"
  set +e
  # -timeout: one input taking over 10 s is a finding (a decoder must refuse slowly
  # decoded bombs too); -rss_limit_mb: 2 GB, far above what a 1-megapixel image needs.
  "$bin/$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$artifacts/" \
    "$corpus" "fuzz/seeds/$t" >"$out" 2>&1
  rc=$?
  set -e
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out" | tail -n1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$out" | tail -n1)
  files=$(find "$corpus" -type f | wc -l)
  if [ "$rc" = 0 ]; then result=ok; else result="FAILED (exit $rc, log $out)"; failed+=("$t"); fi
  printf '%-12s %8s %14s %10s %8s  %s\n' "$t" "$seconds" "${execs:-?}" "${rate:-?}" "$files" "$result" | tee -a "$summary"
  if [ "$rc" != 0 ]; then
    grep -E '^(==[0-9]+==|SUMMARY|.*panicked at|artifact_prefix|Test unit written)' "$out" | head -n 20 >&2 || true
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzzing found failures in: ${failed[*]} (inputs under $cache/fuzz/artifacts)" >&2
  exit 1
fi
