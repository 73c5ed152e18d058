#!/usr/bin/env bash
# The GPU check of docs/gpu.md, in one call: ONNX Runtime's CUDA execution
# provider on a random-weight DenseNet-161, bare and end to end, and the
# probabilities it gives against the CPU's.
#
#   bash scripts/gpu-check.sh [--unpack .gpu] [--device cuda|cpu] [--images N]
#        [--arch densenet161|tiny] [--cinflow PATH] [--ort-lib PATH] [--out DIR]
#
# Steps (each one's output also goes to OUT/report.txt; machine-readable parts
# to OUT/bench.jsonl and OUT/report.json):
#   0. --unpack DIR: rebuilds the cinflow binary and the onnxruntime-gpu
#      libraries from the folders scripts/gpu-pack.sh wrote (DIR/p1..p3, DIR/base).
#   1. check-runtime for the device (and, on cuda, whether TensorRT starts).
#   2. exports the backbone twice with random weights at 800x600 (float32 and
#      --fp16) with tools/export_backbone.py.
#   (a) bench-backbone: bare ONNX Runtime images/s at batch 1, 8, 32 for
#       float32, float32 with TF32, and float16.
#   (b) classify N synthetic 2560x1920 JPEGs end to end with all cores: images/s
#       and the share of wall time spent in the backbone (sum of the results'
#       timings.infer_ms / wall time; every timings field is summed and shown).
#   (c) the same images (the first --compare of them) on the CPU: the largest
#       probability difference of the device's float32, TF32 and float16 runs
#       against the CPU's float32 run (summary.csv).
# --device cpu runs every step on the CPU with small counts (8 images, batches
# 1 and 2), which is how the script is tested without a GPU.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

device=cuda
images=""
arch=densenet161
cinflow=""
ort_lib=""
out="$root/gpu-check-out"
unpack=""
compare=""
batches=""
iters=""
work="${CINFLOW_GPU_WORK:-/tmp/cinflow-gpu-check}"
py="${PYTHON:-}"

usage() { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --images) images="$2"; shift 2 ;;
    --arch) arch="$2"; shift 2 ;;
    --cinflow) cinflow="$2"; shift 2 ;;
    --ort-lib) ort_lib="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --unpack) unpack="$2"; shift 2 ;;
    --compare) compare="$2"; shift 2 ;;
    --batches) batches="$2"; shift 2 ;;
    --iters) iters="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu-check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$device" in
  cuda) images="${images:-256}"; compare="${compare:-32}"; batches="${batches:-1 8 32}"; iters="${iters:-20}"; max_batch=32 ;;
  cpu) images="${images:-8}"; compare="${compare:-8}"; batches="${batches:-1 2}"; iters="${iters:-2}"; max_batch=8 ;;
  *) echo "gpu-check.sh: --device must be cuda or cpu" >&2; exit 2 ;;
esac
case "$arch" in densenet161|tiny) ;; *) echo "gpu-check.sh: --arch must be densenet161 or tiny" >&2; exit 2 ;; esac
[ "$compare" -le "$images" ] || compare="$images"

if [ -z "$py" ]; then
  for p in /opt/torch/.venv/bin/python3 "$root/.venv/bin/python" python3; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c "import torch, onnx, onnxruntime" 2>/dev/null; then
      py="$p"; break
    fi
  done
fi
[ -n "$py" ] || { echo "gpu-check.sh: no python with torch, onnx and onnxruntime" >&2; exit 1; }

mkdir -p "$out" "$work"
out="$(cd "$out" && pwd)"
report="$out/report.txt"
: >"$report"
say() { printf '%s\n' "$*" | tee -a "$report"; }
started=$(date +%s)

# --- 0. Unpack ---------------------------------------------------------------
decompress() { # FILE.zst -> FILE (zstd when installed, else pyarrow)
  if command -v zstd >/dev/null 2>&1; then
    zstd -q -d -f "$1" -o "$2"
  else
    "$py" - "$1" "$2" <<'EOF'
import shutil, sys
import pyarrow as pa
with pa.CompressedInputStream(pa.OSFile(sys.argv[1]), "zstd") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 24)
EOF
  fi
}
if [ -n "$unpack" ]; then
  unpack="$(cd "$unpack" && pwd)"
  lib="$work/lib"
  mkdir -p "$lib"
  t0=$(date +%s)
  cat "$unpack"/p1/cuda.zst.part* "$unpack"/p2/cuda.zst.part* "$unpack"/p3/cuda.zst.part* \
    $(ls "$unpack"/base/cuda.zst.part* 2>/dev/null) >"$work/cuda.zst"
  decompress "$work/cuda.zst" "$lib/libonnxruntime_providers_cuda.so"
  rm -f "$work/cuda.zst"
  for f in "$unpack"/base/*.zst; do
    decompress "$f" "$lib/$(basename "$f" .zst)"
  done
  for f in "$unpack"/base/*.so; do cp -f "$f" "$lib/"; done
  chmod +x "$lib/cinflow"
  (cd "$lib" && sha256sum -c --quiet "$unpack/base/SHA256SUMS")
  cinflow="${cinflow:-$lib/cinflow}"
  ort_lib="${ort_lib:-$lib/libonnxruntime.so.1.31.1}"
  say "unpacked $unpack into $work in $(( $(date +%s) - t0 ))s (checksums match)"
fi
cinflow="${cinflow:-${CARGO_TARGET_DIR:-$root/target}/release/cinflow}"
ort_lib="${ort_lib:-${ORT_DYLIB_PATH:-$root/.venv/cinflow-lib/libonnxruntime.so}}"
[ -x "$cinflow" ] || { echo "gpu-check.sh: no cinflow binary at $cinflow (--cinflow)" >&2; exit 1; }
[ -e "$ort_lib" ] || { echo "gpu-check.sh: no ONNX Runtime at $ort_lib (--ort-lib)" >&2; exit 1; }
export ORT_DYLIB_PATH="$ort_lib"

# The CUDA, cuDNN and cuBLAS libraries of the nvidia-* wheels beside torch.
nv_libs="$("$py" - <<'EOF'
import glob, os, site, sys
roots = list(site.getsitepackages()) + [site.getusersitepackages()]
try:
    import nvidia
    roots += [os.path.dirname(p) for p in nvidia.__path__]
except ImportError:
    pass
dirs = []
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib"))):
        if os.path.realpath(d) not in map(os.path.realpath, dirs):
            dirs.append(d)
print(":".join(dirs))
EOF
)"
export LD_LIBRARY_PATH="$(dirname "$ort_lib")${nv_libs:+:$nv_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export RUST_LOG="${RUST_LOG:-warn}"

say "== gpu-check: device $device, arch $arch, $images images (compare $compare), batches [$batches], $iters iterations"
say "cinflow: $cinflow ($("$cinflow" --version))"
say "ONNX Runtime: $ort_lib"
say "python: $py; nvidia library folders: $(tr ':' '\n' <<<"$nv_libs" | grep -c . || true)"
say "cores: $(nproc)"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/gpu: /' | tee -a "$report"
fi

# --- 1. Runtime ----------------------------------------------------------------
say ""
say "== check-runtime --device $device"
"$cinflow" check-runtime --device "$device" 2>&1 | tee -a "$report"
if [ "$device" = cuda ]; then
  say "== check-runtime --device tensorrt (needs the TensorRT libraries; a clear error is fine)"
  "$cinflow" check-runtime --device tensorrt 2>&1 | tail -n 3 | tee -a "$report" || true
fi

# --- 2. Bundles ------------------------------------------------------------------
export_bundle() { # NAME EXTRA-ARGS...
  local dir="$work/bundles/$arch-$1"; shift
  if [ ! -f "$dir/manifest.json" ]; then
    local t0; t0=$(date +%s)
    "$py" tools/export_backbone.py --arch "$arch" --classes 4 --seed 7 --out "$dir" --force "$@" \
      >"$work/export-$(basename "$dir").log" 2>&1 \
      || { cat "$work/export-$(basename "$dir").log" >&2; exit 1; }
    say "exported $(basename "$dir") in $(( $(date +%s) - t0 ))s: $(grep -E '^(verified|float16)' "$work/export-$(basename "$dir").log" | tr '\n' ' ')" >&2
  fi
  printf '%s' "$dir"
}
say ""
say "== bundles (random weights, 800x600)"
b32="$(export_bundle fp32)"
b16="$(export_bundle fp16 --fp16)"

# --- (a) Bare backbone ---------------------------------------------------------------
say ""
say "== (a) bare backbone (bench-backbone, $iters timed runs after a warm-up run)"
: >"$out/bench.jsonl"
printf '%-6s %5s %12s %12s %12s  %s\n' precision batch images/s ms/batch warmup_ms provider | tee -a "$report"
for variant in fp32 tf32 fp16; do
  case "$variant" in
    fp32) model="$b32"; extra=(--tf32 false) ;;
    tf32) model="$b32"; extra=(--tf32 true) ;;
    fp16) model="$b16"; extra=(--tf32 false) ;;
  esac
  for n in $batches; do
    line="$("$cinflow" bench-backbone --model "$model" --batch "$n" --iters "$iters" --device "$device" "${extra[@]}")"
    printf '{"variant":"%s",%s\n' "$variant" "${line#\{}" >>"$out/bench.jsonl"
    "$py" -c 'import json, sys; r = json.loads(sys.argv[1]); print("%-6s %5d %12.2f %12.2f %12.0f  %s io_binding=%s" % (sys.argv[2], r["batch"], r["images_per_s"], r["ms_per_batch"], r["warm_up_ms"], r["provider"], r["io_binding"]))' "$line" "$variant" | tee -a "$report"
  done
done

# --- (b) End to end ----------------------------------------------------------------------
say ""
say "== (b) classify $images synthetic 2560x1920 JPEGs end to end ($(nproc) cores)"
imgs="$work/images-$images"
if [ ! -f "$imgs/labels.csv" ]; then
  "$cinflow" synth --out "$imgs" --n "$images" --size 2560x1920 --seed 11 2>/dev/null
fi
mapfile -t all < <(find "$imgs" -name '*.jpg' | sort)
[ "${#all[@]}" -eq "$images" ] || { echo "gpu-check.sh: expected $images images in $imgs" >&2; exit 1; }
sub="$work/images-$images-first-$compare"
rm -rf "$sub" && mkdir -p "$sub"
for f in "${all[@]:0:$compare}"; do ln -s "$f" "$sub/"; done

classify() { # NAME DEVICE MODEL INPUT EXTRA... ; prints wall seconds
  local dir="$work/classify-$1" dev="$2" model="$3" input="$4"; shift 4
  rm -rf "$dir"
  local t0 t1
  t0=$(date +%s.%N)
  "$cinflow" classify --model "$model" --out "$dir" --device "$dev" --max-batch "$max_batch" "$@" "$input" \
    2>"$work/classify-$(basename "$dir").log" \
    || { cat "$work/classify-$(basename "$dir").log" >&2; exit 1; }
  t1=$(date +%s.%N)
  "$py" -c "print(f'{$t1 - $t0:.3f}')"
}
wall_e2e="$(classify e2e "$device" "$b32" "$imgs")"
"$py" - "$work/classify-e2e" "$wall_e2e" "$images" "$out/report.json" <<'EOF' | tee -a "$report"
import json, pathlib, sys
d, wall, n, path = pathlib.Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
sums, count, providers = {}, 0, set()

def visit(o):
    global count
    if isinstance(o, dict):
        for k in ("execution_provider", "provider"):
            if isinstance(o.get(k), str):
                providers.add(o[k])
        t = o.get("timings")
        if isinstance(t, dict):
            count += 1
            for k, v in t.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    sums[k] = sums.get(k, 0.0) + float(v)
        for v in o.values():
            visit(v)
    elif isinstance(o, list):
        for v in o:
            visit(v)

for f in sorted(d.glob("*.json")):
    visit(json.loads(f.read_text()))
r = {"images": n, "wall_s": wall, "images_per_s": n / wall, "results_with_timings": count,
     "timings_sum_ms": sums, "providers": sorted(providers),
     "backbone_share": (sums.get("infer_ms", 0.0) / 1e3) / wall}
print(f"{n} images in {wall:.2f}s: {r['images_per_s']:.2f} images/s on {', '.join(sorted(providers)) or '?'}")
print(f"backbone share of wall time: {100 * r['backbone_share']:.1f}% (sum of timings.infer_ms "
      f"{sums.get('infer_ms', 0.0) / 1e3:.2f}s over {count} results)")
for k, v in sorted(sums.items()):
    print(f"  timings.{k}: sum {v / 1e3:.2f}s, mean {v / max(count, 1):.1f} ms/image")
json.dump({"end_to_end": r}, open(path, "w"), indent=2)
EOF

# --- (c) CPU against the device ----------------------------------------------------------
say ""
say "== (c) probabilities on the first $compare images: $device runs against CPU float32"
classify cpu32 cpu "$b32" "$sub" >/dev/null
classify dev32 "$device" "$b32" "$sub" >/dev/null
classify devtf32 "$device" "$b32" "$sub" --tf32 true >/dev/null
classify dev16 "$device" "$b16" "$sub" >/dev/null
"$py" - "$work" "$out/report.json" <<'EOF' | tee -a "$report"
import csv, json, pathlib, sys
work, path = pathlib.Path(sys.argv[1]), sys.argv[2]

def probs(name):
    with open(work / f"classify-{name}" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    bad = [r["key"] for r in rows if any(r[k] == "" for k in r if k.startswith("p_"))]
    if bad:
        raise SystemExit(f"classify-{name}: not graded: {bad}")
    return {r["key"]: {k: float(v) for k, v in r.items() if k.startswith("p_")} for r in rows}, \
        {r["key"]: r["predicted_class"] for r in rows}

ref, ref_cls = probs("cpu32")
out = {}
for name, label in (("dev32", "float32"), ("devtf32", "float32 + TF32"), ("dev16", "float16")):
    got, cls = probs(name)
    assert set(got) == set(ref), f"{name}: other images than the CPU run"
    diff = max(abs(got[k][c] - ref[k][c]) for k in ref for c in ref[k])
    flips = sum(cls[k] != ref_cls[k] for k in ref)
    out[name] = {"max_abs_prob_diff": diff, "predicted_class_changes": flips, "images": len(ref)}
    print(f"{label:<14} max |p - p_cpu| = {diff:.2e} over {len(ref)} images x {len(next(iter(ref.values())))} "
          f"classes; predicted class changed on {flips}")
r = json.load(open(path))
r["probabilities_vs_cpu_fp32"] = out
json.dump(r, open(path, "w"), indent=2)
EOF
cp "$work"/export-*.log "$out/" 2>/dev/null || true
say ""
say "done in $(( $(date +%s) - started ))s; report in $out"
