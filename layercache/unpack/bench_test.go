package unpack

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

// BenchmarkApply unpacks a dataset-like layer: 20,000 small files in 2,000
// directories plus four 16 MiB files (one of them mostly holes). MB/s counts
// logical file bytes.
func BenchmarkApply(b *testing.B) {
	requireRoot(b)
	rng := rand.New(rand.NewPCG(1, 2))
	var entries []ent
	var total int64
	for d := range 2000 {
		dn := fmt.Sprintf("data/shard%02d/dir%04d/", d%50, d)
		entries = append(entries, dir(dn))
		for f := range 10 {
			body := make([]byte, 512+rng.IntN(8192))
			for i := range body {
				body[i] = byte(rng.Uint32())
			}
			entries = append(entries, file(fmt.Sprintf("%sfile%d.bin", dn, f), string(body)))
			total += int64(len(body))
		}
	}
	for i := range 4 {
		body := make([]byte, 16<<20)
		if i == 3 {
			copy(body[8<<20:], "an island in a sea of zeros")
		} else {
			for j := range body {
				body[j] = byte(rng.Uint32())
			}
		}
		entries = append(entries, file(fmt.Sprintf("big/blob%d", i), string(body)))
		total += int64(len(body))
	}
	data := makeTar(b, entries...)
	tmp := b.TempDir()
	b.SetBytes(total)
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		dir := filepath.Join(tmp, fmt.Sprint(i))
		if err := os.Mkdir(dir, 0o755); err != nil {
			b.Fatal(err)
		}
		st, err := Apply(context.Background(), dir, bytes.NewReader(data))
		if err != nil {
			b.Fatal(err)
		}
		if st.Files != 20004 {
			b.Fatalf("want 20004 files, got %d", st.Files)
		}
		b.StopTimer()
		if err := os.RemoveAll(dir); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
}
