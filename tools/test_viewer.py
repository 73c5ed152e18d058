#!/usr/bin/env python3
"""Drives a cinflow result viewer page in headless Chromium (through chromedriver's
W3C WebDriver protocol, standard library only) and checks what it draws against an
independent NumPy/OpenCV drawing of the same overlay.

Usage: test_viewer.py PAGE RECORD OUT_DIR VIA [SCALE_JSON]
       test_viewer.py --load URL

The second form opens a page by URL (a presigned link of the LIS bridge, say),
waits until every image has loaded or failed, and prints how each figure drew
and what was requested from outside the page's folder.

PAGE is a viewer page (`K.html` of `cinflow classify`, or a worker's `viewer.html`
downloaded with its objects), RECORD the matching result JSON whose `raw_map` and
`preprocessed_image` paths are relative to RECORD's folder (classify's layout).
VIA is how the browser opens the page: `http` (a local HTTP server serving the page's
folder; the page may read the image's pixels and blends them itself, "exact") or
`file` (a file:// URL; the browser keeps the page from reading the neighbouring
image's pixels, so the page lays its heat colours over the image at 40% opacity,
"composite"). SCALE_JSON, when given, is the bundle's `cam_scale`
({"grad_cam": .., "contrastive": ..}); without it each overlay is scaled to its own
map's maximum.

For image 0 of the page it checks that the page loads with no script error and its
image loads from beside the page, that the predicted class's Grad-CAM overlay is
shown first, then clicks another class and the contrastive map, and "image only".
For every state it compares what the page drew with the NumPy drawing: maps upsampled
with cv2.resize (INTER_LINEAR, half-pixel centres), ReLU(map)/scale in the jet colour
map (MATLAB's piecewise-linear formula), blended 40% over the JPEG decoded by OpenCV.
"exact": the canvas pixels against the blend. "composite": the page's heat layer
against the jet colours, and a screenshot of the canvas shown at its own size (what
the browser composited) against the blend. Screenshots of each state go to OUT_DIR.
Prints one JSON object with the differences; the caller asserts on them.
"""
import base64
import functools
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
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
        # The port is free when picked but may be taken before chromedriver
        # binds it (the tests run concurrently): a driver that exits at once
        # is started again on another port.
        for attempt in range(3):
            self.port = free_port()
            self.proc = subprocess.Popen([driver, f"--port={self.port}"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.time() + 30
            while True:
                try:
                    self.call("GET", "/status")
                    break
                except OSError:
                    if self.proc.poll() is not None or time.time() > deadline:
                        break
                    time.sleep(0.2)
            if self.proc.poll() is None:
                break
            if attempt == 2:
                sys.exit(f"chromedriver exited with {self.proc.returncode} (port {self.port})")
        self.call("GET", "/status")
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

    def element_png(self, css):
        el = self.s("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]
        return base64.b64decode(self.s("GET", f"/element/{el}/screenshot"))

    def requests_outside(self, folder_url):
        """What the page loaded from outside its own folder (data: URLs aside)."""
        return self.script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
            ".filter(n => !n.startsWith('data:') && !n.startsWith(arguments[0]))", folder_url)

    def console_errors(self):
        """The browser's SEVERE log entries (script errors, failed loads)."""
        try:
            logs = self.s("POST", "/se/log", {"type": "browser"})
        except Exception:  # noqa: BLE001 - not every chromedriver keeps the log endpoint
            logs = []
        return [e["message"] for e in logs if e.get("level") == "SEVERE"]

    def close(self):
        try:
            self.s("DELETE", "")
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=30)


# arguments[0]: which canvas of image 0 (the one shown, or the heat layer).
READ_CANVAS = """
const c = document.querySelector('figure[data-image="0"] ' + arguments[0]);
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let s = '';
for (let i = 0; i < d.length; i += 8192) s += String.fromCharCode.apply(null, d.subarray(i, i + 8192));
return [c.width, c.height, btoa(s), c.closest('figure').getAttribute('data-shown')];
"""
# The shown canvas at one CSS pixel per canvas pixel, for an element screenshot.
NATURAL_SIZE = """
const c = document.querySelector('figure[data-image="0"] canvas');
c.style.border = '0';
c.style.width = c.width + 'px';
c.style.height = c.height + 'px';
return [c.width, c.height, c.closest('figure').getAttribute('data-shown')];
"""


def serve(folder):
    """A local HTTP server of `folder` (a thread): returns (server, base URL)."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def jet(t):
    t = np.clip(np.nan_to_num(t, nan=0.0), 0.0, 1.0)
    ch = lambda o: np.round(np.clip(1.5 - np.abs(4.0 * t - o), 0.0, 1.0) * 255.0)
    return np.stack([ch(3.0), ch(2.0), ch(1.0)], axis=-1)


def heat_colours(shape, maps, cls, kind, scale):
    m = maps.astype(np.float64)
    if kind == "contrastive":
        m = m - m.mean(axis=0, keepdims=True)
    m = m[cls].astype(np.float32)
    h, w = shape
    up = cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float64)
    if scale is None:
        scale = max(float(up.max()), 0.0)
    inv = 1.0 / scale if scale > 0 else 0.0
    return jet(np.maximum(up, 0.0) * inv)


def drawing(img, heat):
    return np.round(0.6 * img.astype(np.float64) + 0.4 * heat)


def differences(got, want):
    diff = np.abs(got - want)
    return {"mean_abs": float(diff.mean()), "max_abs": float(diff.max()),
            "share_over_2": float((diff > 2).mean())}


def load(url):
    folder_url = url.split("#")[0].split("?")[0].rsplit("/", 1)[0] + "/"
    wd = WebDriver()
    try:
        wd.s("POST", "/url", {"url": url})
        deadline = time.time() + 30
        figures = []
        while time.time() < deadline:
            figures = wd.script(
                "return [...document.querySelectorAll('figure[data-image]')].map(f => "
                "({loaded: f.getAttribute('data-loaded'), drawing: f.getAttribute('data-drawing'), "
                "shown: f.getAttribute('data-shown')}))")
            if figures and all(f["loaded"] != "false" for f in figures):
                break
            time.sleep(0.1)
        report = {"figures": figures, "external_requests": wd.requests_outside(folder_url)}
        report["console_errors"] = wd.console_errors()
    finally:
        wd.close()
    print(json.dumps(report))


def main():
    if sys.argv[1] == "--load":
        return load(sys.argv[2])
    page, record_path, out, via = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    if via not in ("http", "file"):
        sys.exit(f"VIA must be http or file, not {via!r}")
    scales = json.loads(sys.argv[5]) if len(sys.argv) > 5 else None
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

    server = None
    if via == "http":
        server, folder_url = serve(page.parent)
        url = folder_url + page.name
    else:
        url = page.resolve().as_uri()
        folder_url = page.parent.resolve().as_uri() + "/"
    wd = WebDriver()
    report = {"via": via, "states": [], "screenshots": []}
    try:
        wd.s("POST", "/url", {"url": url})
        deadline = time.time() + 30
        loaded = None
        while loaded != "true":
            loaded = wd.script("return document.querySelector('figure[data-image=\"0\"]').getAttribute('data-loaded')")
            if loaded == "error" or time.time() > deadline:
                raise SystemExit(f"the page's image did not load: {loaded}")
            time.sleep(0.1)
        report["drawing"] = wd.script("return document.querySelector('figure[data-image=\"0\"]').getAttribute('data-drawing')")
        report["title"] = wd.script("return document.title")
        report["slide_text"] = wd.script("return document.getElementById('summary').innerText")
        report["figure_text"] = wd.script("return document.querySelector('figure[data-image=\"0\"]').innerText")
        report["external_requests"] = wd.requests_outside(folder_url)
        # Where the image came from, relative to the page's folder (None: elsewhere).
        image_url = wd.script("return document.querySelector('figure[data-image=\"0\"]').getAttribute('data-image-url')")
        report["image_in_folder"] = image_url[len(folder_url):] if image_url.startswith(folder_url) else None
        composite = report["drawing"] == "composite"

        def state(name, cls, kind):
            if cls is None:
                heat = None
                want = img.astype(np.float64)
                expected_shown = "none"
            else:
                scale = None if scales is None else scales["grad_cam" if kind == "grad-cam" else "contrastive"]
                heat = heat_colours(img.shape[:2], maps, cls, kind, scale)
                want = drawing(img, heat)
                expected_shown = f"{classes[cls]}/{kind}"
            entry = {"name": name, "expected_shown": expected_shown,
                     "heat_pixels": int((np.abs(want - img) > 8).any(axis=-1).sum())}
            if composite:
                # The heat layer: the jet colours, opaque; cleared for the image alone.
                w, h, b64, shown = wd.script(READ_CANVAS, "canvas.heat")
                layer = np.frombuffer(base64.b64decode(b64), np.uint8).reshape(h, w, 4).astype(np.float64)
                want_layer = np.zeros((h, w, 4)) if heat is None else np.dstack([heat, np.full(heat.shape[:2], 255.0)])
                entry.update(differences(layer, want_layer))
                # What the browser composited, as shown at one CSS pixel per canvas pixel.
                w, h, shown = wd.script(NATURAL_SIZE)
                png = wd.element_png('figure[data-image="0"] canvas')
                shot = cv2.cvtColor(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                entry["screenshot_size"] = [shot.shape[1], shot.shape[0]]
                if shot.shape[:2] == want.shape[:2]:
                    entry["composited"] = differences(shot.astype(np.float64), want)
                got = shot.astype(np.float64)
            else:
                w, h, b64, shown = wd.script(READ_CANVAS, "canvas:not(.heat)")
                got = np.frombuffer(base64.b64decode(b64), np.uint8).reshape(h, w, 4)[..., :3].astype(np.float64)
                entry.update(differences(got, want))
            entry.update({"shown": shown, "size": [w, h]})
            path = out / f"viewer-{via}-{name}.png"
            wd.screenshot(path)
            report["screenshots"].append(str(path))
            report["states"].append(entry)
            return got

        first = state("predicted-grad-cam", predicted, "grad-cam")
        # The worker's/classify's own pre-drawn overlay of the predicted class
        # (JPEG, legend band below the image) agrees with the page's drawing.
        drawn = [hm for hm in r.get("heatmaps", []) if hm["class"] == r["predicted_class"]]
        if drawn and first.shape[:2] == img.shape[:2]:
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
        report["console_errors"] = wd.console_errors()
    finally:
        wd.close()
        if server is not None:
            server.shutdown()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
