//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/strata-csi/strata/driver/commits"
)

// committedRef is the tag the VolumeCommit scenario pushes.
var committedRef = registryAddr + "/e2e/committed:v1"

// getVolumeCommit reads a VolumeCommit through kubectl.
func getVolumeCommit(t *testing.T, ns, name string) (*commits.VolumeCommit, error) {
	t.Helper()
	out, err := kubectl("-n", ns, "get", "volumecommit", name, "-o", "json")
	if err != nil {
		return nil, fmt.Errorf("kubectl get volumecommit %s/%s: %v: %s", ns, name, err, out)
	}
	var vc commits.VolumeCommit
	if err := json.Unmarshal([]byte(out), &vc); err != nil {
		return nil, fmt.Errorf("decode volumecommit %s/%s: %v", ns, name, err)
	}
	return &vc, nil
}

// testVolumeCommit: a VolumeCommit through the Kubernetes API. A pod writes
// to and deletes from its inline volume; a VolumeCommit names the pod's
// volume; the node plugin pushes the image plus those changes and reports
// the digest in the status; a new pod whose inline volume is the committed
// image (by digest) sees the changes. The spec cannot be changed.
//
// The lead wires it into TestStrata as {"VolumeCommit", testVolumeCommit},
// after Install (it needs the chart's CRD and the dataset image).
func testVolumeCommit(t *testing.T) {
	ns := namespace(t, "e2e-commit")
	createPod(t, ns, inlinePod("writer", datasetRef, false))
	writer := waitRunning(t, ns, "writer")
	mustExec(t, ns, writer.Name, "echo committed > /data/data/new.txt && rm /data/data/raw/a.txt")

	apply(t, ns, fmt.Sprintf(`apiVersion: strata.csi.dev/v1alpha1
kind: VolumeCommit
metadata:
  name: v1
spec:
  source:
    pod:
      name: writer
      volume: dataset
  image: %s
`, committedRef))

	st := commitSucceeded(t, ns, "v1").Status
	t.Logf("VolumeCommit status: %+v", st)
	wantRef := registryAddr + "/e2e/committed@" + st.Digest
	if st.Node != c.nodeName || !strings.HasPrefix(st.Digest, "sha256:") || len(st.Digest) != len("sha256:")+64 ||
		st.ImageRef != wantRef || st.Files < 1 || st.Deletions != 1 || st.LayerBytes <= 0 || st.UploadedBytes < st.LayerBytes ||
		st.StartTime == nil || st.CompletionTime == nil || st.CompletionTime.Before(st.StartTime) {
		t.Errorf("status %+v: want node %s, imageRef %s, at least 1 file, 1 deletion, bytes counted, start and completion times",
			st, c.nodeName, wantRef)
	}
	// The upload is the new layer, its config and manifest: not the
	// dataset's layers, which are on the same registry.
	if st.UploadedBytes > st.LayerBytes+64<<10 {
		t.Errorf("uploaded %d bytes for a layer of %d: the base's layers were uploaded again", st.UploadedBytes, st.LayerBytes)
	}
	commitEvents(t, ns, "v1", "Committing", "Committed")
	if out, err := kubectl("-n", ns, "get", "vc"); err != nil || !strings.Contains(out, "Succeeded") || !strings.Contains(out, st.Digest) {
		t.Errorf("kubectl get vc: %v\n%s\nwant the phase and the digest", err, out)
	}

	// A new commit is a new object: the spec is immutable.
	out, err := kubectl("-n", ns, "patch", "volumecommit", "v1", "--type=merge", "-p", `{"spec":{"image":"`+registryAddr+`/e2e/committed:v2"}}`)
	if err == nil || !strings.Contains(out, "immutable") {
		t.Errorf("changing the spec of a VolumeCommit: %v\n%s\nwant it refused as immutable", err, out)
	}

	createPod(t, ns, inlinePod("reader", st.ImageRef, false))
	reader := waitRunning(t, ns, "reader")
	got := mustExec(t, ns, reader.Name, "cat /data/data/new.txt /data/data/README /data/data/labels.txt; "+
		"test -e /data/data/raw/a.txt && echo a-present || echo a-deleted; "+
		"test -e /data/data/raw/b.txt && echo b-present || echo b-deleted")
	if want := "committed\ndataset v1\nlabels\na-deleted\nb-deleted\n"; got != want {
		t.Errorf("a pod of the committed image sees %q, want %q (the writer's file, its deletion, the dataset's own files)", got, want)
	}

	// Done is done: a plugin restart would redo nothing; the object keeps
	// its result (checked again after the reader came up).
	again, err := getVolumeCommit(t, ns, "v1")
	if err != nil || again.Status.Digest != st.Digest || again.Status.Phase != commits.PhaseSucceeded {
		t.Errorf("VolumeCommit changed after success: %+v, %v", again, err)
	}
}

// commitSucceeded waits until VolumeCommit ns/name is over, and fails the
// test unless it succeeded.
func commitSucceeded(t *testing.T, ns, name string) *commits.VolumeCommit {
	t.Helper()
	var vc *commits.VolumeCommit
	eventually(t, 2*time.Minute, "VolumeCommit "+ns+"/"+name+" over", func() (bool, error) {
		var err error
		vc, err = getVolumeCommit(t, ns, name)
		return err == nil && vc.Status.Terminal(), err
	})
	if vc.Status.Phase != commits.PhaseSucceeded {
		out, _ := kubectl("-n", ns, "describe", "volumecommit", name)
		t.Fatalf("VolumeCommit %s/%s is %s: %s\n%s", ns, name, vc.Status.Phase, vc.Status.Message, out)
	}
	return vc
}

// commitEvents waits for the events, by reason, on VolumeCommit ns/name.
func commitEvents(t *testing.T, ns, name string, reasons ...string) {
	t.Helper()
	eventually(t, 30*time.Second, "events "+strings.Join(reasons, ", ")+" on VolumeCommit "+name, func() (bool, error) {
		evs, err := kube.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{
			FieldSelector: "involvedObject.kind=VolumeCommit,involvedObject.name=" + name})
		if err != nil {
			return false, err
		}
		have := map[string]bool{}
		for _, e := range evs.Items {
			have[e.Reason] = true
		}
		for _, r := range reasons {
			if !have[r] {
				return false, fmt.Errorf("no %s event among %d", r, len(evs.Items))
			}
		}
		return true, nil
	})
}
