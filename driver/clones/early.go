package clones

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/clonefs"
	"github.com/strata-csi/strata/driver/engine"
	"github.com/strata-csi/strata/driver/state"
	"github.com/strata-csi/strata/internal/fault"
)

// TopologyKey is the topology segment that names a node: a clone is
// accessible from its node only. The controller puts it in a clone's node
// affinity (driver.TopologyKey is this constant).
const TopologyKey = "topology.strata.csi.dev/node"

// A claim cloned from another should hold the source's content as it was
// when the claim was made (CSI CreateVolume), not when a pod first stages
// it, maybe hours later. The controller cannot reach the node's disk, so
// the node's sweeper makes the copy: when its PersistentVolume informer
// sees a PV of this driver that starts from a clone (AttrCloneOf), is placed
// on this node, and whose clone is not made here, it makes that clone's
// record, references and disk at once (copyEarly), without staging it. The
// first stage then finds it made; a private image's credentials are still
// checked there, when kubelet passes them.

// earlyCopies holds the handles of PersistentVolumes whose clone the
// sweeper should make before their first stage.
type earlyCopies struct {
	mu      sync.Mutex
	handles map[string]bool
}

// add queues the PersistentVolume obj if it is a clone of a claim placed on
// this node whose clone is not made; it reports whether it did.
func (q *earlyCopies) add(c *Clones, obj any) bool {
	pv, ok := obj.(*corev1.PersistentVolume)
	if !ok || pv.Spec.CSI == nil || pv.Spec.CSI.Driver != c.driverName || pv.Spec.CSI.VolumeAttributes[engine.AttrCloneOf] == "" {
		return false
	}
	h := pv.Spec.CSI.VolumeHandle
	if state.CheckCloneID(h) != nil || !onNode(pv, c.nodeID) || c.made(h) {
		return false
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.handles == nil {
		q.handles = map[string]bool{}
	}
	q.handles[h] = true
	return true
}

// onNode reports whether pv's required node affinity names node by
// TopologyKey (as the controller places a clone).
func onNode(pv *corev1.PersistentVolume, node string) bool {
	if pv.Spec.NodeAffinity == nil || pv.Spec.NodeAffinity.Required == nil {
		return false
	}
	for _, term := range pv.Spec.NodeAffinity.Required.NodeSelectorTerms {
		for _, e := range term.MatchExpressions {
			if e.Key == TopologyKey && e.Operator == corev1.NodeSelectorOpIn && slices.Contains(e.Values, node) {
				return true
			}
		}
	}
	return false
}

// run makes the clones of the queued PersistentVolumes (looked up in pvs
// by handle). A clone whose source is busy stays queued for the next run;
// any other failure is logged and left to the first stage, which reports it
// to kubelet.
func (q *earlyCopies) run(ctx context.Context, c *Clones, pvs cache.Indexer) {
	q.mu.Lock()
	handles := make([]string, 0, len(q.handles))
	for h := range q.handles {
		handles = append(handles, h)
	}
	q.mu.Unlock()
	slices.Sort(handles)
	for _, h := range handles {
		logger := klog.FromContext(ctx).WithValues("volumeID", h)
		err := c.copyFor(ctx, logger, pvs, h)
		if err != nil && fault.Of(err) == fault.Busy {
			logger.V(2).Info("Cannot copy a new clone's source yet; retrying later", "reason", err.Error())
			continue
		}
		if err != nil {
			logger.Error(err, "Could not make a clone of a claim ahead of its first stage; its stage will try again")
		}
		q.mu.Lock()
		delete(q.handles, h)
		q.mu.Unlock()
	}
}

// copyFor makes the clone of the PersistentVolume with handle h, if it
// still exists and names a source.
func (c *Clones) copyFor(ctx context.Context, logger klog.Logger, pvs cache.Indexer, h string) error {
	objs, err := pvs.ByIndex(pvHandleIndex, h)
	if err != nil || len(objs) == 0 {
		return err // gone: nothing to make
	}
	pv, ok := objs[0].(*corev1.PersistentVolume)
	if !ok || pv.Spec.CSI == nil {
		return nil
	}
	attrs, err := engine.ParseAttributes(pv.Spec.CSI.VolumeAttributes)
	if err != nil {
		return err
	}
	return c.copyEarly(ctx, logger, h, attrs)
}

// copyEarly makes clone volID, a clone of the claim attrs.CloneOf names,
// without staging it: its record from the source's, references to the
// source's layers (all cached here) for its own owner, and its disk copied
// from the source's. Made already, it does nothing; its lock busy (a stage
// under way), ErrBusy.
func (c *Clones) copyEarly(ctx context.Context, logger klog.Logger, volID string, attrs engine.Attributes) error {
	unlock, err := c.locks.TryLock(engine.CloneLock(volID), "volume "+volID)
	if err != nil {
		return err
	}
	defer unlock()
	start := time.Now()
	clone, err := state.ReadClone(c.root, volID)
	if err != nil {
		return err
	}
	if clone != nil && c.made(volID) {
		return nil
	}
	if clone == nil {
		src, _, err := c.source(volID, attrs)
		if err != nil {
			return err
		}
		clone = &state.Clone{VolumeID: volID, Layers: slices.Clone(src.Layers), Created: time.Now().UTC()}
		if clone, err = fromSource(clone, src, attrs.CloneCapacity); err != nil {
			return err
		}
		if err := state.WriteClone(c.root, clone); err != nil {
			return fmt.Errorf("record clone %s: %w", volID, err)
		}
		c.changed()
	}
	if err := c.store.Acquire(clone.Owner(), clone.Layers); err != nil {
		return fmt.Errorf("clone %s: reference its layers: %w", volID, err)
	}
	if err := c.copyDisk(ctx, logger, clone); err != nil {
		return err
	}
	if err := clonefs.Create(ctx, state.CloneDir(c.root, volID), clone.CapacityBytes); err != nil {
		return err
	}
	logger.Info("Clone of a claim made ahead of its first stage", "cloneOf", clone.CloneOf,
		"capacityBytes", clone.CapacityBytes, "duration", time.Since(start))
	c.changed()
	return nil
}
