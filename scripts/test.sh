#!/usr/bin/env bash
# README command 2: every test tier. Installs what the tests need first. As root it also runs
# the privileged tiers (network namespaces, real nftables); under CI=true they must run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
echo "== format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets -q -- -D warnings
echo "== dependency direction"
scripts/check-deps.sh
echo "== tests"
# The privileged tests start the real daemon binary.
cargo build -q -p nodeproxy --bins
cargo test --workspace --no-fail-fast "$@"
