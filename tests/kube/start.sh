#!/bin/bash
# tests/kube/start.sh [all|apiserver] — start etcd and a real kube-apiserver (built by
# tests/kube/build.sh) on 127.0.0.1 only. Env: RUN (run dir, required), API_PORT, ETCD_PORT,
# ETCD_PEER, NODEPROXY_KUBE_DIR. `apiserver` restarts only the API server (etcd keeps its data).
# Prints the kubeconfig path when ready. Stop with tests/kube/stop.sh (only our pids).
set -euo pipefail
WHAT=${1:-all}
: "${RUN:?set RUN to a run directory}"
BIN=${NODEPROXY_KUBE_DIR:-/var/tmp/nodeproxy-kube}/bin
ETCD_PORT=${ETCD_PORT:-23790}; ETCD_PEER=${ETCD_PEER:-23800}; API_PORT=${API_PORT:-6443}
mkdir -p "$RUN/pki" "$RUN/etcd" "$RUN/log"
cd "$RUN/pki"
[ -f sa.key ] || { openssl genrsa -out sa.key 2048 2>/dev/null; openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null; }
[ -f tokens.csv ] || echo 'test-admin-token,admin,admin,system:masters' > tokens.csv
if [ "$WHAT" = all ]; then
  /usr/bin/etcd --name nodeproxy-test --data-dir "$RUN/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
    --initial-cluster "nodeproxy-test=http://127.0.0.1:$ETCD_PEER" > "$RUN/log/etcd.log" 2>&1 &
  echo $! > "$RUN/etcd.pid"
fi
"$BIN/kube-apiserver" \
  --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
  --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$API_PORT" --insecure-port=0 \
  --cert-dir="$RUN/pki" \
  --token-auth-file="$RUN/pki/tokens.csv" --authorization-mode=RBAC \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$RUN/pki/sa.pub" --service-account-signing-key-file="$RUN/pki/sa.key" \
  --api-audiences=https://kubernetes.default.svc.cluster.local \
  --service-cluster-ip-range=10.96.0.0/16 \
  --disable-admission-plugins=ServiceAccount \
  --allow-privileged=true >> "$RUN/log/kube-apiserver.log" 2>&1 &
echo $! > "$RUN/apiserver.pid"
cat > "$RUN/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters: [{name: local, cluster: {server: "https://127.0.0.1:$API_PORT", insecure-skip-tls-verify: true}}]
users: [{name: admin, user: {token: test-admin-token}}]
contexts: [{name: local, context: {cluster: local, user: admin}}]
current-context: local
KC
for i in $(seq 1 120); do
  if curl -sk -H 'Authorization: Bearer test-admin-token' "https://127.0.0.1:$API_PORT/readyz" | grep -q '^ok'; then
    echo "$RUN/kubeconfig"; exit 0
  fi
  sleep 0.5
done
tail -20 "$RUN/log/kube-apiserver.log" >&2
exit 1
