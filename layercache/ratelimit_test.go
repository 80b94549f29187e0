package layercache

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/strata-csi/strata/test/testimage"
)

// TestRateLimitIsWaitedOut: a registry that answers 429 with Retry-After: 2
// to the first request for each manifest and blob is waited out: the pull
// succeeds, each wait lasted the 2 s the registry asked for, and each
// refused request was repeated once, not at every backoff.
func TestRateLimitIsWaitedOut(t *testing.T) {
	t.Parallel()
	lim := &testimage.RateLimit{RetryAfter: "2", Match: testimage.ManifestsAndBlobs, EachPathOnce: true}
	reg := testimage.Server(t, lim.Wrap)
	ref := reg + "/limited/ds:v1"
	testimage.Push(t, ref, sampleImage(t, testimage.Gzip))
	lim.Arm()
	s := openStore(t, t.TempDir())

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	start := time.Now()
	img, err := s.Pull(ctx, ref, PullOptions{})
	elapsed := time.Since(start)
	if err != nil {
		t.Fatalf("pull from a registry that asks to retry after 2 s: %v", err)
	}
	if got := tree(t, mountImage(t, s, img)); strings.Join(got, "\n") != strings.Join(sampleMerged, "\n") {
		t.Errorf("merged tree = %q, want %q", got, sampleMerged)
	}
	// The manifest, then the config, then the layers (in parallel): three
	// waits of 2 s one after the other.
	if elapsed < 6*time.Second {
		t.Errorf("pull took %s: want at least the three 2 s waits the registry asked for", elapsed)
	}
	counts := map[string][2]int{} // path: refused, served
	for _, r := range lim.Requests() {
		if !strings.Contains(r.Path, "/manifests/") && !strings.Contains(r.Path, "/blobs/") {
			continue // the ping
		}
		c := counts[r.Method+" "+r.Path]
		if r.Limited {
			c[0]++
		} else {
			c[1]++
		}
		counts[r.Method+" "+r.Path] = c
	}
	if len(counts) != 4 { // manifest, config, two layers
		t.Errorf("requests for %d paths, want 4 (manifest, config, 2 layers): %v", len(counts), counts)
	}
	for p, c := range counts {
		if c != [2]int{1, 1} {
			t.Errorf("%s: %d refused and %d served, want 1 and 1: a refused request is repeated once, after the wait", p, c[0], c[1])
		}
	}
	if got := s.Stats().RateLimited[reg]; got != 4 {
		t.Errorf("Stats().RateLimited[%s] = %d, want 4", reg, got)
	}
}

// TestRateLimitBeyondDeadlineFailsAtOnce: when the wait the registry asks
// for outlasts the caller's deadline, the call fails at once with
// ErrUnavailable, naming the host and the wait; and while the host's wait
// lasts, another call to it fails at once too, without sending anything.
func TestRateLimitBeyondDeadlineFailsAtOnce(t *testing.T) {
	t.Parallel()
	lim := &testimage.RateLimit{RetryAfter: "2", Match: testimage.ManifestsAndBlobs, EachPathOnce: true}
	reg := testimage.Server(t, lim.Wrap)
	testimage.Push(t, reg+"/limited/a:v1", sampleImage(t, testimage.Gzip))
	testimage.Push(t, reg+"/limited/b:v1", sampleImage(t, testimage.Zstd))
	lim.Arm()
	s := openStore(t, t.TempDir())

	want := fmt.Sprintf("rate-limited by %s, retry after 2 s", reg)
	for _, ref := range []string{reg + "/limited/a:v1", reg + "/limited/b:v1"} {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		start := time.Now()
		_, err := s.Resolve(ctx, ref, PullOptions{})
		elapsed := time.Since(start)
		cancel()
		if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), want) {
			t.Fatalf("resolve %s with a 1 s deadline = %v; want ErrUnavailable saying %q", ref, err, want)
		}
		if elapsed > 500*time.Millisecond {
			t.Errorf("resolve %s failed after %s; want at once, well before the 1 s deadline", ref, elapsed)
		}
	}
	var manifests []string
	for _, r := range lim.Requests() {
		if strings.Contains(r.Path, "/manifests/") {
			manifests = append(manifests, r.Path)
		}
	}
	// a's manifest was refused; b's was never sent: the host had asked to
	// wait, and the deadline was too short for the wait.
	if len(manifests) != 1 || !strings.HasSuffix(manifests[0], "/limited/a/manifests/v1") {
		t.Errorf("manifest requests = %q, want only a's", manifests)
	}
}

// TestRateLimitSharedByConcurrentPulls: ten resolutions of different images
// on one host that rate-limits every request for 3 s, asking for 2 s at a
// time, send one request each before the first 429 comes back, then wait
// together: when the 2 s are over one request goes first, is refused again,
// and the others wait on with it. All succeed after the window.
func TestRateLimitSharedByConcurrentPulls(t *testing.T) {
	t.Parallel()
	lim := &testimage.RateLimit{RetryAfter: "2", Window: 3 * time.Second}
	reg := testimage.Server(t, lim.Wrap)
	const n = 10
	for i := range n {
		body, _ := randomImage(t, 1<<10)
		testimage.Push(t, fmt.Sprintf("%s/many/img%d:v1", reg, i), testimage.Image(t,
			testimage.Layer(t, testimage.Tar(t, testimage.File("f", body)), testimage.Gzip)))
	}
	lim.Arm()
	s := openStore(t, t.TempDir())

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	start := time.Now()
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() {
			_, errs[i] = s.Resolve(ctx, fmt.Sprintf("%s/many/img%d:v1", reg, i), PullOptions{})
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	for i, err := range errs {
		if err != nil {
			t.Errorf("resolve img%d: %v", i, err)
		}
	}
	if elapsed < 3*time.Second {
		t.Errorf("resolutions took %s, want at least the 3 s window", elapsed)
	}
	limited := lim.Refused()
	if limited > n+1 {
		t.Errorf("the registry refused %d requests during its window, want at most %d: one per resolution, then one probe", limited, n+1)
	}
	t.Logf("%d requests refused during the window, %d in all, %s", limited, len(lim.Requests()), elapsed)
}

// TestRateLimitWithoutRetryAfter: a 429 that names no wait is retried with
// the usual backoff, and the error of the last attempt says who limited.
func TestRateLimitWithoutRetryAfter(t *testing.T) {
	t.Parallel()
	lim := &testimage.RateLimit{Match: testimage.ManifestsAndBlobs, Window: time.Hour}
	reg := testimage.Server(t, lim.Wrap)
	ref := reg + "/limited/ds:v1"
	testimage.Push(t, ref, sampleImage(t, testimage.Gzip))
	lim.Arm()
	s := openStore(t, t.TempDir(), WithRetry(3, 10*time.Millisecond))

	_, err := s.Resolve(context.Background(), ref, PullOptions{})
	want := fmt.Sprintf("rate-limited by %s (after 3 attempts)", reg)
	if !errors.Is(err, ErrUnavailable) || !strings.HasSuffix(err.Error(), want) {
		t.Fatalf("resolve from a registry that keeps answering 429 = %v; want ErrUnavailable ending in %q", err, want)
	}
	var rl *RateLimitError
	if !errors.As(err, &rl) || rl.Host != reg || rl.RetryAfter != 0 {
		t.Errorf("errors.As(RateLimitError) = %+v, want host %s and no RetryAfter", rl, reg)
	}
	manifests := 0
	for _, r := range lim.Requests() {
		if strings.Contains(r.Path, "/manifests/") {
			manifests++
		}
	}
	if manifests != 3 {
		t.Errorf("%d manifest requests, want 3 (the attempts)", manifests)
	}
	if got := s.Stats().RateLimited[reg]; got != 3 {
		t.Errorf("Stats().RateLimited[%s] = %d, want 3", reg, got)
	}
}

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2026, 12, 5, 3, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		header string
		want   time.Duration
		ok     bool
	}{
		{"2", 2 * time.Second, true},
		{" 120 ", 2 * time.Minute, true},
		{"3600", time.Hour, true},
		{"3601", 0, false}, // absurd: ignored
		{"99999999999999999999", 0, false},
		{"0", 0, false},
		{"-5", 0, false},
		{"", 0, false},
		{"soon", 0, false},
		{"1.5", 0, false},
		{now.Add(90 * time.Second).Format(http.TimeFormat), 90 * time.Second, true},
		{now.Add(-time.Minute).Format(http.TimeFormat), 0, false}, // in the past
		{now.Add(2 * time.Hour).Format(http.TimeFormat), 0, false},
		{"Sat, 05 Dec 2026 03:00:30 GMT", 30 * time.Second, true},
	} {
		got, ok := parseRetryAfter(tc.header, now)
		if got != tc.want || ok != tc.ok {
			t.Errorf("parseRetryAfter(%q) = %s, %v; want %s, %v", tc.header, got, ok, tc.want, tc.ok)
		}
	}
}

func TestRateLimitErrorText(t *testing.T) {
	for _, tc := range []struct {
		e    RateLimitError
		want string
	}{
		{RateLimitError{Host: "registry-1.docker.io"}, "rate-limited by registry-1.docker.io"},
		{RateLimitError{Host: "r:5000", RetryAfter: 2 * time.Second}, "rate-limited by r:5000, retry after 2 s"},
		{RateLimitError{Host: "r", RetryAfter: 1500 * time.Millisecond}, "rate-limited by r, retry after 2 s"},
	} {
		if got := tc.e.Error(); got != tc.want {
			t.Errorf("%+v.Error() = %q, want %q", tc.e, got, tc.want)
		}
	}
}

// TestRateLimitedTokenServer: a token server's 429 with Retry-After is
// waited out as a registry's is: the token exchange is tried again after
// the wait, once.
func TestRateLimitedTokenServer(t *testing.T) {
	t.Parallel()
	lim := &testimage.RateLimit{RetryAfter: "2", Match: func(r *http.Request) bool { return r.URL.Path == "/token" }, EachPathOnce: true}
	reg := testimage.Server(t, func(next http.Handler) http.Handler {
		token := lim.Wrap(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			_, _ = w.Write([]byte(`{"token":"tok"}`))
		}))
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			switch {
			case r.URL.Path == "/token":
				token.ServeHTTP(w, r)
			case r.Header.Get("Authorization") != "Bearer tok" && r.Method == http.MethodGet:
				// Pushes go through; pulls need a token, as on Docker Hub.
				w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="http://%s/token",service="test"`, r.Host))
				http.Error(w, `{"errors":[{"code":"UNAUTHORIZED"}]}`, http.StatusUnauthorized)
			default:
				next.ServeHTTP(w, r)
			}
		})
	})
	ref := reg + "/limited/ds:v1"
	testimage.Push(t, ref, sampleImage(t, testimage.Gzip))
	lim.Arm()
	s := openStore(t, t.TempDir())

	start := time.Now()
	img, err := s.Pull(context.Background(), ref, PullOptions{})
	elapsed := time.Since(start)
	if err != nil {
		t.Fatalf("pull through a token server that asks to retry after 2 s: %v", err)
	}
	if got := tree(t, mountImage(t, s, img)); strings.Join(got, "\n") != strings.Join(sampleMerged, "\n") {
		t.Errorf("merged tree = %q, want %q", got, sampleMerged)
	}
	if elapsed < 2*time.Second {
		t.Errorf("pull took %s, want at least the 2 s wait", elapsed)
	}
	refused := lim.Refused()
	if refused != 1 {
		t.Errorf("the token server refused %d requests, want 1", refused)
	}
	if got := s.Stats().RateLimited[reg]; got != 1 {
		t.Errorf("Stats().RateLimited[%s] = %d, want 1", reg, got)
	}
}
