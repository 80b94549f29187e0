package clones

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/engine"
	"github.com/strata-csi/strata/driver/state"
)

// DeleteVolume is answered by the controller, which cannot reach a node's
// disk: each node removes its clones whose PersistentVolume is gone. The
// node plugin watches PersistentVolumes (an informer) and sweeps its
// clones once the informer has synced, at each PV deletion, and every
// cloneSweepInterval.
const (
	// cloneSweepInterval is how often the sweep runs without a deletion
	// event: it catches deletions while the plugin was down, and events
	// the watch missed.
	cloneSweepInterval = time.Minute
	// cloneSweepGrace spares clones younger than this when the informer
	// has no PersistentVolume for them: one created a moment ago may not
	// have reached this node's watch yet when its first stage makes the
	// clone. A clone whose PersistentVolume the watch saw deleted has no
	// grace: it goes at once.
	cloneSweepGrace = 2 * time.Minute
	// pvHandleIndex indexes PersistentVolumes by the volume handle of this
	// driver's CSI source.
	pvHandleIndex = "strataVolumeHandle"
	// pvCloneOfIndex indexes this driver's PersistentVolumes by the clone
	// their volume starts from (engine.AttrCloneOf in the volume context).
	pvCloneOfIndex = "strataCloneOf"
)

// sweepClones removes the clones on this node that pvExists says have no
// PersistentVolume, are not staged, and are older than grace or whose
// PersistentVolume pvDeleted (nil: none) says was seen deleted. A clone
// that is staged, or busy with another call, waits for a later sweep. It
// returns how many it removed.
func (c *Clones) sweep(ctx context.Context, pvExists, pvDeleted func(volumeHandle string) bool, grace time.Duration) int {
	logger := klog.FromContext(ctx)
	removed := 0
	err := state.EachClone(c.root, func(id string, clone *state.Clone, _ error) error {
		if pvExists(id) {
			return nil
		}
		l := logger.WithValues("volumeID", id)
		if (pvDeleted == nil || !pvDeleted(id)) && young(c.root, id, clone, grace) {
			l.V(4).Info("Clone without a PersistentVolume is too recent to remove yet", "grace", grace)
			return nil
		}
		err := c.lockAndDelete(l, id, "its PersistentVolume no longer exists")
		switch {
		case err == nil:
			removed++
		case errors.Is(err, ErrInUse), errors.Is(err, engine.ErrBusy):
			l.V(2).Info("Clone without a PersistentVolume is still in use; removing it later", "reason", err.Error())
		default:
			l.Error(err, "Could not remove a clone whose PersistentVolume is gone")
		}
		return nil
	})
	if err != nil {
		logger.Error(err, "Cannot list the clones on this node")
	}
	return removed
}

// lockAndDelete removes clone id under its lock, as a call would.
func (c *Clones) lockAndDelete(logger klog.Logger, id, why string) error {
	unlock, err := c.locks.TryLock(engine.CloneLock(id), "volume "+id)
	if err != nil {
		return err
	}
	defer unlock()
	return c.Delete(logger, id, why)
}

// young reports whether clone id was created less than grace ago (by its
// record, or its directory when it has none).
func young(root, id string, clone *state.Clone, grace time.Duration) bool {
	if grace <= 0 {
		return false
	}
	created := time.Time{}
	if clone != nil {
		created = clone.Created
	} else if info, err := os.Stat(state.CloneDir(root, id)); err == nil {
		created = info.ModTime()
	}
	return time.Since(created) < grace
}

// RunSweeper watches PersistentVolumes through kube and sweeps this node's
// clones until ctx ends. Nothing is removed before the informer's first
// list has completed: an empty cache is not an empty cluster.
func (c *Clones) RunSweeper(ctx context.Context, kube kubernetes.Interface) {
	logger := klog.FromContext(ctx)
	factory := informers.NewSharedInformerFactory(kube, 0)
	inf := factory.Core().V1().PersistentVolumes().Informer()
	// Only the CSI source matters: keep that of each PV in memory, not
	// the whole object.
	if err := inf.SetTransform(trimPV); err != nil {
		logger.Error(err, "Cannot watch PersistentVolumes; clones of deleted volumes stay on the node")
		return
	}
	if err := inf.AddIndexers(cache.Indexers{pvHandleIndex: c.pvHandles, pvCloneOfIndex: c.pvCloneOf}); err != nil {
		logger.Error(err, "Cannot watch PersistentVolumes; clones of deleted volumes stay on the node")
		return
	}
	trigger := make(chan struct{}, 1)
	var mu sync.Mutex
	// deleted holds the handles whose PV the watch saw deleted and whose
	// clone the sweep has not handled yet. An entry goes when a PV with its
	// handle appears again, and once no clone of it is left: a PV made
	// again with the same handle must not inherit the old deletion, which
	// would cost its new clone the grace period.
	deleted := map[string]bool{}
	// early holds the clones of claims to copy before their first stage
	// (early.go).
	var early earlyCopies
	poke := func() {
		select {
		case trigger <- struct{}{}:
		default:
		}
	}
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) {
			if hs, _ := c.pvHandles(obj); len(hs) > 0 {
				mu.Lock()
				delete(deleted, hs[0])
				mu.Unlock()
			}
			if early.add(c, obj) {
				poke()
			}
		},
		UpdateFunc: func(_, obj any) {
			if early.add(c, obj) {
				poke()
			}
		},
		DeleteFunc: func(obj any) {
			if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = t.Obj
			}
			if hs, _ := c.pvHandles(obj); len(hs) > 0 {
				mu.Lock()
				deleted[hs[0]] = true
				mu.Unlock()
			}
			poke()
		},
	}); err != nil {
		logger.Error(err, "Cannot watch PersistentVolumes; clones of deleted volumes stay on the node")
		return
	}
	factory.Start(ctx.Done())
	defer factory.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
		return
	}
	// A clone is kept while its PV exists, and while a PV names it as the
	// source of a clone that is not made on this node yet: a claim cloned
	// from it, whose source claim was deleted before the copy.
	exists := func(handle string) bool {
		objs, err := inf.GetIndexer().ByIndex(pvHandleIndex, handle)
		if err != nil || len(objs) > 0 { // when in doubt, keep
			return true
		}
		return c.awaited(logger, inf.GetIndexer(), handle)
	}
	logger.V(2).Info("Watching PersistentVolumes to remove the clones of deleted volumes", "interval", cloneSweepInterval)
	tick := time.NewTicker(cloneSweepInterval)
	defer tick.Stop()
	for {
		// Copies first: a sweep keeps their sources until they are made.
		early.run(ctx, c, inf.GetIndexer())
		seenDeleted := func(handle string) bool {
			mu.Lock()
			defer mu.Unlock()
			return deleted[handle]
		}
		if n := c.sweep(ctx, exists, seenDeleted, cloneSweepGrace); n > 0 {
			logger.Info("Removed the clones of deleted PersistentVolumes", "clones", n)
		}
		mu.Lock()
		for h := range deleted {
			if state.CheckCloneID(h) != nil {
				delete(deleted, h) // never a clone of this node
			} else if _, err := os.Lstat(state.CloneDir(c.root, h)); errors.Is(err, fs.ErrNotExist) {
				delete(deleted, h) // handled: its clone is gone
			}
		}
		mu.Unlock()
		select {
		case <-ctx.Done():
			return
		case <-trigger:
		case <-tick.C:
		}
	}
}

// pvHandles is the index function of pvHandleIndex: the volume handle of a
// PersistentVolume of this driver.
func (c *Clones) pvHandles(obj any) ([]string, error) {
	pv, ok := obj.(*corev1.PersistentVolume)
	if !ok || pv.Spec.CSI == nil || pv.Spec.CSI.Driver != c.driverName {
		return nil, nil
	}
	return []string{pv.Spec.CSI.VolumeHandle}, nil
}

// pvCloneOf is the index function of pvCloneOfIndex: the clone a
// PersistentVolume of this driver starts from.
func (c *Clones) pvCloneOf(obj any) ([]string, error) {
	pv, ok := obj.(*corev1.PersistentVolume)
	if !ok || pv.Spec.CSI == nil || pv.Spec.CSI.Driver != c.driverName || pv.Spec.CSI.VolumeAttributes[engine.AttrCloneOf] == "" {
		return nil, nil
	}
	return []string{pv.Spec.CSI.VolumeAttributes[engine.AttrCloneOf]}, nil
}

// awaited reports whether a PersistentVolume in pvs names clone source as
// the clone its own volume starts from, while that volume's clone is not
// made on this node (its copy is not complete). Such a source stays: its
// writes are what the new claim was promised.
func (c *Clones) awaited(logger klog.Logger, pvs cache.Indexer, source string) bool {
	objs, err := pvs.ByIndex(pvCloneOfIndex, source)
	if err != nil {
		return true
	}
	for _, obj := range objs {
		hs, _ := c.pvHandles(obj)
		if len(hs) == 0 || state.CheckCloneID(hs[0]) != nil || c.made(hs[0]) {
			continue
		}
		if pv := obj.(*corev1.PersistentVolume); pv.Spec.NodeAffinity != nil && !onNode(pv, c.nodeID) {
			continue // made on another node, which cannot copy this one
		}
		logger.V(2).Info("Keeping a clone whose PersistentVolume is gone: a new volume starts from its writes and is not made yet",
			"volumeID", source, "clone", hs[0])
		return true
	}
	return false
}

// trimPV keeps of a PersistentVolume its name and its CSI driver and
// handle; of one whose volume starts from a clone (a clone of a claim),
// also its volume context and node affinity, which an early copy needs.
func trimPV(obj any) (any, error) {
	pv, ok := obj.(*corev1.PersistentVolume)
	if !ok {
		return obj, nil // a tombstone
	}
	out := &corev1.PersistentVolume{ObjectMeta: metav1.ObjectMeta{
		Name: pv.Name, UID: pv.UID, ResourceVersion: pv.ResourceVersion,
	}}
	if pv.Spec.CSI != nil {
		out.Spec.CSI = &corev1.CSIPersistentVolumeSource{Driver: pv.Spec.CSI.Driver, VolumeHandle: pv.Spec.CSI.VolumeHandle}
		if pv.Spec.CSI.VolumeAttributes[engine.AttrCloneOf] != "" {
			out.Spec.CSI.VolumeAttributes = pv.Spec.CSI.VolumeAttributes
			out.Spec.NodeAffinity = pv.Spec.NodeAffinity
		}
	}
	return out, nil
}
