"""Independent reference for cinflow's out-of-distribution score
(src/train/ood.rs, src/model/ood.rs): scikit-learn's LedoitWolf on the very
features of a `cinflow train` run.

Reads the run's report (`<bundle>/report/data.csv`) and its feature cache
(`<image sha256>.safetensors`, tensor `views` [8, channels]), fits
`LedoitWolf()` on the training images' identity view, takes the Mahalanobis
distance (the square root of `LedoitWolf.mahalanobis`) of every validation
and test image, and the 99th percentile (NumPy, linear) of the validation
distances. Prints JSON: shrinkage, threshold, test distances (data.csv order).

usage: reference_ood.py BUNDLE_DIR FEATURE_CACHE_DIR
"""

import csv
import glob
import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file
from sklearn.covariance import LedoitWolf


def main():
    bundle, cache = sys.argv[1:3]
    index = {}
    for p in glob.glob(os.path.join(cache, "**", "*.safetensors"), recursive=True):
        index[os.path.basename(p)[: -len(".safetensors")]] = p
    rows = list(csv.DictReader(open(os.path.join(bundle, "report", "data.csv"))))
    split = {"train": [], "validation": [], "test": []}
    for r in rows:
        split[r["split"]].append(load_file(index[r["sha256"]])["views"][0].astype(np.float64))
    lw = LedoitWolf().fit(np.stack(split["train"]))
    dist = lambda x: np.sqrt(np.maximum(lw.mahalanobis(np.stack(x)), 0.0))  # noqa: E731
    print(json.dumps({
        "shrinkage": float(lw.shrinkage_),
        "threshold": float(np.percentile(dist(split["validation"]), 99.0)),
        "test_distances": [float(d) for d in dist(split["test"])],
    }))


if __name__ == "__main__":
    main()
