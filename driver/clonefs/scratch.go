package clonefs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"sync"

	"k8s.io/klog/v2"
)

// Scratch filesystems cap the writable upper of an inline volume or a
// static PersistentVolume: the same sparse ext4 image on a loop device as a
// clone's (dir/disk.img mounted at dir/fs), with two differences that fit
// writes thrown away at unpublish.
//
//   - No journal. The overlay above is volatile, its upper is deleted at
//     unpublish, and a crash of the node takes the mount with it: nothing
//     ever replays the upper. Without a journal the image is smaller, and
//     every block the node's disk gives it is one the pod wrote or ext4's
//     metadata for it.
//   - No mkfs on the publish path. mkfs.ext4 takes 10-30 ms (more on a busy
//     node); a fresh image is a sparse copy of a template made once per size
//     (about 200 KiB of metadata for 1 GiB), which takes well under a
//     millisecond. The copies share the template's filesystem UUID; ext4
//     mounts filesystems with equal UUIDs side by side.
//
// The image is mounted with noinit_itable: the kernel's lazy zeroing of the
// inode tables (ext4lazyinit) would only write to a filesystem that lives
// as long as one pod. And with nobarrier: ext4 sends the loop device no
// cache flushes, each of which the loop device turns into an fsync of the
// image file on the node's disk. A mount and an unmount each flushed once
// (writing the superblock); on a busy node disk that fsync is most of an
// unmount (measured: unmount 8-10 ms with barriers, about 1 ms without).
const scratchMountData = mountData + ",noinit_itable,nobarrier"

// maxTemplates bounds the templates kept: one per size in use, the least
// recently used removed beyond this.
const maxTemplates = 16

// Templates makes scratch images from templates kept in a directory of the
// node's state root, one per size in MiB, made with mkfs.ext4 when a size
// is first asked for. It is safe for concurrent use.
type Templates struct {
	dir string

	mu   sync.Mutex
	used map[int64]uint64 // MiB -> tick of last use
	tick uint64
}

// NewTemplates keeps templates in dir, which it empties: the templates of
// an earlier run may be of sizes no longer used, and one left half-made by
// a crash must not be copied.
func NewTemplates(dir string) (*Templates, error) {
	if err := os.RemoveAll(dir); err != nil {
		return nil, fmt.Errorf("empty the scratch filesystem templates %s: %w", dir, err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create the scratch filesystem templates %s: %w", dir, err)
	}
	return &Templates{dir: dir, used: map[int64]uint64{}}, nil
}

// Create makes dir (0700) and dir/disk.img: a sparse ext4 image without a
// journal whose free space for an unprivileged writer is at least size
// bytes, rounded up to whole MiB (see Create for the sizing), copied from
// the template for that size. The image is written in place and not
// fsynced: a scratch filesystem does not outlive its mount, and no mount
// survives a power failure. A copy that a crash cut short is never
// mounted: the caller records the publish first and removes its directory
// when it undoes it. An existing dir/disk.img is replaced.
func (t *Templates) Create(ctx context.Context, dir string, size int64) error {
	img := imagePath(dir)
	if size < miB {
		return fmt.Errorf("create scratch filesystem %s: size %d bytes: the smallest is 1 MiB", img, size)
	}
	want := (size + miB - 1) / miB
	if want > maxMiB {
		return fmt.Errorf("create scratch filesystem %s: size %d bytes is more than the %d MiB a filesystem image can have", img, size, int64(maxMiB))
	}
	tmpl, err := t.template(ctx, want)
	if err != nil {
		return fmt.Errorf("create scratch filesystem %s: %w", img, err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create scratch filesystem %s: %w", img, err)
	}
	if err := copySparse(tmpl, img); err != nil {
		return fmt.Errorf("create scratch filesystem %s from the template %s: %w", img, tmpl, err)
	}
	return nil
}

// Warm makes the template for size bytes now, so that the first Create of
// that size does not wait for mkfs; it also shows at once that mkfs.ext4
// works.
func (t *Templates) Warm(ctx context.Context, size int64) error {
	if size < miB {
		return fmt.Errorf("scratch filesystem template: size %d bytes: the smallest is 1 MiB", size)
	}
	_, err := t.template(ctx, (size+miB-1)/miB)
	return err
}

// template returns the path of the template for want MiB, making it first
// if there is none.
func (t *Templates) template(ctx context.Context, want int64) (string, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.tick++
	p := filepath.Join(t.dir, strconv.FormatInt(want, 10)+"M.img")
	if _, ok := t.used[want]; ok {
		t.used[want] = t.tick
		return p, nil
	}
	// Made under the lock: the first publishes of a new size wait for one
	// mkfs rather than run several.
	if err := format(ctx, t.dir, p, want, true); err != nil {
		return "", fmt.Errorf("make the template for %d MiB: %w", want, err)
	}
	t.used[want] = t.tick
	for len(t.used) > maxTemplates {
		var oldest int64
		for m, tick := range t.used {
			if oldest == 0 || tick < t.used[oldest] {
				oldest = m
			}
		}
		delete(t.used, oldest)
		// A copy in progress holds the file open; removing the name is safe.
		if err := os.Remove(filepath.Join(t.dir, strconv.FormatInt(oldest, 10)+"M.img")); err != nil && !errors.Is(err, fs.ErrNotExist) {
			klog.FromContext(ctx).Error(err, "Could not remove an unused scratch filesystem template", "sizeMiB", oldest)
		}
	}
	return p, nil
}

// copySparse copies the file src to dst (mode 0600, replaced if it
// exists): only its data extents (SEEK_DATA/SEEK_HOLE), so that the copy is
// as sparse as src.
func copySparse(src, dst string) (err error) {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	info, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			out.Close()
		}
	}()
	if _, err := copyExtents(in, out, info.Size()); err != nil {
		return err
	}
	return out.Close()
}

// MountScratch mounts dir/disk.img, just made by Templates.Create, at dir/fs
// as Mount does, with noinit_itable, and returns dir/fs. The image is a new
// file, so no loop device holds it yet: it is attached to a free one
// without asking the others. Unmount and Stat work on it as on a clone's.
func MountScratch(ctx context.Context, dir string) (string, error) {
	return mountDir(ctx, dir, scratchMountData, true)
}
