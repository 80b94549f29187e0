package clonefs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/strata-csi/strata/driver/state"
	"github.com/strata-csi/strata/internal/fault"
	"github.com/strata-csi/strata/internal/faulttest"
	"github.com/strata-csi/strata/test/vmtest"
)

// TestSentinelKinds: a shrink is OutOfRange at the CSI front, a grow past
// the node's free space ResourceExhausted, a grow of an unstaged clone
// FailedPrecondition.
func TestSentinelKinds(t *testing.T) {
	faulttest.CheckKinds(t, ".", map[string]faulttest.Want{
		"ErrShrink":     {Err: ErrShrink, Kind: fault.OutOfRange},
		"ErrTooBig":     {Err: ErrTooBig, Kind: fault.NoSpace},
		"ErrNotMounted": {Err: ErrNotMounted, Kind: fault.Precondition},
		"ErrSourceBusy": {Err: ErrSourceBusy, Kind: fault.Busy},
	})
}

// capacity is what an unprivileged writer could write into the empty
// filesystem at mnt: free space plus what is already used.
func capacity(tb testing.TB, mnt string) int64 {
	st := statfs(tb, mnt)
	return (int64(st.Blocks) - int64(st.Bfree-st.Bavail)) * st.Bsize
}

// writeMarker writes a file of known content into mnt and returns its bytes.
func writeMarker(tb testing.TB, mnt string) []byte {
	tb.Helper()
	data := bytes.Repeat([]byte("strata grow marker\n"), 50_000) // ~1 MiB
	if err := os.WriteFile(filepath.Join(mnt, "marker"), data, 0o644); err != nil {
		tb.Fatal(err)
	}
	return data
}

func checkMarker(tb testing.TB, mnt string, want []byte) {
	tb.Helper()
	got, err := os.ReadFile(filepath.Join(mnt, "marker"))
	if err != nil {
		tb.Fatalf("file written before the grow: %v", err)
	}
	if !bytes.Equal(got, want) {
		tb.Fatalf("file written before the grow changed: %d bytes, want %d", len(got), len(want))
	}
}

// TestGrowOnline grows a mounted clone on its loop device: the file written
// before is intact, statfs shows the new size at once, writes up to the new
// size succeed, a repeated grow changes nothing, a shrink is refused.
func TestGrowOnline(t *testing.T) {
	const from, to = 16 * miB, 200 * miB
	if vmtest.GrowElsewhere(t, false) {
		return
	}
	requireLoop(t)
	ctx := context.Background()
	dir := newDir(t)
	mnt := createMount(t, dir, from)
	marker := writeMarker(t, mnt)
	before := capacity(t, mnt)

	if err := Grow(ctx, dir, to); err != nil {
		t.Fatalf("Grow to %d: %v", to, err)
	}
	after := capacity(t, mnt)
	t.Logf("capacity %d -> %d bytes (wanted %d)", before, after, int64(to))
	if after < to {
		t.Fatalf("after Grow(%d) the filesystem holds %d bytes for a writer", to, after)
	}
	if after > to+to/16+8*miB {
		t.Errorf("after Grow(%d) the filesystem holds %d bytes: more than the size asks", to, after)
	}
	checkMarker(t, mnt, marker)

	// Writes up to the new size succeed.
	room := to - int64(len(marker)) - miB
	f, err := os.Create(filepath.Join(mnt, "big"))
	if err != nil {
		t.Fatal(err)
	}
	buf := bytes.Repeat([]byte{0x5a}, miB)
	for n := int64(0); n < room; n += miB {
		if _, err := f.Write(buf); err != nil {
			t.Fatalf("write at %d of %d bytes after the grow: %v", n, room, err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}

	// Idempotent: the same size again changes nothing.
	img := filepath.Join(dir, state.ImageFile)
	fi1, _ := os.Stat(img)
	if err := Grow(ctx, dir, to); err != nil {
		t.Fatalf("repeated Grow to %d: %v", to, err)
	}
	fi2, _ := os.Stat(img)
	if fi1.Size() != fi2.Size() || capacity(t, mnt) != after {
		t.Errorf("a repeated Grow changed the image: %d -> %d bytes, capacity %d -> %d", fi1.Size(), fi2.Size(), after, capacity(t, mnt))
	}

	// A shrink is refused, naming both sizes.
	err = Grow(ctx, dir, from)
	if !errors.Is(err, ErrShrink) {
		t.Fatalf("Grow to a smaller size: %v, want ErrShrink", err)
	}
	for _, n := range []int64{from / miB, to / miB} {
		if !strings.Contains(err.Error(), strconv.FormatInt(n, 10)) {
			t.Errorf("shrink error %q does not name %d MiB", err, n)
		}
	}

	// The grown image stages again: unmount, Create for the new size, mount.
	if err := Unmount(dir); err != nil {
		t.Fatal(err)
	}
	if err := Create(ctx, dir, to); err != nil {
		t.Fatalf("Create for the grown size: %v", err)
	}
	if _, err := Mount(ctx, dir); err != nil {
		t.Fatal(err)
	}
	checkMarker(t, mnt, marker)
	// A mount computes the kernel's reserve anew, for the new size: the
	// room must hold the size still.
	if c := capacity(t, mnt); c < to {
		t.Errorf("capacity after a remount %d, want >= %d", c, int64(to))
	}
	t.Logf("capacity after a remount: %d bytes", capacity(t, mnt))
}

// TestGrowUnmounted: only a mounted clone grows (the ext4 resize is online).
func TestGrowUnmounted(t *testing.T) {
	dir := newDir(t)
	if err := Create(context.Background(), dir, 8*miB); err != nil {
		t.Fatal(err)
	}
	if err := Grow(context.Background(), dir, 32*miB); !errors.Is(err, ErrNotMounted) {
		t.Fatalf("Grow of an unmounted clone: %v, want ErrNotMounted", err)
	}
}

// TestGrowCrash stops a grow after each of its steps, as a crash would, and
// checks that the clone then stages again (Create for the size its record
// still holds, Mount) with its data, and that the grow then completes.
func TestGrowCrash(t *testing.T) {
	const from, to = 16 * miB, 96 * miB
	if vmtest.GrowElsewhere(t, false) {
		return
	}
	requireLoop(t)
	for _, step := range growSteps {
		t.Run(step, func(t *testing.T) {
			ctx := context.Background()
			dir := newDir(t)
			mnt := createMount(t, dir, from)
			marker := writeMarker(t, mnt)
			crash := fmt.Errorf("crash after %s", step)
			growHook = func(s string) error {
				if s == step {
					return crash
				}
				return nil
			}
			err := Grow(ctx, dir, to)
			growHook = nil
			if !errors.Is(err, crash) {
				t.Fatalf("Grow with a crash after %s: %v", step, err)
			}
			// The plugin dies; the node later unmounts and stages again
			// with the record, which still holds the old size.
			if err := Unmount(dir); err != nil {
				t.Fatal(err)
			}
			if err := Create(ctx, dir, from); err != nil {
				t.Fatalf("Create for the recorded size after a crash after %s: %v", step, err)
			}
			if _, err := Mount(ctx, dir); err != nil {
				t.Fatalf("Mount after a crash after %s: %v", step, err)
			}
			checkMarker(t, mnt, marker)
			if c := capacity(t, mnt); c < from {
				t.Fatalf("capacity %d after the crash, less than the old size %d", c, int64(from))
			}
			// kubelet retries NodeExpandVolume.
			if err := Grow(ctx, dir, to); err != nil {
				t.Fatalf("Grow after a crash after %s: %v", step, err)
			}
			if c := capacity(t, mnt); c < to {
				t.Fatalf("capacity %d after the retried grow, want >= %d", c, int64(to))
			}
			checkMarker(t, mnt, marker)
			if err := Unmount(dir); err != nil {
				t.Fatal(err)
			}
			if err := Create(ctx, dir, to); err != nil {
				t.Fatalf("Create for the new size: %v", err)
			}
		})
	}
}

// TestGrowNoRoom: a grow past the free space of the filesystem that holds
// the image is refused, naming both numbers, and changes nothing.
func TestGrowNoRoom(t *testing.T) {
	if vmtest.GrowElsewhere(t, false) {
		return
	}
	requireLoop(t)
	root := t.TempDir()
	if err := unix.Mount("tmpfs", root, "tmpfs", 0, "size=64m"); err != nil {
		t.Fatalf("mount a 64 MiB tmpfs: %v", err)
	}
	t.Cleanup(func() { _ = unix.Unmount(root, unix.MNT_DETACH) })
	dir := filepath.Join(root, "clone")
	t.Cleanup(func() {
		if err := Remove(dir); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	ctx := context.Background()
	mnt := createMount(t, dir, 16*miB)
	marker := writeMarker(t, mnt)
	img := filepath.Join(dir, state.ImageFile)
	fi1, _ := os.Stat(img)
	cap1 := capacity(t, mnt)

	err := Grow(ctx, dir, 1<<30)
	if !errors.Is(err, ErrTooBig) {
		t.Fatalf("Grow past the free space: %v, want ErrTooBig", err)
	}
	free := statfs(t, root)
	t.Logf("refused: %v (tmpfs free %d)", err, int64(free.Bavail)*free.Bsize)
	if !strings.Contains(err.Error(), "free") || !strings.Contains(err.Error(), "needs") {
		t.Errorf("error %q does not say what is needed and what is free", err)
	}
	fi2, _ := os.Stat(img)
	if fi2.Size() != fi1.Size() {
		t.Errorf("refused grow changed the image size: %d -> %d", fi1.Size(), fi2.Size())
	}
	if c := capacity(t, mnt); c != cap1 {
		t.Errorf("refused grow changed the capacity: %d -> %d", cap1, c)
	}
	if got, err := readImageMiB(img); err != nil || got != 16 {
		t.Errorf("label after a refused grow: %d MiB, %v; want 16", got, err)
	}
	checkMarker(t, mnt, marker)
	// What fits still grows.
	if err := Grow(ctx, dir, 32*miB); err != nil {
		t.Fatalf("Grow within the free space: %v", err)
	}
	if _, err := os.Stat(filepath.Join(mnt, "marker")); errors.Is(err, syscall.ENOENT) {
		t.Fatal("marker gone")
	}
}

// TestGrowSameOrLess: a grow to the clone's own size changes nothing; to
// less is ErrShrink naming both sizes, and changes nothing.
func TestGrowSameOrLess(t *testing.T) {
	ctx := context.Background()
	dir := newDir(t)
	mnt := createMount(t, dir, 32*miB)
	img := filepath.Join(dir, state.ImageFile)
	fi1, _ := os.Stat(img)
	cap1 := capacity(t, mnt)
	if err := Grow(ctx, dir, 32*miB-100); err != nil {
		t.Fatalf("Grow to the same size: %v", err)
	}
	err := Grow(ctx, dir, 16*miB)
	if !errors.Is(err, ErrShrink) || !strings.Contains(err.Error(), "32 MiB") || !strings.Contains(err.Error(), "16 MiB") {
		t.Fatalf("Grow to less: %v, want ErrShrink naming 32 MiB and 16 MiB", err)
	}
	fi2, _ := os.Stat(img)
	if fi1.Size() != fi2.Size() || capacity(t, mnt) != cap1 {
		t.Errorf("image changed: %d -> %d bytes, capacity %d -> %d", fi1.Size(), fi2.Size(), cap1, capacity(t, mnt))
	}
}
