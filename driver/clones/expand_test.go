package clones

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"

	"github.com/strata-csi/strata/driver/state"
	"github.com/strata-csi/strata/test/vmtest"
)

// TestExpandRefuses: what Expand answers without growing anything: a
// volume unknown here, the image itself published here, a shrink, the same
// size again. None changes the clone's record or image.
func TestExpandRefuses(t *testing.T) {
	requireRoot(t)
	c := newTestClones(t)
	ctx := context.Background()
	fakeClone(t, c, "strata-c", time.Now(), true) // 8 MiB, staged
	img := filepath.Join(state.CloneDir(c.root, "strata-c"), state.ImageFile)
	fi1, err := os.Stat(img)
	if err != nil {
		t.Fatal(err)
	}

	if _, err := c.Expand(ctx, "strata-none", 16<<20); !errors.Is(err, ErrNoClone) {
		t.Errorf("Expand of an unknown volume: %v, want ErrNoClone", err)
	}
	// The image itself, published here (an inline or read-only volume).
	key := state.Key("strata-image", "/pods/p/volumes/v")
	p := state.Publish(c.root, key)
	if err := os.MkdirAll(p.Dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := state.Write(p.Record, &state.Record{VolumeID: "strata-image", TargetPath: "/pods/p/volumes/v",
		Image: "r/x:v1", Digest: v1.Hash{Algorithm: "sha256", Hex: strings.Repeat("ab", 32)}}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Expand(ctx, "strata-image", 16<<20); !errors.Is(err, ErrNoCapacity) || !strings.Contains(err.Error(), "image itself") {
		t.Errorf("Expand of the image itself: %v, want ErrNoCapacity", err)
	}
	if _, err := c.Expand(ctx, "strata-c", 4<<20); !errors.Is(err, ErrShrink) || !strings.Contains(err.Error(), "cannot shrink") {
		t.Errorf("Expand to less: %v, want ErrShrink", err)
	}
	if got, err := c.Expand(ctx, "strata-c", 8<<20); err != nil || got != 8<<20 {
		t.Errorf("Expand to the same size = %d, %v; want %d, nil", got, err, 8<<20)
	}
	if got, err := c.Capacity("strata-c"); err != nil || got != 8<<20 {
		t.Errorf("Capacity = %d, %v; want %d", got, err, 8<<20)
	}
	clone, err := state.ReadClone(c.root, "strata-c")
	if err != nil || clone.CapacityBytes != 8<<20 {
		t.Errorf("record after the refusals: %+v, %v; want 8 MiB", clone, err)
	}
	if fi2, _ := os.Stat(img); fi2.Size() != fi1.Size() {
		t.Errorf("image size %d -> %d after the refusals", fi1.Size(), fi2.Size())
	}
}

// TestExpandUnstaged: an unstaged clone does not grow (the ext4 resize is
// online): FailedPrecondition, and its record keeps its size.
func TestExpandUnstaged(t *testing.T) {
	requireRoot(t)
	c := newTestClones(t)
	fakeClone(t, c, "strata-u", time.Now(), false)
	if _, err := c.Expand(context.Background(), "strata-u", 16<<20); err == nil || !strings.Contains(err.Error(), "stage") {
		t.Errorf("Expand of an unstaged clone: %v, want an error that says to stage it", err)
	}
	if clone, _ := state.ReadClone(c.root, "strata-u"); clone.CapacityBytes != 8<<20 {
		t.Errorf("record after a refused grow: %d bytes, want 8 MiB", clone.CapacityBytes)
	}
}

// TestExpandGrows: a staged clone grows, and its record holds the new size
// once the filesystem does. Growing a mounted ext4 needs CAP_SYS_RESOURCE:
// where this machine withholds it, the test runs in hack/vm-test's VM.
func TestExpandGrows(t *testing.T) {
	requireRoot(t)
	if vmtest.GrowElsewhere(t, false) {
		return
	}
	c := newTestClones(t)
	fakeClone(t, c, "strata-g", time.Now(), true) // 8 MiB, staged
	const size = 40 << 20
	got, err := c.Expand(context.Background(), "strata-g", size)
	if err != nil {
		t.Fatalf("Expand to %d: %v", size, err)
	}
	if got != size {
		t.Errorf("Expand answered %d, want %d", got, size)
	}
	clone, err := state.ReadClone(c.root, "strata-g")
	if err != nil || clone.CapacityBytes != size {
		t.Fatalf("record after the grow: %+v, %v; want %d bytes", clone, err, size)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(state.ClonePathsOf(c.root, "strata-g").FS, &st); err != nil {
		t.Fatal(err)
	}
	if avail := int64(st.Bavail) * st.Bsize; avail < size {
		t.Errorf("the grown clone has %d bytes free, want >= %d", avail, size)
	}
	// Idempotent.
	if got, err := c.Expand(context.Background(), "strata-g", size); err != nil || got != size {
		t.Errorf("repeated Expand = %d, %v", got, err)
	}
}
