// Package clonefs gives each persistent clone a filesystem of its own, capped
// at the size its PVC asked for: a sparse ext4 image file in the clone's
// directory, attached to a loop device and mounted at dir/fs.
//
//	<dir>/disk.img   sparse ext4 image (holes until written)
//	<dir>/fs/        the image's mount point; the caller keeps the clone's
//	                 overlay upper and work directories in here
//
// A clone that writes more than its size gets ENOSPC inside its own
// filesystem; the node's disk only ever holds the blocks the clone wrote (plus
// a few hundred KiB of ext4 metadata and, once used, its journal). Project
// quotas would do the same job on one shared filesystem, but the node kernels
// Strata targets are not built with CONFIG_QUOTA / CONFIG_XFS_QUOTA.
//
// Everything is done with system calls (golang.org/x/sys/unix): the plugin's
// image has no losetup or mount binaries. Formatting runs mkfs.ext4 from
// e2fsprogs, which the plugin image ships.
//
// Capacity. Create(dir, size) rounds size up to whole MiB and makes an image
// whose free space for an unprivileged writer (statfs f_bavail, right after
// mkfs) is at least that: the image is larger than size by ext4's overhead,
//
//   - inode tables: 256-byte inodes, one per 16 KiB (1/64 of the image);
//   - block and inode bitmaps, group descriptors, superblock backups (about
//     0.01%); no resize_inode, so no reserved GDT blocks;
//   - the journal: size/64, at least 4 MiB and at most 128 MiB (16 MiB for a
//     1 GiB clone), smaller than mke2fs's default (64 MiB at 1 GiB) because
//     a written journal is node disk the clone does not see;
//   - the kernel's own reserve, which statfs subtracts from f_bavail even
//     with -m 0: 2% of the blocks, at most 4096 blocks (16 MiB)
//     (ext4_calculate_resv_clusters).
//
// The image size starts from that estimate; after mkfs the free block count
// is read back from the superblock, and while f_bavail would fall short the
// image grows by the shortfall and is formatted again (mkfs of 1 GiB takes
// about 10-50 ms; one pass is the rule). Measured with e2fsprogs 1.47.0: a
// 1 GiB clone gets a 1.05 GiB image (f_bavail 1 GiB + 0.9 MiB) that takes
// about 180 KiB of the node's disk after mkfs; 100 GiB gets 101.8 GiB. The
// journal's 4 MiB minimum, which mke2fs wants in a filesystem at least twice
// its size, gives clones under 4 MiB about 4 MiB of space.
//
// The requested size (in MiB) is kept in the filesystem's label,
// "strata-<MiB>M", so a repeated Create can tell its own image from one made
// for another size without any side file.
package clonefs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/mount"
	"github.com/strata-csi/strata/driver/state"
	"github.com/strata-csi/strata/internal/atomicfile"
)

// Usage is what Stat reports about a mounted clone.
type Usage struct {
	UsedBytes      int64 // bytes in use inside the clone's filesystem
	AvailableBytes int64 // bytes an unprivileged writer can still write
	TotalBytes     int64 // the filesystem's data capacity (statfs f_blocks)
	UsedInodes     int64
	FreeInodes     int64
	TotalInodes    int64
	DiskBytes      int64 // bytes the image file occupies on the node's disk (st_blocks*512)
}

// imagePath and mountPath are the only places that join the layout names,
// which package state owns: dir/disk.img mounted at dir/fs.
func imagePath(dir string) string { return filepath.Join(dir, state.ImageFile) }
func mountPath(dir string) string { return filepath.Join(dir, state.FSDir) }

// Create makes dir (0700) and dir/disk.img: a sparse file formatted ext4
// whose free space for an unprivileged writer (statfs Bavail*Bsize right after
// mkfs) is at least size bytes (see the package comment for the sizing).
//
// It is idempotent: an existing complete image made (or grown, see Grow) for
// the same size or more is kept; one made for less is an error naming both
// sizes. It is crash-safe:
// the image is formatted in a temp file in dir, fsynced and renamed into
// place, so dir/disk.img is either absent or complete; a leftover temp file
// is removed by the next Create.
func Create(ctx context.Context, dir string, size int64) error {
	img := imagePath(dir)
	if size <= 0 {
		return fmt.Errorf("create clone filesystem %s: size %d: must be positive", img, size)
	}
	want := (size + miB - 1) / miB
	if want > maxMiB {
		return fmt.Errorf("create clone filesystem %s: size %d bytes is more than the %d MiB a clone can have", img, size, int64(maxMiB))
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create clone filesystem %s: %w", img, err)
	}
	if err := removeTemps(dir); err != nil {
		return fmt.Errorf("create clone filesystem %s: remove leftovers of an interrupted create: %w", img, err)
	}
	// An image made (or grown) for more than size is kept: a grow (Grow)
	// records the new size in clone.json only after the filesystem has it,
	// so a crash in between leaves an image larger than its record, which
	// the retried NodeExpandVolume then records.
	switch got, err := readImageMiB(img); {
	case err == nil && got >= want:
		klog.FromContext(ctx).V(4).Info("Clone filesystem exists", "diskImage", img, "sizeMiB", got, "requestedMiB", want)
		return nil
	case err == nil:
		return fmt.Errorf("create clone filesystem %s: it exists and was made for %d MiB (%d bytes), less than the requested %d bytes (%d MiB); a clone grows only by expanding its claim (NodeExpandVolume)",
			img, got, got*miB, size, want)
	case !errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("create clone filesystem %s: %w", img, err)
	}
	if err := format(ctx, dir, img, want, false); err != nil {
		return fmt.Errorf("create clone filesystem %s: %w", img, err)
	}
	return nil
}

// Mount attaches dir/disk.img to a free loop device (LOOP_CONFIGURE with
// LO_FLAGS_AUTOCLEAR, so that the device is released with the last unmount;
// LOOP_SET_FD and LOOP_SET_STATUS64 on kernels before 5.8) and mounts it
// ext4 at dir/fs with nosuid,nodev. It returns dir/fs.
//
// It is idempotent: when dir/fs already is a mount of the image it returns at
// once. When the image is already attached to a loop device (mounted
// somewhere else), that device is mounted instead of attaching a second one:
// two loop devices on one image would be two ext4 instances writing the same
// blocks.
func Mount(ctx context.Context, dir string) (string, error) {
	return mountDir(ctx, dir, mountData, false)
}

// mountDir is Mount with the ext4 mount options data. A fresh image (a new
// file, which no loop device can hold yet) is attached without looking for
// a device that holds it.
func mountDir(ctx context.Context, dir, data string, fresh bool) (string, error) {
	img, target := imagePath(dir), mountPath(dir)
	logger := klog.FromContext(ctx).WithValues("diskImage", img, "targetPath", target)
	st, err := statImage(img)
	if err != nil {
		return "", fmt.Errorf("mount clone filesystem %s: %w", img, err)
	}
	err = os.Mkdir(target, 0o755)
	if err != nil && !errors.Is(err, fs.ErrExist) {
		return "", fmt.Errorf("mount clone filesystem %s: %w", img, err)
	}
	if err != nil || !fresh { // a directory just made is no mount point
		mounted, err := mountedImage(target, st)
		if err != nil {
			return "", fmt.Errorf("mount clone filesystem %s: %w", img, err)
		}
		if mounted {
			logger.V(4).Info("Clone filesystem already mounted")
			return target, nil
		}
	}
	dev, err := mountImage(ctx, img, st, target, data, fresh)
	if err != nil {
		return "", fmt.Errorf("mount clone filesystem %s at %s: %w", img, target, err)
	}
	logger.V(4).Info("Mounted clone filesystem", "device", dev)
	return target, nil
}

// Unmount unmounts dir/fs; nothing mounted there (or no dir) is success. Every
// mount stacked at dir/fs is removed. The loop device goes with the last
// unmount of the image (LO_FLAGS_AUTOCLEAR).
func Unmount(dir string) error {
	target := mountPath(dir)
	// A mount point can hold several stacked mounts; each unmount removes the
	// top one. The bound only guards against a target that never empties.
	for i := 0; i < 64; i++ {
		mp, err := mount.IsMountPoint(target)
		if errors.Is(err, fs.ErrNotExist) || (err == nil && !mp) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("unmount clone filesystem %s: %w", target, err)
		}
		if err := mount.Unmount(target); err != nil {
			if errors.Is(err, unix.EBUSY) {
				return fmt.Errorf("unmount clone filesystem %s: %w: a process still uses it, or the clone's overlay is still mounted", target, err)
			}
			return fmt.Errorf("unmount clone filesystem %s: %w", target, err)
		}
	}
	return fmt.Errorf("unmount clone filesystem %s: still a mount point after 64 unmounts", target)
}

// Remove unmounts dir/fs and deletes dir with everything in it; a missing dir
// is success. Nothing is deleted while dir/fs is still mounted, so a failed
// unmount never deletes the clone's data through the mount.
func Remove(dir string) error {
	if err := Unmount(dir); err != nil {
		return fmt.Errorf("remove clone %s: %w", dir, err)
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove clone %s: %w", dir, err)
	}
	// A parent that is gone too has no entry to make durable.
	if err := atomicfile.SyncDir(filepath.Dir(dir)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove clone %s: %w", dir, err)
	}
	return nil
}

// Stat reports the bytes and inodes used and available inside the mounted
// filesystem of dir (statfs of dir/fs, for NodeGetVolumeStats) and the bytes
// the image file occupies on the node's disk. dir/fs must be mounted: the
// statfs of an unmounted dir/fs would describe the node's disk.
func Stat(dir string) (Usage, error) {
	img, target := imagePath(dir), mountPath(dir)
	st, err := statImage(img)
	if err != nil {
		return Usage{}, fmt.Errorf("stat clone filesystem %s: %w", img, err)
	}
	mounted, err := mountedImage(target, st)
	if err != nil {
		return Usage{}, fmt.Errorf("stat clone filesystem %s: %w", img, err)
	}
	if !mounted {
		return Usage{}, fmt.Errorf("stat clone filesystem %s: %s is not mounted", img, target)
	}
	var sfs unix.Statfs_t
	if err := unix.Statfs(target, &sfs); err != nil {
		return Usage{}, fmt.Errorf("stat clone filesystem %s: statfs %s: %w", img, target, err)
	}
	bs := sfs.Bsize
	return Usage{
		UsedBytes:      int64(sfs.Blocks-sfs.Bfree) * bs,
		AvailableBytes: int64(sfs.Bavail) * bs,
		TotalBytes:     int64(sfs.Blocks) * bs,
		UsedInodes:     int64(sfs.Files - sfs.Ffree),
		FreeInodes:     int64(sfs.Ffree),
		TotalInodes:    int64(sfs.Files),
		DiskBytes:      st.Blocks * 512,
	}, nil
}

// statImage stats the image, with an actionable error when it is missing.
func statImage(img string) (*unix.Stat_t, error) {
	var st unix.Stat_t
	if err := unix.Stat(img, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil, fmt.Errorf("no image: %w (the clone was never created, or was removed)", fs.ErrNotExist)
		}
		return nil, fmt.Errorf("stat: %w", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil, fmt.Errorf("not a regular file")
	}
	return &st, nil
}
