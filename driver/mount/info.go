package mount

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
	mountutils "k8s.io/mount-utils"
)

// Info describes a mount found in /proc/self/mountinfo. MountPoint and Root
// are unescaped (mountinfo writes a space as \040).
type Info = mountutils.MountInfo

// mountInfoPath is read by MountsUnder.
const mountInfoPath = "/proc/self/mountinfo"

// Unmount unmounts target. A target that is not mounted, or does not exist,
// is not an error. Only the topmost mount at target is removed.
//
// The unmount is not lazy (no MNT_DETACH): a busy mount reports EBUSY instead
// of vanishing from the namespace while its files stay in use. A symlink at
// target is not followed (UMOUNT_NOFOLLOW).
func Unmount(target string) error {
	err := unix.Unmount(target, unix.UMOUNT_NOFOLLOW)
	switch {
	case err == nil:
		klog.V(4).InfoS("Unmounted", "targetPath", target)
		return nil
	case errors.Is(err, unix.ENOENT):
		return nil
	case errors.Is(err, unix.EINVAL):
		// EINVAL mostly means "not a mount point", but also e.g. a mount
		// locked by a less privileged namespace: only the first is success.
		if mp, merr := IsMountPoint(target); merr == nil && !mp {
			return nil
		}
	}
	return fmt.Errorf("unmount %q: %w", target, err)
}

// IsMountPoint reports whether target is a mount point (the root of a mount),
// including a bind mount of a directory of the same filesystem, which a
// device-number comparison cannot see. A symlink at target is not followed.
// A missing target gives false and an error wrapping fs.ErrNotExist.
func IsMountPoint(target string) (bool, error) {
	var st unix.Statx_t
	err := unix.Statx(unix.AT_FDCWD, target, unix.AT_SYMLINK_NOFOLLOW|unix.AT_NO_AUTOMOUNT, unix.STATX_MNT_ID, &st)
	if err != nil {
		return false, fmt.Errorf("statx %q: %w", target, err)
	}
	// Since 5.8 the kernel says so directly.
	if st.Attributes_mask&unix.STATX_ATTR_MOUNT_ROOT != 0 {
		return st.Attributes&unix.STATX_ATTR_MOUNT_ROOT != 0, nil
	}
	return isMountPointByParent(target, &st)
}

// isMountPointByParent compares the mount of target with the mount of its
// parent directory: mount ids when statx reports them, else device numbers.
func isMountPointByParent(target string, st *unix.Statx_t) (bool, error) {
	abs, err := filepath.Abs(target)
	if err != nil {
		return false, err
	}
	parent := filepath.Dir(abs)
	if parent == abs { // "/"
		return true, nil
	}
	var pst unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, parent, unix.AT_NO_AUTOMOUNT, unix.STATX_MNT_ID, &pst); err != nil {
		return false, fmt.Errorf("statx %q: %w", parent, err)
	}
	if st.Mask&unix.STATX_MNT_ID != 0 && pst.Mask&unix.STATX_MNT_ID != 0 {
		return st.Mnt_id != pst.Mnt_id, nil
	}
	return st.Dev_major != pst.Dev_major || st.Dev_minor != pst.Dev_minor, nil
}

// MountsUnder returns the entries of /proc/self/mountinfo whose mount point
// is prefix or below it (whole path components: /a/b is under /a, /ab is
// not), in mountinfo order (parents before children; unmount in reverse).
//
// It parses with k8s.io/mount-utils, which copes with the 80 KB lines that
// 500-layer overlays produce (a bufio.Scanner-based parser fails with "token
// too long").
func MountsUnder(prefix string) ([]Info, error) {
	all, err := mountutils.ParseMountInfo(mountInfoPath)
	if err != nil {
		return nil, fmt.Errorf("parse %s: %w", mountInfoPath, err)
	}
	prefix = filepath.Clean(prefix)
	var out []Info
	for _, m := range all {
		m.MountPoint = unescapeMountinfo(m.MountPoint)
		m.Root = unescapeMountinfo(m.Root)
		if pathUnder(m.MountPoint, prefix) {
			out = append(out, m)
		}
	}
	return out, nil
}

// pathUnder reports whether p is prefix or below it.
func pathUnder(p, prefix string) bool {
	if prefix == "/" {
		return strings.HasPrefix(p, "/")
	}
	return p == prefix || strings.HasPrefix(p, prefix+"/")
}

// unescapeMountinfo undoes the kernel's octal escapes (\040 for space, \011,
// \012, \134) in a mountinfo path.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) && isOctal(s[i+1]) && isOctal(s[i+2]) && isOctal(s[i+3]) {
			b.WriteByte((s[i+1]-'0')<<6 | (s[i+2]-'0')<<3 | (s[i+3] - '0'))
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isOctal(c byte) bool { return c >= '0' && c <= '7' }
