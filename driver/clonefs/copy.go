package clonefs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/state"
	"github.com/strata-csi/strata/internal/atomicfile"
	"github.com/strata-csi/strata/internal/fault"
)

// ErrSourceBusy: the source image is on a loop device but not mounted at
// its fs/ (an overlay still holds it after its unmount): it cannot be
// frozen for the copy. The caller retries once its pods are gone or it is
// staged again.
var ErrSourceBusy = fault.New(fault.Busy, "source clone filesystem in use but not mounted")

// CopyStats describes one Copy.
type CopyStats struct {
	// Bytes is the data copied (the source image's allocated extents).
	Bytes int64
	// Reflink: the state filesystem shared the source's blocks (FICLONE)
	// instead of copying them.
	Reflink bool
	// Frozen is how long the source's filesystem was frozen (0: it was
	// not mounted).
	Frozen time.Duration
	// GrownFromMiB is the source's size when the copy was grown offline
	// to a larger size (0: no grow).
	GrownFromMiB int64
	Duration     time.Duration
}

// Copy makes dstDir/disk.img a copy of srcDir/disk.img, for a clone of at
// least size bytes that starts from the source's writes. An existing
// dstDir/disk.img is complete (it only ever appears by rename) and is kept.
//
// While the source is mounted at srcDir/fs (staged, pods writing), it is
// frozen (FIFREEZE: writers block, the journal is flushed to its final
// places and the superblock is marked clean) for the copy and thawed right
// after, also on error. The copy shares blocks (FICLONE) where the state
// filesystem can; else only the source's data extents are copied
// (SEEK_DATA/SEEK_HOLE with copy_file_range), so the copy is as sparse as
// the source. It goes to a temp name in dstDir, which Create and Copy
// remove when a crash left it. There it is mounted once and unmounted
// (settle: journal replayed, the upper's overlayfs UUID dropped), grown
// offline to a larger size (resize2fs on the unmounted copy: an online grow
// needs CAP_SYS_RESOURCE) and labelled with it (tune2fs), fsynced, and only
// then renamed to disk.img. resize2fs and tune2fs come from e2fsprogs, as
// mkfs.ext4 does; a copy of the same size needs neither.
//
// The copy keeps its source's ext4 UUID, as the capped uppers made from one
// template do (scratch.go): Linux mounts both at once (measured, and
// TestCopyWhileWriting does), nothing here mounts by UUID, and a new UUID
// (tune2fs -U, which rewrites every metadata checksum) is refused on a
// filesystem mounted since its last check unless e2fsck -f runs first,
// whose time grows with the clone.
//
// The caller keeps the source from being unmounted or removed meanwhile
// (the source clone's lock). A size below the source's is ErrShrink.
func Copy(ctx context.Context, srcDir, dstDir string, size int64) (CopyStats, error) {
	start := time.Now()
	var stats CopyStats
	src, dst := imagePath(srcDir), imagePath(dstDir)
	if _, err := os.Lstat(dst); err == nil {
		return stats, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return stats, fmt.Errorf("copy clone filesystem %s: %w", dst, err)
	}
	want := (size + miB - 1) / miB
	if size <= 0 || want > maxMiB {
		return stats, fmt.Errorf("copy clone filesystem %s: size %d bytes: want 1 byte to %d MiB", dst, size, int64(maxMiB))
	}
	st, err := statImage(src)
	if err != nil {
		return stats, fmt.Errorf("copy clone filesystem %s: source %s: %w", dst, src, err)
	}
	fromMiB, err := readImageMiB(src)
	if err != nil {
		return stats, fmt.Errorf("copy clone filesystem %s: source %s: %w", dst, src, err)
	}
	if want < fromMiB {
		return stats, fault.Errorf(ErrShrink, "copy clone filesystem %s: the source %s holds %d MiB, more than the requested %d bytes: a clone of a clone is at least as large as its source",
			dst, src, fromMiB, size)
	}
	mounted, err := mountedImage(mountPath(srcDir), st)
	if err != nil {
		return stats, fmt.Errorf("copy clone filesystem %s: source %s: %w", dst, src, err)
	}
	if !mounted {
		if dev, err := LoopOf(src); err != nil {
			return stats, fmt.Errorf("copy clone filesystem %s: %w", dst, err)
		} else if dev != "" {
			return stats, fault.Errorf(ErrSourceBusy, "copy clone filesystem %s: the source %s is on /dev/%s but not mounted at %s, so it cannot be frozen for a consistent copy: retry once the source's pods are gone",
				dst, src, dev, mountPath(srcDir))
		}
	}
	if err := os.MkdirAll(dstDir, 0o700); err != nil {
		return stats, fmt.Errorf("copy clone filesystem %s: %w", dst, err)
	}
	if err := removeTemps(dstDir); err != nil {
		return stats, fmt.Errorf("copy clone filesystem %s: remove leftovers of an interrupted copy: %w", dst, err)
	}
	out, err := os.CreateTemp(dstDir, tempPrefix+"*")
	if err != nil {
		return stats, fmt.Errorf("copy clone filesystem %s: %w", dst, err)
	}
	tmp := out.Name()
	defer func() {
		if err != nil {
			out.Close()
			os.Remove(tmp)
		}
	}()
	if err = out.Chmod(0o600); err != nil {
		return stats, fmt.Errorf("copy clone filesystem %s: %w", dst, err)
	}
	if err = copyFrozen(ctx, src, mountPath(srcDir), mounted, out, &stats); err != nil {
		return stats, fmt.Errorf("copy clone filesystem %s from %s: %w", dst, src, err)
	}
	if err = settle(ctx, out, dstDir); err != nil {
		return stats, fmt.Errorf("copy clone filesystem %s: %w", dst, err)
	}
	if want > fromMiB {
		if err = growOffline(ctx, out, fromMiB, want); err != nil {
			return stats, fmt.Errorf("copy clone filesystem %s: grow the copy from %d MiB to %d MiB: %w", dst, fromMiB, want, err)
		}
		stats.GrownFromMiB = fromMiB
	}
	if err = out.Sync(); err != nil {
		return stats, fmt.Errorf("copy clone filesystem %s: fsync: %w", dst, err)
	}
	if err = out.Close(); err != nil {
		return stats, fmt.Errorf("copy clone filesystem %s: %w", dst, err)
	}
	if err = os.Rename(tmp, dst); err != nil {
		return stats, fmt.Errorf("copy clone filesystem %s: %w", dst, err)
	}
	if err = atomicfile.SyncDir(dstDir); err != nil {
		return stats, fmt.Errorf("copy clone filesystem %s: %w", dst, err)
	}
	stats.Duration = time.Since(start)
	klog.FromContext(ctx).V(2).Info("Copied clone filesystem", "diskImage", dst, "source", src, "bytes", stats.Bytes,
		"reflink", stats.Reflink, "frozen", stats.Frozen, "grownFromMiB", stats.GrownFromMiB, "toMiB", want, "duration", stats.Duration)
	return stats, nil
}

// copyFrozen copies the image src into out, with the filesystem mounted at
// mnt frozen meanwhile when mounted; it is thawed before copyFrozen returns,
// whatever happens.
func copyFrozen(ctx context.Context, src, mnt string, mounted bool, out *os.File, stats *CopyStats) error {
	if mounted {
		fsDir, err := os.Open(mnt)
		if err != nil {
			return err
		}
		defer fsDir.Close()
		if err := unix.IoctlSetInt(int(fsDir.Fd()), fiFreeze, 0); err != nil {
			if errors.Is(err, unix.EBUSY) {
				return fault.Errorf(ErrSourceBusy, "FIFREEZE %s: %v: it is frozen already (another copy, or a backup tool): retry", mnt, err)
			}
			return fmt.Errorf("FIFREEZE %s: %w", mnt, err)
		}
		frozen := time.Now()
		var once sync.Once
		thaw := func() {
			once.Do(func() {
				stats.Frozen = time.Since(frozen)
				if err := unix.IoctlSetInt(int(fsDir.Fd()), fiThaw, 0); err != nil {
					klog.FromContext(ctx).Error(err, "Could not thaw a clone's filesystem after copying it: its writers stay blocked until `fsfreeze -u` on it", "path", mnt)
				}
			})
		}
		defer thaw()
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	return copyImage(in, out, stats)
}

// copyImage copies in to out: FICLONE when the filesystem shares blocks,
// else each data extent with copy_file_range.
func copyImage(in, out *os.File, stats *CopyStats) error {
	info, err := in.Stat()
	if err != nil {
		return err
	}
	if err := unix.IoctlFileClone(int(out.Fd()), int(in.Fd())); err == nil {
		stats.Reflink = true
		if st, ok := info.Sys().(*unix.Stat_t); ok {
			stats.Bytes = st.Blocks * 512
		}
		return nil
	} else if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.EXDEV) && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOTTY) {
		return fmt.Errorf("FICLONE: %w", err)
	}
	n, err := copyExtents(in, out, info.Size())
	stats.Bytes += n
	return err
}

// copyExtents makes out, of size bytes, a sparse copy of in: only the data
// extents are copied (copy_file_range, in the kernel), the holes stay
// holes. It returns the bytes copied.
func copyExtents(in, out *os.File, size int64) (int64, error) {
	if err := out.Truncate(size); err != nil {
		return 0, err
	}
	var copied int64
	fd := int(in.Fd())
	for off := int64(0); off < size; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) { // only a hole is left
			break
		}
		if err != nil {
			return copied, fmt.Errorf("SEEK_DATA: %w", err)
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return copied, fmt.Errorf("SEEK_HOLE: %w", err)
		}
		for r, w := data, data; r < hole; {
			n, err := unix.CopyFileRange(fd, &r, int(out.Fd()), &w, int(hole-r), 0)
			if err != nil {
				return copied, fmt.Errorf("copy_file_range at %d: %w", r, err)
			}
			if n == 0 {
				return copied, fmt.Errorf("copy_file_range at %d: the source ended early", r)
			}
			copied += int64(n)
		}
		off = hole
	}
	return copied, nil
}

// e2fsTool finds the e2fsprogs tool name as mkfsTool finds mkfs.ext4.
func e2fsTool(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, p := range []string{"/usr/sbin/" + name, "/sbin/" + name} {
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found in PATH, /usr/sbin or /sbin: cloning a claim into a larger one needs e2fsprogs; "+
		"run the node plugin from the strata-csi image, which ships it, or install e2fsprogs", name)
}

// growOffline grows the unmounted ext4 image f, made for fromMiB, so that
// an unprivileged writer can write toMiB into it when empty (Grow's
// measure), and labels it with toMiB. resize2fs on an unmounted image
// needs no capability. The room is bounded from below without mounting: the label
// promises fromMiB (Create's and Grow's sizing), and a resize adds to the
// room exactly the free blocks it adds (the new groups' metadata is not
// free), less the growth of the kernel's reserve.
func growOffline(ctx context.Context, f *os.File, fromMiB, toMiB int64) error {
	resize, err := e2fsTool("resize2fs")
	if err != nil {
		return err
	}
	tune, err := e2fsTool("tune2fs")
	if err != nil {
		return err
	}
	sb, err := readSuperblock(f)
	if err != nil {
		return err
	}
	reserve := func(blocks int64) int64 { return min(blocks/50, kernelReserveMax) }
	free0, res0 := sb.free, reserve(sb.blocks)
	base := fromMiB*miB/blockSize + freshUsedBlocks
	wantBlocks := toMiB*miB/blockSize + freshUsedBlocks
	for pass := 1; ; pass++ {
		room := base + (sb.free - free0) - (reserve(sb.blocks) - res0)
		if room >= wantBlocks {
			break
		}
		if pass > maxPasses {
			return fmt.Errorf("%d blocks of room after %d resizes, want %d: report this as a bug", room, maxPasses, wantBlocks)
		}
		blocks := sb.blocks + estimateBlocks(wantBlocks-room, 0)
		if err := f.Truncate(blocks * blockSize); err != nil {
			return fmt.Errorf("extend the image to %d bytes: %w", blocks*blockSize, err)
		}
		// -f: the copy of a mounted filesystem was never checked since
		// that mount, which resize2fs would otherwise ask for; a frozen
		// filesystem is consistent on disk.
		if err := run(ctx, resize, "-f", f.Name(), strconv.FormatInt(blocks, 10)); err != nil {
			return err
		}
		if sb, err = readSuperblock(f); err != nil {
			return fmt.Errorf("read back the resized filesystem: %w", err)
		}
	}
	// The label, unlike the UUID, changes without a fresh e2fsck.
	return run(ctx, tune, "-L", label(toMiB), f.Name())
}

// settleMount is where settle mounts the copy, in the clone's directory;
// its name starts as a temp image's, so that a crash leaves nothing that
// looks complete.
const settleMount = tempPrefix + "mnt"

// settle mounts the copy f once, at dir/settleMount, and unmounts it, to
// remove the overlayfs UUID that the copy's upper carries
// (trusted.overlay.uuid, which overlayfs stores at the first mount of an
// upper and reports as the overlay's f_fsid): the clone's first overlay
// mount makes one of its own, and two pods' volumes do not report one
// filesystem id. The mount also replays the journal of a copy whose source
// was neither mounted nor cleanly unmounted (its node crashed; a frozen
// source's copy is clean), as resize2fs -f would.
func settle(ctx context.Context, f *os.File, dir string) error {
	target := filepath.Join(dir, settleMount)
	_ = unix.Unmount(target, unix.MNT_DETACH) // left mounted by a crash
	if err := os.Mkdir(target, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	defer os.Remove(target)
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return err
	}
	if _, err := mountImage(ctx, f.Name(), &st, target, mountData, true); err != nil {
		return fmt.Errorf("mount the copy: %w", err)
	}
	err := unix.Removexattr(filepath.Join(target, state.UpperDir), "trusted.overlay.uuid")
	if errors.Is(err, unix.ENODATA) || errors.Is(err, unix.ENOENT) {
		err = nil
	}
	if uerr := unix.Unmount(target, 0); uerr != nil {
		return fmt.Errorf("unmount the copy at %s: %w", target, uerr)
	}
	if err != nil {
		return fmt.Errorf("remove the overlay UUID of the copy's upper: %w", err)
	}
	// The loop device lets go of the file a moment after the unmount
	// (autoclear runs when its last opener is gone); until then resize2fs
	// and tune2fs would take the copy for a mounted filesystem.
	for deadline := time.Now().Add(settleWait); ; time.Sleep(time.Millisecond) {
		dev, name, err := findAttached(&st)
		if dev != nil {
			dev.Close()
		}
		if err != nil {
			return err
		}
		if name == "" {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the copy is still on /dev/%s %v after its unmount", name, settleWait)
		}
	}
}

// settleWait bounds the wait for the loop device to let go of the copy.
const settleWait = 10 * time.Second

// run runs an e2fsprogs tool, its output in the error.
func run(ctx context.Context, tool string, args ...string) error {
	cmd := exec.CommandContext(ctx, tool, args...)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	if out, err := cmd.CombinedOutput(); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("%s: %w", tool, ctx.Err())
		}
		return fmt.Errorf("%s %s: %w: %s", tool, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Thaw thaws the filesystem mounted at dir/fs if it is frozen, and reports
// whether it was: a plugin killed during a Copy leaves its source frozen,
// its writers blocked, until someone thaws it. Nothing mounted there, or a
// filesystem not frozen, is no error.
func Thaw(dir string) (bool, error) {
	target := mountPath(dir)
	st, err := statImage(imagePath(dir))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("thaw clone filesystem %s: %w", target, err)
	}
	if mounted, err := mountedImage(target, st); err != nil || !mounted {
		return false, err
	}
	f, err := os.Open(target)
	if err != nil {
		return false, fmt.Errorf("thaw clone filesystem %s: %w", target, err)
	}
	defer f.Close()
	err = unix.IoctlSetInt(int(f.Fd()), fiThaw, 0)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, unix.EINVAL): // not frozen
		return false, nil
	}
	return false, fmt.Errorf("thaw clone filesystem %s: FITHAW: %w", target, err)
}
