package clones

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/clonefs"
	"github.com/strata-csi/strata/driver/credentials"
	"github.com/strata-csi/strata/driver/engine"
	"github.com/strata-csi/strata/driver/mount"
	"github.com/strata-csi/strata/driver/state"
	"github.com/strata-csi/strata/layercache"
)

// requireRoot fails a test that mounts when it does not run as root.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test mounts clone filesystems (loop devices) and must run as root")
	}
}

// fakeClone makes clone id on d's root as a first stage leaves it, created
// at created, with a real filesystem image of 8 MiB; mounted if staged.
func fakeClone(t *testing.T, c *Clones, id string, created time.Time, staged bool) {
	t.Helper()
	ctx := context.Background()
	if err := state.WriteClone(c.root, &state.Clone{VolumeID: id, CapacityBytes: 8 << 20, Created: created,
		Stack: []state.StackImage{{Image: "r/x:v1", Digest: v1.Hash{Algorithm: "sha256", Hex: strings.Repeat("ab", 32)}}}}); err != nil {
		t.Fatal(err)
	}
	if err := c.store.Acquire(state.CloneOwner(id), nil); err != nil {
		t.Fatal(err)
	}
	dir := state.CloneDir(c.root, id)
	if err := clonefs.Create(ctx, dir, 8<<20); err != nil {
		t.Fatal(err)
	}
	if staged {
		if _, err := clonefs.Mount(ctx, dir); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = clonefs.Unmount(dir) })
	}
}

// cloneState reports whether clone id's directory exists and whether its
// layer references are held.
func cloneState(t *testing.T, c *Clones, id string) (dir, held bool) {
	t.Helper()
	_, err := os.Stat(state.CloneDir(c.root, id))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatal(err)
	}
	owners, oerr := c.store.Owners()
	if oerr != nil {
		t.Fatal(oerr)
	}
	_, held = owners[state.CloneOwner(id)]
	return err == nil, held
}

// cloneExists reports whether clone id exists, checking that its directory
// and its references go together (no removal may be under way).
func cloneExists(t *testing.T, c *Clones, id string) bool {
	t.Helper()
	dir, held := cloneState(t, c, id)
	if dir != held {
		t.Errorf("clone %s: directory present %v but references held %v", id, dir, held)
	}
	return dir
}

// cloneGone reports whether clone id and its references are both gone.
func cloneGone(t *testing.T, c *Clones, id string) bool {
	t.Helper()
	dir, held := cloneState(t, c, id)
	return !dir && !held
}

// newTestClones returns the clones of a node "node-1" of driver
// testDriver, on a fresh state root with its own layer cache.
func newTestClones(t *testing.T) *Clones {
	t.Helper()
	root := t.TempDir()
	store, err := layercache.Open(root)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	creds, err := credentials.New(credentials.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(creds.Close)
	e, err := engine.New(engine.Config{Root: root, DriverName: testDriver, NodeID: "node-1", Store: store, Credentials: creds})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	return New(e, &engine.Locks{}, "node-1", testDriver)
}

// testDriver is the CSI driver name of the tests' PersistentVolumes.
const testDriver = "strata.csi.dev"

// TestSweepClones: the sweep removes exactly the clones whose volume has
// no PersistentVolume, that are not staged and not too young.
func TestSweepClones(t *testing.T) {
	requireRoot(t)
	c := newTestClones(t)
	old := time.Now().Add(-time.Hour)
	fakeClone(t, c, "strata-kept", old, false)         // its PV exists
	fakeClone(t, c, "strata-gone", old, false)         // its PV is gone
	fakeClone(t, c, "strata-staged", old, true)        // PV gone, but still mounted
	fakeClone(t, c, "strata-young", time.Now(), false) // PV gone (or not seen yet), just made
	pvs := map[string]bool{"strata-kept": true}
	exists := func(h string) bool { return pvs[h] }
	img := state.ClonePathsOf(c.root, "strata-gone").Image
	if diskBytes(img) == 0 {
		t.Fatalf("%s takes no disk", img)
	}

	if n := c.sweep(context.Background(), exists, nil, time.Minute); n != 1 {
		t.Errorf("sweep removed %d clones, want 1", n)
	}
	for id, want := range map[string]bool{"strata-kept": true, "strata-gone": false, "strata-staged": true, "strata-young": true} {
		if got := cloneExists(t, c, id); got != want {
			t.Errorf("after the sweep, clone %s exists: %v, want %v", id, got, want)
		}
	}
	if mp, err := mount.IsMountPoint(state.ClonePathsOf(c.root, "strata-staged").FS); err != nil || !mp {
		t.Errorf("the staged clone's filesystem is no longer mounted (%v, %v)", mp, err)
	}

	// Unstaged, the clone goes at the next sweep; the kept one stays.
	if err := clonefs.Unmount(state.CloneDir(c.root, "strata-staged")); err != nil {
		t.Fatal(err)
	}
	if n := c.sweep(context.Background(), exists, nil, time.Minute); n != 1 || cloneExists(t, c, "strata-staged") || !cloneExists(t, c, "strata-kept") {
		t.Errorf("second sweep removed %d; staged clone exists %v, kept clone exists %v", n, cloneExists(t, c, "strata-staged"), cloneExists(t, c, "strata-kept"))
	}
	// Once its PV is deleted, the kept one goes too.
	delete(pvs, "strata-kept")
	if n := c.sweep(context.Background(), exists, nil, time.Minute); n != 1 || cloneExists(t, c, "strata-kept") {
		t.Errorf("third sweep removed %d; want strata-kept gone", n)
	}
	// A young clone whose PV the watch saw deleted has no grace.
	seen := func(h string) bool { return h == "strata-young" }
	if n := c.sweep(context.Background(), exists, seen, time.Minute); n != 1 || cloneExists(t, c, "strata-young") {
		t.Errorf("sweep after the young clone's PV was seen deleted removed %d; want strata-young gone", n)
	}
}

// TestCloneSweeperWatchesPersistentVolumes: the production sweeper reads
// PersistentVolumes through an informer: a clone whose PV (of this driver,
// by handle) exists stays; deleting the PV removes the clone.
func TestCloneSweeperWatchesPersistentVolumes(t *testing.T) {
	requireRoot(t)
	pv := func(name, driver, handle string) *corev1.PersistentVolume {
		return &corev1.PersistentVolume{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: corev1.PersistentVolumeSpec{
			PersistentVolumeSource: corev1.PersistentVolumeSource{CSI: &corev1.CSIPersistentVolumeSource{Driver: driver, VolumeHandle: handle}}}}
	}
	kube := fake.NewClientset(pv("pv-a", testDriver, "strata-a"), pv("pv-other", "other.csi.dev", "strata-b"))
	c := newTestClones(t)
	old := time.Now().Add(-time.Hour)
	// strata-a is young: the grace spares clones without a PV, not those
	// whose PV the watch saw deleted.
	fakeClone(t, c, "strata-a", time.Now(), false)
	fakeClone(t, c, "strata-b", old, false) // the PV of that handle is another driver's
	defer startCloneSweeper(c, kube)()
	waitUntil(t, "the clone of another driver's PV is removed", func() bool { return cloneGone(t, c, "strata-b") })
	if !cloneExists(t, c, "strata-a") {
		t.Fatal("the clone whose PV exists was removed")
	}
	if err := kube.CoreV1().PersistentVolumes().Delete(context.Background(), "pv-a", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the clone of the deleted PV is removed", func() bool { return cloneGone(t, c, "strata-a") })
}

// startCloneSweeper runs c's clone sweeper until the returned function is
// called, which waits for it to stop.
func startCloneSweeper(c *Clones, kube kubernetes.Interface) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { c.RunSweeper(ctx, kube); close(done) }()
	return func() { cancel(); <-done }
}

// waitUntil polls cond for up to 20 s, and fails the test if it never holds.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestDeleteTellsOnChange: a removal tells the onChange listener (the
// node's storage capacity), a refused one does not.
func TestDeleteTellsOnChange(t *testing.T) {
	requireRoot(t)
	c := newTestClones(t)
	old := time.Now().Add(-time.Hour)
	fakeClone(t, c, "strata-free", old, false)
	fakeClone(t, c, "strata-busy", old, true)
	var calls atomic.Int32
	c.SetOnChange(func() { calls.Add(1) })
	logger := klog.Background()
	if err := c.Delete(logger, "strata-busy", "test"); !errors.Is(err, ErrInUse) {
		t.Fatalf("Delete of a staged clone: %v, want ErrInUse", err)
	}
	if n := calls.Load(); n != 0 {
		t.Errorf("a refused removal told the listener %d times", n)
	}
	if err := c.Delete(logger, "strata-free", "test"); err != nil {
		t.Fatal(err)
	}
	if n := calls.Load(); n != 1 {
		t.Errorf("a removal told the listener %d times, want once", n)
	}
}
