#!/usr/bin/env bash
# Whole-worker throughput against bare inference of the same model (see
# examples/bench_worker.rs): starts Garage, uses the RabbitMQ on 127.0.0.1:5672.
#
#   bash scripts/bench-worker.sh [--images N] [--arch densenet161|inception_resnet_v2|tiny]
#                                [--concurrency C] [--size WxH] [--device auto|cpu|cuda]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/rabbitmq.sh
eval "$(bash scripts/garage.sh start)"
cargo build --release --locked --quiet --all-features --bin cinflow --example bench_worker
"${CARGO_TARGET_DIR:-$root/target}/release/examples/bench_worker" "$@"
