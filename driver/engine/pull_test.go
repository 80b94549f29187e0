package engine

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http/httptest"
	"os"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/credentials"
	"github.com/strata-csi/strata/driver/metrics"
	"github.com/strata-csi/strata/layercache"
	"github.com/strata-csi/strata/test/testimage"
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
		{"rate-limited", fmt.Errorf("%w: x: %w", layercache.ErrUnavailable, &layercache.RateLimitError{Host: "r", RetryAfter: time.Second}), "rate_limited", true},
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
				`Pulled: Pulled image "r/x:v1" for volume "vol" in * (2.0 MB, 1 of 3 layers downloaded, 1 more by a pull in flight that it joined)`},
			want: map[string]float64{"strata_layer_cache_hits_total": 1, "strata_layer_cache_misses_total": 2,
				"strata_layers_pulled_total": 1, "strata_pulled_bytes_total": 2_000_000,
				`strata_pull_duration_seconds_count{result="success"}`: 1},
		},
		{
			name: "every missing layer joined: another volume's pull downloads them",
			progress: []layercache.ProgressEvent{
				{Layer: testLayer(1, 10), State: layercache.LayerCached},
				{Layer: testLayer(2, 2_000_000), State: layercache.LayerMissing},
				{Layer: testLayer(2, 2_000_000), State: layercache.LayerJoined},
				{Layer: testLayer(3, 500_000), State: layercache.LayerMissing},
				{Layer: testLayer(3, 500_000), State: layercache.LayerJoined},
				{Layer: testLayer(2, 2_000_000), State: layercache.LayerDone},
				{Layer: testLayer(3, 500_000), State: layercache.LayerDone},
			},
			wantEvents: []string{`Pulling: Pulling image "r/x:v1" for volume "vol"`,
				`Pulled: Image "r/x:v1" for volume "vol" is ready in *: it joined a pull in flight for 2 of 3 layers and downloaded none itself`},
			want: map[string]float64{"strata_layer_cache_hits_total": 1, "strata_layer_cache_misses_total": 2,
				"strata_layers_pulled_total": 0, "strata_pulled_bytes_total": 0,
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

// TestRateLimitedPublishEvent: a publish whose image's registry rate-limits
// it beyond the call's deadline fails at once with a PullFailed event that
// names the host and the wait, and counts as a rate_limited registry error;
// the registry's 429 is counted by host. The error is the layer cache's own,
// from a real registry on loopback.
func TestRateLimitedPublishEvent(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test opens a layer cache and must run as root")
	}
	lim := &testimage.RateLimit{RetryAfter: "2", Match: testimage.ManifestsAndBlobs, Window: time.Hour}
	reg := testimage.Server(t, lim.Wrap)
	ref := reg + "/limited/ds:v1"
	testimage.Push(t, ref, testimage.Image(t, testimage.Layer(t, testimage.Tar(t, testimage.File("a", "a")), testimage.Gzip)))
	lim.Arm()

	kube := fake.NewClientset()
	var m *metrics.Metrics
	e, _ := newTestEngine(t, t.TempDir(), func(c *Config, store *layercache.Store) {
		m = metrics.New(metrics.Sources{Stats: store.Stats})
		c.Metrics, c.Kube = m, kube
	})

	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	pod := credentials.Pod{Namespace: "ns", Name: "p", UID: "u"}
	start := time.Now()
	_, err := e.Resolve(ctx, klog.Background(), []string{ref}, layercache.PullIfNotPresent, nil, pod, "vol")
	if !errors.Is(err, layercache.ErrUnavailable) {
		t.Fatalf("resolve = %v, want ErrUnavailable", err)
	}
	if d := time.Since(start); d > 500*time.Millisecond {
		t.Errorf("resolve failed after %s, want at once: the 2 s wait outlasts the 1 s deadline", d)
	}
	ev := waitEvents(t, kube, "ns", 1)[0]
	want := fmt.Sprintf(`Failed to resolve image %q for volume "vol": registry unavailable: fetch manifest %s: rate-limited by %s, retry after 2 s`, ref, ref, reg)
	if ev.Type != "Warning" || ev.Reason != "PullFailed" || ev.Message != want {
		t.Errorf("event = %s %s %q\nwant Warning PullFailed %q", ev.Type, ev.Reason, ev.Message, want)
	}
	for series, want := range map[string]float64{
		`strata_registry_errors_total{kind="rate_limited"}`:             1,
		`strata_registry_errors_total{kind="unavailable"}`:              0,
		fmt.Sprintf(`strata_registry_rate_limited_total{host=%q}`, reg): 1,
	} {
		if got := sample(t, m, series); got != want {
			t.Errorf("%s = %v, want %v", series, got, want)
		}
	}
}
