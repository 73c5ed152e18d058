"""Independent reference for cinflow's input quality measurements
(src/quality/mod.rs), with OpenCV and NumPy.

For each image path: read it (cv2.imread, to RGB), reduce it to WIDTHxHEIGHT
with cv2.INTER_AREA (skipped when it already has that size), and measure
focus = cv2.Laplacian(cv2.cvtColor(RGB2GRAY), CV_64F, ksize=1).var(), the
share of tissue (neither glass: grey >= 200 and channel spread <= 25, nor dark:
grey < 25), of clipped white pixels (every channel >= 250) and of dark pixels.

Usage: reference_quality.py WIDTH HEIGHT IMAGE... ; prints a JSON list.
"""

import json
import sys

import cv2
import numpy as np


def measure(path, width, height):
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise SystemExit(f"{path}: cannot read")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if rgb.shape[:2] != (height, width):
        rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    spread = rgb.max(axis=2).astype(int) - rgb.min(axis=2).astype(int)
    glass = (grey >= 200) & (spread <= 25)
    dark = grey < 25
    return {
        "image": path,
        "focus": float(cv2.Laplacian(grey, cv2.CV_64F, ksize=1).var()),
        "tissue_fraction": float(1.0 - (glass | dark).mean()),
        "overexposed_fraction": float((rgb.min(axis=2) >= 250).mean()),
        "underexposed_fraction": float(dark.mean()),
    }


def main():
    width, height = int(sys.argv[1]), int(sys.argv[2])
    print(json.dumps([measure(p, width, height) for p in sys.argv[3:]]))


if __name__ == "__main__":
    main()
