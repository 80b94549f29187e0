# shellcheck shell=bash disable=SC2034
# The versions of the tools that Strata's scripts build from the Go module
# proxy (sourced by hack/install-deps, hack/render-deploy and
# hack/cluster/common.sh). hack/cluster/tools/bundle pins exactly the
# cluster's and helm's; any other version (from the environment) gets its
# own generated module. staticcheck is go-installed on its own.
K8S_VERSION=${K8S_VERSION:-v1.37.2}
CONTAINERD_VERSION=${CONTAINERD_VERSION:-v2.2.9}
# Kubernetes v1.37's own etcd (kubeadm's DefaultEtcdVersion is 3.7.0).
ETCD_VERSION=${ETCD_VERSION:-v3.7.0}
HELM_VERSION=${HELM_VERSION:-v3.22.0}
# staticcheck for make lint (hack/install-deps): 2026.2.2, of the first
# release line whose go.mod asks for go 1.26, like Strata's.
STATICCHECK_VERSION=${STATICCHECK_VERSION:-v0.8.2}
