#!/bin/bash
# Compose `seed-images` service (amazon/aws-cli image): uploads the demo's
# SYNTHETIC images (not clinical data) from ./demo-out/data (mounted read-only at
# /demo) to the compose Garage, bucket `cinflow`:
#
#   s3://cinflow/demo/data/            every image and labels.csv: the labels
#                                      manifest for `cinflow enqueue-train` (its
#                                      paths are keys relative to the manifest)
#   s3://cinflow/incoming/<patient>/   the images of the last 12 patients, one
#                                      folder per slide, for
#                                      `cinflow enqueue --prefix s3://cinflow/incoming/`
#
# Idempotent: a second run uploads nothing new (sync).
set -euo pipefail

data=/demo/data
if [ ! -f "$data/labels.csv" ]; then
  echo "seed-images: no ./demo-out/data/labels.csv: run \`make demo\` on the host first" >&2
  exit 1
fi

echo "seed-images: uploading $data to s3://cinflow/demo/data/" >&2
aws s3 sync --only-show-errors --exclude '*' \
  --include '*.jpg' --include '*.jpeg' --include '*.png' --include '*.tif' --include '*.tiff' \
  --include 'labels.csv' \
  "$data/" s3://cinflow/demo/data/

# labels.csv: path,label,patient_id (header first); one slide per patient.
rows="$(tail -n +2 "$data/labels.csv" | tr -d '\r')"
patients="$(printf '%s\n' "$rows" | cut -d, -f3 | sort -u | tail -n 12)"
for p in $patients; do
  includes=()
  while IFS=, read -r path _label patient; do
    if [ "$patient" = "$p" ]; then includes+=(--include "$path"); fi
  done <<< "$rows"
  aws s3 sync --only-show-errors --exclude '*' "${includes[@]}" \
    "$data/" "s3://cinflow/incoming/${p}/"
done
echo "seed-images: $(printf '%s\n' "$patients" | wc -l) slides under s3://cinflow/incoming/" >&2
