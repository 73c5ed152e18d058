#!/usr/bin/env bash
# A whole `cinflow train` from a cold feature cache against a retrain over the same
# data plus 10% new images (new patients), with the tiny exported backbone on
# synthetic 2560x1920 slides. Prints both wall times, how many images each sent
# through the backbone, and the ratio: the cache should make the second run cost a
# small fraction of the first (head training and the report are the rest).
#
#   bash scripts/bench-retrain.sh [N]      (default 200 images; 20 more for the retrain)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
n="${1:-200}"
extra=$(( (n + 9) / 10 ))
py="${CINFLOW_PYTHON:-$root/.venv/bin/python}"
cargo build --release --quiet --all-features
bin="${CARGO_TARGET_DIR:-$root/target}/release/cinflow"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$bin" synth --out "$work/data" --n "$n" --seed 1 >/dev/null 2>&1
"$bin" synth --out "$work/new" --n "$extra" --seed 2 >/dev/null 2>&1
"$py" tools/export_backbone.py --arch tiny --classes 4 --seed 3 --out "$work/tiny" >/dev/null
# The retrain's labels: every earlier row plus the new images as new patients.
cp "$work/data/labels.csv" "$work/data/labels-plus.csv"
tail -n +2 "$work/new/labels.csv" | awk -F, -v d="$work/new" '{print d "/" $1 "," $2 ",new-" $3}' >> "$work/data/labels-plus.csv"

run() {
  local labels="$1" out="$2" t0
  t0=$("$py" -c 'import time; print(time.time())')
  "$bin" train --labels "$labels" --backbone "$work/tiny" --out "$out" --feature-cache "$work/cache" \
    --train-device cpu > "$out.log" 2>&1
  "$py" -c "import time; print(f'{time.time() - $t0:.1f}')"
}
cold=$(run "$work/data/labels.csv" "$work/cold")
warm=$(run "$work/data/labels-plus.csv" "$work/warm")
feat() { grep -o '"computed": [0-9]*' "$1/report/report.json" | grep -o '[0-9]*'; }
echo "cold retrain ($n images):            ${cold}s, $(feat "$work/cold") images through the backbone"
echo "retrain with 10% new ($((n + extra)) images): ${warm}s, $(feat "$work/warm") images through the backbone"
echo "ratio (with new / cold):             $("$py" -c "print(f'{$warm / $cold:.3f}')")"
