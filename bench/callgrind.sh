#!/usr/bin/env bash
# User-space instructions per delivery (or per echoed message), counted by
# callgrind: a figure that does not depend on what else the machine is
# doing (callgrind counts user-space instructions, not time; the kernel's
# share is not in it).
#
# Each server runs under callgrind twice, with a small and a larger load;
# the difference of the two totals divided by the difference of the work
# is the cost of one unit, startup and joins cancelled out.
#
#   MODE=paced (default): 1,000 subscribers, A then B messages at RATE/s,
#     low enough that each delivery is its own wake-up (no batching, as on
#     a quiet machine); per delivery.
#   MODE=burst: 1,000 subscribers, A then B messages back to back; per
#     delivery. (Callgrind runs one thread at a time, so batching differs
#     from a real run: compare servers, not absolute figures.)
#   MODE=echo: one connection, 64 B messages in a closed loop for A then B
#     seconds; per message (each message is its own wake-up).
#
#   bench/callgrind.sh                 # tc+P, tc and the axum baseline, paced
#   RATE=5 A=20 B=120 bench/callgrind.sh
#   MODE=burst bench/callgrind.sh
#   MODE=echo SERVERS="examples/chat:tc fastws:fws" bench/callgrind.sh
#   SERVERS=examples/chat:tc bench/callgrind.sh   # only these (binary:label)
#
# Needs valgrind and the release binaries bench/run.sh builds.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${TARGET_DIR:-$root/target/release}"
mode="${MODE:-paced}"
subs=1000
case "$mode" in
    paced) rate="${RATE:-5}"; a="${A:-20}"; b="${B:-120}" ;;
    burst) a="${A:-50}"; b="${B:-250}" ;;
    echo) a="${A:-3}"; b="${B:-9}" ;;
    *) echo "MODE is paced, burst or echo" >&2; exit 2 ;;
esac
ulimit -n "$(ulimit -Hn)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Runs BIN under callgrind while loadgen does LOAD (messages, or seconds
# for echo); prints "instructions units" (units: deliveries or messages).
count() {
    local bin=$1 load=$2 out="$work/cg.$(basename "$1").$2"
    local log="$work/log.$(basename "$1").$2"
    valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" --addr 127.0.0.1:0 >"$log" 2>&1 &
    local vpid=$!
    local addr=""
    for _ in $(seq 600); do
        addr="$(grep -o 'listening on [^ ]*' "$log" | head -1 | awk '{print $3}')" || true
        [ -n "$addr" ] && break
        sleep 0.2
    done
    [ -n "$addr" ] || { echo "$bin did not start" >&2; cat "$log" >&2; exit 1; }
    local units
    case "$mode" in
        paced|burst)
            local pace=()
            [ "$mode" = paced ] && pace=(--rate "$rate")
            "$dir/loadgen" fanout --addr "$addr" --subs $subs --msgs "$load" --size 100 \
                "${pace[@]}" --timeout 300 >"$work/loadgen.out" \
                || { echo "loadgen failed against $bin" >&2; cat "$work/loadgen.out" >&2; exit 1; }
            grep -q '"ok":true' "$work/loadgen.out" || { echo "deliveries lost" >&2; exit 1; }
            units=$((load * subs))
            ;;
        echo)
            "$dir/loadgen" echo --addr "$addr" --conns 1 --size 64 --duration "$load" \
                --warmup 0 >"$work/loadgen.out" \
                || { echo "loadgen failed against $bin" >&2; cat "$work/loadgen.out" >&2; exit 1; }
            units="$(grep -o '"msgs":[0-9]*' "$work/loadgen.out" | head -1 | cut -d: -f2)"
            ;;
    esac
    # Dump before stopping (a server may wait for its connections on SIGINT).
    callgrind_control -d "$vpid" >/dev/null 2>&1 || true
    kill -TERM "$vpid" 2>/dev/null || true
    wait "$vpid" 2>/dev/null || true
    local total=0 f n
    for f in "$out"*; do
        n="$(callgrind_annotate "$f" 2>/dev/null | sed -n 's/^ *\([0-9,]*\) .*PROGRAM TOTALS.*/\1/p' | tr -d ,)"
        total=$((total + ${n:-0}))
    done
    echo "$total $units"
}

case "$mode" in
    paced) echo "paced fan-out under callgrind: $subs subscribers, $rate msgs/s, ($b - $a) messages" ;;
    burst) echo "burst fan-out under callgrind: $subs subscribers, ($b - $a) messages back to back" ;;
    echo) echo "echo under callgrind: 1 connection, 64 B, ($b - $a) s" ;;
esac
echo "date $(date -u +%F), load average $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores"
echo
unit="delivery"; [ "$mode" = echo ] && unit="message"
echo "| server | instructions per $unit |"
echo "|---|---:|"
default="chat-metrics:tc+P examples/chat:tc baseline:axum"
[ "$mode" = echo ] && default="chat-metrics:tc+P examples/chat:tc fastws:fws"
for server in ${SERVERS:-$default}; do
    bin="$dir/${server%%:*}"
    [ -x "$bin" ] || { echo "missing $bin (run bench/run.sh --smoke first)" >&2; exit 1; }
    read -r ia ua < <(count "$bin" "$a")
    read -r ib ub < <(count "$bin" "$b")
    [ "$ub" -gt "$ua" ] || { echo "no more work in the longer run against $bin" >&2; exit 1; }
    echo "| ${server##*:} | $(( (ib - ia) / (ub - ua) )) |"
done
