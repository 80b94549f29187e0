package layercache

import (
	"context"
	"crypto/rand"
	"errors"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/strata-csi/strata/test/testfs"
	"github.com/strata-csi/strata/test/testimage"
)

// A disk that fills during an unpack: the pull fails with ENOSPC, the
// partial layer is removed, and the store stays usable.
func TestDiskFullDuringUnpack(t *testing.T) {
	requireRoot(t)
	root := filepath.Join(testfs.LoopExt4(t, 16), "root")
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
