#!/usr/bin/env python3
"""How good are a bundle's backbone features? A linear probe on held-out patients.

For each bundle, every image of LABELS (a cinflow labels CSV, e.g. from
`cinflow synth --seed 2000 --n 120`) is preprocessed as cinflow serves it
(tools/export_backbone.py's preprocess_u8: OpenCV CLAHE on every channel,
INTER_AREA to the manifest's input size, (v/255 - mean)/std), run through
backbone.onnx with ONNX Runtime in its 8 views (flips/rotations), and the feature
map is globally average-pooled. Then, over --repeats patient-level splits
(--test-fraction of each grade's patients held out):

  probe  scikit-learn LogisticRegression on standardised features of all 8 views
         of the training patients, C from a small grid by grouped (patient)
         cross-validation on those patients only; test accuracy and macro
         one-vs-rest AUC on the held-out patients' identity view and the mean
         probability over their 8 views.
  tch    a replica of `cinflow train`'s head (standardised features, zero init,
         Adam with the step schedule of the defaults, lr 1e-4 (or --tch-lr) x0.1
         every 10 epochs, batch 16, a random view per image per epoch, 20% of the training
         patients for validation, weights of the lowest validation loss): test
         accuracy and mean top probability, what `cinflow demo` would show.

Usage:
  .venv/bin/python tools/eval_backbone_features.py --labels DIR/labels.csv BUNDLE...

Not part of serving or of the test suite; the numbers are for synthetic data only.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import export_backbone as eb  # noqa: E402


class _A:  # the attributes load_training_images reads
    pass


def pooled_features(bundle: Path, items, threads: int, cache: Path | None):
    import onnxruntime as ort
    import torch

    m = json.loads((bundle / "manifest.json").read_text())
    a = _A()
    a.width, a.height = m["input"]["width"], m["input"]["height"]
    a.clahe_clip = float(m["preprocess"]["clahe"]["clip_limit"])
    a.tile_grid = list(m["preprocess"]["clahe"]["tile_grid"])
    a.train_cache = cache
    imgs, _ = eb.load_training_images(items, a)
    mean = np.array(m["input"]["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.array(m["input"]["std"], np.float32).reshape(1, 3, 1, 1)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(bundle / "backbone.onnx"), so,
                                providers=["CPUExecutionProvider"])
    feats = np.empty((len(items), 8, m["features"]["channels"]), np.float64)
    for i in range(len(items)):
        x = (imgs[i].transpose(2, 0, 1)[None].astype(np.float32) / np.float32(255.0) - mean) / std
        for v in range(8):
            xv = eb.apply_view(torch.from_numpy(x), v).contiguous().numpy()
            (f,) = sess.run([m["features"]["name"]], {m["input"]["name"]: xv})
            feats[i, v] = f[0].astype(np.float64).mean(axis=(1, 2))
    return feats


def split(patients, y, frac, rng):
    """Holds out `frac` of each class's patients (at least one)."""
    test = set()
    for c in np.unique(y):
        pats = sorted({p for p, yy in zip(patients, y) if yy == c})
        rng.shuffle(pats)
        test.update(pats[:max(1, round(frac * len(pats)))])
    t = np.array([p in test for p in patients])
    return np.where(~t)[0], np.where(t)[0]


def macro_auc(y, prob, k):
    from sklearn.metrics import roc_auc_score

    return float(np.mean([roc_auc_score(y == c, prob[:, c]) for c in range(k)]))


def probe(feats, y, groups, tr, te, k, seed):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def fit(idx, c):
        x = feats[idx].reshape(-1, feats.shape[2])
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000)).fit(
            x, np.repeat(y[idx], 8))

    grid = [0.001, 0.01, 0.1, 1.0, 10.0]
    scores = []
    for c in grid:
        ll = []
        for a, b in GroupKFold(n_splits=4).split(tr, groups=groups[tr]):
            p = fit(tr[a], c).predict_proba(feats[tr[b], 0])
            ll.append(-np.mean(np.log(np.clip(p[np.arange(len(b)), y[tr[b]]], 1e-12, 1))))
        scores.append(np.mean(ll))
    c = grid[int(np.argmin(scores))]
    clf = fit(tr, c)
    p1 = clf.predict_proba(feats[te, 0])
    p8 = np.mean([clf.predict_proba(feats[te, v]) for v in range(8)], axis=0)
    return {"C": c, "acc": float(np.mean(p1.argmax(1) == y[te])), "auc": macro_auc(y[te], p1, k),
            "acc8": float(np.mean(p8.argmax(1) == y[te])), "auc8": macro_auc(y[te], p8, k)}


def tch_like_head(feats, y, patients, tr, te, k, seed, lr0=1e-4, epochs=60):
    import torch

    rng = np.random.default_rng(seed)
    fit, val = split([patients[i] for i in tr], y[tr], 0.2, rng)
    fit, val = tr[fit], tr[val]
    x = feats[fit]
    mu = x.reshape(-1, x.shape[2]).mean(0)
    sd = x.reshape(-1, x.shape[2]).std(0)
    sd[sd == 0] = 1
    z = lambda a: torch.tensor((a - mu) / sd, dtype=torch.float32)  # noqa: E731
    xt, xv, xte = z(feats[fit]), z(feats[val, 0]), z(feats[te])
    yt, yv = torch.tensor(y[fit]), torch.tensor(y[val])
    lin = torch.nn.Linear(feats.shape[2], k)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.Adam(lin.parameters(), lr=lr0)
    best = (np.inf, None)
    g = torch.Generator().manual_seed(seed)
    for ep in range(1, epochs + 1):
        for grp in opt.param_groups:
            grp["lr"] = max(lr0 * 0.1 ** ((ep - 1) // 10), 1e-7)
        views = torch.randint(8, (len(fit),), generator=g)
        order = torch.randperm(len(fit), generator=g)
        for s in range(0, len(fit), 16):
            b = order[s:s + 16]
            loss = torch.nn.functional.cross_entropy(lin(xt[b, views[b]]), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            vl = float(torch.nn.functional.cross_entropy(lin(xv), yv))
        if vl < best[0]:
            best = (vl, {k_: v.clone() for k_, v in lin.state_dict().items()})
    lin.load_state_dict(best[1])
    with torch.no_grad():
        p = torch.softmax(lin(xte[:, 0]), 1).numpy()
    return {"acc": float(np.mean(p.argmax(1) == y[te])), "top_prob": float(p.max(1).mean()),
            "auc": macro_auc(y[te], p, k)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--labels", type=Path, required=True)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--test-fraction", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, help="preprocessed-image cache folder")
    ap.add_argument("--tch-lr", default="1e-4", metavar="LR[,LR...]",
                    help="learning rates of the tch-like head (default cinflow's 1e-4)")
    a = ap.parse_args()
    a.tch_lr = [float(v) for v in a.tch_lr.split(",")]
    import torch

    torch.set_num_threads(a.threads)
    items = eb.read_train_labels(a.labels, a.classes)
    y = np.array([yy for _, yy, _ in items])
    patients = [p for _, _, p in items]
    groups = np.array([sorted(set(patients)).index(p) for p in patients])
    k = len(eb.CLASS_SCHEMES[a.classes])
    for bundle in a.bundles:
        t0 = time.perf_counter()
        feats = pooled_features(bundle, items, a.threads, a.cache)
        t_feat = time.perf_counter() - t0
        res = {"probe": [], **{lr: [] for lr in a.tch_lr}}
        for r in range(a.repeats):
            tr, te = split(patients, y, a.test_fraction, np.random.default_rng(r))
            res["probe"].append(probe(feats, y, groups, tr, te, k, r))
            for lr in a.tch_lr:
                res[lr].append(tch_like_head(feats, y, patients, tr, te, k, r, lr))
        prov = json.loads((bundle / "manifest.json").read_text())["provenance"]
        print(f"{bundle}  ({prov['backbone_weights'][:90]})")
        print(f"  {len(items)} images, {len(set(patients))} patients; features in {t_feat:.0f}s; "
              f"{a.repeats} patient splits, {len(te)} test images each: mean (sd)")
        for key, name in (("acc", "accuracy"), ("auc", "macro AUC"), ("acc8", "accuracy, 8-view mean"),
                          ("auc8", "macro AUC, 8-view mean")):
            v = np.array([d[key] for d in res["probe"]])
            print(f"  probe {name:24s} {v.mean():.3f} ({v.std():.3f})")
        print(f"  probe C chosen: {[d['C'] for d in res['probe']]}")
        for lr in a.tch_lr:
            txt = ", ".join(f"{name} {np.mean([d[key] for d in res[lr]]):.3f} "
                            f"({np.std([d[key] for d in res[lr]]):.3f})"
                            for key, name in (("acc", "accuracy"), ("auc", "macro AUC"),
                                              ("top_prob", "mean top probability")))
            print(f"  tch-like head, lr {lr:g}: {txt}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
