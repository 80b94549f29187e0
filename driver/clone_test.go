package driver

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/strata-csi/strata/driver/clonefs"
	"github.com/strata-csi/strata/driver/mount"
	"github.com/strata-csi/strata/driver/volumes"
)

func TestCloneAttributes(t *testing.T) {
	for _, tc := range []struct {
		name    string
		attrs   map[string]string
		clone   bool
		size    int64
		wantErr string
	}{
		{"clone with capacity", map[string]string{"image": "r/x", attrClone: "true", attrCapacity: "1048576"}, true, 1 << 20, ""},
		{"clone without capacity", map[string]string{"image": "r/x", attrClone: "true"}, true, 0, ""},
		{"not a clone", map[string]string{"image": "r/x", attrClone: "false"}, false, 0, ""},
		{"clone not a bool", map[string]string{"image": "r/x", attrClone: "yes please"}, false, 0, "is not true or false"},
		{"zero capacity", map[string]string{"image": "r/x", attrClone: "true", attrCapacity: "0"}, false, 0, "not a positive number"},
		{"negative capacity", map[string]string{"image": "r/x", attrClone: "true", attrCapacity: "-5"}, false, 0, "not a positive number"},
		{"capacity with a unit", map[string]string{"image": "r/x", attrClone: "true", attrCapacity: "1Gi"}, false, 0, "not a positive number"},
		{"capacity without clone", map[string]string{"image": "r/x", attrCapacity: "1024"}, false, 0, "applies to clones only"},
		{"csi-provisioner's identity", map[string]string{"image": "r/x", attrClone: "true", attrProvisionerIdentity: "1700000000000-8081-strata.csi.dev"}, true, 0, ""},
		{"other reserved key", map[string]string{"image": "r/x", "strata.csi.dev/other": "1"}, false, 0, `unknown volume attribute "strata.csi.dev/other"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseAttributes(tc.attrs)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) || status.Code(toStatus(err)) != codes.InvalidArgument {
					t.Fatalf("parseAttributes(%v) = %v, want InvalidArgument containing %q", tc.attrs, err, tc.wantErr)
				}
				return
			}
			if err != nil || got.Clone != tc.clone || got.CloneCapacity != tc.size {
				t.Fatalf("parseAttributes(%v) = clone %v capacity %d (%v); want clone %v capacity %d", tc.attrs, got.Clone, got.CloneCapacity, err, tc.clone, tc.size)
			}
		})
	}
}

// createReq is a CreateVolume request as the provisioner sends it.
func createReq(name string, mode csi.VolumeCapability_AccessMode_Mode, required, limit int64, req *csi.TopologyRequirement) *csi.CreateVolumeRequest {
	return &csi.CreateVolumeRequest{
		Name: name, Parameters: map[string]string{"image": "r/x:v1", "csi.storage.k8s.io/pvc/name": "data"},
		CapacityRange:             &csi.CapacityRange{RequiredBytes: required, LimitBytes: limit},
		VolumeCapabilities:        []*csi.VolumeCapability{mountCap(mode)},
		AccessibilityRequirements: req,
	}
}

func nodeTopology(node string) *csi.Topology {
	return &csi.Topology{Segments: map[string]string{TopologyKey: node}}
}

func TestCreateVolumeClone(t *testing.T) {
	ctx := context.Background()
	d, err := New(Config{Mode: ModeController})
	if err != nil {
		t.Fatal(err)
	}
	rwo := csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER
	both := &csi.TopologyRequirement{Requisite: []*csi.Topology{nodeTopology("n1"), nodeTopology("n2")}, Preferred: []*csi.Topology{nodeTopology("n2")}}
	resp, err := d.CreateVolume(ctx, createReq("pvc-a", rwo, 5<<20, 0, both))
	if err != nil {
		t.Fatal(err)
	}
	v := resp.Volume
	if len(v.AccessibleTopology) != 1 || v.AccessibleTopology[0].Segments[TopologyKey] != "n2" || len(v.AccessibleTopology[0].Segments) != 1 {
		t.Errorf("topology %v, want only %s=n2 (the preferred node)", v.AccessibleTopology, TopologyKey)
	}
	if v.VolumeContext[attrClone] != "true" || v.VolumeContext[attrCapacity] != strconv.Itoa(5<<20) || v.CapacityBytes != 5<<20 {
		t.Errorf("volume context %v, capacity %d: want a clone of 5 MiB", v.VolumeContext, v.CapacityBytes)
	}
	if _, err := parseAttributes(v.VolumeContext); err != nil {
		t.Errorf("the node cannot parse the clone's context: %v", err)
	}
	again, err := d.CreateVolume(ctx, createReq("pvc-a", rwo, 5<<20, 0, both))
	if err != nil || again.Volume.VolumeId != v.VolumeId {
		t.Errorf("repeated CreateVolume = %v, %v; want the same volume %s", again, err, v.VolumeId)
	}
	other := &csi.TopologyRequirement{Requisite: []*csi.Topology{nodeTopology("n1")}}
	if _, err := d.CreateVolume(ctx, createReq("pvc-a", rwo, 5<<20, 0, other)); status.Code(toStatus(err)) != codes.AlreadyExists {
		t.Errorf("same name on another node: %v, want AlreadyExists", err)
	}

	// Requisite only; no size: the default, clamped to the limit.
	for _, tc := range []struct {
		limit, want int64
	}{{0, DefaultCloneCapacity}, {100 << 20, 100 << 20}, {4 << 30, DefaultCloneCapacity}} {
		resp, err := d.CreateVolume(ctx, createReq("pvc-limit-"+strconv.FormatInt(tc.limit, 10), rwo, 0, tc.limit, other))
		if err != nil {
			t.Fatal(err)
		}
		if resp.Volume.CapacityBytes != tc.want || resp.Volume.AccessibleTopology[0].Segments[TopologyKey] != "n1" {
			t.Errorf("limit %d: capacity %d on %v, want %d on n1", tc.limit, resp.Volume.CapacityBytes, resp.Volume.AccessibleTopology, tc.want)
		}
	}

	// Read-only: the image itself, anywhere.
	rox, err := d.CreateVolume(ctx, createReq("pvc-rox", csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY, 0, 0, other))
	if err != nil {
		t.Fatal(err)
	}
	if rox.Volume.AccessibleTopology != nil || rox.Volume.VolumeContext[attrClone] != "" {
		t.Errorf("ReadOnlyMany volume: topology %v, context %v; want neither a node nor a clone", rox.Volume.AccessibleTopology, rox.Volume.VolumeContext)
	}

	// A writable volume without a node, from a controller alone.
	_, err = d.CreateVolume(ctx, createReq("pvc-nowhere", rwo, 0, 0, nil))
	if status.Code(toStatus(err)) != codes.InvalidArgument || !strings.Contains(err.Error(), "WaitForFirstConsumer") {
		t.Errorf("writable volume without a topology requirement: %v, want InvalidArgument naming WaitForFirstConsumer", err)
	}
	noKey := &csi.TopologyRequirement{Requisite: []*csi.Topology{{Segments: map[string]string{"zone": "a"}}}}
	if _, err := d.CreateVolume(ctx, createReq("pvc-zone", rwo, 0, 0, noKey)); status.Code(toStatus(err)) != codes.InvalidArgument {
		t.Errorf("requirement without the node key: %v, want InvalidArgument", err)
	}
	reserved := createReq("pvc-reserved", rwo, 0, 0, other)
	reserved.Parameters[attrClone] = "true"
	if _, err := d.CreateVolume(ctx, reserved); status.Code(toStatus(err)) != codes.InvalidArgument {
		t.Errorf("StorageClass setting %s: %v, want InvalidArgument", attrClone, err)
	}
}

// TestCreateVolumeCloneAllMode: a plugin that is also the node places a
// clone without a requirement on itself (csi-sanity, single machines).
func TestCreateVolumeCloneAllMode(t *testing.T) {
	d, err := New(Config{Mode: ModeAll, NodeID: "solo", Root: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	resp, err := d.CreateVolume(context.Background(), createReq("pvc-1", csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, 0, 0, nil))
	if err != nil {
		t.Fatal(err)
	}
	if top := resp.Volume.AccessibleTopology; len(top) != 1 || top[0].Segments[TopologyKey] != "solo" {
		t.Errorf("topology %v, want %s=solo", top, TopologyKey)
	}
	info, err := d.NodeGetInfo(context.Background(), &csi.NodeGetInfoRequest{})
	if err != nil || info.AccessibleTopology.GetSegments()[TopologyKey] != "solo" {
		t.Errorf("NodeGetInfo = %v, %v; want topology %s=solo", info, err, TopologyKey)
	}
}

// requireRoot fails a test that mounts when it does not run as root.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test mounts clone filesystems (loop devices) and must run as root")
	}
}

// fakeClone makes clone id on d's root as a first stage leaves it, created
// at created, with a real filesystem image of 8 MiB; mounted if staged.
func fakeClone(t *testing.T, d *Driver, id string, created time.Time, staged bool) {
	t.Helper()
	ctx := context.Background()
	if err := volumes.WriteClone(d.root, &volumes.Clone{VolumeID: id, CapacityBytes: 8 << 20, Created: created,
		Stack: []volumes.StackImage{{Image: "r/x:v1", Digest: v1.Hash{Algorithm: "sha256", Hex: strings.Repeat("ab", 32)}}}}); err != nil {
		t.Fatal(err)
	}
	if err := d.store.Acquire(volumes.CloneOwner(id), nil); err != nil {
		t.Fatal(err)
	}
	dir := d.cloneDir(id)
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
func cloneState(t *testing.T, d *Driver, id string) (dir, held bool) {
	t.Helper()
	_, err := os.Stat(d.cloneDir(id))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatal(err)
	}
	owners, oerr := d.store.Owners()
	if oerr != nil {
		t.Fatal(oerr)
	}
	_, held = owners[volumes.CloneOwner(id)]
	return err == nil, held
}

// cloneExists reports whether clone id exists, checking that its directory
// and its references go together (no removal may be under way).
func cloneExists(t *testing.T, d *Driver, id string) bool {
	t.Helper()
	dir, held := cloneState(t, d, id)
	if dir != held {
		t.Errorf("clone %s: directory present %v but references held %v", id, dir, held)
	}
	return dir
}

// cloneGone reports whether clone id and its references are both gone.
func cloneGone(t *testing.T, d *Driver, id string) bool {
	t.Helper()
	dir, held := cloneState(t, d, id)
	return !dir && !held
}

func newNodeDriver(t *testing.T) *Driver {
	t.Helper()
	d, err := New(Config{Mode: ModeNode, NodeID: "node-1", Root: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// TestSweepClones: the sweep removes exactly the clones whose volume has
// no PersistentVolume, that are not staged and not too young.
func TestSweepClones(t *testing.T) {
	requireRoot(t)
	d := newNodeDriver(t)
	old := time.Now().Add(-time.Hour)
	fakeClone(t, d, "strata-kept", old, false)         // its PV exists
	fakeClone(t, d, "strata-gone", old, false)         // its PV is gone
	fakeClone(t, d, "strata-staged", old, true)        // PV gone, but still mounted
	fakeClone(t, d, "strata-young", time.Now(), false) // PV gone (or not seen yet), just made
	pvs := map[string]bool{"strata-kept": true}
	exists := func(h string) bool { return pvs[h] }
	img := filepath.Join(d.cloneDir("strata-gone"), clonefs.ImageFile)
	if diskBytes(img) == 0 {
		t.Fatalf("%s takes no disk", img)
	}

	if n := d.sweepClones(context.Background(), exists, nil, time.Minute); n != 1 {
		t.Errorf("sweep removed %d clones, want 1", n)
	}
	for id, want := range map[string]bool{"strata-kept": true, "strata-gone": false, "strata-staged": true, "strata-young": true} {
		if got := cloneExists(t, d, id); got != want {
			t.Errorf("after the sweep, clone %s exists: %v, want %v", id, got, want)
		}
	}
	if mp, err := mount.IsMountPoint(filepath.Join(d.cloneDir("strata-staged"), clonefs.MountDir)); err != nil || !mp {
		t.Errorf("the staged clone's filesystem is no longer mounted (%v, %v)", mp, err)
	}

	// Unstaged, the clone goes at the next sweep; the kept one stays.
	if err := clonefs.Unmount(d.cloneDir("strata-staged")); err != nil {
		t.Fatal(err)
	}
	if n := d.sweepClones(context.Background(), exists, nil, time.Minute); n != 1 || cloneExists(t, d, "strata-staged") || !cloneExists(t, d, "strata-kept") {
		t.Errorf("second sweep removed %d; staged clone exists %v, kept clone exists %v", n, cloneExists(t, d, "strata-staged"), cloneExists(t, d, "strata-kept"))
	}
	// Once its PV is deleted, the kept one goes too.
	delete(pvs, "strata-kept")
	if n := d.sweepClones(context.Background(), exists, nil, time.Minute); n != 1 || cloneExists(t, d, "strata-kept") {
		t.Errorf("third sweep removed %d; want strata-kept gone", n)
	}
	// A young clone whose PV the watch saw deleted has no grace.
	seen := func(h string) bool { return h == "strata-young" }
	if n := d.sweepClones(context.Background(), exists, seen, time.Minute); n != 1 || cloneExists(t, d, "strata-young") {
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
	kube := fake.NewClientset(pv("pv-a", DefaultName, "strata-a"), pv("pv-other", "other.csi.dev", "strata-b"))
	d, err := New(Config{Mode: ModeNode, NodeID: "node-1", Root: t.TempDir(), Kube: kube})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	old := time.Now().Add(-time.Hour)
	// strata-a is young: the grace spares clones without a PV, not those
	// whose PV the watch saw deleted.
	fakeClone(t, d, "strata-a", time.Now(), false)
	fakeClone(t, d, "strata-b", old, false) // the PV of that handle is another driver's
	defer startCloneSweeper(d)()
	waitUntil(t, "the clone of another driver's PV is removed", func() bool { return cloneGone(t, d, "strata-b") })
	if !cloneExists(t, d, "strata-a") {
		t.Fatal("the clone whose PV exists was removed")
	}
	if err := kube.CoreV1().PersistentVolumes().Delete(context.Background(), "pv-a", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the clone of the deleted PV is removed", func() bool { return cloneGone(t, d, "strata-a") })
}

// TestCloneFSDirMatches: package volumes names the clone's mount point
// without importing clonefs; the two must agree.
func TestCloneFSDirMatches(t *testing.T) {
	if volumes.CloneFSDir != clonefs.MountDir {
		t.Fatalf("volumes.CloneFSDir %q != clonefs.MountDir %q", volumes.CloneFSDir, clonefs.MountDir)
	}
}

// startCloneSweeper runs d's clone sweeper until the returned function is
// called, which waits for it to stop.
func startCloneSweeper(d *Driver) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { d.runCloneSweeper(ctx); close(done) }()
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
