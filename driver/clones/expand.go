package clones

import (
	"context"
	"fmt"

	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/clonefs"
	"github.com/strata-csi/strata/driver/state"
	"github.com/strata-csi/strata/internal/fault"
)

// Sentinels of Expand. A shrink (clonefs.ErrShrink) is OutOfRange, a size
// the node's disk cannot hold (clonefs.ErrTooBig) NoSpace; both are
// re-exported here for the callers of Expand.
var (
	// ErrShrink: the size asked for is less than the clone's.
	ErrShrink = clonefs.ErrShrink
	// ErrTooBig: the node's disk has less free space than the grown clone
	// could take.
	ErrTooBig = clonefs.ErrTooBig
	// ErrNoClone: the volume is neither a clone nor published on this
	// node.
	ErrNoClone = fault.New(fault.NotFound, "no such volume on this node")
	// ErrNoCapacity: the volume is the image itself, which has no size
	// to grow.
	ErrNoCapacity = fault.New(fault.OutOfRange, "the volume has no capacity")
)

// Expand grows clone volID to hold at least size bytes of writes, while it
// is staged (its filesystem mounted), and records the new size in
// clone.json, after the filesystem holds it (clonefs.Grow says why that
// order survives a crash). It returns the clone's capacity. A size at or
// below the recorded one that the clone already holds changes nothing; a
// size below it is ErrShrink. A volume that is published here but no clone
// (the image itself) is ErrNoCapacity; a volume unknown here ErrNoClone. The
// caller holds engine.CloneLock.
func (c *Clones) Expand(ctx context.Context, volID string, size int64) (int64, error) {
	logger := klog.FromContext(ctx).WithValues("volumeID", volID)
	var clone *state.Clone
	var err error
	if state.CheckCloneID(volID) == nil {
		if clone, err = state.ReadClone(c.root, volID); err != nil {
			return 0, err
		}
	}
	if clone == nil {
		return 0, c.notClone(volID)
	}
	switch {
	case size < clone.CapacityBytes:
		return 0, fault.Errorf(ErrShrink, "volume %s holds %d bytes, more than the requested %d: a clone cannot shrink", volID, clone.CapacityBytes, size)
	case size == clone.CapacityBytes:
		logger.V(4).Info("Clone already has the requested size", "capacityBytes", size)
		return size, nil
	}
	if err := clonefs.Grow(ctx, state.CloneDir(c.root, volID), size); err != nil {
		return 0, err
	}
	old := clone.CapacityBytes
	clone.CapacityBytes = size
	if err := state.WriteClone(c.root, clone); err != nil {
		return 0, fmt.Errorf("record the new size of clone %s: %w", volID, err)
	}
	logger.Info("Clone expanded", "fromBytes", old, "capacityBytes", size, "images", clone.Refs())
	return size, nil
}

// notClone is the error for a volume that is no clone on this node:
// ErrNoCapacity when it is published here (the image itself), else
// ErrNoClone.
func (c *Clones) notClone(volID string) error {
	targets, err := c.published(volID)
	if err != nil {
		return err
	}
	if len(targets) > 0 {
		return fault.Errorf(ErrNoCapacity, "volume %s is the image itself (published at %s), not a persistent clone: it has no capacity to grow",
			volID, targets[0])
	}
	return fault.Errorf(ErrNoClone, "volume %s is not a persistent clone on node %s, nor published here", volID, c.nodeID)
}

// published lists the targets where volume id (of any kind) is published
// on this node.
func (c *Clones) published(id string) ([]string, error) {
	vols, err := state.List(c.root)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, v := range vols {
		if v.VolumeID == id {
			out = append(out, v.TargetPath)
		}
	}
	return out, nil
}

// Capacity is the recorded size of clone volID on this node; ErrNoClone or
// ErrNoCapacity as Expand says when it is none.
func (c *Clones) Capacity(volID string) (int64, error) {
	var clone *state.Clone
	var err error
	if state.CheckCloneID(volID) == nil {
		if clone, err = state.ReadClone(c.root, volID); err != nil {
			return 0, err
		}
	}
	if clone == nil {
		return 0, c.notClone(volID)
	}
	return clone.CapacityBytes, nil
}
