# shellcheck shell=bash disable=SC2034
# Shared settings of hack/cluster-up and hack/cluster-down (sourced).
# Every value can be overridden from the environment.
export PATH=/usr/local/go/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH

CLUSTER_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CLUSTER_DIR=${CLUSTER_DIR:-/tmp/strata-cluster}
# Built binaries and images, kept across checkouts so that a fresh clone (CI)
# reuses them.
CLUSTER_CACHE=${CLUSTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/strata/cluster}
export CLUSTER_CACHE

# shellcheck source=../versions.sh
. "$CLUSTER_REPO/hack/versions.sh"
# CONTAINERD=build: containerd CONTAINERD_VERSION from the module proxy;
# CONTAINERD=debian: Debian's containerd 1.6 package (use with K8S_VERSION<=v1.35.x).
CONTAINERD=${CONTAINERD:-build}
# ETCD=build: etcd ETCD_VERSION from the module proxy; ETCD=debian: etcd-server 3.4.
ETCD=${ETCD:-build}

# Network plan: everything lives in network namespace CLUSTER_NETNS.
CLUSTER_NETNS=${CLUSTER_NETNS:-strata-e2e}
NODE_NAME=${NODE_NAME:-strata-node}
NODE_IP=10.99.0.1            # on veth strata-node inside the namespace
POD_CIDR=${POD_CIDR:-10.89.0.0/24} # CNI bridge strata-br0, no default route in pods
SERVICE_CIDR=10.96.0.0/24    # kubernetes service VIP 10.96.0.1
CNI_BRIDGE=strata-br0
VETH_NODE=strata-node
VETH_PEER=strata-peer
REGISTRY_ADDR=${REGISTRY_ADDR:-$NODE_IP:5000}

# Layout under CLUSTER_DIR.
C_ETC=$CLUSTER_DIR/etc
C_PKI=$CLUSTER_DIR/etc/pki
C_RUN=$CLUSTER_DIR/run
C_LOG=$CLUSTER_DIR/log
C_DATA=$CLUSTER_DIR/data
C_BIN=$CLUSTER_DIR/bin
C_STATE=$CLUSTER_DIR/state
KUBELET_DIR=${KUBELET_DIR:-$C_DATA/kubelet}
# A node-local directory for a CSI plugin's state (Strata's --root), shared
# like the kubelet dir so that the plugin's Bidirectional mounts propagate.
STATE_DIR=${STATE_DIR:-$C_DATA/strata}
CONTAINERD_SOCK=$C_RUN/containerd/containerd.sock
KUBECONFIG_ADMIN=$C_ETC/admin.kubeconfig
# Cgroup parent of every pod: <controller>/$CGROUP_ROOT/kubepods/...
CGROUP_ROOT=${CGROUP_ROOT:-strata-cluster}

# Host paths that the kubelet, containerd's CNI library and the shims use
# whatever their configuration says; the ones that did not exist before
# cluster-up are removed by cluster-down.
HOST_PATHS=(/var/log/containers /var/lib/kubelet /var/lib/cni /run/containerd)
# kubectl's discovery cache (default ~/.kube/cache) stays in the cluster dir.
export KUBECACHEDIR=$CLUSTER_DIR/kube-cache

# Components in start order (pidfiles are $C_RUN/<name>.pid).
COMPONENTS=(etcd kube-apiserver containerd kube-controller-manager kube-scheduler kubelet sshd kube-proxy)

log() { printf '%s cluster: %s\n' "$(date +%T.%N | cut -c1-12)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# pid_alive NAME: the pid in NAME's pidfile runs the binary we started.
pid_alive() {
	local f=$C_RUN/$1.pid pid
	[ -s "$f" ] || return 1
	pid=$(<"$f")
	[ -d "/proc/$pid" ] || return 1
	# the pidfile may be stale and the pid reused: check the command line
	tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$CLUSTER_DIR" || return 1
}

# The cgroup v1 (and v2) mount points under /sys/fs/cgroup.
cgroup_mounts() {
	awk '$9 ~ /^cgroup2?$/ && $5 ~ "^/sys/fs/cgroup/" {print $5}' /proc/self/mountinfo
}
