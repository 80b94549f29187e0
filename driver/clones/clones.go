// Package clones owns persistent clones: writable volumes provisioned
// through a StorageClass whose writes outlive their mounts. A clone keeps
// its writes in clones/<volumeID>/ on its node (package state names the
// files): clone.json pins the stack it was made from, disk.img is its own
// ext4 filesystem (package clonefs) sized to its capacity, holding the
// overlay's upper and work directories. Stage mounts that filesystem and the
// overlay at the staging path (each publish then binds the staging path to
// a pod's target, in the volume engine); Unstage unmounts. Only the
// deletion of the volume removes the clone: Delete (DeleteVolume in
// --mode=all), else the node's sweep once its PersistentVolume is gone
// (sweep.go).
package clones

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/clonefs"
	"github.com/strata-csi/strata/driver/credentials"
	"github.com/strata-csi/strata/driver/engine"
	"github.com/strata-csi/strata/driver/mount"
	"github.com/strata-csi/strata/driver/state"
	"github.com/strata-csi/strata/internal/fault"
	"github.com/strata-csi/strata/layercache"
)

// DefaultCapacity is the size of a clone whose claim requests none.
const DefaultCapacity int64 = 1 << 30

// ErrInUse: the clone is staged or published, and cannot be unstaged or
// removed until its pods are gone.
var ErrInUse = fault.New(fault.Precondition, "clone in use")

// Clones stages, unstages and removes the persistent clones of one node.
type Clones struct {
	root, nodeID, driverName string
	engine                   *engine.Engine
	store                    *layercache.Store
	locks                    *engine.Locks
	// onChange is told when a stage or a removal changed the node's
	// disk use (SetOnChange); nil: no one listens.
	onChange func()
}

// SetOnChange makes fn called (it must not block) when a clone's first
// stage has pinned its base, after each stage and after each removal of a
// clone: the node's published storage capacity follows them. Call it
// before the clones are used.
func (c *Clones) SetOnChange(fn func()) { c.onChange = fn }

// changed tells the onChange listener.
func (c *Clones) changed() {
	if c.onChange != nil {
		c.onChange()
	}
}

// New returns the clones of the node whose volume engine is e. locks are
// the CSI front's: the sweep takes a clone's lock as a call does.
func New(e *engine.Engine, locks *engine.Locks, nodeID, driverName string) *Clones {
	return &Clones{root: e.Root(), nodeID: nodeID, driverName: driverName, engine: e, store: e.Store(), locks: locks}
}

// StageRequest is one NodeStageVolume of a clone, validated.
type StageRequest struct {
	VolumeID, StagingPath string
	ReadOnly              bool
	Attrs                 engine.Attributes
	// Secrets is the volume's node-publish secret (without the pod's
	// tokens).
	Secrets map[string]string
}

// Stage mounts a clone's overlay at the staging path, making the clone at
// its first stage. The caller holds engine.CloneLock.
func (c *Clones) Stage(ctx context.Context, req StageRequest) error {
	volID, staging, readOnly := req.VolumeID, req.StagingPath, req.ReadOnly
	logger := klog.FromContext(ctx).WithValues("volumeID", volID, "stagingPath", staging, "image", req.Attrs.Image)
	clone, err := state.ReadClone(c.root, volID)
	if err != nil {
		return err
	}
	if clone != nil && !slices.Equal(clone.Refs(), req.Attrs.Images()) {
		return fault.Errorf(engine.ErrBaseChanged, "volume %s is a clone of %s, but its volume context now names %s: a clone's base never changes; create a new volume for another image",
			volID, engine.DescribeStack(clone.Refs()), engine.DescribeStack(req.Attrs.Images()))
	}
	stage, err := state.ReadCloneStage(c.root, volID)
	if err != nil {
		return err
	}
	mounted, err := mount.IsMountPoint(staging)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("check staging path %s: %w", staging, err)
	}
	ours := stage != nil && stage.StagingPath == staging
	switch {
	case mounted && ours && stage.ReadOnly == readOnly:
		logger.V(2).Info("Clone already staged")
		return nil
	case mounted && ours:
		return fault.Errorf(engine.ErrConflict, "volume %s is already staged at %s with readOnly %v", volID, staging, stage.ReadOnly)
	case mounted:
		return fault.Errorf(engine.ErrConflict, "staging path %s is already a mount point that %s did not make", staging, c.driverName)
	case stage != nil && stage.StagingPath != staging:
		if other, _ := mount.IsMountPoint(stage.StagingPath); other {
			return fault.Errorf(ErrInUse, "volume %s is already staged on this node at %s: unstage it there first", volID, stage.StagingPath)
		}
	}

	start := time.Now()
	created := clone == nil
	if clone, err = c.stage(ctx, logger, clone, req); err != nil {
		// The clone stays (its record pins its base); only what this
		// stage mounted goes.
		if uerr := clonefs.Unmount(state.CloneDir(c.root, volID)); uerr != nil {
			logger.Error(uerr, "Could not unmount the filesystem of a clone whose stage failed")
		}
		if rerr := state.RemoveCloneStage(c.root, volID); rerr != nil {
			logger.Error(rerr, "Could not forget the stage of a clone whose stage failed")
		}
		return err
	}
	logger.Info("Clone staged", "created", created, "digests", engine.StackDigests(clone.Stack), "layers", len(clone.Layers),
		"capacityBytes", clone.CapacityBytes, "readOnly", readOnly, "duration", time.Since(start).Round(time.Microsecond))
	c.changed()
	return nil
}

// stage does the work of Stage: make the clone (prepare), mount its
// filesystem, and mount the overlay at the staging path.
func (c *Clones) stage(ctx context.Context, logger klog.Logger, clone *state.Clone, req StageRequest) (*state.Clone, error) {
	volID := req.VolumeID
	clone, err := c.prepare(ctx, logger, clone, req)
	if err != nil {
		return nil, err
	}
	paths := state.ClonePathsOf(c.root, volID)
	if _, err := clonefs.Mount(ctx, paths.Dir); err != nil {
		return nil, err
	}
	for _, p := range []string{paths.Upper, paths.Work} {
		if err := os.MkdirAll(p, 0o755); err != nil {
			return nil, fmt.Errorf("clone %s: %w", volID, err)
		}
	}
	lowers, err := c.engine.LowerDirs(clone.Layers)
	if err != nil {
		return nil, err
	}
	ov := mount.Overlay{Lowers: lowers}
	if req.ReadOnly {
		// No upper: the clone's writes are the topmost lower, read-only.
		// Its whiteouts and opaque directories hide what is below them,
		// as they do in the upper.
		ov.Lowers, ov.ReadOnly = append([]string{paths.Upper}, lowers...), true
	} else {
		// Not volatile: the writes must survive a crash. The upper options
		// (package mount) are those of every writable publish, so that
		// `strata commit` reads a clone's upper as it reads a pod's.
		ov.Upper, ov.Work = paths.Upper, paths.Work
	}
	if err := os.MkdirAll(req.StagingPath, 0o750); err != nil {
		return nil, fmt.Errorf("create staging path %s: %w", req.StagingPath, err)
	}
	if err := state.WriteCloneStage(c.root, volID, &state.CloneStage{StagingPath: req.StagingPath, ReadOnly: req.ReadOnly, Staged: time.Now().UTC()}); err != nil {
		return nil, fmt.Errorf("record stage of clone %s: %w", volID, err)
	}
	if err := mount.MountOverlay(ov, req.StagingPath); err != nil {
		return nil, err
	}
	return clone, nil
}

// prepare makes the clone, whatever it takes, short of mounting it: at the
// first stage (clone nil) it resolves the stack and pins it in clone.json
// before anything else exists; later stages use the pinned digests, never
// the tags. Then the layers are fetched and referenced for the clone and
// its filesystem made: a copy of its source's (copyDisk) for a clone of a
// claim, else a fresh one.
func (c *Clones) prepare(ctx context.Context, logger klog.Logger, clone *state.Clone, req StageRequest) (*state.Clone, error) {
	volID := req.VolumeID
	refs := req.Attrs.Images()
	policy := req.Attrs.PullPolicy
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
	// A clone of a claim starts from the source clone's pinned stack.
	var src *state.Clone
	if clone == nil && req.Attrs.CloneOf != "" {
		var err error
		if src, refs, err = c.source(volID, req.Attrs); err != nil {
			return nil, err
		}
		if policy != layercache.PullNever {
			policy = layercache.PullIfNotPresent
		}
	}
	// No pod is known at stage (kubelet passes the pod to publishes only):
	// the pull is reported in the metrics, not as events.
	stack, err := c.engine.Resolve(ctx, logger, refs, policy, req.Secrets, credentials.Pod{}, volID)
	if err != nil {
		return nil, err
	}
	if clone == nil {
		capacity := req.Attrs.CloneCapacity
		if capacity == 0 {
			capacity = DefaultCapacity
		}
		clone = &state.Clone{VolumeID: volID, CapacityBytes: capacity, Layers: stack.Layers, Created: time.Now().UTC()}
		for i, d := range stack.Digests() {
			clone.Stack = append(clone.Stack, state.StackImage{Image: refs[i], Digest: d})
		}
		if src != nil {
			if clone, err = fromSource(clone, src, req.Attrs.CloneCapacity); err != nil {
				return nil, err
			}
		}
		// Pinned on disk before anything it describes exists: a crash
		// from here on leaves a clone whose next stage goes on from its
		// record, with the same base.
		if err := state.WriteClone(c.root, clone); err != nil {
			return nil, fmt.Errorf("record clone %s: %w", volID, err)
		}
		logger.Info("Clone created: base pinned", "digests", engine.StackDigests(clone.Stack), "capacityBytes", clone.CapacityBytes, "cloneOf", clone.CloneOf)
		// Its record reserves its room (package capacity) while the
		// layers are pulled.
		c.changed()
	} else if !slices.Equal(stack.Layers, clone.Layers) {
		return nil, fmt.Errorf("clone %s: its pinned images %v now resolve to other layers than the %d it was made on: %w",
			volID, refs, len(clone.Layers), layercache.ErrDigestMismatch)
	}
	if err := c.engine.Fetch(ctx, clone.Owner(), stack); err != nil {
		return nil, err
	}
	if clone.CloneOf != "" {
		if err := c.copyDisk(ctx, logger, clone); err != nil {
			return nil, err
		}
	}
	if err := clonefs.Create(ctx, state.CloneDir(c.root, volID), clone.CapacityBytes); err != nil {
		return nil, err
	}
	return clone, nil
}

// pinnedRefs turns a clone's stack into references by digest, in the
// repository each image came from.
func pinnedRefs(stack []state.StackImage) ([]string, error) {
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

// Unstage unmounts a clone's overlay and its filesystem. The clone stays,
// with its layer references, for its next stage. A volume that is no clone
// on this node was never staged: success. The caller holds
// engine.CloneLock.
func (c *Clones) Unstage(ctx context.Context, volID, staging string) error {
	logger := klog.FromContext(ctx).WithValues("volumeID", volID, "stagingPath", staging)
	clone, err := state.ReadClone(c.root, volID)
	if err != nil {
		return err
	}
	if clone == nil {
		logger.V(4).Info("Nothing to unstage: the volume is not a clone on this node")
		return nil
	}
	stage, err := state.ReadCloneStage(c.root, volID)
	if err != nil {
		return err
	}
	if stage != nil && stage.StagingPath != staging {
		if other, _ := mount.IsMountPoint(stage.StagingPath); other {
			// Kubelet stages a volume once per node; another path is not
			// this volume's stage, and it stays.
			logger.Info("Clone is staged at another path; leaving it", "stagedAt", stage.StagingPath)
			return nil
		}
	}
	// Unmounting would succeed under the pods' binds, and leave the
	// clone's filesystem alive out of sight: refuse instead.
	targets, err := c.publishes(volID)
	if err != nil {
		return err
	}
	if len(targets) > 0 {
		return fault.Errorf(ErrInUse, "volume %s is still published at %s: unpublish it from every pod first",
			volID, strings.Join(targets, ", "))
	}
	if err := mount.Unmount(staging); err != nil {
		return fmt.Errorf("unmount staging path %s: %w", staging, err)
	}
	if err := clonefs.Unmount(state.CloneDir(c.root, volID)); err != nil {
		if errors.Is(err, syscall.EBUSY) {
			return fault.Errorf(ErrInUse, "volume %s: %v: unpublish it from every pod first", volID, err)
		}
		return err
	}
	if err := state.RemoveCloneStage(c.root, volID); err != nil {
		return err
	}
	logger.Info("Clone unstaged; its writes stay on the node", "images", clone.Refs())
	return nil
}

// inUse reports whether clone id is in use on this node, and where: its
// filesystem or its recorded staging path is mounted, a publish of it is,
// or its disk image is still on a loop device. The last catches what the
// others cannot see: overlayfs holds its upper's filesystem through a
// private mount, so the clone's filesystem stays alive (and its image
// attached) while any bind of its overlay does, even once fs/ and the
// staging path are unmounted.
func (c *Clones) inUse(id string) (bool, string, error) {
	paths := state.ClonePathsOf(c.root, id)
	if mp, err := mount.IsMountPoint(paths.FS); err == nil && mp {
		return true, paths.FS, nil
	} else if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return false, "", err
	}
	stage, err := state.ReadCloneStage(c.root, id)
	if err != nil {
		return false, "", err
	}
	if stage != nil {
		if mp, _ := mount.IsMountPoint(stage.StagingPath); mp {
			return true, stage.StagingPath, nil
		}
	}
	if targets, err := c.publishes(id); err != nil || len(targets) > 0 {
		return len(targets) > 0, strings.Join(targets, ", "), err
	}
	if dev, err := clonefs.LoopOf(paths.Image); err != nil || dev != "" {
		return dev != "", "/dev/" + dev, err
	}
	return false, "", nil
}

// publishes lists the targets where clone id is published (a bind of its
// staged overlay that is still mounted).
func (c *Clones) publishes(id string) ([]string, error) {
	vols, err := state.List(c.root)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, v := range vols {
		if !v.Clone || v.VolumeID != id {
			continue
		}
		if mp, _ := mount.IsMountPoint(v.TargetPath); mp {
			out = append(out, v.TargetPath)
		}
	}
	return out, nil
}

// Delete removes clone id from this node, if it is here: its directory
// (disk image included), then its layer references. A clone in use is
// ErrInUse. why goes to the log. The caller holds engine.CloneLock.
func (c *Clones) Delete(logger klog.Logger, id, why string) error {
	paths := state.ClonePathsOf(c.root, id)
	if _, err := os.Lstat(paths.Dir); errors.Is(err, fs.ErrNotExist) {
		// Not here, or removed by an earlier call that may have crashed
		// before it released the references.
		return c.store.Release(state.CloneOwner(id))
	} else if err != nil {
		return err
	}
	used, where, err := c.inUse(id)
	if err != nil {
		return err
	}
	if used {
		return fault.Errorf(ErrInUse, "volume %s is still staged on node %s (at %s): delete the pods that use it first", id, c.nodeID, where)
	}
	clone, err := state.ReadClone(c.root, id)
	if err != nil {
		logger.Error(err, "Removing a clone whose record is unreadable")
	}
	freed := diskBytes(paths.Image)
	// The directory goes first: a crash before the release leaves
	// references without a clone, which Recover releases; the other order
	// could leave a clone whose base a prune may evict.
	if err := clonefs.Remove(paths.Dir); err != nil {
		return err
	}
	if err := c.store.Release(state.CloneOwner(id)); err != nil {
		return err
	}
	var images []string
	if clone != nil {
		images = clone.Refs()
	}
	logger.Info("Removed a persistent clone and its writes", "reason", why, "images", images, "bytesFreed", freed)
	c.changed()
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
