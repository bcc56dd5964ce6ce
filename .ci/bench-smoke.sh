#!/usr/bin/env bash
# The benchmark harness in smoke mode: tiny sizes, checks correctness (nothing
# lost, every connection answers), not speed, so the harness never rots.
set -euo pipefail
cd "$(dirname "$0")/.."
bash bench/run.sh --smoke
