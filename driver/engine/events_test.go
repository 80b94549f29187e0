package engine

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/strata-csi/strata/driver/credentials"
	"github.com/strata-csi/strata/layercache"
)

func TestOutcomeEvent(t *testing.T) {
	const img, tools, vol = "reg.example/ds:v1", "reg.example/tools:v2", "vol-1"
	notFound := fmt.Errorf("%w: fetch manifest %s: check the image name and tag", layercache.ErrNotFound, img)
	for _, tc := range []struct {
		name     string
		o        pullOutcome
		want     podEvent
		wantNone bool
	}{
		{"cached image", pullOutcome{Images: []string{img}, VolumeID: vol, Layers: 8, Duration: 3 * time.Millisecond},
			podEvent{"Normal", "Pulled", `Image "reg.example/ds:v1" for volume "vol-1" is already cached on the node`}, false},
		{"pull that downloaded", pullOutcome{Images: []string{img}, VolumeID: vol, Layers: 8, Downloaded: 3, Bytes: 1_234_567_890, Duration: 12345 * time.Millisecond},
			podEvent{"Normal", "Pulled", `Pulled image "reg.example/ds:v1" for volume "vol-1" in 12.3s (1.2 GB, 3 of 8 layers downloaded)`}, false},
		{"fast pull", pullOutcome{Images: []string{img}, VolumeID: vol, Layers: 1, Downloaded: 1, Bytes: 999, Duration: 42 * time.Millisecond},
			podEvent{"Normal", "Pulled", `Pulled image "reg.example/ds:v1" for volume "vol-1" in 42ms (999 B, 1 of 1 layers downloaded)`}, false},
		{"pull that joined another's for some layers", pullOutcome{Images: []string{img}, VolumeID: vol, Layers: 8, Downloaded: 1, Joined: 2, Bytes: 1000, Duration: time.Second},
			podEvent{"Normal", "Pulled", `Pulled image "reg.example/ds:v1" for volume "vol-1" in 1s (1.0 kB, 1 of 8 layers downloaded, 2 more by a pull in flight that it joined)`}, false},
		{"pull that joined another's for all its layers", pullOutcome{Images: []string{img}, VolumeID: vol, Layers: 8, Joined: 2, Duration: 1500 * time.Millisecond},
			podEvent{"Normal", "Pulled", `Image "reg.example/ds:v1" for volume "vol-1" is ready in 1.5s: it joined a pull in flight for 2 of 8 layers and downloaded none itself`}, false},
		{"resolve failed", pullOutcome{Images: []string{img}, VolumeID: vol, Step: stepResolve, Err: notFound},
			podEvent{"Warning", "PullFailed", `Failed to resolve image "reg.example/ds:v1" for volume "vol-1": ` + notFound.Error()}, false},
		{"pull failed", pullOutcome{Images: []string{img}, VolumeID: vol, Step: stepPull, Err: layercache.ErrDigestMismatch, Layers: 2, Downloaded: 2},
			podEvent{"Warning", "PullFailed", `Failed to pull image "reg.example/ds:v1" for volume "vol-1": digest mismatch`}, false},
		{"resolve ran into the call's deadline", pullOutcome{Images: []string{img}, VolumeID: vol, Step: stepResolve, Err: fmt.Errorf("resolve: %w", context.DeadlineExceeded)},
			podEvent{"Warning", "PullFailed", `Failed to resolve image "reg.example/ds:v1" for volume "vol-1": resolve: context deadline exceeded`}, false},
		{"pull outlives the call: no event, the retry reports", pullOutcome{Images: []string{img}, VolumeID: vol, Step: stepPull,
			Err: fmt.Errorf("pull: %w (the pull goes on in the background)", context.DeadlineExceeded), Downloaded: 1}, podEvent{}, true},
		{"cancelled call during the pull", pullOutcome{Images: []string{img}, VolumeID: vol, Step: stepPull, Err: context.Canceled}, podEvent{}, true},
		{"stack cached", pullOutcome{Images: []string{img, tools}, VolumeID: vol, Layers: 9},
			podEvent{"Normal", "Pulled", `Images "reg.example/ds:v1", "reg.example/tools:v2" for volume "vol-1" are already cached on the node`}, false},
		{"stack pulled", pullOutcome{Images: []string{img, tools}, VolumeID: vol, Layers: 9, Downloaded: 1, Bytes: 2000, Duration: time.Second},
			podEvent{"Normal", "Pulled", `Pulled images "reg.example/ds:v1", "reg.example/tools:v2" for volume "vol-1" in 1s (2.0 kB, 1 of 9 layers downloaded)`}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := outcomeEvent(tc.o)
			if ok == tc.wantNone || got != tc.want {
				t.Errorf("outcomeEvent(%+v) = %+v, %v; want %+v, %v", tc.o, got, ok, tc.want, !tc.wantNone)
			}
		})
	}
}

func TestPullingEvent(t *testing.T) {
	want := podEvent{"Normal", "Pulling", `Pulling image "r/x:v1" for volume "v"`}
	if got := pullingEvent([]string{"r/x:v1"}, "v"); got != want {
		t.Errorf("pullingEvent = %+v, want %+v", got, want)
	}
	want = podEvent{"Normal", "Pulling", `Pulling images "r/x:v1", "r/tools:v2" for volume "v"`}
	if got := pullingEvent([]string{"r/x:v1", "r/tools:v2"}, "v"); got != want {
		t.Errorf("pullingEvent of a stack = %+v, want %+v", got, want)
	}
}

func TestHumanBytes(t *testing.T) {
	for _, tc := range []struct {
		n    int64
		want string
	}{
		{0, "0 B"}, {999, "999 B"}, {1000, "1.0 kB"}, {1_234_567, "1.2 MB"}, {999_949, "999.9 kB"}, {999_999, "1.0 MB"},
		{1_234_567_890, "1.2 GB"}, {20_000_000_000_000, "20.0 TB"},
	} {
		if got := humanBytes(tc.n); got != tc.want {
			t.Errorf("humanBytes(%d) = %q, want %q", tc.n, got, tc.want)
		}
	}
}

func TestHumanDuration(t *testing.T) {
	for _, tc := range []struct {
		d    time.Duration
		want string
	}{
		{1234 * time.Microsecond, "1ms"}, {999 * time.Millisecond, "999ms"}, {12345 * time.Millisecond, "12.3s"}, {123456 * time.Millisecond, "2m3.5s"},
	} {
		if got := humanDuration(tc.d); got != tc.want {
			t.Errorf("humanDuration(%v) = %q, want %q", tc.d, got, tc.want)
		}
	}
}

func TestTruncateMessage(t *testing.T) {
	if s := "short"; truncateMessage(s) != s {
		t.Errorf("truncateMessage(%q) = %q", s, truncateMessage(s))
	}
	long := strings.Repeat("é", maxEventMessage) // two bytes each
	got := truncateMessage(long)
	if len(got) > maxEventMessage || !strings.HasSuffix(got, "…") || !strings.HasPrefix(got, "éé") {
		t.Errorf("truncateMessage of %d bytes: got %d bytes, want at most %d ending in …", len(long), len(got), maxEventMessage)
	}
}

func TestPodOf(t *testing.T) {
	got, _, err := PodOf(map[string]string{"image": "r/x", "csi.storage.k8s.io/pod.name": "web-0",
		"csi.storage.k8s.io/pod.namespace": "shop", "csi.storage.k8s.io/pod.uid": "1234-5678"}, nil)
	if want := (credentials.Pod{Namespace: "shop", Name: "web-0", UID: "1234-5678"}); err != nil || got.Namespace != want.Namespace || got.Name != want.Name || got.UID != want.UID {
		t.Errorf("PodOf = %+v, %v; want %+v", got, err, want)
	}
	if got, _, err := PodOf(map[string]string{"image": "r/x"}, nil); err != nil || got.Name != "" || got.Namespace != "" || got.UID != "" {
		t.Errorf("PodOf without kubelet's keys = %+v, %v; want none", got, err)
	}
}

func waitEvents(t *testing.T, kube *fake.Clientset, ns string, n int) []corev1.Event {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		list, err := kube.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(list.Items) >= n || time.Now().After(deadline) {
			if len(list.Items) != n {
				t.Fatalf("want %d events in %s, got %d: %+v", n, ns, len(list.Items), list.Items)
			}
			sort.Slice(list.Items, func(i, j int) bool { return list.Items[i].Name < list.Items[j].Name })
			return list.Items
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestPodEventsReachTheAPI records an event through client-go's broadcaster
// into a fake clientset: what the API server would store.
func TestPodEventsReachTheAPI(t *testing.T) {
	kube := fake.NewClientset()
	ev := newPodEvents(kube, "strata.csi.dev", "node-1")
	defer ev.shutdown()
	pod := credentials.Pod{Namespace: "shop", Name: "web-0", UID: "1234-5678"}
	ev.emit(pod, podEvent{"Normal", "Pulled", "Image x is already cached on the node"})
	ev.emit(credentials.Pod{Namespace: "shop"}, podEvent{"Normal", "Pulled", "no pod name: dropped"})

	e := waitEvents(t, kube, "shop", 1)[0]
	io := e.InvolvedObject
	if io.Kind != "Pod" || io.APIVersion != "v1" || io.Namespace != "shop" || io.Name != "web-0" || string(io.UID) != "1234-5678" {
		t.Errorf("involvedObject = %+v, want Pod v1 shop/web-0 uid 1234-5678", io)
	}
	if e.Type != "Normal" || e.Reason != "Pulled" || e.Message != "Image x is already cached on the node" {
		t.Errorf("event = %s %s %q", e.Type, e.Reason, e.Message)
	}
	if e.Source.Component != "strata.csi.dev" || e.Source.Host != "node-1" || e.ReportingController != "strata.csi.dev" || e.ReportingInstance != "node-1" {
		t.Errorf("source = %+v, reporting %s/%s; want %s on node-1", e.Source, e.ReportingController, e.ReportingInstance, "strata.csi.dev")
	}
}

// TestPodEventsNeverBlock: with an API server that hangs on every write,
// recording and shutting down still return at once; events are dropped.
func TestPodEventsNeverBlock(t *testing.T) {
	kube := fake.NewClientset()
	hang := make(chan struct{})
	defer close(hang)
	kube.PrependReactor("*", "events", func(k8stesting.Action) (bool, runtime.Object, error) {
		<-hang
		return true, nil, errors.New("API server down")
	})
	ev := newPodEvents(kube, "strata.csi.dev", "node-1")
	pod := credentials.Pod{Namespace: "shop", Name: "web-0", UID: "u"}
	start := time.Now()
	for i := range 5000 { // more than the broadcaster queues
		ev.emit(pod, podEvent{"Warning", "PullFailed", fmt.Sprint("failure ", i)})
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("5000 events with a hung API server took %v to record, want no waiting", d)
	}
	start = time.Now()
	ev.shutdown()
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("shutdown with a hung API server took %v", d)
	}
	ev.emit(pod, podEvent{"Normal", "Pulled", "after shutdown: dropped"})
}

func TestNilPodEvents(t *testing.T) {
	var ev *podEvents // no API access
	ev.emit(credentials.Pod{Namespace: "a", Name: "b"}, podEvent{"Normal", "Pulled", "x"})
	ev.shutdown()
	if newPodEvents(nil, "strata.csi.dev", "n") != nil {
		t.Error("newPodEvents(nil) is not nil")
	}
}

func TestProgressEvent(t *testing.T) {
	for _, tc := range []struct {
		received, total int64
		elapsed         time.Duration
		want            string
	}{
		{0, 4e9, 30 * time.Second, `Pulling image "r/m:v1" for volume "v": 0 B of 4.0 GB (0%) in 30s`},
		{1e9, 4e9, 10 * time.Second, `Pulling image "r/m:v1" for volume "v": 1.0 GB of 4.0 GB (25%) in 10s, 100.0 MB/s, about 30s left`},
		{4e9, 4e9, 40 * time.Second, `Pulling image "r/m:v1" for volume "v": 4.0 GB of 4.0 GB (100%) in 40s, 100.0 MB/s`},
	} {
		got := progressEvent([]string{"r/m:v1"}, "v", tc.received, tc.total, tc.elapsed)
		if got.Type != "Normal" || got.Reason != "Pulling" || got.Message != tc.want {
			t.Errorf("progressEvent(%d of %d) = %+v, want %q", tc.received, tc.total, got, tc.want)
		}
	}
}

// TestPullProgressReported: a pull that downloads reports how far it got
// on the pod, at most once per progressEvery, counting only the layers
// this publish fetches (not those it joined, nor cached ones).
func TestPullProgressReported(t *testing.T) {
	kube := fake.NewClientset()
	ev := newPodEvents(kube, "strata.csi.dev", "node-1")
	defer ev.shutdown()
	pod := credentials.Pod{Namespace: "ml", Name: "serve-0", UID: "u"}
	tr := newPullTracker(nil, ev, pod, []string{"r/m:v1"}, "v")
	tr.progressEvery = time.Hour
	layer := func(n byte, size int64) layercache.Layer {
		return layercache.Layer{DiffID: v1.Hash{Algorithm: "sha256", Hex: strings.Repeat(string('a'+n), 64)}, Size: size}
	}
	big, joined, cached := layer(0, 1000), layer(1, 500), layer(2, 7)
	tr.progress(layercache.ProgressEvent{Layer: cached, State: layercache.LayerCached})
	for _, l := range []layercache.Layer{big, joined} {
		tr.progress(layercache.ProgressEvent{Layer: l, State: layercache.LayerMissing})
	}
	tr.progress(layercache.ProgressEvent{Layer: joined, State: layercache.LayerJoined})
	tr.progress(layercache.ProgressEvent{Layer: big, State: layercache.LayerFetching, Done: 100})
	waitEvents(t, kube, "ml", 1) // Pulling, and no progress yet: the interval has not passed
	tr.progressEvery = 0
	tr.progress(layercache.ProgressEvent{Layer: big, State: layercache.LayerFetching, Done: 250})
	events := waitEvents(t, kube, "ml", 2)
	var progress string
	for _, e := range events {
		if strings.Contains(e.Message, " of ") {
			progress = e.Message
		}
	}
	if !strings.HasPrefix(progress, `Pulling image "r/m:v1" for volume "v": 250 B of 1.0 kB (25%) in `) {
		t.Errorf("progress event %q, want 250 B of the 1000 B this publish fetches", progress)
	}
}
