package provisioner

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	v1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	"sigs.k8s.io/sig-storage-lib-external-provisioner/v13/controller"

	"github.com/strata-csi/strata/driver"
)

const (
	image = "registry.local:5000/datasets/sample:v1"
	// The attributes the controller adds to a clone's volume context.
	attrClone    = "strata.csi.dev/clone"
	attrCapacity = "strata.csi.dev/capacity"
)

// newDriver is the real driver in controller mode, as the Deployment runs it.
func newDriver(t *testing.T) *driver.Driver {
	t.Helper()
	d, err := driver.New(driver.Config{Mode: driver.ModeController})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// nodes serves Node objects by name, as the API server would.
func nodes(ns ...*v1.Node) NodeGetter {
	return func(_ context.Context, name string) (*v1.Node, error) {
		for _, n := range ns {
			if n.Name == name {
				return n.DeepCopy(), nil
			}
		}
		return nil, apierrors.NewNotFound(schema.GroupResource{Resource: "nodes"}, name)
	}
}

func node(name string, labels map[string]string) *v1.Node {
	return &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}
}

func newProvisioner(t *testing.T, opts ...Option) *Provisioner {
	t.Helper()
	p, err := New(driver.DefaultName, driver.TopologyKey, newDriver(t), opts...)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// class is a StorageClass of the sample image with extra parameters.
func class(params map[string]string) *storagev1.StorageClass {
	p := map[string]string{"image": image}
	maps.Copy(p, params)
	wffc := storagev1.VolumeBindingWaitForFirstConsumer
	return &storagev1.StorageClass{
		ObjectMeta:        metav1.ObjectMeta{Name: "strata-sample"},
		Provisioner:       driver.DefaultName,
		Parameters:        p,
		VolumeBindingMode: &wffc,
	}
}

// claim is a 2Gi claim in namespace "team" with the access modes.
func claim(modes ...v1.PersistentVolumeAccessMode) *v1.PersistentVolumeClaim {
	return &v1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: "data", Namespace: "team", UID: "1234", Annotations: map[string]string{"team.example.com/secret": "corp"}},
		Spec: v1.PersistentVolumeClaimSpec{
			AccessModes: modes,
			Resources:   v1.VolumeResourceRequirements{Requests: v1.ResourceList{v1.ResourceStorage: resource.MustParse("2Gi")}},
		},
	}
}

func options(sc *storagev1.StorageClass, pvc *v1.PersistentVolumeClaim, node string) controller.ProvisionOptions {
	return controller.ProvisionOptions{StorageClass: sc, PVC: pvc, PVName: "pvc-" + string(pvc.UID), SelectedNodeName: node}
}

// TestProvisionClone: a writable claim on the node the scheduler selected
// becomes a clone PV bound to that node by its topology label.
func TestProvisionClone(t *testing.T) {
	p := newProvisioner(t, WithNodes(nodes(node("worker-1", map[string]string{driver.TopologyKey: "n1"}))))
	sc := class(map[string]string{"pullPolicy": "Always", "subPath": "train"})
	retain := v1.PersistentVolumeReclaimRetain
	sc.ReclaimPolicy = &retain
	sc.MountOptions = []string{"noatime"}
	pvc := claim(v1.ReadWriteOnce)

	pv, state, err := p.Provision(context.Background(), options(sc, pvc, "worker-1"))
	if err != nil || state != controller.ProvisioningFinished {
		t.Fatalf("Provision: %v (%s), want a PV (Finished)", err, state)
	}
	s := pv.Spec
	if pv.Name != "pvc-1234" || s.CSI == nil || s.CSI.Driver != driver.DefaultName || !strings.HasPrefix(s.CSI.VolumeHandle, "strata-") {
		t.Fatalf("PV %s, CSI source %+v: want pvc-1234, driver %s, a strata- handle", pv.Name, s.CSI, driver.DefaultName)
	}
	attrs := s.CSI.VolumeAttributes
	want := map[string]string{"image": image, "pullPolicy": "Always", "subPath": "train", attrClone: "true", attrCapacity: "2147483648"}
	if !maps.Equal(attrs, want) {
		t.Errorf("volumeAttributes %v, want %v (the volume context, no provisioner keys)", attrs, want)
	}
	if q := s.Capacity[v1.ResourceStorage]; q.Value() != 2<<30 {
		t.Errorf("capacity %s, want 2Gi", q.String())
	}
	if !slices.Equal(s.AccessModes, []v1.PersistentVolumeAccessMode{v1.ReadWriteOnce}) || s.PersistentVolumeReclaimPolicy != v1.PersistentVolumeReclaimRetain ||
		!slices.Equal(s.MountOptions, []string{"noatime"}) || s.VolumeMode == nil || *s.VolumeMode != v1.PersistentVolumeFilesystem {
		t.Errorf("accessModes %v, reclaim %s, mountOptions %v, volumeMode %v: want [RWO], Retain, [noatime], Filesystem",
			s.AccessModes, s.PersistentVolumeReclaimPolicy, s.MountOptions, ptr(s.VolumeMode))
	}
	checkAffinity(t, pv, "n1")
	if s.CSI.NodePublishSecretRef != nil {
		t.Errorf("node-publish secret %v, want none", s.CSI.NodePublishSecretRef)
	}

	// The library calls again for the same claim after a lost update: the
	// same PV comes back.
	again, _, err := p.Provision(context.Background(), options(sc, pvc, "worker-1"))
	if err != nil || again.Spec.CSI.VolumeHandle != s.CSI.VolumeHandle {
		t.Errorf("second Provision: %v, handle %q; want the same volume %q", err, again.Spec.CSI.VolumeHandle, s.CSI.VolumeHandle)
	}
}

func ptr[T any](p *T) any {
	if p == nil {
		return "unset"
	}
	return *p
}

// checkAffinity: the PV may be used only on nodes whose topology label is
// value.
func checkAffinity(t *testing.T, pv *v1.PersistentVolume, value string) {
	t.Helper()
	na := pv.Spec.NodeAffinity
	if na == nil || na.Required == nil || len(na.Required.NodeSelectorTerms) != 1 {
		t.Fatalf("nodeAffinity %+v, want one required term", na)
	}
	exprs := na.Required.NodeSelectorTerms[0].MatchExpressions
	if len(exprs) != 1 || exprs[0].Key != driver.TopologyKey || exprs[0].Operator != v1.NodeSelectorOpIn || !slices.Equal(exprs[0].Values, []string{value}) {
		t.Errorf("node selector %+v, want %s In [%s]", exprs, driver.TopologyKey, value)
	}
}

// TestProvisionSelectedNode: the topology value of the selected node.
func TestProvisionSelectedNode(t *testing.T) {
	for _, tc := range []struct {
		name  string
		nodes Option
		want  string
	}{
		{"label", WithNodes(nodes(node("worker-1", map[string]string{driver.TopologyKey: "n1"}))), "n1"},
		{"no label: the node name", WithNodes(nodes(node("worker-1", nil))), "worker-1"},
		{"no node reader: the node name", WithNodes(nil), "worker-1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newProvisioner(t, tc.nodes)
			pv, _, err := p.Provision(context.Background(), options(class(nil), claim(v1.ReadWriteOncePod), "worker-1"))
			if err != nil {
				t.Fatal(err)
			}
			checkAffinity(t, pv, tc.want)
		})
	}
}

// TestProvisionReadOnly: a claim that only reads is the image itself, on
// any node, and needs no selected node.
func TestProvisionReadOnly(t *testing.T) {
	p := newProvisioner(t)
	pv, state, err := p.Provision(context.Background(), options(class(nil), claim(v1.ReadOnlyMany), ""))
	if err != nil || state != controller.ProvisioningFinished {
		t.Fatalf("Provision: %v (%s)", err, state)
	}
	if pv.Spec.NodeAffinity != nil {
		t.Errorf("nodeAffinity %+v, want none: the image is on every node", pv.Spec.NodeAffinity)
	}
	if want := map[string]string{"image": image}; !maps.Equal(pv.Spec.CSI.VolumeAttributes, want) {
		t.Errorf("volumeAttributes %v, want %v", pv.Spec.CSI.VolumeAttributes, want)
	}
}

// TestProvisionAllowedTopologies: without a selected node (Immediate
// binding), the class's allowedTopologies place the clone; a selected node
// outside them is refused.
func TestProvisionAllowedTopologies(t *testing.T) {
	p := newProvisioner(t, WithNodes(nodes(node("worker-1", map[string]string{driver.TopologyKey: "n1"}))))
	sc := class(nil)
	immediate := storagev1.VolumeBindingImmediate
	sc.VolumeBindingMode = &immediate
	sc.AllowedTopologies = []v1.TopologySelectorTerm{{MatchLabelExpressions: []v1.TopologySelectorLabelRequirement{
		{Key: driver.TopologyKey, Values: []string{"n2", "n3"}},
	}}}
	pv, _, err := p.Provision(context.Background(), options(sc, claim(v1.ReadWriteMany), ""))
	if err != nil {
		t.Fatal(err)
	}
	checkAffinity(t, pv, "n2")

	_, state, err := p.Provision(context.Background(), options(sc, claim(v1.ReadWriteOnce), "worker-1"))
	if status.Code(err) != codes.InvalidArgument || state != controller.ProvisioningFinished || !strings.Contains(err.Error(), "allowedTopologies") {
		t.Errorf("selected node outside allowedTopologies: %v (%s), want a final InvalidArgument naming allowedTopologies", err, state)
	}
}

// TestProvisionImmediateOnDriverNodes: a writable claim of a class that
// binds at once, without allowedTopologies, becomes a clone on one of the
// nodes whose CSINode registers the driver (its topology label, else its
// name), chosen by the claim's UID; a node without the driver is never
// chosen, and without any such node the claim is refused as before.
func TestProvisionImmediateOnDriverNodes(t *testing.T) {
	csiNode := func(name string, drivers ...string) *storagev1.CSINode {
		cn := &storagev1.CSINode{ObjectMeta: metav1.ObjectMeta{Name: name}}
		for _, d := range drivers {
			cn.Spec.Drivers = append(cn.Spec.Drivers, storagev1.CSINodeDriver{Name: d, NodeID: name})
		}
		return cn
	}
	kube := fake.NewClientset(
		node("worker-1", map[string]string{driver.TopologyKey: "n1"}), node("worker-2", nil), node("worker-3", nil),
		csiNode("worker-1", driver.DefaultName), csiNode("worker-2", "other.csi.dev", driver.DefaultName), csiNode("worker-3", "other.csi.dev"),
	)
	p := newProvisioner(t, WithDriverNodes(DriverNodesFrom(kube, driver.DefaultName, driver.TopologyKey)))
	sc := class(nil)
	immediate := storagev1.VolumeBindingImmediate
	sc.VolumeBindingMode = &immediate
	seen := map[string]bool{}
	for i := range 16 {
		pvc := claim(v1.ReadWriteOnce)
		pvc.UID = types.UID(fmt.Sprint("uid-", i))
		pv, _, err := p.Provision(context.Background(), options(sc, pvc, ""))
		if err != nil {
			t.Fatal(err)
		}
		value := pv.Spec.NodeAffinity.Required.NodeSelectorTerms[0].MatchExpressions[0].Values[0]
		checkAffinity(t, pv, value)
		again, _, err := p.Provision(context.Background(), options(sc, pvc, ""))
		if err != nil || again.Spec.NodeAffinity.Required.NodeSelectorTerms[0].MatchExpressions[0].Values[0] != value {
			t.Errorf("the same claim provisioned again lands elsewhere: %v", err)
		}
		seen[value] = true
	}
	if len(seen) != 2 || !seen["n1"] || !seen["worker-2"] {
		t.Errorf("clones landed on %v, want both nodes with the driver (n1 by its label, worker-2 by its name) and never worker-3", seen)
	}

	none := newProvisioner(t, WithDriverNodes(DriverNodesFrom(fake.NewClientset(), driver.DefaultName, driver.TopologyKey)))
	if _, _, err := none.Provision(context.Background(), options(sc, claim(v1.ReadWriteOnce), "")); status.Code(err) != codes.InvalidArgument {
		t.Errorf("no node runs the driver: %v, want InvalidArgument", err)
	}
}

// TestProvisionRefusals: claims that can never succeed fail for good, with a
// message that says what to change.
func TestProvisionRefusals(t *testing.T) {
	block := v1.PersistentVolumeBlock
	for _, tc := range []struct {
		name    string
		sc      *storagev1.StorageClass
		pvc     func() *v1.PersistentVolumeClaim
		node    string
		mention string
	}{
		{"writable without a node", class(nil), func() *v1.PersistentVolumeClaim { return claim(v1.ReadWriteOnce) }, "", "WaitForFirstConsumer"},
		{"block", class(nil), func() *v1.PersistentVolumeClaim {
			c := claim(v1.ReadWriteOnce)
			c.Spec.VolumeMode = &block
			return c
		}, "worker-1", "volumeMode: Filesystem"},
		{"snapshot data source", class(nil), func() *v1.PersistentVolumeClaim {
			c := claim(v1.ReadWriteOnce)
			c.Spec.DataSource = &v1.TypedLocalObjectReference{APIGroup: ptrTo("snapshot.storage.k8s.io"), Kind: "VolumeSnapshot", Name: "snap"}
			return c
		}, "worker-1", "snapshots"},
		{"claim data source without API access", class(nil), func() *v1.PersistentVolumeClaim {
			c := claim(v1.ReadWriteOnce)
			c.Spec.DataSource = &v1.TypedLocalObjectReference{Kind: "PersistentVolumeClaim", Name: "other"}
			return c
		}, "worker-1", "API access"},
		{"no image", &storagev1.StorageClass{ObjectMeta: metav1.ObjectMeta{Name: "x"}, Parameters: map[string]string{"pullPolicy": "Always"}},
			func() *v1.PersistentVolumeClaim { return claim(v1.ReadWriteOnce) }, "worker-1", "image"},
		{"unknown parameter", class(map[string]string{"pullpolicy": "Always"}), func() *v1.PersistentVolumeClaim { return claim(v1.ReadWriteOnce) }, "worker-1", "pullpolicy"},
		{"reserved parameter", class(map[string]string{"csi.storage.k8s.io/provisioner-secret-name": "s"}), func() *v1.PersistentVolumeClaim { return claim(v1.ReadWriteOnce) }, "worker-1", "provisioner-secret-name"},
		{"fsType", class(map[string]string{"csi.storage.k8s.io/fstype": "ext4"}), func() *v1.PersistentVolumeClaim { return claim(v1.ReadWriteOnce) }, "worker-1", "fsType"},
		{"RWOP with another mode", class(nil), func() *v1.PersistentVolumeClaim { return claim(v1.ReadWriteOncePod, v1.ReadWriteOnce) }, "worker-1", "ReadWriteOncePod"},
		{"no storage request", class(nil), func() *v1.PersistentVolumeClaim {
			c := claim(v1.ReadWriteOnce)
			c.Spec.Resources.Requests = nil
			return c
		}, "worker-1", "resources.requests.storage"},
		{"limit below request", class(nil), func() *v1.PersistentVolumeClaim {
			c := claim(v1.ReadWriteOnce)
			c.Spec.Resources.Limits = v1.ResourceList{v1.ResourceStorage: resource.MustParse("1Gi")}
			return c
		}, "worker-1", "limit"},
		{"secret name alone", class(map[string]string{paramSecretName: "pull"}), func() *v1.PersistentVolumeClaim { return claim(v1.ReadWriteOnce) }, "worker-1", paramSecretNS},
		{"secret namespace from the claim's name", class(map[string]string{paramSecretName: "pull", paramSecretNS: "${pvc.name}"}),
			func() *v1.PersistentVolumeClaim { return claim(v1.ReadWriteOnce) }, "worker-1", "${pvc.name}"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newProvisioner(t)
			pv, state, err := p.Provision(context.Background(), options(tc.sc, tc.pvc(), tc.node))
			if err == nil {
				t.Fatalf("Provision made %+v, want a refusal", pv)
			}
			if state != controller.ProvisioningFinished {
				t.Errorf("state %s, want Finished (a refusal is final): %v", state, err)
			}
			if !strings.Contains(err.Error(), tc.mention) {
				t.Errorf("error %q does not mention %q", err, tc.mention)
			}
		})
	}
}

// TestProvisionNodeLookup: a selected node that is gone asks the scheduler
// for another; an API error leaves the state unchanged for a retry.
func TestProvisionNodeLookup(t *testing.T) {
	p := newProvisioner(t, WithNodes(nodes()))
	_, state, err := p.Provision(context.Background(), options(class(nil), claim(v1.ReadWriteOnce), "gone"))
	if state != controller.ProvisioningReschedule || !errors.Is(err, errNodeGone) {
		t.Errorf("deleted node: %v (%s), want Reschedule", err, state)
	}
	p = newProvisioner(t, WithNodes(func(context.Context, string) (*v1.Node, error) {
		return nil, apierrors.NewServiceUnavailable("etcd is down")
	}))
	_, state, err = p.Provision(context.Background(), options(class(nil), claim(v1.ReadWriteOnce), "worker-1"))
	if state != controller.ProvisioningNoChange || err == nil || !strings.Contains(err.Error(), "worker-1") {
		t.Errorf("API unavailable: %v (%s), want NoChange and the node's name", err, state)
	}
}

// TestCreateVolumeRequest: the request csi-provisioner would send.
func TestCreateVolumeRequest(t *testing.T) {
	p := newProvisioner(t)
	sc := class(map[string]string{
		paramSecretName: "${pvc.name}-${pvc.annotations['team.example.com/secret']}",
		paramSecretNS:   "${pvc.namespace}",
	})
	sc.MountOptions = []string{"noatime"}
	pvc := claim(v1.ReadWriteMany, v1.ReadOnlyMany)
	pvc.Spec.Resources.Limits = v1.ResourceList{v1.ResourceStorage: resource.MustParse("3Gi")}
	req, secret, _, err := p.createVolumeRequest(context.Background(), options(sc, pvc, "worker-1"))
	if err != nil {
		t.Fatal(err)
	}
	if req.GetName() != "pvc-1234" {
		t.Errorf("name %q, want the PV name pvc-1234", req.GetName())
	}
	want := map[string]string{
		"image": image, "csi.storage.k8s.io/pvc/name": "data", "csi.storage.k8s.io/pvc/namespace": "team", "csi.storage.k8s.io/pv/name": "pvc-1234",
	}
	if !maps.Equal(req.GetParameters(), want) {
		t.Errorf("parameters %v, want %v (the secret keys consumed, the names added)", req.GetParameters(), want)
	}
	if secret == nil || secret.Name != "data-corp" || secret.Namespace != "team" {
		t.Errorf("node-publish secret %+v, want team/data-corp", secret)
	}
	if r := req.GetCapacityRange(); r.GetRequiredBytes() != 2<<30 || r.GetLimitBytes() != 3<<30 {
		t.Errorf("capacity range %v, want 2Gi..3Gi", r)
	}
	var modes []csi.VolumeCapability_AccessMode_Mode
	for _, c := range req.GetVolumeCapabilities() {
		if c.GetMount() == nil || !slices.Equal(c.GetMount().GetMountFlags(), []string{"noatime"}) || c.GetMount().GetFsType() != "" {
			t.Errorf("capability %v, want mount access with the class's mount options", c)
		}
		modes = append(modes, c.GetAccessMode().GetMode())
	}
	// The driver advertises SINGLE_NODE_MULTI_WRITER: one capability for
	// all the claim's modes, as csi-provisioner sends it (RWX and ROX:
	// MULTI_NODE_MULTI_WRITER).
	if want := []csi.VolumeCapability_AccessMode_Mode{csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER}; !slices.Equal(modes, want) {
		t.Errorf("access modes %v, want %v (one capability for all the claim's modes)", modes, want)
	}
	top := req.GetAccessibilityRequirements()
	if len(top.GetPreferred()) != 1 || top.GetPreferred()[0].GetSegments()[driver.TopologyKey] != "worker-1" ||
		len(top.GetRequisite()) != 1 || top.GetRequisite()[0].GetSegments()[driver.TopologyKey] != "worker-1" {
		t.Errorf("accessibility %v, want worker-1 preferred and requisite", top)
	}

	// The PV carries the secret reference for kubelet's NodeStageVolume
	// (where a clone pulls) and NodePublishVolume.
	pv, _, err := p.Provision(context.Background(), options(sc, pvc, "worker-1"))
	if err != nil {
		t.Fatal(err)
	}
	if ref := pv.Spec.CSI.NodePublishSecretRef; ref == nil || *ref != (v1.SecretReference{Name: "data-corp", Namespace: "team"}) {
		t.Errorf("PV nodePublishSecretRef %+v, want team/data-corp", ref)
	}
	if ref := pv.Spec.CSI.NodeStageSecretRef; ref == nil || *ref != (v1.SecretReference{Name: "data-corp", Namespace: "team"}) {
		t.Errorf("PV nodeStageSecretRef %+v, want team/data-corp", ref)
	}
}

// TestDelete: DeleteVolume for the driver's PVs, IgnoredError for others.
func TestDelete(t *testing.T) {
	p := newProvisioner(t)
	pv, _, err := p.Provision(context.Background(), options(class(nil), claim(v1.ReadWriteOnce), "worker-1"))
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Delete(context.Background(), pv); err != nil {
		t.Errorf("Delete of its own PV: %v", err)
	}
	var ignored *controller.IgnoredError
	other := pv.DeepCopy()
	other.Spec.CSI.Driver = "other.csi.dev"
	if err := p.Delete(context.Background(), other); !errors.As(err, &ignored) {
		t.Errorf("Delete of another driver's PV: %v, want IgnoredError", err)
	}
	hostPath := &v1.PersistentVolume{ObjectMeta: metav1.ObjectMeta{Name: "local"}, Spec: v1.PersistentVolumeSpec{
		PersistentVolumeSource: v1.PersistentVolumeSource{HostPath: &v1.HostPathVolumeSource{Path: "/data"}},
	}}
	if err := p.Delete(context.Background(), hostPath); !errors.As(err, &ignored) {
		t.Errorf("Delete of a hostPath PV: %v, want IgnoredError", err)
	}
	noHandle := pv.DeepCopy()
	noHandle.Spec.CSI.VolumeHandle = ""
	if err := p.Delete(context.Background(), noHandle); err == nil || errors.As(err, &ignored) {
		t.Errorf("Delete without a volumeHandle: %v, want an error", err)
	}
}

// TestProvisioningState: which CreateVolume errors the library must retry
// until a final answer comes.
func TestProvisioningState(t *testing.T) {
	for _, tc := range []struct {
		err      error
		selected bool
		want     controller.ProvisioningState
	}{
		{status.Error(codes.InvalidArgument, "bad"), true, controller.ProvisioningFinished},
		{status.Error(codes.NotFound, "no image"), true, controller.ProvisioningFinished},
		{status.Error(codes.AlreadyExists, "other args"), true, controller.ProvisioningFinished},
		{status.Error(codes.Unavailable, "down"), true, controller.ProvisioningInBackground},
		{status.Error(codes.DeadlineExceeded, "slow"), true, controller.ProvisioningInBackground},
		{status.Error(codes.Aborted, "busy"), true, controller.ProvisioningInBackground},
		{status.Error(codes.Canceled, "stop"), true, controller.ProvisioningInBackground},
		{status.Error(codes.ResourceExhausted, "full"), true, controller.ProvisioningReschedule},
		{status.Error(codes.ResourceExhausted, "full"), false, controller.ProvisioningInBackground},
		{context.DeadlineExceeded, true, controller.ProvisioningInBackground},
		{errors.New("plain"), true, controller.ProvisioningFinished},
	} {
		if got := provisioningState(tc.err, tc.selected); got != tc.want {
			t.Errorf("provisioningState(%v, selected %v) = %s, want %s", tc.err, tc.selected, got, tc.want)
		}
	}
}

// TestLeaseName: csi-provisioner's lease name for the driver.
func TestLeaseName(t *testing.T) {
	if got := LeaseName("strata.csi.dev"); got != "strata-csi-dev" {
		t.Errorf("LeaseName = %q, want strata-csi-dev", got)
	}
}

// TestNew refuses an incomplete configuration.
func TestNew(t *testing.T) {
	if _, err := New("", driver.TopologyKey, newDriver(t)); err == nil {
		t.Error("New without a driver name succeeded")
	}
	if _, err := New(driver.DefaultName, "", newDriver(t)); err == nil {
		t.Error("New without a topology key succeeded")
	}
	if _, err := New(driver.DefaultName, driver.TopologyKey, nil); err == nil {
		t.Error("New without a controller service succeeded")
	}
}
