#!/bin/bash
# tests/kube/build.sh — build a real kube-apiserver (1.20.2) from Debian's `kubernetes` source
# package, for the kube-apiserver integration tier (tests/tests/kube_apiserver.rs).
#
# Idempotent and cached OUTSIDE the checkout: the binary lands in $NODEPROXY_KUBE_DIR/bin
# (default /var/tmp/nodeproxy-kube); a second run finds it and exits in well under a second.
# Needs root (apt-get) the first time; uses only Debian packages (no Go proxy, offline vendor/).
# See /work/shared/notes/kube-apiserver-from-debian.md for where each step comes from.
set -euo pipefail
OUT=${NODEPROXY_KUBE_DIR:-/var/tmp/nodeproxy-kube}
WHAT=${WHAT:-cmd/kube-apiserver}
if [ -x "$OUT/bin/kube-apiserver" ]; then
  if [ ! -x /usr/bin/etcd ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q etcd-server >/dev/null
  fi
  echo "tests/kube/build.sh: cached $OUT/bin/kube-apiserver"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "tests/kube/build.sh: needs root to apt-get golang-go and etcd-server (run as root or install them)" >&2
  exit 2
fi
mkdir -p "$OUT"/{apt/lists/partial,apt/cache/archives/partial,src,bin,home}
export DEBIAN_FRONTEND=noninteractive
# toolchain + etcd + reflect2>=1.0.2 (Go>=1.18 segfaults with the vendored reflect2 1.0.1)
apt-get install -y -q golang-go etcd-server etcd-client golang-github-modern-go-reflect2-dev make jq rsync >/dev/null
# fetch the Debian *source* package with a private deb-src list (system apt config untouched)
URI=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
echo "deb-src $URI bookworm main" > "$OUT/apt/sources.list"
A=(-o Dir::Etc::SourceList="$OUT/apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent
   -o Dir::State::Lists="$OUT/apt/lists" -o Dir::Cache="$OUT/apt/cache")
apt-get "${A[@]}" update -qq
rm -rf "$OUT/src" && mkdir -p "$OUT/src"
( cd "$OUT/src" && apt-get "${A[@]}" source --download-only -qq kubernetes )
cd "$OUT/src"
tar xzf kubernetes_*.orig.tar.gz
cd kubernetes-1.20.2
tar xJf ../kubernetes_*.debian.tar.xz
for p in $(cat debian/patches/series); do patch -p1 -s < "debian/patches/$p"; done
rm -rf vendor/github.com/modern-go/reflect2
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
# same as debian/rules: hack/ builds in GOPATH mode with vendor/
export GOPATH=$PWD/.go CGO_ENABLED=0 GOPROXY=off HOME="$OUT/home"
mkdir -p .go/src/k8s.io; ln -sfn ../../.. .go/src/k8s.io/kubernetes
export KUBE_GIT_VERSION=v1.20.2 KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20 KUBE_GIT_TREE_STATE=clean KUBE_GIT_COMMIT=debian-bookworm
make WHAT="$WHAT" GOFLAGS=-p=2
for b in $WHAT; do cp "_output/bin/$(basename "$b")" "$OUT/bin/.$(basename "$b").tmp"; mv "$OUT/bin/.$(basename "$b").tmp" "$OUT/bin/$(basename "$b")"; done
"$OUT/bin/kube-apiserver" --version
# the source tree (several GiB) is not needed any more; Go's build cache in $OUT/home stays
rm -rf "$OUT/src"
