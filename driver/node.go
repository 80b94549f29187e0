package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/credentials"
	"github.com/strata-csi/strata/driver/mount"
	"github.com/strata-csi/strata/layercache"
)

// NodeGetCapabilities advertises volume stats and volume health (CSI 1.13's
// successor of the volume condition).
func (d *Driver) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	rpc := func(t csi.NodeServiceCapability_RPC_Type) *csi.NodeServiceCapability {
		return &csi.NodeServiceCapability{Type: &csi.NodeServiceCapability_Rpc{Rpc: &csi.NodeServiceCapability_RPC{Type: t}}}
	}
	return &csi.NodeGetCapabilitiesResponse{Capabilities: []*csi.NodeServiceCapability{
		rpc(csi.NodeServiceCapability_RPC_GET_VOLUME_STATS),
		rpc(csi.NodeServiceCapability_RPC_GET_VOLUME_HEALTH),
	}}, nil
}

// NodeGetInfo returns the node id.
func (d *Driver) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: d.nodeID}, nil
}

// NodePublishVolume mounts the image's layer stack, with a private writable
// upper unless the publish is read-only, at the target path.
func (d *Driver) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	volID, target := req.GetVolumeId(), req.GetTargetPath()
	if volID == "" {
		return nil, invalid("NodePublishVolume: volume id is required")
	}
	if target == "" {
		return nil, invalid("NodePublishVolume %s: target path is required", volID)
	}
	if !filepath.IsAbs(target) {
		return nil, invalid("NodePublishVolume %s: target path %q is not absolute", volID, target)
	}
	if err := checkCapability(req.GetVolumeCapability()); err != nil {
		return nil, err
	}
	attrs, err := parseAttributes(req.GetVolumeContext())
	if err != nil {
		return nil, err
	}
	want := &volumeRecord{
		VolumeID: volID, TargetPath: filepath.Clean(target), Image: attrs.Image,
		PullPolicy: string(attrs.PullPolicy), SubPath: attrs.SubPath,
		ReadOnly: req.GetReadonly() || readOnlyMode(req.GetVolumeCapability()),
	}
	pod := podOf(req.GetVolumeContext())
	want.PodNamespace, want.PodName, want.PodUID = pod.Namespace, pod.Name, pod.UID
	identity, secrets, err := identityOf(req.GetVolumeContext(), req.GetSecrets())
	if err != nil {
		return nil, err
	}
	key := volumeKey(volID, target)
	if !d.inflight.tryLock(key) {
		return nil, errorf(codes.Aborted, "another operation on volume %s at %s is in progress", volID, target)
	}
	defer d.inflight.unlock(key)
	logger := klog.FromContext(ctx).WithValues("volumeID", volID, "targetPath", target, "image", attrs.Image)

	dirs := d.dirsOf(key)
	old, err := readRecord(dirs.record)
	if err != nil {
		return nil, err
	}
	mounted, err := mount.IsMountPoint(target)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("check target %s: %w", target, err)
	}
	switch {
	case old != nil && mounted && old.SameRequest(want):
		logger.V(2).Info("Volume already published")
		return &csi.NodePublishVolumeResponse{}, nil
	case old != nil && mounted:
		return nil, errorf(codes.AlreadyExists, "volume %s is already published at %s with other arguments (image %s, readOnly %v, subPath %q)",
			volID, target, old.Image, old.ReadOnly, old.SubPath)
	case mounted:
		return nil, errorf(codes.AlreadyExists, "target %s is already a mount point that %s did not make", target, d.name)
	case old != nil:
		// A publish that crashed half-way, or whose mount went away: start over.
		if err := d.teardown(logger, key, old); err != nil {
			return nil, err
		}
	}

	start := time.Now()
	if err := d.publish(ctx, logger, key, want, secrets, identity); err != nil {
		if cerr := d.teardown(logger, key, want); cerr != nil {
			logger.Error(cerr, "Could not clean up a failed publish")
		}
		return nil, err
	}
	logger.Info("Volume published", "digest", want.Digest, "layers", len(want.Layers), "readOnly", want.ReadOnly,
		"subPath", want.SubPath, "duration", time.Since(start).Round(time.Microsecond))
	return &csi.NodePublishVolumeResponse{}, nil
}

// publish does the work of NodePublishVolume. On error the caller tears
// down whatever it left.
func (d *Driver) publish(ctx context.Context, logger klog.Logger, key string, rec *volumeRecord, secrets map[string]string, pod credentials.Pod) error {
	pull := newPullTracker(d.metrics, d.events, podRef{rec.PodNamespace, rec.PodName, rec.PodUID}, rec.Image, rec.VolumeID)
	o := layercache.PullOptions{Policy: layercache.PullPolicy(rec.PullPolicy), Progress: pull.progress}
	// The first of the volume's secret, the pod's identity (with
	// --pod-identity), the driver's service account's pull secrets and the
	// credential providers that has credentials for the registry.
	creds, err := d.creds.For(ctx, rec.Image, secrets, pod)
	if err != nil {
		return err
	}
	o.Credentials = creds.Credentials
	if creds.From != "" {
		logger.V(4).Info("Pull credentials chosen", "source", creds.From)
	}
	img, err := d.store.Resolve(ctx, rec.Image, o)
	if err != nil {
		err = creds.Explain(err) // what was tried, should the registry refuse
		pull.finish(stepResolve, 0, err)
		return err
	}
	if n := len(img.Layers); n > mount.MaxLowers {
		return invalid("image %s has %d layers; overlayfs stacks at most %d", rec.Image, n, mount.MaxLowers)
	}
	rec.Digest, rec.Layers = img.Digest, img.DiffIDs()
	rec.Published = time.Now().UTC()

	// The record goes to disk before anything it describes exists, so that
	// a crash at any later point is undone by the next start.
	dirs := d.dirsOf(key)
	if err := os.MkdirAll(dirs.dir, 0o700); err != nil {
		return err
	}
	if err := writeRecord(dirs.record, rec); err != nil {
		return fmt.Errorf("record volume: %w", err)
	}
	if err := d.ensureAndAcquire(ctx, key, img, o, pull, creds.Explain); err != nil {
		return err
	}
	lowers := make([]string, 0, len(img.Layers))
	for i := len(img.Layers) - 1; i >= 0; i-- {
		dir, err := d.store.LayerDir(img.Layers[i].DiffID)
		if err != nil {
			return err
		}
		lowers = append(lowers, dir)
	}
	ov := mount.Overlay{Lowers: lowers, ReadOnly: rec.ReadOnly}
	if !rec.ReadOnly {
		for _, p := range []string{dirs.upper, dirs.work} {
			if err := os.Mkdir(p, 0o755); err != nil {
				return err
			}
		}
		// The upper is thrown away at unpublish, so overlayfs need not sync
		// it: unmounting a volatile overlay skips a journal commit.
		ov.Upper, ov.Work, ov.Volatile = dirs.upper, dirs.work, true
	}
	// The CO creates only the target's parent.
	if err := os.MkdirAll(rec.TargetPath, 0o750); err != nil {
		return fmt.Errorf("create target %s: %w", rec.TargetPath, err)
	}
	if rec.SubPath == "" {
		return mount.MountOverlay(ov, rec.TargetPath)
	}
	// subPath: the overlay is mounted privately under the state root and
	// only the sub-directory, resolved inside the image, is bound to the
	// target.
	if err := os.Mkdir(dirs.mnt, 0o700); err != nil {
		return err
	}
	if err := mount.MountOverlay(ov, dirs.mnt); err != nil {
		return err
	}
	if err := mount.BindBeneath(dirs.mnt, rec.SubPath, rec.TargetPath, rec.ReadOnly); err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, mount.ErrNotDir) {
			return invalid("volume attribute subPath %q: %v", rec.SubPath, err)
		}
		return err
	}
	return nil
}

// ensureAndAcquire fetches the image's missing layers and records that this
// publish holds them. A prune may remove a layer between the two steps;
// then the layers are ensured again. The pull is reported once, when it
// fails or when all the layers were there for Acquire. explain adds what
// the credential chain knows to a refusal, as for the resolve: a registry
// may authorize the manifest and refuse a blob.
func (d *Driver) ensureAndAcquire(ctx context.Context, key string, img *layercache.Image, o layercache.PullOptions, pull *pullTracker, explain func(error) error) error {
	for attempt := 0; ; attempt++ {
		if err := d.store.Ensure(ctx, img, o); err != nil {
			err = explain(err)
			pull.finish(stepPull, len(img.Layers), err)
			return err
		}
		err := d.store.Acquire(key, img.DiffIDs())
		if !errors.Is(err, layercache.ErrLayerMissing) || attempt == 2 {
			pull.finish(stepPull, len(img.Layers), nil)
			return err
		}
	}
}

// teardown undoes a publish, whatever state it reached: unmount the target
// and the private overlay, release the layers, remove the volume's files and
// the target directory. Every step tolerates what is already undone.
func (d *Driver) teardown(logger klog.Logger, key string, rec *volumeRecord) error {
	dirs := d.dirsOf(key)
	if rec != nil && rec.TargetPath != "" {
		if err := mount.Unmount(rec.TargetPath); err != nil {
			return fmt.Errorf("unmount %s: %w", rec.TargetPath, err)
		}
		if err := os.Remove(rec.TargetPath); err != nil && !errors.Is(err, fs.ErrNotExist) {
			logger.V(2).Info("Target not removed", "err", err)
		}
	}
	if err := mount.Unmount(dirs.mnt); err != nil {
		return fmt.Errorf("unmount %s: %w", dirs.mnt, err)
	}
	if err := d.store.Release(key); err != nil {
		return err
	}
	if err := os.RemoveAll(dirs.dir); err != nil {
		return fmt.Errorf("remove volume files %s: %w", dirs.dir, err)
	}
	return nil
}

// NodeUnpublishVolume unmounts the target and discards the volume's writable
// layer. A target that is not mounted, or gone, is success.
func (d *Driver) NodeUnpublishVolume(ctx context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	volID, target := req.GetVolumeId(), req.GetTargetPath()
	if volID == "" {
		return nil, invalid("NodeUnpublishVolume: volume id is required")
	}
	if target == "" {
		return nil, invalid("NodeUnpublishVolume %s: target path is required", volID)
	}
	key := volumeKey(volID, target)
	if !d.inflight.tryLock(key) {
		return nil, errorf(codes.Aborted, "another operation on volume %s at %s is in progress", volID, target)
	}
	defer d.inflight.unlock(key)
	logger := klog.FromContext(ctx).WithValues("volumeID", volID, "targetPath", target)
	rec, err := readRecord(d.dirsOf(key).record)
	if err != nil {
		return nil, err
	}
	if rec == nil {
		// Not ours, or already unpublished: still make sure nothing is
		// mounted at the target and the target is gone.
		rec = &volumeRecord{VolumeID: volID, TargetPath: filepath.Clean(target)}
	}
	if err := d.teardown(logger, key, rec); err != nil {
		return nil, err
	}
	logger.Info("Volume unpublished", "image", rec.Image)
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// NodeGetVolumeStats reports the bytes and inodes used by the volume's
// writable layer and the space left on the filesystem that holds it.
func (d *Driver) NodeGetVolumeStats(_ context.Context, req *csi.NodeGetVolumeStatsRequest) (*csi.NodeGetVolumeStatsResponse, error) {
	volID, p := req.GetVolumeId(), req.GetVolumePath()
	if volID == "" || p == "" {
		return nil, invalid("NodeGetVolumeStats: volume id and volume path are required")
	}
	dirs := d.dirsOf(volumeKey(volID, p))
	rec, err := readRecord(dirs.record)
	if err != nil {
		return nil, err
	}
	if rec == nil {
		return nil, errorf(codes.NotFound, "volume %s is not published at %s on this node", volID, p)
	}
	var used, inodes int64
	if !rec.ReadOnly {
		err := filepath.WalkDir(dirs.upper, func(_ string, e fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			inodes++
			if info, err := e.Info(); err == nil {
				if st, ok := info.Sys().(*syscall.Stat_t); ok {
					used += st.Blocks * 512
				}
			}
			return nil
		})
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("measure %s: %w", dirs.upper, err)
		}
	}
	var sfs unix.Statfs_t
	if err := unix.Statfs(dirs.dir, &sfs); err != nil {
		return nil, fmt.Errorf("statfs %s: %w", dirs.dir, err)
	}
	avail := int64(sfs.Bavail) * sfs.Bsize
	return &csi.NodeGetVolumeStatsResponse{Usage: []*csi.VolumeUsage{
		{Unit: csi.VolumeUsage_BYTES, Used: used, Available: avail, Total: used + avail},
		{Unit: csi.VolumeUsage_INODES, Used: inodes, Available: int64(sfs.Ffree), Total: inodes + int64(sfs.Ffree)},
	}}, nil
}

// NodeGetVolumeHealth reports a published volume whose mount is missing as
// inaccessible: the pod lost its volume, and only a restart of the pod
// publishes it again. Without a publish path, every publish of the volume on
// this node is checked.
func (d *Driver) NodeGetVolumeHealth(_ context.Context, req *csi.NodeGetVolumeHealthRequest) (*csi.NodeGetVolumeHealthResponse, error) {
	volID, p := req.GetVolumeId(), req.GetVolumePublishPath()
	if volID == "" {
		return nil, invalid("NodeGetVolumeHealth: volume id is required")
	}
	var recs []*volumeRecord
	if p != "" {
		rec, err := readRecord(d.dirsOf(volumeKey(volID, p)).record)
		if err != nil {
			return nil, err
		}
		if rec != nil {
			recs = append(recs, rec)
		}
	} else {
		all, err := d.records()
		if err != nil {
			return nil, err
		}
		for _, rec := range all {
			if rec.VolumeID == volID {
				recs = append(recs, rec)
			}
		}
	}
	if len(recs) == 0 {
		return nil, errorf(codes.NotFound, "volume %s is not published on this node", volID)
	}
	health := &csi.VolumeHealth{VolumeId: volID}
	for _, rec := range recs {
		ok, err := mount.IsMountPoint(rec.TargetPath)
		if err == nil && ok {
			continue
		}
		reason := fmt.Sprintf("%s is not mounted any more: restart the pod to publish the volume again", rec.TargetPath)
		if err != nil {
			reason = fmt.Sprintf("%s cannot be checked (%v): restart the pod to publish the volume again", rec.TargetPath, err)
		}
		health.HealthStatuses = append(health.HealthStatuses, &csi.VolumeHealth_VolumeHealthEntry{
			Status: csi.VolumeHealthErrorType_INACCESSIBLE, Reason: reason,
		})
	}
	return &csi.NodeGetVolumeHealthResponse{VolumeHealth: health}, nil
}
