package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/credentials"
	"github.com/strata-csi/strata/driver/mount"
	"github.com/strata-csi/strata/driver/volumes"
	"github.com/strata-csi/strata/layercache"
)

// NodeGetCapabilities advertises volume stats, volume health (CSI 1.13's
// successor of the volume condition) and staging: kubelet then stages every
// PersistentVolume before its publishes, which a clone needs (its overlay
// is mounted once per node, at the staging path, and bound to each pod).
func (d *Driver) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	rpc := func(t csi.NodeServiceCapability_RPC_Type) *csi.NodeServiceCapability {
		return &csi.NodeServiceCapability{Type: &csi.NodeServiceCapability_Rpc{Rpc: &csi.NodeServiceCapability_RPC{Type: t}}}
	}
	return &csi.NodeGetCapabilitiesResponse{Capabilities: []*csi.NodeServiceCapability{
		rpc(csi.NodeServiceCapability_RPC_GET_VOLUME_STATS),
		rpc(csi.NodeServiceCapability_RPC_GET_VOLUME_HEALTH),
		rpc(csi.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME),
	}}, nil
}

// NodeGetInfo returns the node id, and the node's topology: the clones
// made for it are accessible from it alone.
func (d *Driver) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: d.nodeID,
		AccessibleTopology: &csi.Topology{Segments: map[string]string{TopologyKey: d.nodeID}}}, nil
}

// checkNodeRequest validates what NodeStageVolume and NodePublishVolume
// share: the volume id, an absolute path (what names it), the capability
// and the volume attributes, which it returns parsed.
func checkNodeRequest(call, volID, what, path string, c *csi.VolumeCapability, vctx map[string]string) (volumeAttributes, error) {
	if volID == "" {
		return volumeAttributes{}, invalid("%s: volume id is required", call)
	}
	if path == "" {
		return volumeAttributes{}, invalid("%s %s: %s is required", call, volID, what)
	}
	if !filepath.IsAbs(path) {
		return volumeAttributes{}, invalid("%s %s: %s %q is not absolute", call, volID, what, path)
	}
	if err := checkCapability(c); err != nil {
		return volumeAttributes{}, err
	}
	return parseAttributes(vctx)
}

// NodePublishVolume mounts the image's layer stack, with a private writable
// upper unless the publish is read-only, at the target path.
func (d *Driver) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	volID, target := req.GetVolumeId(), req.GetTargetPath()
	attrs, err := checkNodeRequest("NodePublishVolume", volID, "target path", target, req.GetVolumeCapability(), req.GetVolumeContext())
	if err != nil {
		return nil, err
	}
	want := &volumeRecord{
		VolumeID: volID, TargetPath: filepath.Clean(target), Image: attrs.Image,
		PullPolicy: string(attrs.PullPolicy), SubPath: attrs.SubPath,
		ReadOnly: req.GetReadonly() || readOnlyMode(req.GetVolumeCapability()),
		Size:     attrs.Size,
	}
	if !want.ReadOnly && !attrs.Clone {
		// A read-only publish has no upper to cap; a clone's upper is in
		// its own filesystem, capped at its capacity.
		want.UpperBytes = d.upperSize(attrs.Size)
	}
	for _, ref := range attrs.Images() {
		want.Stack = append(want.Stack, stackImage{Image: ref})
	}
	if attrs.Clone {
		// A clone's overlay is mounted once, at its stage; each publish
		// binds it.
		staging := req.GetStagingTargetPath()
		if staging == "" {
			return nil, invalid("NodePublishVolume %s: the volume is a persistent clone, published from its staging path, and the request has none: "+
				"clones are PersistentVolumes, which kubelet stages first", volID)
		}
		want.Clone, want.StagingPath = true, filepath.Clean(staging)
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
	if len(attrs.StackImages) > 0 {
		logger = logger.WithValues("stackImages", attrs.StackImages)
	}

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
		return nil, errorf(codes.AlreadyExists, "volume %s is already published at %s with other arguments (%s, readOnly %v, subPath %q, size %s)",
			volID, target, describeStack(old.Refs()), old.ReadOnly, old.SubPath, describeSize(old.Size))
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
	if want.Clone {
		logger = logger.WithValues("stagingPath", want.StagingPath, "clone", true)
	}
	logger.Info("Volume published", "digests", stackDigests(want), "layers", len(want.Layers), "readOnly", want.ReadOnly,
		"subPath", want.SubPath, "upperBytes", want.UpperBytes, "duration", time.Since(start).Round(time.Microsecond))
	return &csi.NodePublishVolumeResponse{}, nil
}

// publish does the work of NodePublishVolume. On error the caller tears
// down whatever it left.
func (d *Driver) publish(ctx context.Context, logger klog.Logger, key string, rec *volumeRecord, secrets map[string]string, pod credentials.Pod) error {
	if rec.Clone {
		return d.publishClone(rec)
	}
	refs := rec.Refs()
	pull := newPullTracker(d.metrics, d.events, podRef{rec.PodNamespace, rec.PodName, rec.PodUID}, refs, rec.VolumeID)
	o := layercache.PullOptions{Policy: layercache.PullPolicy(rec.PullPolicy), Progress: pull.progress}
	stack, err := d.resolveStack(ctx, logger, refs, o, secrets, pod, pull)
	if err != nil {
		return err
	}
	layers := stackLayers(stack)
	if err := checkDepth(refs, len(layers)); err != nil {
		return err
	}
	for i, s := range stack {
		rec.Stack[i].Digest = s.img.Digest
	}
	rec.Digest, rec.Layers = stack[0].img.Digest, layers
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
	if err := d.ensureAndAcquire(ctx, key, fetchPlan(stack), layers, pull); err != nil {
		return err
	}
	// Overlayfs wants the top layer first.
	lowers := make([]string, 0, len(layers))
	for i := len(layers) - 1; i >= 0; i-- {
		dir, err := d.store.LayerDir(layers[i])
		if err != nil {
			return err
		}
		lowers = append(lowers, dir)
	}
	ov := mount.Overlay{Lowers: lowers, ReadOnly: rec.ReadOnly}
	if !rec.ReadOnly {
		upper, work := dirs.upper, dirs.work
		if rec.UpperBytes > 0 {
			if upper, work, err = d.mountUpper(ctx, dirs, rec.UpperBytes); err != nil {
				return err
			}
		}
		for _, p := range []string{upper, work} {
			if err := os.Mkdir(p, 0o755); err != nil {
				return err
			}
		}
		// The upper is thrown away at unpublish, so overlayfs need not sync
		// it: unmounting a volatile overlay skips a journal commit.
		ov.Upper, ov.Work, ov.Volatile = upper, work, true
	}
	// The CO creates only the target's parent.
	if err := os.MkdirAll(rec.TargetPath, 0o750); err != nil {
		return fmt.Errorf("create target %s: %w", rec.TargetPath, err)
	}
	if rec.SubPath == "" {
		return mount.MountOverlay(ov, rec.TargetPath)
	}
	// subPath: the overlay is mounted privately under the state root and
	// only the sub-directory, resolved inside the merged tree of the whole
	// stack, is bound to the target.
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

// stackedImage is one image of a publish's stack, resolved, with the pull
// options (credentials) that resolved it and that fetch its layers.
type stackedImage struct {
	img  *layercache.Image
	opts layercache.PullOptions
	// explain adds what the credential chain knows to a registry's
	// refusal: a registry may authorize the manifest and refuse a blob.
	explain func(error) error
}

// resolveStack resolves the images of a stack, bottom first, each with its
// own credentials: the images of one volume may live in different
// registries, and the node-publish secret may hold an entry for each. The
// layer cache checks each image's access rule (KEP-2535) as it resolves it.
func (d *Driver) resolveStack(ctx context.Context, logger klog.Logger, refs []string, o layercache.PullOptions,
	secrets map[string]string, pod credentials.Pod, pull *pullTracker) ([]stackedImage, error) {
	stack := make([]stackedImage, 0, len(refs))
	for _, ref := range refs {
		// The first of the volume's secret, the pod's identity (with
		// --pod-identity), the driver's service account's pull secrets and
		// the credential providers that has credentials for the registry.
		creds, err := d.creds.For(ctx, ref, secrets, pod)
		if err != nil {
			return nil, err
		}
		opts := o
		opts.Keychain = creds.Keychain
		if creds.From != "" {
			logger.V(4).Info("Pull credentials chosen", "stackImage", ref, "source", creds.From)
		}
		img, err := d.store.Resolve(ctx, ref, opts)
		if err != nil {
			err = creds.Explain(err) // what was tried, should the registry refuse
			pull.finish(stepResolve, 0, err)
			return nil, err
		}
		stack = append(stack, stackedImage{img: img, opts: opts, explain: creds.Explain})
	}
	return stack, nil
}

// stackLayers returns the layers to mount for a stack of images: bottom
// first, each layer once, at its topmost place in the stack.
//
// Overlayfs refuses a directory given twice as a lower: the mount fails with
// ELOOP and "overlayfs: conflicting lowerdir path" in the kernel log, on the
// new mount API and on mount(2) alike (see TestOverlayRefusesRepeatedLower in
// package mount). Two images with a common base bring that about, and so
// does one image that repeats a layer (the empty layer some build tools
// write). Dropping the lower occurrences leaves the merged view what
// applying the layers one after another gives: every name the lower
// occurrence could show is met first in the identical occurrence above it,
// and a whiteout or an opaque directory between the two hides nothing of the
// upper one.
func stackLayers(stack []stackedImage) []v1.Hash {
	seen := map[v1.Hash]bool{}
	var ids []v1.Hash // top first
	for i := len(stack) - 1; i >= 0; i-- {
		ls := stack[i].img.Layers
		for j := len(ls) - 1; j >= 0; j-- {
			if id := ls[j].DiffID; !seen[id] {
				seen[id] = true
				ids = append(ids, id)
			}
		}
	}
	slices.Reverse(ids)
	return ids
}

// checkDepth refuses a stack of more layers than overlayfs mounts, before
// anything is fetched.
func checkDepth(refs []string, layers int) error {
	switch {
	case layers <= mount.MaxLowers:
		return nil
	case len(refs) == 1:
		return invalid("image %s has %d layers; overlayfs stacks at most %d", refs[0], layers, mount.MaxLowers)
	}
	return invalid("the stack of %d images has %d layers; overlayfs stacks at most %d (images, bottom first: %s): squash some of them, or stack fewer",
		len(refs), layers, mount.MaxLowers, strings.Join(refs, ", "))
}

// fetchPlan splits the stack's layers among its images for fetching: each
// layer once, from the lowest image that has it, so that a layer two images
// share is fetched once and counted once in the pull's metrics and events.
func fetchPlan(stack []stackedImage) []stackedImage {
	seen := map[v1.Hash]bool{}
	plan := make([]stackedImage, 0, len(stack))
	for _, s := range stack {
		var own []layercache.Layer
		for _, l := range s.img.Layers {
			if !seen[l.DiffID] {
				seen[l.DiffID] = true
				own = append(own, l)
			}
		}
		if len(own) == 0 {
			continue
		}
		part := *s.img // img.Layers may be shared with other publishes: never modified
		part.Layers = own
		s.img = &part
		plan = append(plan, s)
	}
	return plan
}

// ensureAndAcquire fetches the stack's missing layers and records that this
// publish holds layers. A prune may remove a layer between the two steps;
// then the layers are ensured again. The pull is reported once, when it
// fails or when all the layers were there for Acquire.
func (d *Driver) ensureAndAcquire(ctx context.Context, key string, plan []stackedImage, layers []v1.Hash, pull *pullTracker) error {
	for attempt := 0; ; attempt++ {
		if err := d.ensureStack(ctx, plan); err != nil {
			pull.finish(stepPull, len(layers), err)
			return err
		}
		err := d.store.Acquire(key, layers)
		if !errors.Is(err, layercache.ErrLayerMissing) || attempt == 2 {
			pull.finish(stepPull, len(layers), nil)
			return err
		}
	}
}

// ensureStack ensures the layers of every image of the plan at the same
// time: the images may come from different registries, and a small
// toolchain need not wait behind a large dataset. The plan holds each layer
// once, so no two of these fetch the same layer.
func (d *Driver) ensureStack(ctx context.Context, plan []stackedImage) error {
	errs := make([]error, len(plan))
	var wg sync.WaitGroup
	for i, s := range plan {
		wg.Go(func() { errs[i] = s.explain(d.store.Ensure(ctx, s.img, s.opts)) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

// describeSize is a size attribute for a message.
func describeSize(n int64) string {
	if n == 0 {
		return "not set"
	}
	return strconv.FormatInt(n, 10) + " bytes"
}

// describeStack names a volume's images for a message: "image A" or
// "images A, B (bottom first)".
func describeStack(refs []string) string {
	if len(refs) == 1 {
		return "image " + refs[0]
	}
	return "images " + strings.Join(refs, ", ") + " (bottom first)"
}

// stackDigests lists the digests of a record's images, bottom first, for
// the log.
func stackDigests(rec *volumeRecord) []string {
	var out []string
	for _, im := range rec.Images() {
		out = append(out, im.Digest.String())
	}
	return out
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
	// Whatever the record says: a publish may have crashed after mounting
	// the upper's filesystem. Before RemoveAll, which must not delete
	// through a mount.
	if err := unmountUpper(dirs); err != nil {
		return err
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
// layer; for a persistent clone it only unmounts the bind (the clone's
// writes stay, see clone.go). A target that is not mounted, or gone, is
// success.
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
	logger.Info("Volume unpublished", "images", rec.Refs())
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// NodeGetVolumeStats reports the bytes and inodes used by the volume's
// writable layer and the space left on the filesystem that holds it; for a
// persistent clone, the usage of the clone's own filesystem.
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
		if st, _ := volumes.ReadCloneStage(d.root, volID); st != nil && volumes.CheckCloneID(volID) == nil && st.StagingPath == filepath.Clean(p) {
			return d.cloneStats(volID) // asked for the staging path
		}
		return nil, errorf(codes.NotFound, "volume %s is not published at %s on this node", volID, p)
	}
	if rec.Clone {
		return d.cloneStats(volID)
	}
	if rec.UpperBytes > 0 && !rec.ReadOnly {
		return upperStats(dirs)
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
