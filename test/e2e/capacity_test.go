//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// nodeCapacity waits until the node plugin has published the node's
// CSIStorageCapacity for class, and returns it.
func nodeCapacity(t *testing.T, class string) *storagev1.CSIStorageCapacity {
	t.Helper()
	var found *storagev1.CSIStorageCapacity
	eventually(t, 2*time.Minute, "the node's CSIStorageCapacity of class "+class, func() (bool, error) {
		l, err := kube.StorageV1().CSIStorageCapacities(releaseNS).List(context.Background(), metav1.ListOptions{
			LabelSelector: "csi.storage.k8s.io/drivername=" + driverName + ",csi.storage.k8s.io/managed-by=strata-csi-" + c.nodeName})
		if err != nil {
			return false, err
		}
		for i := range l.Items {
			if l.Items[i].StorageClassName == class {
				found = &l.Items[i]
				return true, nil
			}
		}
		return false, fmt.Errorf("%d objects of the node, none of class %s", len(l.Items), class)
	})
	return found
}

func claimPod(name, claim string) string {
	return fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata:
  name: %s
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: %s
    command: ["sleep", "86400"]
    volumeMounts:
    - name: data
      mountPath: /data
  volumes:
  - name: data
    persistentVolumeClaim:
      claimName: %s
`, name, busybox, claim)
}

func claim(name string, size int64) string {
	return fmt.Sprintf(`apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: %s
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: %s
  resources:
    requests:
      storage: %d
`, name, cloneClass, size)
}

// The node publishes its room for new clones as a CSIStorageCapacity per
// class of the driver, owned by its Node; the scheduler reads it. A claim
// larger than the room stays Pending with the scheduler's reason and never
// reaches the node; a claim that fits is made, and its clone's size comes
// off the published room until the claim is deleted.
func testCloneCapacity(t *testing.T) {
	createCloneClass(t)
	ns := namespace(t, "e2e-capacity")
	before := nodeCapacity(t, cloneClass)
	node, err := kube.CoreV1().Nodes().Get(ctx(t), c.nodeName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if refs := before.OwnerReferences; len(refs) != 1 || refs[0].Kind != "Node" || refs[0].Name != c.nodeName || refs[0].UID != node.UID {
		t.Errorf("CSIStorageCapacity %s owned by %+v, want the Node %s", before.Name, refs, c.nodeName)
	}
	if sel := before.NodeTopology; sel == nil || sel.MatchLabels["topology.strata.csi.dev/node"] != c.nodeName {
		t.Errorf("CSIStorageCapacity %s selects %+v, want topology.strata.csi.dev/node=%s", before.Name, sel, c.nodeName)
	}
	if before.Capacity == nil || before.MaximumVolumeSize == nil {
		t.Fatalf("CSIStorageCapacity %s: capacity %v, maximumVolumeSize %v; want both", before.Name, before.Capacity, before.MaximumVolumeSize)
	}
	room, maxSize := before.Capacity.Value(), before.MaximumVolumeSize.Value()
	// The disk is shared with the machine (a build may be writing to it):
	// the room is compared net of the free space, which moves with what
	// others write, so that only the clone's own share counts.
	freeNow := func() int64 {
		var st unix.Statfs_t
		if err := unix.Statfs(c.stateDir, &st); err != nil {
			t.Fatal(err)
		}
		return int64(st.Bavail) * st.Bsize
	}
	free := freeNow()
	t.Logf("node %s: %d MiB free in %s; published room %d MiB, largest clone %d MiB", c.nodeName, free>>20, c.stateDir, room>>20, maxSize>>20)
	// The disk is shared with the machine: allow for what others wrote
	// since the node measured.
	if room > free+(1<<30) || maxSize > room {
		t.Errorf("published room %d (largest clone %d) is more than the %d bytes free on the node", room, maxSize, free)
	}
	const fits = 2 << 30
	if maxSize < fits+(1<<30) {
		t.Fatalf("the node has room for a clone of %d MiB only; this scenario needs 3 GiB free for clones in %s (free disk, or lower the cache budget)",
			maxSize>>20, c.stateDir)
	}

	// Too large: Pending, with the scheduler's reason, and nothing on the node.
	big := maxSize + 1<<30
	apply(t, ns, claim("too-big", big))
	apply(t, ns, claimPod("too-big", "too-big"))
	eventually(t, 2*time.Minute, "the scheduler's FailedScheduling event for the pod of a claim too large", func() (bool, error) {
		evs, err := kube.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{FieldSelector: "involvedObject.name=too-big"})
		if err != nil {
			return false, err
		}
		var seen []string
		for _, e := range evs.Items {
			if e.Reason == "FailedScheduling" && strings.Contains(e.Message, "did not have enough free storage") {
				t.Logf("event: %s", e.Message)
				return true, nil
			}
			seen = append(seen, e.Reason+": "+e.Message)
		}
		return false, fmt.Errorf("events %q", seen)
	})
	time.Sleep(5 * time.Second) // a wrong placement would show by now
	pod, err := kube.CoreV1().Pods(ns).Get(ctx(t), "too-big", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if pod.Spec.NodeName != "" || pod.Status.Phase != corev1.PodPending {
		t.Errorf("the pod of a claim of %d bytes (room %d) is on node %q, phase %s; want it Pending, unscheduled", big, maxSize, pod.Spec.NodeName, pod.Status.Phase)
	}
	pvc, err := kube.CoreV1().PersistentVolumeClaims(ns).Get(ctx(t), "too-big", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if pvc.Status.Phase != corev1.ClaimPending || pvc.Spec.VolumeName != "" || pvc.Annotations["volume.kubernetes.io/selected-node"] != "" {
		t.Errorf("claim too-big: phase %s, volume %q, selected node %q; want Pending, unprovisioned, no node",
			pvc.Status.Phase, pvc.Spec.VolumeName, pvc.Annotations["volume.kubernetes.io/selected-node"])
	}

	// Fits: made, and its room comes off what the node publishes, at once
	// (the stage refreshes the objects; the interval is a minute).
	apply(t, ns, claim("fits", fits))
	apply(t, ns, claimPod("fits", "fits"))
	waitRunning(t, ns, "fits")
	h := boundPV(t, ns, "fits").Spec.CSI.VolumeHandle
	held := free - room // what the node keeps from the free space: the cache's share, the clones'
	var during int64
	eventually(t, 30*time.Second, "the published room to drop by the new clone's 2 GiB", func() (bool, error) {
		during = nodeCapacity(t, cloneClass).Capacity.Value()
		return freeNow()-during >= held+fits-(256<<20), fmt.Errorf("room %d MiB, was %d MiB", during>>20, room>>20)
	})
	t.Logf("room with a clone of 2 GiB: %d MiB (was %d MiB)", during>>20, room>>20)

	// Deleted: the clone goes from the node, and its room comes back.
	deletePod(t, ns, "fits")
	if err := kube.CoreV1().PersistentVolumeClaims(ns).Delete(ctx(t), "fits", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 2*time.Minute, "the clone removed from the node", func() (bool, error) {
		_, err := os.Stat(cloneDir(h))
		return os.IsNotExist(err), nil
	})
	eventually(t, 30*time.Second, "the published room to come back", func() (bool, error) {
		now := nodeCapacity(t, cloneClass).Capacity.Value()
		return freeNow()-now <= held+(256<<20), fmt.Errorf("room %d MiB, was %d MiB; the node holds %d MiB of the free space, held %d MiB before the clone",
			now>>20, room>>20, (freeNow()-now)>>20, held>>20)
	})

	// The class goes: so does its object.
	deletePod(t, ns, "too-big")
	if err := kube.StorageV1().StorageClasses().Delete(ctx(t), cloneClass, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		t.Fatal(err)
	}
	eventually(t, time.Minute, "the CSIStorageCapacity of a deleted class removed", func() (bool, error) {
		_, err := kube.StorageV1().CSIStorageCapacities(releaseNS).Get(context.Background(), before.Name, metav1.GetOptions{})
		return apierrors.IsNotFound(err), err
	})
}
