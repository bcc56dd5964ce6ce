#!/usr/bin/env bash
# Installs and starts everything the tests need; safe to run repeatedly.
set -euo pipefail

# Python clients we did not write: `websockets` (interop) and kosoku (Autobahn).
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
  'websockets>=12' 'kosoku==0.1.0'

# Redis: use the one at REDIS_URL if it answers, else install and start one.
redis_url="${REDIS_URL:-redis://127.0.0.1:6379}"
hostport="${redis_url#redis://}"; hostport="${hostport%%/*}"
host="${hostport%%:*}"; port="${hostport##*:}"
if ! (command -v redis-cli >/dev/null && redis-cli -h "$host" -p "$port" ping 2>/dev/null | grep -q PONG); then
  if ! command -v redis-server >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
  fi
  redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no
  for _ in $(seq 1 50); do
    redis-cli -h "$host" -p "$port" ping 2>/dev/null | grep -q PONG && break
    sleep 0.1
  done
fi
redis-cli -h "$host" -p "$port" ping | grep -q PONG || { echo "Redis did not start at $redis_url" >&2; exit 1; }

# Headless Chromium and its driver for the browser end-to-end test.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
# nginx for the browser test through a load balancer (tests/browser.rs runs
# its own nginx from a temporary directory on a free port: nothing is
# started here, and the package's own service is not wanted: RUNLEVEL=1 keeps
# invoke-rc.d from starting it on port 80 where no policy-rc.d forbids it).
if [ ! -x /usr/sbin/nginx ]; then
  apt-get update -qq && RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
fi
echo "setup done: $(python3 -c 'import websockets; print("websockets", websockets.__version__)'), $(redis-cli -h "$host" -p "$port" info server | grep redis_version | tr -d '\r'), $(chromium --version), $(/usr/sbin/nginx -v 2>&1)"

# Django Channels interop (tests/django.rs, bench/django): the tutorial chat
# app under tests/django runs on Django + channels + channels_redis, served
# by daphne; cryptography for symmetric_encryption_keys. Versions that work
# with Python 3.11.
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
  'Django==5.2.*' 'channels==4.3.*' 'channels_redis[cryptography]==4.3.0' 'daphne==4.2.*'
python3 -c 'import django, channels, channels_redis, daphne; print("django", django.__version__, "channels", channels.__version__, "channels_redis", channels_redis.__version__, "daphne", daphne.__version__)'
# --- Redis Cluster and NATS (tests/redis_cluster.rs, tests/nats.rs, the bench) ---
# A 3-primary Redis Cluster and a nats-server (JetStream on, temporary store) on
# free loopback ports. Their URLs go to target/ci-services/{redis-cluster-urls,nats-url},
# which .ci/run exports as REDIS_CLUSTER_URLS and NATS_URL. Nothing here is global:
# every server runs from its own temporary directory. Safe to run repeatedly (a cluster
# or server that still answers is reused).
services=target/ci-services
mkdir -p "$services"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
if ! command -v nats-server >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
fi

cluster_ok() {
  local first
  [ -s "$services/redis-cluster-urls" ] || return 1
  first="$(cut -d, -f1 "$services/redis-cluster-urls")"; first="${first##*:}"
  redis-cli -h 127.0.0.1 -p "$first" cluster info 2>/dev/null | grep -q 'cluster_state:ok'
}
if ! cluster_ok; then
  cluster_dir="$(mktemp -d /tmp/tower-channels-cluster.XXXXXX)"
  nodes=() urls=()
  for _ in 1 2 3; do
    port="$(free_port)"; bus="$(free_port)"
    redis-server --cluster-enabled yes --port "$port" --cluster-port "$bus" --bind 127.0.0.1 \
      --cluster-config-file "$cluster_dir/nodes-$port.conf" --dir "$cluster_dir" \
      --daemonize yes --save "" --appendonly no --logfile "$cluster_dir/redis-$port.log"
    nodes+=("127.0.0.1:$port"); urls+=("redis://127.0.0.1:$port")
  done
  for node in "${nodes[@]}"; do
    for _ in $(seq 1 50); do
      redis-cli -h 127.0.0.1 -p "${node##*:}" ping 2>/dev/null | grep -q PONG && break
      sleep 0.1
    done
  done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >/dev/null
  (IFS=,; echo "${urls[*]}") > "$services/redis-cluster-urls"
  for _ in $(seq 1 100); do cluster_ok && break; sleep 0.1; done
fi
cluster_ok || { echo "Redis Cluster did not reach cluster_state:ok" >&2; exit 1; }

nats_ok() {
  local hp
  [ -s "$services/nats-url" ] || return 1
  hp="$(sed 's#^nats://##' "$services/nats-url")"
  # The monitoring port is not enabled; a NATS server greets every TCP client with INFO.
  timeout 2 bash -c "exec 3<>/dev/tcp/${hp%%:*}/${hp##*:}; head -c 4 <&3" 2>/dev/null | grep -q INFO
}
if ! nats_ok; then
  nats_dir="$(mktemp -d /tmp/tower-channels-nats.XXXXXX)"
  port="$(free_port)"
  nohup nats-server -a 127.0.0.1 -p "$port" -js -sd "$nats_dir" >"$nats_dir/nats.log" 2>&1 &
  echo "nats://127.0.0.1:$port" > "$services/nats-url"
  for _ in $(seq 1 50); do nats_ok && break; sleep 0.1; done
fi
nats_ok || { echo "nats-server did not start" >&2; exit 1; }
echo "Redis Cluster at $(cat "$services/redis-cluster-urls"); NATS at $(cat "$services/nats-url") ($(nats-server --version))"
# Node's `ws` client for tests/interop_node.rs (permessage-deflate interop),
# pinned by tests/interop/node/package-lock.json.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
node_dir="$(cd "$(dirname "$0")/../tests/interop/node" && pwd)"
(cd "$node_dir" && npm ci --no-audit --no-fund --silent)
echo "setup done: node $(node --version), ws $(cd "$node_dir" && node -p 'require("ws/package.json").version')"
