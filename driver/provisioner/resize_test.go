package provisioner

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	v1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/record"
)

// recordingCS is the real driver's controller service, with every
// ControllerExpandVolume request kept.
type recordingCS struct {
	csi.ControllerServer
	mu   sync.Mutex
	reqs []*csi.ControllerExpandVolumeRequest
}

func (r *recordingCS) ControllerExpandVolume(ctx context.Context, req *csi.ControllerExpandVolumeRequest) (*csi.ControllerExpandVolumeResponse, error) {
	r.mu.Lock()
	r.reqs = append(r.reqs, req)
	r.mu.Unlock()
	return r.ControllerServer.ControllerExpandVolume(ctx, req)
}

func (r *recordingCS) calls() []*csi.ControllerExpandVolumeRequest {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]*csi.ControllerExpandVolumeRequest(nil), r.reqs...)
}

// boundClaim is a claim of class "strata-rw" bound to PV "pv-<name>" of
// driver, whose capacity is had and whose claim asks for want.
func boundClaim(name, driverName string, mode v1.PersistentVolumeAccessMode, had, want string) (*v1.PersistentVolumeClaim, *v1.PersistentVolume) {
	sc := "strata-rw"
	pvc := &v1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "lab", UID: types.UID("uid-" + name)},
		Spec: v1.PersistentVolumeClaimSpec{
			StorageClassName: &sc, VolumeName: "pv-" + name, AccessModes: []v1.PersistentVolumeAccessMode{mode},
			Resources: v1.VolumeResourceRequirements{Requests: v1.ResourceList{v1.ResourceStorage: resource.MustParse(want)}},
		},
		Status: v1.PersistentVolumeClaimStatus{Phase: v1.ClaimBound, AccessModes: []v1.PersistentVolumeAccessMode{mode},
			Capacity: v1.ResourceList{v1.ResourceStorage: resource.MustParse(had)}},
	}
	pv := &v1.PersistentVolume{
		ObjectMeta: metav1.ObjectMeta{Name: "pv-" + name},
		Spec: v1.PersistentVolumeSpec{
			Capacity:    v1.ResourceList{v1.ResourceStorage: resource.MustParse(had)},
			AccessModes: []v1.PersistentVolumeAccessMode{mode}, StorageClassName: sc,
			ClaimRef: &v1.ObjectReference{Kind: "PersistentVolumeClaim", Namespace: "lab", Name: name, UID: pvc.UID},
			PersistentVolumeSource: v1.PersistentVolumeSource{CSI: &v1.CSIPersistentVolumeSource{
				Driver: driverName, VolumeHandle: "strata-" + name,
				VolumeAttributes: map[string]string{"image": image, attrClone: "true", attrCapacity: "1073741824"},
			}},
		},
		Status: v1.PersistentVolumeStatus{Phase: v1.VolumeBound},
	}
	return pvc, pv
}

func expandableClass() *storagev1.StorageClass {
	yes := true
	return &storagev1.StorageClass{ObjectMeta: metav1.ObjectMeta{Name: "strata-rw"}, Provisioner: "strata.csi.dev",
		AllowVolumeExpansion: &yes, Parameters: map[string]string{"image": image}}
}

// startResizer runs a Resizer over kube until the test ends.
func startResizer(t *testing.T, kube kubernetes.Interface, cs csi.ControllerServer) *eventLog {
	t.Helper()
	rec := record.NewFakeRecorder(100)
	r, err := NewResizer("strata.csi.dev", cs, kube, WithRecorder(rec))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); r.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return &eventLog{rec: rec}
}

// eventLog gathers the events of a FakeRecorder, so that waits for
// different events do not consume each other's.
type eventLog struct {
	rec  *record.FakeRecorder
	seen []string
}

// wait waits for an event that contains every one of words.
func (l *eventLog) wait(t *testing.T, words ...string) string {
	t.Helper()
	match := func(e string) bool {
		for _, w := range words {
			if !strings.Contains(e, w) {
				return false
			}
		}
		return true
	}
	for _, e := range l.seen {
		if match(e) {
			return e
		}
	}
	timeout := time.After(10 * time.Second)
	for {
		select {
		case e := <-l.rec.Events:
			l.seen = append(l.seen, e)
			if match(e) {
				return e
			}
		case <-timeout:
			t.Fatalf("no event with %q within 10s; events: %q", words, l.seen)
		}
	}
}

func getBoth(t *testing.T, kube kubernetes.Interface, name string) (*v1.PersistentVolumeClaim, *v1.PersistentVolume) {
	t.Helper()
	pvc, err := kube.CoreV1().PersistentVolumeClaims("lab").Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pv, err := kube.CoreV1().PersistentVolumes().Get(context.Background(), "pv-"+name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return pvc, pv
}

func hasCondition(pvc *v1.PersistentVolumeClaim, c v1.PersistentVolumeClaimConditionType) bool {
	for _, cond := range pvc.Status.Conditions {
		if cond.Type == c && cond.Status == v1.ConditionTrue {
			return true
		}
	}
	return false
}

// TestResizerGrowsClaim: a claim grown past its PV's capacity gets
// ControllerExpandVolume of the new size; the PV's capacity becomes it, and
// the claim's status is external-resizer's for a pending node expansion
// (allocatedResources, NodeResizePending, FileSystemResizePending), with
// the capacity left for kubelet to finish.
func TestResizerGrowsClaim(t *testing.T) {
	pvc, pv := boundClaim("grow", "strata.csi.dev", v1.ReadWriteOnce, "1Gi", "3Gi")
	kube := fake.NewClientset(expandableClass(), pvc, pv)
	cs := &recordingCS{ControllerServer: newDriver(t)}
	rec := startResizer(t, kube, cs)

	rec.wait(t, "Normal", "Resizing", "pv-grow")
	rec.wait(t, "Normal", "FileSystemResizeRequired")
	calls := cs.calls()
	if len(calls) != 1 {
		t.Fatalf("ControllerExpandVolume called %d times, want once", len(calls))
	}
	want := resource.MustParse("3Gi")
	if c := calls[0]; c.VolumeId != "strata-grow" || c.CapacityRange.GetRequiredBytes() != want.Value() ||
		c.VolumeCapability.GetAccessMode().GetMode() != csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER {
		t.Errorf("ControllerExpandVolume request %v, want volume strata-grow, %d bytes, SINGLE_NODE_MULTI_WRITER (ReadWriteOnce, as the provisioner sends it)", c, want.Value())
	}
	var got *v1.PersistentVolumeClaim
	var gotPV *v1.PersistentVolume
	deadline := time.Now().Add(5 * time.Second)
	for {
		got, gotPV = getBoth(t, kube, "grow")
		if got.Status.AllocatedResourceStatuses[v1.ResourceStorage] == v1.PersistentVolumeClaimNodeResizePending || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if q := gotPV.Spec.Capacity[v1.ResourceStorage]; q.Cmp(want) != 0 {
		t.Errorf("PV capacity %s, want %s", q.String(), want.String())
	}
	if q := got.Status.AllocatedResources[v1.ResourceStorage]; q.Cmp(want) != 0 {
		t.Errorf("claim allocatedResources %s, want %s", q.String(), want.String())
	}
	if s := got.Status.AllocatedResourceStatuses[v1.ResourceStorage]; s != v1.PersistentVolumeClaimNodeResizePending {
		t.Errorf("claim allocatedResourceStatuses %q, want %q", s, v1.PersistentVolumeClaimNodeResizePending)
	}
	if !hasCondition(got, v1.PersistentVolumeClaimFileSystemResizePending) {
		t.Errorf("claim conditions %v, want FileSystemResizePending", got.Status.Conditions)
	}
	if hasCondition(got, v1.PersistentVolumeClaimResizing) {
		t.Errorf("claim conditions %v still say Resizing", got.Status.Conditions)
	}
	if q := got.Status.Capacity[v1.ResourceStorage]; q.Cmp(resource.MustParse("1Gi")) != 0 {
		t.Errorf("claim status capacity %s: kubelet sets it after NodeExpandVolume, want 1Gi until then", q.String())
	}
	// Nothing more to do: no second call.
	time.Sleep(300 * time.Millisecond)
	if n := len(cs.calls()); n != 1 {
		t.Errorf("ControllerExpandVolume called %d times, want once", n)
	}
}

// TestResizerRefuses: a shrink, and an expansion that the controller
// service refuses (the image itself, ReadOnlyMany), get a VolumeResizeFailed
// event; the PV's capacity and the claim's capacity stay. A claim of another
// driver is left alone.
func TestResizerRefuses(t *testing.T) {
	shrink, shrinkPV := boundClaim("shrink", "strata.csi.dev", v1.ReadWriteOnce, "2Gi", "1Gi")
	ro, roPV := boundClaim("ro", "strata.csi.dev", v1.ReadOnlyMany, "1Gi", "2Gi")
	other, otherPV := boundClaim("other", "other.csi.dev", v1.ReadWriteOnce, "1Gi", "2Gi")
	kube := fake.NewClientset(expandableClass(), shrink, shrinkPV, ro, roPV, other, otherPV)
	cs := &recordingCS{ControllerServer: newDriver(t)}
	rec := startResizer(t, kube, cs)

	rec.wait(t, "Warning", "VolumeResizeFailed", "shrink")
	rec.wait(t, "Warning", "VolumeResizeFailed", "image itself")
	time.Sleep(300 * time.Millisecond)
	for _, name := range []string{"shrink", "ro", "other"} {
		pvc, pv := getBoth(t, kube, name)
		orig, origPV := shrink, shrinkPV
		switch name {
		case "ro":
			orig, origPV = ro, roPV
		case "other":
			orig, origPV = other, otherPV
		}
		if q, w := pv.Spec.Capacity[v1.ResourceStorage], origPV.Spec.Capacity[v1.ResourceStorage]; q.Cmp(w) != 0 {
			t.Errorf("%s: PV capacity %s, want it unchanged at %s", name, q.String(), w.String())
		}
		if q, w := pvc.Status.Capacity[v1.ResourceStorage], orig.Status.Capacity[v1.ResourceStorage]; q.Cmp(w) != 0 {
			t.Errorf("%s: claim capacity %s, want it unchanged at %s", name, q.String(), w.String())
		}
		if hasCondition(pvc, v1.PersistentVolumeClaimFileSystemResizePending) {
			t.Errorf("%s: claim waits for a node expansion that will not come", name)
		}
	}
	if pvc, _ := getBoth(t, kube, "ro"); pvc.Status.AllocatedResourceStatuses[v1.ResourceStorage] != v1.PersistentVolumeClaimControllerResizeInfeasible {
		t.Errorf("ro: allocatedResourceStatuses %v, want ControllerResizeInfeasible", pvc.Status.AllocatedResourceStatuses)
	}
	if pvc, _ := getBoth(t, kube, "other"); len(pvc.Status.AllocatedResourceStatuses) != 0 || len(pvc.Status.Conditions) != 0 {
		t.Errorf("a claim of another driver was touched: %+v", pvc.Status)
	}
	for _, c := range cs.calls() {
		if c.VolumeId != "strata-ro" {
			t.Errorf("ControllerExpandVolume called for %s", c.VolumeId)
		}
	}
}
