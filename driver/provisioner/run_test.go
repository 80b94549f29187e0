package provisioner

import (
	"context"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

// TestRun drives the library's ProvisionController, with leader election,
// over client-go's in-memory clientset (there is no API server in unit
// tests; e2e runs the Deployment on a real cluster): a claim that the
// scheduler placed on a node gets its PV, a released PV is deleted, and a
// cancelled context stops the controller and releases the Lease.
func TestRun(t *testing.T) {
	sc := class(nil)
	pvc := claim(v1.ReadWriteOnce)
	pvc.Spec.StorageClassName = &sc.Name
	pvc.Annotations = map[string]string{
		"volume.kubernetes.io/storage-provisioner": "strata.csi.dev",
		"volume.kubernetes.io/selected-node":       "worker-1",
	}
	kube := fake.NewClientset(sc, pvc, node("worker-1", map[string]string{"topology.strata.csi.dev/node": "worker-1"}))
	p := newProvisioner(t, WithNodes(NodesFrom(kube)))

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, kube, p, RunConfig{LeaderElection: true, Namespace: "kube-system", Identity: "replica-a"})
	}()

	var pv *v1.PersistentVolume
	waitFor(t, "the PV of claim team/data", func() bool {
		var err error
		pv, err = kube.CoreV1().PersistentVolumes().Get(ctx, "pvc-1234", metav1.GetOptions{})
		return err == nil
	})
	if pv.Spec.ClaimRef == nil || pv.Spec.ClaimRef.Name != "data" || pv.Spec.StorageClassName != sc.Name ||
		pv.Annotations["pv.kubernetes.io/provisioned-by"] != "strata.csi.dev" {
		t.Errorf("PV claimRef %+v, class %q, annotations %v: want team/data, %s, provisioned-by strata.csi.dev",
			pv.Spec.ClaimRef, pv.Spec.StorageClassName, pv.Annotations, sc.Name)
	}
	checkAffinity(t, pv, "worker-1")
	lease, err := kube.CoordinationV1().Leases("kube-system").Get(ctx, "strata-csi-dev", metav1.GetOptions{})
	if err != nil || lease.Spec.HolderIdentity == nil || *lease.Spec.HolderIdentity != "replica-a" {
		t.Fatalf("lease kube-system/strata-csi-dev: %v, holder %v; want replica-a", err, lease)
	}

	// The claim is gone: the PV controller marks the PV Released, and the
	// provisioner deletes it (reclaim policy Delete).
	pv.Status.Phase = v1.VolumeReleased
	if _, err := kube.CoreV1().PersistentVolumes().UpdateStatus(ctx, pv, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the released PV's deletion", func() bool {
		_, err := kube.CoreV1().PersistentVolumes().Get(ctx, pv.Name, metav1.GetOptions{})
		return err != nil
	})

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run after cancel: %v, want nil", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Run still runs 30s after its context ended")
	}
	lease, err = kube.CoordinationV1().Leases("kube-system").Get(context.Background(), "strata-csi-dev", metav1.GetOptions{})
	if err != nil || (lease.Spec.HolderIdentity != nil && *lease.Spec.HolderIdentity != "") {
		t.Errorf("lease after a clean stop: %v, holder %v; want it released", err, lease.Spec.HolderIdentity)
	}
}

// TestRunNeedsNamespace: leader election without a namespace is refused at
// once.
func TestRunNeedsNamespace(t *testing.T) {
	t.Setenv("POD_NAMESPACE", "")
	if podNamespace() != "" {
		t.Fatalf("the test runs in a pod (namespace %q): it cannot check the refusal", podNamespace())
	}
	err := Run(context.Background(), fake.NewClientset(), newProvisioner(t), RunConfig{LeaderElection: true})
	if err == nil {
		t.Fatal("Run with leader election and no namespace succeeded")
	}
}

// waitFor polls cond for up to 30 seconds.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("no %s after 30s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
