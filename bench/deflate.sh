#!/usr/bin/env bash
# permessage-deflate benchmark (bench/src/bin/deflate.rs): fan-out of a 1 KiB
# JSON message to compressing subscribers (uncompressed vs compressed once per
# group send vs compressed per member) and idle connections with deflate.
#
#   bench/deflate.sh            # full run: 1,000 subscribers x 200 messages, 2 rounds, 5,000 idle
#   bench/deflate.sh --smoke    # tiny sizes, correctness only (CI)
#
#   bench/deflate.sh bomb       # inflate cost: 4 clients sending 1 KiB -> 1 MiB bombs
#                               # (reconnecting), with and without the inflate limit,
#                               # server CPU and a healthy client's latency
#   bench/deflate.sh stall      # 20 clients that send 512 KiB messages to an echo
#                               # route and never read: server RSS start / peak / after
#
# Other options go to `deflate run` (or `deflate bomb` / `deflate stall`):
# run: --subs N --msgs N --rounds N --idle N; bomb: --bombers N --secs S
# --rounds N; stall: --clients N --size BYTES --rate PER_S --secs S
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
ulimit -n "$(ulimit -Hn)"
cargo build --release -p tower-channels-bench --bin deflate
target_dir="$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
mode=run
case "${1:-}" in
  bomb | stall) mode="$1"; shift ;;
esac
exec "$target_dir/release/deflate" "$mode" "$@"
