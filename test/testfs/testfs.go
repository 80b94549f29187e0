// Package testfs makes small real filesystems for tests that need a disk of
// their own: one that fills up, or whose free space and inodes they measure.
package testfs

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// LoopExt4 mounts a fresh ext4 filesystem of sizeMiB on a loop device, made
// with mkfs.ext4 and the extra mkfs arguments, and returns its mount point.
// It is unmounted when the test ends. It needs root and e2fsprogs, and
// fails the test without them.
func LoopExt4(t testing.TB, sizeMiB int, mkfsArgs ...string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("a loop-mounted ext4 needs root")
	}
	dir := t.TempDir()
	img, mnt := filepath.Join(dir, "fs.img"), filepath.Join(dir, "mnt")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, int64(sizeMiB)<<20); err != nil {
		t.Fatal(err)
	}
	args := append(append([]string{"-q", "-F"}, mkfsArgs...), img)
	if out, err := exec.Command("mkfs.ext4", args...).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4 (e2fsprogs is required): %v\n%s", err, out)
	}
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-o", "loop", img, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount -o loop: %v\n%s", err, out)
	}
	t.Cleanup(func() { _ = unix.Unmount(mnt, unix.MNT_DETACH) })
	return mnt
}
