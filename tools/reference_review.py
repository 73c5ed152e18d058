#!/usr/bin/env python3
"""Independent figures of a trained bundle's validation review (tests/train.rs).

Usage: reference_review.py BUNDLE GRADED

BUNDLE is a version folder written by `cinflow train`; GRADED the output folder of
`cinflow classify` run with that bundle on the images of its
report/validation_review.csv. Prints one JSON object:

- percentiles: NumPy percentiles (linear) 1, 5, 50, 95, 99 of each quality
  measurement column of validation_review.csv;
- flagged: images per check, and flagged_images, from its flags column;
- grad_cam / contrastive: the 99th percentile of every class's map values of the
  served cam.npy files (contrastive: each map minus the classes' mean, float64);
- map_max: per image, the largest value of its cam.npy (csv order), and
  served_flags: the checks the served record flagged.
"""
import csv
import json
import sys
from pathlib import Path

import numpy as np

PCTS = [1, 5, 50, 95, 99]
COLUMNS = ["focus", "tissue_fraction", "overexposed_fraction", "underexposed_fraction"]


def main():
    bundle, graded = Path(sys.argv[1]), Path(sys.argv[2])
    rows = list(csv.DictReader(open(bundle / "report" / "validation_review.csv")))
    out = {"images": len(rows), "percentiles": {}, "flagged": {}, "flagged_images": 0}
    for c in COLUMNS:
        v = np.array([float(r[c]) for r in rows])
        out["percentiles"][c] = [float(x) for x in np.percentile(v, PCTS)]
    for r in rows:
        checks = sorted({c for c in r["flags"].split(";") if c})
        for c in checks:
            out["flagged"][c] = out["flagged"].get(c, 0) + 1
        out["flagged_images"] += bool(checks)

    records = {}
    for p in graded.glob("*.json"):
        rec = json.loads(p.read_text())
        img = rec["images"][0]
        records[img["uri"]] = (p.parent, img)
    grad, contrastive, map_max, served = [], [], [], []
    for r in rows:
        base, img = records["file://" + r["path"]]
        maps = np.load(base / img["raw_map"]["uri"]).astype(np.float64)
        grad.append(maps.ravel())
        contrastive.append((maps - maps.mean(axis=0, keepdims=True)).ravel())
        map_max.append(float(maps.max()))
        served.append(sorted({f["check"] for f in img["quality"]["flags"]}))
    out["grad_cam"] = float(np.percentile(np.concatenate(grad), 99))
    out["contrastive"] = float(np.percentile(np.concatenate(contrastive), 99))
    out["map_max"] = map_max
    out["served_flags"] = served
    print(json.dumps(out))


if __name__ == "__main__":
    main()
