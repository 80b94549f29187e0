package clones

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"

	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/clonefs"
	"github.com/strata-csi/strata/driver/engine"
	"github.com/strata-csi/strata/driver/state"
	"github.com/strata-csi/strata/internal/fault"
	"github.com/strata-csi/strata/layercache"
)

// A clone of a claim (a PersistentVolumeClaim whose dataSource is another
// claim of this driver) starts from the source clone's writes: the
// controller puts the source's volume id in the new volume's context
// (engine.AttrCloneOf) and places the new volume on the source's node. At
// its first stage the new clone takes the source's pinned stack, writes its
// record (with CloneOf) first, as every clone does, references the layers
// for itself, and gets a copy of the source's disk.img (clonefs.Copy, under
// the source's lock), grown to its own capacity. Until that copy is renamed
// into place the clone is "not made": the next stage (or the sweeper's early
// copy) redoes it, and the sweep keeps the source.

// ErrNoSource: the clone a new clone starts from is not on this node (never
// was, or was deleted before the copy).
var ErrNoSource = fault.New(fault.Precondition, "the source clone is not on this node")

// source checks the source of a new clone of a claim, volID, and returns
// its record and the references, by digest, of its pinned stack.
func (c *Clones) source(volID string, attrs engine.Attributes) (*state.Clone, []string, error) {
	id := attrs.CloneOf
	if id == volID {
		return nil, nil, fault.Errorf(engine.ErrInvalid, "volume %s names itself as the clone it starts from (%s)", volID, engine.AttrCloneOf)
	}
	if err := state.CheckCloneID(id); err != nil {
		return nil, nil, fault.Errorf(engine.ErrInvalid, "volume %s: volume attribute %s: %v", volID, engine.AttrCloneOf, err)
	}
	src, err := state.ReadClone(c.root, id)
	if err != nil {
		return nil, nil, fmt.Errorf("volume %s: read its source clone %s: %w", volID, id, err)
	}
	if src == nil {
		return nil, nil, fault.Errorf(ErrNoSource, "volume %s is to start from volume %s, which is not a persistent clone on node %s: a clone of a claim is made on its source's node; check that the source claim still exists and that the new PersistentVolume's node affinity names the source's node",
			volID, id, c.nodeID)
	}
	if !slices.Equal(src.Refs(), attrs.Images()) {
		return nil, nil, fault.Errorf(engine.ErrBaseChanged, "volume %s is to start from clone %s of %s, but its volume context names %s: a clone of a claim has its source's images; create it with the source's StorageClass parameters",
			volID, id, engine.DescribeStack(src.Refs()), engine.DescribeStack(attrs.Images()))
	}
	refs, err := pinnedRefs(src.Stack)
	if err != nil {
		return nil, nil, err
	}
	return src, refs, nil
}

// fromSource makes the record of a new clone of src: src's stack as the
// source named it (clone's own was resolved from src's digests), CloneOf,
// and the capacity asked for (requested; src's when 0), which is at least
// src's.
func fromSource(clone, src *state.Clone, requested int64) (*state.Clone, error) {
	if !slices.Equal(clone.Layers, src.Layers) {
		return nil, fmt.Errorf("clone %s: the pinned images of its source %s now resolve to other layers than the %d it was made on: %w",
			clone.VolumeID, src.VolumeID, len(src.Layers), layercache.ErrDigestMismatch)
	}
	if requested == 0 {
		requested = src.CapacityBytes
	}
	if requested < src.CapacityBytes {
		return nil, fault.Errorf(ErrShrink, "volume %s of %d bytes cannot start from clone %s, which holds %d bytes: request at least the source claim's size",
			clone.VolumeID, requested, src.VolumeID, src.CapacityBytes)
	}
	clone.CapacityBytes = requested
	clone.Stack = slices.Clone(src.Stack)
	clone.CloneOf = src.VolumeID
	return clone, nil
}

// made reports whether clone id's filesystem exists: for a clone of a
// claim, whether the copy of its source is complete.
func (c *Clones) made(id string) bool {
	_, err := os.Lstat(state.ClonePathsOf(c.root, id).Image)
	return err == nil
}

// copyDisk gives clone, a clone of a claim, its copy of the source's
// disk.img, unless it has it. It holds the source's lock meanwhile (busy:
// the caller retries), so that the source is neither unstaged nor removed
// under the copy.
func (c *Clones) copyDisk(ctx context.Context, logger klog.Logger, clone *state.Clone) error {
	if c.made(clone.VolumeID) {
		return nil
	}
	id := clone.CloneOf
	unlock, err := c.locks.TryLock(engine.CloneLock(id), "volume "+id)
	if err != nil {
		return fmt.Errorf("copy the writes of clone %s into clone %s: %w", id, clone.VolumeID, err)
	}
	defer unlock()
	src, err := state.ReadClone(c.root, id)
	if err != nil {
		return fmt.Errorf("volume %s: read its source clone %s: %w", clone.VolumeID, id, err)
	}
	if src == nil {
		return fault.Errorf(ErrNoSource, "volume %s is to start from volume %s, which was deleted from node %s before its writes were copied: delete this claim and clone the source again from a backup",
			clone.VolumeID, id, c.nodeID)
	}
	srcPaths := state.ClonePathsOf(c.root, id)
	if _, err := os.Lstat(srcPaths.Image); errors.Is(err, fs.ErrNotExist) {
		if src.CloneOf != "" {
			return fault.Errorf(engine.ErrBusy, "volume %s is to start from volume %s, itself a clone of %s whose copy is not made yet: retrying",
				clone.VolumeID, id, src.CloneOf)
		}
		// Never staged to the end: the source has no writes, and the new
		// clone starts from the image alone, as the source would.
		logger.Info("The source clone has no filesystem yet (no writes): the new clone gets a fresh one", "cloneOf", id)
		return nil
	} else if err != nil {
		return fmt.Errorf("volume %s: source clone %s: %w", clone.VolumeID, id, err)
	}
	stats, err := clonefs.Copy(ctx, srcPaths.Dir, state.CloneDir(c.root, clone.VolumeID), clone.CapacityBytes)
	if err != nil {
		return fmt.Errorf("volume %s: copy the writes of clone %s: %w", clone.VolumeID, id, err)
	}
	mbps := 0.0
	if s := stats.Duration.Seconds(); s > 0 {
		mbps = float64(stats.Bytes) / 1e6 / s
	}
	logger.Info("Clone's filesystem copied from its source", "cloneOf", id, "bytes", stats.Bytes, "reflink", stats.Reflink,
		"sourceFrozen", stats.Frozen, "grownFromMiB", stats.GrownFromMiB, "capacityBytes", clone.CapacityBytes,
		"duration", stats.Duration, "MBps", int(mbps))
	return nil
}

// ThawAll thaws the filesystem of every clone on this node that a copy
// left frozen when the plugin was killed during it (clonefs.Thaw): call it
// at start-up, before serving. Errors are logged.
func (c *Clones) ThawAll(ctx context.Context) {
	logger := klog.FromContext(ctx)
	err := state.EachClone(c.root, func(id string, _ *state.Clone, _ error) error {
		thawed, err := clonefs.Thaw(state.CloneDir(c.root, id))
		if err != nil {
			logger.Error(err, "Cannot thaw a clone's filesystem; its pods may stay blocked", "volumeID", id)
		} else if thawed {
			logger.Info("Thawed a clone's filesystem that a copy interrupted by a restart left frozen", "volumeID", id)
		}
		return nil
	})
	if err != nil {
		logger.Error(err, "Cannot list the clones on this node")
	}
}
