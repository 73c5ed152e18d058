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

Without --weights the backbone is randomly initialised from --seed and the
head is a small random one (std 0.01, bias 0) that the manifest marks as
untrained: fine for tests, useless for grading. Nothing is downloaded. To
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
    so.intra_op_num_threads = max(1, os.cpu_count() or 1)
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
    so.intra_op_num_threads = max(1, os.cpu_count() or 1)
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
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    binary = a.classes == 2
    rows = 1 if binary else a.classes
    channels = feature_channels(a.arch)

    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    model = build_model(a.arch, rows)
    head = ckpt_head = None
    binary_from_two = False
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
                           "seed": a.seed, "precision": "fp16" if a.fp16 else "fp32"},
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
