package csitest

import (
	"maps"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/strata-csi/strata/test/testimage"
)

// cloneOf is the volume the controller hands to the node for a claim cloned
// from src: src's context with cloneOf, under a new id.
func cloneOf(src *csi.Volume, id string) *csi.Volume {
	vctx := maps.Clone(src.VolumeContext)
	vctx[attrCloneOf] = src.VolumeId
	return &csi.Volume{VolumeId: id, CapacityBytes: src.CapacityBytes, VolumeContext: vctx}
}

// TestCloneOfClaim: through the real plugin over its socket, a volume whose
// context names a staged clone A (cloneOf) is staged with A's writes, and
// then goes its own way; a volume naming a clone that is not on the node is
// FailedPrecondition and leaves nothing behind.
func TestCloneOfClaim(t *testing.T) {
	t.Parallel()
	e := newAllEnv(t)
	ref := testimage.Registry(t) + "/clone/of:v1"
	pushBase(t, ref, "v1")
	a := e.createClone("pvc-a", ref, 64<<20)
	stagingA, targetA := e.stageAndPublish(a, "a")
	writeFile(t, filepath.Join(targetA, "data/a.txt"), "written in A\n")

	b := cloneOf(a, "strata-clone-of-a")
	stagingB, targetB := e.stageAndPublish(b, "b")
	if got := readString(t, filepath.Join(targetB, "data/a.txt")); got != "written in A\n" {
		t.Fatalf("B's a.txt = %q, want A's writes", got)
	}
	writeFile(t, filepath.Join(targetB, "data/b.txt"), "written in B\n")
	if exists(filepath.Join(targetA, "data/b.txt")) {
		t.Error("B's write shows in A")
	}
	e.unpublishAndUnstage(b.VolumeId, stagingB, targetB)
	e.unpublishAndUnstage(a.VolumeId, stagingA, targetA)

	missing := cloneOf(a, "strata-clone-of-none")
	missing.VolumeContext[attrCloneOf] = "strata-none"
	err := e.stage(missing, e.stagingPath("none"), csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)
	if status.Code(err) != codes.FailedPrecondition {
		t.Errorf("stage of a clone of a volume not on this node: %v, want FailedPrecondition", err)
	}
	if exists(e.cloneDir(missing.VolumeId)) {
		t.Errorf("a refused clone of a missing source left %s", e.cloneDir(missing.VolumeId))
	}
}
