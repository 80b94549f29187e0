package driver

import (
	"context"
	"strconv"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	ggcr "github.com/google/go-containerregistry/pkg/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/strata-csi/strata/driver/engine"
	"github.com/strata-csi/strata/driver/state"
)

// fromVolume makes req a clone of volume id.
func fromVolume(req *csi.CreateVolumeRequest, id string) *csi.CreateVolumeRequest {
	req.VolumeContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
		Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}}
	return req
}

func onNodes(nodes ...string) *csi.TopologyRequirement {
	var t []*csi.Topology
	for _, n := range nodes {
		t = append(t, nodeTopology(n))
	}
	return &csi.TopologyRequirement{Requisite: t, Preferred: t}
}

// wantCode fails unless err has code and its message every word.
func wantCode(t *testing.T, what string, err error, code codes.Code, words ...string) {
	t.Helper()
	if got := status.Code(toStatus(err)); got != code {
		t.Errorf("%s: %v (%s), want %s", what, err, got, code)
		return
	}
	for _, w := range words {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("%s: %q does not name %q", what, err, w)
		}
	}
}

// TestCreateVolumeFromVolume: a CSI clone of a clone this controller made
// goes on the source's node, names its source in the context and the
// response, and is checked against the source.
func TestCreateVolumeFromVolume(t *testing.T) {
	ctx := context.Background()
	d, err := New(Config{Mode: ModeController})
	if err != nil {
		t.Fatal(err)
	}
	caps, err := d.ControllerGetCapabilities(ctx, &csi.ControllerGetCapabilitiesRequest{})
	if err != nil || !strings.Contains(caps.String(), "CLONE_VOLUME") {
		t.Errorf("capabilities %v, %v: want CLONE_VOLUME", caps, err)
	}
	rwo := csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER
	a, err := d.CreateVolume(ctx, createReq("pvc-a", rwo, 64<<20, 0, onNodes("n1")))
	if err != nil {
		t.Fatal(err)
	}
	srcID := a.Volume.VolumeId

	// The scheduler offers n1 and n2, preferring n2: the clone goes where
	// its source is.
	resp, err := d.CreateVolume(ctx, fromVolume(createReq("pvc-b", rwo, 128<<20, 0,
		&csi.TopologyRequirement{Requisite: []*csi.Topology{nodeTopology("n1"), nodeTopology("n2")}, Preferred: []*csi.Topology{nodeTopology("n2")}}), srcID))
	if err != nil {
		t.Fatal(err)
	}
	b := resp.Volume
	if b.VolumeContext[engine.AttrCloneOf] != srcID || b.VolumeContext[engine.AttrClone] != "true" || b.VolumeContext[engine.AttrCapacity] != strconv.Itoa(128<<20) {
		t.Errorf("context %v: want a clone of 128 MiB with %s=%s", b.VolumeContext, engine.AttrCloneOf, srcID)
	}
	if topologyNode(b.AccessibleTopology) != "n1" || len(b.AccessibleTopology) != 1 {
		t.Errorf("topology %v, want only the source's node n1", b.AccessibleTopology)
	}
	if b.GetContentSource().GetVolume().GetVolumeId() != srcID {
		t.Errorf("content source %v, want volume %s echoed", b.GetContentSource(), srcID)
	}
	if b.VolumeId == srcID {
		t.Errorf("the clone has its source's id %s", srcID)
	}
	attrs, err := engine.ParseAttributes(b.VolumeContext)
	if err != nil || attrs.CloneOf != srcID {
		t.Errorf("the node parses the context as %+v, %v: want CloneOf %s", attrs, err, srcID)
	}
	// Idempotent, source included.
	again, err := d.CreateVolume(ctx, fromVolume(createReq("pvc-b", rwo, 128<<20, 0, onNodes("n1")), srcID))
	if err != nil || again.Volume.VolumeId != b.VolumeId {
		t.Errorf("repeated CreateVolume: %v, %v; want volume %s", again, err, b.VolumeId)
	}
	other, err := d.CreateVolume(ctx, createReq("pvc-other", rwo, 64<<20, 0, onNodes("n1")))
	if err != nil {
		t.Fatal(err)
	}
	_, err = d.CreateVolume(ctx, fromVolume(createReq("pvc-b", rwo, 128<<20, 0, onNodes("n1")), other.Volume.VolumeId))
	wantCode(t, "same name, another source", err, codes.AlreadyExists)
	_, err = d.CreateVolume(ctx, createReq("pvc-b", rwo, 128<<20, 0, onNodes("n1")))
	wantCode(t, "same name, no source", err, codes.AlreadyExists)

	// No size asked for: the source's, when it exceeds the default.
	big, err := d.CreateVolume(ctx, createReq("pvc-big", rwo, 3<<30, 0, onNodes("n1")))
	if err != nil {
		t.Fatal(err)
	}
	sized, err := d.CreateVolume(ctx, fromVolume(createReq("pvc-sized", rwo, 0, 0, onNodes("n1")), big.Volume.VolumeId))
	if err != nil || sized.Volume.CapacityBytes != 3<<30 {
		t.Errorf("clone of a 3 GiB source without a size: %v, %v; want 3 GiB", sized, err)
	}

	rox, err := d.CreateVolume(ctx, createReq("pvc-rox", csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY, 0, 0, nil))
	if err != nil {
		t.Fatal(err)
	}
	otherImage := createReq("pvc-img", rwo, 64<<20, 0, onNodes("n1"))
	otherImage.Parameters["image"] = "r/y:v1"
	stacked := createReq("pvc-stack", rwo, 64<<20, 0, onNodes("n1"))
	stacked.Parameters["stackImages"] = "r/z:v1"
	snapshot := createReq("pvc-snap", rwo, 64<<20, 0, onNodes("n1"))
	snapshot.VolumeContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
		Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: "snap-1"}}}
	for _, tc := range []struct {
		name  string
		req   *csi.CreateVolumeRequest
		code  codes.Code
		words []string
	}{
		{"unknown source", fromVolume(createReq("pvc-c", rwo, 64<<20, 0, onNodes("n1")), "strata-nosuchvolume"), codes.NotFound, []string{"strata-nosuchvolume"}},
		{"empty source id", fromVolume(createReq("pvc-c", rwo, 64<<20, 0, onNodes("n1")), ""), codes.InvalidArgument, nil},
		{"read-only source", fromVolume(createReq("pvc-c", rwo, 64<<20, 0, onNodes("n1")), rox.Volume.VolumeId), codes.InvalidArgument, []string{"image itself"}},
		{"other image", fromVolume(otherImage, srcID), codes.InvalidArgument, []string{"r/y:v1", "r/x:v1"}},
		{"other stack", fromVolume(stacked, srcID), codes.InvalidArgument, []string{"r/z:v1"}},
		{"smaller than the source", fromVolume(createReq("pvc-c", rwo, 32<<20, 0, onNodes("n1")), srcID), codes.OutOfRange, []string{strconv.Itoa(64 << 20)}},
		{"limit below the source", fromVolume(createReq("pvc-c", rwo, 0, 1<<30, onNodes("n1")), big.Volume.VolumeId), codes.OutOfRange, nil},
		{"other node", fromVolume(createReq("pvc-c", rwo, 64<<20, 0, onNodes("n2")), srcID), codes.ResourceExhausted, []string{"n1", "n2"}},
		{"read-only clone", fromVolume(createReq("pvc-c", csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY, 0, 0, nil), srcID), codes.InvalidArgument, []string{"writable"}},
		{"snapshot", snapshot, codes.InvalidArgument, []string{"snapshot"}},
	} {
		_, err := d.CreateVolume(ctx, tc.req)
		wantCode(t, tc.name, err, tc.code, tc.words...)
	}

	// A deleted source is gone.
	if _, err := d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: other.Volume.VolumeId}); err != nil {
		t.Fatal(err)
	}
	_, err = d.CreateVolume(ctx, fromVolume(createReq("pvc-d", rwo, 64<<20, 0, onNodes("n1")), other.Volume.VolumeId))
	wantCode(t, "deleted source", err, codes.NotFound)
}

// TestCreateVolumeFromPersistentVolume: a controller that did not create
// the source (a restart, another replica) finds it as the
// PersistentVolume of this driver with that volumeHandle.
func TestCreateVolumeFromPersistentVolume(t *testing.T) {
	pv := func(name, handle string, attrs map[string]string, size string, node string) *v1.PersistentVolume {
		p := &v1.PersistentVolume{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: v1.PersistentVolumeSpec{
			Capacity: v1.ResourceList{v1.ResourceStorage: resource.MustParse(size)},
			PersistentVolumeSource: v1.PersistentVolumeSource{CSI: &v1.CSIPersistentVolumeSource{
				Driver: DefaultName, VolumeHandle: handle, VolumeAttributes: attrs}},
		}}
		if node != "" {
			p.Spec.NodeAffinity = &v1.VolumeNodeAffinity{Required: &v1.NodeSelector{NodeSelectorTerms: []v1.NodeSelectorTerm{{
				MatchExpressions: []v1.NodeSelectorRequirement{{Key: TopologyKey, Operator: v1.NodeSelectorOpIn, Values: []string{node}}}}}}}
		}
		return p
	}
	cloneAttrs := map[string]string{"image": "r/x:v1", engine.AttrClone: "true", engine.AttrCapacity: strconv.Itoa(64 << 20)}
	other := pv("pv-other", "strata-src", cloneAttrs, "64Mi", "n1")
	other.Spec.CSI.Driver = "other.csi.example.com"
	kube := fake.NewClientset(
		// Grown to 256Mi by an expansion: its PV says so, its context not.
		pv("pv-src", "strata-src", cloneAttrs, "256Mi", "n3"),
		other,
		pv("pv-nonode", "strata-nonode", cloneAttrs, "64Mi", ""),
	)
	d, err := New(Config{Mode: ModeController, Kube: kube})
	if err != nil {
		t.Fatal(err)
	}
	rwo := csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER
	resp, err := d.CreateVolume(context.Background(), fromVolume(createReq("pvc-b", rwo, 256<<20, 0, onNodes("n3")), "strata-src"))
	if err != nil {
		t.Fatal(err)
	}
	if topologyNode(resp.Volume.AccessibleTopology) != "n3" || resp.Volume.VolumeContext[engine.AttrCloneOf] != "strata-src" {
		t.Errorf("clone of a PV's volume: topology %v, context %v; want n3 and cloneOf strata-src", resp.Volume.AccessibleTopology, resp.Volume.VolumeContext)
	}
	_, err = d.CreateVolume(context.Background(), fromVolume(createReq("pvc-c", rwo, 128<<20, 0, onNodes("n3")), "strata-src"))
	wantCode(t, "smaller than the grown source", err, codes.OutOfRange, strconv.Itoa(256<<20))
	_, err = d.CreateVolume(context.Background(), fromVolume(createReq("pvc-d", rwo, 64<<20, 0, onNodes("n1")), "strata-nonode"))
	wantCode(t, "source without a node", err, codes.FailedPrecondition, "strata-nonode")
	_, err = d.CreateVolume(context.Background(), fromVolume(createReq("pvc-e", rwo, 64<<20, 0, onNodes("n1")), "strata-missing"))
	wantCode(t, "no such PV", err, codes.NotFound, "strata-missing")
}

// TestCreateVolumeFromNodeClone: in --mode=all, a clone on this node is a
// source even when this controller did not create it (a restart): its
// clone.json gives the stack and the size it has grown to.
func TestCreateVolumeFromNodeClone(t *testing.T) {
	root := t.TempDir()
	d, err := New(Config{Mode: ModeAll, NodeID: "solo", Root: root})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := state.WriteClone(root, &state.Clone{VolumeID: "strata-old", CapacityBytes: 200 << 20,
		Stack: []state.StackImage{{Image: "r/x:v1", Digest: ggcr.Hash{Algorithm: "sha256", Hex: strings.Repeat("a", 64)}}}}); err != nil {
		t.Fatal(err)
	}
	rwo := csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER
	resp, err := d.CreateVolume(context.Background(), fromVolume(createReq("pvc-b", rwo, 0, 0, nil), "strata-old"))
	if err != nil {
		t.Fatal(err)
	}
	v := resp.Volume
	if topologyNode(v.AccessibleTopology) != "solo" || v.VolumeContext[engine.AttrCloneOf] != "strata-old" || v.CapacityBytes != 1<<30 {
		t.Errorf("clone of a node clone: topology %v, context %v, capacity %d; want solo, cloneOf strata-old, the 1 GiB default", v.AccessibleTopology, v.VolumeContext, v.CapacityBytes)
	}
	_, err = d.CreateVolume(context.Background(), fromVolume(createReq("pvc-c", rwo, 100<<20, 0, nil), "strata-old"))
	wantCode(t, "smaller than the node's clone", err, codes.OutOfRange)
	for _, id := range []string{"strata-none", "../escape", "fake-vol-id-1"} {
		_, err = d.CreateVolume(context.Background(), fromVolume(createReq("pvc-"+strconv.Itoa(len(id)), rwo, 0, 0, nil), id))
		wantCode(t, "source "+id, err, codes.NotFound, id)
	}
}

// TestDeleteVolumeKeepsSourceOfUnmadeClone: in --mode=all DeleteVolume
// removes a clone's disk itself; a source whose clone is not made yet (its
// first stage copies the source) stays until that clone is made or
// deleted, or the clone would start from nothing.
func TestDeleteVolumeKeepsSourceOfUnmadeClone(t *testing.T) {
	root := t.TempDir()
	d, err := New(Config{Mode: ModeAll, NodeID: "solo", Root: root})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	ctx := context.Background()
	rwo := csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER
	digest := ggcr.Hash{Algorithm: "sha256", Hex: strings.Repeat("a", 64)}
	made := func(id string) {
		t.Helper()
		if err := state.WriteClone(root, &state.Clone{VolumeID: id, CapacityBytes: 64 << 20, Stack: []state.StackImage{{Image: "r/x:v1", Digest: digest}}}); err != nil {
			t.Fatal(err)
		}
	}
	a, err := d.CreateVolume(ctx, createReq("pvc-a", rwo, 64<<20, 0, nil))
	if err != nil {
		t.Fatal(err)
	}
	made(a.Volume.VolumeId) // staged once: its clone is on this node
	b, err := d.CreateVolume(ctx, fromVolume(createReq("pvc-b", rwo, 64<<20, 0, nil), a.Volume.VolumeId))
	if err != nil {
		t.Fatal(err)
	}
	_, err = d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: a.Volume.VolumeId})
	wantCode(t, "delete the source of an unmade clone", err, codes.FailedPrecondition, b.Volume.VolumeId)
	if c, err := state.ReadClone(root, a.Volume.VolumeId); err != nil || c == nil {
		t.Fatalf("the source's clone after a refused delete: %v, %v; want it kept", c, err)
	}
	made(b.Volume.VolumeId) // b's first stage copied a
	if _, err := d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: a.Volume.VolumeId}); err != nil {
		t.Errorf("delete the source once its clone is made: %v", err)
	}
	if c, _ := state.ReadClone(root, a.Volume.VolumeId); c != nil {
		t.Errorf("the source's clone is still on the node after DeleteVolume")
	}

	// A clone deleted before it was made releases its source too.
	c, err := d.CreateVolume(ctx, createReq("pvc-c", rwo, 64<<20, 0, nil))
	if err != nil {
		t.Fatal(err)
	}
	made(c.Volume.VolumeId)
	e, err := d.CreateVolume(ctx, fromVolume(createReq("pvc-e", rwo, 64<<20, 0, nil), c.Volume.VolumeId))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: e.Volume.VolumeId}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: c.Volume.VolumeId}); err != nil {
		t.Errorf("delete a source whose clone was deleted unmade: %v", err)
	}
}
