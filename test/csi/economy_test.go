package csitest

import (
	"fmt"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/strata-csi/strata/test/testimage"
)

// requestCounter counts a registry's requests by method and kind of path
// (ping, manifests, blobs), and blob GETs by digest.
type requestCounter struct {
	mu     sync.Mutex
	counts map[string]int
	blobs  map[string]int
	// latency delays each manifest request, as a registry across a
	// network answers: the publishes of a wave all arrive while the first
	// one's request is out.
	latency time.Duration
}

func newRequestCounter() *requestCounter {
	return &requestCounter{counts: map[string]int{}, blobs: map[string]int{}}
}

func (c *requestCounter) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		kind := "other"
		switch p := r.URL.Path; {
		case p == "/v2/" || p == "/v2":
			kind = "ping"
		case strings.Contains(p, "/manifests/"):
			kind = "manifest"
		case strings.Contains(p, "/blobs/"):
			kind = "blob"
			if r.Method == http.MethodGet {
				c.mu.Lock()
				c.blobs[p[strings.LastIndex(p, "/")+1:]]++
				c.mu.Unlock()
			}
		}
		c.mu.Lock()
		c.counts[r.Method+" "+kind]++
		latency := c.latency
		c.mu.Unlock()
		if kind == "manifest" {
			time.Sleep(latency)
		}
		next.ServeHTTP(w, r)
	})
}

// take returns the counts since the last take, and resets them.
func (c *requestCounter) take() (map[string]int, map[string]int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	counts, blobs := c.counts, c.blobs
	c.counts, c.blobs = map[string]int{}, map[string]int{}
	return counts, blobs
}

func describe(m map[string]int) string {
	var out []string
	for k, v := range m {
		out = append(out, fmt.Sprintf("%s=%d", k, v))
	}
	sort.Strings(out)
	return strings.Join(out, " ")
}

// wave publishes n volumes of image at once, with the given pull policy,
// and fails the test if any publish fails.
func (e *env) wave(name string, n int, image, policy string) {
	e.t.Helper()
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			vol := fmt.Sprintf("%s-%03d", name, i)
			attrs := map[string]string{"image": image}
			if policy != "" {
				attrs["pullPolicy"] = policy
			}
			_, errs[i] = e.Node.NodePublishVolume(ctx(e.t), pubReq(vol, e.target(vol), attrs))
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			e.t.Errorf("%s: publish %d: %v", name, i, err)
		}
	}
	if e.t.Failed() {
		e.t.FailNow()
	}
}

// TestRegistryEconomy: a node asks a registry once per image, not once per
// pod. A hundred concurrent cold publishes of one tag cost the registry one
// manifest GET, one config GET and one GET per layer; a hundred warm ones
// under IfNotPresent cost nothing; under Always, a HEAD of the tag, once for
// the whole wave, and no GET.
func TestRegistryEconomy(t *testing.T) {
	counter := newRequestCounter()
	reg := testimage.Server(t, counter.wrap)
	var layers []v1.Layer
	for i := range 8 {
		layers = append(layers, testimage.Layer(t, testimage.Tar(t,
			testimage.File(fmt.Sprintf("data/part-%d", i), strings.Repeat(fmt.Sprint(i), 64<<10))), testimage.Gzip))
	}
	ref := reg + "/economy/data:v1"
	img := testimage.Image(t, layers...)
	testimage.Push(t, ref, img)
	cfg, err := img.ConfigName()
	if err != nil {
		t.Fatal(err)
	}
	counter.take()

	e := newEnv(t)
	e.wave("cold", 100, ref, "")
	counts, blobs := counter.take()
	t.Logf("cold wave: %s", describe(counts))
	if counts["GET manifest"] != 1 || counts["HEAD manifest"] != 0 {
		t.Errorf("cold wave: %d manifest GETs and %d HEADs, want 1 GET", counts["GET manifest"], counts["HEAD manifest"])
	}
	if n := blobs[cfg.String()]; n != 1 {
		t.Errorf("cold wave: the config was fetched %d times, want 1", n)
	}
	for _, l := range layers {
		d, err := l.Digest()
		if err != nil {
			t.Fatal(err)
		}
		if n := blobs[d.String()]; n != 1 {
			t.Errorf("cold wave: layer %s was fetched %d times, want 1", d, n)
		}
	}

	e.wave("warm", 100, ref, "IfNotPresent")
	if counts, _ := counter.take(); len(counts) != 0 {
		t.Errorf("warm wave under IfNotPresent asked the registry: %s", describe(counts))
	}

	// Under Always, a registry that takes 300 ms to answer: the wave's
	// publishes, which arrive over tens of milliseconds (more under -race),
	// all join the first one's HEAD.
	counter.mu.Lock()
	counter.latency = 300 * time.Millisecond
	counter.mu.Unlock()
	e.wave("always", 100, ref, "Always")
	counts, _ = counter.take()
	t.Logf("Always wave: %s", describe(counts))
	if counts["HEAD manifest"] != 1 || counts["GET manifest"] != 0 || counts["GET blob"] != 0 {
		t.Errorf("Always wave of a tag that did not move: %s; want one HEAD of the manifest and no GET of a manifest or blob", describe(counts))
	}
}

// BenchmarkPublishWave: a hundred concurrent cold publishes of one image
// against one, each on a fresh plugin and cache, and the plugin's peak
// memory through the wave. The image is the benchmarks' base
// (STRATA_BENCH_IMAGE_MIB, 1 GiB by default).
//
//	go test -run '^$' -bench PublishWave -benchtime 1x ./test/csi/
func BenchmarkPublishWave(b *testing.B) {
	reg := testimage.Registry(b)
	base := pushBenchBase(b, reg+"/wave/data:v1", benchMiB(b, "STRATA_BENCH_IMAGE_MIB", 1024))
	b.Logf("image: %s", base.describe())
	for b.Loop() {
		one, oneRSS := coldWave(b, base.ref, 1)
		wave, waveRSS := coldWave(b, base.ref, 100)
		b.ReportMetric(one.Seconds(), "s/publish")
		b.ReportMetric(wave.Seconds(), "s/wave-of-100")
		b.ReportMetric(wave.Seconds()/one.Seconds(), "wave/one")
		b.ReportMetric(mebi(waveRSS), "MiB-peak-RSS-wave")
		b.Logf("one cold publish %.2f s (plugin peak RSS %.1f MiB); 100 concurrent cold publishes %.2f s (%.2fx, plugin peak RSS %.1f MiB)",
			one.Seconds(), mebi(oneRSS), wave.Seconds(), wave.Seconds()/one.Seconds(), mebi(waveRSS))
	}
}

// coldWave publishes n volumes of ref at once on a fresh plugin with an
// empty cache, and returns the time until the last publish returned and
// the plugin's peak resident memory.
func coldWave(b *testing.B, ref string, n int) (time.Duration, int64) {
	b.Helper()
	e := newEnv(b)
	start := time.Now()
	e.wave(fmt.Sprintf("wave%d", n), n, ref, "")
	took := time.Since(start)
	e.mu.Lock()
	pid := e.cmd.Process.Pid
	e.mu.Unlock()
	rss := peakRSS(b, pid)
	if err := UnmountAll(e.dir); err != nil {
		b.Fatal(err)
	}
	return took, rss
}

// peakRSS reads a process's peak resident set size (VmHWM).
func peakRSS(tb testing.TB, pid int) int64 {
	tb.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		tb.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) == 3 && f[0] == "VmHWM:" {
			kib, err := strconv.ParseInt(f[1], 10, 64)
			if err != nil {
				tb.Fatal(err)
			}
			return kib << 10
		}
	}
	tb.Fatalf("no VmHWM in /proc/%d/status", pid)
	return 0
}
