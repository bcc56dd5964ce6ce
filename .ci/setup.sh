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
echo "setup done: $(python3 -c 'import websockets; print("websockets", websockets.__version__)'), $(redis-cli -h "$host" -p "$port" info server | grep redis_version | tr -d '\r'), $(chromium --version)"

# Node's `ws` client for tests/interop_node.rs (permessage-deflate interop),
# pinned by tests/interop/node/package-lock.json.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
node_dir="$(cd "$(dirname "$0")/../tests/interop/node" && pwd)"
(cd "$node_dir" && npm ci --no-audit --no-fund --silent)
echo "setup done: node $(node --version), ws $(cd "$node_dir" && node -p 'require("ws/package.json").version')"
