#!/usr/bin/env bash
# The dependency direction of docs/ARCHITECTURE.md, checked rather than remembered:
# leaves (tenancy, certs, redirect) depend on no crate of ours and never on kube;
# only controlplane may link kube; nodeproxy links controlplane without its kube part.
set -euo pipefail
cd "$(dirname "$0")/.."
fail=0
deps() { cargo tree -q -p "$1" -e normal --prefix none --format '{p}' | awk '{print $1}' | sort -u; }
for leaf in tenancy certs redirect; do
  for forbidden in tenancy certs redirect controlplane nodeproxy kube kube-client tonic; do
    [ "$leaf" = "$forbidden" ] && continue
    if deps "$leaf" | grep -qx "$forbidden"; then
      echo "dependency direction: $leaf must not depend on $forbidden" >&2; fail=1
    fi
  done
done
for c in nodeproxy tenancy certs redirect; do
  if deps "$c" | grep -Eqx 'kube|kube-client|kube-runtime'; then
    echo "dependency direction: only controlplane may link kube, but $c does" >&2; fail=1
  fi
done
# nodeproxy links controlplane's client and in-process server, never its kube feature.
if cargo tree -q -p nodeproxy -e normal,features -i controlplane 2>/dev/null | grep -q 'controlplane feature "kube"'; then
  echo "dependency direction: nodeproxy must not enable controlplane's kube feature" >&2; fail=1
fi
# Without its kube feature, controlplane (client + file-source server) links no Kubernetes client.
if cargo tree -q -p controlplane --no-default-features --features server -e normal --prefix none --format '{p}' | awk '{print $1}' | grep -Eqx 'kube|kube-client|kube-runtime'; then
  echo "dependency direction: controlplane's server feature must not pull kube" >&2; fail=1
fi
[ $fail -eq 0 ] && echo "dependency direction: ok"
exit $fail
