package clonefs

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/strata-csi/strata/driver/state"
)

// BenchmarkCreateMount1GiB is one clone's life: Create, Mount, Unmount and
// Remove of a 1 GiB clone. diskBytes is what the image occupies on the
// node's disk right after Create.
func BenchmarkCreateMount1GiB(b *testing.B) {
	requireLoop(b)
	ctx := context.Background()
	base := b.TempDir()
	var disk int64
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		dir := filepath.Join(base, fmt.Sprint(i))
		if err := Create(ctx, dir, 1<<30); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		disk = fileDisk(b, filepath.Join(dir, state.ImageFile))
		b.StartTimer()
		if _, err := Mount(ctx, dir); err != nil {
			b.Fatal(err)
		}
		if err := Unmount(dir); err != nil {
			b.Fatal(err)
		}
		if err := Remove(dir); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Milliseconds())/float64(b.N), "ms/op")
	b.ReportMetric(float64(disk), "diskBytes")
}

// Benchmark100Clones creates and mounts 100 clones of 1 GiB in a row (run it
// with -benchtime=1x), as a node provisioning a burst of PVCs would, and
// reports the total time, the node disk the images take right after, and
// again after a few seconds of ext4's lazy inode-table initialisation.
func Benchmark100Clones(b *testing.B) {
	requireLoop(b)
	ctx := context.Background()
	const n = 100
	for i := 0; i < b.N; i++ {
		base := b.TempDir()
		dirs := make([]string, n)
		for j := range dirs {
			dirs[j] = filepath.Join(base, fmt.Sprint(j))
		}
		b.Cleanup(func() {
			for _, d := range dirs {
				if err := Remove(d); err != nil {
					b.Error(err)
				}
			}
		})
		start := time.Now()
		for _, d := range dirs {
			if err := Create(ctx, d, 1<<30); err != nil {
				b.Fatal(err)
			}
			if _, err := Mount(ctx, d); err != nil {
				b.Fatal(err)
			}
		}
		total := time.Since(start)
		b.StopTimer()
		disk := func() (sum int64) {
			for _, d := range dirs {
				u, err := Stat(d)
				if err != nil {
					b.Fatal(err)
				}
				sum += u.DiskBytes
			}
			return sum
		}
		after := disk()
		time.Sleep(10 * time.Second)
		later := disk()
		b.ReportMetric(float64(total.Milliseconds()), "totalms")
		b.ReportMetric(float64(after), "diskBytes")
		b.ReportMetric(float64(later), "diskBytes10s")
		b.Logf("%d clones of 1 GiB created and mounted in %v (%v each); images take %d KiB on disk, %d KiB 10 s later",
			n, total, total/n, after/1024, later/1024)
		start = time.Now()
		for _, d := range dirs {
			if err := Remove(d); err != nil {
				b.Fatal(err)
			}
		}
		b.Logf("removed in %v", time.Since(start))
		b.StartTimer()
	}
}
