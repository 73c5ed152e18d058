#!/usr/bin/env bash
# Makes sure a RabbitMQ answers on 127.0.0.1:5672 for the tests: the development
# and CI machines run one; if it has stopped, start it (`rabbitmq-server -detached`).
set -euo pipefail

up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
up && exit 0
if ! command -v rabbitmq-server > /dev/null; then
  echo "[rabbitmq] nothing on 127.0.0.1:5672 and rabbitmq-server is not installed" >&2
  exit 1
fi
# A node whose app was stopped (rabbitmqctl stop_app) only needs the app started.
if rabbitmqctl start_app > /dev/null 2>&1; then
  echo "[rabbitmq] started the stopped rabbit app" >&2
else
  echo "[rabbitmq] starting rabbitmq-server" >&2
  rabbitmq-server -detached
fi
for _ in $(seq 1 120); do
  up && exit 0
  sleep 0.5
done
echo "[rabbitmq] did not start within 60 s" >&2
exit 1
