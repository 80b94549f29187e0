package clonefs

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// BenchmarkCopy1GiB copies a mounted 1 GiB clone holding 200 MB of files,
// as the first stage of a clone of its claim does: to the same size, and
// to 10 GiB (grown offline). "cold" first drops the source image's pages
// from the page cache (fadvise DONTNEED on that file only), as for a clone
// written long ago. MB/s counts the data copied (the image's allocated
// extents: the 200 MB, ext4's metadata and the journal's written part);
// frozenms is how long the source's writers were blocked.
func BenchmarkCopy1GiB(b *testing.B) {
	src := newDir(b)
	mnt := createMount(b, src, 1<<30)
	buf := make([]byte, 1<<20)
	for i := 0; i < 200; i++ {
		if _, err := rand.Read(buf); err != nil {
			b.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(mnt, fmt.Sprintf("f%03d", i)), buf, 0o644); err != nil {
			b.Fatal(err)
		}
	}
	unix.Sync()
	for _, bc := range []struct {
		name string
		size int64
		cold bool
	}{{"1GiB/warm", 1 << 30, false}, {"1GiB/cold", 1 << 30, true}, {"10GiB/cold", 10 << 30, true}} {
		b.Run(bc.name, func(b *testing.B) {
			var bytes, frozen, ns int64
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				dst := newDir(b)
				if bc.cold {
					f, err := os.Open(imagePath(src))
					if err != nil {
						b.Fatal(err)
					}
					if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
						b.Fatal(err)
					}
					f.Close()
				}
				b.StartTimer()
				stats, err := Copy(context.Background(), src, dst, bc.size)
				if err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				bytes, frozen, ns = bytes+stats.Bytes, frozen+stats.Frozen.Milliseconds(), ns+stats.Duration.Nanoseconds()
				if err := Remove(dst); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
			b.ReportMetric(float64(bytes)/1e6/(float64(ns)/1e9), "MB/s")
			b.ReportMetric(float64(bytes)/float64(b.N)/1e6, "MBcopied")
			b.ReportMetric(float64(frozen)/float64(b.N), "frozenms")
		})
	}
}
