package csitest

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"

	"github.com/strata-csi/strata/test/testimage"
	"github.com/strata-csi/strata/test/vmtest"
)

// TestCloneExpand grows a staged and published clone through the real
// plugin over gRPC: ControllerExpandVolume answers the size and asks for the
// node's expansion, NodeExpandVolume grows the clone under the pod's mount
// (statfs of the target, what df shows, has the new size at once), a
// repeated call changes nothing, a shrink is OutOfRange, the image itself
// has no size to grow, and the grown clone stages again with its data.
func TestCloneExpand(t *testing.T) {
	if vmtest.GrowElsewhere(t, true) { // growing a mounted ext4 needs CAP_SYS_RESOURCE
		return
	}
	t.Parallel()
	e := newAllEnv(t)
	reg := testimage.Registry(t)
	ref := reg + "/clone/expand:v1"
	pushBase(t, ref, "v1")
	const from, to = 32 << 20, 96 << 20
	vol := e.createClone("pvc-grow", ref, from)
	staging, target := e.stageAndPublish(vol, "grow")
	writeFile(t, filepath.Join(target, "before.txt"), "written before the grow\n")
	room := func() int64 {
		var st unix.Statfs_t
		if err := unix.Statfs(target, &st); err != nil {
			t.Fatal(err)
		}
		return int64(st.Blocks) * st.Bsize
	}
	before := room()

	caps, err := e.Node.NodeGetCapabilities(ctx(t), &csi.NodeGetCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(caps.String(), "EXPAND_VOLUME") {
		t.Errorf("NodeGetCapabilities %v: no EXPAND_VOLUME", caps)
	}

	cresp, err := e.Controller.ControllerExpandVolume(ctx(t), &csi.ControllerExpandVolumeRequest{
		VolumeId: vol.VolumeId, CapacityRange: &csi.CapacityRange{RequiredBytes: to},
		VolumeCapability: mountCap(csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER),
	})
	if err != nil {
		t.Fatalf("ControllerExpandVolume: %v", err)
	}
	if cresp.CapacityBytes != to || !cresp.NodeExpansionRequired {
		t.Fatalf("ControllerExpandVolume = %v, want %d bytes and node_expansion_required", cresp, to)
	}

	expand := func(size int64) (*csi.NodeExpandVolumeResponse, error) {
		return e.Node.NodeExpandVolume(ctx(t), &csi.NodeExpandVolumeRequest{
			VolumeId: vol.VolumeId, VolumePath: target, StagingTargetPath: staging,
			CapacityRange:    &csi.CapacityRange{RequiredBytes: size},
			VolumeCapability: mountCap(csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER),
		})
	}
	resp, err := expand(to)
	if err != nil {
		t.Fatalf("NodeExpandVolume to %d: %v", to, err)
	}
	if resp.CapacityBytes != to {
		t.Errorf("NodeExpandVolume answered %d bytes, want %d", resp.CapacityBytes, to)
	}
	after := room()
	t.Logf("df size of the target: %d -> %d bytes", before, after)
	if after < to {
		t.Fatalf("after NodeExpandVolume the target's filesystem is %d bytes, want >= %d", after, to)
	}
	// The pod writes into the new room.
	big := make([]byte, to-from)
	if err := os.WriteFile(filepath.Join(target, "after.bin"), big, 0o644); err != nil {
		t.Fatalf("write %d bytes into the grown clone: %v", len(big), err)
	}
	if b, err := os.ReadFile(filepath.Join(target, "before.txt")); err != nil || string(b) != "written before the grow\n" {
		t.Errorf("file written before the grow: %q, %v", b, err)
	}

	// Idempotent.
	img := filepath.Join(e.cloneDir(vol.VolumeId), "disk.img")
	fi1, _ := os.Stat(img)
	if _, err := expand(to); err != nil {
		t.Fatalf("repeated NodeExpandVolume: %v", err)
	}
	if fi2, _ := os.Stat(img); fi2.Size() != fi1.Size() || room() != after {
		t.Errorf("a repeated NodeExpandVolume changed the clone: image %d -> %d bytes", fi1.Size(), fi2.Size())
	}
	// A shrink is refused, and changes nothing.
	_, err = expand(from)
	wantCode(t, err, codes.OutOfRange, "cannot shrink")
	if room() != after {
		t.Errorf("a refused shrink changed the clone's size")
	}
	// The image itself has nothing to grow.
	_, err = e.Controller.ControllerExpandVolume(ctx(t), &csi.ControllerExpandVolumeRequest{
		VolumeId: vol.VolumeId, CapacityRange: &csi.CapacityRange{RequiredBytes: to},
		VolumeCapability: mountCap(csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY),
	})
	wantCode(t, err, codes.OutOfRange, "image itself")
	_, err = e.Node.NodeExpandVolume(ctx(t), &csi.NodeExpandVolumeRequest{VolumeId: "strata-unknown", VolumePath: target,
		CapacityRange: &csi.CapacityRange{RequiredBytes: to}})
	wantCode(t, err, codes.NotFound)

	// The grown clone stages again, at its new size, with its data.
	e.unpublishAndUnstage(vol.VolumeId, staging, target)
	vol.VolumeContext[attrCap] = "33554432" // the PV keeps its original context
	staging, target = e.stageAndPublish(vol, "grow-again")
	if got := room(); got != after {
		t.Errorf("after a new stage the clone's filesystem is %d bytes, want %d", got, after)
	}
	if b, err := os.ReadFile(filepath.Join(target, "before.txt")); err != nil || string(b) != "written before the grow\n" {
		t.Errorf("file written before the grow, after a new stage: %q, %v", b, err)
	}
	e.unpublishAndUnstage(vol.VolumeId, staging, target)
}
