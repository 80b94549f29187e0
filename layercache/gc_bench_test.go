package layercache

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// fakeLayers commits n small unpacked layers (10 files each) straight into
// the store, as pulls would have left them, and returns their diffIDs.
func fakeLayers(b *testing.B, s *Store, n int) []v1.Hash {
	b.Helper()
	var ids []v1.Hash
	for i := range n {
		sum := sha256.Sum256(fmt.Appendf(nil, "layer-%d-%d", i, time.Now().UnixNano()))
		d := v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(sum[:])}
		p, err := s.layerPath(d)
		if err != nil {
			b.Fatal(err)
		}
		for f := range 10 {
			dir := filepath.Join(p, fsDir, "d")
			if err := os.MkdirAll(dir, 0o755); err != nil {
				b.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, fmt.Sprint(f)), []byte("x"), 0o644); err != nil {
				b.Fatal(err)
			}
		}
		meta, _ := json.Marshal(LayerMeta{DiffID: d, Digest: d, Size: 10, Files: 10, Created: time.Now()})
		if err := os.WriteFile(filepath.Join(p, metaFile), meta, 0o644); err != nil {
			b.Fatal(err)
		}
		ids = append(ids, d)
	}
	return ids
}

// BenchmarkPrune1000 removes 1,000 unreferenced layers while another
// goroutine keeps publishing and unpublishing (acquire, release) a volume
// of a held layer, and reports the
// prune's duration and the worst Acquire latency seen during it: the store
// lock is held only to rename layers away, not to delete them.
func BenchmarkPrune1000(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Fatal("needs root")
	}
	root, err := os.MkdirTemp("/var/tmp", "strata-gc-bench-")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(root) })
	s, err := Open(root)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { s.Close() })
	held := fakeLayers(b, s, 1)
	// A volume holds the layer throughout; a second one comes and goes.
	if err := s.Acquire("pinned", held); err != nil {
		b.Fatal(err)
	}
	var prunes, worst, all []time.Duration
	for b.Loop() {
		b.StopTimer()
		fakeLayers(b, s, 1000)
		b.StartTimer()
		stop := make(chan struct{})
		var wg sync.WaitGroup
		var maxAcquire time.Duration
		var lat []time.Duration
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				t0 := time.Now()
				if err := s.Acquire("vol", held); err != nil {
					b.Error(err)
					return
				}
				d := time.Since(t0)
				lat = append(lat, d)
				maxAcquire = max(maxAcquire, d)
				if err := s.Release("vol"); err != nil {
					b.Error(err)
					return
				}
			}
		})
		t0 := time.Now()
		res, err := s.Prune(context.Background())
		prunes = append(prunes, time.Since(t0))
		close(stop)
		wg.Wait()
		worst = append(worst, maxAcquire)
		all = append(all, lat...)
		if err != nil || len(res.Layers) < 1000 {
			b.Fatalf("prune: %d layers, %v", len(res.Layers), err)
		}
		if !s.HasLayer(held[0]) {
			b.Fatal("prune removed a held layer")
		}
	}
	slices.Sort(prunes)
	slices.Sort(worst)
	b.ReportMetric(float64(prunes[len(prunes)/2].Milliseconds()), "prune-p50-ms")
	b.ReportMetric(float64(worst[len(worst)-1].Microseconds()), "max-acquire-µs")
	slices.Sort(all)
	b.ReportMetric(float64(all[len(all)*99/100].Microseconds()), "p99-acquire-µs")
	b.ReportMetric(float64(all[len(all)*999/1000].Microseconds()), "p99.9-acquire-µs")
}
