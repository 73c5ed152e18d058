#!/usr/bin/env python3
"""Independent reference for cinflow's calibration figures (src/report/calibration.rs).

Input (JSON file): {"task": "multiclass"|"binary", "logits": [[...], ...],
"labels": [...], "bins": N}. For a binary task each row holds the single logit
of class 0.
Output (JSON): the temperature minimising the mean negative log-likelihood
(scipy's bounded scalar minimiser on ln T over [ln 0.05, ln 100]), that
minimum, and the top-label expected calibration error at T = 1 and at the
fitted T, from scikit-learn's calibration_curve (uniform bins) weighted by the
bins' counts.
"""
import json
import sys

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, log_expit
from sklearn.calibration import calibration_curve


def log_probs(task, z, t):
    if task == "binary":
        s = z[:, 0] / t
        return np.stack([log_expit(s), log_expit(-s)], axis=1)
    return log_softmax(z / t, axis=1)


def nll(task, z, y, t):
    return -log_probs(task, z, t)[np.arange(len(y)), y].mean()


def ece(task, z, y, t, bins):
    p = np.exp(log_probs(task, z, t))
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(int)
    prob_true, prob_pred = calibration_curve(correct, conf, n_bins=bins, strategy="uniform")
    edges = np.linspace(0.0, 1.0, bins + 1)
    ids = np.searchsorted(edges[1:-1], conf)
    counts = np.bincount(ids, minlength=bins)
    counts = counts[counts > 0]
    return float(np.sum(counts / len(y) * np.abs(prob_true - prob_pred))), np.bincount(ids, minlength=bins).tolist()


def main():
    d = json.load(open(sys.argv[1]))
    z = np.array(d["logits"], dtype=np.float64)
    y = np.array(d["labels"])
    task, bins = d["task"], d["bins"]
    r = minimize_scalar(
        lambda lt: nll(task, z, y, np.exp(lt)),
        bounds=(np.log(0.05), np.log(100.0)),
        method="bounded",
        options={"xatol": 1e-10},
    )
    t = float(np.exp(r.x))
    before, counts_before = ece(task, z, y, 1.0, bins)
    after, counts_after = ece(task, z, y, t, bins)
    print(json.dumps({
        "temperature": t,
        "nll": float(r.fun),
        "ece_before": before,
        "ece_after": after,
        "counts_before": counts_before,
        "counts_after": counts_after,
    }))


if __name__ == "__main__":
    main()
