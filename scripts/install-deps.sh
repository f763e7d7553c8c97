#!/usr/bin/env bash
# Installs the system tools nodeproxy's demo, tests and benchmarks use, if they are missing:
# nft (nftables), ip (iproute2), iperf3, sockperf (benchmarks), openssl (s_client against the
# mesh tunnel). Needs root (apt-get); does nothing when all are there.
set -euo pipefail
need=()
command -v nft    >/dev/null 2>&1 || need+=(nftables)
command -v ip     >/dev/null 2>&1 || need+=(iproute2)
command -v iperf3 >/dev/null 2>&1 || need+=(iperf3)
command -v sockperf >/dev/null 2>&1 || need+=(sockperf)
command -v pgrep  >/dev/null 2>&1 || need+=(procps)
command -v nsenter >/dev/null 2>&1 || need+=(util-linux)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing tools: ${need[*]}; run this script as root, or: apt-get install -y ${need[*]}" >&2
  exit 1
fi
echo "installing: ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
