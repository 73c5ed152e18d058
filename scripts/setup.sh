#!/usr/bin/env bash
# Idempotent set-up for cinflow on a fresh machine.
#
# Creates the Python virtual environment (pinned in tools/requirements.txt) in a
# cache outside the clone, keyed by the requirements' hash, and links it as
# ./.venv so that .cargo/config.toml can point the build at ONNX Runtime and
# libtorch inside it. A second run with nothing changed takes about a second.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cache="${CINFLOW_CACHE:-$HOME/.cache/cinflow}"
mkdir -p "$cache"

log() { printf '[setup] %s\n' "$*" >&2; }

pick_python() {
  for p in "${PYTHON:-}" python3.11 python3; do
    [ -n "$p" ] && command -v "$p" >/dev/null 2>&1 && { command -v "$p"; return; }
  done
  echo "python3 not found: install Python 3.10+ (Debian: apt-get install python3 python3-venv)" >&2
  exit 1
}

# --- System tools ----------------------------------------------------------
# nasm lets the vendored libjpeg-turbo (JPEG decoding) build its SIMD code; the
# pixels are the same without it, decoding is ~2x slower.
if ! command -v nasm >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing nasm (apt-get)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nasm; } >/dev/null 2>&1; then
      log "could not install nasm: JPEG decoding builds without SIMD (same output, slower)"
    fi
  else
    log "nasm not found: JPEG decoding builds without SIMD (same output, slower); install nasm for speed"
  fi
fi

# The openssl command line tool makes the test CA and certificates of tests/tls.rs.
if ! command -v openssl >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing openssl (apt-get)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl; } >/dev/null 2>&1 \
      || log "could not install openssl: tests/tls.rs will fail"
  else
    log "openssl not found: tests/tls.rs needs it (apt-get install openssl)"
  fi
fi

# Headless Chromium and its WebDriver: tests/viewer.rs opens the result viewer
# page in a real browser (tools/test_viewer.py).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing chromium and chromium-driver (apt-get; about 100 MB)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } >/dev/null 2>&1 \
      || log "could not install chromium: tests/viewer.rs will fail"
  else
    log "chromium/chromedriver not found: tests/viewer.rs needs them (apt-get install chromium chromium-driver)"
  fi
fi

# promtool (Debian's prometheus package) loads and unit-tests the Helm chart's
# alerting rules in tests/deploy.rs. The package's service is not started.
if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing promtool (apt-get install prometheus)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; } >/dev/null 2>&1 \
      || log "could not install prometheus: tests/deploy.rs (the alert tests) will fail"
  else
    log "promtool not found: tests/deploy.rs needs it (apt-get install prometheus)"
  fi
fi

# pika (Debian's python3-pika, for the system Python) is the foreign AMQP
# publisher of tests/delivery.rs: a job published the way a lab's Python
# scripts publish it. The project's venv does not need it.
if ! /usr/bin/python3 -c "import pika" >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing pika (apt-get install python3-pika)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pika; } >/dev/null 2>&1 \
      || log "could not install python3-pika: tests/delivery.rs will fail"
  else
    log "pika not found: tests/delivery.rs needs it (apt-get install python3-pika)"
  fi
fi

# --- Python virtual environment -------------------------------------------
req="tools/requirements.txt"
key="$(cat "$req" | sha256sum | cut -c1-16)"
venv="$cache/venv-$key"
if [ ! -f "$venv/.complete" ]; then
  py="$(pick_python)"
  log "creating virtual environment $venv (first run downloads torch and onnxruntime; several minutes)"
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -r "$req"
  touch "$venv/.complete"
else
  log "virtual environment up to date ($venv)"
fi
ln -sfn "$venv" .venv

# Stable names for the shared libraries the Rust side loads, so that
# .cargo/config.toml does not depend on the Python minor version.
# Resolved paths: the venv is shared by every clone that uses this cache.
site="$(realpath "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')")"
mkdir -p "$venv/cinflow-lib"
ort_lib="$(ls "$site"/onnxruntime/capi/libonnxruntime.so* 2>/dev/null | head -n1 || true)"
if [ -z "$ort_lib" ]; then
  echo "onnxruntime wheel has no libonnxruntime.so under $site/onnxruntime/capi" >&2
  exit 1
fi
ln -sfn "$ort_lib" "$venv/cinflow-lib/libonnxruntime.so"
ln -sfn "$site/torch/lib" "$venv/cinflow-lib/torch"

log "ONNX Runtime: $ort_lib"
log "libtorch:     $site/torch/lib"
