#!/usr/bin/env bash
# README command 1: the whole product on one machine, no Kubernetes. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
exec cargo run -q -p nodeproxy -- demo "$@"
