#!/usr/bin/env bash
# Cross-process fan-out through a broker: two crate `chat` processes share a
# room through one Redis, a 3-node Redis Cluster (sharded Pub/Sub) or NATS;
# `loadgen fanout` splits the subscribers over both and publishes on the
# first. Every broker is started here on free loopback ports and stopped at
# the end. Prints one line per broker and a markdown table.
#
#   bench/scale.sh                       # 1,000 subscribers x 500 messages, 2 rounds
#   bench/scale.sh --subs 200 --msgs 50 --rounds 1
#   bench/scale.sh --only nats --chat /tmp/chat-a --loadgen /tmp/loadgen
#                                        # one broker, prebuilt binaries (to
#                                        # compare two builds, alternating)
#
# Needs redis-server, redis-cli and nats-server on PATH.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
subs=1000 msgs=500 rounds=2 only="" chat="" loadgen=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --subs) subs="$2"; shift 2 ;;
        --msgs) msgs="$2"; shift 2 ;;
        --rounds) rounds="$2"; shift 2 ;;
        --only) only="$2"; shift 2 ;;
        --chat) chat="$2"; shift 2 ;;
        --loadgen) loadgen="$2"; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
ulimit -n "$(ulimit -Hn)"

if [[ -z "$chat" || -z "$loadgen" ]]; then
    cargo build --release --example chat --features redis,redis-cluster,nats
    cargo build --release -p tower-channels-bench --bins
    target_dir="$(cargo metadata --format-version 1 --no-deps |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
    chat="${chat:-$target_dir/release/examples/chat}"
    loadgen="${loadgen:-$target_dir/release/loadgen}"
fi

work="$(mktemp -d /tmp/tower-channels-scale.XXXXXX)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
ticks() { # utime + stime of the given pids, in clock ticks
    local sum=0 p
    for p in "$@"; do
        sum=$((sum + $(awk '{print $14 + $15}' "/proc/$p/stat")))
    done
    echo "$sum"
}
wait_for() { # wait_for CMD...: poll a readiness check (process start-up) for up to 10 s
    for _ in $(seq 1 100); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "not ready: $*" >&2; return 1
}

start_chat() { # start_chat LOG ARGS...: prints "pid addr"
    local log="$1"; shift
    "$chat" --addr 127.0.0.1:0 "$@" >"$log" 2>&1 &
    local pid=$!
    pids+=("$pid")
    for _ in $(seq 1 100); do
        if grep -q '^listening on ' "$log"; then
            echo "$pid $(sed -n 's/^listening on //p' "$log" | head -1)"
            return 0
        fi
        sleep 0.1
    done
    echo "chat did not start: $(cat "$log")" >&2
    return 1
}

# --- brokers -------------------------------------------------------------
redis_port="$(free_port)"
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >"$work/redis.log" 2>&1 &
redis_pid=$!; pids+=("$redis_pid")
wait_for redis-cli -p "$redis_port" ping

cluster_ports=() cluster_pids=()
for i in 1 2 3; do
    port="$(free_port)"; bus="$(free_port)"
    redis-server --cluster-enabled yes --port "$port" --cluster-port "$bus" --bind 127.0.0.1 \
        --cluster-config-file "$work/nodes-$port.conf" --dir "$work" \
        --save "" --appendonly no >"$work/cluster-$port.log" 2>&1 &
    cluster_pids+=("$!"); pids+=("$!"); cluster_ports+=("$port")
    wait_for redis-cli -p "$port" ping
done
redis-cli --cluster create $(printf '127.0.0.1:%s ' "${cluster_ports[@]}") \
    --cluster-replicas 0 --cluster-yes >/dev/null
wait_for bash -c "redis-cli -p ${cluster_ports[0]} cluster info | grep -q cluster_state:ok"
cluster_urls="$(printf 'redis://127.0.0.1:%s,' "${cluster_ports[@]}")"; cluster_urls="${cluster_urls%,}"

nats_port="$(free_port)"
nats-server -a 127.0.0.1 -p "$nats_port" -js -sd "$work/jetstream" >"$work/nats.log" 2>&1 &
nats_pid=$!; pids+=("$nats_pid")
wait_for bash -c "exec 3<>/dev/tcp/127.0.0.1/$nats_port; head -c 4 <&3 | grep -q INFO"

# --- runs ----------------------------------------------------------------
hz="$(getconf CLK_TCK)"
results="$work/results.tsv"
: >"$results"
run() { # run LABEL "BROKER PIDS" CHAT ARGS...
    local label="$1" broker_pids="$2"; shift 2
    local round a b pa aa pb ab before_app before_broker json
    for round in $(seq 1 "$rounds"); do
        read -r pa aa < <(start_chat "$work/$label-a.log" "$@")
        read -r pb ab < <(start_chat "$work/$label-b.log" "$@")
        before_app="$(ticks "$pa" "$pb")"
        # shellcheck disable=SC2086
        before_broker="$(ticks $broker_pids)"
        # shellcheck disable=SC2046
        json="$("$loadgen" fanout --addr "$aa" --addr2 "$ab" --subs "$subs" --msgs "$msgs" \
            $(printf -- '--server-pid %s ' $broker_pids) | tee /dev/stderr | grep '^{')" || true
        local app=$(( $(ticks "$pa" "$pb") - before_app ))
        # shellcheck disable=SC2086
        local broker=$(( $(ticks $broker_pids) - before_broker ))
        kill "$pa" "$pb"; wait "$pa" "$pb" 2>/dev/null || true
        python3 - "$label" "$round" "$json" "$app" "$broker" "$hz" >>"$results" <<'EOF'
import json, sys
label, rnd, line, app, broker, hz = sys.argv[1:]
j = json.loads(line) if line.strip() else {}
d = j.get("delivered", 0) or 1
print("\t".join(str(x) for x in [
    label, rnd, j.get("ok", False), j.get("deliveries_per_s", 0),
    j.get("cpu_us_per_delivery", 0), int(app) * 1e6 / int(hz) / d,
    int(broker) * 1e6 / int(hz) / d, j.get("lost", "?"),
    j.get("latency_p99_us", 0)]))
EOF
    done
}
wanted() { [[ -z "$only" || "$only" == "$1" ]]; }
if wanted redis; then run redis "$redis_pid" --redis "redis://127.0.0.1:$redis_port"; fi
if wanted redis-cluster; then run redis-cluster "${cluster_pids[*]}" --redis-cluster "$cluster_urls"; fi
if wanted nats; then run nats "$nats_pid" --nats "nats://127.0.0.1:$nats_port"; fi

echo
echo "fan-out: $subs subscribers over 2 chat processes, $msgs messages back to back; median of $rounds"
python3 - "$results" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    f = line.rstrip("\n").split("\t")
    rows.setdefault(f[0], []).append(f)
print("| broker | deliveries/s | broker CPU µs/delivery (window) | app CPU µs/delivery (whole run) | latency p99 ms | lost |")
print("|---|---|---|---|---|---|")
for label, rs in rows.items():
    med = lambda i: statistics.median(float(r[i]) for r in rs)
    lost = sum(int(r[7]) if r[7].isdigit() else 0 for r in rs)
    ok = all(r[2] == "True" for r in rs)
    print(f"| {label}{'' if ok else ' (FAIL)'} | {med(3):,.0f} | {med(4):.2f} | {med(5):.2f} | {med(8)/1000:.1f} | {lost} |")
EOF
