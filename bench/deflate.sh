#!/usr/bin/env bash
# permessage-deflate benchmark (bench/src/bin/deflate.rs): fan-out of a 1 KiB
# JSON message to compressing subscribers (uncompressed vs compressed once per
# group send vs compressed per member) and idle connections with deflate.
#
#   bench/deflate.sh            # full run: 1,000 subscribers x 200 messages, 2 rounds, 5,000 idle
#   bench/deflate.sh --smoke    # tiny sizes, correctness only (CI)
#
# Other options go to `deflate run`: --subs N --msgs N --rounds N --idle N
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
ulimit -n "$(ulimit -Hn)"
cargo build --release -p tower-channels-bench --bin deflate
target_dir="$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
exec "$target_dir/release/deflate" run "$@"
