#!/usr/bin/env python3
"""Independent reference for cinflow's evaluation metrics, computed with scikit-learn.

Reads JSON {"classes": [...], "truth": [int...], "probs": [[float...]...]} from the
file given as the only argument and prints JSON with the same figures that
src/report/metrics.rs computes, so tests can compare the two.
"""
import json
import sys

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)


def main() -> None:
    data = json.load(open(sys.argv[1]))
    classes = data["classes"]
    c = len(classes)
    y = np.asarray(data["truth"], dtype=int)
    p = np.asarray(data["probs"], dtype=float)
    labels = list(range(c))
    pred = p.argmax(axis=1)
    cm = confusion_matrix(y, pred, labels=labels)
    prec, rec, f1, support = precision_recall_fscore_support(
        y, pred, labels=labels, zero_division=0
    )
    mcm = multilabel_confusion_matrix(y, pred, labels=labels)
    spec = [
        float(m[0, 0] / (m[0, 0] + m[0, 1])) if (m[0, 0] + m[0, 1]) else 0.0 for m in mcm
    ]
    aucs, curves = [], []
    for k in labels:
        pos = (y == k).astype(int)
        if 0 < pos.sum() < len(pos):
            aucs.append(float(roc_auc_score(pos, p[:, k])))
            fpr, tpr, thr = roc_curve(pos, p[:, k], drop_intermediate=False)
            curves.append({"fpr": fpr.tolist(), "tpr": tpr.tolist()})
        else:
            aucs.append(None)
            curves.append(None)
    if c == 2:
        macro = float(roc_auc_score((y == 0).astype(int), p[:, 0]))
    else:
        macro = float(roc_auc_score(y, p, multi_class="ovr", average="macro", labels=labels))
    json.dump(
        {
            "accuracy": float(accuracy_score(y, pred)),
            "confusion": cm.tolist(),
            "precision": prec.tolist(),
            "sensitivity": rec.tolist(),
            "f1": f1.tolist(),
            "support": support.tolist(),
            "specificity": spec,
            "auc": aucs,
            "macro_auc": macro,
            "roc": curves,
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
