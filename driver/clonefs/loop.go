package clonefs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/mount"
)

const (
	loopControl = "/dev/loop-control"
	loopMajor   = 7 // LOOP_MAJOR in include/uapi/linux/major.h
	// maxAttachTries bounds the LOOP_CTL_GET_FREE / LOOP_CONFIGURE loop:
	// another process can take the free device between the two calls (EBUSY).
	maxAttachTries = 32
	// mountFlags are the clone's mount flags: an image's setuid bits and
	// device nodes must not become a way out of a pod.
	mountFlags = unix.MS_NOSUID | unix.MS_NODEV
	// mountData: discard makes ext4 tell the loop device which blocks it
	// freed, and the loop device punches them out of the sparse image, so a
	// file deleted in the clone gives its space back to the node's disk.
	mountData = "discard"
)

// loopConfigure is false in a test that exercises the pre-5.8 path
// (LOOP_SET_FD + LOOP_SET_STATUS64).
var loopConfigure = true

// attachMu serializes the attaches of this process: LOOP_CTL_GET_FREE
// gives every concurrent caller the same free device, and all but one then
// retry. With 100 publishes at once, 32 tries each were not enough
// (BenchmarkParallelPublish with capped uppers); in turn, an attach holds
// the lock for about a millisecond. Other processes may still take a device
// between the two calls: the retries are for them.
var attachMu sync.Mutex

// mountedImage reports whether target is a mount of the image whose stat is
// img. A mount of anything else at target is an error.
func mountedImage(target string, img *unix.Stat_t) (bool, error) {
	mp, err := mount.IsMountPoint(target)
	if errors.Is(err, fs.ErrNotExist) || (err == nil && !mp) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	var st unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, target, unix.AT_SYMLINK_NOFOLLOW|unix.AT_NO_AUTOMOUNT, 0, &st); err != nil {
		return false, fmt.Errorf("statx %s: %w", target, err)
	}
	other := fmt.Errorf("%s is a mount of another filesystem (device %d:%d), not of the image: unmount it", target, st.Dev_major, st.Dev_minor)
	if st.Dev_major != loopMajor {
		return false, other
	}
	name, err := loopName(st.Dev_major, st.Dev_minor)
	if err != nil {
		return false, err
	}
	dev, ok, err := openBacking(name, img)
	if err != nil {
		return false, err
	}
	if !ok {
		return false, other
	}
	dev.Close()
	return true, nil
}

// mountImage mounts the image at target, through the loop device that
// already holds it, else through a newly attached one, and returns the
// device's name.
func mountImage(ctx context.Context, img string, st *unix.Stat_t, target, data string, fresh bool) (string, error) {
	var (
		dev  *os.File
		name string
		err  error
	)
	if !fresh {
		// Each bound loop device is opened and asked: with many mounted,
		// that is most of the cost of a mount.
		if dev, name, err = findAttached(st); err != nil {
			return "", err
		}
	}
	if dev != nil {
		klog.FromContext(ctx).V(4).Info("Image already on a loop device, mounting that device", "diskImage", img, "device", name)
	} else if dev, name, err = attach(img); err != nil {
		return "", err
	}
	// Holding dev open until the mount holds the device keeps AUTOCLEAR from
	// releasing it in between; closing it after a failed mount releases it.
	defer dev.Close()
	src := "/dev/" + name
	if err := unix.Mount(src, target, "ext4", mountFlags, data); err != nil {
		return "", fmt.Errorf("mount %s (ext4, nosuid,nodev,%s): %w (the kernel log, dmesg, says why)", src, data, err)
	}
	return name, nil
}

// attach binds img to a free loop device, with LO_FLAGS_AUTOCLEAR, and
// returns the device, open.
func attach(img string) (*os.File, string, error) {
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		return nil, "", err
	}
	defer f.Close() // the loop device keeps its own reference
	ctl, err := os.OpenFile(loopControl, os.O_RDWR, 0)
	if err != nil {
		return nil, "", fmt.Errorf("%w: clones need loop devices (modprobe loop) and a node plugin that sees the host's /dev (privileged)", err)
	}
	defer ctl.Close()
	attachMu.Lock()
	defer attachMu.Unlock()
	var last error
	for i := 0; i < maxAttachTries; i++ {
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return nil, "", fmt.Errorf("find a free loop device: LOOP_CTL_GET_FREE: %w", err)
		}
		name := "loop" + strconv.Itoa(n)
		dev, err := openLoop(name)
		if err != nil {
			return nil, "", err
		}
		if err := configure(dev, f, img); err != nil {
			dev.Close()
			if errors.Is(err, unix.EBUSY) { // taken by someone else since GET_FREE
				last = err
				continue
			}
			return nil, "", fmt.Errorf("attach to /dev/%s: %w", name, err)
		}
		return dev, name, nil
	}
	return nil, "", fmt.Errorf("attach to a loop device: every free device was taken before it could be configured (%d tries): %w", maxAttachTries, last)
}

// configure binds dev to the image file f, with LO_FLAGS_AUTOCLEAR: the
// kernel releases the device when its last user (the mount) goes away, so an
// unmount never leaves a device behind, even when the plugin is killed.
func configure(dev, f *os.File, img string) error {
	cfg := unix.LoopConfig{Fd: uint32(f.Fd())}
	cfg.Info.Flags = unix.LO_FLAGS_AUTOCLEAR
	copy(cfg.Info.File_name[:len(cfg.Info.File_name)-1], img) // for display only; truncated
	fd := int(dev.Fd())
	if loopConfigure {
		err := unix.IoctlLoopConfigure(fd, &cfg)
		if err == nil || (!errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOTTY)) {
			return err
		}
		// LOOP_CONFIGURE is Linux 5.8; older kernels refuse the request.
	}
	if err := unix.IoctlSetInt(fd, unix.LOOP_SET_FD, int(f.Fd())); err != nil {
		return fmt.Errorf("LOOP_SET_FD: %w", err)
	}
	if err := unix.IoctlLoopSetStatus64(fd, &cfg.Info); err != nil {
		_ = unix.IoctlSetInt(fd, unix.LOOP_CLR_FD, 0)
		return fmt.Errorf("LOOP_SET_STATUS64: %w", err)
	}
	return nil
}

// openLoop opens /dev/<name>, creating the device node when it is missing:
// a container's /dev holds the loop devices that existed when it started,
// not the ones LOOP_CTL_GET_FREE adds later.
func openLoop(name string) (*os.File, error) {
	p := "/dev/" + name
	dev, err := os.OpenFile(p, os.O_RDWR, 0)
	if err == nil || !errors.Is(err, fs.ErrNotExist) {
		return dev, err
	}
	b, rerr := os.ReadFile(filepath.Join("/sys/block", name, "dev"))
	if rerr != nil {
		return nil, fmt.Errorf("%w (and no %s in sysfs: %v)", err, name, rerr)
	}
	var major, minor uint32
	if _, serr := fmt.Sscanf(strings.TrimSpace(string(b)), "%d:%d", &major, &minor); serr != nil {
		return nil, fmt.Errorf("parse /sys/block/%s/dev %q: %w", name, b, serr)
	}
	if merr := unix.Mknod(p, unix.S_IFBLK|0o660, int(unix.Mkdev(major, minor))); merr != nil && !errors.Is(merr, unix.EEXIST) {
		return nil, fmt.Errorf("%w (and mknod: %v)", err, merr)
	}
	return os.OpenFile(p, os.O_RDWR, 0)
}

// loopName is the name (loopN) of the block device major:minor.
func loopName(major, minor uint32) (string, error) {
	p := fmt.Sprintf("/sys/dev/block/%d:%d/uevent", major, minor)
	b, err := os.ReadFile(p)
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "DEVNAME="); ok {
			return v, nil
		}
	}
	return "", fmt.Errorf("%s names no device", p)
}

// findAttached returns the loop device, open, that holds the image, if any.
func findAttached(img *unix.Stat_t) (*os.File, string, error) {
	for _, name := range boundLoops() {
		dev, ok, err := openBacking(name, img)
		if err != nil {
			continue // released meanwhile, or a device node we cannot open
		}
		if ok {
			return dev, name, nil
		}
	}
	return nil, "", nil
}

// boundLoops lists the loop devices that have a backing file.
func boundLoops() []string {
	paths, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	names := make([]string, 0, len(paths))
	for _, p := range paths {
		names = append(names, filepath.Base(filepath.Dir(filepath.Dir(p))))
	}
	return names
}

// openBacking opens /dev/<name> and reports whether its backing file is the
// image, by device and inode number (LOOP_GET_STATUS64): unlike the path in
// sysfs, that holds in any mount namespace. The device stays open only when
// it is the image's.
func openBacking(name string, img *unix.Stat_t) (*os.File, bool, error) {
	dev, err := os.OpenFile("/dev/"+name, os.O_RDONLY, 0)
	if err != nil {
		return nil, false, err
	}
	info, err := unix.IoctlLoopGetStatus64(int(dev.Fd()))
	if err != nil {
		dev.Close()
		if errors.Is(err, unix.ENXIO) { // not bound
			return nil, false, nil
		}
		return nil, false, fmt.Errorf("LOOP_GET_STATUS64 /dev/%s: %w", name, err)
	}
	if info.Device != img.Dev || info.Inode != img.Ino {
		dev.Close()
		return nil, false, nil
	}
	return dev, true, nil
}

// LoopOf returns the name of the loop device whose backing file is img (""
// if none), compared by device and inode number, which hold in any mount
// namespace. A missing img has none.
func LoopOf(img string) (string, error) {
	st, err := statImage(img)
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("%s: %w", img, err)
	}
	dev, name, err := findAttached(st)
	if dev != nil {
		dev.Close()
	}
	return name, err
}
