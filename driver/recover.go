package driver

import (
	"fmt"
	"os"
	"path/filepath"

	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/mount"
)

// Recover rebuilds the node's state from disk after a start: publishes
// whose target is still mounted keep their layers; the others (the pod went
// while the plugin was down, or a publish crashed half-way) are torn down.
// Persistent clones (clones/) and their mounts are left as they are, and
// keep their layers; the publish of a clone (a bind) whose target is gone
// loses its record only. The plugin reports ready only after it.
func (d *Driver) Recover() error {
	if d.store == nil {
		d.ready.Store(true)
		return nil
	}
	dir := filepath.Join(d.root, "volumes")
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	kept, removed := 0, 0
	for _, e := range entries {
		key := e.Name()
		dirs := d.dirsOf(key)
		rec, err := readRecord(dirs.record)
		if err != nil {
			klog.ErrorS(err, "Unreadable volume record; leaving it for an operator", "path", dirs.record)
			continue
		}
		logger := klog.Background().WithValues("volumeKey", key)
		if rec != nil {
			logger = logger.WithValues("volumeID", rec.VolumeID, "targetPath", rec.TargetPath, "images", rec.Refs())
			if ok, _ := mount.IsMountPoint(rec.TargetPath); ok {
				if rec.Clone {
					// The clone holds the layers (recoverClones).
					kept++
					continue
				}
				if err := d.store.Acquire(key, rec.Layers); err != nil {
					logger.Error(err, "Published volume's layers are missing from the cache")
				}
				kept++
				continue
			}
		}
		if err := d.teardown(logger, key, rec); err != nil {
			return fmt.Errorf("clean up stale volume %s: %w", key, err)
		}
		logger.Info("Released a volume whose target is no longer mounted")
		removed++
	}
	// References whose volume record is gone (a power failure can lose the
	// removal of a reference file, which is not fsynced) hold layers for
	// nobody.
	owners, err := d.store.Owners()
	if err != nil {
		return err
	}
	for owner := range owners {
		if _, err := os.Stat(d.dirsOf(owner).dir); err == nil || !isVolumeKey(owner) {
			continue
		}
		if err := d.store.Release(owner); err != nil {
			return err
		}
		klog.InfoS("Released the layers of a volume that no longer exists", "volumeKey", owner)
		removed++
	}
	clones, cloneRefsReleased, err := d.recoverClones(owners)
	if err != nil {
		return fmt.Errorf("recover clones: %w", err)
	}
	klog.InfoS("Recovered volumes", "published", kept, "released", removed, "clones", clones, "cloneReferencesReleased", cloneRefsReleased)
	d.ready.Store(true)
	return nil
}
