package mount

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// Bind bind-mounts the directory src at target, an existing directory, with
// nosuid and nodev, and read-only if readOnly. Mounts below src are not
// included (the bind is not recursive).
func Bind(src, target string, readOnly bool) error {
	if err := bind(src, target, readOnly, Options{}); err != nil {
		return err
	}
	klog.V(4).InfoS("Bind-mounted", "source", src, "targetPath", target, "readOnly", readOnly)
	return nil
}

func bind(src, target string, readOnly bool, o Options) error {
	fd, err := openDirPath(src)
	if err != nil {
		return fmt.Errorf("bind %q: %w", src, err)
	}
	defer unix.Close(fd)
	if err := bindFd(fd, target, readOnly, o); err != nil {
		return fmt.Errorf("bind %q at %q: %w", src, target, err)
	}
	return nil
}

// BindBeneath bind-mounts the directory sub of root at target, an existing
// directory, with nosuid, nodev and the options o, and read-only if
// readOnly.
//
// sub is resolved by the kernel as if root were "/" (openat2 with
// RESOLVE_IN_ROOT|RESOLVE_NO_MAGICLINKS): an absolute symlink, "..", or an
// absolute sub inside an image never leads outside root, and no
// /proc/.../fd magic link is followed. An empty sub means root itself.
//
// A sub that is not a directory gives an error wrapping ErrNotDir; a missing
// one wraps fs.ErrNotExist. Both name sub.
func BindBeneath(root, sub, target string, readOnly bool, o Options) error {
	rootfd, err := openDirPath(root)
	if err != nil {
		return fmt.Errorf("bind beneath root %q: %w", root, err)
	}
	defer unix.Close(rootfd)
	if sub == "" {
		sub = "."
	}
	fd, err := openBeneath(rootfd, sub)
	if err != nil {
		return fmt.Errorf("bind %q beneath %q: %w", sub, root, err)
	}
	defer unix.Close(fd)
	if err := bindFd(fd, target, readOnly, o); err != nil {
		return fmt.Errorf("bind %q beneath %q at %q: %w", sub, root, target, err)
	}
	klog.V(4).InfoS("Bind-mounted beneath root", "root", root, "sub", sub, "targetPath", target, "readOnly", readOnly, "options", o.List())
	return nil
}

// openBeneath opens sub as an O_PATH directory, resolved inside rootfd.
func openBeneath(rootfd int, sub string) (int, error) {
	how := unix.OpenHow{
		Flags:   unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS,
	}
	var err error
	// With RESOLVE_IN_ROOT the kernel returns EAGAIN when a concurrent
	// rename could have let ".." escape; retrying is the documented answer.
	for range 16 {
		var fd int
		fd, err = unix.Openat2(rootfd, sub, &how)
		if err == nil {
			return fd, nil
		}
		if !errors.Is(err, unix.EAGAIN) && !errors.Is(err, unix.EINTR) {
			break
		}
	}
	return -1, dirErr(err)
}

// bindFd clones the mount at fd (open_tree OPEN_TREE_CLONE, a detached bind
// mount), sets nosuid, nodev, o and maybe rdonly on the clone before anyone
// can see it, and attaches it at target.
func bindFd(fd int, target string, readOnly bool, o Options) error {
	tfd, err := unix.OpenTree(fd, "", unix.OPEN_TREE_CLONE|unix.O_CLOEXEC|unix.AT_EMPTY_PATH)
	if err != nil {
		return fmt.Errorf("open_tree: %w", err)
	}
	// Closing the fd of a detached tree that was never attached frees it;
	// after move_mount it is only a reference that would keep the mount busy.
	defer unix.Close(tfd)
	set, clr := o.attr(readOnly)
	attr := unix.MountAttr{Attr_set: set, Attr_clr: clr}
	if err := unix.MountSetattr(tfd, "", unix.AT_EMPTY_PATH, &attr); err != nil {
		return fmt.Errorf("mount_setattr: %w", err)
	}
	if err := unix.MoveMount(tfd, "", unix.AT_FDCWD, target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("move_mount to %q: %w", target, err)
	}
	return nil
}
