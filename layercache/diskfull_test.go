package layercache

import (
	"context"
	"crypto/rand"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/strata-csi/strata/test/testimage"
)

// smallExt4 mounts a fresh ext4 filesystem of sizeMiB on a loop device.
func smallExt4(t *testing.T, sizeMiB int) string {
	t.Helper()
	requireRoot(t)
	dir := t.TempDir()
	img, mnt := filepath.Join(dir, "fs.img"), filepath.Join(dir, "mnt")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, int64(sizeMiB)<<20); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", img).CombinedOutput(); err != nil {
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

// A disk that fills during an unpack: the pull fails with ENOSPC, the
// partial layer is removed, and the store stays usable.
func TestDiskFullDuringUnpack(t *testing.T) {
	root := filepath.Join(smallExt4(t, 16), "root")
	reg := testimage.Registry(t)
	small := testimage.Layer(t, testimage.Tar(t, testimage.File("small", "s")), testimage.Gzip)
	big := make([]byte, 24<<20) // more than the filesystem holds
	if _, err := rand.Read(big); err != nil {
		t.Fatal(err)
	}
	testimage.Push(t, reg+"/big:v1", testimage.Image(t, small, testimage.Layer(t, testimage.Tar(t, testimage.File("weights", string(big))), testimage.None)))
	testimage.Push(t, reg+"/small:v1", testimage.Image(t, small))

	s := openStore(t, root, WithConcurrency(1))
	_, err := s.Pull(context.Background(), reg+"/big:v1", PullOptions{})
	if !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("pull onto a full disk = %v, want ENOSPC", err)
	}
	if work := dirEntries(t, s.work); len(work) != 0 {
		t.Errorf("partial layer left in the work dir: %v", work)
	}
	layers, err := s.Layers()
	if err != nil {
		t.Fatalf("Layers after a full disk: %v", err)
	}
	for _, l := range layers {
		if l.Files != 1 || l.Size != 1 {
			t.Errorf("layer %s (%d files, %d bytes) is not the small one", l.DiffID, l.Files, l.Size)
		}
	}
	// The space is back and the store works.
	if _, err := s.Pull(context.Background(), reg+"/small:v1", PullOptions{}); err != nil {
		t.Fatalf("pull after the disk-full failure: %v", err)
	}
}
