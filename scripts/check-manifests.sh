#!/usr/bin/env bash
# Renders manifests/ (the kustomize base), every overlay (manifests/overlays/*) and every example
# (manifests/examples/*) with kubectl 1.20's built-in kustomize, and validates every rendered
# object against the Kubernetes 1.20 schemas:
#   - built-in kinds with kubernetes-validate (PyPI), strict: an unknown field is an error;
#   - our own kinds (group nodeproxy.io) against the openAPIV3Schema of our CRDs as rendered
#     from the base, also strict (the API server would silently prune an unknown field);
#   - kinds with no schema here (the Prometheus Operator's PodMonitor) are skipped and listed.
# Also: every overlay renders every object of the base (an overlay names the base's parts one
# by one, see manifests/kustomization.yaml); every *.yaml under manifests/ parses; and when the
# `kubectl` on PATH is another version, it must render the same objects (newer kustomize
# warns about `bases` and `patchesStrategicMerge`, which 1.20's needs; the warnings are shown).
#
# Installs what it needs, once (as root, like scripts/install-deps.sh):
#   - kubectl 1.20 from Debian's kubernetes-client, extracted into /var/tmp/nodeproxy-kubectl
#     with `apt-get download` + `dpkg-deb -x` rather than installed: on machines where another
#     package owns /usr/bin/kubectl (e.g. a cloud SDK's kubectl) dpkg refuses to install it.
#     KUBECTL=/path/to/kubectl-1.20 overrides.
#   - a Python venv at /var/tmp/nodeproxy-venv with kubernetes-validate $VALIDATE_VERSION, the
#     newest release that still ships 1.20 schemas (it ships 1.20 to 1.28; 1.32.0 starts at
#     1.22, 1.37.0 at 1.25).
# Why 1.20: the Kubernetes the project tests on (Debian 12's kubernetes packages, tests/kube).
# Last line: manifests_ok=<objects validated, summed over every render>.
set -euo pipefail

K8S_VERSION=1.20.0
VALIDATE_VERSION=1.28.3
JSONSCHEMA_VERSION=4.26.0
KUBECTL_DIR=/var/tmp/nodeproxy-kubectl
VENV=/var/tmp/nodeproxy-venv

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

as_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "check-manifests: $1 is missing; run this script as root once to install it" >&2
    exit 1
  fi
}

apt_updated=0
apt_update() {
  if [ "$apt_updated" -eq 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
}

# (No `| grep -q` or `| head`: with pipefail, kubectl's SIGPIPE would fail the pipeline.)
is_kubectl_120() {
  local v
  v=$("$1" version --client --short 2>/dev/null || true)
  [[ $v == *v1.20.* ]]
}

# Sets kubectl120.
find_kubectl() {
  if [ -n "${KUBECTL:-}" ]; then
    is_kubectl_120 "$KUBECTL" || { echo "check-manifests: KUBECTL=$KUBECTL is not kubectl 1.20" >&2; exit 1; }
    kubectl120=$KUBECTL
    return
  fi
  if command -v kubectl >/dev/null 2>&1 && is_kubectl_120 kubectl; then
    kubectl120=$(command -v kubectl)
    return
  fi
  local k="$KUBECTL_DIR/root/usr/bin/kubectl"
  if ! is_kubectl_120 "$k"; then
    as_root "kubectl 1.20 (Debian's kubernetes-client)"
    echo "check-manifests: fetching kubectl 1.20 (kubernetes-client) into $KUBECTL_DIR" >&2
    apt_update
    rm -rf "$KUBECTL_DIR"
    mkdir -p "$KUBECTL_DIR/deb"
    # apt-get download runs as the _apt user where it can: let it write here.
    chmod 777 "$KUBECTL_DIR/deb"
    (cd "$KUBECTL_DIR/deb" && apt-get download -qq kubernetes-client)
    dpkg-deb -x "$KUBECTL_DIR"/deb/kubernetes-client_*.deb "$KUBECTL_DIR/root"
    is_kubectl_120 "$k" || { echo "check-manifests: $k is not kubectl 1.20" >&2; exit 1; }
  fi
  kubectl120=$k
}

ensure_venv() {
  local have
  have=$("$VENV/bin/python" -c 'import kubernetes_validate.version as v, importlib.metadata as m; print(v.__version__, m.version("jsonschema"))' 2>/dev/null || true)
  if [ "$have" = "$VALIDATE_VERSION $JSONSCHEMA_VERSION" ]; then
    return
  fi
  local py=/usr/bin/python3
  [ -x "$py" ] || py=$(command -v python3)
  if ! "$py" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    as_root "python3-venv"
    apt_update
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
  fi
  echo "check-manifests: installing kubernetes-validate $VALIDATE_VERSION into $VENV" >&2
  rm -rf "$VENV"
  "$py" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check \
    "kubernetes-validate==$VALIDATE_VERSION" "jsonschema==$JSONSCHEMA_VERSION"
}

find_kubectl
ensure_venv

out=$(mktemp -d /tmp/check-manifests.XXXXXX)
trap 'rm -rf "$out"' EXIT

# What to render: the base, then every overlay and example that has a kustomization.
targets=(manifests)
for dir in manifests/overlays/*/ manifests/examples/*/; do
  [ -f "$dir/kustomization.yaml" ] && targets+=("${dir%/}")
done

# Render each with kubectl 1.20; label the files by target for the validator.
rendered=()
failed=0
echo "== rendering with $("$kubectl120" version --client --short 2>/dev/null) ($kubectl120)"
for t in "${targets[@]}"; do
  f="$out/$(echo "$t" | tr / _).yaml"
  if "$kubectl120" kustomize "$t" >"$f" 2>"$f.err"; then
    rendered+=("$t=$f")
  else
    echo "FAIL $t does not render with kubectl 1.20:" >&2
    sed 's/^/  /' "$f.err" >&2
    failed=1
  fi
done

# The kubectl on PATH, when it is another one (e.g. newer kustomize), must render the same.
other=()
if command -v kubectl >/dev/null 2>&1 && ! is_kubectl_120 kubectl; then
  version=$(kubectl version --client 2>/dev/null || true)
  version=${version%%$'\n'*}
  echo "== rendering again with the kubectl on PATH ($version)"
  for t in "${targets[@]}"; do
    f="$out/other_$(echo "$t" | tr / _).yaml"
    if kubectl kustomize "$t" >"$f" 2>"$f.err"; then
      other+=("$t=$f")
      sort -u "$f.err" | grep -i warning | sed "s|^|  $t: |" || true
    else
      echo "FAIL $t does not render with $version:" >&2
      sed 's/^/  /' "$f.err" >&2
      failed=1
    fi
  done
fi

[ "$failed" -eq 0 ] || { echo "check-manifests: a kustomization does not render" >&2; exit 1; }

echo "== validating against Kubernetes $K8S_VERSION (kubernetes-validate $VALIDATE_VERSION, strict)"
"$VENV/bin/python" -W ignore::DeprecationWarning - "$K8S_VERSION" "${#rendered[@]}" \
  "${rendered[@]}" "${other[@]}" <<'PY'
import copy
import glob
import re
import sys

import jsonschema
import kubernetes_validate
import yaml

version = sys.argv[1]
count = int(sys.argv[2])
rendered = [a.split("=", 1) for a in sys.argv[3:3 + count]]
other = dict(a.split("=", 1) for a in sys.argv[3 + count:])
problems = []


def load(path):
    return [d for d in yaml.safe_load_all(open(path)) if d]


def ident(obj):
    m = obj.get("metadata") or {}
    return (obj.get("apiVersion"), obj.get("kind"), m.get("namespace", ""), m.get("name"))


def label(obj):
    _, kind, ns, name = ident(obj)
    return f"{kind} {ns + '/' if ns else ''}{name}"


# Every YAML file under manifests/ parses, rendered or not (e.g. the scrape config example).
for path in sorted(glob.glob("manifests/**/*.yaml", recursive=True)):
    try:
        list(yaml.safe_load_all(open(path)))
    except yaml.YAMLError as e:
        problems.append(f"{path}: not YAML: {e}")


def structural_to_json_schema(schema):
    """An openAPIV3Schema as a strict JSON Schema: `nullable` allows null, int-or-string is
    either, and an object with listed properties takes no others (the API server would prune
    them silently, so a misspelt field would just vanish)."""
    s = copy.deepcopy(schema)

    def walk(node):
        if not isinstance(node, dict):
            return
        if node.pop("x-kubernetes-int-or-string", False):
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if node.pop("nullable", False) and "type" in node:
            node["type"] = [node["type"], "null"]
        if (node.get("type") in ("object", ["object", "null"]) and "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        for key in ("properties", "patternProperties", "definitions"):
            for child in (node.get(key) or {}).values():
                walk(child)
        for key in ("items", "additionalProperties", "not"):
            walk(node.get(key))
        for key in ("allOf", "anyOf", "oneOf"):
            for child in node.get(key) or []:
                walk(child)

    s.setdefault("properties", {}).update({
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
    })
    walk(s)
    return s


# Our CRDs, from every render (the base carries them).
crd_schemas = {}
for _, path in rendered:
    for obj in load(path):
        if obj.get("kind") != "CustomResourceDefinition":
            continue
        spec = obj["spec"]
        for v in spec["versions"]:
            key = (f"{spec['group']}/{v['name']}", spec["names"]["kind"])
            crd_schemas[key] = structural_to_json_schema(v["schema"]["openAPIV3Schema"])

validated = 0
skipped = {}
renders = {}
for target, path in rendered:
    objects = load(path)
    renders[target] = objects
    ok = 0
    for obj in objects:
        key = (obj.get("apiVersion"), obj.get("kind"))
        where = f"{target}: {label(obj)}"
        if key in crd_schemas:
            errors = sorted(jsonschema.Draft4Validator(crd_schemas[key]).iter_errors(obj),
                            key=lambda e: list(e.path))
            for e in errors:
                field = ".".join(str(p) for p in e.path) or "(object)"
                problems.append(f"{where}: {field}: {e.message}")
            ok += not errors
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
            ok += 1
        except kubernetes_validate.SchemaNotFoundError:
            skipped[f"{key[1]} ({key[0]})"] = skipped.get(f"{key[1]} ({key[0]})", 0) + 1
        except kubernetes_validate.ValidationError as e:
            field = ".".join(str(p) for p in e.path) or "(object)"
            problems.append(f"{where}: {field}: {e.message}")
    validated += ok
    n_skipped = sum(1 for o in objects
                    if (o.get("apiVersion"), o.get("kind")) not in crd_schemas
                    and f"{o.get('kind')} ({o.get('apiVersion')})" in skipped)
    print(f"{target}: {len(objects)} objects, {ok} valid"
          + (f", {n_skipped} skipped (no schema)" if n_skipped else ""))

# Our containers use only flags and NODEPROXY_* variables the binaries define (clap's
# `#[arg(long, env = ...)]` fields): a misspelt variable would be silently ignored.
SOURCES = {"nodeproxy": "nodeproxy/src", "nodeproxy-controlplane": "controlplane/src"}
known = {}
for binary, src in SOURCES.items():
    files = sorted(glob.glob(f"{src}/**/*.rs", recursive=True))
    text = "".join(open(f).read() for f in files)
    envs = set(re.findall(r'env\s*=\s*"(NODEPROXY_[A-Z0-9_]+)"', text))
    flags = {f.replace("_", "-") for f in re.findall(
        r"#\[arg\(\s*long.*?\)\]\s*(?:pub\s+)?(\w+)\s*:", text, re.S)}
    if not envs or not flags:
        problems.append(f"found no clap flags under {src}: update SOURCES in this script")
    known[binary] = (envs, flags)
for target, objects in renders.items():
    for obj in objects:
        pod = (obj.get("spec") or {}).get("template", {}).get("spec", {})
        for c in pod.get("containers", []):
            binary = c.get("image", "").rsplit("/", 1)[-1].split(":")[0]
            if binary not in known:
                continue
            envs, flags = known[binary]
            where = f"{target}: {label(obj)} container {c.get('name')}"
            for e in c.get("env", []):
                if e["name"].startswith("NODEPROXY_") and e["name"] not in envs:
                    problems.append(f"{where}: {binary} reads no variable {e['name']}")
            for a in c.get("args", []) + c.get("command", []):
                if a.startswith("--") and a[2:].split("=", 1)[0] not in flags:
                    problems.append(f"{where}: {binary} has no flag {a.split('=', 1)[0]}")

# Overlays carry the whole base.
base = {ident(o) for o in renders.get("manifests", [])}
for target, objects in renders.items():
    if target.startswith("manifests/overlays/"):
        missing = base - {ident(o) for o in objects}
        for m in sorted(missing, key=str):
            problems.append(f"{target}: lacks {m[1]} {m[3]} of the base: add the base's new part "
                            "to its `bases`")

# Another kubectl renders the same objects.
for target, path in other.items():
    mine = sorted(ident(o) for o in renders.get(target, []))
    theirs = sorted(ident(o) for o in load(path))
    if mine != theirs:
        problems.append(f"{target}: the kubectl on PATH renders other objects: "
                        f"only 1.20: {sorted(set(mine) - set(theirs))}, "
                        f"only it: {sorted(set(theirs) - set(mine))}")

for kind, n in sorted(skipped.items()):
    print(f"skipped (no schema for Kubernetes {version} here): {kind} x{n}")
if problems:
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    print(f"check-manifests: {len(problems)} problem(s)", file=sys.stderr)
    sys.exit(1)
print(f"manifests_ok={validated}")
PY
