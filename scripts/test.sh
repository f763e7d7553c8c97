#!/usr/bin/env bash
# README command 2: every test tier. Installs what the tests need first.
#
# Tests that need more than a plain `cargo test` has (root, ip/nft, cgroups, the built
# kube-apiserver) are #[ignore]d. As root this runs them too (`-- --include-ignored`), and once
# asked to run, a test that cannot panics saying what is missing: none passes by skipping, and
# cargo's own summary must show 0 ignored. Not root, they show as ignored, counted at the end;
# under CI=true not being root is an error before anything runs.
#
# Arguments go to `cargo test`; those after `--` to the test harness:
#   scripts/test.sh -p nodeproxy-tests -- sighup
set -euo pipefail
cd "$(dirname "$0")/.."
root=false
if [ "$(id -u)" -eq 0 ]; then root=true; fi
if [ "${CI:-}" = true ] && [ "$root" = false ]; then
  echo "CI=true but not root: the privileged tests (network namespaces, nftables, cgroups) would" \
    "only be ignored; run scripts/test.sh (.ci/run) as root" >&2
  exit 1
fi
# Every package unless the arguments name some (`--workspace` would override `-p`).
cargo_args=()
harness_args=()
scope=(--workspace)
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; harness_args=("$@"); break ;;
    -p* | --package*) scope=() ;;
  esac
  cargo_args+=("$1")
  shift
done

if [ "$root" = true ]; then
  scripts/install-deps.sh
elif ! scripts/install-deps.sh; then
  echo "(not root: the tests that need those tools are ignored anyway)" >&2
fi
echo "== format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets -q -- -D warnings
echo "== dependency direction"
scripts/check-deps.sh
echo "== kube-apiserver for the Kubernetes tier (cached in /var/tmp/nodeproxy-kube; ~8 min once)"
if ! tests/kube/build.sh; then
  if [ "${CI:-}" = true ]; then echo "tests/kube/build.sh failed; the kube tier cannot run under CI" >&2; exit 1; fi
  if [ "$root" = true ]; then
    echo "tests/kube/build.sh failed: tests/tests/kube_apiserver.rs will fail (it is run, not skipped)" >&2
  fi
fi
echo "== CRDs up to date (manifests/crds)"
cargo test -q -p controlplane --features kube --test crds
echo "== manifests render and validate (Kubernetes 1.20 schemas)"
scripts/check-manifests.sh
echo "== tests"
# The privileged tests start the real daemon binary.
cargo build -q -p nodeproxy --bins
if [ "$root" = true ]; then
  harness_args=(--include-ignored "${harness_args[@]}")
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test "${scope[@]}" --no-fail-fast "${cargo_args[@]}" -- "${harness_args[@]}" 2>&1 | tee "$log" ||
  status=$?

# libtest prints `test NAME ... ignored, REASON` per ignored test and `N ignored` per binary.
ignored=$(sed -n 's/^test result: .* \([0-9][0-9]*\) ignored;.*/\1/p' "$log" | awk '{n += $1} END {print n + 0}')
echo "== summary"
if [ "$root" = true ]; then
  if [ "$ignored" -ne 0 ]; then
    echo "$ignored tests were ignored in a root run (each must run under --include-ignored):" >&2
    grep -E '^test .* \.\.\. ignored' "$log" >&2 || true
    exit 1
  fi
  echo "no test was ignored"
elif [ "$ignored" -ne 0 ]; then
  echo "$ignored tests ignored: they need root (and ip, nft, cgroups or the built kube-apiserver);" \
    "run scripts/test.sh as root to include them. By reason:"
  sed -n 's/^test .* \.\.\. ignored, //p' "$log" | sort | uniq -c | sort -rn
fi
exit "$status"
