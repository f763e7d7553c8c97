#!/usr/bin/env bash
# Builds nodeproxy's two OCI images from this checkout, from `scratch` with Debian's buildah: no
# image is pulled and no registry is contacted. Each image holds only what its binary needs at
# run time, and is checked to run from its own contents before the script ends.
#
#   localhost/nodeproxy:<tag>               the daemon (release build), nft and ip, the shared
#                                           libraries of all three (their ldd closure, loader
#                                           included), passwd/group stubs. Entrypoint
#                                           /usr/local/bin/nodeproxy, cmd `run`, user 0.
#   localhost/nodeproxy-controlplane:<tag>  the control plane (--features kube) and its libraries,
#                                           passwd/group stubs; user 65532, writes nothing but
#                                           its CA directory (when it generates the CA).
#
# Writes $OUT_DIR/<name>-<tag>.oci.tar, one OCI archive per image, and <name>-<tag>.files (what
# is inside). Import one with `ctr -n k8s.io images import`, `podman load -i`, or push it with
# skopeo (README.md, "Images"). Needs root: buildah's storage, chroot and unshare for the checks,
# apt-get when buildah is missing. The nft and ip copied in are this machine's.
#
# Knobs (environment):
#   TAG             default <crate version>-<git short hash>, plus -dirty when tracked files
#                   differ from HEAD
#   OUT_DIR         where the archives go (default /var/tmp/nodeproxy-images)
#   STORAGE_DRIVER  buildah's storage driver for its scratch store (default vfs: one layer from
#                   scratch costs vfs nothing, and vfs also works where overlay cannot, e.g.
#                   with /var/tmp on overlayfs inside a container; overlay works too)
#   KEEP_DEBUGINFO  1: keep the binaries' DWARF line tables (default: stripped, symbols kept)
#   CARGO_TARGET_DIR  as cargo reads it (default target/)
#
# Last line: images=<name:tag,...> bytes=<total bytes of the archives>
#
# The checks' scripts are single-quoted on purpose: they expand in the bash that runs them.
# shellcheck disable=SC2016
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
started=$SECONDS

say() { printf '==> [%4ss] %s\n' "$((SECONDS - started))" "$*"; }
die() { printf 'build-images: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (buildah's storage, chroot and unshare for the checks); run: sudo $0"
command -v cargo >/dev/null 2>&1 || die "cargo is not on PATH; install the Rust toolchain (rustup) or run with PATH=\$HOME/.cargo/bin:\$PATH"
for tool in ldd chroot unshare; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is missing (libc-bin, coreutils, util-linux); apt-get install -y libc-bin coreutils util-linux"
done

# buildah, and the nft and ip that go into the daemon's image.
need=()
command -v buildah >/dev/null 2>&1 || need+=(buildah)
PATH=$PATH:/usr/sbin:/sbin
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
[ -f /etc/protocols ] || need+=(netbase)
command -v objcopy >/dev/null 2>&1 || need+=(binutils)
if [ ${#need[@]} -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || die "missing ${need[*]} and no apt-get to install them; install them and run again"
  say "installing ${need[*]} (apt-get, no recommends)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
nft_version=$(nft --version | awk '{print $2}')
iproute2_version=$(ip -V | sed -n 's/.*iproute2-\([^,]*\).*/\1/p')
say "buildah $(buildah --version | awk '{print $3}'), nftables $nft_version, iproute2 $iproute2_version"

# The tag: the crate version and the commit, marked when the tree is not that commit.
pkgid=$(cargo pkgid -q -p nodeproxy) || die "cannot read nodeproxy's version (cargo pkgid -p nodeproxy)"
version=${pkgid##*[#@]}
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [ -z "${TAG:-}" ]; then
  TAG=$version-$(git rev-parse --short HEAD 2>/dev/null || echo nogit)
  [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && TAG=$TAG-dirty
fi
[[ $TAG =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] \
  || die "TAG=$TAG is not a valid image tag (letters, digits, _ . -, at most 128, not starting with . or -)"
OUT_DIR=${OUT_DIR:-/var/tmp/nodeproxy-images}
mkdir -p "$OUT_DIR"
target=${CARGO_TARGET_DIR:-$repo/target}

say "release build of nodeproxy (cargo build --release -p nodeproxy --bins)"
cargo build -q --release --locked -p nodeproxy --bins
say "release build of nodeproxy-controlplane (cargo build --release -p controlplane --features kube)"
# A separate invocation: built together, cargo would unify controlplane's kube feature into
# the daemon, which must never link a Kubernetes client (scripts/check-deps.sh).
cargo build -q --release --locked -p controlplane --features kube --bin nodeproxy-controlplane

# buildah runs on a store of its own, removed at exit: the archives are the product, and the
# machine's own containers and images (/var/lib/containers) are never touched.
driver=${STORAGE_DRIVER:-vfs}
store=$(mktemp -d "${TMPDIR:-/var/tmp}/nodeproxy-buildah.XXXXXX")
bh() { buildah --root "$store/root" --runroot "$store/run" --storage-driver "$driver" "$@"; }
# Accept the images this script itself imports (oci-archive only), whatever the machine's policy.
printf '%s\n' '{"default":[{"type":"reject"}],"transports":{"oci-archive":{"":[{"type":"insecureAcceptAnything"}]}}}' \
  >"$store/policy.json"
cleanup() {
  bh rm -a >/dev/null 2>&1 || true
  bh rmi -a -f >/dev/null 2>&1 || true
  # Anything still mounted below the store (an interrupted check) comes off before removal.
  findmnt -rn -o TARGET | grep -F "$store/" | sort -r | xargs -r umount -l 2>/dev/null || true
  rm -rf --one-file-system "$store"
}
trap cleanup EXIT

# Copies the ELF file $2 to $1$3 and every shared library ldd resolves for it, the dynamic
# loader included, each as a plain file at the path ldd names (the path the loader opens).
add_elf() {
  local root=$1 src=$2 dest=$3 out lib
  install -D -m 0755 "$src" "$root$dest"
  files+=("$dest")
  out=$(ldd "$src" 2>&1) || case $out in
    *"not a dynamic executable"*|*"statically linked"*) return 0 ;;
    *) die "ldd $src failed: $out" ;;
  esac
  if grep -q 'not found' <<<"$out"; then
    die "$src needs libraries this machine lacks: $(grep 'not found' <<<"$out" | tr -s ' \t' ' ')"
  fi
  while read -r lib; do
    [ -e "$root$lib" ] && continue
    install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
    files+=("$lib")
  done < <(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$out")
}

# Builds image $1 from scratch: the function $2 fills its root, $3... are `buildah config`
# flags. Commits it as localhost/$1:$TAG and writes $OUT_DIR/$1-$TAG.oci.tar.
build_image() {
  local name=$1 fill=$2 ctr mnt archive
  shift 2
  say "image localhost/$name:$TAG"
  ctr=$(bh from --quiet scratch)
  mnt=$(bh mount "$ctr")
  files=()
  # root, nonroot (65532, the control plane's user) and nobody; their shell does not exist.
  install -D -m 0644 "$repo/images/passwd" "$mnt/etc/passwd"
  install -D -m 0644 "$repo/images/group" "$mnt/etc/group"
  files+=(/etc/passwd /etc/group)
  "$fill" "$mnt"
  printf '%s\n' "${files[@]}" | sort >"$store/$name.files"
  bh umount "$ctr" >/dev/null
  bh config --os linux --workingdir / --env PATH=/usr/local/bin:/usr/sbin:/usr/bin \
    --label org.opencontainers.image.title="$name" \
    --label org.opencontainers.image.version="$TAG" \
    --label org.opencontainers.image.revision="$revision" \
    --label org.opencontainers.image.licenses=Apache-2.0 \
    "$@" "$ctr"
  bh commit --quiet --rm "$ctr" "localhost/$name:$TAG" >/dev/null
  archive=$OUT_DIR/$name-$TAG.oci.tar
  rm -f "$archive"
  bh push --quiet "localhost/$name:$TAG" "oci-archive:$archive:localhost/$name:$TAG"
  # The checks import the archive, not the committed image: they see what a user gets.
  bh rmi "localhost/$name:$TAG" >/dev/null
}

# Our binaries without their DWARF line tables (the release profile keeps them for perf):
# 100 MB -> 21 MB for the daemon. Symbols stay, so a panic's backtrace still names functions;
# the binaries with line tables stay in the cargo target directory. KEEP_DEBUGINFO=1 keeps them.
strip_debuginfo() {
  [ "${KEEP_DEBUGINFO:-0}" = 1 ] || objcopy --strip-debug "$1"
}

fill_daemon() {
  add_elf "$1" "$target/release/nodeproxy" /usr/local/bin/nodeproxy
  strip_debuginfo "$1/usr/local/bin/nodeproxy"
  add_elf "$1" "$(readlink -f "$(command -v nft)")" /usr/sbin/nft
  add_elf "$1" "$(readlink -f "$(command -v ip)")" /usr/sbin/ip
  # nft names protocols through libc (getprotobynumber): without /etc/protocols its listing
  # says `meta l4proto 6` where the daemon's check of its own rules expects `tcp`, and the
  # daemon refuses to start. ip needs no data file (its names for tables, scopes and
  # protocols are built in; the daemon's tables are numbers).
  install -D -m 0644 /etc/protocols "$1/etc/protocols"
  files+=(/etc/protocols)
}

fill_controlplane() {
  add_elf "$1" "$target/release/nodeproxy-controlplane" /usr/local/bin/nodeproxy-controlplane
  strip_debuginfo "$1/usr/local/bin/nodeproxy-controlplane"
}

build_image nodeproxy fill_daemon \
  --entrypoint '["/usr/local/bin/nodeproxy"]' --cmd '["run"]' --user 0:0 \
  --port 15008/tcp --port 15020/tcp \
  --label org.opencontainers.image.description="nodeproxy daemon, nftables $nft_version, iproute2 $iproute2_version"
build_image nodeproxy-controlplane fill_controlplane \
  --entrypoint '["/usr/local/bin/nodeproxy-controlplane"]' --user 65532:65532 \
  --port 15012/tcp --port 15014/tcp \
  --label org.opencontainers.image.description="nodeproxy control plane"

# --- checks: every one runs the image's own files (chroot into the imported archive) ---------

# Runs "$@" and dies with $1 (what was checked) and the output when it fails.
check() {
  local what=$1 out
  shift
  out=$("$@" 2>&1) || die "check failed: $what: $out"
  printf '    ok  %s\n' "$what"
}

# Imports archive $1 into a new container and mounts it (sets ctr and mnt); checks its config
# is $2 (.OCIv1.Config's Entrypoint, Cmd and User as buildah's template prints them), that its
# files are exactly those put in, and that it has no shell.
open_archive() {
  local name=$1 want=$2 got
  ctr=$(bh from --quiet --signature-policy "$store/policy.json" "oci-archive:$OUT_DIR/$name-$TAG.oci.tar")
  mnt=$(bh mount "$ctr")
  got=$(bh inspect --type container --format \
    '{{.OCIv1.Config.Entrypoint}} {{.OCIv1.Config.Cmd}} {{.OCIv1.Config.User}}' "$ctr")
  check "config: entrypoint, cmd, user = $got" test "$got" = "$want"
  (cd "$mnt" && find . \( -type f -o -type l \) -printf '/%P\n' | sort) >"$OUT_DIR/$name-$TAG.files"
  check "files: exactly the $(wc -l <"$store/$name.files") put in, $(du -sb "$mnt" | awk '{print $1}') bytes unpacked (list: $OUT_DIR/$name-$TAG.files)" \
    diff "$store/$name.files" "$OUT_DIR/$name-$TAG.files"
  check "no shell: /bin/sh absent, no sh, bash, dash or busybox anywhere" \
    bash -c '! test -e "$1/bin/sh" && test -z "$(find "$1" \( -name sh -o -name bash -o -name dash -o -name busybox \) -print)"' _ "$mnt"
  # Mount points the checks use; the container is thrown away, the archive is not changed.
  mkdir -p "$mnt/proc" "$mnt/dev" "$mnt/check"
}

# Runs the bash script $1 (host bash; `r` runs a command from the image) the way a container
# runtime would start the image: in fresh network, mount and PID namespaces, the image's root
# read-only, its own /proc, and the /dev every OCI runtime provides (runtime-spec,
# runtime-linux.md: null zero full random urandom tty, and the fd/stdin/stdout/stderr links).
# The daemon needs that /dev: it starts nft and ip with /dev/null as stdin, and nft reads
# `-f -` from /dev/stdin.
in_namespaces() {
  unshare --net --mount --pid --fork --propagation private bash -c '
    set -euo pipefail  # the greps below read their whole input: no SIGPIPE for a writer
    trap '\''echo "failed: $BASH_COMMAND (exit status $?)"'\'' ERR
    mount --bind "$mnt" "$mnt" && mount -o remount,bind,ro "$mnt"
    mount -t proc proc "$mnt/proc"
    mount -t tmpfs -o nosuid,mode=0755 tmpfs "$mnt/dev"
    for d in null zero full random urandom tty; do
      touch "$mnt/dev/$d" && mount --bind "/dev/$d" "$mnt/dev/$d"
    done
    ln -s /proc/self/fd "$mnt/dev/fd"
    for i in 0:stdin 1:stdout 2:stderr; do ln -s "/proc/self/fd/${i%%:*}" "$mnt/dev/${i#*:}"; done
    r() { chroot "$mnt" "$@"; }
    eval "$1"' _ "$1"
}
export store

say "checking localhost/nodeproxy:$TAG (from its archive)"
open_archive nodeproxy '[/usr/local/bin/nodeproxy] [run] 0:0'
export mnt
check "nodeproxy --version = nodeproxy $version" \
  bash -c 'test "$(chroot "$mnt" /usr/local/bin/nodeproxy --version)" = "nodeproxy $1"' _ "$version"
check "nft --version" chroot "$mnt" /usr/sbin/nft --version
check "ip -V" chroot "$mnt" /usr/sbin/ip -V
chroot --userspec=65534:65534 "$mnt" /usr/local/bin/nodeproxy rules >"$store/rules.nft" \
  || die "check failed: nodeproxy rules as user 65534"
check "nodeproxy rules as user 65534: $(wc -l <"$store/rules.nft") lines, table inet nodeproxy" \
  grep -q '^table inet nodeproxy' "$store/rules.nft"
cp "$store/rules.nft" "$mnt/check/rules.nft"
check "in a netns of its own: nft -f of those rules, nft list ruleset, ip route, ip -j rule" \
  in_namespaces '
    r /usr/sbin/ip link set lo up
    r /usr/sbin/nft -f /check/rules.nft
    r /usr/sbin/nft list ruleset | grep "table inet nodeproxy" >/dev/null
    r /usr/sbin/ip route show table local | grep "^local 127.0.0.1 dev lo" >/dev/null
    r /usr/sbin/ip -j rule show >/dev/null'
check "nodeproxy run in a netns of its own, read-only root: ready with its rules verified; SIGTERM: exit 0, rules gone" \
  in_namespaces '
    r /usr/sbin/ip link set lo up
    chroot "$mnt" /usr/local/bin/nodeproxy run 2>"$store/daemon.log" & pid=$!
    ready() { exec 3<>/dev/tcp/127.0.0.1/15000 && printf "GET /ready HTTP/1.0\r\n\r\n" >&3 && grep -q "^HTTP/1.[01] 200" <&3; }
    for _ in $(seq 300); do ready 2>/dev/null && break; kill -0 $pid 2>/dev/null || break; sleep 0.1; done
    ready 2>/dev/null || { echo "not ready after 30 s:"; cat "$store/daemon.log"; exit 1; }
    r /usr/sbin/nft list table inet nodeproxy >/dev/null
    r /usr/sbin/ip rule show | grep "fwmark 0x1000/0x1000" >/dev/null
    kill -TERM $pid; wait $pid || { echo "exit status $?:"; cat "$store/daemon.log"; exit 1; }
    if r /usr/sbin/nft list table inet nodeproxy >/dev/null 2>&1; then echo "table left behind"; exit 1; fi
    if r /usr/sbin/ip rule show | grep "fwmark 0x1000/0x1000"; then echo "ip rule left behind"; exit 1; fi'
bh rm "$ctr" >/dev/null

say "checking localhost/nodeproxy-controlplane:$TAG (from its archive)"
open_archive nodeproxy-controlplane '[/usr/local/bin/nodeproxy-controlplane] [] 65532:65532'
export mnt
check "nodeproxy-controlplane --help as user 65532" \
  chroot --userspec=65532:65532 "$mnt" /usr/local/bin/nodeproxy-controlplane --help
# clap names it after its crate: "controlplane <version>".
check "nodeproxy-controlplane --version = controlplane $version" \
  bash -c 'test "$(chroot "$mnt" /usr/local/bin/nodeproxy-controlplane --version)" = "controlplane $1"' _ "$version"
cp "$repo/examples/demo.yaml" "$mnt/check/view.yaml"
echo "build-images-check-token demo-node" >"$mnt/check/tokens"
mkdir -p "$mnt/var/run/nodeproxy/ca"
# As the manifests run it: user 65532, read-only root, the CA generated at first start into
# a memory-backed volume (the Deployment's emptyDir) that only that user can write.
check "nodeproxy-controlplane as user 65532, read-only root: CA generated into its tmpfs, 15012 listens" \
  in_namespaces '
    ip link set lo up
    mount -t tmpfs -o uid=65532,gid=65532,mode=0700,size=1m tmpfs "$mnt/var/run/nodeproxy/ca"
    chroot --userspec=65532:65532 "$mnt" /usr/local/bin/nodeproxy-controlplane --source file \
      --file /check/view.yaml --bootstrap-token-file /check/tokens \
      --ca-cert /var/run/nodeproxy/ca/ca.crt --ca-key /var/run/nodeproxy/ca/ca.key \
      2>"$store/controlplane.log" & pid=$!
    for _ in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/15012) 2>/dev/null && break; kill -0 $pid 2>/dev/null || break; sleep 0.1; done
    (exec 3<>/dev/tcp/127.0.0.1/15012) 2>/dev/null || { echo "15012 not listening after 30 s:"; cat "$store/controlplane.log"; exit 1; }
    test -s "$mnt/var/run/nodeproxy/ca/ca.crt"
    kill -0 $pid'
bh rm "$ctr" >/dev/null

total=0
names=()
for name in nodeproxy nodeproxy-controlplane; do
  archive=$OUT_DIR/$name-$TAG.oci.tar
  bytes=$(stat -c %s "$archive")
  total=$((total + bytes))
  names+=("localhost/$name:$TAG")
  printf '%s  %s bytes (%s)\n' "$archive" "$bytes" "$(numfmt --to=iec "$bytes")"
done
say "done"
echo "images=$(IFS=,; echo "${names[*]}") bytes=$total"
