package csitest

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/strata-csi/strata/test/testimage"
)

// freePort returns a loopback TCP address nothing listens on.
func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// metricValue returns the value of the sample whose name and labels match
// series exactly (e.g. `strata_volumes_published` or
// `strata_csi_call_duration_seconds_count{code="OK",method="NodePublishVolume"}`).
func metricValue(t *testing.T, body, series string) float64 {
	t.Helper()
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(series) + ` (\S+)$`).FindStringSubmatch(body)
	if m == nil {
		t.Fatalf("no sample %s in /metrics:\n%s", series, body)
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func scrape(t *testing.T, addr string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %d, %v", resp.StatusCode, err)
	}
	return string(b)
}

// TestMetrics scrapes --metrics-address after real publishes: call latency
// by method and code, layers pulled once, cache hits and misses, the pull's
// duration, registry errors by kind, cache size and published volumes.
func TestMetrics(t *testing.T) {
	t.Parallel()
	addr := freePort(t)
	e := newEnvWith(t, []string{"--metrics-address", addr})

	reg := testimage.Registry(t)
	ref := reg + "/metrics/img:v1"
	testimage.Push(t, ref, testimage.Image(t,
		testimage.Layer(t, testimage.Tar(t, testimage.File("a", "aaaa")), testimage.Gzip),
		testimage.Layer(t, testimage.Tar(t, testimage.File("b", "bbbbbbbb")), testimage.Gzip),
	))
	wantSeries := func(step string, want map[string]float64) {
		t.Helper()
		body := scrape(t, addr)
		for series, w := range want {
			if got := metricValue(t, body, series); got != w {
				t.Errorf("after %s: %s = %v, want %v", step, series, got, w)
			}
		}
	}
	// The series of every registry error kind exist from the start.
	wantSeries("start", map[string]float64{
		`strata_registry_errors_total{kind="not_found"}`:    0,
		`strata_registry_errors_total{kind="unauthorized"}`: 0,
		`strata_layer_cache_misses_total`:                   0,
	})

	// A cold publish misses both layers and pulls once.
	targets := []string{e.publishImage("m1", ref)}
	wantSeries("a cold publish", map[string]float64{
		`strata_layer_cache_misses_total`:                                2,
		`strata_layer_cache_hits_total`:                                  0,
		`strata_pull_duration_seconds_count{result="success"}`:           1,
		`strata_pull_duration_seconds_bucket{result="success",le="600"}`: 1,
	})
	// A cached publish hits both, and pulls nothing.
	targets = append(targets, e.publishImage("m2", ref))
	wantSeries("a cached publish", map[string]float64{
		`strata_layer_cache_misses_total`:                      2,
		`strata_layer_cache_hits_total`:                        2,
		`strata_pull_duration_seconds_count{result="success"}`: 1,
	})
	// A missing image is a registry error of kind not_found, and no pull.
	_, err := e.Node.NodePublishVolume(ctx(t), pubReq("m3", e.target("m3"), map[string]string{"image": reg + "/metrics/missing:v1"}))
	wantCode(t, err, codes.NotFound)
	wantSeries("a missing image", map[string]float64{
		`strata_registry_errors_total{kind="not_found"}`:    1,
		`strata_registry_errors_total{kind="unauthorized"}`: 0,
		`strata_layer_cache_misses_total`:                   2,
	})

	body := scrape(t, addr)
	for series, want := range map[string]float64{
		`strata_csi_call_duration_seconds_count{code="OK",method="NodePublishVolume"}`:       2,
		`strata_csi_call_duration_seconds_count{code="NotFound",method="NodePublishVolume"}`: 1,
		`strata_layers_pulled_total`:    2, // two publishes, each layer downloaded once
		`strata_layer_cache_hits_total`: 2, // the second publish found both
		`strata_pulls_in_flight`:        0,
		`strata_evicted_layers_total`:   0,
		`strata_volumes_published`:      2,
		`strata_cache_layers`:           2,
		`strata_cache_bytes`:            12,
		`strata_cache_in_use_bytes`:     12,
	} {
		if got := metricValue(t, body, series); got != want {
			t.Errorf("%s = %v, want %v", series, got, want)
		}
	}
	if got := metricValue(t, body, "strata_pulled_bytes_total"); got <= 0 {
		t.Errorf("strata_pulled_bytes_total = %v, want the compressed size of two layers", got)
	}
	for i, tgt := range targets {
		if err := e.unpublish(fmt.Sprint("m", i+1), tgt); err != nil {
			t.Fatal(err)
		}
	}
	body = scrape(t, addr)
	if got := metricValue(t, body, "strata_volumes_published"); got != 0 {
		t.Errorf("after unpublish: strata_volumes_published = %v, want 0", got)
	}
	if got := metricValue(t, body, "strata_cache_in_use_bytes"); got != 0 {
		t.Errorf("after unpublish: strata_cache_in_use_bytes = %v, want 0", got)
	}
}
