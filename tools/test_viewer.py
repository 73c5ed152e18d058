#!/usr/bin/env python3
"""Drives a cinflow result viewer page in headless Chromium (through chromedriver's
W3C WebDriver protocol, standard library only) and checks what it draws against an
independent NumPy/OpenCV drawing of the same overlay.

Usage: test_viewer.py PAGE RECORD OUT_DIR [SCALE_JSON]

PAGE is a viewer page (`K.html` of `cinflow classify`, or a worker's `viewer.html`
downloaded with its objects), RECORD the matching result JSON whose `raw_map` and
`preprocessed_image` paths are relative to RECORD's folder (classify's layout).
SCALE_JSON, when given, is the bundle's `cam_scale` ({"grad_cam": .., "contrastive": ..});
without it each overlay is scaled to its own map's maximum.

For image 0 of the page it checks that the page loads with no script error and its
image decodes, that the predicted class's Grad-CAM overlay is shown first, then
clicks another class and the contrastive map, and "image only". For every state it
reads the canvas pixels and compares them with the NumPy drawing: maps upsampled with
cv2.resize (INTER_LINEAR, half-pixel centres), ReLU(map)/scale in the jet colour map
(MATLAB's piecewise-linear formula), blended 40% over the JPEG decoded by OpenCV.
Screenshots of each state go to OUT_DIR. Prints one JSON object with the differences;
the caller asserts on them.
"""
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebDriver:
    def __init__(self):
        driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
        browser = shutil.which("chromium") or "/usr/bin/chromium"
        for p in (driver, browser):
            if not os.path.exists(p):
                sys.exit(f"{p} not found: scripts/setup.sh installs chromium and chromium-driver (Debian)")
        self.port = free_port()
        self.proc = subprocess.Popen([driver, f"--port={self.port}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:
            try:
                self.call("GET", "/status")
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        caps = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": browser,
                "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                         "--disable-gpu", "--window-size=1400,1300", "--force-color-profile=srgb"],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        }}}
        self.session = self.call("POST", "/session", caps)["sessionId"]

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())["value"]

    def s(self, method, path, body=None):
        return self.call(method, f"/session/{self.session}{path}", body)

    def script(self, js, *args):
        return self.s("POST", "/execute/sync", {"script": js, "args": list(args)})

    def click(self, css):
        el = self.s("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]
        self.s("POST", f"/element/{el}/click", {})

    def screenshot(self, path):
        Path(path).write_bytes(base64.b64decode(self.s("GET", "/screenshot")))

    def close(self):
        try:
            self.s("DELETE", "")
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=30)


READ_CANVAS = """
const c = document.querySelector('figure[data-image="0"] canvas');
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let s = '';
for (let i = 0; i < d.length; i += 8192) s += String.fromCharCode.apply(null, d.subarray(i, i + 8192));
return [c.width, c.height, btoa(s), c.closest('figure').getAttribute('data-shown')];
"""


def jet(t):
    t = np.clip(np.nan_to_num(t, nan=0.0), 0.0, 1.0)
    ch = lambda o: np.round(np.clip(1.5 - np.abs(4.0 * t - o), 0.0, 1.0) * 255.0)
    return np.stack([ch(3.0), ch(2.0), ch(1.0)], axis=-1)


def drawing(img, maps, cls, kind, scale):
    m = maps.astype(np.float64)
    if kind == "contrastive":
        m = m - m.mean(axis=0, keepdims=True)
    m = m[cls].astype(np.float32)
    h, w = img.shape[:2]
    up = cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float64)
    if scale is None:
        scale = max(float(up.max()), 0.0)
    inv = 1.0 / scale if scale > 0 else 0.0
    heat = jet(np.maximum(up, 0.0) * inv)
    return np.round(0.6 * img.astype(np.float64) + 0.4 * heat)


def main():
    page, record_path, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    scales = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None
    out.mkdir(parents=True, exist_ok=True)
    record = json.loads(record_path.read_text())
    r = record["images"][0]
    base = record_path.parent
    img = cv2.cvtColor(cv2.imread(str(base / r["preprocessed_image"]), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    maps = np.load(base / r["raw_map"]["uri"])
    classes = record["model"]["classes"]
    predicted = classes.index(r["predicted_class"])
    probs = r["probabilities"]
    other = min((c for c in range(len(classes)) if c != predicted), key=lambda c: probs[classes[c]])

    wd = WebDriver()
    report = {"states": [], "screenshots": []}
    try:
        wd.s("POST", "/url", {"url": page.resolve().as_uri()})
        deadline = time.time() + 30
        while wd.script("return document.querySelector('figure[data-image=\"0\"]').getAttribute('data-loaded')") != "true":
            if time.time() > deadline:
                raise SystemExit("the page's image did not load")
            time.sleep(0.1)
        report["title"] = wd.script("return document.title")
        report["slide_text"] = wd.script("return document.getElementById('summary').innerText")
        report["figure_text"] = wd.script("return document.querySelector('figure[data-image=\"0\"]').innerText")
        report["external_requests"] = wd.script(
            "return performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith('data:'))")

        def state(name, cls, kind):
            w, h, b64, shown = wd.script(READ_CANVAS)
            got = np.frombuffer(base64.b64decode(b64), np.uint8).reshape(h, w, 4)[..., :3].astype(np.float64)
            if cls is None:
                want = img.astype(np.float64)
                expected_shown = "none"
            else:
                scale = None if scales is None else scales["grad_cam" if kind == "grad-cam" else "contrastive"]
                want = drawing(img, maps, cls, kind, scale)
                expected_shown = f"{classes[cls]}/{kind}"
            diff = np.abs(got - want)
            shot = out / f"viewer-{name}.png"
            wd.screenshot(shot)
            report["screenshots"].append(str(shot))
            report["states"].append({
                "name": name, "shown": shown, "expected_shown": expected_shown,
                "size": [w, h], "mean_abs": float(diff.mean()), "max_abs": float(diff.max()),
                "share_over_2": float((diff > 2).mean()),
                "heat_pixels": int((np.abs(want - img) > 8).any(axis=-1).sum()),
            })
            return got

        first = state("predicted-grad-cam", predicted, "grad-cam")
        # The worker's/classify's own pre-drawn overlay of the predicted class
        # (JPEG, legend band below the image) agrees with the page's drawing.
        drawn = [hm for hm in r.get("heatmaps", []) if hm["class"] == r["predicted_class"]]
        if drawn:
            rust = cv2.cvtColor(cv2.imread(str(base / drawn[0]["overlay"]), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            # Above the legend band burned into its bottom (cinflow::cam::legend::band_height).
            h = first.shape[0] - min(max(first.shape[0] // 14, 20), 64)
            report["rust_overlay_mean_abs"] = float(np.abs(rust[:h].astype(np.float64) - first[:h]).mean())
        wd.click(f'figure[data-image="0"] button[data-class="{classes[other]}"]')
        state("other-grad-cam", other, "grad-cam")
        wd.click('figure[data-image="0"] button[data-kind="contrastive"]')
        state("other-contrastive", other, "contrastive")
        wd.click('figure[data-image="0"] button[data-class="none"]')
        state("image-only", None, None)
        try:
            logs = wd.s("POST", "/se/log", {"type": "browser"})
        except Exception:  # noqa: BLE001 - not every chromedriver keeps the log endpoint
            logs = []
        report["console_errors"] = [entry["message"] for entry in logs if entry.get("level") == "SEVERE"]
    finally:
        wd.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
