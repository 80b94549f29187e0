package engine

import (
	"context"
	"fmt"
	"io"
	"net/http/httptest"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/strata-csi/strata/driver/credentials"
	"github.com/strata-csi/strata/driver/metrics"
	"github.com/strata-csi/strata/layercache"
)

func TestRegistryErrorKind(t *testing.T) {
	for _, tc := range []struct {
		name     string
		err      error
		kind     string
		registry bool
	}{
		{"not found", fmt.Errorf("x: %w", layercache.ErrNotFound), "not_found", true},
		{"unauthorized", fmt.Errorf("x: %w", layercache.ErrUnauthorized), "unauthorized", true},
		{"unavailable", fmt.Errorf("x: %w", layercache.ErrUnavailable), "unavailable", true},
		{"deadline", fmt.Errorf("resolve: %w", context.DeadlineExceeded), "deadline", true},
		{"digest mismatch", fmt.Errorf("x: %w", layercache.ErrDigestMismatch), "bad_blob", true},
		{"corrupt layer", fmt.Errorf("x: %w", layercache.ErrCorruptLayer), "bad_blob", true},
		{"unsafe layer", fmt.Errorf("x: %w", layercache.ErrUnsafeLayer), "unsafe_layer", true},
		{"unsupported image", fmt.Errorf("x: %w", layercache.ErrUnsupported), "other", true},
		{"bad reference: the user's", fmt.Errorf("x: %w", layercache.ErrInvalidReference), "other", false},
		{"policy Never: not the registry's", fmt.Errorf("x: %w", layercache.ErrNotCached), "other", false},
		{"cache budget: the node's", fmt.Errorf("x: %w", layercache.ErrNoSpace), "other", false},
		{"disk full: the node's", fmt.Errorf("x: %w", syscall.ENOSPC), "other", false},
		{"cancelled call", context.Canceled, "other", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kind, registry := registryErrorKind(tc.err)
			if kind != tc.kind || registry != tc.registry {
				t.Errorf("registryErrorKind(%v) = %s, %v; want %s, %v", tc.err, kind, registry, tc.kind, tc.registry)
			}
		})
	}
}

func sample(t *testing.T, m *metrics.Metrics, series string) float64 {
	t.Helper()
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Body)
	got := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(series) + ` (\S+)$`).FindSubmatch(body)
	if got == nil {
		return 0
	}
	v, err := strconv.ParseFloat(string(got[1]), 64)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func testLayer(n byte, size int64) layercache.Layer {
	hex := fmt.Sprintf("%064x", n)
	return layercache.Layer{DiffID: v1.Hash{Algorithm: "sha256", Hex: hex}, Size: size}
}

// TestPullTracker feeds a pull's progress to a tracker, as layercache
// reports it, and checks the events on the pod and the metrics.
func TestPullTracker(t *testing.T) {
	for _, tc := range []struct {
		name       string
		progress   []layercache.ProgressEvent
		err        error
		wantEvents []string // "Reason: message", each * matching anything
		want       map[string]float64
	}{
		{
			name: "cached image",
			progress: []layercache.ProgressEvent{
				{Layer: testLayer(1, 10), State: layercache.LayerCached}, {Layer: testLayer(2, 20), State: layercache.LayerCached},
			},
			wantEvents: []string{`Pulled: Image "r/x:v1" for volume "vol" is already cached on the node`},
			want: map[string]float64{"strata_layer_cache_hits_total": 2, "strata_layer_cache_misses_total": 0,
				`strata_pull_duration_seconds_count{result="success"}`: 0},
		},
		{
			name: "pull of one layer, another joined, a third cached",
			progress: []layercache.ProgressEvent{
				{Layer: testLayer(1, 10), State: layercache.LayerCached},
				{Layer: testLayer(2, 2_000_000), State: layercache.LayerMissing},
				{Layer: testLayer(3, 500_000), State: layercache.LayerMissing},
				{Layer: testLayer(3, 500_000), State: layercache.LayerJoined},
				{Layer: testLayer(2, 2_000_000), State: layercache.LayerFetching, Done: 1_000_000},
				{Layer: testLayer(2, 2_000_000), State: layercache.LayerDone},
				{Layer: testLayer(3, 500_000), State: layercache.LayerDone},
				// Ensured again after a prune took a layer: still one miss.
				{Layer: testLayer(2, 2_000_000), State: layercache.LayerMissing},
			},
			wantEvents: []string{`Pulling: Pulling image "r/x:v1" for volume "vol"`,
				`Pulled: Pulled image "r/x:v1" for volume "vol" in * (2.5 MB, 2 of 3 layers downloaded)`},
			want: map[string]float64{"strata_layer_cache_hits_total": 1, "strata_layer_cache_misses_total": 2,
				"strata_layers_pulled_total": 1, "strata_pulled_bytes_total": 2_000_000,
				`strata_pull_duration_seconds_count{result="success"}`: 1},
		},
		{
			name:       "bad blob",
			progress:   []layercache.ProgressEvent{{Layer: testLayer(2, 20), State: layercache.LayerMissing}},
			err:        fmt.Errorf("layer: %w", layercache.ErrDigestMismatch),
			wantEvents: []string{`Pulling: Pulling image "r/x:v1" for volume "vol"`, `PullFailed: Failed to pull image "r/x:v1" for volume "vol": layer: digest mismatch`},
			want: map[string]float64{"strata_layer_cache_misses_total": 1, `strata_registry_errors_total{kind="bad_blob"}`: 1,
				`strata_pull_duration_seconds_count{result="bad_blob"}`: 1, `strata_pull_duration_seconds_count{result="success"}`: 0},
		},
		{
			name:       "the call's deadline during the pull: the pull goes on, nothing is reported",
			progress:   []layercache.ProgressEvent{{Layer: testLayer(2, 20), State: layercache.LayerMissing}},
			err:        fmt.Errorf("pull r/x:v1: %w (the pull goes on in the background)", context.DeadlineExceeded),
			wantEvents: []string{`Pulling: Pulling image "r/x:v1" for volume "vol"`},
			want: map[string]float64{`strata_registry_errors_total{kind="deadline"}`: 0,
				`strata_pull_duration_seconds_count{result="deadline"}`: 0},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kube := fake.NewClientset()
			ev := newPodEvents(kube, "strata.csi.dev", "node-1")
			defer ev.shutdown()
			m := metrics.New(metrics.Sources{})
			tr := newPullTracker(m, ev, credentials.Pod{Namespace: "ns", Name: "p", UID: "u"}, []string{"r/x:v1"}, "vol")
			for _, e := range tc.progress {
				tr.progress(e)
			}
			tr.finish(stepPull, 3, tc.err)

			events := waitEvents(t, kube, "ns", len(tc.wantEvents))
			for i, want := range tc.wantEvents {
				got := events[i].Reason + ": " + events[i].Message
				if !matchGlob(want, got) {
					t.Errorf("event %d: got %q, want %q", i, got, want)
				}
			}
			for series, want := range tc.want {
				if got := sample(t, m, series); got != want {
					t.Errorf("%s = %v, want %v", series, got, want)
				}
			}
		})
	}
}

// matchGlob reports whether s is pattern, where each * in pattern stands
// for any text.
func matchGlob(pattern, s string) bool {
	parts := strings.Split(pattern, "*")
	re := make([]string, len(parts))
	for i, p := range parts {
		re[i] = regexp.QuoteMeta(p)
	}
	return regexp.MustCompile("^" + strings.Join(re, ".*") + "$").MatchString(s)
}

// TestResolveFailureIsCounted: a resolve that the registry answers "not
// found" is a PullFailed event and a not_found registry error, and no pull
// duration (nothing was downloaded).
func TestResolveFailureIsCounted(t *testing.T) {
	kube := fake.NewClientset()
	ev := newPodEvents(kube, "strata.csi.dev", "node-1")
	defer ev.shutdown()
	m := metrics.New(metrics.Sources{})
	tr := newPullTracker(m, ev, credentials.Pod{Namespace: "ns", Name: "p"}, []string{"r/missing:v1"}, "vol")
	tr.finish(stepResolve, 0, fmt.Errorf("%w: manifest unknown", layercache.ErrNotFound))
	e := waitEvents(t, kube, "ns", 1)[0]
	if e.Type != "Warning" || e.Reason != "PullFailed" || e.Message != `Failed to resolve image "r/missing:v1" for volume "vol": not found in registry: manifest unknown` {
		t.Errorf("event = %s %s %q", e.Type, e.Reason, e.Message)
	}
	for series, want := range map[string]float64{
		`strata_registry_errors_total{kind="not_found"}`:         1,
		`strata_registry_errors_total{kind="unauthorized"}`:      0,
		`strata_pull_duration_seconds_count{result="not_found"}`: 0,
	} {
		if got := sample(t, m, series); got != want {
			t.Errorf("%s = %v, want %v", series, got, want)
		}
	}
}
