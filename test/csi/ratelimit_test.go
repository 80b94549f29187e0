package csitest

import (
	"context"
	"fmt"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/strata-csi/strata/test/testimage"
)

// TestPublishRateLimited: against a registry that answers the first request
// for each manifest and blob with 429 and Retry-After: 2, a publish whose
// deadline is shorter than the wait fails at once with Unavailable naming
// the host and the wait; a publish with kubelet's deadline succeeds after
// the waits. The 429s are counted by host, and the failed publish as a
// rate_limited registry error.
func TestPublishRateLimited(t *testing.T) {
	t.Parallel()
	addr := freePort(t)
	e := newEnvWith(t, []string{"--metrics-address", addr})

	lim := &testimage.RateLimit{RetryAfter: "2", Match: testimage.ManifestsAndBlobs, EachPathOnce: true}
	reg := testimage.Server(t, lim.Wrap)
	ref := reg + "/limited/ds:v1"
	testimage.Push(t, ref, testimage.Image(t,
		testimage.Layer(t, testimage.Tar(t, testimage.File("a", "aaaa")), testimage.Gzip),
		testimage.Layer(t, testimage.Tar(t, testimage.File("b", "bbbb")), testimage.Gzip)))
	lim.Arm()

	short, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	start := time.Now()
	_, err := e.Node.NodePublishVolume(short, pubReq("rl-short", e.target("rl-short"), map[string]string{"image": ref}))
	wantCode(t, err, codes.Unavailable, fmt.Sprintf("rate-limited by %s, retry after 2 s", reg))
	if d := time.Since(start); d > 500*time.Millisecond {
		t.Errorf("the publish failed after %s, want at once: the 2 s wait outlasts its 1 s deadline", d)
	}

	start = time.Now()
	tgt := e.publishImage("rl", ref)
	elapsed := time.Since(start)
	if got := readString(t, tgt+"/a") + readString(t, tgt+"/b"); got != "aaaabbbb" {
		t.Errorf("published files read %q, want aaaabbbb", got)
	}
	// The rest of the manifest's wait, then the config's and the layers'.
	if elapsed < 4*time.Second {
		t.Errorf("the publish took %s, want at least the config's and the layers' 2 s waits", elapsed)
	}
	refused := lim.Refused()
	if refused != 4 { // manifest, config, two layers: each once
		t.Errorf("the registry refused %d requests, want 4: each manifest and blob once, not at each retry", refused)
	}
	body := scrape(t, addr)
	for series, want := range map[string]float64{
		fmt.Sprintf(`strata_registry_rate_limited_total{host=%q}`, reg): float64(refused),
		`strata_registry_errors_total{kind="rate_limited"}`:             1,
		`strata_registry_errors_total{kind="unavailable"}`:              0,
	} {
		if got := metricValue(t, body, series); got != want {
			t.Errorf("%s = %v, want %v", series, got, want)
		}
	}
	t.Logf("publish through the rate limit took %s", elapsed)
	if err := e.unpublish("rl", tgt); err != nil {
		t.Fatal(err)
	}
	e.assertClean()
}
