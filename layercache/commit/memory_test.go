package commit

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/strata-csi/strata/test/peak"
)

// BenchmarkWriteTarBigDirectory commits an upper holding one directory of
// 200,000 empty files and reports the peak Go heap during WriteTar, with
// the directory read in batches (bounded) and whole (unbounded, as before).
//
//	go test -run '^$' -bench WriteTarBigDirectory -benchtime 1x ./layercache/commit
func BenchmarkWriteTarBigDirectory(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Fatal("root is required")
	}
	const n = 200_000
	upper := b.TempDir()
	dir := filepath.Join(upper, "big")
	if err := os.Mkdir(dir, 0o755); err != nil {
		b.Fatal(err)
	}
	for i := range n {
		p := filepath.Join(dir, fmt.Sprintf("a-file-with-a-longish-name-%07d", i))
		if err := unix.Mknod(p, unix.S_IFREG|0o644, 0); err != nil {
			b.Fatal(err)
		}
	}
	for _, bc := range []struct {
		name  string
		limit int
	}{{"bounded", dirNamesInMemory}, {"unbounded", 1 << 40}} {
		b.Run(bc.name, func(b *testing.B) {
			old := maxDirNames
			maxDirNames = bc.limit
			defer func() { maxDirNames = old }()
			var most int64
			for b.Loop() {
				runtime.GC()
				heap := peak.Watch(5*time.Millisecond, func() int64 {
					var ms runtime.MemStats
					runtime.ReadMemStats(&ms)
					return int64(ms.HeapInuse)
				})
				st, err := WriteTar(context.Background(), upper, io.Discard)
				most = max(most, heap())
				if err != nil {
					b.Fatal(err)
				}
				if st.Files != n {
					b.Fatalf("%d files, want %d", st.Files, n)
				}
			}
			b.ReportMetric(float64(most)/(1<<20), "peak-heap-MiB")
		})
	}
}
