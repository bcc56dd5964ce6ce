#!/usr/bin/env bash
# A short libFuzzer run of the frame reader (fuzz/fuzz_targets/frame_reader.rs)
# from its checked-in seeds: 30 s of fuzzing on stable Rust
# (`--sanitizer none`). Installs cargo-fuzz when missing. The seeds alone are
# also replayed by `cargo test` (src/fuzzing.rs).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
corpus="$(mktemp -d)"
trap 'rm -rf "$corpus"' EXIT
cargo fuzz run --sanitizer none frame_reader "$corpus" seeds/frame_reader -- \
  -max_total_time="${FUZZ_SECONDS:-30}" -timeout=10 -rss_limit_mb=1024
