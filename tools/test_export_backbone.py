#!/usr/bin/env python3
"""Self-check of tools/export_backbone.py (tiny architecture only; about 1-2 minutes on
2 cores, mostly Python/torch start-up of the subprocesses).

Run:  .venv/bin/python tools/test_export_backbone.py      (pytest also collects it, where installed)

Every test_* function is independent; each runs the tool as a subprocess, the way
users and scripts do, and inspects the bundle it writes.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from safetensors.numpy import load_file

HERE = Path(__file__).resolve().parent
TOOL = HERE / "export_backbone.py"
sys.path.insert(0, str(HERE))
import export_backbone as eb  # noqa: E402

SMALL = ["--width", "160", "--height", "120"]


def run_tool(*args, expect=0):
    p = subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True)
    assert p.returncode == expect, f"exit {p.returncode} (expected {expect})\n{p.stdout}\n{p.stderr}"
    return p


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_bundle(d: Path, arch="tiny", classes=4, channels=64, width=160, height=120,
                 trained=False):
    assert sorted(p.name for p in d.iterdir()) == ["backbone.onnx", "head.safetensors", "manifest.json"]
    m = json.loads((d / "manifest.json").read_text(encoding="utf-8"))
    assert list(m) == ["schema", "name", "version", "architecture", "task", "classes", "input",
                       "features", "preprocess", "files", "provenance", "metrics", "created_at",
                       "parent_version"]
    assert m["schema"] == "cinflow.bundle/v1" and m["architecture"] == arch
    assert m["classes"] == eb.CLASS_SCHEMES[classes]
    assert m["task"] == ("binary" if classes == 2 else "multiclass")
    assert m["input"] == {"name": "image", "width": width, "height": height,
                          "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert m["features"] == {"name": "features", "channels": channels}
    assert m["preprocess"]["version"] == "cinflow-preprocess/1"
    assert m["files"] == {"backbone.onnx": sha(d / "backbone.onnx"),
                          "head.safetensors": sha(d / "head.safetensors")}
    assert set(m["provenance"]) == {"tool", "backbone_weights", "head", "torch", "opset", "seed",
                                    "precision"} | ({"training"} if trained else set())
    assert m["metrics"] is None and m["parent_version"] is None
    time.strptime(m["created_at"], "%Y-%m-%dT%H:%M:%SZ")
    h = load_file(str(d / "head.safetensors"))
    rows = 1 if classes == 2 else classes
    assert set(h) == {"weight", "bias"}
    assert h["weight"].shape == (rows, channels) and h["weight"].dtype == np.float32
    assert h["bias"].shape == (rows,) and h["bias"].dtype == np.float32
    g = onnx.load(str(d / "backbone.onnx"))
    assert [i.name for i in g.graph.input] == ["image"]
    assert [o.name for o in g.graph.output] == ["features"]
    sess = ort.InferenceSession(str(d / "backbone.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        (f,) = sess.run(None, {"image": np.random.rand(n, 3, height, width).astype(np.float32)})
        assert f.shape[:2] == (n, channels) and f.min() >= 0  # post-ReLU
    return m, h


def test_tiny_random_4class_and_deterministic():
    with tempfile.TemporaryDirectory() as t:
        t = Path(t)
        run_tool("--arch", "tiny", "--out", t / "a", *SMALL)
        m, h = check_bundle(t / "a")
        assert m["name"] == "cinflow-tiny-4class" and m["version"] == "0.0.0-export"
        assert m["provenance"]["backbone_weights"] == "random-init seed 0"
        assert m["provenance"]["head"] == "random-init (untrained)"
        assert np.all(h["bias"] == 0) and 0.005 < h["weight"].std() < 0.02
        run_tool("--arch", "tiny", "--out", t / "b", *SMALL)
        assert sha(t / "a" / "backbone.onnx") == sha(t / "b" / "backbone.onnx")
        assert sha(t / "a" / "head.safetensors") == sha(t / "b" / "head.safetensors")
        run_tool("--arch", "tiny", "--out", t / "c", "--seed", "1", *SMALL)
        assert sha(t / "a" / "backbone.onnx") != sha(t / "c" / "backbone.onnx")
        # Leaves no temp folders behind.
        assert sorted(p.name for p in t.iterdir()) == ["a", "b", "c"]


def test_tiny_binary_and_options():
    with tempfile.TemporaryDirectory() as t:
        d = Path(t) / "bin"
        run_tool("--arch", "tiny", "--classes", "2", "--out", d, *SMALL, "--name", "x",
                 "--version", "1.2.3", "--clahe-clip", "2.5", "--clahe-tiles", "4x6",
                 "--static-size")
        m, _ = check_bundle(d, classes=2)
        assert m["name"] == "x" and m["version"] == "1.2.3"
        assert m["preprocess"]["clahe"] == {"clip_limit": 2.5, "tile_grid": [4, 6]}
        dims = [x.dim_param or x.dim_value
                for x in onnx.load(str(d / "backbone.onnx")).graph.input[0].type.tensor_type.shape.dim]
        assert dims == ["N", 3, 120, 160]


def test_weights_from_checkpoint():
    with tempfile.TemporaryDirectory() as t:
        t = Path(t)
        torch.manual_seed(123)
        model = eb.TinyCNN(4).eval()
        torch.save(model.state_dict(), t / "ckpt.pth")
        # DataParallel-style prefix and a wrapper dict are accepted too.
        torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}},
                   t / "wrapped.pth")
        x = torch.rand(2, 3, 120, 160)
        with torch.no_grad():
            ref_feat = model.features(x).numpy()
            ref_logits = model(x).numpy()
        for ck in ("ckpt.pth", "wrapped.pth"):
            out = t / ("b-" + ck)
            run_tool("--arch", "tiny", "--weights", t / ck, "--out", out, *SMALL)
            m, h = check_bundle(out)
            assert m["provenance"]["backbone_weights"] == f"{ck} sha256 {sha(t / ck)}"
            assert m["provenance"]["head"] == "from checkpoint"
            np.testing.assert_array_equal(h["weight"], model.classifier.weight.detach().numpy())
            sess = ort.InferenceSession(str(out / "backbone.onnx"), providers=["CPUExecutionProvider"])
            (f,) = sess.run(None, {"image": x.numpy()})
            np.testing.assert_allclose(f, ref_feat, rtol=1e-4, atol=1e-5)
            z = f.mean(axis=(2, 3)) @ h["weight"].T + h["bias"]
            np.testing.assert_allclose(z, ref_logits, rtol=1e-4, atol=1e-5)

        # Class-count mismatch: random head + warning, backbone still from the checkpoint.
        p = run_tool("--arch", "tiny", "--weights", t / "ckpt.pth", "--classes", "3",
                     "--out", t / "c3", *SMALL)
        assert "warning:" in p.stderr
        m, _ = check_bundle(t / "c3", classes=3)
        assert m["provenance"]["head"] == "random-init (untrained)"

        # Binary from a 2-way softmax classifier: exact conversion to one logit.
        torch.manual_seed(5)
        m2 = eb.TinyCNN(2).eval()
        torch.save(m2, t / "full2.pt")  # whole pickled model
        p = run_tool("--arch", "tiny", "--weights", t / "full2.pt", "--classes", "2",
                     "--out", t / "bin", *SMALL)
        m, h = check_bundle(t / "bin", classes=2)
        assert m["provenance"]["head"] == "from checkpoint"
        w = m2.classifier.weight.detach().numpy()
        np.testing.assert_allclose(h["weight"][0], w[0] - w[1], rtol=1e-6)


def test_errors_are_one_line_exit_2():
    with tempfile.TemporaryDirectory() as t:
        t = Path(t)
        cases = []
        cases.append((["--arch", "resnet50", "--out", t / "x"], "unknown architecture"))
        cases.append((["--arch", "tiny", "--weights", t / "nope.pth", "--out", t / "x"],
                      "checkpoint not found"))
        bad = {k: v for k, v in eb.TinyCNN(4).state_dict().items()}
        bad["features.2.weight"] = torch.zeros(8, 16, 3, 3)
        bad["extra.weight"] = torch.zeros(1)
        del bad["features.8.bias"]
        torch.save(bad, t / "bad.pth")
        cases.append((["--arch", "tiny", "--weights", t / "bad.pth", "--out", t / "x"],
                      "does not match architecture tiny"))
        (t / "garbage.pth").write_bytes(b"not a checkpoint")
        cases.append((["--arch", "tiny", "--weights", t / "garbage.pth", "--out", t / "x"],
                      "cannot read checkpoint"))
        cases.append((["--arch", "tiny", "--classes", "5", "--out", t / "x"], "--classes"))
        for args, needle in cases:
            p = run_tool(*args, *SMALL, expect=2)
            lines = p.stderr.strip().splitlines()
            assert len(lines) == 1 and needle in lines[0], p.stderr
        assert not (t / "x").exists()
        assert sorted(p.name for p in t.iterdir()) == ["bad.pth", "garbage.pth"]


def test_refuses_overwrite_unless_force():
    with tempfile.TemporaryDirectory() as t:
        d = Path(t) / "b"
        d.mkdir()  # an empty folder is fine
        run_tool("--arch", "tiny", "--out", d, *SMALL)
        before = sha(d / "manifest.json")
        p = run_tool("--arch", "tiny", "--out", d, *SMALL, expect=2)
        assert "not empty" in p.stderr and sha(d / "manifest.json") == before
        run_tool("--arch", "tiny", "--out", d, "--seed", "7", "--force", *SMALL)
        m, _ = check_bundle(d)
        assert m["provenance"]["seed"] == 7
        assert sorted(p.name for p in Path(t).iterdir()) == ["b"]


# Largest difference of a class probability between a float16 and a float32
# export of the same network, through ONNX Runtime's CPU provider (docs/gpu.md
# has the measured values, the GPU's are checked by scripts/gpu-check.sh).
FP16_PROB_TOL = 1e-3


def test_fp16_keeps_float32_io_and_close_probabilities():
    with tempfile.TemporaryDirectory() as t:
        t = Path(t)
        run_tool("--arch", "tiny", "--out", t / "32", "--seed", "5", *SMALL)
        p = run_tool("--arch", "tiny", "--out", t / "16", "--seed", "5", "--fp16", *SMALL)
        assert "verify fp16" in p.stdout
        m32, h32 = check_bundle(t / "32")
        m16, h16 = check_bundle(t / "16")
        assert m32["provenance"]["precision"] == "fp32"
        assert m16["provenance"]["precision"] == "fp16"
        assert np.array_equal(h32["weight"], h16["weight"])  # the head stays float32
        g = onnx.load(str(t / "16" / "backbone.onnx"))
        floats = {i.data_type for i in g.graph.initializer}
        assert onnx.TensorProto.FLOAT16 in floats and onnx.TensorProto.FLOAT not in floats
        assert (t / "16" / "backbone.onnx").stat().st_size < 0.6 * (t / "32" / "backbone.onnx").stat().st_size
        s32 = ort.InferenceSession(str(t / "32" / "backbone.onnx"), providers=["CPUExecutionProvider"])
        s16 = ort.InferenceSession(str(t / "16" / "backbone.onnx"), providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((4, 3, 120, 160)).astype(np.float32)
        probs = []
        for s in (s32, s16):
            (f,) = s.run(None, {"image": x})
            assert f.dtype == np.float32
            z = f.astype(np.float64).mean(axis=(2, 3)) @ h32["weight"].T.astype(np.float64) * 100
            e = np.exp(z - z.max(axis=1, keepdims=True))  # x100: a head that is not ~uniform
            probs.append(e / e.sum(axis=1, keepdims=True))
        assert np.max(np.abs(probs[0] - probs[1])) < FP16_PROB_TOL


def test_fallbacks_without_torchvision_or_safetensors_match():
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.densenet161(weights=None, num_classes=4).eval()
    own = eb.DenseNet161(4).eval()
    sd = ref.state_dict()
    assert {k: v.shape for k, v in own.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    own.load_state_dict(sd)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ref(x), own(x))
    with tempfile.TemporaryDirectory() as t:
        w, b = torch.randn(4, 7), torch.randn(4)
        import safetensors.torch as st

        eb.save_head({"weight": w, "bias": b}, Path(t) / "lib.safetensors")
        saved = st.save_file
        try:
            del st.save_file  # the import inside save_head fails: hand-written file
            eb.save_head({"weight": w, "bias": b}, Path(t) / "own.safetensors")
        finally:
            st.save_file = saved
        a, c = load_file(str(Path(t) / "lib.safetensors")), load_file(str(Path(t) / "own.safetensors"))
        assert set(a) == set(c) == {"weight", "bias"}
        assert all(np.array_equal(a[k], c[k]) for k in a)


def write_training_set(d: Path, n=8, synth_readme=True):
    """n small PNGs, one grade each (cycling), whose grade is a texture CLAHE keeps: the
    more severe, the more dark blobs. A README.txt like `cinflow synth`'s, optionally."""
    import cv2

    d.mkdir(parents=True, exist_ok=True)
    rows = ["path,label,patient_id"]
    for i in range(n):
        c = i % 4
        rng = np.random.default_rng(i)
        img = np.clip(np.full((240, 320, 3), (200, 170, 220), np.float64)
                      + rng.normal(0, 10, (240, 320, 3)), 0, 255).astype(np.uint8)
        for _ in range(16 * (3 - c)):
            x, y = (int(v) for v in rng.integers(0, (320, 240)))
            cv2.circle(img, (x, y), int(rng.integers(3, 7)), (120, 40, 90), -1)
        cv2.imwrite(str(d / f"img{i}.png"), img)
        rows.append(f"img{i}.png,{eb.CLASS_SCHEMES[4][c]},P{i:04d}")
    (d / "labels.csv").write_text("\n".join(rows) + "\n")
    if synth_readme:
        (d / "README.txt").write_text("SYNTHETIC IMAGES - NOT CLINICAL DATA\n===\n\n"
                                      "Parameters: n=8 size=320x240 seed=1000 format=png\n")
    return d / "labels.csv"


def test_tiny_trained_on_labels_is_deterministic_and_learns():
    with tempfile.TemporaryDirectory() as t:
        t = Path(t)
        labels = write_training_set(t / "data")
        train = ["--train-labels", labels, "--train-epochs", "6", "--train-batch", "4",
                 "--threads", "1", *SMALL]
        p = run_tool("--arch", "tiny", "--out", t / "a", "--train-cache", t / "cache", *train)
        assert "train epoch 6/6" in p.stdout, p.stdout
        m, h = check_bundle(t / "a", trained=True)
        prov = m["provenance"]
        assert prov["backbone_weights"].startswith(
            "trained on 8 synthetic images (cinflow synth seed 1000, 320x240), not clinical")
        assert prov["head"] == "random-init (untrained)"  # cinflow trains the head
        tr = prov["training"]
        assert tr["images"] == 8 and tr["epochs"] == 6 and tr["input"] == [160, 120]
        assert tr["classes"] == eb.CLASS_SCHEMES[4] and tr["threads"] == 1
        assert tr["loss_after"] < tr["loss_before"] - 0.05, tr
        assert len(list((t / "cache").glob("*.npy"))) == 8
        # Same seed and threads: the same bytes (second run from the cache).
        p = run_tool("--arch", "tiny", "--out", t / "b", "--train-cache", t / "cache", *train)
        assert "8 from the cache" in p.stdout, p.stdout
        assert sha(t / "a" / "backbone.onnx") == sha(t / "b" / "backbone.onnx")
        assert sha(t / "a" / "head.safetensors") == sha(t / "b" / "head.safetensors")
        # ...differs from the random export of the same seed, and from another seed.
        run_tool("--arch", "tiny", "--out", t / "r", *SMALL)
        run_tool("--arch", "tiny", "--out", t / "c", "--seed", "1", *train)
        digests = {sha(t / x / "backbone.onnx") for x in ("a", "r", "c")}
        assert len(digests) == 3
        # The features the manifest promises, at the served size and at another one.
        sess = ort.InferenceSession(str(t / "a" / "backbone.onnx"),
                                    providers=["CPUExecutionProvider"])
        for hw in ((120, 160), (160, 120), (600, 800)):
            (f,) = sess.run(None, {"image": np.zeros((1, 3, *hw), np.float32)})
            assert f.shape[:2] == (1, 64) and np.all(np.isfinite(f))


def test_training_input_errors_are_one_line_exit_2():
    with tempfile.TemporaryDirectory() as t:
        t = Path(t)
        labels = write_training_set(t / "data", n=4, synth_readme=False)
        bad = t / "bad.csv"
        bad.write_text("path,label,patient_id\ndata/img0.png,CIN4,P1\ndata/img1.png,CIN1,P2\n")
        missing = t / "missing.csv"
        missing.write_text("path,label,patient_id\ndata/img0.png,CIN1,P1\nnope.png,CIN1,P2\n")
        one = t / "one.csv"
        one.write_text("path,label,patient_id\ndata/img0.png,CIN1,P1\n")
        for args, needle in (
                (["--arch", "densenet161", "--train-labels", labels], "tiny only"),
                (["--arch", "tiny", "--train-labels", t / "none.csv"], "labels file not found"),
                (["--arch", "tiny", "--train-labels", bad], "label 'CIN4'"),
                (["--arch", "tiny", "--train-labels", missing], "training image"),
                (["--arch", "tiny", "--train-labels", one], "at least 2 images"),
                (["--arch", "tiny", "--train-labels", labels, "--train-epochs", "0"],
                 "--train-epochs")):
            p = run_tool(*args, "--out", t / "x", *SMALL, expect=2)
            lines = p.stderr.strip().splitlines()
            assert len(lines) == 1 and needle in lines[0], p.stderr
        assert not (t / "x").exists()


def test_help():
    p = run_tool("--help")
    assert "--weights" in p.stdout and "densenet161" in p.stdout
    assert "--train-labels" in p.stdout and "not clinical" in p.stdout


def main() -> int:
    tests = [(k, v) for k, v in globals().items() if k.startswith("test_") and callable(v)]
    failed = 0
    for name, fn in tests:
        t0 = time.perf_counter()
        try:
            fn()
            print(f"ok    {name} ({time.perf_counter() - t0:.1f}s)", flush=True)
        except Exception as e:  # noqa: BLE001
            failed += 1
            print(f"FAIL  {name}: {type(e).__name__}: {e}", flush=True)
    print(f"{len(tests) - failed}/{len(tests)} passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
