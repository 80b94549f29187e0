package provisioner

import (
	"context"
	"slices"
	"strings"
	"sync"
	"testing"

	v1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"sigs.k8s.io/sig-storage-lib-external-provisioner/v13/controller"

	"github.com/strata-csi/strata/driver"
)

const attrCloneOf = "strata.csi.dev/cloneOf"

func ptrTo[T any](v T) *T { return &v }

// cloneEnv is a provisioner with API access, a source claim "src" in
// namespace "team" bound to a clone the same driver made on node n1
// (worker-1), and the finalizers each update of a claim set.
type cloneEnv struct {
	p        *Provisioner
	kube     *fake.Clientset
	sc       *storagev1.StorageClass
	srcPV    *v1.PersistentVolume
	mu       sync.Mutex
	updates  [][]string // the finalizers of the source claim at each update
	workers  NodeGetter
	srcClaim *v1.PersistentVolumeClaim
}

func newCloneEnv(t *testing.T, mutate func(src *v1.PersistentVolumeClaim, pv *v1.PersistentVolume), more ...runtime.Object) *cloneEnv {
	t.Helper()
	e := &cloneEnv{sc: class(nil), workers: nodes(
		node("worker-1", map[string]string{driver.TopologyKey: "n1"}),
		node("worker-2", map[string]string{driver.TopologyKey: "n2"}))}
	e.kube = fake.NewClientset()
	e.p = newProvisioner(t, WithNodes(e.workers), WithKube(e.kube),
		WithDriverNodes(func(context.Context) ([]map[string]string, error) {
			return []map[string]string{{driver.TopologyKey: "n1"}, {driver.TopologyKey: "n2"}}, nil
		}))
	// The source is provisioned by the same provisioner, as in a cluster.
	src := claim(v1.ReadWriteOnce)
	src.Name, src.UID = "src", "src-uid"
	src.Spec.StorageClassName = &e.sc.Name
	pv, _, err := e.p.Provision(context.Background(), options(e.sc, src, "worker-1"))
	if err != nil {
		t.Fatal(err)
	}
	pv.Spec.ClaimRef = &v1.ObjectReference{Kind: "PersistentVolumeClaim", Namespace: "team", Name: "src", UID: src.UID}
	pv.Spec.StorageClassName = e.sc.Name
	src.Spec.VolumeName = pv.Name
	src.Status = v1.PersistentVolumeClaimStatus{Phase: v1.ClaimBound, Capacity: v1.ResourceList{v1.ResourceStorage: resource.MustParse("2Gi")}}
	if mutate != nil {
		mutate(src, pv)
	}
	e.srcPV, e.srcClaim = pv, src
	for _, o := range append([]runtime.Object{src, pv}, more...) {
		if err := e.kube.Tracker().Add(o); err != nil {
			t.Fatal(err)
		}
	}
	e.kube.PrependReactor("update", "persistentvolumeclaims", func(a k8stesting.Action) (bool, runtime.Object, error) {
		c := a.(k8stesting.UpdateAction).GetObject().(*v1.PersistentVolumeClaim)
		if c.Name == "src" {
			e.mu.Lock()
			e.updates = append(e.updates, slices.Clone(c.Finalizers))
			e.mu.Unlock()
		}
		return false, nil, nil
	})
	return e
}

// sourceFinalizers are the source claim's finalizers now.
func (e *cloneEnv) sourceFinalizers(t *testing.T) []string {
	t.Helper()
	c, err := e.kube.CoreV1().PersistentVolumeClaims("team").Get(context.Background(), "src", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return c.Finalizers
}

// cloneClaim is claim "data" of the class, cloning claim src.
func (e *cloneEnv) cloneClaim(src string) *v1.PersistentVolumeClaim {
	c := claim(v1.ReadWriteOnce)
	c.Spec.StorageClassName = &e.sc.Name
	c.Spec.DataSource = &v1.TypedLocalObjectReference{Kind: "PersistentVolumeClaim", Name: src}
	c.Spec.DataSourceRef = &v1.TypedObjectReference{Kind: "PersistentVolumeClaim", Name: src}
	return c
}

// TestProvisionCloneOfClaim: a claim whose dataSource is a bound claim of
// its class becomes a clone of that claim's volume on the source's node;
// the source claim is protected by the cloning finalizer while the clone
// is provisioned, and released after.
func TestProvisionCloneOfClaim(t *testing.T) {
	e := newCloneEnv(t, nil)
	handle := e.srcPV.Spec.CSI.VolumeHandle
	pv, state, err := e.p.Provision(context.Background(), options(e.sc, e.cloneClaim("src"), "worker-1"))
	if err != nil || state != controller.ProvisioningFinished {
		t.Fatalf("Provision: %v (%s), want a PV (Finished)", err, state)
	}
	if got := pv.Spec.CSI.VolumeAttributes[attrCloneOf]; got != handle {
		t.Errorf("volumeAttributes %v: %s = %q, want the source's volume %s", pv.Spec.CSI.VolumeAttributes, attrCloneOf, got, handle)
	}
	if pv.Spec.CSI.VolumeHandle == handle {
		t.Errorf("the clone has its source's handle %s", handle)
	}
	checkAffinity(t, pv, "n1")
	e.mu.Lock()
	updates := slices.Clone(e.updates)
	e.mu.Unlock()
	if len(updates) != 2 || !slices.Contains(updates[0], CloningProtectionFinalizer) || slices.Contains(updates[1], CloningProtectionFinalizer) {
		t.Errorf("source claim finalizers at each update %v: want %s added, then removed", updates, CloningProtectionFinalizer)
	}
	if f := e.sourceFinalizers(t); slices.Contains(f, CloningProtectionFinalizer) {
		t.Errorf("source claim finalizers %v after the clone is provisioned, want no %s", f, CloningProtectionFinalizer)
	}

	// The request itself: the source's volume as content source, the
	// source's node as the only topology.
	req, _, src, err := e.p.createVolumeRequest(context.Background(), options(e.sc, e.cloneClaim("src"), "worker-1"))
	if err != nil || src == nil {
		t.Fatalf("createVolumeRequest: %v, source %v", err, src)
	}
	if req.GetVolumeContentSource().GetVolume().GetVolumeId() != handle {
		t.Errorf("content source %v, want volume %s", req.GetVolumeContentSource(), handle)
	}
	if r := req.GetAccessibilityRequirements(); len(r.GetRequisite()) != 1 || r.GetRequisite()[0].GetSegments()[driver.TopologyKey] != "n1" {
		t.Errorf("accessibility %v, want n1 only", r)
	}
}

// TestProvisionCloneImmediate: a class that binds at once places the clone
// on its source's node, not on any node of the driver's.
func TestProvisionCloneImmediate(t *testing.T) {
	e := newCloneEnv(t, nil)
	imm := storagev1.VolumeBindingImmediate
	e.sc.VolumeBindingMode = &imm
	pvc := e.cloneClaim("src")
	pvc.UID = "picks-n2-first" // whatever the rotation prefers
	pv, _, err := e.p.Provision(context.Background(), options(e.sc, pvc, ""))
	if err != nil {
		t.Fatal(err)
	}
	checkAffinity(t, pv, "n1")

	// allowedTopologies that exclude the source's node: refused.
	e.sc.AllowedTopologies = []v1.TopologySelectorTerm{{MatchLabelExpressions: []v1.TopologySelectorLabelRequirement{{Key: driver.TopologyKey, Values: []string{"n2"}}}}}
	pvc = e.cloneClaim("src")
	pvc.Name, pvc.UID = "data-2", "uid-2"
	_, state, err := e.p.Provision(context.Background(), options(e.sc, pvc, ""))
	if state != controller.ProvisioningFinished || err == nil || !strings.Contains(err.Error(), "allowedTopologies") || !strings.Contains(err.Error(), "n1") {
		t.Errorf("source outside allowedTopologies: %v (%s), want a final refusal naming n1 and allowedTopologies", err, state)
	}
}

// TestProvisionCloneWrongNode: the scheduler selected another node than
// the source's: the library asks for another node, the error names the
// source's node, and the source is not left protected.
func TestProvisionCloneWrongNode(t *testing.T) {
	e := newCloneEnv(t, nil)
	_, state, err := e.p.Provision(context.Background(), options(e.sc, e.cloneClaim("src"), "worker-2"))
	if state != controller.ProvisioningReschedule || err == nil || !strings.Contains(err.Error(), "node n1") || !strings.Contains(err.Error(), "worker-2") {
		t.Errorf("selected worker-2: %v (%s), want Reschedule naming the source's node n1 and worker-2", err, state)
	}
	if f := e.sourceFinalizers(t); slices.Contains(f, CloningProtectionFinalizer) {
		t.Errorf("source claim finalizers %v, want no %s", f, CloningProtectionFinalizer)
	}
}

// TestProvisionCloneKeepsProtection: while another clone of the source is
// pending, the finalizer stays after one clone is provisioned.
func TestProvisionCloneKeepsProtection(t *testing.T) {
	pending := claim(v1.ReadWriteOnce)
	pending.Name, pending.UID = "data-2", "uid-2"
	pending.Spec.DataSource = &v1.TypedLocalObjectReference{Kind: "PersistentVolumeClaim", Name: "src"}
	pending.Status.Phase = v1.ClaimPending
	e := newCloneEnv(t, nil, pending)
	if _, _, err := e.p.Provision(context.Background(), options(e.sc, e.cloneClaim("src"), "worker-1")); err != nil {
		t.Fatal(err)
	}
	if f := e.sourceFinalizers(t); !slices.Contains(f, CloningProtectionFinalizer) {
		t.Errorf("source claim finalizers %v while claim data-2 still clones it, want %s", f, CloningProtectionFinalizer)
	}
}

// TestProvisionCloneRefusals: what csi-provisioner checks of a source
// claim; a source that may become ready is retried (NoChange), a mismatch
// is final.
func TestProvisionCloneRefusals(t *testing.T) {
	for _, tc := range []struct {
		name    string
		mutate  func(src *v1.PersistentVolumeClaim, pv *v1.PersistentVolume)
		pvc     func(*cloneEnv) *v1.PersistentVolumeClaim
		state   controller.ProvisioningState
		mention string
	}{
		{"missing source", nil, func(e *cloneEnv) *v1.PersistentVolumeClaim { return e.cloneClaim("nosuch") }, controller.ProvisioningNoChange, "does not exist"},
		{"unbound source", func(src *v1.PersistentVolumeClaim, _ *v1.PersistentVolume) { src.Status.Phase = v1.ClaimPending },
			nil, controller.ProvisioningNoChange, "not bound"},
		{"source being deleted", func(src *v1.PersistentVolumeClaim, _ *v1.PersistentVolume) {
			now := metav1.Now()
			src.DeletionTimestamp = &now
			src.Finalizers = []string{"kubernetes.io/pvc-protection"}
		}, nil, controller.ProvisioningNoChange, "being deleted"},
		{"other class", func(src *v1.PersistentVolumeClaim, _ *v1.PersistentVolume) {
			src.Spec.StorageClassName = ptrTo("other")
		},
			nil, controller.ProvisioningFinished, "same StorageClass"},
		{"other driver", func(_ *v1.PersistentVolumeClaim, pv *v1.PersistentVolume) {
			pv.Spec.CSI.Driver = "other.csi.example.com"
		},
			nil, controller.ProvisioningFinished, "not a " + driver.DefaultName},
		{"PV of another claim", func(_ *v1.PersistentVolumeClaim, pv *v1.PersistentVolume) {
			pv.Spec.ClaimRef.UID = types.UID("someone-else")
		},
			nil, controller.ProvisioningNoChange, "another claim"},
		{"smaller than the source", func(src *v1.PersistentVolumeClaim, _ *v1.PersistentVolume) {
			src.Status.Capacity = v1.ResourceList{v1.ResourceStorage: resource.MustParse("3Gi")}
		}, nil, controller.ProvisioningFinished, "at least 3Gi"},
		{"other namespace", nil, func(e *cloneEnv) *v1.PersistentVolumeClaim {
			c := e.cloneClaim("src")
			c.Spec.DataSource = nil
			c.Spec.DataSourceRef.Namespace = ptrTo("elsewhere")
			return c
		}, controller.ProvisioningFinished, "namespace"},
		{"populator", nil, func(e *cloneEnv) *v1.PersistentVolumeClaim {
			c := e.cloneClaim("src")
			c.Spec.DataSource = nil
			c.Spec.DataSourceRef = &v1.TypedObjectReference{APIGroup: ptrTo("hello.example.com"), Kind: "Hello", Name: "h"}
			return c
		}, controller.ProvisioningFinished, "populators"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newCloneEnv(t, tc.mutate)
			pvc := e.cloneClaim("src")
			if tc.pvc != nil {
				pvc = tc.pvc(e)
			}
			pv, state, err := e.p.Provision(context.Background(), options(e.sc, pvc, "worker-1"))
			if err == nil {
				t.Fatalf("Provision made %+v, want a refusal", pv)
			}
			if state != tc.state || !strings.Contains(err.Error(), tc.mention) {
				t.Errorf("%v (%s), want %s and a message naming %q", err, state, tc.state, tc.mention)
			}
			if f := e.sourceFinalizers(t); slices.Contains(f, CloningProtectionFinalizer) {
				t.Errorf("source claim finalizers %v after a refusal, want no %s", f, CloningProtectionFinalizer)
			}
		})
	}
}

// TestProvisionCloneDriverFindsPV: a controller that did not create the
// source (it restarted) finds it through its PersistentVolume.
func TestProvisionCloneDriverFindsPV(t *testing.T) {
	e := newCloneEnv(t, nil)
	d, err := driver.New(driver.Config{Mode: driver.ModeController, Kube: e.kube})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	p, err := New(driver.DefaultName, driver.TopologyKey, d, WithNodes(e.workers), WithKube(e.kube))
	if err != nil {
		t.Fatal(err)
	}
	pv, _, err := p.Provision(context.Background(), options(e.sc, e.cloneClaim("src"), "worker-1"))
	if err != nil {
		t.Fatal(err)
	}
	if pv.Spec.CSI.VolumeAttributes[attrCloneOf] != e.srcPV.Spec.CSI.VolumeHandle {
		t.Errorf("volumeAttributes %v, want %s=%s", pv.Spec.CSI.VolumeAttributes, attrCloneOf, e.srcPV.Spec.CSI.VolumeHandle)
	}
	checkAffinity(t, pv, "n1")
}
