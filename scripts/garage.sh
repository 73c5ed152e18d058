#!/usr/bin/env bash
# A real S3 server for tests and local use: Garage on loopback, single node.
#
#   bash scripts/garage.sh install   build Garage once into the cache (cargo install
#                                    garage --locked; ~10-20 minutes on 2 cores), reused after
#   bash scripts/garage.sh start     install if needed, start it, lay out the single node,
#                                    import the key, create the buckets; prints the env to use
#   bash scripts/garage.sh env       print the env of a running server (eval "$(... env)")
#   bash scripts/garage.sh stop      stop it
#
# State lives in $CINFLOW_GARAGE_DIR (default $CINFLOW_CACHE/garage-run); the binary in
# $CINFLOW_CACHE/garage-$GARAGE_VERSION. Ports: S3 $CINFLOW_GARAGE_PORT (3900), RPC +1,
# admin +3. Buckets: $CINFLOW_S3_BUCKETS (default "cinflow cinflow-test").
set -euo pipefail

GARAGE_VERSION=2.5.0
cache="${CINFLOW_CACHE:-$HOME/.cache/cinflow}"
prefix="$cache/garage-$GARAGE_VERSION"
bin="$prefix/bin/garage"
run="${CINFLOW_GARAGE_DIR:-$cache/garage-run}"
port="${CINFLOW_GARAGE_PORT:-3900}"
buckets="${CINFLOW_S3_BUCKETS:-cinflow cinflow-test}"
# A fixed development key: the server listens on loopback only.
key_id=GK0c1f10a5e5c0ffee00000001
key_secret=c1f10a5e5ec2e7000000000000000000000000000000000000000000000000aa
region=garage

log() { echo "[garage] $*" >&2; }

install() {
  if [ -x "$bin" ]; then
    return
  fi
  log "building Garage $GARAGE_VERSION into $prefix (once; 10-20 minutes on 2 cores)"
  cargo install garage --version "$GARAGE_VERSION" --locked --root "$prefix" \
    --no-default-features --features bundled-libs,sqlite >&2
}

config() {
  mkdir -p "$run/meta" "$run/data"
  cat > "$run/garage.toml" <<TOML
metadata_dir = "$run/meta"
data_dir = "$run/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$((port + 1))"
rpc_public_addr = "127.0.0.1:$((port + 1))"
rpc_secret = "$(printf '%064d' 7)"

[s3_api]
s3_region = "$region"
api_bind_addr = "127.0.0.1:$port"
root_domain = ".s3.localhost"

[admin]
api_bind_addr = "127.0.0.1:$((port + 3))"
TOML
}

g() { "$bin" -c "$run/garage.toml" "$@"; }

running() { [ -f "$run/pid" ] && kill -0 "$(cat "$run/pid")" 2>/dev/null; }

print_env() {
  cat <<ENV
export CINFLOW_S3_ENDPOINT=http://127.0.0.1:$port
export AWS_ACCESS_KEY_ID=$key_id
export AWS_SECRET_ACCESS_KEY=$key_secret
export AWS_REGION=$region
export CINFLOW_S3_FORCE_PATH_STYLE=true
export CINFLOW_S3_BUCKET=${buckets%% *}
ENV
}

start() {
  install
  if running && s3_up; then
    log "already running (pid $(cat "$run/pid"))"
    print_env
    return
  fi
  stop
  config
  nohup "$bin" -c "$run/garage.toml" server > "$run/server.log" 2>&1 &
  echo $! > "$run/pid"
  for _ in $(seq 1 100); do
    if g status > /dev/null 2>&1; then break; fi
    sleep 0.2
  done
  for _ in $(seq 1 50); do
    if s3_up; then break; fi
    sleep 0.1
  done
  if ! g status > /dev/null 2>&1 || ! s3_up; then
    log "server did not start:"
    tail -20 "$run/server.log" >&2
    stop
    exit 1
  fi
  # A fresh state folder has layout version 0: give the single node a role once.
  local version=""
  for _ in $(seq 1 50); do
    version=$(g layout show 2>/dev/null | sed -n 's/^Current cluster layout version: //p')
    [ -n "$version" ] && break
    sleep 0.1
  done
  if [ "${version:-0}" = "0" ]; then
    node=$(g node id -q | cut -d@ -f1)
    g layout assign -z local -c 1G "$node" > /dev/null
    g layout apply --version 1 > /dev/null
  fi
  g key info "$key_id" > /dev/null 2>&1 || g key import --yes -n cinflow "$key_id" "$key_secret" > /dev/null
  for b in $buckets; do
    g bucket info "$b" > /dev/null 2>&1 || g bucket create "$b" > /dev/null
    g bucket allow --read --write --owner "$b" --key "$key_id" > /dev/null
  done
  log "running on http://127.0.0.1:$port (buckets: $buckets; state in $run)"
  print_env
}

stop() {
  if running; then
    local pid
    pid=$(cat "$run/pid")
    kill "$pid"
    # Wait for the ports to be released, so a restart can bind them again.
    for _ in $(seq 1 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$run/pid"
    log "stopped"
  fi
}

s3_up() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }

case "${1:-start}" in
  install) install ;;
  start) start ;;
  env) print_env ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|env|stop" >&2; exit 2 ;;
esac
