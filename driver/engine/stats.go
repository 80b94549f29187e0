package engine

import (
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/strata-csi/strata/driver/clonefs"
	"github.com/strata-csi/strata/driver/mount"
	"github.com/strata-csi/strata/driver/state"
	"github.com/strata-csi/strata/internal/fault"
)

// Usage is what a volume's writes take and what room they have left.
type Usage = clonefs.Usage

// Stats reports the bytes and inodes used by the writable layer of the
// volume published (or, for a clone, staged) at path, and the room left: a
// capped upper's or a clone's own filesystem as its pod sees it (df in the
// pod shows the same), else the upper directory on the state root's
// filesystem.
func (e *Engine) Stats(volID, path string) (Usage, error) {
	paths := state.Publish(e.root, state.Key(volID, path))
	rec, err := state.Read(paths.Record)
	if err != nil {
		return Usage{}, err
	}
	if rec == nil {
		if st, _ := state.ReadCloneStage(e.root, volID); st != nil && state.CheckCloneID(volID) == nil && st.StagingPath == filepath.Clean(path) {
			return clonefs.Stat(state.CloneDir(e.root, volID)) // asked for the staging path
		}
		return Usage{}, fault.Errorf(ErrNotPublished, "volume %s is not published at %s on this node", volID, path)
	}
	if rec.Clone {
		return clonefs.Stat(state.CloneDir(e.root, volID))
	}
	if rec.UpperBytes > 0 && !rec.ReadOnly {
		return clonefs.Stat(paths.Dir)
	}
	var u Usage
	if !rec.ReadOnly {
		err := filepath.WalkDir(paths.Upper, func(_ string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			u.UsedInodes++
			if info, err := d.Info(); err == nil {
				if st, ok := info.Sys().(*syscall.Stat_t); ok {
					u.UsedBytes += st.Blocks * 512
				}
			}
			return nil
		})
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return Usage{}, fmt.Errorf("measure %s: %w", paths.Upper, err)
		}
	}
	var sfs unix.Statfs_t
	if err := unix.Statfs(paths.Dir, &sfs); err != nil {
		return Usage{}, fmt.Errorf("statfs %s: %w", paths.Dir, err)
	}
	u.AvailableBytes = int64(sfs.Bavail) * sfs.Bsize
	u.TotalBytes = u.UsedBytes + u.AvailableBytes
	u.FreeInodes = int64(sfs.Ffree)
	u.TotalInodes = u.UsedInodes + u.FreeInodes
	return u, nil
}

// Health reports the problems of a volume's publishes on this node: a
// publish whose mount is missing is inaccessible (the pod lost its volume,
// and only a restart of the pod publishes it again). Without a path, every
// publish of the volume is checked. A volume not published here is
// ErrNotPublished.
func (e *Engine) Health(volID, path string) (problems []string, err error) {
	var recs []*state.Record
	if path != "" {
		rec, err := state.Read(state.Publish(e.root, state.Key(volID, path)).Record)
		if err != nil {
			return nil, err
		}
		if rec != nil {
			recs = append(recs, rec)
		}
	} else {
		vols, err := state.List(e.root)
		if err != nil {
			return nil, err
		}
		for _, v := range vols {
			if v.VolumeID == volID {
				recs = append(recs, &v.Record)
			}
		}
	}
	if len(recs) == 0 {
		return nil, fault.Errorf(ErrNotPublished, "volume %s is not published on this node", volID)
	}
	for _, rec := range recs {
		ok, err := mount.IsMountPoint(rec.TargetPath)
		switch {
		case err != nil:
			problems = append(problems, fmt.Sprintf("%s cannot be checked (%v): restart the pod to publish the volume again", rec.TargetPath, err))
		case !ok:
			problems = append(problems, fmt.Sprintf("%s is not mounted any more: restart the pod to publish the volume again", rec.TargetPath))
		}
	}
	return problems, nil
}
