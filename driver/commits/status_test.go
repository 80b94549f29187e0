package commits

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/strata-csi/strata/layercache"
	"github.com/strata-csi/strata/layercache/commit"
)

// TestNext: what a node does with a VolumeCommit in each phase: over is
// over, another node's Running is left alone, this node's Running with no
// one at work on it (the plugin restarted) is done again.
func TestNext(t *testing.T) {
	for _, tc := range []struct {
		name    string
		st      Status
		running bool
		want    action
	}{
		{"new", Status{}, false, actClaim},
		{"pending", Status{Phase: PhasePending}, false, actClaim},
		{"running here, in this process", Status{Phase: PhaseRunning, Node: thisNode}, true, actSkip},
		{"running here, left by a restart", Status{Phase: PhaseRunning, Node: thisNode}, false, actResume},
		{"running on another node", Status{Phase: PhaseRunning, Node: "node-2"}, false, actSkip},
		{"succeeded here", Status{Phase: PhaseSucceeded, Node: thisNode}, false, actSkip},
		{"failed here", Status{Phase: PhaseFailed, Node: thisNode}, false, actSkip},
		{"failed elsewhere", Status{Phase: PhaseFailed, Node: "node-2"}, false, actSkip},
	} {
		if got := next(tc.st, thisNode, tc.running); got != tc.want {
			t.Errorf("%s: %s, want %s", tc.name, got, tc.want)
		}
	}
}

// TestTransitions: Pending -> Running -> Succeeded or Failed, each status
// with what it must tell.
func TestTransitions(t *testing.T) {
	t0 := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	run := claimed(Status{Phase: PhasePending}, thisNode, `volume "data" of pod team-a/trainer`, t0)
	if run.Phase != PhaseRunning || run.Node != thisNode || run.StartTime == nil || !run.StartTime.Time.Equal(t0) ||
		run.CompletionTime != nil || !strings.Contains(run.Message, "trainer") {
		t.Errorf("claimed: %+v", run)
	}

	tag, err := name.NewTag("127.0.0.1:5000/team-a/dataset:v2")
	if err != nil {
		t.Fatal(err)
	}
	res := commit.Result{Target: tag, Digest: digestA, Layer: digestB, LayerBytes: 1234, Uploaded: 2345,
		Stats: commit.Stats{Files: 3, Whiteouts: 2, Dirs: 1}}
	t1 := t0.Add(time.Minute)
	ok := succeeded(run, res, t1)
	want := Status{Phase: PhaseSucceeded, Node: thisNode, StartTime: run.StartTime, CompletionTime: ptrTime(t1),
		Digest: digestA.String(), ImageRef: "127.0.0.1:5000/team-a/dataset@" + digestA.String(),
		UploadedBytes: 2345, LayerBytes: 1234, Files: 3, Deletions: 2, Message: ok.Message}
	if fmt.Sprint(ok) != fmt.Sprint(want) || !strings.Contains(ok.Message, want.ImageRef) {
		t.Errorf("succeeded:\n got %+v\nwant %+v", ok, want)
	}

	refusedErr := fmt.Errorf("push: %w: denied", layercache.ErrUnauthorized)
	bad := failed(run, thisNode, refusedErr, t1)
	if bad.Phase != PhaseFailed || bad.Node != thisNode || bad.StartTime != run.StartTime || bad.CompletionTime == nil ||
		bad.Digest != "" || !strings.Contains(bad.Message, "denied") || !strings.Contains(bad.Message, "spec.pushSecretName") ||
		!strings.Contains(bad.Message, "create a new VolumeCommit") {
		t.Errorf("failed: %+v", bad)
	}
	// Refused before any node took it: the start is the end.
	never := failed(Status{}, "node-2", errors.New("claim team-a/x is bound to PersistentVolume nfs"), t1)
	if never.StartTime == nil || !never.StartTime.Time.Equal(t1) || never.Node != "node-2" {
		t.Errorf("failed from pending: %+v", never)
	}
	for _, st := range []Status{{}, {Phase: PhasePending}, run} {
		if st.Terminal() {
			t.Errorf("%s is terminal", st.Phase)
		}
	}
	for _, st := range []Status{ok, bad, never} {
		if !st.Terminal() {
			t.Errorf("%s is not terminal", st.Phase)
		}
	}
}

func ptrTime(t time.Time) *metav1.Time { m := metav1.NewTime(t); return &m }

// TestStatusRoundTrip: a status written through withStatus reads back the
// same through fromUnstructured, and keeps the object's resourceVersion
// (the optimistic concurrency of the claim).
func TestStatusRoundTrip(t *testing.T) {
	u := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": Group + "/" + Version, "kind": Kind,
		"metadata": map[string]any{"name": "v2", "namespace": "team-a", "resourceVersion": "42"},
		"spec": map[string]any{"source": map[string]any{"pod": map[string]any{"name": "trainer-0", "volume": "data"}},
			"image": "registry.example.com/team-a/dataset:v2", "pushSecretName": "regcred"},
	}}
	vc, err := fromUnstructured(u)
	if err != nil {
		t.Fatal(err)
	}
	if vc.Spec.Source.Pod == nil || vc.Spec.Source.Pod.Name != "trainer-0" || vc.Spec.Source.Pod.Volume != "data" ||
		vc.Spec.PushSecretName != "regcred" || vc.Spec.Image != "registry.example.com/team-a/dataset:v2" {
		t.Fatalf("decoded spec %+v", vc.Spec)
	}
	st := claimed(Status{}, thisNode, "x", time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC))
	out, err := withStatus(u, st)
	if err != nil {
		t.Fatal(err)
	}
	if out.GetResourceVersion() != "42" || u.Object["status"] != nil {
		t.Errorf("withStatus: resourceVersion %q, input changed: %v", out.GetResourceVersion(), u.Object["status"])
	}
	back, err := fromUnstructured(out)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(back.Status) != fmt.Sprint(st) {
		t.Errorf("status round trip: got %+v, want %+v", back.Status, st)
	}
}
