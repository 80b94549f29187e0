package engine

import (
	"fmt"
	"maps"
	"slices"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/mount"
	"github.com/strata-csi/strata/driver/state"
)

// Recover rebuilds the node's state from disk after a start, in one mark
// and sweep of the owners of cache references against the records:
//
//   - mark: a publish whose target is still mounted keeps its layers (the
//     publish of a clone, a bind, holds none: its clone does); every clone
//     on the node keeps its base, staged or not; every image of prepull
//     keeps its layers until its prepull acquires them again;
//   - the other publishes (the pod went while the plugin was down, or a
//     publish crashed half-way) are torn down;
//   - sweep: every owner the cache holds that is not marked (a publish,
//     clone or prepull that is gone; a power failure can lose the removal
//     of a reference file, which is not fsynced) is released;
//   - the marked owners acquire their layers again, for the same reason.
//
// Mounts of clones and of live publishes are left alone: their pods go on
// running while the plugin restarts. Owners the driver did not make are
// left alone too.
func (e *Engine) Recover(prepull []string) error {
	marked := map[string][]v1.Hash{} // owner: layers to hold (nil: keep as is)
	published, tornDown, clones := 0, 0, 0
	err := state.Each(e.root, func(key string, rec *state.Record) error {
		logger := klog.Background().WithValues("volumeKey", key)
		if rec != nil {
			logger = logger.WithValues("volumeID", rec.VolumeID, "targetPath", rec.TargetPath, "images", rec.Refs())
			if ok, _ := mount.IsMountPoint(rec.TargetPath); ok {
				if !rec.Clone {
					marked[state.PublishOwner(key)] = rec.Layers
				}
				published++
				return nil
			}
		}
		if err := e.teardown(logger, key, rec); err != nil {
			return fmt.Errorf("clean up stale volume %s: %w", key, err)
		}
		logger.Info("Released a volume whose target is no longer mounted")
		tornDown++
		return nil
	})
	if err != nil {
		return err
	}
	err = state.EachClone(e.root, func(id string, c *state.Clone, readErr error) error {
		switch {
		case readErr != nil:
			klog.ErrorS(readErr, "Unreadable clone record; leaving the clone and its layers for an operator", "volumeID", id)
			marked[state.CloneOwner(id)] = nil
		case c != nil:
			marked[c.Owner()] = c.Layers
			clones++
		}
		// A directory without a record: a removal that crashed half-way;
		// the sweep of clones finishes it.
		return nil
	})
	if err != nil {
		return fmt.Errorf("recover clones: %w", err)
	}
	for _, ref := range prepull {
		marked[state.PrepullOwner(ref)] = nil
	}

	owners, err := e.store.Owners()
	if err != nil {
		return err
	}
	released := 0
	for owner := range owners {
		kind, name := state.ParseOwner(owner)
		if _, ok := marked[owner]; ok || kind == state.OwnerUnknown {
			continue
		}
		if err := e.store.Release(owner); err != nil {
			return err
		}
		klog.InfoS("Released the layers of an owner that no longer exists", "owner", owner, "kind", ownerKinds[kind], "name", name)
		released++
	}
	for _, owner := range slices.Sorted(maps.Keys(marked)) { // the same log at every start
		layers := marked[owner]
		if layers == nil {
			continue
		}
		if err := e.store.Acquire(owner, layers); err != nil {
			// Its next publish or stage fetches them again.
			klog.ErrorS(err, "Layers of a volume are missing from the cache", "owner", owner)
		}
	}
	klog.InfoS("Recovered volumes", "published", published, "tornDown", tornDown, "clones", clones, "ownersReleased", released)
	return nil
}

// ownerKinds names owner kinds in the log.
var ownerKinds = map[state.OwnerKind]string{state.OwnerPublish: "publish", state.OwnerClone: "clone", state.OwnerPrepull: "prepull"}
