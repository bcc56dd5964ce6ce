#!/usr/bin/env bash
# One command for all benchmarks: builds the crate's chat example (plain, and
# with a Prometheus recorder as `chat-metrics`) and the bench binaries in
# release mode, raises the open-file limit, and runs `runall`, which starts
# each server on a free port, measures, and prints a markdown table (crate
# vs the axum and fastwebsockets baselines, with the load average).
#
#   bench/run.sh                      # full run (a few minutes)
#   bench/run.sh --smoke              # tiny sizes, correctness only (CI)
#   bench/run.sh --redis redis://127.0.0.1:6379   # adds the cross-process row
#
# Any other option is passed to runall (see bench/README.md), e.g.
#   --only echo,fanout  --rounds 3  --json-out results.jsonl  --verbose
#   --crate-bin PATH    (use that server as "crate"; skips building the example)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# Servers must hold ~20,000 sockets: use the hard limit.
ulimit -n "$(ulimit -Hn)"

build_example=1
with_redis=0
for arg in "$@"; do
    case "$arg" in
        --crate-bin|--crate-bin=*) build_example=0 ;;
        --redis|--redis=*) with_redis=1 ;;
    esac
done

target_dir="$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"

if [[ $build_example == 1 ]]; then
    features=()
    if [[ $with_redis == 1 ]]; then
        features=(redis)
    fi
    # The crate as a production deployment runs it, with a Prometheus
    # recorder installed (`example-metrics`), kept as `chat-metrics`; then the
    # plain build, which stays at examples/chat.
    metrics_features="$(IFS=,; echo "example-metrics${features[*]:+,${features[*]}}")"
    cargo build --release --example chat --features "$metrics_features"
    cp "$target_dir/release/examples/chat" "$target_dir/release/chat-metrics"
    cargo build --release --example chat ${features[@]:+--features "${features[*]}"}
fi
cargo build --release -p tower-channels-bench --bins

exec "$target_dir/release/runall" "$@"
