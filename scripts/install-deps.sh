#!/usr/bin/env bash
# Installs what nodeproxy's demo, tests and benchmarks use, if it is missing:
# - system tools: nft (nftables), ip (iproute2), iperf3, sockperf (benchmarks), openssl
#   (s_client against the mesh tunnel), python3-venv; apt-get, so root;
# - Python clients from outside our code, in a venv at /var/tmp/nodeproxy-venv (Debian's pip
#   refuses system-wide installs): grpcio and grpcio-reflection, the official gRPC reflection
#   client that tests/tests/reflection.rs runs against the control plane (v1alpha). No root.
# Does nothing when all are there.
set -euo pipefail
VENV=/var/tmp/nodeproxy-venv
PY_PACKAGES=(grpcio grpcio-reflection)
PY_IMPORTS='import grpc, grpc_reflection.v1alpha.proto_reflection_descriptor_database'

need=()
command -v nft    >/dev/null 2>&1 || need+=(nftables)
command -v ip     >/dev/null 2>&1 || need+=(iproute2)
command -v iperf3 >/dev/null 2>&1 || need+=(iperf3)
command -v sockperf >/dev/null 2>&1 || need+=(sockperf)
command -v pgrep  >/dev/null 2>&1 || need+=(procps)
command -v nsenter >/dev/null 2>&1 || need+=(util-linux)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v python3 >/dev/null 2>&1 || need+=(python3)
# `python3 -m venv` needs ensurepip, which Debian ships in python3-venv.
[ -x "$VENV/bin/python" ] || python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
missing=()
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "installing: ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    missing=("${need[@]}")
  fi
fi

# The venv needs no root; it is made even when a system tool is missing (when python3-venv is
# there), so that the unprivileged tests can run.
if ! "$VENV/bin/python" -c "$PY_IMPORTS" >/dev/null 2>&1 &&
   { [ -x "$VENV/bin/python" ] || python3 -c 'import ensurepip, venv' >/dev/null 2>&1; }; then
  echo "installing into $VENV: ${PY_PACKAGES[*]}" >&2
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install --disable-pip-version-check -q "${PY_PACKAGES[@]}"
  "$VENV/bin/python" -c "$PY_IMPORTS"
fi

if [ ${#missing[@]} -gt 0 ]; then
  echo "missing tools: ${missing[*]}; run this script as root, or: apt-get install -y ${missing[*]}" >&2
  exit 1
fi
