package driver

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/engine"
	"github.com/strata-csi/strata/driver/mount"
	"github.com/strata-csi/strata/layercache"
	"github.com/strata-csi/strata/test/testimage"
)

// benchDriver pushes an image of n one-file layers, opens a node driver on a
// state root on disk and pulls the image, so that publishes find every layer
// cached.
func benchDriver(b *testing.B, n int) (*Driver, string) {
	b.Helper()
	return benchDriverUpper(b, n, 0)
}

// benchDriverUpper is benchDriver with the default cap on writable uppers
// (0: none, the upper is a directory on the state root's disk).
func benchDriverUpper(b *testing.B, n int, upperSize int64) (*Driver, string) {
	b.Helper()
	if os.Geteuid() != 0 {
		b.Fatal("the publish benchmarks need root: they mount overlays")
	}
	var layers []v1.Layer
	for i := range n {
		layers = append(layers, testimage.Layer(b, testimage.Tar(b, testimage.File(fmt.Sprintf("f%d", i), "x"), testimage.File("top", fmt.Sprint(i))), testimage.Gzip))
	}
	ref := testimage.Registry(b) + "/bench:v1"
	testimage.Push(b, ref, testimage.Image(b, layers...))
	root, err := os.MkdirTemp("/var/tmp", "strata-bench-")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(root) })
	d, err := New(Config{Mode: ModeNode, NodeID: "bench", Root: root, DefaultUpperSize: upperSize})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { d.Close() })
	if err := d.Recover(); err != nil {
		b.Fatal(err)
	}
	if _, err := d.store.Pull(context.Background(), ref, layercache.PullOptions{}); err != nil {
		b.Fatal(err)
	}
	return d, ref
}

func publishRequest(id, target, ref string) *csi.NodePublishVolumeRequest {
	return &csi.NodePublishVolumeRequest{
		VolumeId: id, TargetPath: target, VolumeContext: map[string]string{"image": ref},
		VolumeCapability: &csi.VolumeCapability{
			AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
		},
	}
}

// reportLatency adds p50 and p99 of ds to the benchmark's output.
func reportLatency(b *testing.B, name string, ds []time.Duration) {
	if len(ds) == 0 {
		return
	}
	slices.Sort(ds)
	b.ReportMetric(float64(ds[len(ds)/2].Microseconds()), name+"-p50-µs")
	b.ReportMetric(float64(ds[len(ds)*99/100].Microseconds()), name+"-p99-µs")
}

// BenchmarkPublish measures NodePublishVolume and NodeUnpublishVolume of a
// cached image (the driver's own work, without gRPC), and beside it the
// floor: a bare overlay mount and unmount of the same layers with an upper
// on the same disk. upper=10Gi publishes with the default cap: the upper in
// a filesystem of its own on a loop device.
func BenchmarkPublish(b *testing.B) {
	for _, n := range []int{8, 100} {
		for _, upper := range []int64{0, engine.DefaultUpperSize} {
			name := fmt.Sprintf("layers=%d", n)
			if upper > 0 {
				name += fmt.Sprintf(",upper=%dGi", upper>>30)
			}
			b.Run(name, func(b *testing.B) { benchPublish(b, n, upper) })
		}
	}
}

func benchPublish(b *testing.B, n int, upper int64) {
	d, ref := benchDriverUpper(b, n, upper)
	pods := b.TempDir()
	var pub, unpub []time.Duration
	i := 0
	for b.Loop() {
		i++
		target := filepath.Join(pods, fmt.Sprint(i))
		t0 := time.Now()
		if _, err := d.NodePublishVolume(context.Background(), publishRequest(fmt.Sprint("vol-", i), target, ref)); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if _, err := d.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: fmt.Sprint("vol-", i), TargetPath: target}); err != nil {
			b.Fatal(err)
		}
		pub, unpub = append(pub, t1.Sub(t0)), append(unpub, time.Since(t1))
	}
	reportLatency(b, "publish", pub)
	reportLatency(b, "unpublish", unpub)
}

// BenchmarkMountFloor is the kernel's cost for what a publish mounts: the
// same layer dirs, an upper and work dir on the state root's disk.
func BenchmarkMountFloor(b *testing.B) {
	for _, n := range []int{8, 100} {
		b.Run(fmt.Sprintf("layers=%d", n), func(b *testing.B) {
			d, ref := benchDriver(b, n)
			img, err := d.store.Resolve(context.Background(), ref, layercache.PullOptions{})
			if err != nil {
				b.Fatal(err)
			}
			var lowers []string
			for i := len(img.Layers) - 1; i >= 0; i-- {
				l, _ := d.store.LayerDir(img.Layers[i].DiffID)
				lowers = append(lowers, l)
			}
			scratch := filepath.Join(d.cfg.Root, "floor")
			var ms []time.Duration
			for b.Loop() {
				for _, p := range []string{"u", "w", "m"} {
					if err := os.MkdirAll(filepath.Join(scratch, p), 0o755); err != nil {
						b.Fatal(err)
					}
				}
				t0 := time.Now()
				o := mount.Overlay{Lowers: lowers, Upper: filepath.Join(scratch, "u"), Work: filepath.Join(scratch, "w")}
				if err := mount.MountOverlay(o, filepath.Join(scratch, "m")); err != nil {
					b.Fatal(err)
				}
				ms = append(ms, time.Since(t0))
				if err := mount.Unmount(filepath.Join(scratch, "m")); err != nil {
					b.Fatal(err)
				}
				os.RemoveAll(scratch)
			}
			reportLatency(b, "mount", ms)
		})
	}
}

// BenchmarkParallelPublish publishes 100 volumes of one cached image at
// once and reports the wall time of the batch, with uncapped uppers and
// with the default cap.
func BenchmarkParallelPublish(b *testing.B) {
	b.Run("upper=none", func(b *testing.B) { benchParallelPublish(b, 0) })
	b.Run(fmt.Sprintf("upper=%dGi", engine.DefaultUpperSize>>30), func(b *testing.B) { benchParallelPublish(b, engine.DefaultUpperSize) })
}

func benchParallelPublish(b *testing.B, upper int64) {
	d, ref := benchDriverUpper(b, 8, upper)
	pods := b.TempDir()
	round := 0
	for b.Loop() {
		round++
		var wg sync.WaitGroup
		errs := make(chan error, 100)
		t0 := time.Now()
		for i := range 100 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				target := filepath.Join(pods, fmt.Sprintf("%d-%d", round, i))
				_, err := d.NodePublishVolume(context.Background(), publishRequest(fmt.Sprintf("vol-%d-%d", round, i), target, ref))
				errs <- err
			}()
		}
		wg.Wait()
		b.ReportMetric(float64(time.Since(t0).Milliseconds()), "ms/100-publishes")
		close(errs)
		for err := range errs {
			if err != nil {
				b.Fatal(err)
			}
		}
		b.StopTimer()
		for i := range 100 {
			target := filepath.Join(pods, fmt.Sprintf("%d-%d", round, i))
			if _, err := d.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: fmt.Sprintf("vol-%d-%d", round, i), TargetPath: target}); err != nil {
				b.Fatal(err)
			}
		}
		b.StartTimer()
	}
}

func init() {
	// A publish logs a line; thousands of them would bury the results.
	klog.LogToStderr(false)
	klog.SetOutput(io.Discard)
}
