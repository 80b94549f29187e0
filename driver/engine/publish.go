package engine

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"time"

	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/credentials"
	"github.com/strata-csi/strata/driver/mount"
	"github.com/strata-csi/strata/driver/state"
	"github.com/strata-csi/strata/internal/fault"
	"github.com/strata-csi/strata/layercache"
)

// PublishRequest is one NodePublishVolume, validated.
type PublishRequest struct {
	VolumeID, TargetPath string
	// StagingPath is where a persistent clone is staged; "" for others.
	StagingPath string
	// ReadOnly: the publish gets no writable upper.
	ReadOnly bool
	// SingleWriter: the access mode is SINGLE_NODE_SINGLE_WRITER
	// (ReadWriteOncePod): no other target may have the volume at the same
	// time.
	SingleWriter bool
	// MountOptions are the volume's mount options (a class's or PV's
	// mountOptions), applied to the mount at the target.
	MountOptions mount.Options
	Attrs        Attributes
	// Pod is the pod the volume is published for, as kubelet says;
	// Secrets the volume's node-publish secret (without the pod's tokens).
	Pod     credentials.Pod
	Secrets map[string]string
}

// Publish mounts the request's layer stack at its target, with a private
// writable upper unless it is read-only; a clone's publish binds its staged
// overlay. A repeated publish with the same arguments keeps the mount.
// The caller holds PublishLock.
func (e *Engine) Publish(ctx context.Context, req PublishRequest) error {
	want := &state.Record{
		VolumeID: req.VolumeID, TargetPath: filepath.Clean(req.TargetPath), Image: req.Attrs.Image,
		PullPolicy: string(req.Attrs.PullPolicy), SubPath: req.Attrs.SubPath, ReadOnly: req.ReadOnly, Size: req.Attrs.Size,
		SingleWriter: req.SingleWriter, MountOptions: req.MountOptions.List(),
		PodNamespace: req.Pod.Namespace, PodName: req.Pod.Name, PodUID: req.Pod.UID,
	}
	if !want.ReadOnly && !req.Attrs.Clone {
		// A read-only publish has no upper to cap; a clone's upper is in
		// its own filesystem, capped at its capacity.
		want.UpperBytes = e.upperSize(req.Attrs.Size)
	}
	for _, ref := range req.Attrs.Images() {
		want.Stack = append(want.Stack, state.StackImage{Image: ref})
	}
	if req.Attrs.Clone {
		// A clone's overlay is mounted once, at its stage; each publish
		// binds it.
		if req.StagingPath == "" {
			return invalid("NodePublishVolume %s: the volume is a persistent clone, published from its staging path, and the request has none: "+
				"clones are PersistentVolumes, which kubelet stages first", req.VolumeID)
		}
		want.Clone, want.StagingPath = true, filepath.Clean(req.StagingPath)
	}
	logger := klog.FromContext(ctx).WithValues("volumeID", want.VolumeID, "targetPath", want.TargetPath, "image", want.Image)
	if len(req.Attrs.StackImages) > 0 {
		logger = logger.WithValues("stackImages", req.Attrs.StackImages)
	}

	key := state.Key(want.VolumeID, want.TargetPath)
	paths := state.Publish(e.root, key)
	old, err := state.Read(paths.Record)
	if err != nil {
		return err
	}
	mounted, err := mount.IsMountPoint(want.TargetPath)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("check target %s: %w", want.TargetPath, err)
	}
	switch {
	case old != nil && mounted && old.SameRequest(want):
		logger.V(2).Info("Volume already published")
		return nil
	case old != nil && mounted:
		return fault.Errorf(ErrConflict, "volume %s is already published at %s with other arguments (%s, readOnly %v, subPath %q, size %s, mount options %v)",
			want.VolumeID, want.TargetPath, DescribeStack(old.Refs()), old.ReadOnly, old.SubPath, describeSize(old.Size), old.MountOptions)
	case mounted:
		return fault.Errorf(ErrConflict, "target %s is already a mount point that %s did not make", want.TargetPath, e.name)
	case old != nil:
		// A publish that crashed half-way, or whose mount went away: start over.
		if err := e.teardown(logger, key, old); err != nil {
			return err
		}
	}
	if err := e.checkSingleWriter(want); err != nil {
		return err
	}

	start := time.Now()
	if want.Clone {
		logger = logger.WithValues("stagingPath", want.StagingPath, "clone", true)
		err = e.publishClone(paths, want, req.MountOptions)
	} else {
		err = e.publish(ctx, logger, paths, want, req.MountOptions, req.Secrets, req.Pod)
	}
	if err != nil {
		if cerr := e.teardown(logger, key, want); cerr != nil {
			logger.Error(cerr, "Could not clean up a failed publish")
		}
		return err
	}
	logger.Info("Volume published", "digests", StackDigests(want.Images()), "layers", len(want.Layers), "readOnly", want.ReadOnly,
		"subPath", want.SubPath, "upperBytes", want.UpperBytes, "mountOptions", want.MountOptions, "duration", time.Since(start).Round(time.Microsecond))
	return nil
}

// checkSingleWriter refuses a publish of a volume at a second target while
// either publish is single-writer (SINGLE_NODE_SINGLE_WRITER, a claim of
// access mode ReadWriteOncePod). The other publishes are read only when
// want is single-writer or the volume's single-writer mark says one may
// be: the common publish costs one stat, not a read of every record.
// A single-writer publish that passes leaves the mark, before its record.
func (e *Engine) checkSingleWriter(want *state.Record) error {
	mark := state.SingleWriterMark(e.root, want.VolumeID)
	if !want.SingleWriter {
		if _, err := os.Lstat(mark); errors.Is(err, fs.ErrNotExist) {
			return nil
		}
	}
	others, err := e.singleWriterOthers(want)
	if err != nil {
		return err
	}
	for _, v := range others {
		if !v.SingleWriter && !want.SingleWriter {
			continue
		}
		if mounted, _ := mount.IsMountPoint(v.TargetPath); mounted {
			return fault.Errorf(ErrSingleWriter, "volume %s is single-writer (ReadWriteOncePod) and already published at %s: one pod at a time may use it",
				want.VolumeID, v.TargetPath)
		}
	}
	if want.SingleWriter {
		if err := os.MkdirAll(filepath.Dir(mark), 0o700); err != nil {
			return err
		}
		if err := os.WriteFile(mark, nil, 0o600); err != nil {
			return fmt.Errorf("mark volume %s single-writer: %w", want.VolumeID, err)
		}
	}
	return nil
}

// singleWriterOthers returns the records of the volume's publishes at
// other targets than rec's.
func (e *Engine) singleWriterOthers(rec *state.Record) ([]state.Volume, error) {
	vols, err := state.List(e.root)
	if err != nil {
		return nil, err
	}
	return slices.DeleteFunc(vols, func(v state.Volume) bool {
		return v.VolumeID != rec.VolumeID || v.TargetPath == rec.TargetPath
	}), nil
}

// unmarkSingleWriter removes the single-writer mark of rec's volume once
// no other single-writer publish of it is left.
func (e *Engine) unmarkSingleWriter(rec *state.Record) error {
	others, err := e.singleWriterOthers(rec)
	if err != nil {
		return err
	}
	if slices.ContainsFunc(others, func(v state.Volume) bool { return v.SingleWriter }) {
		return nil
	}
	if err := os.Remove(state.SingleWriterMark(e.root, rec.VolumeID)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// publish mounts an image's stack at rec's target, with the mount options
// opts. On error the caller tears down whatever it left.
func (e *Engine) publish(ctx context.Context, logger klog.Logger, paths state.PublishPaths, rec *state.Record, opts mount.Options,
	secrets map[string]string, pod credentials.Pod) error {
	stack, err := e.Resolve(ctx, logger, rec.Refs(), layercache.PullPolicy(rec.PullPolicy), secrets, pod, rec.VolumeID)
	if err != nil {
		return err
	}
	for i, im := range stack.images {
		rec.Stack[i].Digest = im.img.Digest
	}
	rec.Digest, rec.Layers = stack.images[0].img.Digest, stack.Layers
	rec.Published = time.Now().UTC()

	// The record goes to disk before anything it describes exists, so that
	// a crash at any later point is undone by the next start.
	if err := os.MkdirAll(paths.Dir, 0o700); err != nil {
		return err
	}
	if err := state.Write(paths.Record, rec); err != nil {
		return fmt.Errorf("record volume: %w", err)
	}
	if err := e.Fetch(ctx, state.PublishOwner(filepath.Base(paths.Dir)), stack); err != nil {
		return err
	}
	lowers, err := e.LowerDirs(rec.Layers)
	if err != nil {
		return err
	}
	ov := mount.Overlay{Lowers: lowers, ReadOnly: rec.ReadOnly}
	if !rec.ReadOnly {
		upper, work := paths.Upper, paths.Work
		if rec.UpperBytes > 0 {
			if upper, work, err = e.mountUpper(ctx, paths, rec.UpperBytes); err != nil {
				return err
			}
		}
		for _, p := range []string{upper, work} {
			if err := os.Mkdir(p, 0o755); err != nil {
				return err
			}
		}
		// The upper is thrown away at unpublish, so overlayfs need not sync
		// it: unmounting a volatile overlay skips a journal commit.
		ov.Upper, ov.Work, ov.Volatile = upper, work, true
	}
	// The CO creates only the target's parent.
	if err := os.MkdirAll(rec.TargetPath, 0o750); err != nil {
		return fmt.Errorf("create target %s: %w", rec.TargetPath, err)
	}
	if rec.SubPath == "" {
		ov.Options = opts
		return mount.MountOverlay(ov, rec.TargetPath)
	}
	// subPath: the overlay is mounted privately under the state root and
	// only the sub-directory, resolved inside the merged tree of the whole
	// stack, is bound to the target.
	if err := os.Mkdir(paths.Mnt, 0o700); err != nil {
		return err
	}
	if err := mount.MountOverlay(ov, paths.Mnt); err != nil {
		return err
	}
	return bindSubPath(paths.Mnt, rec.SubPath, rec.TargetPath, rec.ReadOnly, opts)
}

// bindSubPath binds dir's subPath (resolved inside dir) to target, with the
// mount options opts.
func bindSubPath(dir, subPath, target string, readOnly bool, opts mount.Options) error {
	if err := mount.BindBeneath(dir, subPath, target, readOnly, opts); err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, mount.ErrNotDir) {
			return invalid("volume attribute subPath %q: %v", subPath, err)
		}
		return err
	}
	return nil
}

// publishClone binds the staged overlay of a clone (its staging path) to
// the target with the mount options opts, read-only when the publish or
// the stage is. The publish's record says it is a clone's bind: undoing it
// only unmounts the bind.
func (e *Engine) publishClone(paths state.PublishPaths, rec *state.Record, opts mount.Options) error {
	volID := rec.VolumeID
	if err := state.CheckCloneID(volID); err != nil {
		return invalid("NodePublishVolume: %v", err)
	}
	clone, err := state.ReadClone(e.root, volID)
	if err != nil {
		return err
	}
	stage, err := state.ReadCloneStage(e.root, volID)
	if err != nil {
		return err
	}
	staged, _ := mount.IsMountPoint(rec.StagingPath)
	if clone == nil || stage == nil || stage.StagingPath != rec.StagingPath || !staged {
		return fault.Errorf(ErrNotStaged, "volume %s is not staged at %s on this node: NodeStageVolume must come first", volID, rec.StagingPath)
	}
	if !slices.Equal(clone.Refs(), rec.Refs()) {
		return fault.Errorf(ErrBaseChanged, "volume %s is a clone of %s, but its volume context now names %s",
			volID, DescribeStack(clone.Refs()), DescribeStack(rec.Refs()))
	}
	rec.Stack = slices.Clone(clone.Stack)
	rec.Digest, rec.Layers = clone.Stack[0].Digest, slices.Clone(clone.Layers)
	rec.Published = time.Now().UTC()
	if err := os.MkdirAll(paths.Dir, 0o700); err != nil {
		return err
	}
	if err := state.Write(paths.Record, rec); err != nil {
		return fmt.Errorf("record volume: %w", err)
	}
	if err := os.MkdirAll(rec.TargetPath, 0o750); err != nil {
		return fmt.Errorf("create target %s: %w", rec.TargetPath, err)
	}
	return bindSubPath(rec.StagingPath, rec.SubPath, rec.TargetPath, rec.ReadOnly || stage.ReadOnly, opts)
}

// Unpublish unmounts the target and discards the volume's writable layer;
// for a persistent clone it only unmounts the bind (the clone's writes
// stay). A target that is not mounted, or gone, is success. The caller
// holds PublishLock.
func (e *Engine) Unpublish(ctx context.Context, volID, target string) error {
	logger := klog.FromContext(ctx).WithValues("volumeID", volID, "targetPath", target)
	key := state.Key(volID, target)
	rec, err := state.Read(state.Publish(e.root, key).Record)
	if err != nil {
		return err
	}
	if rec == nil {
		// Not ours, or already unpublished: still make sure nothing is
		// mounted at the target and the target is gone.
		rec = &state.Record{VolumeID: volID, TargetPath: filepath.Clean(target)}
	}
	if err := e.teardown(logger, key, rec); err != nil {
		return err
	}
	logger.Info("Volume unpublished", "images", rec.Refs())
	return nil
}

// teardown undoes a publish, whatever state it reached: unmount the target
// and the private overlay, release the layers, remove the volume's files and
// the target directory. Every step tolerates what is already undone.
func (e *Engine) teardown(logger klog.Logger, key string, rec *state.Record) error {
	paths := state.Publish(e.root, key)
	if rec != nil && rec.TargetPath != "" {
		if err := mount.Unmount(rec.TargetPath); err != nil {
			return fmt.Errorf("unmount %s: %w", rec.TargetPath, err)
		}
		if err := os.Remove(rec.TargetPath); err != nil && !errors.Is(err, fs.ErrNotExist) {
			logger.V(2).Info("Target not removed", "err", err)
		}
	}
	if err := mount.Unmount(paths.Mnt); err != nil {
		return fmt.Errorf("unmount %s: %w", paths.Mnt, err)
	}
	// Whatever the record says: a publish may have crashed after mounting
	// the upper's filesystem. Before RemoveAll, which must not delete
	// through a mount.
	if err := unmountUpper(paths); err != nil {
		return err
	}
	if err := e.store.Release(state.PublishOwner(key)); err != nil {
		return err
	}
	if err := os.RemoveAll(paths.Dir); err != nil {
		return fmt.Errorf("remove volume files %s: %w", paths.Dir, err)
	}
	if rec != nil && rec.SingleWriter {
		return e.unmarkSingleWriter(rec)
	}
	return nil
}
