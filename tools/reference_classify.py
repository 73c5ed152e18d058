#!/usr/bin/env python3
"""Independent reference for cinflow's inference, pooling, head and Grad-CAM.

Reads a model bundle and an already preprocessed 8-bit RGB PNG (as written by
`cinflow preprocess`), normalises it with the manifest's mean/std, runs the
backbone with the onnxruntime Python package, pools and applies the head in
numpy (float64), and prints JSON: logits, probabilities and the un-clipped
class maps M_c = sum_k W_ck A_k (flattened, feature resolution).
Used by the test suite to check the Rust pipeline; not part of serving.
"""
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image  # installed with torchvision
from safetensors.numpy import load_file


def main(bundle: str, png: str) -> None:
    b = Path(bundle)
    m = json.loads((b / "manifest.json").read_text())
    head = load_file(str(b / "head.safetensors"))
    w, bias = head["weight"].astype(np.float64), head["bias"].astype(np.float64)
    img = np.asarray(Image.open(png).convert("RGB"), dtype=np.float32) / 255.0
    x = (img - np.array(m["input"]["mean"], np.float32)) / np.array(m["input"]["std"], np.float32)
    x = x.transpose(2, 0, 1)[None].astype(np.float32)
    sess = ort.InferenceSession(str(b / "backbone.onnx"), providers=["CPUExecutionProvider"])
    (a,) = sess.run([m["features"]["name"]], {m["input"]["name"]: x})
    a = a[0].astype(np.float64)  # K x h x w
    pooled = a.mean(axis=(1, 2))
    z = w @ pooled + bias
    maps = np.einsum("ck,khw->chw", w, a)
    # Served probabilities are temperature-scaled when the bundle is calibrated.
    t = (m.get("calibration") or {}).get("temperature", 1.0)
    if m["task"] == "binary":
        p = 1.0 / (1.0 + np.exp(-z[0] / t))
        probs = [p, 1.0 - p]
        maps = np.concatenate([maps, -maps])
    else:
        e = np.exp((z - z.max()) / t)
        probs = list(e / e.sum())
    json.dump(
        {
            "logits": [float(v) for v in z],
            "probabilities": [float(v) for v in probs],
            "map_shape": list(maps.shape),
            "maps": [float(v) for v in maps.ravel()],
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
