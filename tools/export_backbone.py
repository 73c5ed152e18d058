#!/usr/bin/env python3
"""Export a cinflow model bundle: frozen ONNX backbone + linear head + manifest.

cinflow grades cervical biopsy images (CIN3 / CIN2 / CIN1 / Non-neoplasm) with a
frozen convolutional backbone, run through ONNX Runtime, followed by a linear
head on the globally average-pooled feature map (z = W * GAP(A) + b). This tool
turns a PyTorch model into such a bundle, a folder holding exactly:

  backbone.onnx      input ``image`` (N x 3 x H x W float32, normalised RGB),
                     output ``features``: the post-activation feature map that
                     the classifier pools (DenseNet-161: ReLU(features(x)),
                     2208 channels; Inception-ResNet-V2: conv2d_7b output, 1536
                     channels). One self-contained file, no external data.
  head.safetensors   ``weight`` float32 [C x K] and ``bias`` float32 [C]
                     (K = feature channels, C = classes; a binary task has a
                     single sigmoid logit for the first class, C = 1).
  manifest.json      schema ``cinflow.bundle/v1``: classes, input size,
                     mean/std, CLAHE parameters, sha256 of both files,
                     provenance.

Typical use (on a machine where the venv of scripts/setup.sh exists):

  # Fine-tuned torchvision DenseNet-161 (state_dict or whole pickled model,
  # classifier = model.classifier, Linear(2208, 4)):
  .venv/bin/python tools/export_backbone.py --arch densenet161 \\
      --weights runs/densenet161_cin4.pth --classes 4 \\
      --name cin-densenet161 --version 1.0.0 --out models/cin-densenet161-1.0.0

  # Fine-tuned timm Inception-ResNet-V2 (classifier = model.classif), 3 classes:
  .venv/bin/python tools/export_backbone.py --arch inception_resnet_v2 \\
      --weights runs/irv2_cin3.pth --classes 3 --out models/irv2-3class

  # A small random network for tests and demos (no weights needed, fast):
  .venv/bin/python tools/export_backbone.py --arch tiny --out /tmp/tiny-bundle

  # The tiny network trained on synthetic slides first (what `cinflow demo` uses):
  cinflow synth --out /tmp/bb-train --n 120 --seed 1000 --size 1280x960
  .venv/bin/python tools/export_backbone.py --arch tiny \
      --train-labels /tmp/bb-train/labels.csv --out /tmp/tiny-trained

TRAINING (--train-labels, --arch tiny only). A random tiny backbone gives features
a head can barely grade with. With --train-labels the tiny network is first trained,
together with a temporary linear classifier on its global-average-pooled features
(standardised with batch statistics, as cinflow standardises them), on the images
of a cinflow labels CSV (path,label,patient_id; labels of the --classes scheme or
CIN3/CIN2/CIN1/Non-neoplasm, merged as the scheme merges them). Only the backbone is
exported; the bundle's head is random as without training, because cinflow trains
the head afterwards (`cinflow train`, `fit-head`, `demo`). Each image is
preprocessed exactly as cinflow serves it, by the OpenCV reference path of
tools/bench_preprocess_opencv.py: cv2.imdecode, CLAHE (--clahe-clip, --clahe-tiles)
on every channel, INTER_AREA resize to --width x --height (default 800x600), RGB,
(v/255 - mean)/std. Training runs at that served size, not at a reduced one (the
scale of nuclei is what the network learns). Cross-entropy with inverse-frequency
class weights, Adam (--train-lr, warm-up then cosine), --train-batch images per step,
each batch in one of the 8 flips/rotations (cinflow's training views),
--train-epochs passes. Deterministic for --seed on one machine and --threads (other
thread counts or CPUs give slightly different weights); --train-seconds stops early
and then is not. --train-cache keeps the preprocessed images for later runs. The
log shows the loss and accuracy on all training images before and after; the
manifest's provenance.backbone_weights says what the backbone was trained on
("trained on 120 synthetic images (cinflow synth seed 1000, 1280x960), not clinical"
when the CSV's folder was written by `cinflow synth`) and provenance.training has
the details (labels sha256, epochs, losses, seconds).

Use synthetic training patients that the head's training and test never see: a
`cinflow synth` seed other than the one of the data the head is trained and tested
on (`cinflow demo` grades seed-7 patients by default: train on seed 1000). Measured
on 2 cores shared with a cargo build: 120 images at 1280x960, 16 epochs, --threads 1:
115 s in all (5 s of it preprocessing; --threads 2 was slower there, 185 s, as the
cores were busy). On 120 other synthetic images (seed 2000, 2560x1920, 10
patient-level splits), a logistic regression on the pooled features reaches test
accuracy 0.89-0.96 and macro AUC 0.98-0.996 over five training runs, against
0.51-0.55 and 0.77-0.78 for random weights (tools/eval_backbone_features.py); with
`cinflow demo --backbone` 59 of its 60 held-out images were graded right (random
weights: 32). Synthetic images are not clinical data: such a backbone shows the
pipeline working, nothing about CIN.

Without --weights (or --train-labels) the backbone is randomly initialised from
--seed and the head is a small random one (std 0.01, bias 0) that the manifest
marks as untrained: fine for tests, useless for grading. Nothing is downloaded. To
start from ImageNet weights (frozen backbone, head retrained by cinflow), save
them once on a machine with internet access and pass the file:

  python -c "import torch, torchvision; torch.save(torchvision.models.densenet161(
      weights='IMAGENET1K_V1').state_dict(), 'densenet161-imagenet.pth')"
  python -c "import torch, timm; torch.save(timm.create_model('inception_resnet_v2',
      pretrained=True).state_dict(), 'irv2-imagenet.pth')"
  .venv/bin/python tools/export_backbone.py --arch densenet161 \
      --weights densenet161-imagenet.pth --out models/densenet161-imagenet

(an ImageNet classifier has 1000 outputs, so the head is random and the
manifest says so; timm's Inception-ResNet-V2 was pretrained with mean/std
0.5: pass --mean/--std to match whatever normalisation your training used).

Checkpoints: a state_dict (optionally wrapped as {"state_dict": ...},
{"model_state_dict": ...} or {"model": ...}, keys optionally prefixed by
"module." / "model." / "_orig_mod."), or a whole pickled model saved with
``torch.save(model, path)`` (this unpickles code from the file: only use files
you trust). The backbone weights must match the architecture exactly; the head
is taken from the checkpoint's classifier when it has C outputs (for --classes
2 a 2-output softmax classifier is converted exactly into the single logit
w[0]-w[1], b[0]-b[1]); otherwise a random head is written with a warning.

With --fp16 the backbone's weights and arithmetic are float16 while its input
``image`` and output ``features`` stay float32 (a Cast at each end), so the
Rust side and the bundle format do not change; the manifest's provenance says
"precision": "fp16" (else "fp32"). The float32 graph is verified against
PyTorch first, then the float16 one against it (features relative max
difference <= 2e-2 on ONNX Runtime's CPU provider, which computes float16
nodes in float32; GPUs compute in float16: see docs/gpu.md for the measured
probability differences).

The export is verified with ONNX Runtime against PyTorch on random inputs
(relative max difference <= 1e-4, at the declared size with a batch of 2 and,
when H/W are dynamic, at half size) and the pooled features times the head are
checked against the model's own classifier output. The bundle is written to a
temporary folder next to --out and renamed into place; an existing non-empty
--out is only replaced with --force.

Exit codes: 0 success, 2 usage / input error (one-line message on stderr),
1 verification failure or unexpected error.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError as _e:  # pragma: no cover
    sys.exit(f"export_backbone.py: error: {_e}; run scripts/setup.sh and use .venv/bin/python")

SCHEMA = "cinflow.bundle/v1"
PREPROCESS_VERSION = "cinflow-preprocess/1"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
ARCHS = ("tiny", "densenet161", "inception_resnet_v2")
CLASS_SCHEMES = {
    4: ["CIN3", "CIN2", "CIN1", "Non-neoplasm"],
    3: ["CIN2-3", "CIN1", "Non-neoplasm"],
    2: ["CIN", "Non-neoplasm"],
}
# Name of the classifier Linear inside each architecture's model, plus aliases
# accepted in checkpoints (Cadene's pretrainedmodels calls it last_linear).
CLASSIFIER = {
    "tiny": ("classifier", ()),
    "densenet161": ("classifier", ()),
    "inception_resnet_v2": ("classif", ("last_linear",)),
}
REL_TOL = 1e-4
# Defaults of --train-*: see TRAINING in the help.
TRAIN_EPOCHS = 16
TRAIN_BATCH = 8
TRAIN_LR = 2e-3
TRAIN_WEIGHT_DECAY = 0.0
# float16 graph against the float32 one (ONNX Runtime CPU), relative to max|features|.
FP16_REL_TOL = 2e-2
# Inputs that ONNX requires in float32 whatever the model's precision.
FLOAT32_INPUTS = {"Resize": (1, 2), "Upsample": (1,)}
FP16_MAX = 65504.0
TOOL = "tools/export_backbone.py"


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit code 2."""


def log(msg: str) -> None:
    print(msg, flush=True)


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(
        prog="export_backbone.py",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--arch", required=True, metavar="ARCH",
                   help="tiny | densenet161 | inception_resnet_v2")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="bundle folder to create (must not exist or be empty, unless --force)")
    p.add_argument("--classes", type=int, default=4, metavar="C",
                   help="class scheme: 4 (CIN3, CIN2, CIN1, Non-neoplasm), 3 (CIN2-3, CIN1, "
                        "Non-neoplasm) or 2 (CIN, Non-neoplasm; binary, one sigmoid logit). Default 4")
    p.add_argument("--weights", type=Path, metavar="CKPT",
                   help="fine-tuned checkpoint (state_dict or pickled model); default: random init")
    p.add_argument("--width", type=int, default=800, help="network input width (default 800)")
    p.add_argument("--height", type=int, default=600, help="network input height (default 600)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random initialisation and of the verification inputs (default 0)")
    p.add_argument("--name", help='bundle name (default "cinflow-<arch>-<C>class")')
    p.add_argument("--version", default="0.0.0-export", help='bundle version (default "0.0.0-export")')
    p.add_argument("--clahe-clip", type=float, default=40.0,
                   help="CLAHE clip limit the model was trained with (default 40.0)")
    p.add_argument("--clahe-tiles", default="8x8", metavar="AxB",
                   help="CLAHE tile grid the model was trained with, written to the manifest "
                        "as [A, B] (default 8x8)")
    p.add_argument("--mean", default=None, metavar="R,G,B",
                   help="normalisation mean of pixel/255 used in training (default ImageNet "
                        "0.485,0.456,0.406; note timm's tf_in1k Inception-ResNet-V2 weights were "
                        "pretrained with 0.5,0.5,0.5: give what your fine-tuning used)")
    p.add_argument("--std", default=None, metavar="R,G,B",
                   help="normalisation std (default ImageNet 0.229,0.224,0.225)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--static-size", action="store_true",
                   help="fix H and W in backbone.onnx (default: only the declared size is "
                        "promised, but H/W are exported as dynamic axes)")
    p.add_argument("--exporter", default="auto", choices=("auto", "torchscript", "dynamo"),
                   help="torch.onnx exporter: auto = TorchScript (dynamo=False) if available, "
                        "else the dynamo exporter")
    p.add_argument("--fp16", action="store_true",
                   help="float16 weights and arithmetic inside the backbone, float32 input and "
                        "output (for GPUs; checked against the float32 export)")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1), metavar="N",
                   help="torch threads (default: all cores); training is deterministic for "
                        "a given --seed and --threads")
    t = p.add_argument_group("training the tiny backbone (see TRAINING below)")
    t.add_argument("--train-labels", type=Path, metavar="CSV",
                   help="train --arch tiny on this labels CSV (path,label,patient_id) before "
                        "exporting it; default: export random weights")
    t.add_argument("--train-epochs", type=int, default=TRAIN_EPOCHS, metavar="N",
                   help=f"passes over the training images (default {TRAIN_EPOCHS})")
    t.add_argument("--train-seconds", type=float, default=0.0, metavar="S",
                   help="stop after the epoch that ends past S seconds of training (default 0: "
                        "no limit; a stop by time makes the weights depend on the machine)")
    t.add_argument("--train-batch", type=int, default=TRAIN_BATCH, metavar="B",
                   help=f"images per step (default {TRAIN_BATCH})")
    t.add_argument("--train-lr", type=float, default=TRAIN_LR, metavar="LR",
                   help=f"peak Adam learning rate (default {TRAIN_LR:g})")
    t.add_argument("--train-weight-decay", type=float, default=TRAIN_WEIGHT_DECAY, metavar="WD",
                   help=f"Adam weight decay (default {TRAIN_WEIGHT_DECAY:g})")
    t.add_argument("--train-cache", type=Path, metavar="DIR",
                   help="keep the preprocessed training images here (one .npy each, keyed by "
                        "the image's sha256 and the preprocessing) for later runs")
    a = p.parse_args(argv)

    if a.arch not in ARCHS:
        p.error(f"unknown architecture {a.arch!r}; expected one of: {', '.join(ARCHS)}")
    if a.classes not in CLASS_SCHEMES:
        p.error(f"--classes must be 4, 3 or 2, got {a.classes}")
    if a.width < 32 or a.height < 32:
        p.error(f"--width/--height must be at least 32, got {a.width}x{a.height}")
    if not (a.clahe_clip > 0 and math.isfinite(a.clahe_clip)):
        p.error(f"--clahe-clip must be positive, got {a.clahe_clip}")
    m = re.fullmatch(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*", a.clahe_tiles)
    if not m or int(m.group(1)) == 0 or int(m.group(2)) == 0:
        p.error(f"--clahe-tiles must look like 8x8, got {a.clahe_tiles!r}")
    a.tile_grid = [int(m.group(1)), int(m.group(2))]
    a.mean_v = _triple(p, "--mean", a.mean, IMAGENET_MEAN)
    a.std_v = _triple(p, "--std", a.std, IMAGENET_STD)
    if any(s <= 0 for s in a.std_v):
        p.error("--std values must be positive")
    if not 7 <= a.opset <= 23:
        p.error(f"--opset {a.opset} out of range")
    if a.threads < 1:
        p.error(f"--threads must be at least 1, got {a.threads}")
    if a.train_labels is not None:
        if a.arch != "tiny":
            p.error(f"--train-labels trains --arch tiny only (got {a.arch}; fine-tune large "
                    "backbones elsewhere and pass --weights)")
        if a.weights is not None:
            p.error("--train-labels and --weights exclude each other")
        if a.train_epochs < 1 or a.train_batch < 1:
            p.error("--train-epochs and --train-batch must be at least 1")
        if not (a.train_lr > 0 and math.isfinite(a.train_lr)) or not (
                a.train_weight_decay >= 0 and math.isfinite(a.train_weight_decay)):
            p.error("--train-lr must be positive and --train-weight-decay not negative")
        if not (a.train_seconds >= 0 and math.isfinite(a.train_seconds)):
            p.error(f"--train-seconds must be 0 or positive, got {a.train_seconds}")
    if a.name is None:
        a.name = f"cinflow-{a.arch}-{a.classes}class"
    if not a.name.strip() or not a.version.strip():
        p.error("--name and --version must not be empty")
    return a


def _triple(p, flag, text, default):
    if text is None:
        return list(default)
    try:
        v = [float(x) for x in text.split(",")]
    except ValueError:
        v = []
    if len(v) != 3 or not all(math.isfinite(x) for x in v):
        p.error(f"{flag} must be three comma-separated numbers, got {text!r}")
    return v


# --------------------------------------------------------------------------
# Models

def build_model(arch: str, num_classes: int):
    """The full classification model (random init from the current torch seed)."""
    if arch == "tiny":
        return TinyCNN(num_classes)
    if arch == "densenet161":
        try:
            import torchvision
        except ImportError:  # e.g. a GPU machine with torch only: the same network
            return DenseNet161(num_classes)
        return torchvision.models.densenet161(weights=None, num_classes=num_classes)
    if arch == "inception_resnet_v2":
        import timm
        return timm.create_model("inception_resnet_v2", pretrained=False, num_classes=num_classes)
    raise UserError(f"unknown architecture {arch!r}")  # pragma: no cover (checked earlier)


class TinyCNN(nn.Module):
    """Small deterministic CNN for tests: 5 stride-2 3x3 convs, ReLU after each.

    600x800 -> 19x25 x 64 channels; classifier = Linear(64, C) on the average-pooled map.
    """

    CHANNELS = (3, 16, 32, 48, 64, 64)

    def __init__(self, num_classes: int = 4):
        super().__init__()
        layers = []
        for cin, cout in zip(self.CHANNELS[:-1], self.CHANNELS[1:]):
            conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(self.CHANNELS[-1], num_classes)

    def forward(self, x):
        f = self.features(x)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(f, 1), 1))


class DenseNet161(nn.Module):
    """torchvision's DenseNet-161 (same module names, so the same checkpoints load;
    same initialisation), used where torchvision is not installed."""

    def __init__(self, num_classes: int, growth: int = 48, blocks=(6, 12, 36, 24),
                 init_features: int = 96, bn_size: int = 4):
        super().__init__()
        from collections import OrderedDict

        f = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, init_features, 7, 2, 3, bias=False)),
            ("norm0", nn.BatchNorm2d(init_features)), ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(3, 2, 1))]))
        c = init_features
        for i, n in enumerate(blocks):
            f.add_module(f"denseblock{i + 1}", _DenseBlock(n, c, bn_size, growth))
            c += n * growth
            if i != len(blocks) - 1:
                f.add_module(f"transition{i + 1}", nn.Sequential(OrderedDict([
                    ("norm", nn.BatchNorm2d(c)), ("relu", nn.ReLU(inplace=True)),
                    ("conv", nn.Conv2d(c, c // 2, 1, bias=False)), ("pool", nn.AvgPool2d(2, 2))])))
                c //= 2
        f.add_module("norm5", nn.BatchNorm2d(c))
        self.features = f
        self.classifier = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        out = F.relu(self.features(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class _DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bn_size: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, inputs):
        x = self.conv1(self.relu1(self.norm1(torch.cat(inputs, 1))))
        return self.conv2(self.relu2(self.norm2(x)))


class _DenseBlock(nn.ModuleDict):
    def __init__(self, n: int, cin: int, bn_size: int, growth: int):
        super().__init__()
        for i in range(n):
            self.add_module(f"denselayer{i + 1}", _DenseLayer(cin + i * growth, growth, bn_size))

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


def save_head(tensors: dict, path: Path) -> None:
    """head.safetensors; written by hand (the format is a JSON header and raw
    little-endian data) where the safetensors package is not installed."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        import struct

        header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
        for name in sorted(tensors):
            b = tensors[name].detach().cpu().contiguous().float().numpy().astype("<f4").tobytes()
            header[name] = {"dtype": "F32", "shape": list(tensors[name].shape),
                            "data_offsets": [off, off + len(b)]}
            blobs.append(b)
            off += len(b)
        h = json.dumps(header, separators=(",", ":")).encode()
        h += b" " * (-len(h) % 8)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
        return
    # one metadata key: safetensors orders metadata randomly
    save_file(tensors, str(path), metadata={"format": "pt"})


def feature_channels(arch: str) -> int:
    return {"tiny": 64, "densenet161": 2208, "inception_resnet_v2": 1536}[arch]


def make_backbone(arch: str, model):
    """nn.Module mapping image -> post-activation feature map (what is exported)."""
    class Backbone(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, image):
            if arch == "densenet161":
                return F.relu(self.m.features(image))
            if arch == "inception_resnet_v2":
                return self.m.forward_features(image)
            return self.m.features(image)

    return Backbone(model).eval()


def feature_hook_module(arch: str, model):
    """(module, post) such that post(module output) is the feature map the classifier pools."""
    if arch == "densenet161":
        return model.features, F.relu
    if arch == "inception_resnet_v2":
        return model.conv2d_7b, (lambda t: t)
    return model.features, (lambda t: t)


def classifier_of(arch: str, model):
    return getattr(model, CLASSIFIER[arch][0])


def set_classifier(arch: str, model, linear) -> None:
    setattr(model, CLASSIFIER[arch][0], linear)
    if arch == "inception_resnet_v2":
        model.num_classes = linear.out_features


# --------------------------------------------------------------------------
# Checkpoints

_DENSE_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_checkpoint(path: Path) -> dict:
    """Returns a flat {name: tensor} state_dict from a checkpoint file."""
    import pickle


    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as e:
        if "Unsupported global" not in str(e):  # not a pickled class: corrupt / not torch
            raise UserError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}")
        warn(f"{path.name} is a pickled model, not a plain state_dict; unpickling it "
             "(this runs code from the file: only use checkpoints you trust)")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:  # noqa: BLE001
            raise UserError(f"cannot unpickle checkpoint {path}: {type(e2).__name__}: "
                            f"{str(e2).splitlines()[0] if str(e2) else ''}")
    except Exception as e:  # noqa: BLE001 (zip errors, truncated files, ...)
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}")

    for _ in range(3):  # unwrap {"state_dict": ...} and friends
        if isinstance(obj, torch.nn.Module):
            obj = obj.state_dict()
        if isinstance(obj, dict):
            for k in ("state_dict", "model_state_dict", "model", "net", "module"):
                if k in obj and isinstance(obj[k], (dict, torch.nn.Module)):
                    obj = obj[k]
                    break
            else:
                break
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise UserError(f"checkpoint {path} holds neither a state_dict nor a model "
                        f"(got {type(obj).__name__})")
    sd = dict(obj)
    changed = True
    while changed:  # strip DataParallel / Lightning / torch.compile prefixes
        changed = False
        for prefix in ("module.", "model.", "_orig_mod."):
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def apply_checkpoint(arch: str, model, sd: dict, ckpt_name: str, classes: int):
    """Loads the backbone strictly; returns the checkpoint classifier (weight, bias) or None."""
    if arch == "densenet161":
        sd = {(_DENSE_LEGACY.sub(r"\1\2", k)): v for k, v in sd.items()}
    cls_name, aliases = CLASSIFIER[arch]
    for alias in aliases:
        sd = {(cls_name + k[len(alias):] if k.startswith(alias + ".") else k): v for k, v in sd.items()}
    head_w = sd.pop(cls_name + ".weight", None)
    head_b = sd.pop(cls_name + ".bias", None)

    own = {k: v for k, v in model.state_dict().items() if not k.startswith(cls_name + ".")}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches (e.g. {k}: checkpoint "
                         f"{list(sd[k].shape)} vs model {list(own[k].shape)})")
        raise UserError(f"checkpoint {ckpt_name} does not match architecture {arch}: "
                        + "; ".join(parts))
    if head_w is None and head_b is not None or head_w is not None and head_w.dim() != 2:
        raise UserError(f"checkpoint {ckpt_name}: malformed classifier {cls_name}")
    full = dict(sd)
    cls = classifier_of(arch, model)
    full[cls_name + ".weight"] = cls.weight.detach().clone()
    full[cls_name + ".bias"] = cls.bias.detach().clone()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in full.items()},
                          strict=True)
    if head_w is None:
        return None
    if head_b is None:
        head_b = torch.zeros(head_w.shape[0])
    return head_w.float(), head_b.float()


# --------------------------------------------------------------------------
# Training the tiny backbone (--train-labels)

# Spellings of the four grades accepted in a labels CSV (as cinflow's Grade::from_label:
# case, spaces, '-' and '_' ignored).
_GRADE_KEYS = {"cin3": "CIN3", "cin2": "CIN2", "cin1": "CIN1", "nonneoplasm": "Non-neoplasm",
               "nonneoplastic": "Non-neoplasm", "normal": "Non-neoplasm"}
SYNTH_README_HEAD = "SYNTHETIC IMAGES - NOT CLINICAL DATA"


def _label_key(s: str) -> str:
    return "".join(c for c in s.strip().lower() if c not in " -_")


def scheme_index(label: str, classes: int):
    """Index of `label` in the class scheme, or None. Accepts the scheme's own names and
    the four grades, merged as the scheme merges them (3: CIN3+CIN2 -> CIN2-3; 2: CIN1-3
    -> CIN)."""
    names = CLASS_SCHEMES[classes]
    k = _label_key(label)
    for i, n in enumerate(names):
        if _label_key(n) == k:
            return i
    g = _GRADE_KEYS.get(k)
    if g is None:
        return None
    if classes == 4:
        return names.index(g)
    if classes == 3:
        return 0 if g in ("CIN3", "CIN2") else names.index(g)
    return 1 if g == "Non-neoplasm" else 0


def read_train_labels(csv_path: Path, classes: int):
    """[(image path, class index, patient id)] from a cinflow labels CSV (columns path
    (or uri/image), label, patient_id; relative paths against the CSV's folder)."""
    import csv

    if not csv_path.is_file():
        raise UserError(f"labels file not found: {csv_path}")
    base = csv_path.parent
    rows = []
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            r = csv.reader(f)
            header = [h.strip() for h in next(r, [])]
            col = lambda names: next((i for i, h in enumerate(header) if h in names), None)  # noqa: E731
            cp, cl, ci = col(("path", "uri", "image")), col(("label",)), col(("patient_id",))
            if cp is None or cl is None:
                raise UserError(f"{csv_path}: header {header} lacks a path (or uri/image) or "
                                "label column")
            for line, rec in enumerate(r, start=2):
                if not any(x.strip() for x in rec):
                    continue
                get = lambda c: rec[c].strip() if c is not None and c < len(rec) else ""  # noqa: E731
                raw, label = get(cp), get(cl)
                if not raw or not label:
                    raise UserError(f"{csv_path} line {line}: path and label must be set")
                if raw.startswith("file://"):
                    raw = raw[len("file://"):]
                elif "://" in raw:
                    raise UserError(f"{csv_path} line {line}: {raw!r}: only local files can "
                                    "be used for training")
                y = scheme_index(label, classes)
                if y is None:
                    raise UserError(f"{csv_path} line {line}: label {label!r} is not one of "
                                    f"{', '.join(CLASS_SCHEMES[classes])} (--classes {classes}) "
                                    "nor CIN3/CIN2/CIN1/Non-neoplasm")
                p = Path(raw)
                rows.append((p if p.is_absolute() else base / p, y, get(ci) or f"line{line}"))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read labels file {csv_path}: {e}")
    if not rows:
        raise UserError(f"{csv_path}: no labelled images")
    return rows


def synthetic_origin(csv_path: Path):
    """'cinflow synth seed S, WxH' when the CSV's folder was written by `cinflow synth`
    (its README.txt says so), else None."""
    readme = csv_path.parent / "README.txt"
    try:
        text = readme.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    if not text.startswith(SYNTH_README_HEAD):
        return None
    seed = re.search(r"\bseed=(\d+)", text)
    size = re.search(r"\bsize=(\d+x\d+)", text)
    return ("cinflow synth" + (f" seed {seed.group(1)}" if seed else "")
            + (f", {size.group(1)}" if size else ""))


def preprocess_u8(path: Path, width: int, height: int, clip: float, tiles) -> "np.ndarray":
    """The 8-bit RGB image cinflow feeds the backbone (H x W x 3), by OpenCV's reference
    path of tools/bench_preprocess_opencv.py (which tests/preprocess_opencv.rs checks
    src/preprocess against): cv2.imdecode -> CLAHE(clip, tiles) on every channel ->
    INTER_AREA resize to width x height -> RGB."""
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        import cv2
        from bench_preprocess_opencv import clahe_bgr, resize_area
    finally:
        sys.path.pop(0)
    try:
        data = np.fromfile(str(path), np.uint8)
    except OSError as e:
        raise UserError(f"cannot read training image {path}: {e.strerror or e}")
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if bgr is None:
        raise UserError(f"cannot decode training image {path}")
    out = resize_area(clahe_bgr(bgr, clip, tuple(tiles)), (width, height))
    return np.ascontiguousarray(cv2.cvtColor(out, cv2.COLOR_BGR2RGB))


def load_training_images(items, a):
    """Preprocessed uint8 images [N, H, W, 3], through the optional --train-cache folder
    (one .npy per image, keyed by the file's sha256 and the preprocessing parameters)."""
    import numpy as np

    cache = a.train_cache
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    params = (f"{PREPROCESS_VERSION}|{a.width}x{a.height}|clip {a.clahe_clip!r}|"
              f"tiles {a.tile_grid[0]}x{a.tile_grid[1]}")
    out = np.empty((len(items), a.height, a.width, 3), np.uint8)
    hits = 0
    for i, (path, _, _) in enumerate(items):
        f = None
        if cache is not None:
            try:
                key = hashlib.sha256(path.read_bytes() + params.encode()).hexdigest()
            except OSError as e:
                raise UserError(f"cannot read training image {path}: {e.strerror or e}")
            f = cache / f"{key}.npy"
            if f.is_file():
                try:
                    img = np.load(f, allow_pickle=False)
                    if img.shape == out.shape[1:] and img.dtype == np.uint8:
                        out[i] = img
                        hits += 1
                        continue
                except (OSError, ValueError):
                    pass
        out[i] = preprocess_u8(path, a.width, a.height, a.clahe_clip, a.tile_grid)
        if f is not None:
            tmp = f.with_suffix(f".tmp{os.getpid()}.npy")
            np.save(tmp, out[i], allow_pickle=False)
            os.replace(tmp, f)
    return out, hits


def apply_view(x, v: int):
    """View v of the 8 flips/rotations on N x C x H x W (cinflow's src/train/views.rs:
    rot90 by v % 4, counter-clockwise, then a left-right flip when v >= 4)."""
    x = torch.rot90(x, v % 4, dims=(2, 3))
    return torch.flip(x, dims=(3,)) if v >= 4 else x


def keep_freed_memory() -> None:
    """Tells glibc's malloc to keep freed memory instead of unmapping it: a training step
    allocates and frees activations of tens of MB, which malloc otherwise maps and returns
    to the kernel every time (measured: half of a step's time in page faults). Only the
    speed changes; elsewhere than glibc this does nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: no mmap for large blocks
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap
    except (OSError, AttributeError):
        pass


def train_backbone(a, model, channels: int) -> dict:
    """Trains model.features plus a temporary linear classifier on its pooled features
    (cross-entropy, Adam, cosine schedule, a random one of the 8 views per batch) on the
    images of --train-labels at the served input size. Deterministic for --seed and
    --threads. Returns the training summary for the manifest."""
    import numpy as np

    t_all = time.perf_counter()
    keep_freed_memory()
    items = read_train_labels(a.train_labels, a.classes)
    if len(items) < 2:
        raise UserError(f"{a.train_labels}: training needs at least 2 images")
    names = CLASS_SCHEMES[a.classes]
    k = len(names)  # a binary scheme is trained as 2-way softmax; only the backbone is kept
    ys = np.array([y for _, y, _ in items])
    counts = np.bincount(ys, minlength=k)
    origin = synthetic_origin(a.train_labels)
    log(f"training the tiny backbone on {len(items)} images of "
        f"{len({p for _, _, p in items})} patients from {a.train_labels} "
        f"({', '.join(f'{n} {c}' for n, c in zip(names, counts))})"
        + (f"; {origin}: synthetic, not clinical" if origin else ""))
    t0 = time.perf_counter()
    images, hits = load_training_images(items, a)
    t_pre = time.perf_counter() - t0
    log(f"  preprocessed {len(items)} images (CLAHE clip {a.clahe_clip:g} tiles "
        f"{a.tile_grid[0]}x{a.tile_grid[1]}, INTER_AREA to {a.width}x{a.height}"
        + (f", {hits} from the cache" if a.train_cache is not None else "")
        + f") in {t_pre:.1f}s")

    if (counts == 0).any():
        warn("no training images of " + ", ".join(n for n, c in zip(names, counts) if c == 0))
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        x_all = torch.from_numpy(images)  # N x H x W x 3 uint8 (no copy)
        y_all = torch.from_numpy(ys).long()
        mean = torch.tensor(a.mean_v, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(a.std_v, dtype=torch.float32).view(1, 3, 1, 1)
        g = torch.Generator().manual_seed(a.seed + 7919)
        # The temporary classifier sees standardised pooled features (batch statistics),
        # as cinflow's head standardises them per channel before its linear layer.
        lin = nn.Linear(channels, k)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(k, channels, generator=g) * 0.01)
            lin.bias.zero_()
        head = nn.Sequential(nn.BatchNorm1d(channels, affine=False), lin)
        # Inverse-frequency class weights: an unbalanced labels file still trains every class.
        cw = torch.tensor([len(ys) / (k * c) if c else 0.0 for c in counts], dtype=torch.float32)
        params = list(model.features.parameters()) + list(head.parameters())
        opt = torch.optim.Adam(params, lr=a.train_lr, weight_decay=a.train_weight_decay)
        n, bs = len(items), min(a.train_batch, len(items))
        # A last batch of one image is merged into the one before (batch statistics
        # need two).
        starts = [s for s in range(0, n, bs) if not (s and n - s == 1)]
        steps_per_epoch = len(starts)
        total = a.train_epochs * steps_per_epoch
        warmup = max(1, min(steps_per_epoch, total // 10))

        def lr_at(step):  # linear warm-up, then cosine down to 2% of --train-lr
            if step < warmup:
                return a.train_lr * (step + 1) / warmup
            t = (step - warmup) / max(1, total - warmup)
            return a.train_lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))

        def whole_set():
            """(loss, accuracy) of the model on every training image, identity view, the
            pooled features standardised with the set's own statistics."""
            model.eval()
            with torch.no_grad():
                pooled = torch.cat([
                    torch.flatten(F.adaptive_avg_pool2d(model.features(
                        (x_all[s:s + bs].permute(0, 3, 1, 2).float() / 255.0 - mean) / std), 1), 1)
                    for s in range(0, n, bs)])
                z = (pooled - pooled.mean(0)) / torch.sqrt(pooled.var(0, unbiased=False) + 1e-5)
                logits = lin(z)
                loss = float(F.cross_entropy(logits, y_all, weight=cw))
                acc = float((logits.argmax(1) == y_all).float().mean())
            model.train()
            return loss, acc

        before = whole_set()
        log(f"  before training: loss {before[0]:.4f}, accuracy {before[1]:.3f} "
            "(all training images, identity view)")
        model.train()
        history, step, stopped = [], 0, None
        t_train = time.perf_counter()
        for epoch in range(1, a.train_epochs + 1):
            t_ep = time.perf_counter()
            perm = torch.randperm(n, generator=g)
            loss_sum, correct = 0.0, 0
            for j, s in enumerate(starts):
                idx = perm[s:starts[j + 1] if j + 1 < len(starts) else n]
                v = int(torch.randint(8, (1,), generator=g))
                xb = x_all[idx].permute(0, 3, 1, 2).float() / 255.0  # as normalise_into
                xb = apply_view((xb - mean) / std, v)
                yb = y_all[idx]
                for group in opt.param_groups:
                    group["lr"] = lr_at(step)
                logits = head(torch.flatten(F.adaptive_avg_pool2d(model.features(xb), 1), 1))
                loss = F.cross_entropy(logits, yb, weight=cw)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                loss_sum += loss.detach().item() * len(idx)
                correct += int((logits.argmax(1) == yb).sum())
            history.append({"epoch": epoch, "loss": round(loss_sum / n, 5),
                            "accuracy": round(correct / n, 4)})
            elapsed = time.perf_counter() - t_train
            log(f"  train epoch {epoch}/{a.train_epochs}: loss {loss_sum / n:.4f}, accuracy "
                f"{correct / n:.3f} (running, random views), lr {lr_at(step - 1):.2e}, "
                f"{time.perf_counter() - t_ep:.1f}s")
            if a.train_seconds and elapsed >= a.train_seconds and epoch < a.train_epochs:
                stopped = epoch
                warn(f"--train-seconds {a.train_seconds:g} reached after epoch {epoch} of "
                     f"{a.train_epochs}: the backbone depends on this machine's speed now, "
                     "not only on --seed")
                break
        t_train = time.perf_counter() - t_train
        after = whole_set()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    model.eval()
    log(f"  trained {len(history)} epochs ({step} steps of {bs}) in {t_train:.1f}s; all "
        f"training images, identity view: loss {before[0]:.4f} -> {after[0]:.4f}, accuracy "
        f"{before[1]:.3f} -> {after[1]:.3f}")
    labels_sha = sha256_file(a.train_labels)
    what = (f"{len(items)} synthetic images ({origin}), not clinical" if origin
            else f"{len(items)} images of {a.train_labels.name} (sha256 {labels_sha})")
    return {
        "backbone_weights": f"trained on {what}; init seed {a.seed}",
        "training": {
            "labels": a.train_labels.name, "labels_sha256": labels_sha,
            "data": (f"{origin}: synthetic, not clinical" if origin
                     else "not recognised as cinflow synth output"),
            "images": len(items), "patients": len({p for _, _, p in items}),
            "classes": names, "input": [a.width, a.height],
            "epochs": len(history), "epochs_requested": a.train_epochs,
            "stopped_by_time_limit": stopped is not None,
            "batch": bs, "lr": a.train_lr, "weight_decay": a.train_weight_decay,
            "augmentation": "one of the 8 flips/rotations per batch",
            "threads": torch.get_num_threads(),
            "loss_before": round(before[0], 5), "loss_after": round(after[0], 5),
            "accuracy_before": round(before[1], 4), "accuracy_after": round(after[1], 4),
            "loss_per_epoch": [h["loss"] for h in history],
            "seconds": {"preprocess": round(t_pre, 1), "train": round(t_train, 1),
                        "total": round(time.perf_counter() - t_all, 1)},
        },
    }


# --------------------------------------------------------------------------
# Export and verification

def export_onnx(backbone, example, path: Path, opset: int, dynamic_hw: bool, exporter: str) -> str:
    """Writes backbone.onnx as one self-contained file; returns the exporter used."""
    import onnx

    scratch = Path(tempfile.mkdtemp(prefix="onnx-", dir=path.parent))
    tmp = scratch / "backbone.onnx"
    try:
        used = None
        if exporter in ("auto", "torchscript"):
            axes = {"image": {0: "N"}, "features": {0: "N"}}
            if dynamic_hw:
                axes["image"].update({2: "H", 3: "W"})
                axes["features"].update({2: "h", 3: "w"})
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    warnings.simplefilter("ignore", FutureWarning)
                    torch.onnx.export(
                        backbone, (example,), str(tmp), dynamo=False, export_params=True,
                        opset_version=opset, do_constant_folding=True,
                        input_names=["image"], output_names=["features"], dynamic_axes=axes)
                used = "torchscript"
            except Exception as e:  # noqa: BLE001 (removed in this torch, or failed)
                if exporter == "torchscript":
                    raise
                first = str(e).splitlines()[0] if str(e) else ""
                warn(f"TorchScript exporter failed ({type(e).__name__}: {first}); "
                     "using the dynamo exporter")
                for f in scratch.iterdir():
                    f.unlink()
        if used is None:
            from torch.export import Dim
            shapes = {0: Dim("N", min=1, max=1024)}
            if dynamic_hw:
                shapes.update({2: Dim.DYNAMIC, 3: Dim.DYNAMIC})
            torch.onnx.export(
                backbone, (example,), str(tmp), dynamo=True, external_data=False,
                opset_version=opset, input_names=["image"], output_names=["features"],
                dynamic_shapes=({**shapes},), optimize=True)
            used = "dynamo"
        extra = [p.name for p in scratch.iterdir() if p.name != "backbone.onnx"]
        model = onnx.load(str(tmp), load_external_data=True)
        # Stable, documented axis names whatever the exporter called them.
        names = {0: "N", 2: "H", 3: "W"}
        for vi, nm in ((model.graph.input[0], names), (model.graph.output[0], {0: "N", 2: "h", 3: "w"})):
            for i, d in enumerate(vi.type.tensor_type.shape.dim):
                if d.HasField("dim_param") and i in nm:
                    d.dim_param = nm[i]
        onnx.save(model, str(path), save_as_external_data=False)
        if extra:
            log(f"  exporter wrote external data ({', '.join(extra)}); re-saved as one file")
        return used
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def check_onnx_graph(path: Path, channels: int, dynamic_hw: bool, width: int, height: int) -> None:
    import onnx

    onnx.checker.check_model(str(path))
    m = onnx.load(str(path), load_external_data=False)
    ext = [t.name for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if ext:
        raise RuntimeError(f"backbone.onnx still references external data ({ext[:3]})")
    inits = {t.name for t in m.graph.initializer}
    ins = [i for i in m.graph.input if i.name not in inits]
    if [i.name for i in ins] != ["image"] or [o.name for o in m.graph.output] != ["features"]:
        raise RuntimeError(f"graph inputs {[i.name for i in ins]} / outputs "
                           f"{[o.name for o in m.graph.output]}, expected ['image'] / ['features']")

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    di, do = dims(ins[0]), dims(m.graph.output[0])
    if ins[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT or \
            m.graph.output[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise RuntimeError("image/features must be float32")
    want_in = ["N", 3, "H", "W"] if dynamic_hw else ["N", 3, height, width]
    if di != want_in or len(do) != 4 or do[0] != "N" or do[1] != channels:
        raise RuntimeError(f"declared shapes image {di} / features {do}; expected image {want_in}, "
                           f"features [N, {channels}, h, w]")
    log(f"  graph: image {di} -> features {do}, opset "
        f"{[o.version for o in m.opset_import if o.domain in ('', 'ai.onnx')]}")


def verify(arch: str, model, onnx_path: Path, head_w, head_b, binary_from_two: bool,
           sizes, seed: int, channels: int) -> dict:
    """Compares ONNX Runtime with PyTorch; returns the worst diffs. Raises on failure."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, torch.get_num_threads())
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    mod, post = feature_hook_module(arch, model)
    captured = {}
    hook = mod.register_forward_hook(lambda m, i, o: captured.__setitem__("f", o.detach().clone()))
    gen = torch.Generator().manual_seed(seed + 12345)
    worst = {"features_max_abs": 0.0, "features_rel": 0.0, "logits_rel": 0.0}
    try:
        for (n, h, w) in sizes:
            x = torch.randn(n, 3, h, w, generator=gen)
            with torch.no_grad():
                logits = model(x)
            ref = post(captured.pop("f")).numpy()
            t0 = time.perf_counter()
            (got,) = sess.run(["features"], {"image": x.numpy()})
            dt = time.perf_counter() - t0
            if got.shape != ref.shape or got.dtype != np.float32 or got.shape[1] != channels:
                raise RuntimeError(f"onnxruntime output {got.shape} {got.dtype}, torch {ref.shape}")
            d = float(np.max(np.abs(got.astype(np.float64) - ref)))
            scale = float(np.max(np.abs(ref))) or 1.0
            rel = d / scale
            # Head check: GAP(features) @ W^T + b against the model's own classifier.
            pooled = got.astype(np.float64).mean(axis=(2, 3))
            z = pooled @ head_w.numpy().astype(np.float64).T + head_b.numpy().astype(np.float64)
            lt = logits.numpy().astype(np.float64)
            if binary_from_two:  # sigmoid(z) == softmax(lt)[:, 0]
                p_ours = 1 / (1 + np.exp(-z[:, 0]))
                e = np.exp(lt - lt.max(axis=1, keepdims=True))
                p_ref = e[:, 0] / e.sum(axis=1)
                lrel = float(np.max(np.abs(p_ours - p_ref)))
            else:
                lrel = float(np.max(np.abs(z - lt))) / (float(np.max(np.abs(lt))) or 1.0)
            log(f"  verify N={n} {w}x{h}: features {list(got.shape)} max|ort-torch| = {d:.3e} "
                f"(relative {rel:.3e}, max|torch| {scale:.3g}); head vs model logits relative "
                f"{lrel:.3e}; ort {dt:.2f}s")
            worst["features_max_abs"] = max(worst["features_max_abs"], d)
            worst["features_rel"] = max(worst["features_rel"], rel)
            worst["logits_rel"] = max(worst["logits_rel"], lrel)
            if not np.all(np.isfinite(got)):
                raise RuntimeError("onnxruntime output has non-finite values")
            if rel > REL_TOL:
                raise RuntimeError(f"ONNX output differs from torch: relative {rel:.3e} > {REL_TOL}")
            if lrel > REL_TOL:
                raise RuntimeError(f"pooled features x head differ from the model's logits: "
                                   f"relative {lrel:.3e} > {REL_TOL}")
    finally:
        hook.remove()
    return worst


def _to_fp16(t):
    """A float32 TensorProto as float16 (same name); refuses values float16 cannot hold."""
    import numpy as np
    from onnx import numpy_helper

    a = numpy_helper.to_array(t)
    finite = a[np.isfinite(a)]
    if finite.size and float(np.max(np.abs(finite))) > FP16_MAX:
        raise RuntimeError(f"{t.name or 'a constant'} has values beyond float16's range "
                           f"(max |x| {float(np.max(np.abs(finite))):.3g}); export without --fp16")
    return numpy_helper.from_array(a.astype(np.float16), t.name)


def convert_fp16(model):
    """float32 -> float16 inside the graph: initializers, Constant values and Cast
    targets. The graph input and output stay float32 behind a Cast at each end,
    and inputs ONNX requires in float32 (Resize scales) are left alone."""
    from onnx import TensorProto, helper

    g = model.graph
    keep = {node.input[i] for node in g.node
            for i in FLOAT32_INPUTS.get(node.op_type, ()) if i < len(node.input)}
    for i, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT and t.name not in keep:
            g.initializer[i].CopyFrom(_to_fp16(t))
    for node in g.node:
        for a in node.attribute:
            if node.op_type in ("Constant", "ConstantOfShape") and a.name == "value" \
                    and a.t.data_type == TensorProto.FLOAT and node.output[0] not in keep:
                a.t.CopyFrom(_to_fp16(a.t))
            elif node.op_type == "Constant" and a.name in ("value_float", "value_floats"):
                raise RuntimeError(f"Constant {node.name} has a {a.name} attribute; export without --fp16")
            elif node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.FLOAT16
    inp, out = g.input[0].name, g.output[0].name
    for node in g.node:
        for k, name in enumerate(node.input):
            if name == inp:
                node.input[k] = f"{inp}_fp16"
        for k, name in enumerate(node.output):
            if name == out:
                node.output[k] = f"{out}_fp16"
    g.node.insert(0, helper.make_node("Cast", [inp], [f"{inp}_fp16"], name=f"{inp}_to_fp16",
                                      to=TensorProto.FLOAT16))
    g.node.append(helper.make_node("Cast", [f"{out}_fp16"], [out], name=f"{out}_to_fp32",
                                   to=TensorProto.FLOAT))
    del g.value_info[:]  # float32 intermediate types: stale now, inferred again on load
    return model


def verify_fp16(fp32_path: Path, fp16_path: Path, sizes, seed: int) -> float:
    """Runs both graphs with ONNX Runtime (CPU) on random inputs; returns the worst
    relative max difference of the features. Raises above FP16_REL_TOL."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, torch.get_num_threads())
    ref = ort.InferenceSession(str(fp32_path), so, providers=["CPUExecutionProvider"])
    half = ort.InferenceSession(str(fp16_path), so, providers=["CPUExecutionProvider"])
    gen = np.random.default_rng(seed + 54321)
    worst = 0.0
    for (n, h, w) in sizes:
        x = gen.standard_normal((n, 3, h, w)).astype(np.float32)
        (a,) = ref.run(["features"], {"image": x})
        (b,) = half.run(["features"], {"image": x})
        if b.dtype != np.float32 or b.shape != a.shape or not np.all(np.isfinite(b)):
            raise RuntimeError(f"float16 graph output {b.shape} {b.dtype}, float32 {a.shape}")
        rel = float(np.max(np.abs(b.astype(np.float64) - a))) / (float(np.max(np.abs(a))) or 1.0)
        log(f"  verify fp16 N={n} {w}x{h}: max|fp16-fp32| relative {rel:.3e}")
        worst = max(worst, rel)
        if rel > FP16_REL_TOL:
            raise RuntimeError(f"float16 backbone differs from float32: relative {rel:.3e} > "
                               f"{FP16_REL_TOL}")
    return worst


# --------------------------------------------------------------------------
# Bundle writing

def human_size(n: int) -> str:
    return f"{n} B" if n < 10_000 else f"{n / 1e3:.1f} kB" if n < 10_000_000 else f"{n / 1e6:.1f} MB"


def dir_nonempty(p: Path) -> bool:
    return p.is_dir() and any(p.iterdir())


def check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if dir_nonempty(out) and not force:
        raise UserError(f"--out {out} exists and is not empty (use --force to replace it)")


def install(tmp: Path, out: Path, force: bool) -> None:
    """Renames the finished temp folder to out (atomically, same parent)."""
    check_out(out, force)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        old.rmdir()
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run(a: argparse.Namespace) -> int:
    out = a.out.resolve() if not a.out.is_absolute() else a.out
    check_out(out, a.force)
    if a.weights is not None and not a.weights.is_file():
        raise UserError(f"checkpoint not found: {a.weights}")

    t_start = time.perf_counter()
    torch.set_num_threads(a.threads)
    binary = a.classes == 2
    rows = 1 if binary else a.classes
    channels = feature_channels(a.arch)

    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    model = build_model(a.arch, rows)
    head = ckpt_head = None
    binary_from_two = False
    training = None
    if a.weights is not None:
        ckpt_sha = sha256_file(a.weights)
        sd = load_checkpoint(a.weights)
        ckpt_head = apply_checkpoint(a.arch, model, sd, a.weights.name, a.classes)
        backbone_prov = f"{a.weights.name} sha256 {ckpt_sha}"
        if ckpt_head is not None:
            w, b = ckpt_head
            if w.shape[1] != channels:
                warn(f"checkpoint classifier has {w.shape[1]} inputs, backbone has {channels}; "
                     "writing a random head")
            elif w.shape[0] == rows:
                head = (w, b)
            elif binary and w.shape[0] == 2:
                head = ((w[0] - w[1]).unsqueeze(0), (b[0] - b[1]).reshape(1))
                binary_from_two = True
                log("  binary task: 2-output softmax classifier converted to one logit "
                    "(w[0]-w[1], b[0]-b[1]; sigmoid of it equals softmax probability of 'CIN')")
            else:
                warn(f"checkpoint classifier has {w.shape[0]} outputs but --classes {a.classes} "
                     f"needs {rows}; writing a random (untrained) head")
        else:
            warn("checkpoint has no classifier weights; writing a random (untrained) head")
        log(f"loaded {a.weights} in {time.perf_counter() - t0:.1f}s")
    elif a.train_labels is not None:
        training = train_backbone(a, model, channels)
        backbone_prov = training["backbone_weights"]
    else:
        backbone_prov = f"random-init seed {a.seed}"
    if head is None:
        g = torch.Generator().manual_seed(a.seed)
        head = (torch.randn(rows, channels, generator=g) * 0.01, torch.zeros(rows))
        head_prov = "random-init (untrained)"
    else:
        head_prov = "from checkpoint"
    head_w = head[0].detach().float().contiguous()
    head_b = head[1].detach().float().contiguous()

    # The model used for verification carries the exported head (or, for the
    # 2->1 conversion, the original 2-output classifier).
    ver_w, ver_b = (ckpt_head if binary_from_two else (head_w, head_b))
    lin = torch.nn.Linear(channels, ver_w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(ver_w)
        lin.bias.copy_(ver_b)
    set_classifier(a.arch, model, lin)
    model.eval()
    for p_ in model.parameters():
        p_.requires_grad_(False)
    backbone = make_backbone(a.arch, model)
    log(f"model {a.arch}: {sum(p.numel() for p in backbone.parameters()) / 1e6:.2f} M backbone "
        f"parameters, {channels} feature channels, head {rows} x {channels} ({head_prov})")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        onnx_path = tmp / "backbone.onnx"
        example = torch.randn(1, 3, a.height, a.width, generator=torch.Generator().manual_seed(a.seed))
        t0 = time.perf_counter()
        with torch.no_grad():
            used = export_onnx(backbone, example, onnx_path, a.opset, not a.static_size, a.exporter)
        t_export = time.perf_counter() - t0
        log(f"exported backbone.onnx with the {used} exporter in {t_export:.1f}s "
            f"({human_size(onnx_path.stat().st_size)})")
        check_onnx_graph(onnx_path, channels, not a.static_size, a.width, a.height)

        sizes = [(2, a.height, a.width)]
        if not a.static_size:
            sizes.append((1, max(32, a.height // 2), max(32, a.width // 2)))
        t0 = time.perf_counter()
        worst = verify(a.arch, model, onnx_path, head_w, head_b, binary_from_two, sizes, a.seed,
                       channels)
        log(f"verified in {time.perf_counter() - t0:.1f}s: max|ort-torch| "
            f"{worst['features_max_abs']:.3e}, relative {worst['features_rel']:.3e} (<= {REL_TOL})")
        if a.fp16:
            import onnx

            fp32_path = tmp / "backbone-fp32.onnx"
            os.replace(onnx_path, fp32_path)
            onnx.save(convert_fp16(onnx.load(str(fp32_path))), str(onnx_path))
            check_onnx_graph(onnx_path, channels, not a.static_size, a.width, a.height)
            t0 = time.perf_counter()
            rel16 = verify_fp16(fp32_path, onnx_path, sizes, a.seed)
            fp32_path.unlink()
            log(f"float16 backbone ({human_size(onnx_path.stat().st_size)}) verified in "
                f"{time.perf_counter() - t0:.1f}s: relative {rel16:.3e} (<= {FP16_REL_TOL})")

        head_path = tmp / "head.safetensors"
        save_head({"weight": head_w, "bias": head_b}, head_path)
        fsync_file(onnx_path)
        fsync_file(head_path)
        manifest = {
            "schema": SCHEMA,
            "name": a.name,
            "version": a.version,
            "architecture": a.arch,
            "task": "binary" if binary else "multiclass",
            "classes": CLASS_SCHEMES[a.classes],
            "input": {"name": "image", "width": a.width, "height": a.height,
                      "mean": a.mean_v, "std": a.std_v},
            "features": {"name": "features", "channels": channels},
            "preprocess": {"version": PREPROCESS_VERSION,
                           "clahe": {"clip_limit": a.clahe_clip, "tile_grid": a.tile_grid}},
            "files": {"backbone.onnx": sha256_file(onnx_path),
                      "head.safetensors": sha256_file(head_path)},
            "provenance": {"tool": TOOL, "backbone_weights": backbone_prov, "head": head_prov,
                           "torch": torch.__version__, "opset": a.opset,
                           "seed": a.seed, "precision": "fp16" if a.fp16 else "fp32",
                           **({"training": training["training"]} if training else {})},
            "metrics": None,
            "created_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "parent_version": None,
        }
        write_json(tmp / "manifest.json", manifest)
        names = sorted(p.name for p in tmp.iterdir())
        if names != ["backbone.onnx", "head.safetensors", "manifest.json"]:
            raise RuntimeError(f"unexpected files in bundle: {names}")
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)
        install(tmp, out, a.force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sizes_txt = ", ".join(f"{p.name} {human_size(p.stat().st_size)}" for p in sorted(out.iterdir()))
    log(f"wrote {out} ({sizes_txt}) in {time.perf_counter() - t_start:.1f}s")
    return 0


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        return run(a)
    except UserError as e:
        print(f"export_backbone.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("export_backbone.py: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        print(f"export_backbone.py: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
