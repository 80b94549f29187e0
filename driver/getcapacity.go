package driver

import (
	"context"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/strata-csi/strata/driver/capacity"
)

// GetCapacity reports the room a new clone has on the node that the
// request's topology names (TopologyKey): the numbers that node publishes
// in its CSIStorageCapacity objects (package capacity; docs/clones.md has
// the rule). A plugin that serves the node (--mode=all) measures its own
// node; the controller reads the other nodes' objects. A node that
// published none, and a topology that names no Strata node, have no room
// for a Strata volume: 0, as the CSI spec wants for storage that cannot
// provision in that topology. Without a topology the answer is this
// node's room when the plugin serves one, else the sum of all the nodes'
// rooms and the largest clone any of them can take.
//
// The parameters and capabilities do not change the answer: a read-only
// volume is the image, which takes no room of its own, but the room is
// the same for every class.
func (d *Driver) GetCapacity(_ context.Context, req *csi.GetCapacityRequest) (*csi.GetCapacityResponse, error) {
	node := ""
	if top := req.GetAccessibleTopology(); top != nil {
		n, ok := top.GetSegments()[TopologyKey]
		if !ok {
			return &csi.GetCapacityResponse{}, nil
		}
		node = n
	}
	if d.clones != nil && (node == "" || node == d.cfg.NodeID) {
		room, err := d.measureRoom()
		if err != nil {
			return nil, err
		}
		return roomResponse(room), nil
	}
	if d.capReader == nil {
		// No API access, or no --capacity-namespace: no other node's
		// room is known.
		return &csi.GetCapacityResponse{}, nil
	}
	if node != "" {
		room, _, err := d.capReader.Node(node)
		if err != nil {
			return nil, err
		}
		return roomResponse(room), nil
	}
	rooms, err := d.capReader.Nodes()
	if err != nil {
		return nil, err
	}
	var sum capacity.Room
	for _, r := range rooms {
		sum.Capacity += r.Capacity
		sum.MaximumVolumeSize = max(sum.MaximumVolumeSize, r.MaximumVolumeSize)
	}
	return roomResponse(sum), nil
}

// roomResponse is the GetCapacity answer of a room.
func roomResponse(r capacity.Room) *csi.GetCapacityResponse {
	return &csi.GetCapacityResponse{AvailableCapacity: r.Capacity, MaximumVolumeSize: wrapperspb.Int64(r.MaximumVolumeSize)}
}
