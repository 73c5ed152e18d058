#!/usr/bin/env python3
"""Independent reference for cinflow's head training: scikit-learn's
LogisticRegression on the very features and split of a `cinflow train` run.

Reads the run's report (`<bundle>/report/data.csv`: path, label, patient_id,
split, sha256) and its feature cache (`<image sha256>.safetensors`, tensor
`views` [8, channels] float32), then, like `cinflow train --solver lbfgs`:
- standardises channels with the mean and (population) spread of every view of
  every training image;
- fits a logistic regression (Newton-Cholesky solver) on every view of the training images for each L2
  strength (cinflow's penalty l2/2*|W|^2 on the mean loss is scikit-learn's
  C = 1 / (l2 * rows)), multinomial for 3-4 classes, one logit (class 0 vs the
  rest) for 2;
- keeps the strength with the lowest validation log-loss (identity view);
- predicts the locked test split's identity view.
Also fits the temperature on the validation split (scipy) and computes the
expected calibration error of the report's test probabilities (scikit-learn's
calibration_curve). Prints JSON: chosen l2, per-strength objective and
validation loss, test probabilities (class order of the report, uncalibrated),
the macro one-vs-rest AUC, the temperature and the ECE before and after.

usage: reference_head.py BUNDLE_DIR FEATURE_CACHE_DIR CLASSES L2[,L2...]
  CLASSES: comma-separated class names in the bundle's order
"""

import csv
import glob
import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file
from sklearn.linear_model import LogisticRegression
from scipy.optimize import minimize_scalar
from scipy.special import log_expit, log_softmax
from sklearn.calibration import calibration_curve
from sklearn.metrics import log_loss, roc_auc_score


def ece(p, y, bins):
    """Top-label expected calibration error from calibration_curve's bins."""
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(int)
    prob_true, prob_pred = calibration_curve(correct, conf, n_bins=bins, strategy="uniform")
    ids = np.searchsorted(np.linspace(0.0, 1.0, bins + 1)[1:-1], conf)
    counts = np.bincount(ids, minlength=bins)
    counts = counts[counts > 0]
    return float(np.sum(counts / len(y) * np.abs(prob_true - prob_pred)))


def main():
    bundle, cache, classes, grid = sys.argv[1:5]
    classes = classes.split(",")
    grid = sorted({float(v) for v in grid.split(",")}, reverse=True)
    index = {}
    for p in glob.glob(os.path.join(cache, "**", "*.safetensors"), recursive=True):
        index[os.path.basename(p)[: -len(".safetensors")]] = p
    rows = list(csv.DictReader(open(os.path.join(bundle, "report", "data.csv"))))
    split = {"train": ([], []), "validation": ([], []), "test": ([], [])}
    for r in rows:
        views = load_file(index[r["sha256"]])["views"].astype(np.float64)
        split[r["split"]][0].append(views)
        split[r["split"]][1].append(classes.index(r["label"]))
    train_views = np.stack(split["train"][0])  # [n, 8, k]
    n, v, k = train_views.shape
    x_train = train_views.reshape(n * v, k)
    y_train = np.repeat(np.array(split["train"][1]), v)
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std <= 1e-8 * (1 + np.abs(mean))] = 1.0
    z = lambda x: (x - mean) / std
    x_val = z(np.stack([a[0] for a in split["validation"][0]]))
    y_val = np.array(split["validation"][1])
    x_test = z(np.stack([a[0] for a in split["test"][0]]))
    y_test = np.array(split["test"][1])
    x_train = z(x_train)
    binary = len(classes) == 2
    if binary:  # one logit: class 0 (CIN) against the rest
        y_train, y_val_fit = (y_train == 0).astype(int), (y_val == 0).astype(int)
    else:
        y_val_fit = y_val

    def probs(model, x):
        p = model.predict_proba(x)
        if binary:  # columns are [not class 0, class 0]
            return np.stack([p[:, 1], p[:, 0]], axis=1)
        return p

    fits, best = [], None
    for l2 in grid:
        # Newton's method converges to the optimum to machine precision, also
        # for weak penalties where a quasi-Newton solver stops early.
        model = LogisticRegression(
            C=1.0 / (l2 * len(y_train)),
            solver="newton-cholesky",
            max_iter=1000,
            tol=1e-12,
        )
        model.fit(x_train, y_train)
        p_val = model.predict_proba(x_val)
        loss = log_loss(y_val_fit, p_val, labels=list(range(p_val.shape[1])))
        w, b = model.coef_, model.intercept_
        logits = x_train @ w.T + b
        if binary:
            t = y_train[:, None]
            data_loss = np.mean(np.logaddexp(0, logits) - t * logits)
        else:
            logits = logits - logits.max(axis=1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
            data_loss = -logp[np.arange(len(y_train)), y_train].mean()
        objective = data_loss + l2 / 2 * np.sum(w**2)
        fits.append({"l2": l2, "val_loss": loss, "objective": objective})
        if best is None or loss < best[0]:
            best = (loss, l2, model)
    _, chosen, model = best
    p_test = probs(model, x_test)

    # Temperature scaling on the validation split: scipy's bounded minimiser of
    # the mean negative log-likelihood over ln T in [ln 0.05, ln 100].
    z_val = model.decision_function(x_val)
    def nll(log_t):
        t = np.exp(log_t)
        if binary:
            s = np.where(y_val_fit == 1, 1.0, -1.0)
            return -log_expit(s * z_val / t).mean()
        return -log_softmax(z_val / t, axis=1)[np.arange(len(y_val)), y_val].mean()
    fit = minimize_scalar(nll, bounds=(np.log(0.05), np.log(100.0)), method="bounded",
                          options={"xatol": 1e-10})
    temperature = float(np.exp(fit.x))

    # Expected calibration error of the report's own test probabilities (10
    # uniform bins of the highest probability, scikit-learn's calibration_curve),
    # at the fitted temperature and, undone (p**T renormalised), at T = 1.
    report = json.load(open(os.path.join(bundle, "report", "report.json")))
    served = np.array([p["probabilities"] for p in report["predictions"]])
    t_report = report["calibration"]["temperature"]
    raw = served ** t_report
    raw /= raw.sum(axis=1, keepdims=True)
    if binary:
        auc = roc_auc_score((y_test == 0).astype(int), p_test[:, 0])
    else:
        present = sorted(set(y_test.tolist()))
        auc = roc_auc_score(
            y_test, p_test, multi_class="ovr", average="macro", labels=list(range(len(classes)))
        ) if len(present) == len(classes) else None
    print(json.dumps({
        "temperature": temperature,
        "test_ece_after": ece(served, y_test, 10),
        "test_ece_before": ece(raw, y_test, 10),
        "chosen_l2": chosen,
        "fits": fits,
        "test_probabilities": p_test.tolist(),
        "test_macro_auc": auc,
    }))


if __name__ == "__main__":
    main()
