//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// growClass is the StorageClass of the expansion scenario: a clone class
// whose claims may grow.
const growClass = "strata-e2e-grow"

// A StatefulSet's claim of a class with allowVolumeExpansion is grown while
// its pod writes: the controller's resizer expands the PV and marks the
// claim for its node, kubelet calls NodeExpandVolume, the node grows the
// clone online, and the pod sees the new size (df) without a restart, keeps
// its earlier writes and can fill the new room.
func testCloneExpand(t *testing.T) {
	canGrow := resizeCapability(t)
	createClass(t, growClass, "allowVolumeExpansion: true\n")
	ns := namespace(t, "e2e-expand")
	const from, to = 64 << 20, 192 << 20
	apply(t, ns, cloneSet{name: "grow", replicas: 1, class: growClass, size: from,
		// Writes a line a second for the whole scenario.
		command: `["sh", "-c", "while true; do date >> /data/ticks; sleep 1; done"]`}.manifest())
	const pod, claim = "grow-0", "data-grow-0"
	before := waitRunning(t, ns, pod)
	pv := boundPV(t, ns, claim)
	dfSize := func() int64 { // the filesystem size the pod sees, in bytes
		out := mustExec(t, ns, pod, "df -k /data | tail -n 1")
		f := strings.Fields(out)
		if len(f) < 2 {
			t.Fatalf("df output %q", out)
		}
		kb, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil {
			t.Fatalf("df output %q: %v", out, err)
		}
		return kb << 10
	}
	lines := func() int {
		out := mustExec(t, ns, pod, "wc -l < /data/ticks")
		n, err := strconv.Atoi(strings.TrimSpace(out))
		if err != nil {
			t.Fatalf("wc output %q: %v", out, err)
		}
		return n
	}
	sizeBefore := dfSize()
	if sizeBefore < from || sizeBefore >= to {
		t.Fatalf("df in the pod shows %d bytes before the grow, want about %d", sizeBefore, from)
	}
	linesBefore := lines()

	// Grow the claim while the pod writes.
	patch := fmt.Sprintf(`{"spec":{"resources":{"requests":{"storage":"%d"}}}}`, to)
	if _, err := kube.CoreV1().PersistentVolumeClaims(ns).Patch(ctx(t), claim, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatalf("grow claim %s: %v", claim, err)
	}
	start := time.Now()
	want := resource.NewQuantity(to, resource.BinarySI)
	if !canGrow {
		refusedForCapability(t, ns, pod, claim, pv.Name, want, sizeBefore, dfSize)
		return
	}
	eventually(t, 3*time.Minute, "claim "+claim+" grown to "+want.String(), func() (bool, error) {
		pvc, err := kube.CoreV1().PersistentVolumeClaims(ns).Get(context.Background(), claim, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		q := pvc.Status.Capacity[corev1.ResourceStorage]
		return q.Cmp(*want) >= 0 && len(pvc.Status.AllocatedResourceStatuses) == 0, nil
	})
	t.Logf("claim grown %d -> %d bytes in %.1f s", int64(from), int64(to), time.Since(start).Seconds())
	grown, err := kube.CoreV1().PersistentVolumes().Get(ctx(t), pv.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if q := grown.Spec.Capacity[corev1.ResourceStorage]; q.Cmp(*want) < 0 {
		t.Errorf("PV %s capacity %s, want %s", pv.Name, q.String(), want.String())
	}
	eventually(t, time.Minute, "df in the pod shows the new size", func() (bool, error) {
		return dfSize() >= to, nil
	})

	// The same pod, never restarted, with its writes, writing on.
	after, err := kube.CoreV1().Pods(ns).Get(ctx(t), pod, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if after.UID != before.UID {
		t.Errorf("pod %s was replaced during the grow", pod)
	}
	for _, cs := range after.Status.ContainerStatuses {
		if cs.RestartCount != 0 {
			t.Errorf("container %s restarted %d times during the grow", cs.Name, cs.RestartCount)
		}
	}
	if n := lines(); n <= linesBefore {
		t.Errorf("the pod's log has %d lines after the grow, %d before: it stopped writing", n, linesBefore)
	}
	// The new room is the pod's.
	mustExec(t, ns, pod, fmt.Sprintf("dd if=/dev/zero of=/data/big bs=1M count=%d 2>&1 && sync && rm /data/big", (to-from)>>20+16))
	for _, reason := range []string{"Resizing", "FileSystemResizeRequired", "FileSystemResizeSuccessful"} {
		eventually(t, time.Minute, "event "+reason+" on claim "+claim, func() (bool, error) {
			evs, err := kube.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{
				FieldSelector: "involvedObject.kind=PersistentVolumeClaim,involvedObject.name=" + claim,
			})
			if err != nil {
				return false, err
			}
			for _, e := range evs.Items {
				if e.Reason == reason {
					return true, nil
				}
			}
			return false, nil
		})
	}

	// A shrink is refused by the API server (the claim's capacity is a floor).
	shrink := fmt.Sprintf(`{"spec":{"resources":{"requests":{"storage":"%d"}}}}`, from)
	if _, err := kube.CoreV1().PersistentVolumeClaims(ns).Patch(ctx(t), claim, types.MergePatchType, []byte(shrink), metav1.PatchOptions{}); err == nil {
		t.Errorf("shrinking claim %s below its capacity was accepted", claim)
	}

	if err := kube.AppsV1().StatefulSets(ns).Delete(ctx(t), "grow", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 2*time.Minute, "pod "+pod+" gone", func() (bool, error) {
		_, err := kube.CoreV1().Pods(ns).Get(context.Background(), pod, metav1.GetOptions{})
		return apierrors.IsNotFound(err), nil
	})
	if err := kube.CoreV1().PersistentVolumeClaims(ns).Delete(ctx(t), claim, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
}

// resizeCapability reports whether this machine can grow a mounted ext4:
// the kernel asks the node plugin for CAP_SYS_RESOURCE, and the local
// cluster's node (a container of this machine) has no capability that this
// process's bounding set lacks.
func resizeCapability(t *testing.T) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapBnd:"); ok {
			caps, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				t.Fatalf("parse %q: %v", line, err)
			}
			return caps&(1<<unix.CAP_SYS_RESOURCE) != 0
		}
	}
	t.Fatal("no CapBnd in /proc/self/status")
	return false
}

// refusedForCapability is the scenario on a machine whose capability
// bounding set lacks CAP_SYS_RESOURCE, where no process can grow a mounted
// ext4 (the grow itself is proven in a VM that has it: test/csi
// TestCloneExpand and driver/clonefs's grow tests run there through
// hack/vm-test). The controller side still does its part: the resizer grows
// the PersistentVolume; the node's refusal reaches the claim as an event
// that names the missing capability; and the pod goes on, unchanged, with
// its writes.
func refusedForCapability(t *testing.T, ns, pod, claim, pvName string, want *resource.Quantity, sizeBefore int64, dfSize func() int64) {
	t.Helper()
	t.Logf("this machine withholds CAP_SYS_RESOURCE: the node must refuse the grow, saying why")
	eventually(t, 3*time.Minute, "PV "+pvName+" grown by the resizer to "+want.String(), func() (bool, error) {
		pv, err := kube.CoreV1().PersistentVolumes().Get(context.Background(), pvName, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		q := pv.Spec.Capacity[corev1.ResourceStorage]
		return q.Cmp(*want) >= 0, nil
	})
	var said string
	eventually(t, 3*time.Minute, "an event naming CAP_SYS_RESOURCE on claim "+claim+" or pod "+pod, func() (bool, error) {
		evs, err := kube.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{})
		if err != nil {
			return false, err
		}
		for _, e := range evs.Items {
			if (e.InvolvedObject.Name == claim || e.InvolvedObject.Name == pod) && strings.Contains(e.Message, "CAP_SYS_RESOURCE") {
				said = e.Reason + ": " + e.Message
				return true, nil
			}
		}
		return false, nil
	})
	t.Logf("refused: %s", said)
	if got := dfSize(); got != sizeBefore {
		t.Errorf("df in the pod shows %d bytes after a refused grow, %d before", got, sizeBefore)
	}
	mustExec(t, ns, pod, "test -s /data/ticks")
}
