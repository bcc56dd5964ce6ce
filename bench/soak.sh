#!/usr/bin/env bash
# Bounded soak of the chat example on Redis (bench/src/bin/soak.rs): two chat
# processes, their own redis-server on a free port (restarted halfway),
# steady members counting deliveries, churn, never-reading members, large
# messages. Options go to `soak` (--secs 60 --steady 40 --slow 4 --rate 20
# --churn 20 --large-every 25).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
ulimit -n "$(ulimit -Hn)"
cargo build --release --example chat --features redis
cargo build --release -p tower-channels-bench --bin soak
target_dir="$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
exec "$target_dir/release/soak" --chat-bin "$target_dir/release/examples/chat" "$@"
