package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/clonefs"
	"github.com/strata-csi/strata/driver/credentials"
	"github.com/strata-csi/strata/driver/mount"
	"github.com/strata-csi/strata/driver/volumes"
	"github.com/strata-csi/strata/layercache"
)

// A persistent clone (a writable volume provisioned through a StorageClass,
// see CreateVolume) keeps its writes in clones/<volumeID>/ on its node:
// clone.json pins the stack it was made from, disk.img is its own ext4
// filesystem (package clonefs) sized to its capacity, holding the overlay's
// upper and work directories. NodeStageVolume mounts that filesystem and
// the overlay at the staging path; each NodePublishVolume binds the staging
// path to a pod's target. Unpublish and unstage unmount; only the deletion
// of the volume removes the clone (DeleteVolume in --mode=all, else the
// node's sweep once its PersistentVolume is gone).

// cloneLock is the in-flight key of a clone's stage, unstage and removal.
func cloneLock(id string) string { return "clone\x00" + id }

// cloneDir is the directory of clone id under the state root.
func (d *Driver) cloneDir(id string) string { return volumes.CloneDir(d.root, id) }

// NodeStageVolume mounts a clone's overlay at the staging path, making the
// clone at its first stage. For a volume that is the image itself there is
// nothing to stage: its publishes mount it.
func (d *Driver) NodeStageVolume(ctx context.Context, req *csi.NodeStageVolumeRequest) (*csi.NodeStageVolumeResponse, error) {
	volID, staging := req.GetVolumeId(), req.GetStagingTargetPath()
	attrs, err := checkNodeRequest("NodeStageVolume", volID, "staging target path", staging, req.GetVolumeCapability(), req.GetVolumeContext())
	if err != nil {
		return nil, err
	}
	logger := klog.FromContext(ctx).WithValues("volumeID", volID, "stagingPath", staging, "image", attrs.Image)
	if !attrs.Clone {
		logger.V(4).Info("Nothing to stage: the volume is the image, mounted at each publish")
		return &csi.NodeStageVolumeResponse{}, nil
	}
	if err := volumes.CheckCloneID(volID); err != nil {
		return nil, invalid("NodeStageVolume: %v", err)
	}
	staging = filepath.Clean(staging)
	readOnly := readOnlyMode(req.GetVolumeCapability())
	_, secrets, err := identityOf(req.GetVolumeContext(), req.GetSecrets())
	if err != nil {
		return nil, err
	}
	lock := cloneLock(volID)
	if !d.inflight.tryLock(lock) {
		return nil, errorf(codes.Aborted, "another operation on volume %s is in progress", volID)
	}
	defer d.inflight.unlock(lock)

	clone, err := volumes.ReadClone(d.root, volID)
	if err != nil {
		return nil, err
	}
	if clone != nil && !slices.Equal(clone.Refs(), attrs.Images()) {
		return nil, errorf(codes.FailedPrecondition, "volume %s is a clone of %s, but its volume context now names %s: a clone's base never changes; create a new volume for another image",
			volID, describeStack(clone.Refs()), describeStack(attrs.Images()))
	}
	stage, err := volumes.ReadCloneStage(d.root, volID)
	if err != nil {
		return nil, err
	}
	mounted, err := mount.IsMountPoint(staging)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("check staging path %s: %w", staging, err)
	}
	ours := stage != nil && stage.StagingPath == staging
	switch {
	case mounted && ours && stage.ReadOnly == readOnly:
		logger.V(2).Info("Clone already staged")
		return &csi.NodeStageVolumeResponse{}, nil
	case mounted && ours:
		return nil, errorf(codes.AlreadyExists, "volume %s is already staged at %s with readOnly %v", volID, staging, stage.ReadOnly)
	case mounted:
		return nil, errorf(codes.AlreadyExists, "staging path %s is already a mount point that %s did not make", staging, d.name)
	case stage != nil && stage.StagingPath != staging:
		if other, _ := mount.IsMountPoint(stage.StagingPath); other {
			return nil, errorf(codes.FailedPrecondition, "volume %s is already staged on this node at %s: unstage it there first", volID, stage.StagingPath)
		}
	}

	start := time.Now()
	created := clone == nil
	if clone, err = d.stageClone(ctx, logger, volID, clone, attrs, secrets, staging, readOnly); err != nil {
		// The clone stays (its record pins its base); only what this
		// stage mounted goes.
		if uerr := clonefs.Unmount(d.cloneDir(volID)); uerr != nil {
			logger.Error(uerr, "Could not unmount the filesystem of a clone whose stage failed")
		}
		if rerr := volumes.RemoveCloneStage(d.root, volID); rerr != nil {
			logger.Error(rerr, "Could not forget the stage of a clone whose stage failed")
		}
		return nil, err
	}
	logger.Info("Clone staged", "created", created, "digests", cloneDigests(clone), "layers", len(clone.Layers),
		"capacityBytes", clone.CapacityBytes, "readOnly", readOnly, "duration", time.Since(start).Round(time.Microsecond))
	return &csi.NodeStageVolumeResponse{}, nil
}

// stageClone does the work of NodeStageVolume for a clone: at the first
// stage (clone nil) it resolves the stack and pins it in clone.json before
// anything else exists; later stages use the pinned digests, never the
// tags. Then the layers are ensured and referenced for the clone, its
// filesystem made and mounted, and the overlay mounted at staging.
func (d *Driver) stageClone(ctx context.Context, logger klog.Logger, volID string, clone *volumes.Clone, attrs volumeAttributes,
	secrets map[string]string, staging string, readOnly bool) (*volumes.Clone, error) {
	refs := attrs.Images()
	policy := attrs.PullPolicy
	if clone != nil {
		// The pinned digests, which the cache resolves offline.
		var err error
		if refs, err = pinnedRefs(clone.Stack); err != nil {
			return nil, err
		}
		if policy != layercache.PullNever {
			policy = layercache.PullIfNotPresent
		}
	}
	// No pod is known at stage (kubelet passes the pod to publishes only):
	// the pull is reported in the metrics, not as events.
	pull := newPullTracker(d.metrics, d.events, podRef{}, refs, volID)
	o := layercache.PullOptions{Policy: policy, Progress: pull.progress}
	stack, err := d.resolveStack(ctx, logger, refs, o, secrets, credentials.Pod{}, pull)
	if err != nil {
		return nil, err
	}
	layers := stackLayers(stack)
	if err := checkDepth(refs, len(layers)); err != nil {
		return nil, err
	}
	if clone == nil {
		capacity := attrs.CloneCapacity
		if capacity == 0 {
			capacity = DefaultCloneCapacity
		}
		clone = &volumes.Clone{VolumeID: volID, CapacityBytes: capacity, Layers: layers, Created: time.Now().UTC()}
		for i, ref := range refs {
			clone.Stack = append(clone.Stack, volumes.StackImage{Image: ref, Digest: stack[i].img.Digest})
		}
		// Pinned on disk before anything it describes exists: a crash
		// from here on leaves a clone whose next stage goes on from its
		// record, with the same base.
		if err := volumes.WriteClone(d.root, clone); err != nil {
			return nil, fmt.Errorf("record clone %s: %w", volID, err)
		}
		logger.Info("Clone created: base pinned", "digests", cloneDigests(clone), "capacityBytes", capacity)
	} else if !slices.Equal(layers, clone.Layers) {
		return nil, fmt.Errorf("clone %s: its pinned images %v now resolve to other layers than the %d it was made on: %w",
			volID, refs, len(clone.Layers), layercache.ErrDigestMismatch)
	}
	if err := d.ensureAndAcquire(ctx, clone.Owner(), fetchPlan(stack), clone.Layers, pull); err != nil {
		return nil, err
	}
	dir := d.cloneDir(volID)
	if err := clonefs.Create(ctx, dir, clone.CapacityBytes); err != nil {
		return nil, err
	}
	if _, err := clonefs.Mount(ctx, dir); err != nil {
		return nil, err
	}
	upper, work := volumes.CloneUpper(d.root, volID), volumes.CloneWork(d.root, volID)
	for _, p := range []string{upper, work} {
		if err := os.MkdirAll(p, 0o755); err != nil {
			return nil, fmt.Errorf("clone %s: %w", volID, err)
		}
	}
	lowers, err := d.lowerDirs(clone.Layers)
	if err != nil {
		return nil, err
	}
	ov := mount.Overlay{Lowers: lowers}
	if readOnly {
		// No upper: the clone's writes are the topmost lower, read-only.
		// Its whiteouts and opaque directories hide what is below them,
		// as they do in the upper.
		ov.Lowers, ov.ReadOnly = append([]string{upper}, lowers...), true
	} else {
		// Not volatile: the writes must survive a crash. The upper options
		// (package mount) are those of every writable publish, so that
		// `strata commit` reads a clone's upper as it reads a pod's.
		ov.Upper, ov.Work = upper, work
	}
	if err := os.MkdirAll(staging, 0o750); err != nil {
		return nil, fmt.Errorf("create staging path %s: %w", staging, err)
	}
	if err := volumes.WriteCloneStage(d.root, volID, &volumes.CloneStage{StagingPath: staging, ReadOnly: readOnly, Staged: time.Now().UTC()}); err != nil {
		return nil, fmt.Errorf("record stage of clone %s: %w", volID, err)
	}
	if err := mount.MountOverlay(ov, staging); err != nil {
		return nil, err
	}
	return clone, nil
}

// lowerDirs returns the cache directories of layers (bottom first) in
// overlayfs order, top first.
func (d *Driver) lowerDirs(layers []v1.Hash) ([]string, error) {
	lowers := make([]string, 0, len(layers))
	for i := len(layers) - 1; i >= 0; i-- {
		dir, err := d.store.LayerDir(layers[i])
		if err != nil {
			return nil, err
		}
		lowers = append(lowers, dir)
	}
	return lowers, nil
}

// pinnedRefs turns a clone's stack into references by digest, in the
// repository each image came from.
func pinnedRefs(stack []volumes.StackImage) ([]string, error) {
	out := make([]string, 0, len(stack))
	for _, im := range stack {
		ref, err := name.ParseReference(im.Image)
		if err != nil {
			return nil, fmt.Errorf("clone image %q: %w", im.Image, err)
		}
		out = append(out, ref.Context().Digest(im.Digest.String()).String())
	}
	return out, nil
}

// cloneDigests lists a clone's pinned digests, bottom first, for the log.
func cloneDigests(c *volumes.Clone) []string {
	var out []string
	for _, im := range c.Stack {
		out = append(out, im.Digest.String())
	}
	return out
}

// NodeUnstageVolume unmounts a clone's overlay and its filesystem. The
// clone stays, with its layer references, for its next stage. A volume
// that is not a clone was never staged: success.
func (d *Driver) NodeUnstageVolume(ctx context.Context, req *csi.NodeUnstageVolumeRequest) (*csi.NodeUnstageVolumeResponse, error) {
	volID, staging := req.GetVolumeId(), req.GetStagingTargetPath()
	if volID == "" {
		return nil, invalid("NodeUnstageVolume: volume id is required")
	}
	if staging == "" {
		return nil, invalid("NodeUnstageVolume %s: staging target path is required", volID)
	}
	if volumes.CheckCloneID(volID) != nil {
		return &csi.NodeUnstageVolumeResponse{}, nil // cannot be a clone
	}
	staging = filepath.Clean(staging)
	logger := klog.FromContext(ctx).WithValues("volumeID", volID, "stagingPath", staging)
	lock := cloneLock(volID)
	if !d.inflight.tryLock(lock) {
		return nil, errorf(codes.Aborted, "another operation on volume %s is in progress", volID)
	}
	defer d.inflight.unlock(lock)
	clone, err := volumes.ReadClone(d.root, volID)
	if err != nil {
		return nil, err
	}
	if clone == nil {
		logger.V(4).Info("Nothing to unstage: the volume is not a clone on this node")
		return &csi.NodeUnstageVolumeResponse{}, nil
	}
	stage, err := volumes.ReadCloneStage(d.root, volID)
	if err != nil {
		return nil, err
	}
	if stage != nil && stage.StagingPath != staging {
		if other, _ := mount.IsMountPoint(stage.StagingPath); other {
			// Kubelet stages a volume once per node; another path is not
			// this volume's stage, and it stays.
			logger.Info("Clone is staged at another path; leaving it", "stagedAt", stage.StagingPath)
			return &csi.NodeUnstageVolumeResponse{}, nil
		}
	}
	// Unmounting would succeed under the pods' binds, and leave the
	// clone's filesystem alive out of sight: refuse instead.
	targets, err := d.clonePublishes(volID)
	if err != nil {
		return nil, err
	}
	if len(targets) > 0 {
		return nil, errorf(codes.FailedPrecondition, "volume %s is still published at %s: unpublish it from every pod first",
			volID, strings.Join(targets, ", "))
	}
	if err := mount.Unmount(staging); err != nil {
		return nil, fmt.Errorf("unmount staging path %s: %w", staging, err)
	}
	if err := clonefs.Unmount(d.cloneDir(volID)); err != nil {
		if errors.Is(err, syscall.EBUSY) {
			return nil, errorf(codes.FailedPrecondition, "volume %s: %v: unpublish it from every pod first", volID, err)
		}
		return nil, err
	}
	if err := volumes.RemoveCloneStage(d.root, volID); err != nil {
		return nil, err
	}
	logger.Info("Clone unstaged; its writes stay on the node", "images", clone.Refs())
	return &csi.NodeUnstageVolumeResponse{}, nil
}

// publishClone binds the staged overlay of a clone (its staging path) to
// the target, read-only when the publish or the stage is. The publish's
// record says it is a clone's bind: undoing it only unmounts the bind.
func (d *Driver) publishClone(rec *volumeRecord) error {
	volID := rec.VolumeID
	if err := volumes.CheckCloneID(volID); err != nil {
		return invalid("NodePublishVolume: %v", err)
	}
	clone, err := volumes.ReadClone(d.root, volID)
	if err != nil {
		return err
	}
	stage, err := volumes.ReadCloneStage(d.root, volID)
	if err != nil {
		return err
	}
	staged, _ := mount.IsMountPoint(rec.StagingPath)
	if clone == nil || stage == nil || stage.StagingPath != rec.StagingPath || !staged {
		return errorf(codes.FailedPrecondition, "volume %s is not staged at %s on this node: NodeStageVolume must come first", volID, rec.StagingPath)
	}
	if !slices.Equal(clone.Refs(), rec.Refs()) {
		return errorf(codes.FailedPrecondition, "volume %s is a clone of %s, but its volume context now names %s",
			volID, describeStack(clone.Refs()), describeStack(rec.Refs()))
	}
	rec.Stack = slices.Clone(clone.Stack)
	rec.Digest, rec.Layers = clone.Stack[0].Digest, slices.Clone(clone.Layers)
	rec.Published = time.Now().UTC()
	dirs := d.dirsOf(volumeKey(volID, rec.TargetPath))
	if err := os.MkdirAll(dirs.dir, 0o700); err != nil {
		return err
	}
	if err := writeRecord(dirs.record, rec); err != nil {
		return fmt.Errorf("record volume: %w", err)
	}
	if err := os.MkdirAll(rec.TargetPath, 0o750); err != nil {
		return fmt.Errorf("create target %s: %w", rec.TargetPath, err)
	}
	if err := mount.BindBeneath(rec.StagingPath, rec.SubPath, rec.TargetPath, rec.ReadOnly || stage.ReadOnly); err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, mount.ErrNotDir) {
			return invalid("volume attribute subPath %q: %v", rec.SubPath, err)
		}
		return err
	}
	return nil
}

// cloneStaged reports whether clone id is in use on this node, and where:
// its filesystem or its recorded staging path is mounted, a publish of it
// is, or its disk image is still on a loop device. The last catches what
// the others cannot see: overlayfs holds its upper's filesystem through a
// private mount, so the clone's filesystem stays alive (and its image
// attached) while any bind of its overlay does, even once dir/fs and the
// staging path are unmounted.
func (d *Driver) cloneStaged(id string) (bool, string, error) {
	fsDir := filepath.Join(d.cloneDir(id), volumes.CloneFSDir)
	if mp, err := mount.IsMountPoint(fsDir); err == nil && mp {
		return true, fsDir, nil
	} else if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return false, "", err
	}
	stage, err := volumes.ReadCloneStage(d.root, id)
	if err != nil {
		return false, "", err
	}
	if stage != nil {
		if mp, _ := mount.IsMountPoint(stage.StagingPath); mp {
			return true, stage.StagingPath, nil
		}
	}
	if targets, err := d.clonePublishes(id); err != nil || len(targets) > 0 {
		return len(targets) > 0, strings.Join(targets, ", "), err
	}
	img := filepath.Join(d.cloneDir(id), clonefs.ImageFile)
	if dev, err := loopOf(img); err != nil || dev != "" {
		return dev != "", "/dev/" + dev, err
	}
	return false, "", nil
}

// clonePublishes lists the targets where clone id is published (a bind of
// its staged overlay that is still mounted).
func (d *Driver) clonePublishes(id string) ([]string, error) {
	recs, err := d.records()
	if err != nil {
		return nil, err
	}
	var out []string
	for _, rec := range recs {
		if !rec.Clone || rec.VolumeID != id {
			continue
		}
		if mp, _ := mount.IsMountPoint(rec.TargetPath); mp {
			out = append(out, rec.TargetPath)
		}
	}
	return out, nil
}

// loopOf returns the name of a loop device whose backing file is img ("" if
// none), compared by device and inode number, which hold in any mount
// namespace (the path in sysfs does not). A missing img has none.
func loopOf(img string) (string, error) {
	var st unix.Stat_t
	if err := unix.Stat(img, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return "", nil
		}
		return "", fmt.Errorf("stat %s: %w", img, err)
	}
	paths, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, p := range paths {
		name := filepath.Base(filepath.Dir(filepath.Dir(p)))
		f, err := os.OpenFile("/dev/"+name, os.O_RDONLY, 0)
		if err != nil {
			continue // released meanwhile, or no device node here
		}
		info, err := unix.IoctlLoopGetStatus64(int(f.Fd()))
		f.Close()
		if err == nil && info.Device == st.Dev && info.Inode == st.Ino {
			return name, nil
		}
	}
	return "", nil
}

// deleteLocalClone removes clone id from this node, if it is here: its
// directory (disk image included), then its layer references. A staged
// clone is FailedPrecondition. why goes to the log.
func (d *Driver) deleteLocalClone(logger klog.Logger, id, why string) error {
	lock := cloneLock(id)
	if !d.inflight.tryLock(lock) {
		return errorf(codes.Aborted, "another operation on volume %s is in progress", id)
	}
	defer d.inflight.unlock(lock)
	dir := d.cloneDir(id)
	if _, err := os.Lstat(dir); errors.Is(err, fs.ErrNotExist) {
		// Not here, or removed by an earlier call that may have crashed
		// before it released the references.
		return d.store.Release(volumes.CloneOwner(id))
	} else if err != nil {
		return err
	}
	staged, where, err := d.cloneStaged(id)
	if err != nil {
		return err
	}
	if staged {
		return errorf(codes.FailedPrecondition, "volume %s is still staged on node %s (at %s): delete the pods that use it first", id, d.nodeID, where)
	}
	clone, err := volumes.ReadClone(d.root, id)
	if err != nil {
		logger.Error(err, "Removing a clone whose record is unreadable")
	}
	freed := diskBytes(filepath.Join(dir, clonefs.ImageFile))
	// The directory goes first: a crash before the release leaves
	// references without a clone, which Recover releases; the other order
	// could leave a clone whose base a prune may evict.
	if err := clonefs.Remove(dir); err != nil {
		return err
	}
	if err := d.store.Release(volumes.CloneOwner(id)); err != nil {
		return err
	}
	var images []string
	if clone != nil {
		images = clone.Refs()
	}
	logger.Info("Removed a persistent clone and its writes", "reason", why, "images", images, "bytesFreed", freed)
	return nil
}

// diskBytes is what the file at p takes on disk (0 if it is missing).
func diskBytes(p string) int64 {
	info, err := os.Stat(p)
	if err != nil {
		return 0
	}
	if st, ok := info.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return info.Size()
}

// cloneStats reports a clone's filesystem.
func (d *Driver) cloneStats(id string) (*csi.NodeGetVolumeStatsResponse, error) {
	return fsStats(d.cloneDir(id))
}

// recoverClones runs at start: every clone on the node keeps its layer
// references (a power failure can lose a reference file, which is not
// fsynced), and references of clones that are gone (a removal that crashed
// between its two steps) are released. Clone mounts are left alone: the
// pods that use them go on running while the plugin restarts.
func (d *Driver) recoverClones(owners map[string][]v1.Hash) (kept, released int, err error) {
	entries, err := os.ReadDir(filepath.Join(d.root, volumes.ClonesDir))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return 0, 0, err
	}
	have := map[string]bool{}
	for _, e := range entries {
		id := e.Name()
		if !e.IsDir() || volumes.CheckCloneID(id) != nil {
			continue
		}
		have[volumes.CloneOwner(id)] = true
		c, err := volumes.ReadClone(d.root, id)
		if err != nil {
			klog.ErrorS(err, "Unreadable clone record; leaving the clone for an operator", "volumeID", id)
			continue
		}
		if c == nil {
			continue // a removal that crashed half-way; the sweep finishes it
		}
		if err := d.store.Acquire(c.Owner(), c.Layers); err != nil {
			// Its next stage fetches them again.
			klog.ErrorS(err, "A clone's base layers are missing from the cache", "volumeID", id, "images", c.Refs())
		}
		kept++
	}
	for owner := range owners {
		id, ok := strings.CutPrefix(owner, volumes.CloneOwnerPrefix)
		if !ok || have[owner] {
			continue
		}
		if err := d.store.Release(owner); err != nil {
			return kept, released, err
		}
		klog.InfoS("Released the layers of a clone that no longer exists", "volumeID", id)
		released++
	}
	return kept, released, nil
}
