#!/usr/bin/env python3
"""OpenCV reference of cinflow's preprocessing, and the benchmark against it.

The reference path (what src/preprocess reproduces):

    bgr = cv2.imdecode(bytes, cv2.IMREAD_COLOR)
    clahe = cv2.createCLAHE(clipLimit=40.0, tileGridSize=(8, 8))   # (cols, rows)
    bgr = cv2.merge([clahe.apply(c) for c in cv2.split(bgr)])       # every channel
    bgr = cv2.resize(bgr, (800, 600), interpolation=cv2.INTER_AREA)
    x = ((rgb / 255 - mean) / std).transpose(2, 0, 1)               # CHW float32

Why INTER_AREA: 2560x1920 -> 800x600 shrinks 3.2x and must be anti-aliased, not
point-sampled. INTER_AREA averages each output pixel's footprint, weighting every
source pixel by the fraction of it that is covered. The Rust side gives
fast_image_resize exactly these coverage weights; its 8-bit intermediate between the
vertical and horizontal passes keeps it within one grey level of OpenCV. CLAHE itself
matches OpenCV byte for byte.

Sub-commands:
    reference IN CLAHE_OUT PREPROCESSED_OUT [--clip C] [--grid COLS ROWS] [--size W H]
        writes OpenCV's CLAHE image and its CLAHE+resize image (PNG) for the test
        tests/preprocess_opencv.rs.
    bench [--dir DIR] [--repeat N] [--rounds R]
        alternates R rounds of `cargo run --release --example bench_preprocess -- DIR N`
        (which writes DIR/slide.png, DIR/slide.jpg and our outputs, and prints our
        timings) and of the same stages in OpenCV on one thread; keeps the best time of
        each, compares our outputs with OpenCV's and prints our/OpenCV time ratios.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    import cv2
except ImportError as err:  # pragma: no cover - message for a missing venv
    sys.exit(f"OpenCV is not importable ({err}): run scripts/setup.sh")

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def clahe_bgr(bgr, clip=40.0, grid=(8, 8)):
    """cv2.createCLAHE(...).apply on each channel."""
    clahe = cv2.createCLAHE(clipLimit=clip, tileGridSize=tuple(grid))
    return cv2.merge([clahe.apply(c) for c in cv2.split(bgr)])


def resize_area(bgr, size=(800, 600)):
    """The anti-aliased downscale of the reference path."""
    return cv2.resize(bgr, tuple(size), interpolation=cv2.INTER_AREA)


def normalise(bgr):
    """RGB, (v / 255 - mean) / std, CHW float32."""
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
    return np.ascontiguousarray(((rgb - MEAN) / STD).transpose(2, 0, 1))


def full_path(data, clip=40.0, grid=(8, 8), size=(800, 600)):
    """Encoded bytes -> CHW float32, the whole reference path."""
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("cv2.imdecode could not decode the image")
    return normalise(resize_area(clahe_bgr(bgr, clip, grid), size))


def read_image(path):
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return bgr


def write_image(path, bgr):
    if not cv2.imwrite(str(path), bgr):
        raise OSError(f"cannot write {path}")


def cmd_reference(args):
    bgr = read_image(args.input)
    equalised = clahe_bgr(bgr, args.clip, args.grid)
    write_image(args.clahe_out, equalised)
    write_image(args.preprocessed_out, resize_area(equalised, args.size))


def best_ms(fn, repeat):
    fn()  # warm-up: allocations, lazy initialisation
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def max_diff(a, b):
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return int(d.max()), float((d > 0).mean())


def run_rust(directory, repeat):
    """Our timings: the bench_preprocess example, run from the repository root."""
    root = Path(__file__).resolve().parent.parent
    cmd = ["cargo", "run", "--release", "--quiet", "--example", "bench_preprocess", "--",
           str(directory), str(repeat)]
    out = subprocess.run(cmd, cwd=root, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def time_opencv(d, repeat):
    png_bytes = np.fromfile(d / "slide.png", np.uint8)
    jpg_bytes = np.fromfile(d / "slide.jpg", np.uint8)
    bgr = cv2.imdecode(png_bytes, cv2.IMREAD_COLOR)
    equalised = clahe_bgr(bgr)
    return {
        "clahe_ms": best_ms(lambda: clahe_bgr(bgr), repeat),
        "resize_ms": best_ms(lambda: resize_area(equalised), repeat),
        "decode_jpeg_ms": best_ms(lambda: cv2.imdecode(jpg_bytes, cv2.IMREAD_COLOR), repeat),
        "full_jpeg_ms": best_ms(lambda: full_path(jpg_bytes), repeat),
    }


def best_of(runs):
    return {k: min(r[k] for r in runs) if k.endswith("_ms") else runs[0][k] for k in runs[0]}


def cmd_bench(args):
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(args.dir or tmp)
        d.mkdir(parents=True, exist_ok=True)
        ours, theirs = [], []
        for _ in range(args.rounds):  # alternate, so background load hits both sides alike
            ours.append(run_rust(d, args.repeat))
            theirs.append(time_opencv(d, args.repeat))
        report(d, best_of(ours), best_of(theirs))


def report(d, rust, cv):
    png_bytes = np.fromfile(d / "slide.png", np.uint8)
    jpg_bytes = np.fromfile(d / "slide.jpg", np.uint8)
    bgr = cv2.imdecode(png_bytes, cv2.IMREAD_COLOR)
    equalised = clahe_bgr(bgr)
    diffs = {
        "clahe": max_diff(read_image(d / "rust_clahe.png"), equalised),
        "clahe+resize (PNG input)": max_diff(
            read_image(d / "rust_preprocessed_png.png"), resize_area(equalised)
        ),
        "clahe+resize (JPEG input)": max_diff(
            read_image(d / "rust_preprocessed_jpg.png"),
            resize_area(clahe_bgr(cv2.imdecode(jpg_bytes, cv2.IMREAD_COLOR))),
        ),
        "JPEG decode": max_diff(
            read_image(d / "rust_decoded_jpg.png"), cv2.imdecode(jpg_bytes, cv2.IMREAD_COLOR)
        ),
    }

    h, w = bgr.shape[:2]
    print(f"cinflow preprocessing vs OpenCV {cv2.__version__}, one thread, {w}x{h} -> 800x600")
    print(f"{'stage':<28}{'cinflow ms':>12}{'OpenCV ms':>12}{'ratio':>8}")
    for key, label in [
        ("clahe_ms", "CLAHE (3 channels)"),
        ("resize_ms", "resize (INTER_AREA)"),
        ("decode_jpeg_ms", "JPEG decode"),
        ("full_jpeg_ms", "whole path from JPEG"),
    ]:
        ours, theirs = rust[key], cv[key]
        print(f"{label:<28}{ours:>12.2f}{theirs:>12.2f}{ours / theirs:>8.2f}")
    print("ratio = cinflow / OpenCV (targets: CLAHE <= 0.8, whole path ~0.5)")
    print(f"{'output difference':<28}{'max':>12}{'pixels off':>12}")
    for label, (worst, frac) in diffs.items():
        print(f"{label:<28}{worst:>12}{frac:>11.2%}")
    print(json.dumps({"cinflow": rust, "opencv": cv, "max_diff": {k: v[0] for k, v in diffs.items()}}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    ref = sub.add_parser("reference", help="write OpenCV's CLAHE and CLAHE+resize images")
    ref.add_argument("input")
    ref.add_argument("clahe_out")
    ref.add_argument("preprocessed_out")
    ref.add_argument("--clip", type=float, default=40.0)
    ref.add_argument("--grid", type=int, nargs=2, default=[8, 8], metavar=("COLS", "ROWS"))
    ref.add_argument("--size", type=int, nargs=2, default=[800, 600], metavar=("W", "H"))
    ref.set_defaults(func=cmd_reference)
    bench = sub.add_parser("bench", help="time cinflow and OpenCV, compare their outputs")
    bench.add_argument("--dir", help="keep the images and outputs here (default: a temp dir)")
    bench.add_argument("--repeat", type=int, default=10, help="timed runs per stage")
    bench.add_argument("--rounds", type=int, default=2, help="alternating rounds per side")
    bench.set_defaults(func=cmd_bench)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
