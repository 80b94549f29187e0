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
# run_long: long steps (builds, package installs) with a heartbeat, their
# output in STRATA_LOGS.
# shellcheck source=../lib.sh
. "$CLUSTER_REPO/hack/lib.sh"
# CONTAINERD=build: containerd CONTAINERD_VERSION from the module proxy;
# CONTAINERD=debian: Debian's containerd 1.6 package (use with K8S_VERSION<=v1.35.x).
CONTAINERD=${CONTAINERD:-build}
# ETCD=build: etcd ETCD_VERSION from the module proxy; ETCD=debian: etcd-server 3.4.
ETCD=${ETCD:-build}

# Network plan: everything lives in network namespace CLUSTER_NETNS.
CLUSTER_NETNS=${CLUSTER_NETNS:-strata-e2e}
NODE_NAME=${NODE_NAME:-strata-node}
API_IP=10.99.0.1             # the apiserver (and, with NODES=1, the node)
NODE_IP=$API_IP              # on veth strata-node inside the namespace
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

# NODES: how many nodes (kubelet + containerd + kube-proxy each). A running
# cluster's count is in $C_STATE/nodes, so that cluster-down and service find
# every node without being told. NODES=1 is the layout above, unchanged; with
# NODES>1 the control plane keeps CLUSTER_NETNS (API_IP on bridge
# NODES_BRIDGE) and each node gets a network namespace, a mount namespace and
# a directory of its own (node_vars; hack/cluster/README.md, "Many nodes").
if [ -z "${NODES:-}" ] && [ -s "$C_STATE/nodes" ]; then NODES=$(<"$C_STATE/nodes"); fi
NODES=${NODES:-1}
[[ $NODES =~ ^[1-9][0-9]?$ ]] || { echo "cluster: NODES=$NODES: want a number of nodes from 1 to 99" >&2; exit 1; }
NODES_BRIDGE=strata-nodes    # NODES>1: in CLUSTER_NETNS, API_IP/24, one veth per node
NODES_NET=10.99.0            # NODES>1: node i has $NODES_NET.$((10+i))
# NODES>1: a node's 127.0.0.1 on these ports (FIRST-LAST) is the control
# plane's, where the tests run their registries (in-netns).
LOCAL_FORWARD_PORTS=${LOCAL_FORWARD_PORTS:-5000-5009}
C_NODES=$C_DATA/nodes        # NODES>1: one directory per node
C_MNTNS=$C_RUN/mntns         # NODES>1: the nodes' mount namespaces (nsfs bind mounts)
# Paths that every node owns privately (NODES>1): inside node N's mount
# namespace, $C_NODES/<name>/root<path> is bind-mounted on <path>. The first
# four are paths the kubelet, containerd and CNI use whatever their
# configuration says; /etc/cni holds the node's CNI config.
NODE_PRIVATE_PATHS=(/var/lib/kubelet /var/lib/cni /run/containerd /var/log/containers /etc/cni)

# node_vars I: the names, addresses and paths of node I (1..NODES), as N_*
# variables. With NODES=1 they are the single-node layout above.
node_vars() {
	local i=$1 o1 o2 o3
	N_I=$i
	if [ "$NODES" = 1 ]; then
		N_NAME=$NODE_NAME N_IP=$NODE_IP N_POD_CIDR=$POD_CIDR N_NETNS=$CLUSTER_NETNS
		N_SUFFIX='' N_DIR='' N_MNTNS=''
		N_ETC=$C_ETC N_RUNDIR=$C_RUN N_DATA=$C_DATA N_CERT=kubelet
		N_CNI_CONF_DIR=$C_ETC/cni N_CNI_WRITE_DIR=$C_ETC/cni
		N_CGROUP_ROOT=/$CGROUP_ROOT N_SSHBIN=$CLUSTER_DIR/sshbin
		CONTAINERD_SOCK_N=$CONTAINERD_SOCK
		return
	fi
	if [ "$i" = 1 ]; then N_NAME=$NODE_NAME; else N_NAME=$NODE_NAME-$i; fi
	N_IP=$NODES_NET.$((10 + i))
	# Pod CIDRs: POD_CIDR's /24 for node 1, the next /24s for the others.
	IFS=. read -r o1 o2 o3 _ <<<"${POD_CIDR%/*}"
	N_POD_CIDR=$o1.$o2.$((o3 + i - 1)).0/24
	N_NETNS=$CLUSTER_NETNS-n$i
	N_SUFFIX=@$N_NAME
	N_DIR=$C_NODES/$N_NAME
	N_MNTNS=$C_MNTNS/$N_NAME
	N_ETC=$N_DIR/etc N_RUNDIR=$N_DIR/run N_DATA=$N_DIR/data N_CERT=kubelet-$N_NAME
	N_CNI_CONF_DIR=/etc/cni/net.d N_CNI_WRITE_DIR=$N_DIR/root/etc/cni/net.d
	N_CGROUP_ROOT=/$CGROUP_ROOT/$N_NAME N_SSHBIN=$N_DIR/sshbin
	CONTAINERD_SOCK_N=$N_RUNDIR/containerd/containerd.sock
}
# all_components: every component's name (its pidfile is $C_RUN/<name>.pid)
# in start order; a node's own are <component>@<node> when NODES>1.
all_components() {
	local i c
	if [ "$NODES" = 1 ]; then
		printf '%s\n' "${COMPONENTS[@]}"
		return
	fi
	printf '%s\n' etcd kube-apiserver kube-controller-manager kube-scheduler
	for ((i = 1; i <= NODES; i++)); do
		node_vars "$i"
		for c in containerd kubelet sshd kube-proxy; do echo "$c$N_SUFFIX"; done
	done
}
# The pod CIDRs of all nodes, one per line.
all_pod_cidrs() {
	local i
	for ((i = 1; i <= NODES; i++)); do node_vars "$i"; echo "$N_POD_CIDR"; done
}

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
