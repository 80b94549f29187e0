//go:build e2e

package e2e

import (
	"cmp"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// cloneClass is the StorageClass of the clone scenarios: every PVC of it is
// a persistent copy-on-write clone of the dataset image.
const cloneClass = "strata-e2e-clone"

// cloneSize is the clones' requested size: it caps what a pod can write.
const cloneSize = 64 << 20

func createCloneClass(t *testing.T) { createClass(t, cloneClass, "") }

// createClass makes a clone StorageClass of the dataset image, binding at
// the first consumer, with the lines of extra (e.g. allowVolumeExpansion),
// and deletes it when the test ends.
func createClass(t *testing.T, name, extra string) { createClassOf(t, name, datasetRef, extra) }

// createClassOf is createClass of another image.
func createClassOf(t *testing.T, name, image, extra string) {
	t.Helper()
	manifest := fmt.Sprintf(`apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: %s
provisioner: %s
parameters:
  image: %s
reclaimPolicy: Delete
volumeBindingMode: WaitForFirstConsumer
%s`, name, driverName, image, extra)
	if out, err := kubectlStdin(manifest, "apply", "-f", "-"); err != nil {
		t.Fatalf("create StorageClass: %v\n%s", err, out)
	}
	t.Cleanup(func() {
		err := kube.StorageV1().StorageClasses().Delete(context.Background(), name, metav1.DeleteOptions{})
		if err != nil && !apierrors.IsNotFound(err) {
			t.Errorf("delete StorageClass %s: %v", name, err)
		}
	})
}

// cloneDir is where the node plugin keeps the clone of a volume handle.
func cloneDir(handle string) string { return filepath.Join(c.stateDir, "clones", handle) }

// boundPV waits until the claim is bound and returns its PersistentVolume.
func boundPV(t *testing.T, ns, claim string) *corev1.PersistentVolume {
	t.Helper()
	var pv *corev1.PersistentVolume
	eventually(t, 2*time.Minute, "PVC "+ns+"/"+claim+" bound", func() (bool, error) {
		pvc, err := kube.CoreV1().PersistentVolumeClaims(ns).Get(context.Background(), claim, metav1.GetOptions{})
		if err != nil || pvc.Status.Phase != corev1.ClaimBound {
			return false, err
		}
		pv, err = kube.CoreV1().PersistentVolumes().Get(context.Background(), pvc.Spec.VolumeName, metav1.GetOptions{})
		return err == nil, err
	})
	return pv
}

// cloneSet is a StatefulSet whose replicas each get a clone of class,
// claim "data" at /data unless volume and mountPath say otherwise.
type cloneSet struct {
	name              string
	replicas          int
	class             string
	size              int64  // bytes each claim requests
	command           string // the container's command, a YAML flow sequence (default: sleep)
	podSpec           string // more lines of the pod's spec, indented by 6 spaces (affinity...)
	parallel          bool   // podManagementPolicy: Parallel
	volume, mountPath string
}

func (s cloneSet) manifest() string {
	volume, mountPath, command := cmp.Or(s.volume, "data"), cmp.Or(s.mountPath, "/data"), cmp.Or(s.command, `["sleep", "86400"]`)
	policy := ""
	if s.parallel {
		policy = "  podManagementPolicy: Parallel\n"
	}
	return fmt.Sprintf(`apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: %[1]s
spec:
  serviceName: %[1]s
  replicas: %[2]d
%[3]s  selector:
    matchLabels: {app: %[1]s}
  template:
    metadata:
      labels: {app: %[1]s}
    spec:
      terminationGracePeriodSeconds: 1
%[4]s      containers:
      - name: main
        image: %[5]s
        command: %[6]s
        volumeMounts:
        - {name: %[7]s, mountPath: %[8]s}
  volumeClaimTemplates:
  - metadata:
      name: %[7]s
    spec:
      accessModes: [ReadWriteOnce]
      storageClassName: %[9]s
      resources:
        requests:
          storage: %[10]d
`, s.name, s.replicas, policy, s.podSpec, busybox, command, volume, mountPath, s.class, s.size)
}

// diskBytes is the space a directory tree takes on the node's disk.
func diskBytes(t *testing.T, dir string) int64 {
	t.Helper()
	var n int64
	err := filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			n += st.Blocks * 512
		}
		return nil
	})
	if err != nil {
		t.Fatalf("disk use of %s: %v", dir, err)
	}
	return n
}

// A StatefulSet of 3 replicas on a Strata StorageClass gets 3 clones of the
// dataset, one per PVC, on the node: each pod sees the image and its own
// writes, the writes survive the pod's deletion (the StatefulSet brings the
// pod back on the same claim), the claim's size caps them with ENOSPC, and
// deleting the claims frees the node's disk.
func testCloneStatefulSet(t *testing.T) {
	createCloneClass(t)
	ns := namespace(t, "e2e-clones")
	apply(t, ns, cloneSet{name: "clones", replicas: 3, class: cloneClass, size: cloneSize, parallel: true}.manifest())

	handles := map[string]string{} // pod -> volume handle
	for i := range 3 {
		pod := fmt.Sprintf("clones-%d", i)
		p := waitRunning(t, ns, pod)
		checkDatasetView(t, ns, pod, "/data")
		mustExec(t, ns, pod, "echo "+pod+" > /data/mine && rm /data/data/raw/a.txt")
		pv := boundPV(t, ns, "data-"+pod)
		if pv.Spec.CSI == nil || pv.Spec.CSI.Driver != driverName {
			t.Fatalf("PV %s of %s is not a %s volume: %+v", pv.Name, pod, driverName, pv.Spec.PersistentVolumeSource)
		}
		if na := pv.Spec.NodeAffinity; na == nil || na.Required == nil || !strings.Contains(na.Required.String(), c.nodeName) {
			t.Errorf("PV %s has no node affinity to %s: %+v", pv.Name, c.nodeName, na)
		}
		if p.Spec.NodeName != c.nodeName {
			t.Errorf("pod %s on node %q, want %s", pod, p.Spec.NodeName, c.nodeName)
		}
		handles[pod] = pv.Spec.CSI.VolumeHandle
		if _, err := os.Stat(cloneDir(pv.Spec.CSI.VolumeHandle)); err != nil {
			t.Errorf("no clone dir for %s on the node: %v", pod, err)
		}
	}
	if len(handles) != 3 {
		t.Fatalf("3 replicas share clones: %v", handles)
	}

	// A pod deleted comes back on the same claim and finds its writes.
	for i := range 3 {
		pod := fmt.Sprintf("clones-%d", i)
		old, err := kube.CoreV1().Pods(ns).Get(ctx(t), pod, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		one := int64(1)
		if err := kube.CoreV1().Pods(ns).Delete(ctx(t), pod, metav1.DeleteOptions{GracePeriodSeconds: &one}); err != nil {
			t.Fatal(err)
		}
		eventually(t, 2*time.Minute, "pod "+pod+" recreated", func() (bool, error) {
			p, err := kube.CoreV1().Pods(ns).Get(context.Background(), pod, metav1.GetOptions{})
			if apierrors.IsNotFound(err) {
				return false, nil
			}
			return err == nil && p.UID != old.UID && p.Status.Phase == corev1.PodRunning && podReady(p), err
		})
		out := mustExec(t, ns, pod, "cat /data/mine /data/data/README; test -e /data/data/raw/a.txt && echo a-present || echo a-deleted")
		if want := pod + "\ndataset v1\na-deleted\n"; out != want {
			t.Errorf("%s after its deletion reads %q, want its own writes %q", pod, out, want)
		}
	}

	// The claim's size caps the clone's writes: ENOSPC in the pod.
	out, err := podExec(ns, "clones-0", fmt.Sprintf("dd if=/dev/zero of=/data/big bs=1M count=%d 2>&1", 2*cloneSize>>20))
	if err == nil || !strings.Contains(out, "No space left on device") {
		t.Errorf("writing twice the claim's size: err %v, output %q, want ENOSPC (No space left on device)", err, out)
	}
	mustExec(t, ns, "clones-0", "rm /data/big && sync") // discard gives the blocks back to the node
	var used int64
	for _, h := range handles {
		used += diskBytes(t, cloneDir(h))
	}
	t.Logf("3 clones use %d KiB of the node's disk", used>>10)

	// Deleting the StatefulSet and its claims frees the node's disk.
	if err := kube.AppsV1().StatefulSets(ns).Delete(ctx(t), "clones", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	for pod := range handles {
		eventually(t, 2*time.Minute, "pod "+pod+" gone", func() (bool, error) {
			_, err := kube.CoreV1().Pods(ns).Get(context.Background(), pod, metav1.GetOptions{})
			return apierrors.IsNotFound(err), nil
		})
		if err := kube.CoreV1().PersistentVolumeClaims(ns).Delete(ctx(t), "data-"+pod, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	for pod, h := range handles {
		eventually(t, 2*time.Minute, "clone of "+pod+" removed from the node", func() (bool, error) {
			_, err := os.Stat(cloneDir(h))
			return os.IsNotExist(err), nil
		})
		eventually(t, time.Minute, "PV of "+pod+" deleted", func() (bool, error) {
			pvs, err := kube.CoreV1().PersistentVolumes().List(context.Background(), metav1.ListOptions{})
			if err != nil {
				return false, err
			}
			for _, pv := range pvs.Items {
				if pv.Spec.CSI != nil && pv.Spec.CSI.VolumeHandle == h {
					return false, nil
				}
			}
			return true, nil
		})
	}
	t.Logf("PVC deletion -> clones removed from the node: %.1f s", time.Since(start).Seconds())
	if ms := overlaysUnder(t, filepath.Join(c.stateDir, "clones")); len(ms) != 0 {
		t.Errorf("overlays left under the clones dir: %+v", ms)
	}
}

// ephemeralClonePod is a pod that sleeps with a generic ephemeral volume of
// the clone class at /data: its claim is <name>-data.
func ephemeralClonePod(name string) string {
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
    ephemeral:
      volumeClaimTemplate:
        spec:
          accessModes: [ReadWriteOnce]
          storageClassName: %s
          resources:
            requests:
              storage: %d
`, name, busybox, cloneClass, cloneSize)
}

// A generic ephemeral volume (ephemeral.volumeClaimTemplate) is a clone that
// lives as long as its pod: the PVC is created with the pod and deleted with
// it, and so is the clone on the node.
func testGenericEphemeralClone(t *testing.T) {
	createCloneClass(t)
	ns := namespace(t, "e2e-ephemeral")
	apply(t, ns, ephemeralClonePod("scratch"))
	waitRunning(t, ns, "scratch")
	checkDatasetView(t, ns, "scratch", "/data")
	mustExec(t, ns, "scratch", "echo scratch > /data/mine")
	h := boundPV(t, ns, "scratch-data").Spec.CSI.VolumeHandle
	if _, err := os.Stat(cloneDir(h)); err != nil {
		t.Fatalf("no clone on the node for the ephemeral volume: %v", err)
	}
	deletePod(t, ns, "scratch")
	eventually(t, 2*time.Minute, "the ephemeral volume's clone removed from the node", func() (bool, error) {
		_, err := os.Stat(cloneDir(h))
		return os.IsNotExist(err), nil
	})
}
