// Package e2e proves Strata on a real Kubernetes cluster: the one that
// hack/cluster-up builds and starts on this machine (etcd, kube-apiserver,
// controller-manager, scheduler, kubelet, containerd and runc, all inside
// their own network namespace).
//
// The tests install charts/strata with helm, run a registry inside the
// cluster's network namespace with dataset images they build, and check what
// pods see and what the node holds: the overlay mounts in the mount table,
// the upper directories and the layer cache under the plugin's state dir.
// After Strata's own scenarios they run the Kubernetes external-storage e2e
// suite (e2e-storage.test: test/e2e with only its storage specs, built from
// the module proxy at the cluster's version)
// against Strata's inline ephemeral volumes.
//
// The files carry the build tag e2e. hack/e2e (make e2e) brings the cluster
// up, builds and imports the plugin image, builds e2e-storage.test and runs
//
//	go test -tags e2e ./test/e2e
//
// with STRATA_E2E_CLUSTER_ENV naming the cluster's env file. Without it the
// tests fail: they never skip.
package e2e
