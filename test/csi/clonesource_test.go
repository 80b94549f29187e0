package csitest

import (
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/strata-csi/strata/test/testimage"
)

const attrCloneOf = "strata.csi.dev/cloneOf"

// fromVolume makes req a clone of volume id (a claim whose dataSource is
// another claim, as the provisioner sends it).
func fromVolume(req *csi.CreateVolumeRequest, id string) *csi.CreateVolumeRequest {
	req.VolumeContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
		Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}}
	return req
}

// TestCloneOfClone: a clone created with another clone as its content
// source goes on the source's node, names its source in its context, and
// starts from the source's writes; the controller refuses a source that is
// missing, larger, of another image or not a clone, and a node that is not
// the source's. The controller finds the source after a restart too (its
// clone.json on this node).
func TestCloneOfClone(t *testing.T) {
	t.Parallel()
	e := newAllEnv(t)
	reg := testimage.Registry(t)
	ref := reg + "/clone/source:v1"
	pushBase(t, ref, "v1")
	rwo := csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER

	caps, err := e.Controller.ControllerGetCapabilities(ctx(t), &csi.ControllerGetCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var clone bool
	for _, c := range caps.Capabilities {
		clone = clone || c.GetRpc().GetType() == csi.ControllerServiceCapability_RPC_CLONE_VOLUME
	}
	if !clone {
		t.Errorf("controller capabilities %v lack CLONE_VOLUME", caps)
	}

	a := e.createClone("pvc-a", ref, 64<<20)
	stagingA, targetA := e.stageAndPublish(a, "pod-a")
	writeFile(t, filepath.Join(targetA, "data/new.txt"), "written in a\n")
	if err := os.Remove(filepath.Join(targetA, "data/gone.txt")); err != nil {
		t.Fatal(err)
	}

	resp, err := e.Controller.CreateVolume(ctx(t), fromVolume(createReq("pvc-b", ref, rwo, 128<<20, "test-node"), a.VolumeId))
	if err != nil {
		t.Fatalf("CreateVolume of a clone of %s: %v", a.VolumeId, err)
	}
	b := resp.Volume
	if b.VolumeContext[attrCloneOf] != a.VolumeId || b.VolumeContext[attrClone] != "true" || b.VolumeContext[attrCap] != strconv.Itoa(128<<20) ||
		b.VolumeContext["image"] != ref || b.CapacityBytes != 128<<20 {
		t.Errorf("clone's context %v, capacity %d: want a 128 MiB clone of %s with %s=%s", b.VolumeContext, b.CapacityBytes, ref, attrCloneOf, a.VolumeId)
	}
	if len(b.AccessibleTopology) != 1 || b.AccessibleTopology[0].Segments[topologyKey] != "test-node" {
		t.Errorf("clone's topology %v, want exactly the source's node %s=test-node", b.AccessibleTopology, topologyKey)
	}
	if b.GetContentSource().GetVolume().GetVolumeId() != a.VolumeId {
		t.Errorf("response's content source %v, want volume %s", b.GetContentSource(), a.VolumeId)
	}
	again, err := e.Controller.CreateVolume(ctx(t), fromVolume(createReq("pvc-b", ref, rwo, 128<<20, "test-node"), a.VolumeId))
	if err != nil || again.Volume.VolumeId != b.VolumeId {
		t.Errorf("repeated CreateVolume: %v, %v; want volume %s", again, err, b.VolumeId)
	}

	rox, err := e.Controller.CreateVolume(ctx(t), createReq("pvc-rox", ref, csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY, 0, ""))
	if err != nil {
		t.Fatal(err)
	}
	otherImage := createReq("pvc-c", reg+"/clone/other:v1", rwo, 64<<20, "test-node")
	snapshot := createReq("pvc-c", ref, rwo, 64<<20, "test-node")
	snapshot.VolumeContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
		Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: "snap-1"}}}
	for _, tc := range []struct {
		name  string
		req   *csi.CreateVolumeRequest
		code  codes.Code
		words []string
	}{
		{"missing source", fromVolume(createReq("pvc-c", ref, rwo, 64<<20, "test-node"), "strata-0000"), codes.NotFound, []string{"strata-0000"}},
		{"smaller than the source", fromVolume(createReq("pvc-c", ref, rwo, 32<<20, "test-node"), a.VolumeId), codes.OutOfRange, []string{a.VolumeId}},
		{"other image", fromVolume(otherImage, a.VolumeId), codes.InvalidArgument, []string{"same image"}},
		{"source is the image itself", fromVolume(createReq("pvc-c", ref, rwo, 64<<20, "test-node"), rox.Volume.VolumeId), codes.InvalidArgument, []string{"no writes"}},
		{"other node", fromVolume(createReq("pvc-c", ref, rwo, 64<<20, "node-2"), a.VolumeId), codes.ResourceExhausted, []string{"test-node", "node-2"}},
		{"snapshot", snapshot, codes.InvalidArgument, []string{"snapshot"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := e.Controller.CreateVolume(ctx(t), tc.req)
			wantCode(t, err, tc.code, tc.words...)
		})
	}
	if exists(e.cloneDir(b.VolumeId)) {
		t.Errorf("CreateVolume made %s: the node makes a clone at its first stage", e.cloneDir(b.VolumeId))
	}

	// A restarted controller has forgotten A, and finds it on its node
	// (its clone.json), A's pod still running.
	e.Plugin.Restart()
	c, err := e.Controller.CreateVolume(ctx(t), fromVolume(createReq("pvc-c", ref, rwo, 0, ""), a.VolumeId))
	if err != nil {
		t.Fatalf("CreateVolume of a clone of %s after a restart: %v", a.VolumeId, err)
	}
	if c.Volume.VolumeContext[attrCloneOf] != a.VolumeId || c.Volume.AccessibleTopology[0].Segments[topologyKey] != "test-node" {
		t.Errorf("after a restart: context %v, topology %v; want a clone of %s on test-node", c.Volume.VolumeContext, c.Volume.AccessibleTopology, a.VolumeId)
	}

	// The node side: B's first stage copies A's writes; A stays staged,
	// its pod still writing.
	stagingB, targetB := e.stageAndPublish(b, "pod-b")
	if got := readString(t, filepath.Join(targetB, "data/new.txt")); got != "written in a\n" {
		t.Errorf("clone b reads data/new.txt = %q, want a's write", got)
	}
	if exists(filepath.Join(targetB, "data/gone.txt")) {
		t.Errorf("clone b still has data/gone.txt, which a deleted")
	}
	if got := readString(t, filepath.Join(targetB, "data/base.txt")); got != "v1\n" {
		t.Errorf("clone b reads data/base.txt = %q, want the image's", got)
	}
	writeFile(t, filepath.Join(targetB, "data/b.txt"), "b\n")
	writeFile(t, filepath.Join(targetA, "data/a-later.txt"), "a\n")
	if exists(filepath.Join(targetA, "data/b.txt")) || exists(filepath.Join(targetB, "data/a-later.txt")) {
		t.Errorf("a and b share writes after the clone")
	}
	e.unpublishAndUnstage(b.VolumeId, stagingB, targetB)
	e.unpublishAndUnstage(a.VolumeId, stagingA, targetA)

	for _, id := range []string{c.Volume.VolumeId, b.VolumeId, a.VolumeId} {
		if _, err := e.Controller.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Errorf("DeleteVolume %s: %v", id, err)
		}
	}
}
