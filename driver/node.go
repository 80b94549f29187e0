package driver

import (
	"context"
	"path/filepath"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/clones"
	"github.com/strata-csi/strata/driver/engine"
	"github.com/strata-csi/strata/driver/state"
)

// NodeGetCapabilities advertises volume stats, volume health (CSI 1.13's
// successor of the volume condition), staging (kubelet then stages every
// PersistentVolume before its publishes, which a clone needs: its overlay
// is mounted once per node, at the staging path, and bound to each pod) and
// the single-node access modes (ReadWriteOncePod).
func (d *Driver) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	rpc := func(t csi.NodeServiceCapability_RPC_Type) *csi.NodeServiceCapability {
		return &csi.NodeServiceCapability{Type: &csi.NodeServiceCapability_Rpc{Rpc: &csi.NodeServiceCapability_RPC{Type: t}}}
	}
	return &csi.NodeGetCapabilitiesResponse{Capabilities: []*csi.NodeServiceCapability{
		rpc(csi.NodeServiceCapability_RPC_GET_VOLUME_STATS),
		rpc(csi.NodeServiceCapability_RPC_GET_VOLUME_HEALTH),
		rpc(csi.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME),
		rpc(csi.NodeServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER),
		rpc(csi.NodeServiceCapability_RPC_EXPAND_VOLUME),
	}}, nil
}

// NodeGetInfo returns the node id, and the node's topology: the clones
// made for it are accessible from it alone.
func (d *Driver) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: d.cfg.NodeID,
		AccessibleTopology: &csi.Topology{Segments: map[string]string{TopologyKey: d.cfg.NodeID}}}, nil
}

// checkNodeRequest validates what NodeStageVolume and NodePublishVolume
// share: the volume id, an absolute path (what names it), the capability
// and the volume attributes, which it returns parsed.
func checkNodeRequest(call, volID, what, path string, c *csi.VolumeCapability, vctx map[string]string) (engine.Attributes, error) {
	if volID == "" {
		return engine.Attributes{}, invalid("%s: volume id is required", call)
	}
	if path == "" {
		return engine.Attributes{}, invalid("%s %s: %s is required", call, volID, what)
	}
	if !filepath.IsAbs(path) {
		return engine.Attributes{}, invalid("%s %s: %s %q is not absolute", call, volID, what, path)
	}
	if err := checkCapability(c); err != nil {
		return engine.Attributes{}, err
	}
	return engine.ParseAttributes(vctx)
}

// NodePublishVolume mounts the image's layer stack, with a private writable
// upper unless the publish is read-only, at the target path, with the
// capability's mount flags (mountOptions: noexec, access times, ro).
func (d *Driver) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	volID, target := req.GetVolumeId(), req.GetTargetPath()
	attrs, err := checkNodeRequest("NodePublishVolume", volID, "target path", target, req.GetVolumeCapability(), req.GetVolumeContext())
	if err != nil {
		return nil, err
	}
	opts, roOption, err := engine.ParseMountOptions(req.GetVolumeCapability().GetMount().GetMountFlags())
	if err != nil {
		return nil, err
	}
	pod, secrets, err := engine.PodOf(req.GetVolumeContext(), req.GetSecrets())
	if err != nil {
		return nil, err
	}
	unlock, err := d.locks.TryLock(engine.PublishLock(volID, target), "volume "+volID+" at "+target)
	if err != nil {
		return nil, err
	}
	defer unlock()
	err = d.engine.Publish(ctx, engine.PublishRequest{
		VolumeID: volID, TargetPath: target, StagingPath: req.GetStagingTargetPath(),
		ReadOnly:     req.GetReadonly() || readOnlyMode(req.GetVolumeCapability()) || roOption,
		SingleWriter: req.GetVolumeCapability().GetAccessMode().GetMode() == csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER,
		MountOptions: opts, Attrs: attrs, Pod: pod, Secrets: secrets,
	})
	if err != nil {
		return nil, err
	}
	return &csi.NodePublishVolumeResponse{}, nil
}

// NodeUnpublishVolume unmounts the target and discards the volume's
// writable layer (a clone's stays). A target that is not mounted, or gone,
// is success.
func (d *Driver) NodeUnpublishVolume(ctx context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	volID, target := req.GetVolumeId(), req.GetTargetPath()
	if volID == "" {
		return nil, invalid("NodeUnpublishVolume: volume id is required")
	}
	if target == "" {
		return nil, invalid("NodeUnpublishVolume %s: target path is required", volID)
	}
	unlock, err := d.locks.TryLock(engine.PublishLock(volID, target), "volume "+volID+" at "+target)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := d.engine.Unpublish(ctx, volID, target); err != nil {
		return nil, err
	}
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// NodeStageVolume mounts a clone's overlay at the staging path, making the
// clone at its first stage. For a volume that is the image itself there is
// nothing to stage: its publishes mount it.
func (d *Driver) NodeStageVolume(ctx context.Context, req *csi.NodeStageVolumeRequest) (*csi.NodeStageVolumeResponse, error) {
	volID, staging := req.GetVolumeId(), req.GetStagingTargetPath()
	attrs, err := checkNodeRequest("NodeStageVolume", volID, "staging target path", staging, req.GetVolumeCapability(), req.GetVolumeContext())
	if err != nil {
		return nil, err
	}
	if !attrs.Clone {
		klog.FromContext(ctx).V(4).Info("Nothing to stage: the volume is the image, mounted at each publish", "volumeID", volID, "stagingPath", staging)
		return &csi.NodeStageVolumeResponse{}, nil
	}
	if err := state.CheckCloneID(volID); err != nil {
		return nil, invalid("NodeStageVolume: %v", err)
	}
	// The options apply to each publish's bind; "ro" stages the clone
	// without its upper.
	_, roOption, err := engine.ParseMountOptions(req.GetVolumeCapability().GetMount().GetMountFlags())
	if err != nil {
		return nil, err
	}
	_, secrets, err := engine.PodOf(req.GetVolumeContext(), req.GetSecrets())
	if err != nil {
		return nil, err
	}
	unlock, err := d.locks.TryLock(engine.CloneLock(volID), "volume "+volID)
	if err != nil {
		return nil, err
	}
	defer unlock()
	err = d.clones.Stage(ctx, clones.StageRequest{VolumeID: volID, StagingPath: filepath.Clean(staging),
		ReadOnly: readOnlyMode(req.GetVolumeCapability()) || roOption, Attrs: attrs, Secrets: secrets})
	if err != nil {
		return nil, err
	}
	return &csi.NodeStageVolumeResponse{}, nil
}

// NodeUnstageVolume unmounts a clone's overlay and its filesystem; the
// clone stays for its next stage. A volume that is not a clone was never
// staged: success.
func (d *Driver) NodeUnstageVolume(ctx context.Context, req *csi.NodeUnstageVolumeRequest) (*csi.NodeUnstageVolumeResponse, error) {
	volID, staging := req.GetVolumeId(), req.GetStagingTargetPath()
	if volID == "" {
		return nil, invalid("NodeUnstageVolume: volume id is required")
	}
	if staging == "" {
		return nil, invalid("NodeUnstageVolume %s: staging target path is required", volID)
	}
	if state.CheckCloneID(volID) != nil {
		return &csi.NodeUnstageVolumeResponse{}, nil // cannot be a clone
	}
	unlock, err := d.locks.TryLock(engine.CloneLock(volID), "volume "+volID)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := d.clones.Unstage(ctx, volID, filepath.Clean(staging)); err != nil {
		return nil, err
	}
	return &csi.NodeUnstageVolumeResponse{}, nil
}

// NodeGetVolumeStats reports the bytes and inodes used by the volume's
// writable layer and the room left (for a clone or a capped upper, its own
// filesystem).
func (d *Driver) NodeGetVolumeStats(_ context.Context, req *csi.NodeGetVolumeStatsRequest) (*csi.NodeGetVolumeStatsResponse, error) {
	volID, p := req.GetVolumeId(), req.GetVolumePath()
	if volID == "" || p == "" {
		return nil, invalid("NodeGetVolumeStats: volume id and volume path are required")
	}
	u, err := d.engine.Stats(volID, p)
	if err != nil {
		return nil, err
	}
	return &csi.NodeGetVolumeStatsResponse{Usage: []*csi.VolumeUsage{
		{Unit: csi.VolumeUsage_BYTES, Used: u.UsedBytes, Available: u.AvailableBytes, Total: u.TotalBytes},
		{Unit: csi.VolumeUsage_INODES, Used: u.UsedInodes, Available: u.FreeInodes, Total: u.TotalInodes},
	}}, nil
}

// NodeGetVolumeHealth reports a published volume whose mount is missing as
// inaccessible. Without a publish path, every publish of the volume on
// this node is checked.
func (d *Driver) NodeGetVolumeHealth(_ context.Context, req *csi.NodeGetVolumeHealthRequest) (*csi.NodeGetVolumeHealthResponse, error) {
	volID := req.GetVolumeId()
	if volID == "" {
		return nil, invalid("NodeGetVolumeHealth: volume id is required")
	}
	problems, err := d.engine.Health(volID, req.GetVolumePublishPath())
	if err != nil {
		return nil, err
	}
	health := &csi.VolumeHealth{VolumeId: volID}
	for _, reason := range problems {
		health.HealthStatuses = append(health.HealthStatuses, &csi.VolumeHealth_VolumeHealthEntry{
			Status: csi.VolumeHealthErrorType_INACCESSIBLE, Reason: reason,
		})
	}
	return &csi.NodeGetVolumeHealthResponse{VolumeHealth: health}, nil
}
