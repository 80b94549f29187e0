package driver

import (
	"context"
	"strconv"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/strata-csi/strata/driver/clones"
	"github.com/strata-csi/strata/driver/engine"
)

// createReq is a CreateVolume request as the provisioner sends it.
func createReq(name string, mode csi.VolumeCapability_AccessMode_Mode, required, limit int64, req *csi.TopologyRequirement) *csi.CreateVolumeRequest {
	return &csi.CreateVolumeRequest{
		Name: name, Parameters: map[string]string{"image": "r/x:v1", "csi.storage.k8s.io/pvc/name": "data"},
		CapacityRange:             &csi.CapacityRange{RequiredBytes: required, LimitBytes: limit},
		VolumeCapabilities:        []*csi.VolumeCapability{mountCap(mode)},
		AccessibilityRequirements: req,
	}
}

func nodeTopology(node string) *csi.Topology {
	return &csi.Topology{Segments: map[string]string{TopologyKey: node}}
}

func TestCreateVolumeClone(t *testing.T) {
	ctx := context.Background()
	d, err := New(Config{Mode: ModeController})
	if err != nil {
		t.Fatal(err)
	}
	rwo := csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER
	both := &csi.TopologyRequirement{Requisite: []*csi.Topology{nodeTopology("n1"), nodeTopology("n2")}, Preferred: []*csi.Topology{nodeTopology("n2")}}
	resp, err := d.CreateVolume(ctx, createReq("pvc-a", rwo, 5<<20, 0, both))
	if err != nil {
		t.Fatal(err)
	}
	v := resp.Volume
	if len(v.AccessibleTopology) != 1 || v.AccessibleTopology[0].Segments[TopologyKey] != "n2" || len(v.AccessibleTopology[0].Segments) != 1 {
		t.Errorf("topology %v, want only %s=n2 (the preferred node)", v.AccessibleTopology, TopologyKey)
	}
	if v.VolumeContext[engine.AttrClone] != "true" || v.VolumeContext[engine.AttrCapacity] != strconv.Itoa(5<<20) || v.CapacityBytes != 5<<20 {
		t.Errorf("volume context %v, capacity %d: want a clone of 5 MiB", v.VolumeContext, v.CapacityBytes)
	}
	if _, err := engine.ParseAttributes(v.VolumeContext); err != nil {
		t.Errorf("the node cannot parse the clone's context: %v", err)
	}
	again, err := d.CreateVolume(ctx, createReq("pvc-a", rwo, 5<<20, 0, both))
	if err != nil || again.Volume.VolumeId != v.VolumeId {
		t.Errorf("repeated CreateVolume = %v, %v; want the same volume %s", again, err, v.VolumeId)
	}
	other := &csi.TopologyRequirement{Requisite: []*csi.Topology{nodeTopology("n1")}}
	if _, err := d.CreateVolume(ctx, createReq("pvc-a", rwo, 5<<20, 0, other)); status.Code(toStatus(err)) != codes.AlreadyExists {
		t.Errorf("same name on another node: %v, want AlreadyExists", err)
	}

	// Requisite only; no size: the default, clamped to the limit.
	for _, tc := range []struct {
		limit, want int64
	}{{0, clones.DefaultCapacity}, {100 << 20, 100 << 20}, {4 << 30, clones.DefaultCapacity}} {
		resp, err := d.CreateVolume(ctx, createReq("pvc-limit-"+strconv.FormatInt(tc.limit, 10), rwo, 0, tc.limit, other))
		if err != nil {
			t.Fatal(err)
		}
		if resp.Volume.CapacityBytes != tc.want || resp.Volume.AccessibleTopology[0].Segments[TopologyKey] != "n1" {
			t.Errorf("limit %d: capacity %d on %v, want %d on n1", tc.limit, resp.Volume.CapacityBytes, resp.Volume.AccessibleTopology, tc.want)
		}
	}

	// Read-only: the image itself, anywhere.
	rox, err := d.CreateVolume(ctx, createReq("pvc-rox", csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY, 0, 0, other))
	if err != nil {
		t.Fatal(err)
	}
	if rox.Volume.AccessibleTopology != nil || rox.Volume.VolumeContext[engine.AttrClone] != "" {
		t.Errorf("ReadOnlyMany volume: topology %v, context %v; want neither a node nor a clone", rox.Volume.AccessibleTopology, rox.Volume.VolumeContext)
	}

	// A writable volume without a node, from a controller alone.
	_, err = d.CreateVolume(ctx, createReq("pvc-nowhere", rwo, 0, 0, nil))
	if status.Code(toStatus(err)) != codes.InvalidArgument || !strings.Contains(err.Error(), "WaitForFirstConsumer") {
		t.Errorf("writable volume without a topology requirement: %v, want InvalidArgument naming WaitForFirstConsumer", err)
	}
	noKey := &csi.TopologyRequirement{Requisite: []*csi.Topology{{Segments: map[string]string{"zone": "a"}}}}
	if _, err := d.CreateVolume(ctx, createReq("pvc-zone", rwo, 0, 0, noKey)); status.Code(toStatus(err)) != codes.InvalidArgument {
		t.Errorf("requirement without the node key: %v, want InvalidArgument", err)
	}
	reserved := createReq("pvc-reserved", rwo, 0, 0, other)
	reserved.Parameters[engine.AttrClone] = "true"
	if _, err := d.CreateVolume(ctx, reserved); status.Code(toStatus(err)) != codes.InvalidArgument {
		t.Errorf("StorageClass setting %s: %v, want InvalidArgument", engine.AttrClone, err)
	}
}

// TestCreateVolumeCloneAllMode: a plugin that is also the node places a
// clone without a requirement on itself (csi-sanity, single machines).
func TestCreateVolumeCloneAllMode(t *testing.T) {
	d, err := New(Config{Mode: ModeAll, NodeID: "solo", Root: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	resp, err := d.CreateVolume(context.Background(), createReq("pvc-1", csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, 0, 0, nil))
	if err != nil {
		t.Fatal(err)
	}
	if top := resp.Volume.AccessibleTopology; len(top) != 1 || top[0].Segments[TopologyKey] != "solo" {
		t.Errorf("topology %v, want %s=solo", top, TopologyKey)
	}
	info, err := d.NodeGetInfo(context.Background(), &csi.NodeGetInfoRequest{})
	if err != nil || info.AccessibleTopology.GetSegments()[TopologyKey] != "solo" {
		t.Errorf("NodeGetInfo = %v, %v; want topology %s=solo", info, err, TopologyKey)
	}
}
