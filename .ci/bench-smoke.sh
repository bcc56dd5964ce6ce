#!/usr/bin/env bash
# The benchmark harness in smoke mode: tiny sizes, checks correctness (nothing
# lost, every connection answers), not speed, so the harness never rots.
set -euo pipefail
cd "$(dirname "$0")/.."
bash bench/run.sh --smoke

# Presence and history costs (bench/src/bin/history.rs) at tiny sizes, on
# Redis too when REDIS_URL is set.
cargo run --quiet --release -p tower-channels-bench --bin history -- \
    --members 5 --sends 50 --redis-sends 20 --presence 100 --rounds 1 \
    ${REDIS_URL:+--redis "$REDIS_URL"}

# permessage-deflate fan-out and idle memory (bench/src/bin/deflate.rs).
bash bench/deflate.sh --smoke
