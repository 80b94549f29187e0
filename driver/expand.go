package driver

import (
	"context"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/engine"
)

// ControllerExpandVolume answers the new size of a clone, which its node
// grows (node_expansion_required: the controller cannot reach the node's
// disk; NodeExpandVolume grows the clone's filesystem and refuses a
// shrink). A volume that is the image itself (a read-only capability, or a
// volume this controller created without a clone) has no size to grow:
// OutOfRange, as the CSI spec answers a capacity range the volume cannot
// take.
func (d *Driver) ControllerExpandVolume(_ context.Context, req *csi.ControllerExpandVolumeRequest) (*csi.ControllerExpandVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, invalid("ControllerExpandVolume: volume id is required")
	}
	if r := req.GetCapacityRange(); r.GetRequiredBytes() <= 0 && r.GetLimitBytes() <= 0 {
		return nil, invalid("ControllerExpandVolume %s: a capacity range with required or limit bytes is required", id)
	}
	size, err := rangeSize("ControllerExpandVolume", id, req.GetCapacityRange())
	if err != nil {
		return nil, err
	}
	if c := req.GetVolumeCapability(); c != nil {
		if err := checkCapability(c); err != nil {
			return nil, err
		}
	}
	clone := req.GetVolumeCapability() == nil || !readOnlyMode(req.GetVolumeCapability())
	c := &d.controller
	c.mu.Lock()
	for _, v := range c.volumes {
		if v.id == id && v.params[engine.AttrClone] != "true" {
			clone = false
		}
	}
	c.mu.Unlock()
	if !clone {
		return nil, outOfRange("ControllerExpandVolume %s: the volume is the image itself (read-only), not a persistent clone: it has no capacity to grow", id)
	}
	klog.InfoS("Expanding a persistent clone: its node grows it", "volumeID", id, "capacityBytes", size)
	return &csi.ControllerExpandVolumeResponse{CapacityBytes: size, NodeExpansionRequired: true}, nil
}

// NodeExpandVolume grows a staged clone's filesystem online to the
// requested size and records it (package clones, Expand): the pods see the
// new size at once. A repeated call with the same size changes nothing; a
// smaller size is OutOfRange, a size the node's disk cannot hold
// ResourceExhausted, a volume that is the image itself OutOfRange, a volume
// unknown on this node NotFound.
func (d *Driver) NodeExpandVolume(ctx context.Context, req *csi.NodeExpandVolumeRequest) (*csi.NodeExpandVolumeResponse, error) {
	volID, p := req.GetVolumeId(), req.GetVolumePath()
	if volID == "" {
		return nil, invalid("NodeExpandVolume: volume id is required")
	}
	if p == "" {
		return nil, invalid("NodeExpandVolume %s: volume path is required", volID)
	}
	if c := req.GetVolumeCapability(); c != nil {
		if err := checkCapability(c); err != nil {
			return nil, err
		}
	}
	size, err := rangeSize("NodeExpandVolume", volID, req.GetCapacityRange())
	if err != nil {
		return nil, err
	}
	unlock, err := d.locks.TryLock(engine.CloneLock(volID), "volume "+volID)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if size == 0 {
		// No size asked for: report the clone's own.
		size, err = d.clones.Capacity(volID)
		if err != nil {
			return nil, err
		}
	}
	capacity, err := d.clones.Expand(klog.NewContext(ctx, klog.FromContext(ctx).WithValues("volumeID", volID, "targetPath", p)), volID, size)
	if err != nil {
		return nil, err
	}
	return &csi.NodeExpandVolumeResponse{CapacityBytes: capacity}, nil
}

// rangeSize is the size a capacity range of an expansion asks for: its
// required bytes, else its limit; 0 when it gives neither. A negative bound,
// or required above limit, is InvalidArgument.
func rangeSize(call, id string, r *csi.CapacityRange) (int64, error) {
	required, limit := r.GetRequiredBytes(), r.GetLimitBytes()
	if required < 0 || limit < 0 || (limit > 0 && required > limit) {
		return 0, invalid("%s %s: capacity range required %d, limit %d: both must be positive and required at most limit", call, id, required, limit)
	}
	if required == 0 {
		return limit, nil
	}
	return required, nil
}
