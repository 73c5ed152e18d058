"""Independent reference for cinflow's CIN2+ refer band and its image-,
slide- and patient-level figures (src/report/operating.rs, src/report/levels.rs).

Reads a training report.json and prints JSON:

- ``refer_band``: the rule-out and rule-in thresholds chosen from the
  report's validation predictions with scikit-learn's ``roc_curve``
  (``drop_intermediate=False``): rule-out is the largest threshold whose
  sensitivity reaches the target, lowered to the smallest with the same false
  positive rate; rule-in the smallest whose specificity reaches its target,
  raised to the largest with the same true positive rate (the next float above
  the highest score when only "never" does, or nothing CIN2+ lies above it),
  and raised to rule-out when it comes out below; with the sensitivity and
  specificity there;
- ``levels``: accuracy (``accuracy_score``), quadratic-weighted kappa
  (``cohen_kappa_score(weights="quadratic", labels=range(K))``) and CIN2+
  sensitivity/specificity at both thresholds (``recall_score``) of the locked
  test predictions at image, slide and patient level, each with percentile
  95% intervals over a patient-cluster bootstrap;
- ``draws``: the bootstrap's patient draws (NumPy ``default_rng(seed)``,
  patients numbered in sorted id order), so the Rust side can recompute every
  interval from the same draws.

Usage: reference_levels.py REPORT_JSON REPLICATES SEED
"""

import json
import sys
import warnings

import numpy as np
from sklearn.metrics import accuracy_score, cohen_kappa_score, recall_score, roc_curve

CIN2_PLUS = ("CIN3", "CIN2", "CIN2-3")


def refer_band(report, rows):
    hp = report["hyper_parameters"]
    val = report["validation_predictions"]
    s = np.array([sum(p["probabilities"][i] for i in rows) for p in val])
    y = np.array([p["truth"] in rows for p in val])
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    finite = thr <= s.max()
    never = np.nextafter(s.max(), np.inf)
    # Rule-out: the largest threshold reaching the sensitivity, then the
    # smallest one with the same false positive rate.
    reached = thr[finite & (tpr >= hp["refer_sensitivity"] - 1e-9)].max()
    same_fpr = finite & (fpr == fpr[thr == reached][0])
    rule_out = thr[same_fpr].min()
    # Rule-in: the smallest threshold reaching the specificity, then the
    # largest one with the same true positive rate ("never" when none, or
    # when nothing CIN2+ lies above it).
    meets = finite & ((1 - fpr) >= hp["refer_specificity"] - 1e-9)
    if meets.any():
        reached = thr[meets].min()
        sens = tpr[thr == reached][0]
        rule_in = thr[finite & (tpr == sens)].max() if sens > 0 else never
    else:
        rule_in = never
    rule_in = max(rule_in, rule_out)

    def point(t, target):
        called = s >= t
        return {
            "threshold": float(t),
            "target": target,
            "sensitivity": float(recall_score(y, called, pos_label=True)),
            "specificity": float(recall_score(y, called, pos_label=False)),
        }

    return {
        "positives": int(y.sum()),
        "negatives": int((~y).sum()),
        "rule_out": point(rule_out, hp["refer_sensitivity"]),
        "rule_in": point(rule_in, hp["refer_specificity"]),
    }


def units(report, rows):
    """Per patient (sorted ids): its images, slides and itself as (truth, score, predicted)."""
    pos_rows = rows or [0]
    by_patient = {}
    for p in report["predictions"]:
        probs = p["probabilities"]
        u = (p["truth"], sum(probs[i] for i in pos_rows), int(np.argmax(probs)))
        by_patient.setdefault(p["patient_id"], {}).setdefault(p["slide_id"], []).append(u)

    def merge(us):
        best = us[0]
        for u in us[1:]:
            if u[1] > best[1]:
                best = u
        return (min(u[0] for u in us), best[1], best[2])

    out = []
    for patient in sorted(by_patient):
        slides = by_patient[patient]
        images = [u for s in sorted(slides) for u in slides[s]]
        out.append({
            "image": images,
            "slide": [merge(slides[s]) for s in sorted(slides)],
            "patient": [merge(images)],
        })
    return out


def figures(us, k, pos_rows, band):
    t = np.array([u[0] for u in us])
    p = np.array([u[2] for u in us])
    s = np.array([u[1] for u in us])
    y = np.isin(t, pos_rows)
    out = {"accuracy": float(accuracy_score(t, p))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kappa = cohen_kappa_score(t, p, weights="quadratic", labels=list(range(k)))
    out["kappa_quadratic"] = None if np.isnan(kappa) else float(kappa)
    if band is not None:
        for name in ("rule_out", "rule_in"):
            called = s >= band[name]["threshold"]
            out[f"{name}_sensitivity"] = (
                float(recall_score(y, called, pos_label=True)) if y.any() else None)
            out[f"{name}_specificity"] = (
                float(recall_score(y, called, pos_label=False)) if (~y).any() else None)
    return out


def main():
    report_path, replicates, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with open(report_path) as f:
        report = json.load(f)
    classes = report["model"]["classes"]
    rows = [i for i, c in enumerate(classes) if c in CIN2_PLUS] if len(classes) >= 3 else []
    band = refer_band(report, rows) if rows else None
    # The levels use the thresholds stored in the report, so that a threshold
    # difference shows up once (in refer_band), not again in every figure.
    stored = report["refer_band"]
    patients = units(report, rows)
    draws = np.random.default_rng(seed).integers(0, len(patients), size=(replicates, len(patients)))
    levels = []
    for level in ("image", "slide", "patient"):
        all_units = [u for p in patients for u in p[level]]
        point = figures(all_units, len(classes), rows or [0], stored)
        reps = [figures([u for i in d for u in patients[i][level]], len(classes), rows or [0], stored)
                for d in draws]
        ci = {}
        for name in point:
            vals = [r[name] for r in reps if r[name] is not None]
            ci[name] = [float(v) for v in np.percentile(vals, [2.5, 97.5])] if vals else None
        levels.append({"level": level, "units": len(all_units), "value": point, "ci95": ci})
    print(json.dumps({
        "refer_band": band,
        "levels": levels,
        "draws": draws.tolist(),
    }))


if __name__ == "__main__":
    main()
