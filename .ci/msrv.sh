#!/usr/bin/env bash
# A build at the declared `rust-version` (Cargo.toml). The machine's own
# toolchain (rustup) is the current stable and no other can be fetched by
# rustup here, so this uses Debian's packaged compiler of that version
# (bookworm's `rustc-web`/`cargo-web` 1.85, in /usr/bin; rustup's cargo stays
# first on PATH). Dependencies are resolved MSRV-aware
# (`incompatible-rust-versions = fallback`: the newest versions whose own
# `rust-version` allows ours) in a copy of the tree, so the checked-in
# Cargo.lock, which CI's stable build uses, is not touched.
set -euo pipefail
cd "$(dirname "$0")/.."
msrv="$(sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' Cargo.toml)"
debian_version="1.85.0+dfsg3-1~deb12u3"
if [ "$msrv" != "1.85" ]; then
  echo "rust-version is $msrv but .ci/msrv.sh installs Debian's rustc $debian_version: update both" >&2
  exit 1
fi
if ! /usr/bin/rustc --version 2>/dev/null | grep -q "^rustc $msrv\."; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "rustc-web=$debian_version" "cargo-web=$debian_version" \
    "libstd-rust-web-dev=$debian_version" "libstd-rust-web-1.85=$debian_version" >/dev/null
fi
/usr/bin/rustc --version
copy=target/msrv-src
mkdir -p "$copy"
rsync -a --delete --exclude /target --exclude /.git --exclude /fuzz ./ "$copy/"
cd "$copy"
export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc CARGO_INCREMENTAL=0
export CARGO_TARGET_DIR="$PWD/../msrv"
CARGO_RESOLVER_INCOMPATIBLE_RUST_VERSIONS=fallback /usr/bin/cargo update -q
/usr/bin/cargo check --lib --all-features --locked
/usr/bin/cargo check --lib --no-default-features --locked
echo "builds with rustc $msrv (declared rust-version)"
