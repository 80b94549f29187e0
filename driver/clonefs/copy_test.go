package clonefs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// fsck runs e2fsck -fn on the image of dir and fails the test with its
// report unless it finds the filesystem clean.
func fsck(tb testing.TB, dir string) {
	tb.Helper()
	tool, err := e2fsTool("e2fsck")
	if err != nil {
		tb.Fatal(err)
	}
	out, err := exec.Command(tool, "-fn", imagePath(dir)).CombinedOutput()
	if err != nil {
		tb.Fatalf("e2fsck -fn %s: %v\n%s", imagePath(dir), err, out)
	}
}

// readFile fails the test unless path holds want.
func checkFile(tb testing.TB, path string, want []byte) {
	tb.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		tb.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		tb.Fatalf("%s holds %d bytes, not the %d written", path, len(got), len(want))
	}
}

// needsRecovery reports whether the image of dir has ext4's
// INCOMPAT_RECOVER flag (its journal must be replayed).
func needsRecovery(tb testing.TB, dir string) bool {
	tb.Helper()
	f, err := os.Open(imagePath(dir))
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	var b [4]byte
	if _, err := f.ReadAt(b[:], 1024+0x60); err != nil {
		tb.Fatal(err)
	}
	return b[0]&0x4 != 0
}

// absent fails the test if path exists.
func absent(tb testing.TB, path string) {
	tb.Helper()
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		tb.Fatalf("%s: %v, want it absent", path, err)
	}
}

// TestCopyWhileWriting: a clone's filesystem copied while mounted and
// written to is a consistent filesystem (e2fsck -fn clean) holding what was
// written before the copy; the writer goes on after it (the source is
// thawed); the two filesystems, mounted at once, are independent.
func TestCopyWhileWriting(t *testing.T) {
	src, dst := newDir(t), newDir(t)
	mnt := createMount(t, src, 64<<20)
	before := bytes.Repeat([]byte("before the copy "), 4096)
	if err := os.WriteFile(filepath.Join(mnt, "a"), before, 0o644); err != nil {
		t.Fatal(err)
	}
	var writes atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := bytes.Repeat([]byte{0x5a}, 256<<10)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			p := filepath.Join(mnt, fmt.Sprintf("w-%d", i%40))
			if err := os.WriteFile(p, buf, 0o644); err != nil {
				t.Errorf("writer: %v", err)
				return
			}
			writes.Add(1)
		}
	}()
	waitWrites := func(n int64) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for writes.Load() < n {
			if time.Now().After(deadline) {
				t.Fatalf("the writer made %d writes, not %d, in 10 s: is the source still frozen?", writes.Load(), n)
			}
			time.Sleep(time.Millisecond)
		}
	}
	waitWrites(20)
	stats, err := Copy(context.Background(), src, dst, 64<<20)
	if err != nil {
		close(stop)
		wg.Wait()
		t.Fatal(err)
	}
	if stats.Frozen == 0 || stats.Bytes == 0 {
		t.Errorf("copy of a mounted source: %+v, want it frozen and some bytes copied", stats)
	}
	waitWrites(writes.Load() + 20) // thawed
	close(stop)
	wg.Wait()
	fsck(t, dst)

	mnt2, err := Mount(context.Background(), dst)
	if err != nil {
		t.Fatalf("mount the copy while the source is mounted (same ext4 UUID): %v", err)
	}
	checkFile(t, filepath.Join(mnt2, "a"), before)
	if err := os.WriteFile(filepath.Join(mnt2, "b"), []byte("copy"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(mnt, "c"), []byte("source"), 0o644); err != nil {
		t.Fatal(err)
	}
	absent(t, filepath.Join(mnt, "b"))
	absent(t, filepath.Join(mnt2, "c"))
	// Again: the copy exists and is kept.
	if again, err := Copy(context.Background(), src, dst, 64<<20); err != nil || again.Bytes != 0 {
		t.Errorf("repeated Copy: %+v, %v; want nothing copied", again, err)
	}
}

// TestCopyGrows: a copy for a larger size is grown offline (resize2fs on
// the unmounted copy, no CAP_SYS_RESOURCE): mounted, it has that much room,
// its label records the size, the source's files are in it and e2fsck finds
// it clean.
func TestCopyGrows(t *testing.T) {
	src, dst := newDir(t), newDir(t)
	mnt := createMount(t, src, 8<<20)
	data := bytes.Repeat([]byte{7}, 3<<20)
	if err := os.WriteFile(filepath.Join(mnt, "a"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, size := range []int64{40 << 20, 1 << 30} {
		t.Run(fmt.Sprint(size>>20, "MiB"), func(t *testing.T) {
			if err := Remove(dst); err != nil {
				t.Fatal(err)
			}
			stats, err := Copy(context.Background(), src, dst, size)
			if err != nil {
				t.Fatal(err)
			}
			if stats.GrownFromMiB != 8 {
				t.Errorf("stats %+v: want grown from 8 MiB", stats)
			}
			t.Logf("copied %d bytes and grew 8 MiB -> %d MiB in %v", stats.Bytes, size>>20, stats.Duration)
			fsck(t, dst)
			if got, err := readImageMiB(imagePath(dst)); err != nil || got != size>>20 {
				t.Errorf("label of the grown copy: %d MiB, %v; want %d", got, err, size>>20)
			}
			mnt2, err := Mount(context.Background(), dst)
			if err != nil {
				t.Fatal(err)
			}
			checkFile(t, filepath.Join(mnt2, "a"), data)
			st := statfs(t, mnt2)
			// The room of the empty filesystem: what is free plus the file.
			if room := int64(st.Bavail)*st.Bsize + int64(len(data)); room < size {
				t.Errorf("the grown copy has room for %d bytes, want >= %d", room, size)
			}
			if err := Unmount(dst); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestCopyLeftover: a copy interrupted before its rename (a crash) leaves
// only a temp file, no disk.img; the next Copy removes it and finishes.
func TestCopyLeftover(t *testing.T) {
	src, dst := newDir(t), newDir(t)
	mnt := createMount(t, src, 8<<20)
	if err := os.WriteFile(filepath.Join(mnt, "a"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dst, 0o700); err != nil {
		t.Fatal(err)
	}
	half := filepath.Join(dst, tempPrefix+"crashed")
	if err := os.WriteFile(half, []byte("half a copy"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Copy(context.Background(), src, dst, 8<<20); err != nil {
		t.Fatal(err)
	}
	absent(t, half)
	fsck(t, dst)
}

// TestCopyNeedsRecovery: the source is not mounted but its journal needs
// recovery (its node crashed while it was mounted): the copy is settled
// (the journal replayed), grown and relabelled, and e2fsck finds it clean
// with the files written before the crash.
func TestCopyNeedsRecovery(t *testing.T) {
	live, src, dst := newDir(t), newDir(t), newDir(t)
	mnt := createMount(t, live, 8<<20)
	data := bytes.Repeat([]byte{3}, 1<<20)
	if err := os.WriteFile(filepath.Join(mnt, "a"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	unix.Sync() // the journal holds it; the image says "mounted"
	if err := os.MkdirAll(src, 0o700); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("cp", "--sparse=always", imagePath(live), imagePath(src)).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v: %s", err, out)
	}
	if !needsRecovery(t, src) {
		t.Fatal("the crashed image needs no recovery: the test shows nothing")
	}
	if _, err := Copy(context.Background(), src, dst, 40<<20); err != nil {
		t.Fatal(err)
	}
	fsck(t, dst)
	if needsRecovery(t, dst) {
		t.Error("the copy still needs recovery")
	}
	mnt2, err := Mount(context.Background(), dst)
	if err != nil {
		t.Fatal(err)
	}
	checkFile(t, filepath.Join(mnt2, "a"), data)
}

// TestCopyRefuses: a smaller size is ErrShrink and a missing source an
// error; neither leaves anything in the destination.
func TestCopyRefuses(t *testing.T) {
	src, dst := newDir(t), newDir(t)
	createMount(t, src, 16<<20)
	if _, err := Copy(context.Background(), src, dst, 8<<20); !errors.Is(err, ErrShrink) {
		t.Errorf("Copy to less: %v, want ErrShrink", err)
	}
	if _, err := Copy(context.Background(), filepath.Join(t.TempDir(), "none"), dst, 8<<20); err == nil {
		t.Error("Copy of a missing source succeeded")
	}
	absent(t, dst)
}

// TestThaw: a clone's filesystem left frozen (a plugin killed during a
// copy) is thawed by Thaw, and its blocked writer goes on; a filesystem not
// frozen, or not mounted, is left alone.
func TestThaw(t *testing.T) {
	dir := newDir(t)
	mnt := createMount(t, dir, 8<<20)
	f, err := os.Open(mnt)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.IoctlSetInt(int(f.Fd()), fiFreeze, 0); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- os.WriteFile(filepath.Join(mnt, "a"), []byte("x"), 0o644) }()
	select {
	case err := <-done:
		t.Fatalf("a write to a frozen filesystem returned at once (%v): the test shows nothing", err)
	case <-time.After(100 * time.Millisecond):
	}
	if thawed, err := Thaw(dir); err != nil || !thawed {
		t.Fatalf("Thaw = %v, %v; want true", thawed, err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the writer is still blocked after Thaw")
	}
	if thawed, err := Thaw(dir); err != nil || thawed {
		t.Errorf("Thaw of a filesystem not frozen = %v, %v; want false, nil", thawed, err)
	}
	if thawed, err := Thaw(filepath.Join(t.TempDir(), "none")); err != nil || thawed {
		t.Errorf("Thaw of no clone = %v, %v; want false, nil", thawed, err)
	}
}
