package unpack

import (
	"archive/tar"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/strata-csi/strata/test/peak"
)

// TestDirTimesBounded: the directory times restored at the end of a layer
// are not all held in memory: beyond maxDirTimes they go to a file, and
// every directory still gets its time.
func TestDirTimesBounded(t *testing.T) {
	requireRoot(t)
	old := maxDirTimes
	maxDirTimes = 64
	defer func() { maxDirTimes = old }()
	const n = 1000
	var entries []ent
	for i := range n {
		d := fmt.Sprintf("d%04d/", i)
		when := testTime.Add(time.Duration(i) * time.Second)
		entries = append(entries, dir(d).with(func(h *tar.Header) { h.ModTime = when }))
		entries = append(entries, file(d+"f", "x"))
	}
	// A directory given twice: the later entry's time wins, wherever the
	// earlier one went.
	entries = append(entries, dir("d0000/").with(func(h *tar.Header) { h.ModTime = testTime.Add(-time.Hour) }))
	layer, st := mustApply(t, entries...)
	if st.peakDirTimes > maxDirTimes {
		t.Errorf("%d directory times were held in memory at once, want at most %d", st.peakDirTimes, maxDirTimes)
	}
	for i := range n {
		want := testTime.Add(time.Duration(i) * time.Second)
		if i == 0 {
			want = testTime.Add(-time.Hour)
		}
		fi, err := os.Lstat(filepath.Join(layer, fmt.Sprintf("d%04d", i)))
		if err != nil {
			t.Fatal(err)
		}
		if !fi.ModTime().Equal(want) {
			t.Errorf("d%04d: mtime %v, want %v", i, fi.ModTime(), want)
		}
	}
}

// BenchmarkApplyManyDirs unpacks a streamed layer of 200,000 directories
// and reports the peak Go heap during Apply, with the directory times held
// in memory up to maxDirTimes (bounded) and all of them (unbounded, as
// before the spill file).
//
//	go test -run '^$' -bench ApplyManyDirs -benchtime 1x ./layercache/unpack
func BenchmarkApplyManyDirs(b *testing.B) {
	requireRoot(b)
	const n = 200_000
	for _, bc := range []struct {
		name  string
		limit int
	}{{"bounded", dirTimesInMemory}, {"unbounded", 1 << 40}} {
		b.Run(bc.name, func(b *testing.B) {
			old := maxDirTimes
			maxDirTimes = bc.limit
			defer func() { maxDirTimes = old }()
			tmp := b.TempDir()
			var most int64
			for i := 0; b.Loop(); i++ {
				layer := filepath.Join(tmp, fmt.Sprint(i))
				must(b, os.Mkdir(layer, 0o755))
				pr, pw := io.Pipe()
				go func() {
					tw := tar.NewWriter(pw)
					for d := range n {
						h := &tar.Header{Typeflag: tar.TypeDir, Name: fmt.Sprintf("data/shard%03d/directory-with-a-longish-name-%07d/", d%100, d),
							Mode: 0o755, ModTime: testTime, Format: tar.FormatPAX}
						if err := tw.WriteHeader(h); err != nil {
							pw.CloseWithError(err)
							return
						}
					}
					pw.CloseWithError(tw.Close())
				}()
				runtime.GC()
				heap := peak.Watch(5*time.Millisecond, func() int64 {
					var ms runtime.MemStats
					runtime.ReadMemStats(&ms)
					return int64(ms.HeapInuse)
				})
				_, err := Apply(context.Background(), layer, pr)
				most = max(most, heap())
				if err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				must(b, os.RemoveAll(layer))
				b.StartTimer()
			}
			b.ReportMetric(float64(most)/(1<<20), "peak-heap-MiB")
		})
	}
}

// TestDeepPathsLinear: creating the implied parents of a deep name costs
// lookups in proportion to its depth, not to its square. A layer whose
// every entry names a new 2,000-deep chain (a 4 KiB name) cost a third of a
// second of CPU per entry when each parent was resolved from the root
// (FuzzApply's executions stalled on such inputs).
func TestDeepPathsLinear(t *testing.T) {
	requireRoot(t)
	const depth, entries = 1000, 3
	var ents []ent
	for i := range entries {
		ents = append(ents, file(fmt.Sprintf("x%d/%sf", i, strings.Repeat("d/", depth)), "x"))
	}
	// And through a symlink that stays inside, which is resolved from the
	// root.
	ents = append(ents, symlink("l", "x0"), file("l/new/"+strings.Repeat("e/", 10)+"f", "y"))
	_, st := mustApply(t, ents...)
	if limit := int64(4 * (depth + 2) * (entries + 1)); st.lookups > limit {
		t.Errorf("%d path components resolved from the root for %d entries %d deep, want at most %d",
			st.lookups, entries, depth, limit)
	}
}
