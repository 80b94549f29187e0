package csitest

import (
	"crypto/rand"
	"fmt"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/strata-csi/strata/test/testimage"
)

// TestCacheBudget: with --cache-max-bytes, a publish that cannot fit without
// evicting layers that volumes use fails with ResourceExhausted saying how
// much is needed; once a volume goes, its layers make room.
func TestCacheBudget(t *testing.T) {
	t.Parallel()
	addr := freePort(t)
	e := newEnvWith(t, []string{"--cache-max-bytes", "15000", "--cache-low-watermark", "0.75", "--cache-min-age", "1ns", "--metrics-address", addr})
	reg := testimage.Registry(t)
	var refs []string
	for _, n := range []string{"a", "b", "c"} {
		b := make([]byte, 1000)
		if _, err := rand.Read(b); err != nil {
			t.Fatal(err)
		}
		refs = append(refs, fmt.Sprintf("%s/budget/%s:v1", reg, n))
		testimage.Push(t, refs[len(refs)-1], testimage.Image(t, testimage.Layer(t, testimage.Tar(t, testimage.File("blob", string(b))), testimage.Gzip)))
	}
	ta, tb := e.publishImage("va", refs[0]), e.publishImage("vb", refs[1])
	_, err := e.Node.NodePublishVolume(ctx(t), pubReq("vc", e.target("vc"), map[string]string{"image": refs[2]}))
	wantCode(t, err, codes.ResourceExhausted, "needs at least", refs[2])
	if err := e.unpublish("va", ta); err != nil {
		t.Fatal(err)
	}
	tc := e.publishImage("vc", refs[2]) // a's layer is unused now: evicted to make room
	body := scrape(t, addr)
	if got := metricValue(t, body, "strata_evicted_layers_total"); got != 1 {
		t.Errorf("strata_evicted_layers_total = %v, want 1", got)
	}
	if got := metricValue(t, body, "strata_evicted_bytes_total"); got != 1000 {
		t.Errorf("strata_evicted_bytes_total = %v, want 1000", got)
	}
	for _, v := range []struct{ id, target string }{{"vb", tb}, {"vc", tc}} {
		if err := e.unpublish(v.id, v.target); err != nil {
			t.Fatal(err)
		}
	}
	e.assertClean()
}
