#!/usr/bin/env bash
# The two-node demo on one machine: etcd on loopback (a temporary data directory), node a
# (no plugin) and node b (the echo plugin), until Ctrl-C.
#
#   cargo build --workspace --bins --examples && deploy/cluster/run.sh
#
# Then, from another shell:
#   MESH_SOCKET=/tmp/mesh-cluster-a/mesh.sock cargo run --example client   # a client on node a
#   grpcurl -plaintext -unix -authority plugin.echo /tmp/mesh-cluster-a/mesh.sock list
#   target/debug/mesh status --socket /tmp/mesh-cluster-a/mesh.sock       # "registry: etcd ..."
# Needs Debian's etcd-server (apt-get install etcd-server etcd-client).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mesh="$here/../../target/debug/mesh"
command -v etcd >/dev/null || { echo "run.sh: etcd not found; apt-get install etcd-server" >&2; exit 1; }
[ -x "$mesh" ] || { echo "run.sh: build first: cargo build --workspace --bins --examples" >&2; exit 1; }

data=$(mktemp -d)
pids=()
cleanup() {
    # SIGTERM: the nodes withdraw their instances from etcd, then etcd stops.
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait "${pids[@]}" 2>/dev/null || true
    rm -rf "$data"
}
trap cleanup EXIT INT TERM

etcd --name demo --data-dir "$data/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster demo=http://127.0.0.1:2380 >"$data/etcd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    etcdctl --endpoints=http://127.0.0.1:2379 endpoint health >/dev/null 2>&1 && break
    sleep 0.1
done
"$mesh" up --config "$here/node-b.toml" &
pids+=($!)
"$mesh" up --config "$here/node-a.toml" &
pids+=($!)
wait -n "${pids[@]}"
