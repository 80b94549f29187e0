package clones

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/strata-csi/strata/driver/engine"
	"github.com/strata-csi/strata/driver/state"
)

// clonePV is the PersistentVolume of clone handle of ref, cloned from the
// claim of clone cloneOf, placed on node.
func clonePV(name, handle, ref, cloneOf, node string) *corev1.PersistentVolume {
	return &corev1.PersistentVolume{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: corev1.PersistentVolumeSpec{
		PersistentVolumeSource: corev1.PersistentVolumeSource{CSI: &corev1.CSIPersistentVolumeSource{
			Driver: testDriver, VolumeHandle: handle, VolumeAttributes: map[string]string{
				"image": ref, engine.AttrClone: "true", engine.AttrCapacity: strconv.Itoa(64 << 20), engine.AttrCloneOf: cloneOf,
				"csi.storage.k8s.io/pvc/name": "b",
			}}},
		NodeAffinity: &corev1.VolumeNodeAffinity{Required: &corev1.NodeSelector{NodeSelectorTerms: []corev1.NodeSelectorTerm{{
			MatchExpressions: []corev1.NodeSelectorRequirement{{Key: TopologyKey, Operator: corev1.NodeSelectorOpIn, Values: []string{node}}},
		}}}},
	}}
}

// TestCloneSweeperCopiesEarly: when the PersistentVolume of a claim cloned
// from clone A appears, placed on this node, the node makes its clone B at
// once, without a stage: B holds A's writes of that moment, not those made
// later before B's first stage; a clone placed on another node is not made
// here.
func TestCloneSweeperCopiesEarly(t *testing.T) {
	requireRoot(t)
	if TopologyKey != "topology.strata.csi.dev/node" {
		t.Fatalf("TopologyKey %q is not the value the chart and the CSINode labels use", TopologyKey)
	}
	c := newTestClones(t)
	ref := pushBase(t, "ds")
	reqA := stageReq(t, "strata-a", ref, 64<<20, "")
	a := stageOK(t, c, reqA)
	if err := os.WriteFile(filepath.Join(a, "a.txt"), []byte("before the claim"), 0o644); err != nil {
		t.Fatal(err)
	}
	pvA := &corev1.PersistentVolume{ObjectMeta: metav1.ObjectMeta{Name: "pv-a"}, Spec: corev1.PersistentVolumeSpec{
		PersistentVolumeSource: corev1.PersistentVolumeSource{CSI: &corev1.CSIPersistentVolumeSource{Driver: testDriver, VolumeHandle: "strata-a"}}}}
	kube := fake.NewClientset(pvA, clonePV("pv-x", "strata-x", ref, "strata-a", "node-2"))
	defer startCloneSweeper(c, kube)()
	if _, err := kube.CoreV1().PersistentVolumes().Create(context.Background(), clonePV("pv-b", "strata-b", ref, "strata-a", "node-1"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the clone of the new claim is made", func() bool { return c.made("strata-b") })
	if err := os.WriteFile(filepath.Join(a, "a2.txt"), []byte("after the claim"), 0o644); err != nil {
		t.Fatal(err)
	}
	rec, err := state.ReadClone(c.root, "strata-b")
	if err != nil || rec == nil || rec.CloneOf != "strata-a" {
		t.Fatalf("B's record: %+v, %v", rec, err)
	}
	b := stageOK(t, c, stageReq(t, "strata-b", ref, 64<<20, "strata-a"))
	wantFile(t, filepath.Join(b, "a.txt"), "before the claim")
	wantAbsent(t, filepath.Join(b, "a2.txt"))
	time.Sleep(100 * time.Millisecond) // a wrong copy of x would have had time
	if _, err := os.Lstat(state.CloneDir(c.root, "strata-x")); err == nil {
		t.Error("the clone of a claim placed on another node was made on this one")
	}
}
