package csitest

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/strata-csi/strata/driver/clonefs"
	"github.com/strata-csi/strata/test/testfs"
	"github.com/strata-csi/strata/test/testimage"
)

// TestGetCapacity: GetCapacity of the real plugin in --mode=all, whose
// state root is a filesystem of its own: for its node, the room a new
// clone has (the free space less the cache budget's remainder and what
// sparse clones may still grow into), falling as a clone is made and
// rising as it goes; for a node that is not its own, or a topology of
// another driver, 0.
func TestGetCapacity(t *testing.T) {
	t.Parallel()
	RequireRoot(t)
	disk := testfs.LoopExt4(t, 512)
	dir := t.TempDir()
	CleanupMounts(t, dir)
	CleanupMounts(t, disk)
	e := &env{t: t, dir: dir, root: filepath.Join(disk, "root")}
	if err := os.Mkdir(e.root, 0o700); err != nil {
		t.Fatal(err)
	}
	const cacheBudget = 64 << 20
	e.Plugin = Start(t, Options{Bin: pluginBin, Root: e.root, Mode: "all", Args: []string{"--cache-max-bytes=64Mi"}})

	caps, err := e.Controller.ControllerGetCapabilities(ctx(t), &csi.ControllerGetCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, c := range caps.Capabilities {
		found = found || c.GetRpc().GetType() == csi.ControllerServiceCapability_RPC_GET_CAPACITY
	}
	if !found {
		t.Fatalf("controller capabilities %v lack GET_CAPACITY", caps.Capabilities)
	}

	get := func(segments map[string]string) *csi.GetCapacityResponse {
		t.Helper()
		req := &csi.GetCapacityRequest{VolumeCapabilities: []*csi.VolumeCapability{mountCap(csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)},
			Parameters: map[string]string{"image": "example.com/x:v1"}}
		if segments != nil {
			req.AccessibleTopology = &csi.Topology{Segments: segments}
		}
		resp, err := e.Controller.GetCapacity(ctx(t), req)
		if err != nil {
			t.Fatalf("GetCapacity %v: %v", segments, err)
		}
		return resp
	}
	bavail := func() int64 {
		var st unix.Statfs_t
		if err := unix.Statfs(e.root, &st); err != nil {
			t.Fatal(err)
		}
		return int64(st.Bavail) * st.Bsize
	}
	mine := map[string]string{topologyKey: "test-node"}

	free := bavail()
	empty := get(mine)
	t.Logf("empty 512 MiB state root, %d bytes free, cache budget 64 MiB: capacity %d, maximum volume size %v",
		free, empty.AvailableCapacity, empty.MaximumVolumeSize)
	if want := free - cacheBudget; empty.AvailableCapacity > want || empty.AvailableCapacity < want-(2<<20) {
		t.Errorf("capacity of an empty node %d, want its free %d less the cache budget %d (%d)", empty.AvailableCapacity, free, cacheBudget, want)
	}
	maxSize := empty.GetMaximumVolumeSize().GetValue()
	if maxSize <= 0 || clonefs.ImageBytes(maxSize) > empty.AvailableCapacity || clonefs.ImageBytes(maxSize+(1<<20)) <= empty.AvailableCapacity {
		t.Errorf("maximum volume size %d: want the largest clone whose filesystem (%d bytes) fits in %d",
			maxSize, clonefs.ImageBytes(maxSize), empty.AvailableCapacity)
	}
	if got := get(nil); abs(got.AvailableCapacity-empty.AvailableCapacity) > 1<<20 {
		t.Errorf("GetCapacity without a topology: %d, want this node's %d", got.AvailableCapacity, empty.AvailableCapacity)
	}
	for _, seg := range []map[string]string{{topologyKey: "other-node"}, {"topology.kubernetes.io/zone": "z1"}} {
		if got := get(seg); got.AvailableCapacity != 0 || got.GetMaximumVolumeSize().GetValue() != 0 {
			t.Errorf("GetCapacity of %v: %d (maximum %v), want 0: no storage of this node is there", seg, got.AvailableCapacity, got.MaximumVolumeSize)
		}
	}

	// A clone of 100 MiB takes its whole filesystem of the room, though
	// its sparse image holds almost nothing yet.
	reg := testimage.Registry(t)
	ref := reg + "/capacity/base:v1"
	pushBase(t, ref, "v1")
	const size = 100 << 20
	vol := e.createClone("pvc-room", ref, size)
	staging, target := e.stageAndPublish(vol, "room")
	withClone := get(mine)
	t.Logf("with a staged clone of 100 MiB (image %d bytes): capacity %d", clonefs.ImageBytes(size), withClone.AvailableCapacity)
	if d := empty.AvailableCapacity - withClone.AvailableCapacity; d < size || d > clonefs.ImageBytes(size)+(4<<20) {
		t.Errorf("a clone of %d bytes took %d of the capacity, want about its filesystem's %d", size, d, clonefs.ImageBytes(size))
	}
	// Its writes do not change the room: they were reserved.
	writeFile(t, filepath.Join(target, "data", "written"), string(make([]byte, 20<<20)))
	unix.Sync()
	if got := get(mine); abs(got.AvailableCapacity-withClone.AvailableCapacity) > 2<<20 {
		t.Errorf("20 MiB written into the clone moved the capacity from %d to %d, want it unchanged", withClone.AvailableCapacity, got.AvailableCapacity)
	}

	e.unpublishAndUnstage(vol.VolumeId, staging, target)
	// The kernel detaches an autoclear loop device asynchronously (since
	// Linux 5.17) after the last unmount: until it has, the clone is still
	// in use, and DeleteVolume refuses it; the CO retries, and so does this.
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := e.Controller.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: vol.VolumeId})
		if err == nil {
			break
		}
		if status.Code(err) != codes.FailedPrecondition || time.Now().After(deadline) {
			t.Fatalf("DeleteVolume of an unstaged clone: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// The clone's room is back; the image's layers stay cached, within
	// the budget that was reserved for them.
	if got := get(mine); abs(got.AvailableCapacity-empty.AvailableCapacity) > 2<<20 {
		t.Errorf("after the clone was deleted: capacity %d, want the empty node's %d again", got.AvailableCapacity, empty.AvailableCapacity)
	}
}

func abs(n int64) int64 {
	if n < 0 {
		return -n
	}
	return n
}
