package layercache

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/strata-csi/strata/test/testimage"
)

// BenchmarkColdPull pulls a dataset-like image (three gzip layers: 10,000
// small files, and two of 32 MiB of random data) from a loopback registry
// into a new store, without any limit and with the budget and the layer
// limits on, to show what the accounting costs. MB/s counts file bytes.
func BenchmarkColdPull(b *testing.B) {
	rng := rand.New(rand.NewPCG(3, 4))
	random := func(n int) string {
		p := make([]byte, n)
		for i := range p {
			p[i] = byte(rng.Uint32())
		}
		return string(p)
	}
	var small []testimage.Entry
	var total int64
	for d := range 100 {
		small = append(small, testimage.Dir(fmt.Sprintf("data/d%03d", d)))
		for f := range 100 {
			body := random(256 + rng.IntN(4096))
			small = append(small, testimage.File(fmt.Sprintf("data/d%03d/f%03d", d, f), body))
			total += int64(len(body))
		}
	}
	layers := []v1.Layer{testimage.Layer(b, testimage.Tar(b, small...), testimage.Gzip)}
	for i := range 2 {
		body := random(32 << 20)
		layers = append(layers, testimage.Layer(b, testimage.Tar(b, testimage.File(fmt.Sprintf("weights/%d.bin", i), body)), testimage.Gzip))
		total += int64(len(body))
	}
	ref := testimage.Registry(b) + "/bench:v1"
	testimage.Push(b, ref, testimage.Image(b, layers...))

	for _, bc := range []struct {
		name string
		opts []Option
	}{
		{"unlimited", []Option{WithLayerLimits(Limits{})}},
		{"budget and limits", []Option{WithBudget(Budget{MaxBytes: 1 << 30})}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.SetBytes(total)
			for b.Loop() {
				b.StopTimer()
				s := openStore(b, b.TempDir(), bc.opts...)
				b.StartTimer()
				if _, err := s.Pull(context.Background(), ref, PullOptions{}); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				if err := s.Close(); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
	}
}

// BenchmarkMeter is the accounting's own cost per tar entry and per 1 MiB
// chunk of content, with a budget (every 256th entry includes a statfs).
func BenchmarkMeter(b *testing.B) {
	s := openStore(b, b.TempDir(), WithBudget(Budget{MaxBytes: 1 << 58}),
		WithLayerLimits(Limits{MaxExpansion: DefaultMaxExpansion, ExpansionFloor: DefaultExpansionFloor, MaxLayerBytes: 1 << 60}))
	if err := s.makeRoom(context.Background(), "bench", 1); err != nil {
		b.Fatal(err)
	}
	m := s.newLayerMeter(context.Background(), &pullMeter{ref: "bench"}, Layer{Size: 1 << 52})
	defer m.done(false)
	b.Run("entry", func(b *testing.B) {
		for b.Loop() {
			if err := m.Entry(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("content 1MiB", func(b *testing.B) {
		for b.Loop() {
			if err := m.Content(1 << 20); err != nil {
				b.Fatal(err)
			}
		}
	})
}
