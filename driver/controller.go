package driver

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"maps"
	"slices"
	"strings"
	"sync"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
)

// controllerState remembers the volumes created since start, for the
// idempotency that CreateVolume owes (same name, different arguments is
// AlreadyExists). Nothing is allocated: the image is the volume, and the
// volume context carries everything the node needs.
type controllerState struct {
	mu      sync.Mutex
	volumes map[string]*createdVolume // by name
}

type createdVolume struct {
	id       string
	capacity int64
	params   map[string]string
}

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

// ControllerGetCapabilities advertises CreateVolume/DeleteVolume.
func (d *Driver) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: []*csi.ControllerServiceCapability{{
		Type: &csi.ControllerServiceCapability_Rpc{Rpc: &csi.ControllerServiceCapability_RPC{Type: csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME}},
	}}}, nil
}

// CreateVolume validates StorageClass parameters and returns them as the
// volume context.
func (d *Driver) CreateVolume(_ context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	if req.GetName() == "" {
		return nil, invalid("CreateVolume: name is required")
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return nil, err
	}
	if _, err := parseAttributes(req.GetParameters()); err != nil {
		return nil, err
	}
	if req.GetVolumeContentSource() != nil {
		return nil, invalid("CreateVolume %s: volume content sources (snapshots, clones) are not supported: the image is the content", req.GetName())
	}
	capacity := req.GetCapacityRange().GetRequiredBytes()
	if l := req.GetCapacityRange().GetLimitBytes(); l > 0 && capacity > l {
		return nil, invalid("CreateVolume %s: required bytes %d exceed the limit %d", req.GetName(), capacity, l)
	}
	// The volume context is the parameters less the provisioner's own keys.
	vctx := map[string]string{}
	for k, v := range req.GetParameters() {
		if !strings.HasPrefix(k, kubePrefix) {
			vctx[k] = v
		}
	}
	id := volumeID(req.GetName(), vctx)

	c := &d.controller
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.volumes == nil {
		c.volumes = map[string]*createdVolume{}
	}
	if old, ok := c.volumes[req.GetName()]; ok {
		if old.capacity != capacity || !maps.Equal(old.params, vctx) {
			return nil, errorf(codes.AlreadyExists, "volume %q already exists with other parameters or capacity", req.GetName())
		}
	}
	c.volumes[req.GetName()] = &createdVolume{id: id, capacity: capacity, params: vctx}
	return &csi.CreateVolumeResponse{Volume: &csi.Volume{VolumeId: id, CapacityBytes: capacity, VolumeContext: vctx}}, nil
}

// DeleteVolume forgets a volume. There is nothing to free: a volume's
// writable layer lives on the node and goes at unpublish.
func (d *Driver) DeleteVolume(_ context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	if req.GetVolumeId() == "" {
		return nil, invalid("DeleteVolume: volume id is required")
	}
	c := &d.controller
	c.mu.Lock()
	defer c.mu.Unlock()
	for name, v := range c.volumes {
		if v.id == req.GetVolumeId() {
			delete(c.volumes, name)
		}
	}
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
		return nil, errorf(codes.NotFound, "volume %q was not made by %s", req.GetVolumeId(), d.name)
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

// checkCapabilities accepts filesystem access in every access mode; block
// access has no meaning for an overlay.
func checkCapabilities(caps []*csi.VolumeCapability) error {
	if len(caps) == 0 {
		return invalid("volume capabilities are required")
	}
	for _, c := range caps {
		if err := checkCapability(c); err != nil {
			return err
		}
	}
	return nil
}

func checkCapability(c *csi.VolumeCapability) error {
	if c == nil {
		return invalid("volume capability is required")
	}
	if c.GetBlock() != nil {
		return invalid("block access is not supported: a Strata volume is a filesystem (use volumeMode: Filesystem)")
	}
	if c.GetMount() == nil {
		return invalid("volume capability needs mount access")
	}
	if fs := c.GetMount().GetFsType(); fs != "" && fs != "overlay" {
		return invalid("fsType %q is not supported: a Strata volume is an overlay; leave fsType empty", fs)
	}
	if c.GetAccessMode() == nil || c.GetAccessMode().GetMode() == csi.VolumeCapability_AccessMode_UNKNOWN {
		return invalid("volume capability needs an access mode")
	}
	return nil
}

// readOnlyMode reports whether an access mode allows no writes.
func readOnlyMode(c *csi.VolumeCapability) bool {
	switch c.GetAccessMode().GetMode() {
	case csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY, csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY:
		return true
	}
	return false
}
