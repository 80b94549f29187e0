package clonefs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/internal/fault"
)

// Sentinels of Grow.
var (
	// ErrShrink: the size asked for is less than the clone's: ext4 cannot
	// shrink while mounted, and a clone never gives back room it granted.
	ErrShrink = fault.New(fault.OutOfRange, "a clone cannot shrink")
	// ErrTooBig: the node's disk (the filesystem that holds the state root)
	// has less free space than the grown image could take.
	ErrTooBig = fault.New(fault.NoSpace, "not enough free space on the node for the clone's new size")
	// ErrNotMounted: the clone's filesystem is not mounted; it grows only
	// online, while staged.
	ErrNotMounted = fault.New(fault.Precondition, "clone filesystem not mounted")
)

// Ioctls of the online grow (include/uapi/linux/fs.h, fs/ext4/ext4.h).
const (
	ext4IocResizeFS   = 0x40086610 // EXT4_IOC_RESIZE_FS, _IOW('f', 16, __u64): new block count
	ext4IocCheckpoint = 0x4004662b // EXT4_IOC_CHECKPOINT, _IOW('f', 43, __u32), Linux 5.13
	fsIocSetFSLabel   = 0x41009432 // FS_IOC_SETFSLABEL, _IOW(0x94, 50, char[256]), Linux 5.17 for ext4
	fiFreeze          = 0xc0045877 // FIFREEZE, _IOWR('X', 119, int)
	fiThaw            = 0xc0045878 // FITHAW, _IOWR('X', 120, int)
	fsLabelMax        = 256
	// freshUsedBlocks is what a fresh filesystem's root directory (1
	// block) and lost+found (4) take, measured with e2fsprogs 1.47.0:
	// Create's sizing counts f_bavail right after mkfs, Grow counts room
	// for an empty filesystem, so it adds these to ask for the same.
	freshUsedBlocks = 5
)

// growSteps name the durable steps of Grow, in order; growHook (tests only)
// is called after each, and an error it returns stops the grow there, as a
// crash would.
var (
	growSteps = []string{"truncate", "capacity", "resize", "label"}
	growHook  func(step string) error
)

func growStep(step string) error {
	if growHook == nil {
		return nil
	}
	return growHook(step)
}

// Grow grows the mounted clone filesystem of dir online so that an
// unprivileged writer can write at least size bytes into it when empty (the
// sizing of Create). The steps, each durable before the next:
//
//  1. truncate: the sparse dir/disk.img grows (no blocks are written);
//  2. capacity: the loop device re-reads its size (LOOP_SET_CAPACITY);
//  3. resize: ext4 grows into it while mounted (EXT4_IOC_RESIZE_FS, which
//     resize2fs would call too: the ioctl needs no binary and tells the
//     exact error; without resize_inode the kernel moves the filesystem to
//     meta_bg itself when the group descriptors need more blocks);
//  4. label: the label records the new size (FS_IOC_SETFSLABEL), and the
//     journal is checkpointed so that the image file holds it.
//
// The caller records the size (clone.json) after Grow returns. A crash at
// any point leaves an image that stages again: Create keeps an image made
// for its recorded size or more, and a larger file or filesystem than the
// label says only leaves room that the retried Grow uses.
//
// Grow is idempotent: a size the filesystem already holds changes nothing.
// A size below the label's is ErrShrink. A grow whose image would outgrow
// the free space of the filesystem holding dir is ErrTooBig, and nothing
// changes. Growing a mounted ext4 needs CAP_SYS_RESOURCE (ext4_resize_begin).
func Grow(ctx context.Context, dir string, size int64) error {
	img, target := imagePath(dir), mountPath(dir)
	logger := klog.FromContext(ctx).WithValues("diskImage", img)
	start := time.Now()
	if size <= 0 {
		return fmt.Errorf("grow clone filesystem %s: size %d: must be positive", img, size)
	}
	want := (size + miB - 1) / miB
	if want > maxMiB {
		return fault.Errorf(ErrTooBig, "grow clone filesystem %s: size %d bytes is more than the %d MiB a clone can have", img, size, int64(maxMiB))
	}
	st, err := statImage(img)
	if err != nil {
		return fmt.Errorf("grow clone filesystem %s: %w", img, err)
	}
	mounted, err := mountedImage(target, st)
	if err != nil {
		return fmt.Errorf("grow clone filesystem %s: %w", img, err)
	}
	dev, name, err := findAttached(st)
	if err != nil {
		return fmt.Errorf("grow clone filesystem %s: %w", img, err)
	}
	if dev == nil || !mounted {
		if dev != nil {
			dev.Close()
		}
		return fault.Errorf(ErrNotMounted, "grow clone filesystem %s: it is not mounted at %s: a clone grows while staged; stage it (start a pod that uses it) and retry", img, target)
	}
	defer dev.Close()
	// The loop device's page cache holds the superblock that the mounted
	// ext4 works on (sbi->s_sbh): reading it there sees the live block
	// count and label, which the image file may not hold yet.
	sb, err := readSuperblock(dev)
	if err != nil {
		return fmt.Errorf("grow clone filesystem %s: read the superblock on /dev/%s: %w", img, name, err)
	}
	got, err := sb.sizeMiB()
	if err != nil {
		return fmt.Errorf("grow clone filesystem %s: %w", img, err)
	}
	if want < got {
		return fault.Errorf(ErrShrink, "grow clone filesystem %s: it holds %d MiB, more than the requested %d bytes (%d MiB): a clone cannot shrink",
			img, got, size, want)
	}
	mnt, err := os.Open(target)
	if err != nil {
		return fmt.Errorf("grow clone filesystem %s: %w", img, err)
	}
	defer mnt.Close()

	if got >= want {
		// The label is written only once the filesystem holds its size
		// (by Create, or by a grow that got that far).
		logger.V(4).Info("Clone filesystem already holds the size", "sizeMiB", got, "requestedMiB", want)
		return growStep("label")
	}
	wantBlocks := want*miB/blockSize + freshUsedBlocks
	for pass := 1; ; pass++ {
		var sfs unix.Statfs_t
		if err := unix.Fstatfs(int(mnt.Fd()), &sfs); err != nil {
			return fmt.Errorf("grow clone filesystem %s: statfs %s: %w", img, target, err)
		}
		// Room for an unprivileged writer of the empty filesystem: its
		// data blocks (f_blocks, which the kernel's online resize keeps
		// net of the new groups' metadata) less the reserve the kernel
		// keeps at the next mount. That reserve (2% of the blocks, at most
		// 4096) is computed at mount only, so the one in force now
		// (f_bfree - f_bavail) is the old size's, and would promise room
		// that a remount takes back.
		room := int64(sfs.Blocks) - min(sb.blocks/50, kernelReserveMax)
		if room >= wantBlocks {
			break
		}
		if pass > maxPasses {
			return fmt.Errorf("grow clone filesystem %s: %d blocks of room after %d resizes, want %d: report this as a bug", img, room, maxPasses, wantBlocks)
		}
		blocks := sb.blocks + estimateBlocks(wantBlocks-room, 0)
		if err := growImage(ctx, img, dir, blocks*blockSize, got, want); err != nil {
			return err
		}
		if err := growStep("truncate"); err != nil {
			return err
		}
		if err := unix.IoctlSetInt(int(dev.Fd()), unix.LOOP_SET_CAPACITY, 0); err != nil {
			return fmt.Errorf("grow clone filesystem %s: LOOP_SET_CAPACITY /dev/%s: %w", img, name, err)
		}
		if err := growStep("capacity"); err != nil {
			return err
		}
		if err := resizeFS(mnt, uint64(blocks)); err != nil {
			return fmt.Errorf("grow clone filesystem %s: resize ext4 on /dev/%s to %d blocks: %w", img, name, blocks, err)
		}
		if err := growStep("resize"); err != nil {
			return err
		}
		if sb, err = readSuperblock(dev); err != nil {
			return fmt.Errorf("grow clone filesystem %s: read the superblock on /dev/%s: %w", img, name, err)
		}
	}
	if err := setLabel(mnt, label(want)); err != nil {
		return fmt.Errorf("grow clone filesystem %s: record the size in its label: %w", img, err)
	}
	if err := checkpoint(mnt); err != nil {
		return fmt.Errorf("grow clone filesystem %s: write the new label to the image: %w", img, err)
	}
	logger.V(2).Info("Grew clone filesystem", "fromMiB", got, "toMiB", want, "blocks", sb.blocks, "duration", time.Since(start))
	return growStep("label")
}

// growImage extends the sparse image to bytes (never shrinks it), after
// checking that the filesystem holding dir has room for the growth.
func growImage(ctx context.Context, img, dir string, bytes, fromMiB, toMiB int64) error {
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("grow clone filesystem %s: %w", img, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("grow clone filesystem %s: %w", img, err)
	}
	if fi.Size() >= bytes {
		return nil // an earlier, interrupted grow made it this large
	}
	var host unix.Statfs_t
	if err := unix.Statfs(dir, &host); err != nil {
		return fmt.Errorf("grow clone filesystem %s: statfs %s: %w", img, dir, err)
	}
	// The image is sparse, but the clone may write all of it: the node's
	// disk must have room for what it adds.
	need, free := bytes-fi.Size(), int64(host.Bavail)*host.Bsize
	if need > free {
		return fault.Errorf(ErrTooBig, "grow clone filesystem %s from %d MiB to %d MiB: the image needs %d more bytes, and the node's filesystem at %s has %d bytes free: free space on the node or ask for less",
			img, fromMiB, toMiB, need, dir, free)
	}
	klog.FromContext(ctx).V(4).Info("Growing clone image", "diskImage", img, "fromBytes", fi.Size(), "toBytes", bytes)
	if err := f.Truncate(bytes); err != nil {
		return fmt.Errorf("grow clone filesystem %s: extend the image to %d bytes: %w", img, bytes, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("grow clone filesystem %s: fsync: %w", img, err)
	}
	return nil
}

// resizeFS grows the ext4 mounted where f is open to blocks blocks.
func resizeFS(f *os.File, blocks uint64) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), ext4IocResizeFS, uintptr(unsafe.Pointer(&blocks)))
	switch {
	case errno == 0:
		return nil
	case errors.Is(errno, unix.EPERM):
		return fmt.Errorf("EXT4_IOC_RESIZE_FS: %w: growing a mounted ext4 needs CAP_SYS_RESOURCE: run the node plugin privileged (the chart does), with that capability in its bounding set", errno)
	}
	return fmt.Errorf("EXT4_IOC_RESIZE_FS: %w (the kernel log, dmesg, says why)", errno)
}

// setLabel sets the label of the filesystem mounted where f is open.
func setLabel(f *os.File, l string) error {
	var buf [fsLabelMax]byte
	copy(buf[:], l)
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), fsIocSetFSLabel, uintptr(unsafe.Pointer(&buf[0])))
	if errno != 0 {
		return fmt.Errorf("FS_IOC_SETFSLABEL: %w (ext4 takes it from Linux 5.17)", errno)
	}
	return nil
}

// checkpoint writes the journal of the filesystem where f is open to its
// final places, so that the image file itself holds the new superblock (a
// Create reads the label from the file before any mount replays the
// journal). Kernels before 5.13 have no EXT4_IOC_CHECKPOINT: a freeze and
// thaw flushes the journal too.
func checkpoint(f *os.File) error {
	var flags uint32
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), ext4IocCheckpoint, uintptr(unsafe.Pointer(&flags)))
	if errno == 0 {
		return nil
	}
	if !errors.Is(errno, unix.ENOTTY) && !errors.Is(errno, unix.EINVAL) {
		return fmt.Errorf("EXT4_IOC_CHECKPOINT: %w", errno)
	}
	if err := unix.IoctlSetInt(int(f.Fd()), fiFreeze, 0); err != nil {
		return fmt.Errorf("FIFREEZE: %w", err)
	}
	if err := unix.IoctlSetInt(int(f.Fd()), fiThaw, 0); err != nil {
		return fmt.Errorf("FITHAW: %w", err)
	}
	return nil
}
