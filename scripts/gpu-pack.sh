#!/usr/bin/env bash
# Packs what scripts/gpu-check.sh needs on a GPU machine that has no cargo and
# no onnxruntime-gpu: the release cinflow binary and onnxruntime-gpu 1.31.1's
# libraries, in four folders of at most 60 MiB each (what one device call can
# carry; docs/gpu.md has the calls):
#
#   .gpu/p1 .gpu/p2 .gpu/p3   libonnxruntime_providers_cuda.so, zstd -19, in parts
#   .gpu/base                 its last part, cinflow and libonnxruntime.so.1.31.1 (zstd -19),
#                             libonnxruntime_providers_shared.so and
#                             libonnxruntime_providers_tensorrt.so, SHA256SUMS
#
#   bash scripts/gpu-pack.sh [--cinflow PATH] [--out .gpu]
#
# The onnxruntime-gpu wheel is downloaded once (pip, ~250 MB) into the cache.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="$root/.gpu"
cinflow="${CARGO_TARGET_DIR:-$root/target}/release/cinflow"
version=1.31.1
limit=$((60 * 1024 * 1024))
while [ $# -gt 0 ]; do
  case "$1" in
    --cinflow) cinflow="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "gpu-pack.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -x "$cinflow" ] || { echo "gpu-pack.sh: no cinflow binary at $cinflow (cargo build --release, or --cinflow)" >&2; exit 1; }
py="${PYTHON:-$root/.venv/bin/python}"
command -v "$py" >/dev/null 2>&1 || py=python3

if ! command -v zstd >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq zstd; } >/dev/null
  fi
  command -v zstd >/dev/null 2>&1 || { echo "gpu-pack.sh: zstd is needed (apt-get install zstd)" >&2; exit 1; }
fi

cache="${CINFLOW_CACHE:-$HOME/.cache/cinflow}/onnxruntime-gpu-$version"
mkdir -p "$cache"
wheel="$(ls "$cache"/onnxruntime_gpu-$version-*.whl 2>/dev/null | head -n1 || true)"
if [ -z "$wheel" ]; then
  "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 -d "$cache" "onnxruntime-gpu==$version"
  wheel="$(ls "$cache"/onnxruntime_gpu-$version-*.whl | head -n1)"
fi

libs="$cache/lib"
if [ ! -f "$libs/.complete" ]; then
  mkdir -p "$libs"
  "$py" - "$wheel" "$libs" <<'EOF'
import os, shutil, sys, zipfile
wanted = {"libonnxruntime.so.1.31.1", "libonnxruntime_providers_shared.so",
          "libonnxruntime_providers_cuda.so", "libonnxruntime_providers_tensorrt.so"}
with zipfile.ZipFile(sys.argv[1]) as z:
    for info in z.infolist():
        name = os.path.basename(info.filename)
        if info.filename.startswith("onnxruntime/capi/") and name in wanted:
            with z.open(info) as src, open(os.path.join(sys.argv[2], name), "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 24)
            wanted.discard(name)
if wanted:
    sys.exit(f"not in the wheel: {sorted(wanted)}")
EOF
  zstd -q -19 -T0 -f "$libs/libonnxruntime_providers_cuda.so" -o "$libs/cuda.zst"
  touch "$libs/.complete"
fi

rm -rf "$out"
mkdir -p "$out"/p1 "$out"/p2 "$out"/p3 "$out"/base
zstd -q -19 -T0 -f "$cinflow" -o "$out/base/cinflow.zst"
zstd -q -19 -T0 -f "$libs/libonnxruntime.so.$version" -o "$out/base/libonnxruntime.so.$version.zst"
cp "$libs/libonnxruntime_providers_shared.so" "$libs/libonnxruntime_providers_tensorrt.so" "$out/base/"
# The CUDA provider compresses to ~186 MB (its GPU kernels do not compress
# much): three equal parts go to p1..p3 and the rest to base, sized so that the
# four folders come out about equal.
total=$(stat -c %s "$libs/cuda.zst")
other=$(du -sb "$out/base" | cut -f1)
part=$(( (total + other + 3) / 4 ))
[ "$part" -le "$total" ] || part=$(( (total + 2) / 3 ))
split -b "$part" -d -a 1 "$libs/cuda.zst" "$out/cuda.zst.part"
mv "$out/cuda.zst.part0" "$out/p1/"
mv "$out/cuda.zst.part1" "$out/p2/"
mv "$out/cuda.zst.part2" "$out/p3/"
[ ! -e "$out/cuda.zst.part3" ] || mv "$out/cuda.zst.part3" "$out/base/"
{
  (cd "$(dirname "$cinflow")" && sha256sum cinflow)
  (cd "$libs" && sha256sum "libonnxruntime.so.$version" libonnxruntime_providers_shared.so \
    libonnxruntime_providers_tensorrt.so libonnxruntime_providers_cuda.so)
} >"$out/base/SHA256SUMS"

for d in p1 p2 p3 base; do
  size=$(du -sb "$out/$d" | cut -f1)
  awk -v d="$d" -v s="$size" 'BEGIN { printf "%-5s %6.1f MiB\n", d, s / 1048576 }'
  [ "$size" -lt "$limit" ] || { echo "gpu-pack.sh: $out/$d is over 60 MiB" >&2; exit 1; }
done
