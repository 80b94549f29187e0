package driver

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/clones"
	"github.com/strata-csi/strata/driver/engine"
	"github.com/strata-csi/strata/driver/state"
)

// controllerState remembers the volumes created since start, for the
// idempotency that CreateVolume owes (same name, different arguments is
// AlreadyExists), and by id, for the clones of them (a content source).
// Nothing is allocated: the image is the volume (a clone's
// disk is made by its node at its first stage), and the volume context
// carries everything the node needs.
type controllerState struct {
	mu      sync.Mutex
	volumes map[string]*createdVolume // by name
	byID    map[string]*createdVolume
}

type createdVolume struct {
	id       string
	capacity int64
	params   map[string]string
	topology []*csi.Topology
}

// TopologyKey is the topology segment that names a node: a clone is
// accessible from its node only. NodeGetInfo reports it, and kubelet copies
// it into the node's labels.
const TopologyKey = clones.TopologyKey

// volumeIDPrefix starts every volume id the controller makes.
const volumeIDPrefix = "strata-"

// volumeID derives a stable id from the request name and parameters.
func volumeID(name string, params map[string]string) string {
	h := sha256.New()
	h.Write([]byte(name))
	for _, k := range slices.Sorted(maps.Keys(params)) {
		h.Write([]byte{0})
		h.Write([]byte(k))
		h.Write([]byte{0})
		h.Write([]byte(params[k]))
	}
	return volumeIDPrefix + hex.EncodeToString(h.Sum(nil)[:16])
}

// ControllerGetCapabilities advertises CreateVolume/DeleteVolume,
// ControllerExpandVolume (expand.go), GetCapacity (getcapacity.go), the
// single-node access modes (ReadWriteOncePod) and clones of volumes (a
// claim whose dataSource is another claim, clonesource.go).
func (d *Driver) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	rpc := func(t csi.ControllerServiceCapability_RPC_Type) *csi.ControllerServiceCapability {
		return &csi.ControllerServiceCapability{Type: &csi.ControllerServiceCapability_Rpc{Rpc: &csi.ControllerServiceCapability_RPC{Type: t}}}
	}
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: []*csi.ControllerServiceCapability{
		rpc(csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME),
		rpc(csi.ControllerServiceCapability_RPC_GET_CAPACITY),
		rpc(csi.ControllerServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER),
		rpc(csi.ControllerServiceCapability_RPC_EXPAND_VOLUME),
		rpc(csi.ControllerServiceCapability_RPC_CLONE_VOLUME),
	}}, nil
}

// CreateVolume validates StorageClass parameters and returns them as the
// volume context. A volume that every requested access mode only reads is
// the image itself, usable on any node. A writable one is a persistent
// clone of the image, bound to one node (the accessibility requirement's
// first preferred, else requisite, topology): its volume context carries
// engine.AttrClone and engine.AttrCapacity, and the node makes the clone at its first
// stage. Nothing is copied here, nor anywhere else.
//
// A request whose content source is a volume (a CSI clone) makes a clone
// that starts from that clone's writes: the source must be a clone of the
// same images, no larger than the request (checkCloneSource); the new clone
// goes on the source's node and its context carries engine.AttrCloneOf, so
// that its node copies the source at the first stage.
func (d *Driver) CreateVolume(ctx context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	if req.GetName() == "" {
		return nil, invalid("CreateVolume: name is required")
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return nil, err
	}
	for k := range req.GetParameters() {
		if strings.HasPrefix(k, engine.ReservedPrefix) {
			return nil, invalid("CreateVolume %s: parameter %q is set by %s itself: remove it from the StorageClass", req.GetName(), k, d.name)
		}
	}
	if _, ok := req.GetParameters()[engine.AttrSize]; ok {
		// A writable provisioned volume is a clone, capped at its claim's
		// size; a read-only one has no upper to cap.
		return nil, invalid("CreateVolume %s: parameter %q caps the upper of inline volumes and static PersistentVolumes only: "+
			"the size of a provisioned volume is its claim's storage request (spec.resources.requests.storage); remove %s from the StorageClass",
			req.GetName(), engine.AttrSize, engine.AttrSize)
	}
	attrs, err := engine.ParseAttributes(req.GetParameters())
	if err != nil {
		return nil, err
	}
	capacity := req.GetCapacityRange().GetRequiredBytes()
	limit := req.GetCapacityRange().GetLimitBytes()
	if limit > 0 && capacity > limit {
		return nil, invalid("CreateVolume %s: required bytes %d exceed the limit %d", req.GetName(), capacity, limit)
	}
	var src *cloneSource
	if cs := req.GetVolumeContentSource(); cs != nil {
		if cs.GetVolume() == nil {
			return nil, invalid("CreateVolume %s: snapshots are not supported as a volume content source: a claim's dataSource may be another claim of the same StorageClass "+
				"(a clone of its writes); to keep a clone's writes, commit them as an image (VolumeCommit, strata commit)", req.GetName())
		}
		if allReadOnly(req.GetVolumeCapabilities()) {
			return nil, invalid("CreateVolume %s: a clone of volume %s must be writable: a read-only volume is the image itself and starts from no writes",
				req.GetName(), cs.GetVolume().GetVolumeId())
		}
		if src, err = d.findCloneSource(ctx, req.GetName(), cs.GetVolume().GetVolumeId()); err != nil {
			return nil, err
		}
	}
	// The volume context is the parameters less the provisioner's own keys.
	vctx := map[string]string{}
	for k, v := range req.GetParameters() {
		if !strings.HasPrefix(k, engine.KubePrefix) {
			vctx[k] = v
		}
	}
	var topology []*csi.Topology
	clone := !allReadOnly(req.GetVolumeCapabilities())
	if clone {
		if capacity == 0 {
			capacity = clones.DefaultCapacity
			if src != nil {
				// No size asked for: the source's.
				capacity = max(capacity, src.capacity)
			}
			if limit > 0 && limit < capacity {
				capacity = limit
			}
		}
		var node string
		if src != nil {
			if err := d.checkCloneSource(req, src, attrs, capacity); err != nil {
				return nil, err
			}
			node = src.node
			vctx[engine.AttrCloneOf] = src.id
		} else if node, err = d.cloneNode(req); err != nil {
			return nil, err
		}
		vctx[engine.AttrClone] = "true"
		vctx[engine.AttrCapacity] = strconv.FormatInt(capacity, 10)
		topology = []*csi.Topology{{Segments: map[string]string{TopologyKey: node}}}
	}
	id := volumeID(req.GetName(), vctx)

	c := &d.controller
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.volumes == nil {
		c.volumes = map[string]*createdVolume{}
		c.byID = map[string]*createdVolume{}
	}
	if old, ok := c.volumes[req.GetName()]; ok {
		if old.capacity != capacity || !maps.Equal(old.params, vctx) || !sameTopology(old.topology, topology) {
			return nil, status.Errorf(codes.AlreadyExists, "volume %q already exists with other parameters, capacity or node", req.GetName())
		}
	}
	v := &createdVolume{id: id, capacity: capacity, params: vctx, topology: topology}
	c.volumes[req.GetName()] = v
	c.byID[id] = v
	if clone {
		klog.InfoS("Provisioned a persistent clone", "name", req.GetName(), "volumeID", id, "image", attrs.Image,
			"node", topology[0].Segments[TopologyKey], "capacityBytes", capacity, "cloneOf", vctx[engine.AttrCloneOf])
	}
	vol := &csi.Volume{VolumeId: id, CapacityBytes: capacity, VolumeContext: vctx, AccessibleTopology: topology}
	if src != nil {
		vol.ContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
			Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: src.id}}}
	}
	return &csi.CreateVolumeResponse{Volume: vol}, nil
}

// cloneNode picks the node of a new clone from the request's accessibility
// requirement: the first preferred topology, else the first requisite one.
// Without a requirement, a plugin that serves the node too (--mode=all, one
// machine) places the clone on its own node; a controller alone cannot
// guess where the pod will run.
func (d *Driver) cloneNode(req *csi.CreateVolumeRequest) (string, error) {
	ar := req.GetAccessibilityRequirements()
	var top *csi.Topology
	switch {
	case len(ar.GetPreferred()) > 0:
		top = ar.GetPreferred()[0]
	case len(ar.GetRequisite()) > 0:
		top = ar.GetRequisite()[0]
	case d.mode == ModeAll && d.cfg.NodeID != "":
		return d.cfg.NodeID, nil
	default:
		return "", invalid("CreateVolume %s: a writable volume is a clone on one node, and the request names no node: "+
			"use a StorageClass with volumeBindingMode: WaitForFirstConsumer (or a read-only access mode, ReadOnlyMany, for the image itself)", req.GetName())
	}
	node := top.GetSegments()[TopologyKey]
	if node == "" {
		return "", invalid("CreateVolume %s: the accessibility requirement %v has no %s segment: is the node plugin of %s running on the chosen node?",
			req.GetName(), top.GetSegments(), TopologyKey, d.name)
	}
	return node, nil
}

// sameTopology compares two volumes' accessible topologies.
func sameTopology(a, b []*csi.Topology) bool {
	return slices.EqualFunc(a, b, func(x, y *csi.Topology) bool { return maps.Equal(x.GetSegments(), y.GetSegments()) })
}

// DeleteVolume forgets a volume. A volume that is the image has nothing to
// free. A clone's disk is on its node: a plugin that serves the node too
// removes it here when it is on this node and not staged (FailedPrecondition
// while it is, and while a clone of it is not made yet: checkSourceFree);
// otherwise the node's sweep removes it once its PersistentVolume is gone
// (package clones, sweep.go).
func (d *Driver) DeleteVolume(ctx context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, invalid("DeleteVolume: volume id is required")
	}
	if d.clones != nil && state.CheckCloneID(id) == nil {
		if err := d.checkSourceFree(ctx, id); err != nil {
			return nil, err
		}
		unlock, err := d.locks.TryLock(engine.CloneLock(id), "volume "+id)
		if err != nil {
			return nil, err
		}
		err = d.clones.Delete(klog.FromContext(ctx).WithValues("volumeID", id), id, "DeleteVolume")
		unlock()
		if err != nil {
			return nil, err
		}
	}
	c := &d.controller
	c.mu.Lock()
	defer c.mu.Unlock()
	for name, v := range c.volumes {
		if v.id == id {
			delete(c.volumes, name)
		}
	}
	delete(c.byID, id)
	return &csi.DeleteVolumeResponse{}, nil
}

// ValidateVolumeCapabilities confirms the capabilities a volume supports.
func (d *Driver) ValidateVolumeCapabilities(_ context.Context, req *csi.ValidateVolumeCapabilitiesRequest) (*csi.ValidateVolumeCapabilitiesResponse, error) {
	if req.GetVolumeId() == "" {
		return nil, invalid("ValidateVolumeCapabilities: volume id is required")
	}
	if len(req.GetVolumeCapabilities()) == 0 {
		return nil, invalid("ValidateVolumeCapabilities: volume capabilities are required")
	}
	if !strings.HasPrefix(req.GetVolumeId(), volumeIDPrefix) {
		return nil, status.Errorf(codes.NotFound, "volume %q was not made by %s", req.GetVolumeId(), d.name)
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: err.Error()}, nil
	}
	return &csi.ValidateVolumeCapabilitiesResponse{Confirmed: &csi.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeContext:      req.GetVolumeContext(),
		VolumeCapabilities: req.GetVolumeCapabilities(),
		Parameters:         req.GetParameters(),
	}}, nil
}
