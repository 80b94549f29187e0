package unpack

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// unsafeParent is the reason given when a parent directory cannot be resolved
// beneath the root.
const unsafeParent = "write through a symlink that leads out of the layer"

// parent returns an fd of the directory dir (a cleaned path relative to the
// root, "." for the root), resolved beneath the root. With create, missing
// directories are created as tar does. The fd belongs to the cache: callers
// must not close it, and may use it until the next entry starts.
func (a *applier) parent(entry, dir string, create bool) (int, error) {
	return a.parentFor(entry, dir, create, unsafeParent)
}

// parentFor is parent with the reason reported if resolution would leave the
// layer.
func (a *applier) parentFor(entry, dir string, create bool, unsafeReason string) (int, error) {
	if dir == "." {
		return a.rootfd, nil
	}
	if fd, ok := a.dirs[dir]; ok {
		return fd, nil
	}
	fd, err := a.openBeneath(dir, unix.O_PATH|unix.O_DIRECTORY)
	if err == unix.ENOENT && create {
		fd, err = a.mkdirAll(dir)
	}
	if err != nil {
		switch {
		case errors.Is(err, unix.EXDEV), errors.Is(err, unix.ELOOP):
			// EXDEV: resolution left the root (a ".." above it or an absolute
			// symlink). ELOOP: a symlink loop, or a magic link.
			return -1, &UnsafeError{Entry: entry, Reason: unsafeReason}
		case errors.Is(err, unix.ENOTDIR):
			return -1, fmt.Errorf("entry %q: parent %q is not a directory: %w", entry, dir, err)
		default:
			return -1, fmt.Errorf("entry %q: resolve parent %q: %w", entry, dir, err)
		}
	}
	a.dirs[dir] = fd
	return fd, nil
}

// openBeneath opens p relative to the root with the kernel refusing to
// resolve anything outside it: RESOLVE_BENEATH fails with EXDEV on ".." above
// the root and on absolute symlinks (even ones that would point back inside),
// and RESOLVE_NO_MAGICLINKS refuses /proc-style links. Path-based checks in
// user space race with the filesystem; this does not.
func (a *applier) openBeneath(p string, flags int) (int, error) {
	a.stats.lookups += int64(strings.Count(p, "/") + 1)
	how := unix.OpenHow{
		Flags:   uint64(flags | unix.O_CLOEXEC),
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_MAGICLINKS,
	}
	for i := 0; ; i++ {
		fd, err := unix.Openat2(a.rootfd, p, &how)
		// EAGAIN: a concurrent rename or mount anywhere on the system made
		// the kernel unable to prove the walk stayed beneath; retry.
		if (err == unix.EAGAIN || err == unix.EINTR) && i < 16 {
			continue
		}
		return fd, err
	}
}

// mkdirAll creates the missing directories of dir, 0755 and owned by root as
// tar creates implied parents, and returns an fd of dir.
//
// Each step is one component relative to the previous directory, so a path
// of n components costs n lookups, not n*n: a layer whose every entry names
// a new 2,000-deep chain (a 4 KiB name) would otherwise cost a third of a
// second of CPU per entry. Only a component that is not a plain directory
// (a symlink) is resolved from the root beneath it, as openBeneath does for
// a whole path; a path crosses at most 40 symlinks before ELOOP.
func (a *applier) mkdirAll(dir string) (int, error) {
	cur := a.rootfd
	closeCur := func() {
		if cur != a.rootfd {
			unix.Close(cur)
		}
	}
	end := 0
	for _, comp := range strings.Split(dir, "/") {
		if end > 0 {
			end++ // the slash
		}
		end += len(comp)
		p := dir[:end]
		// A single component with O_NOFOLLOW: a directory is stepped
		// into, and nothing else is followed. comp is never "." or ".."
		// (dir is clean and inside the layer).
		fd, err := unix.Openat(cur, comp, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err == unix.ELOOP || err == unix.ENOTDIR {
			// A symlink (or not a directory): resolve the whole prefix
			// beneath the root, which follows symlinks that stay inside.
			fd, err = a.openBeneath(p, unix.O_PATH|unix.O_DIRECTORY)
		}
		if err == unix.ENOENT {
			fd, err = a.mkdirOne(cur, comp, p)
		}
		closeCur()
		if err != nil {
			return -1, err
		}
		cur = fd
	}
	return cur, nil
}

// mkdirOne creates comp in the directory cur and returns an fd of it.
func (a *applier) mkdirOne(cur int, comp, p string) (int, error) {
	if err := unix.Mkdirat(cur, comp, 0o755); err != nil {
		if err == unix.EEXIST {
			// openat2 said ENOENT, so comp is a symlink to nothing.
			return -1, fmt.Errorf("%q is a dangling symlink: %w", p, unix.ENOENT)
		}
		return -1, fmt.Errorf("create parent %q: %w", p, err)
	}
	fd, err := unix.Openat(cur, comp, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open new parent %q: %w", p, err)
	}
	// Exactly 0755 root:root whatever the umask or a setgid grandparent say.
	if err := unix.Fchown(fd, 0, 0); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("chown new parent %q: %w", p, err)
	}
	if err := unix.Fchmod(fd, 0o755); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("chmod new parent %q: %w", p, err)
	}
	return fd, nil
}

// removeAllAt removes name from the directory dirfd, recursively if it is a
// directory. Everything is relative to fds and never follows a symlink, so
// unlike os.RemoveAll on a path it cannot be steered out of the layer.
func removeAllAt(dirfd int, name string) error {
	err := unix.Unlinkat(dirfd, name, 0)
	if err == nil || err == unix.ENOENT {
		return nil
	}
	// unlink(2) of a directory fails with EISDIR on Linux (EPERM per POSIX).
	if err != unix.EISDIR && err != unix.EPERM {
		return fmt.Errorf("unlink %q: %w", name, err)
	}
	fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %q to empty it: %w", name, err)
	}
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	for {
		names, err := f.Readdirnames(1024)
		for _, child := range names {
			if err := removeAllAt(fd, child); err != nil {
				return err
			}
		}
		if err != nil || len(names) == 0 {
			break // io.EOF, or a read error that the rmdir below reports
		}
	}
	if err := unix.Unlinkat(dirfd, name, unix.AT_REMOVEDIR); err != nil {
		return fmt.Errorf("rmdir %q: %w", name, err)
	}
	return nil
}

// xattrArgs is struct xattr_args of setxattrat(2). The pointer field keeps
// the value visible to the garbage collector during the call; the layout
// matches the kernel's __aligned_u64 on 64-bit platforms.
type xattrArgs struct {
	value *byte
	size  uint32
	flags uint32
}

// setxattrat calls setxattrat(2) (Linux 6.13), the only way to set an xattr
// on a symlink or FIFO relative to a directory fd without following it and
// without /proc.
func setxattrat(dirfd int, path string, atFlags int, name string, value []byte) error {
	p, err := unix.BytePtrFromString(path)
	if err != nil {
		return err
	}
	n, err := unix.BytePtrFromString(name)
	if err != nil {
		return err
	}
	args := &xattrArgs{size: uint32(len(value))}
	if len(value) > 0 {
		args.value = &value[0]
	}
	_, _, e := unix.Syscall6(unix.SYS_SETXATTRAT, uintptr(dirfd), uintptr(unsafe.Pointer(p)),
		uintptr(atFlags), uintptr(unsafe.Pointer(n)), uintptr(unsafe.Pointer(args)), unsafe.Sizeof(*args))
	if e != 0 {
		return e
	}
	return nil
}

// setxattrAt sets an xattr on base in pfd (the entry name) without following
// a symlink.
func (a *applier) setxattrAt(pfd int, name, base, key, value string) error {
	err := setxattrat(pfd, base, unix.AT_SYMLINK_NOFOLLOW, key, []byte(value))
	if err != unix.ENOSYS {
		return err
	}
	// Kernels before 6.13: lsetxattr on the path. Opening it beneath the root
	// first proves that every component resolves inside the layer, and nothing
	// else writes into the layer while it is unpacked, so the path-based call
	// reaches the same object.
	fd, err := a.openBeneath(name, unix.O_PATH|unix.O_NOFOLLOW)
	if err != nil {
		return err
	}
	unix.Close(fd)
	return unix.Lsetxattr(filepath.Join(a.dir, name), key, []byte(value), 0)
}
