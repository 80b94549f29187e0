package clones

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/engine"
	"github.com/strata-csi/strata/driver/state"
	"github.com/strata-csi/strata/internal/fault"
	"github.com/strata-csi/strata/test/testimage"
)

// pushBase pushes a one-layer image holding base.txt to a registry on
// loopback and returns its reference.
func pushBase(t *testing.T, name string) string {
	t.Helper()
	ref := testimage.Registry(t) + "/" + name + ":v1"
	testimage.Push(t, ref, testimage.Image(t, testimage.Layer(t, testimage.Tar(t, testimage.File("base.txt", "base of "+name)), testimage.Gzip)))
	return ref
}

// stageReq is the NodeStageVolume of clone id of ref, of capacity bytes,
// starting from clone cloneOf unless it is "".
func stageReq(t *testing.T, id, ref string, capacity int64, cloneOf string) StageRequest {
	t.Helper()
	attrs := map[string]string{"image": ref, engine.AttrClone: "true", engine.AttrCapacity: strconv.FormatInt(capacity, 10)}
	if cloneOf != "" {
		attrs[engine.AttrCloneOf] = cloneOf
	}
	a, err := engine.ParseAttributes(attrs)
	if err != nil {
		t.Fatal(err)
	}
	return StageRequest{VolumeID: id, StagingPath: filepath.Join(t.TempDir(), "staging"), Attrs: a}
}

// stageOK stages req and unstages it at the end of the test; it returns
// the staging path.
func stageOK(t *testing.T, c *Clones, req StageRequest) string {
	t.Helper()
	if err := c.Stage(context.Background(), req); err != nil {
		t.Fatalf("stage %s: %v", req.VolumeID, err)
	}
	t.Cleanup(func() { _ = c.Unstage(context.Background(), req.VolumeID, req.StagingPath) })
	return req.StagingPath
}

func unstageOK(t *testing.T, c *Clones, req StageRequest) {
	t.Helper()
	if err := c.Unstage(context.Background(), req.VolumeID, req.StagingPath); err != nil {
		t.Fatalf("unstage %s: %v", req.VolumeID, err)
	}
}

func wantFile(t *testing.T, path, want string) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil || string(got) != want {
		t.Fatalf("%s: %q, %v; want %q", path, got, err, want)
	}
}

func wantAbsent(t *testing.T, path string) {
	t.Helper()
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("%s: %v, want it absent", path, err)
	}
}

// overlayUUID is the overlayfs UUID stored on clone id's upper.
func overlayUUID(t *testing.T, c *Clones, id string) string {
	t.Helper()
	buf := make([]byte, 64)
	n, err := unix.Getxattr(state.ClonePathsOf(c.root, id).Upper, "trusted.overlay.uuid", buf)
	if err != nil {
		t.Fatalf("overlay UUID of %s: %v", id, err)
	}
	return string(buf[:n])
}

func e2fsck(t *testing.T, img string) {
	t.Helper()
	out, err := exec.Command("e2fsck", "-fn", img).CombinedOutput()
	if err != nil {
		t.Fatalf("e2fsck -fn %s: %v\n%s", img, err, out)
	}
}

// TestCloneOfClaim: clone B of clone A (staged, a writer running during
// the copy) starts with A's files; the copy is a clean filesystem; B's
// writes are not in A and A's are not in B; B keeps its data once A is
// deleted.
func TestCloneOfClaim(t *testing.T) {
	requireRoot(t)
	c := newTestClones(t)
	ref := pushBase(t, "ds")
	reqA := stageReq(t, "strata-a", ref, 64<<20, "")
	a := stageOK(t, c, reqA)
	if err := os.WriteFile(filepath.Join(a, "a.txt"), []byte("written in A"), 0o644); err != nil {
		t.Fatal(err)
	}
	var writes atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // a pod writing to A all along
		defer wg.Done()
		buf := bytes.Repeat([]byte{1}, 128<<10)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if err := os.WriteFile(filepath.Join(a, fmt.Sprintf("w%d", i%30)), buf, 0o644); err != nil {
				t.Errorf("writer in A: %v", err)
				return
			}
			writes.Add(1)
		}
	}()
	for writes.Load() < 10 {
		time.Sleep(time.Millisecond)
	}
	reqB := stageReq(t, "strata-b", ref, 64<<20, "strata-a")
	b := stageOK(t, c, reqB)
	n := writes.Load()
	for deadline := time.Now().Add(10 * time.Second); writes.Load() < n+10; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("A's writer is stuck after B's copy: A's filesystem is still frozen")
		}
	}
	close(stop)
	wg.Wait()

	wantFile(t, filepath.Join(b, "base.txt"), "base of ds")
	wantFile(t, filepath.Join(b, "a.txt"), "written in A")
	if err := os.WriteFile(filepath.Join(b, "b.txt"), []byte("written in B"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(a, "a2.txt"), []byte("later in A"), 0o644); err != nil {
		t.Fatal(err)
	}
	wantAbsent(t, filepath.Join(a, "b.txt"))
	wantAbsent(t, filepath.Join(b, "a2.txt"))
	if ua, ub := overlayUUID(t, c, "strata-a"), overlayUUID(t, c, "strata-b"); ua == ub {
		t.Errorf("A's and B's overlays have one UUID, %x: pods see one filesystem id", ua)
	}
	rec, err := state.ReadClone(c.root, "strata-b")
	if err != nil || rec == nil || rec.CloneOf != "strata-a" || rec.CapacityBytes != 64<<20 {
		t.Fatalf("B's record: %+v, %v; want cloneOf strata-a, 64 MiB", rec, err)
	}
	unstageOK(t, c, reqB)
	e2fsck(t, state.ClonePathsOf(c.root, "strata-b").Image)

	// A goes; B keeps its own copy.
	unstageOK(t, c, reqA)
	if err := c.Delete(klog.Background(), "strata-a", "test"); err != nil {
		t.Fatal(err)
	}
	if !cloneGone(t, c, "strata-a") {
		t.Fatal("A is not gone")
	}
	b = stageOK(t, c, reqB)
	wantFile(t, filepath.Join(b, "a.txt"), "written in A")
	wantFile(t, filepath.Join(b, "b.txt"), "written in B")
}

// TestCloneOfRefuses: a source that is not on this node, a source of other
// images, a smaller size, a source busy with another call: each is a clear
// error, and only the busy one leaves anything behind (the new clone's
// record, for the retry).
func TestCloneOfRefuses(t *testing.T) {
	requireRoot(t)
	c := newTestClones(t)
	ref := pushBase(t, "ds")
	stageOK(t, c, stageReq(t, "strata-a", ref, 64<<20, ""))

	err := c.Stage(context.Background(), stageReq(t, "strata-b", ref, 64<<20, "strata-none"))
	if !errors.Is(err, ErrNoSource) || fault.Of(err) != fault.Precondition ||
		!strings.Contains(err.Error(), "strata-none") || !strings.Contains(err.Error(), "node-1") || !strings.Contains(err.Error(), "strata-b") {
		t.Errorf("clone of a source not on this node: %v; want ErrNoSource naming the node and both volumes", err)
	}
	if !cloneGone(t, c, "strata-b") {
		t.Error("a refused clone of a missing source left its directory or references behind")
	}
	other := pushBase(t, "other")
	if err := c.Stage(context.Background(), stageReq(t, "strata-b", other, 64<<20, "strata-a")); !errors.Is(err, engine.ErrBaseChanged) {
		t.Errorf("clone naming other images than its source's: %v, want ErrBaseChanged", err)
	}
	if err := c.Stage(context.Background(), stageReq(t, "strata-b", ref, 32<<20, "strata-a")); !errors.Is(err, ErrShrink) {
		t.Errorf("clone smaller than its source: %v, want ErrShrink", err)
	}
	if !cloneGone(t, c, "strata-b") {
		t.Error("a refused clone left its directory or references behind")
	}
	unlock, err := c.locks.TryLock(engine.CloneLock("strata-a"), "test")
	if err != nil {
		t.Fatal(err)
	}
	reqB := stageReq(t, "strata-b", ref, 64<<20, "strata-a")
	if err := c.Stage(context.Background(), reqB); !errors.Is(err, engine.ErrBusy) {
		t.Errorf("clone of a source busy with another call: %v, want ErrBusy", err)
	}
	unlock()
	stageOK(t, c, reqB) // the retry
}

// TestCloneOfCrashedCopy: a first stage that crashed between the copy and
// its rename left the record and a temp file, no disk.img: the next stage
// copies again, and the clone has the source's writes.
func TestCloneOfCrashedCopy(t *testing.T) {
	requireRoot(t)
	c := newTestClones(t)
	ref := pushBase(t, "ds")
	a := stageOK(t, c, stageReq(t, "strata-a", ref, 64<<20, ""))
	if err := os.WriteFile(filepath.Join(a, "a.txt"), []byte("written in A"), 0o644); err != nil {
		t.Fatal(err)
	}
	src, err := state.ReadClone(c.root, "strata-a")
	if err != nil {
		t.Fatal(err)
	}
	rec := *src
	rec.VolumeID, rec.CloneOf, rec.Created = "strata-b", "strata-a", time.Now().UTC()
	if err := state.WriteClone(c.root, &rec); err != nil {
		t.Fatal(err)
	}
	half := filepath.Join(state.CloneDir(c.root, "strata-b"), "."+state.ImageFile+".tmp-crashed")
	if err := os.WriteFile(half, bytes.Repeat([]byte{9}, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	b := stageOK(t, c, stageReq(t, "strata-b", ref, 64<<20, "strata-a"))
	wantFile(t, filepath.Join(b, "a.txt"), "written in A")
	wantAbsent(t, half)
}

// TestCloneOfLarger: a clone of a claim asking for more than its source's
// size gets a filesystem of its own size (grown offline, before its first
// mount), with the source's files.
func TestCloneOfLarger(t *testing.T) {
	requireRoot(t)
	c := newTestClones(t)
	ref := pushBase(t, "ds")
	a := stageOK(t, c, stageReq(t, "strata-a", ref, 16<<20, ""))
	if err := os.WriteFile(filepath.Join(a, "a.txt"), []byte("written in A"), 0o644); err != nil {
		t.Fatal(err)
	}
	const size = 256 << 20
	b := stageOK(t, c, stageReq(t, "strata-b", ref, size, "strata-a"))
	wantFile(t, filepath.Join(b, "a.txt"), "written in A")
	var st unix.Statfs_t
	if err := unix.Statfs(state.ClonePathsOf(c.root, "strata-b").FS, &st); err != nil {
		t.Fatal(err)
	}
	if room := int64(st.Blocks) * st.Bsize; room < size {
		t.Errorf("B's filesystem holds %d bytes, want >= %d", room, size)
	}
	if avail := int64(st.Bavail) * st.Bsize; avail < size-(1<<20) {
		t.Errorf("B's filesystem has %d bytes free, want about %d", avail, size)
	}
	if rec, _ := state.ReadClone(c.root, "strata-b"); rec == nil || rec.CapacityBytes != size {
		t.Errorf("B's record: %+v, want %d bytes", rec, size)
	}
}
