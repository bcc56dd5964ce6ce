#!/usr/bin/env bash
# Instructions per delivery on paced fan-out, counted by callgrind: a
# figure that does not depend on what else the machine is doing (callgrind
# counts user-space instructions, not time; the kernel's share, the same
# sendto per delivery for every server, is not in it).
#
# Each server runs under callgrind twice: 1,000 subscribers and A then B
# messages at a rate low enough that each delivery is its own wake-up (no
# batching, as on a quiet machine). (instructions(B) - instructions(A)) /
# ((B - A) x 1,000) is the cost of one delivery, startup and joins
# cancelled out.
#
#   bench/callgrind.sh                 # tc+P, tc and the axum baseline
#   RATE=5 A=20 B=120 bench/callgrind.sh
#   SERVERS=examples/chat:tc bench/callgrind.sh   # only these (binary:label)
#
# Needs valgrind and the release binaries bench/run.sh builds.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${TARGET_DIR:-$root/target/release}"
rate="${RATE:-5}"; a="${A:-20}"; b="${B:-120}"; subs=1000
ulimit -n "$(ulimit -Hn)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Total instructions of BIN while loadgen sends MSGS messages.
count() {
    local bin=$1 msgs=$2 out="$work/cg.$(basename "$1").$2"
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
    "$dir/loadgen" fanout --addr "$addr" --subs $subs --msgs "$msgs" --size 100 \
        --rate "$rate" --timeout 120 >"$work/loadgen.out" \
        || { echo "loadgen failed against $bin" >&2; cat "$work/loadgen.out" >&2; exit 1; }
    grep -q '"ok":true' "$work/loadgen.out" || { echo "deliveries lost" >&2; exit 1; }
    # Dump before stopping (a server may wait for its connections on SIGINT).
    callgrind_control -d "$vpid" >/dev/null 2>&1 || true
    kill -TERM "$vpid" 2>/dev/null || true
    wait "$vpid" 2>/dev/null || true
    local total=0 f n
    for f in "$out"*; do
        n="$(callgrind_annotate "$f" 2>/dev/null | sed -n 's/^ *\([0-9,]*\) .*PROGRAM TOTALS.*/\1/p' | tr -d ,)"
        total=$((total + ${n:-0}))
    done
    echo "$total"
}

echo "paced fan-out under callgrind: $subs subscribers, $rate msgs/s, ($b - $a) messages"
echo "date $(date -u +%F), load average $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores"
echo
echo "| server | instructions per delivery |"
echo "|---|---:|"
for server in ${SERVERS:-chat-metrics:tc+P examples/chat:tc baseline:axum}; do
    bin="$dir/${server%%:*}"
    [ -x "$bin" ] || { echo "missing $bin (run bench/run.sh --smoke first)" >&2; exit 1; }
    ia="$(count "$bin" "$a")"
    ib="$(count "$bin" "$b")"
    echo "| ${server##*:} | $(( (ib - ia) / ((b - a) * subs) )) |"
done
