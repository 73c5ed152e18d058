#!/usr/bin/env bash
# cinflow's preprocessing against the OpenCV reference path, both on one thread, on the
# same synthetic 2560x1920 slide (PNG and JPEG): prints our/OpenCV time ratios for CLAHE,
# resize, JPEG decode and the whole path (decode, CLAHE, resize, normalise), and the
# largest grey-level difference of each output. About a minute once the release build
# exists (the first build of the example takes longer).
#
#   bash scripts/bench-preprocess.sh [REPEAT] [ROUNDS]    (defaults 10 and 2)
#
# The two sides alternate ROUNDS times and the best of REPEAT runs of each stage is kept,
# which evens out background load; still, trust the ratios only on an idle machine.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${CINFLOW_PYTHON:-$root/.venv/bin/python}"
if ! "$py" -c "import cv2" 2>/dev/null; then
  echo "OpenCV is not importable with $py: run scripts/setup.sh" >&2
  exit 1
fi

cargo build --release --quiet --example bench_preprocess
exec "$py" tools/bench_preprocess_opencv.py bench --repeat "${1:-10}" --rounds "${2:-2}"
