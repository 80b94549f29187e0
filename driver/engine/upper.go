package engine

import (
	"context"
	"fmt"
	"os"

	"github.com/strata-csi/strata/driver/clonefs"
	"github.com/strata-csi/strata/driver/state"
)

// The writable upper of an inline volume or a static PersistentVolume is
// capped (the size attribute, else --default-upper-size): it lives in a
// filesystem of its own, a sparse ext4 image without a journal on a loop
// device (package clonefs, scratch.go), so that a pod that writes more gets
// ENOSPC and the node's disk loses at most the cap:
//
//	volumes/<key>/volume.json   the record, with the cap (UpperBytes)
//	volumes/<key>/disk.img      the upper's filesystem image
//	volumes/<key>/fs/           its mount; upper/ and work/ in it
//
// Project quotas would cap a directory on the state root's filesystem
// without a loop device, but the node kernels are built without
// CONFIG_QUOTA. A tmpfs with size= costs less to mount, but keeps the
// writes in memory, charged to the pod's memory cgroup: a pod whose memory
// limit is below its cap is OOM-killed instead of getting ENOSPC, and a
// dataset's copied-up files take RAM. docs/volumes.md gives the
// measurements.
//
// The record names the cap before the image exists, and teardown unmounts
// volumes/<key>/fs whatever the record says, so that a crash at any point
// of a publish is undone by the next unpublish or start: the loop device
// goes with the unmount (autoclear), the files with the directory.

// openUppers prepares capped uppers: the templates directory, and the
// template for the default cap, so that a node without mkfs.ext4 or loop
// devices fails at start rather than at every publish.
func (e *Engine) openUppers(defaultSize int64) error {
	if defaultSize < 0 || (defaultSize > 0 && defaultSize < MinUpperSize) {
		return fmt.Errorf("default upper size %d bytes: give 0 (no cap) or at least 1Mi", defaultSize)
	}
	t, err := clonefs.NewTemplates(state.UpperTemplates(e.root))
	if err != nil {
		return err
	}
	if defaultSize > 0 {
		if err := t.Warm(context.Background(), defaultSize); err != nil {
			return fmt.Errorf("prepare the filesystem of capped writable uppers (--default-upper-size %d bytes; 0 turns the default cap off): %w", defaultSize, err)
		}
		if _, err := os.Stat("/dev/loop-control"); err != nil {
			return fmt.Errorf("capped writable uppers (--default-upper-size) need loop devices: %w (modprobe loop; the node plugin must see the host's /dev, privileged), or set --default-upper-size=0", err)
		}
	}
	e.uppers, e.defaultUpperSize = t, defaultSize
	return nil
}

// upperSize is the cap on the upper of a publish whose size attribute is
// size (0: not given): size, else the default; 0 for none.
func (e *Engine) upperSize(size int64) int64 {
	if size > 0 {
		return size
	}
	return e.defaultUpperSize
}

// mountUpper makes the capped upper's filesystem of the publish in dir and
// mounts it at dir/fs; it returns the upper and work directories in it.
func (e *Engine) mountUpper(ctx context.Context, paths state.PublishPaths, size int64) (upper, work string, err error) {
	if err := e.uppers.Create(ctx, paths.Dir, size); err != nil {
		return "", "", fmt.Errorf("make the writable upper's filesystem of %d bytes: %w", size, err)
	}
	if _, err := clonefs.MountScratch(ctx, paths.Dir); err != nil {
		return "", "", fmt.Errorf("mount the writable upper's filesystem: %w", err)
	}
	return paths.CappedUpper, paths.CappedWork, nil
}

// unmountUpper unmounts the capped upper's filesystem of the publish in
// dir, if mounted (the loop device goes with it).
func unmountUpper(paths state.PublishPaths) error {
	return clonefs.Unmount(paths.Dir)
}
