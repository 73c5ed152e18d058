#!/usr/bin/env bash
# Whole-worker throughput side by side with its references (see
# examples/bench_worker.rs): preprocessing alone, bare inference and a plain
# Python worker, on the same images in one run. Starts Garage, uses the
# RabbitMQ on 127.0.0.1:5672; installs pika and boto3 for the Python reference
# into the cache (not into the project's venv).
#
#   bash scripts/bench-worker.sh [--images N] [--arch densenet161|inception_resnet_v2|tiny]
#                                [--concurrency C] [--max-batch B] [--size WxH]
#                                [--device auto|cpu|cuda]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cache="${CINFLOW_CACHE:-$HOME/.cache/cinflow}"
bash scripts/setup.sh
bash scripts/rabbitmq.sh
eval "$(bash scripts/garage.sh start)"
pylib="$cache/bench-pylib"
if [ ! -f "$pylib/.complete" ]; then
  .venv/bin/python -m pip install --quiet --target "$pylib" pika==1.3.2 boto3==1.40.0
  touch "$pylib/.complete"
fi
export VIRTUAL_ENV="$root/.venv" PATH="$root/.venv/bin:$PATH"
cargo build --release --locked --quiet --all-features --bin cinflow --example bench_worker
"${CARGO_TARGET_DIR:-$root/target}/release/examples/bench_worker" --python "$pylib" "$@"
