package clones

import (
	"context"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/strata-csi/strata/driver/engine"
)

// TestCloneSweeperForgetsHandledDeletions: once the clone of a deleted
// PersistentVolume is gone, the sweeper forgets that deletion. A
// PersistentVolume made again with the same handle (the handle derives from
// the claim's name and parameters) whose new clone appears before the watch
// has seen the new PersistentVolume gets the grace period like any young
// clone, instead of being removed at once for the old deletion.
func TestCloneSweeperForgetsHandledDeletions(t *testing.T) {
	requireRoot(t)
	pv := func(name, handle string) *corev1.PersistentVolume {
		return &corev1.PersistentVolume{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: corev1.PersistentVolumeSpec{
			PersistentVolumeSource: corev1.PersistentVolumeSource{CSI: &corev1.CSIPersistentVolumeSource{Driver: testDriver, VolumeHandle: handle}}}}
	}
	kube := fake.NewClientset(pv("pv-a", "strata-a"), pv("pv-c", "strata-c"))
	c := newTestClones(t)
	old := time.Now().Add(-time.Hour)
	fakeClone(t, c, "strata-a", old, false)
	fakeClone(t, c, "strata-c", old, false)
	defer startCloneSweeper(c, kube)()
	if err := kube.CoreV1().PersistentVolumes().Delete(context.Background(), "pv-a", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the clone of the deleted PV is removed", func() bool { return cloneGone(t, c, "strata-a") })

	// The PV is made again with the same handle, and its first stage makes
	// the clone before this node's watch has seen the new PV.
	fakeClone(t, c, "strata-a", time.Now(), false)
	// Another deletion triggers a sweep; its own clone going shows the
	// sweep ran.
	if err := kube.CoreV1().PersistentVolumes().Delete(context.Background(), "pv-c", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the clone of the other deleted PV is removed", func() bool { return cloneGone(t, c, "strata-c") })
	if !cloneExists(t, c, "strata-a") {
		t.Fatal("the young clone of a re-created PersistentVolume was removed without its grace period, " +
			"for a deletion of the same handle that the sweeper had already handled")
	}

	// Seen by the watch, the new PV keeps its clone; deleted again, the
	// clone goes at once.
	if _, err := kube.CoreV1().PersistentVolumes().Create(context.Background(), pv("pv-a2", "strata-a"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := kube.CoreV1().PersistentVolumes().Delete(context.Background(), "pv-a2", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the clone of the re-created and deleted PV is removed", func() bool { return cloneGone(t, c, "strata-a") })
}

// TestCloneSweeperKeepsSourceOfUnmadeClone: the claim of clone A is
// deleted right after a claim cloned from it was made: the new volume's
// PersistentVolume names A (cloneOf) but its clone B is not made on this
// node yet. The sweep keeps A until B's copy exists, then removes it.
func TestCloneSweeperKeepsSourceOfUnmadeClone(t *testing.T) {
	requireRoot(t)
	pv := func(name, handle, cloneOf string) *corev1.PersistentVolume {
		p := &corev1.PersistentVolume{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: corev1.PersistentVolumeSpec{
			PersistentVolumeSource: corev1.PersistentVolumeSource{CSI: &corev1.CSIPersistentVolumeSource{Driver: testDriver, VolumeHandle: handle}}}}
		if cloneOf != "" {
			p.Spec.CSI.VolumeAttributes = map[string]string{"image": "r/x:v1", engine.AttrClone: "true", engine.AttrCloneOf: cloneOf}
		}
		return p
	}
	// A clone of E's claim placed on another node does not keep E: it
	// cannot be copied from here.
	elsewhere := clonePV("pv-x", "strata-x", "r/x:v1", "strata-e", "node-2")
	kube := fake.NewClientset(pv("pv-b", "strata-b", "strata-a"), pv("pv-c", "strata-c", ""), pv("pv-d", "strata-d", ""), elsewhere)
	c := newTestClones(t)
	old := time.Now().Add(-time.Hour)
	fakeClone(t, c, "strata-a", old, false) // its PV is gone already
	fakeClone(t, c, "strata-e", old, false) // so is this one's
	fakeClone(t, c, "strata-c", old, false)
	fakeClone(t, c, "strata-d", old, false)
	defer startCloneSweeper(c, kube)()
	// A sweep runs (its removal of C shows it) and keeps A.
	if err := kube.CoreV1().PersistentVolumes().Delete(context.Background(), "pv-c", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	// (A sweep goes through the clones in id order: A before C and E.)
	waitUntil(t, "the clone of the deleted PV, and the source of a clone elsewhere, are removed", func() bool {
		return cloneGone(t, c, "strata-c") && cloneGone(t, c, "strata-e")
	})
	if !cloneExists(t, c, "strata-a") {
		t.Fatal("the sweep removed clone strata-a, the source of strata-b, whose PersistentVolume exists and whose copy is not made yet: the new claim lost its data")
	}
	// B made, A goes at the next sweep.
	fakeClone(t, c, "strata-b", time.Now(), false)
	if err := kube.CoreV1().PersistentVolumes().Delete(context.Background(), "pv-d", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the source is removed once its clone is made", func() bool { return cloneGone(t, c, "strata-a") })
	if !cloneExists(t, c, "strata-b") {
		t.Fatal("the made clone whose PV exists was removed")
	}
}
