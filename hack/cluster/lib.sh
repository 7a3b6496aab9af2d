# shellcheck shell=bash
# shellcheck disable=SC2034  # variables are used by the scripts that source this file
# Shared settings for hack/cluster/* scripts. Sourced, never executed.
#
# Everything the local cluster uses is decided here: versions, paths and the
# address ranges (see README.md, "Network"). All addresses live on devices that
# `up` creates itself; nothing is routed through the machine's uplink.

set -euo pipefail

CLUSTER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$CLUSTER_DIR/../.." && pwd)"

K8S_VERSION="v1.35.4"
ETCD_VERSION="v3.6.16"
K8S_MINOR="1.35"

GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"

# Binary cache, keyed by version (survives `down`, shared by every checkout).
CACHE_ROOT="${ORCHESTRATOR_CLUSTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/orchestrator-cluster}"
BIN_CACHE="$CACHE_ROOT/k8s-$K8S_VERSION-etcd-$ETCD_VERSION"
BIN_DIR="$BIN_CACHE/bin"
IMAGE_CACHE="$CACHE_ROOT/images"
# NetworkPolicy engine (build/netpol): its binary, nftables table (family ip) and queue.
NETPOL_BIN="kube-network-policies-xt"
NETPOL_TABLE="orchestrator-netpol"
NETPOL_QUEUE=100
# The default StorageClass: our hostPath provisioner (build/provisioner), volumes under the
# state dir (removed by `down` with everything else).
PROVISIONER_BIN="hostpath-provisioner"
PROVISIONER_NAME="orchestrator.local/hostpath"
STORAGE_CLASS="orchestrator-local"

# Runtime state of the running cluster: certs, kubeconfigs, data, logs, pids.
STATE_DIR="${ORCHESTRATOR_CLUSTER_STATE:-/var/lib/orchestrator-cluster}"
KUBECONFIG_PATH="$STATE_DIR/kubeconfig/admin.kubeconfig"

# ---- Network (all local; see README.md) -------------------------------------
# Dummy interface carrying the node IP (the API server's advertise address).
NODE_IFACE="orch0"
NODE_IP="10.213.0.1"
NODE_CIDR="10.213.0.1/32"
# Pod range, on the CNI bridge.
POD_CIDR="10.214.0.0/24"
POD_BRIDGE="orchbr0"
POD_GW="10.214.0.1"
# Service range; the `kubernetes` Service takes the first address.
SERVICE_CIDR="10.215.0.0/24"
KUBERNETES_SVC_IP="10.215.0.1"
# Umbrella blackhole route covering all three ranges so nothing can ever be
# routed out through the uplink, even while the bridge or kube-proxy is down.
UMBRELLA_CIDR="10.212.0.0/14"   # 10.212.0.0 - 10.215.255.255
NODE_NAME="orchestrator-node"
CLUSTER_NAME="orchestrator-local"

# Loopback-only ports of the control plane (the API server also listens on NODE_IP).
APISERVER_PORT=6443
ETCD_CLIENT_PORT=23790
ETCD_PEER_PORT=23800

# ---- Images -----------------------------------------------------------------
IMAGE_PREFIX="localhost/orchestrator"
PAUSE_IMAGE="$IMAGE_PREFIX/pause:3.10-local"
BASE_IMAGE_NAME="$IMAGE_PREFIX/debian-base"
PROJECT_IMAGE_NAME="$IMAGE_PREFIX/orchestrator"
DEBIAN_SUITE="bookworm"
DEBIAN_MIRROR="${ORCHESTRATOR_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

CONTAINERD_NS="k8s.io"
CONTAINERD_SOCK="$STATE_DIR/run/containerd/containerd.sock"

log() { printf '[cluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# Whether $1 is one of this machine's addresses: one route lookup, read whole. Not
# `ip addr show | grep -q` under pipefail: once the address list outgrows one pipe write, grep's
# early exit SIGPIPEs `ip` and the pipeline fails although the address is there (a CI run lost
# its S3 tests to this; reproduced here with 250 addresses: 86 of 200 checks failed).
is_local_address() { [[ "$(ip -4 route get "$1" 2>/dev/null)" == "local $1 "* ]]; }

need_root() {
  [ "$(id -u)" = 0 ] || die "must run as root (network devices, mounts, containerd)"
}

kubectl_() { "$BIN_DIR/kubectl" --kubeconfig "$KUBECONFIG_PATH" "$@"; }

pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
