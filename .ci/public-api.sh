#!/usr/bin/env bash
# The public API gate: lists the crate's public items (with signatures) from
# rustdoc's JSON output and compares the listing with the checked-in
# .ci/public-api.txt, failing with the diff, so every change to the public
# API shows in review. After an intended change: bash .ci/public-api.sh --bless
#
# rustdoc's JSON output is unstable: RUSTC_BOOTSTRAP=1 lets the stable
# toolchain produce it (`cargo public-api` needs a nightly toolchain, which
# cannot be installed here). .ci/public_api.py checks the format version.
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTC_BOOTSTRAP=1 RUSTDOCFLAGS="-Z unstable-options --output-format json" \
  cargo doc --no-deps --all-features --lib -q
mkdir -p target/public-api
python3 .ci/public_api.py target/doc/tower_channels.json > target/public-api/current.txt
if [ "${1:-}" = "--bless" ]; then
  cp target/public-api/current.txt .ci/public-api.txt
  echo "updated .ci/public-api.txt ($(wc -l < .ci/public-api.txt) lines)"
  exit 0
fi
if ! diff -u .ci/public-api.txt target/public-api/current.txt; then
  echo "the public API changed (diff above): if intended, run bash .ci/public-api.sh --bless" >&2
  echo "and commit .ci/public-api.txt with a CHANGELOG entry" >&2
  exit 1
fi
echo "public API unchanged ($(wc -l < .ci/public-api.txt) lines)"
