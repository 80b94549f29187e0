package capacity

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/strata-csi/strata/driver/clonefs"
	"github.com/strata-csi/strata/driver/state"
	"github.com/strata-csi/strata/test/testfs"
)

const (
	testDriver = "strata.csi.dev"
	topoKey    = "topology.strata.csi.dev/node"
	ns         = "strata-system"
	nodeName   = "worker-1"
)

func class(name, provisioner string) *storagev1.StorageClass {
	return &storagev1.StorageClass{ObjectMeta: metav1.ObjectMeta{Name: name}, Provisioner: provisioner}
}

func node(uid string) *corev1.Node {
	return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: nodeName, UID: types.UID(uid),
		Labels: map[string]string{topoKey: nodeName}}}
}

// meter is a Measurer whose room the test sets.
type meter struct {
	mu   sync.Mutex
	room Room
	err  error
}

func (m *meter) set(capacity, maxSize int64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.room = Room{Capacity: capacity, MaximumVolumeSize: maxSize}
}

func (m *meter) measure() (Room, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.room, m.err
}

func newPublisher(t *testing.T, kube *fake.Clientset, m *meter) *Publisher {
	t.Helper()
	p, err := NewPublisher(Config{Kube: kube, DriverName: testDriver, NodeID: nodeName, TopologyKey: topoKey,
		Namespace: ns, Measure: m.measure, Interval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func list(t *testing.T, kube *fake.Clientset) map[string]storagev1.CSIStorageCapacity {
	t.Helper()
	l, err := kube.StorageV1().CSIStorageCapacities(ns).List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]storagev1.CSIStorageCapacity{}
	for _, c := range l.Items {
		if _, dup := out[c.StorageClassName]; dup {
			t.Errorf("two CSIStorageCapacity objects of class %s", c.StorageClassName)
		}
		out[c.StorageClassName] = c
	}
	return out
}

// check asserts the object of class says capacity and maxSize for the node,
// labelled and owned as it should be.
func check(t *testing.T, c storagev1.CSIStorageCapacity, capacity, maxSize int64, ownerUID string) {
	t.Helper()
	if c.Capacity == nil || c.Capacity.Value() != capacity {
		t.Errorf("%s: capacity %v, want %d", c.StorageClassName, c.Capacity, capacity)
	}
	if c.MaximumVolumeSize == nil || c.MaximumVolumeSize.Value() != maxSize {
		t.Errorf("%s: maximumVolumeSize %v, want %d", c.StorageClassName, c.MaximumVolumeSize, maxSize)
	}
	if c.NodeTopology == nil || len(c.NodeTopology.MatchLabels) != 1 || c.NodeTopology.MatchLabels[topoKey] != nodeName {
		t.Errorf("%s: nodeTopology %v, want matchLabels {%s: %s}", c.StorageClassName, c.NodeTopology, topoKey, nodeName)
	}
	if c.Labels[LabelDriverName] != testDriver || c.Labels[LabelManagedBy] != "strata-csi-"+nodeName {
		t.Errorf("%s: labels %v, want %s=%s and %s=strata-csi-%s", c.StorageClassName, c.Labels, LabelDriverName, testDriver, LabelManagedBy, nodeName)
	}
	if len(c.OwnerReferences) != 1 || c.OwnerReferences[0].Kind != "Node" || c.OwnerReferences[0].APIVersion != "v1" ||
		c.OwnerReferences[0].Name != nodeName || string(c.OwnerReferences[0].UID) != ownerUID {
		t.Errorf("%s: owner references %v, want the Node %s (uid %s)", c.StorageClassName, c.OwnerReferences, nodeName, ownerUID)
	}
}

// TestSync: one object per class of the driver, none for other classes;
// updated when the room changes, left alone when it does not, deleted when
// the class goes; owned by the Node, and by the new Node when the node is
// registered again.
func TestSync(t *testing.T) {
	ctx := context.Background()
	a, b, other := class("strata-a", testDriver), class("strata-b", testDriver), class("ebs", "ebs.csi.aws.com")
	kube := fake.NewClientset(node("uid-1"))
	m := &meter{}
	m.set(10<<30, 9<<30)
	p := newPublisher(t, kube, m)

	if err := p.Sync(ctx, []*storagev1.StorageClass{a, b, other}); err != nil {
		t.Fatal(err)
	}
	got := list(t, kube)
	if len(got) != 2 {
		t.Fatalf("objects for classes %v, want strata-a and strata-b only", keys(got))
	}
	check(t, got["strata-a"], 10<<30, 9<<30, "uid-1")
	check(t, got["strata-b"], 10<<30, 9<<30, "uid-1")

	// Nothing changed: no write.
	kube.ClearActions()
	if err := p.Sync(ctx, []*storagev1.StorageClass{a, b, other}); err != nil {
		t.Fatal(err)
	}
	for _, act := range kube.Actions() {
		if act.GetVerb() != "get" && act.GetVerb() != "list" {
			t.Errorf("a pass without a change did %s %s", act.GetVerb(), act.GetResource().Resource)
		}
	}

	// The free space changes.
	m.set(3<<30, 2<<30)
	if err := p.Sync(ctx, []*storagev1.StorageClass{a, b}); err != nil {
		t.Fatal(err)
	}
	got = list(t, kube)
	check(t, got["strata-a"], 3<<30, 2<<30, "uid-1")
	check(t, got["strata-b"], 3<<30, 2<<30, "uid-1")

	// A class goes.
	if err := p.Sync(ctx, []*storagev1.StorageClass{a}); err != nil {
		t.Fatal(err)
	}
	got = list(t, kube)
	if _, ok := got["strata-b"]; ok || len(got) != 1 {
		t.Fatalf("after strata-b was deleted: objects of %v, want strata-a only", keys(got))
	}

	// The node is deleted and registered again: a new owner.
	if err := kube.CoreV1().Nodes().Delete(ctx, nodeName, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := p.Sync(ctx, []*storagev1.StorageClass{a}); err == nil {
		t.Error("Sync without the Node succeeded; want an error naming the node")
	}
	if _, err := kube.CoreV1().Nodes().Create(ctx, node("uid-2"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := p.Sync(ctx, []*storagev1.StorageClass{a}); err != nil {
		t.Fatal(err)
	}
	check(t, list(t, kube)["strata-a"], 3<<30, 2<<30, "uid-2")

	// A measurement that fails changes nothing.
	m.err = errors.New("statfs: broken")
	if err := p.Sync(ctx, []*storagev1.StorageClass{a}); err == nil {
		t.Error("Sync with a failing measurement succeeded")
	}
	check(t, list(t, kube)["strata-a"], 3<<30, 2<<30, "uid-2")
}

// TestSyncLeavesOthersAlone: the objects of other nodes and other drivers
// in the namespace are not touched.
func TestSyncLeavesOthersAlone(t *testing.T) {
	ctx := context.Background()
	mine := class("strata-a", testDriver)
	otherNode := &storagev1.CSIStorageCapacity{ObjectMeta: metav1.ObjectMeta{Name: "theirs", Namespace: ns,
		Labels: map[string]string{LabelDriverName: testDriver, LabelManagedBy: "strata-csi-worker-2"}}, StorageClassName: "strata-a"}
	otherDriver := &storagev1.CSIStorageCapacity{ObjectMeta: metav1.ObjectMeta{Name: "ebs", Namespace: ns,
		Labels: map[string]string{LabelDriverName: "ebs.csi.aws.com", LabelManagedBy: "external-provisioner"}}, StorageClassName: "gone"}
	kube := fake.NewClientset(node("uid-1"), otherNode, otherDriver)
	m := &meter{}
	m.set(1<<30, 1<<29)
	if err := newPublisher(t, kube, m).Sync(ctx, []*storagev1.StorageClass{mine}); err != nil {
		t.Fatal(err)
	}
	l, err := kube.StorageV1().CSIStorageCapacities(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(l.Items) != 3 {
		t.Errorf("%d objects in the namespace, want 3 (another node's, another driver's, ours)", len(l.Items))
	}
}

// TestRun: the running publisher follows the classes as they appear and
// go, and a Refresh publishes a new measurement without waiting for the
// interval.
func TestRun(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	kube := fake.NewClientset(node("uid-1"), class("strata-a", testDriver))
	m := &meter{}
	m.set(5<<30, 4<<30)
	p := newPublisher(t, kube, m)
	done := make(chan struct{})
	go func() { p.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()

	waitFor(t, "the object of strata-a", func() bool { _, ok := list(t, kube)["strata-a"]; return ok })
	if _, err := kube.StorageV1().StorageClasses().Create(ctx, class("strata-b", testDriver), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the object of a new class", func() bool { _, ok := list(t, kube)["strata-b"]; return ok })
	m.set(1<<30, 1<<29)
	p.Refresh()
	waitFor(t, "the new room after Refresh", func() bool {
		c := list(t, kube)["strata-a"]
		return c.Capacity != nil && c.Capacity.Value() == 1<<30
	})
	if err := kube.StorageV1().StorageClasses().Delete(ctx, "strata-a", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the object of a deleted class to go", func() bool { _, ok := list(t, kube)["strata-a"]; return !ok })
}

// TestReader: the controller's view of the published objects.
func TestReader(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	kube := fake.NewClientset(node("uid-1"))
	m := &meter{}
	m.set(7<<30, 6<<30)
	if err := newPublisher(t, kube, m).Sync(ctx, []*storagev1.StorageClass{class("strata-a", testDriver), class("strata-b", testDriver)}); err != nil {
		t.Fatal(err)
	}
	r := NewReader(kube, ns, testDriver, topoKey)
	if _, _, err := r.Node(nodeName); !errors.Is(err, ErrNotSynced) {
		t.Errorf("Node before Run: %v, want ErrNotSynced", err)
	}
	done := make(chan struct{})
	go func() { r.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	waitFor(t, "the reader to sync", func() bool { _, _, err := r.Node(nodeName); return err == nil })
	room, ok, _ := r.Node(nodeName)
	if !ok || room.Capacity != 7<<30 || room.MaximumVolumeSize != 6<<30 {
		t.Errorf("Node(%s) = %+v, %v; want capacity %d, maximum %d", nodeName, room, ok, 7<<30, 6<<30)
	}
	if _, ok, _ := r.Node("worker-9"); ok {
		t.Error("Node(worker-9), which published nothing, is known")
	}
	all, err := r.Nodes()
	if err != nil || len(all) != 1 || all[nodeName].Capacity != 7<<30 {
		t.Errorf("Nodes() = %v, %v; want %s only", all, err, nodeName)
	}
}

// TestMeasure measures a real ext4 filesystem: its free space, less the
// cache's reserve, less what the sparse images of clones and capped
// uppers may still grow into, the whole image of a clone not made yet.
func TestMeasure(t *testing.T) {
	root := testfs.LoopExt4(t, 256)
	ctx := context.Background()
	bavail := func() int64 {
		t.Helper()
		r, err := Measure(root, 0)
		if err != nil {
			t.Fatal(err)
		}
		return r.Available
	}
	empty, err := Measure(root, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("empty 256 MiB ext4: %+v", empty)
	if empty.Available < 200<<20 || empty.Capacity != empty.Available/miB*miB || empty.SparseReserve != 0 {
		t.Fatalf("empty filesystem: %+v, want all of about 240 MiB free as capacity", empty)
	}
	if empty.MaximumVolumeSize >= empty.Capacity || clonefs.ImageBytes(empty.MaximumVolumeSize) > empty.Capacity ||
		clonefs.ImageBytes(empty.MaximumVolumeSize+miB) <= empty.Capacity {
		t.Errorf("maximum volume size %d: want the largest MiB count whose image (%d) fits in %d",
			empty.MaximumVolumeSize, clonefs.ImageBytes(empty.MaximumVolumeSize), empty.Capacity)
	}

	withCache, err := Measure(root, 50<<20)
	if err != nil {
		t.Fatal(err)
	}
	if d := empty.Capacity - withCache.Capacity; d < 49<<20 || d > 51<<20 {
		t.Errorf("a cache reserve of 50 MiB took %d bytes of the capacity", d)
	}

	// A made clone of 64 MiB: sparse, it reserves what it may still grow into.
	id := "strata-0123456789abcdef0123456789abcdef"
	if err := state.WriteClone(root, &state.Clone{VolumeID: id, CapacityBytes: 64 << 20, Created: time.Now()}); err != nil {
		t.Fatal(err)
	}
	unmade, err := Measure(root, 0)
	if err != nil {
		t.Fatal(err)
	}
	if unmade.SparseReserve != clonefs.ImageBytes(64<<20) {
		t.Errorf("a clone recorded without an image reserves %d, want its whole image %d", unmade.SparseReserve, clonefs.ImageBytes(64<<20))
	}
	if err := clonefs.Create(ctx, state.ClonePathsOf(root, id).Dir, 64<<20); err != nil {
		t.Fatal(err)
	}
	img, err := os.Stat(state.ClonePathsOf(root, id).Image)
	if err != nil {
		t.Fatal(err)
	}
	made, err := Measure(root, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("with a 64 MiB clone: %+v (image %d bytes)", made, img.Size())
	if made.SparseReserve <= img.Size()-(4<<20) || made.SparseReserve > img.Size() {
		t.Errorf("a made 64 MiB clone reserves %d, want about its image's %d less the few blocks mkfs wrote", made.SparseReserve, img.Size())
	}
	// Together, what the clone holds and may still take is its image: the
	// capacity fell by the image size, whatever the clone has written.
	if d := empty.Capacity - made.Capacity; d < img.Size()-(1<<20) || d > img.Size()+(2<<20) {
		t.Errorf("the capacity fell by %d for a clone whose image is %d bytes", d, img.Size())
	}

	// A capped upper's image counts too.
	key := state.Key("inline-vol", "/pods/x/vol")
	paths := state.Publish(root, key)
	if err := os.MkdirAll(paths.Dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(paths.Image, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(paths.Image, 32<<20); err != nil {
		t.Fatal(err)
	}
	withUpper, err := Measure(root, 0)
	if err != nil {
		t.Fatal(err)
	}
	if d := withUpper.SparseReserve - made.SparseReserve; d != 32<<20 {
		t.Errorf("a 32 MiB hole of a capped upper added %d to the reserve", d)
	}

	// Writing fills the disk: the available bytes fall, the capacity with them.
	before := bavail()
	if err := os.WriteFile(filepath.Join(root, "fill"), make([]byte, 16<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	f, _ := os.Open(filepath.Join(root, "fill"))
	_ = f.Sync()
	f.Close()
	if d := before - bavail(); d < 16<<20 {
		t.Errorf("16 MiB written took %d bytes of the available space", d)
	}

	// A full disk has no room, never a negative one.
	full, err := Measure(root, 1<<40)
	if err != nil {
		t.Fatal(err)
	}
	if full.Capacity != 0 || full.MaximumVolumeSize != 0 {
		t.Errorf("with more reserved than free: %+v, want capacity and maximum 0", full)
	}
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

func waitFor(t *testing.T, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestManagedBy: the managed-by label names the node, or a hash of a name
// too long for a label value, always a valid one.
func TestManagedBy(t *testing.T) {
	long := strings.Repeat("n", 60) + ".example.com"
	for node, want := range map[string]string{"worker-1": "strata-csi-worker-1", long: ""} {
		got := ManagedBy(node)
		if errs := validation.IsValidLabelValue(got); len(errs) > 0 {
			t.Errorf("ManagedBy(%q) = %q: %v", node, got, errs)
		}
		if want != "" && got != want {
			t.Errorf("ManagedBy(%q) = %q, want %q", node, got, want)
		}
		if want == "" && (got == ManagedBy(long+"x") || !strings.HasPrefix(got, "strata-csi-")) {
			t.Errorf("ManagedBy(%q) = %q: want strata-csi-<hash>, unique to the node", node, got)
		}
	}
	if _, err := NewPublisher(Config{Kube: fake.NewClientset(), DriverName: testDriver, NodeID: long, TopologyKey: topoKey,
		Namespace: ns, Measure: (&meter{}).measure}); err == nil || !strings.Contains(err.Error(), long) {
		t.Errorf("NewPublisher for a node name that is no label value: %v, want an error naming it", err)
	}
}
