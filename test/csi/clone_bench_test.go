package csitest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
)

// BenchmarkClones measures clone creation time and disk for
// STRATA_BENCH_CLONES (default 100) PVCs of a STRATA_BENCH_IMAGE_MIB
// (default 1024) MiB image, against the real plugin (--mode=all) on a fresh
// root and a loopback registry. One clone is staged first, which pulls the
// image (reported as pull-s); then each clone is what kubelet and the
// provisioner do for a PVC's first pod: CreateVolume (ReadWriteOnce, 1 GiB,
// on the test node), NodeStageVolume, NodePublishVolume at a fresh target.
// Afterwards every clone is unpublished, unstaged and deleted.
//
// One iteration is the whole measurement: run it with -benchtime=1x.
//
//	sudo STRATA_BENCH_IMAGE_MIB=1024 STRATA_BENCH_CLONES=100 \
//	    go test -run '^$' -bench BenchmarkClones -benchtime 1x -timeout 30m ./test/csi/
func BenchmarkClones(b *testing.B) {
	imageMiB := benchMiB(b, "STRATA_BENCH_IMAGE_MIB", 1024)
	clones := benchMiB(b, "STRATA_BENCH_CLONES", 100)
	for range b.N {
		benchClones(b, imageMiB, clones)
	}
}

// benchClone is one PVC of the benchmark.
type benchClone struct {
	vol             *csi.Volume
	staging, target string
	create, total   time.Duration
}

func benchClones(b *testing.B, imageMiB, n int) {
	b.StopTimer()
	e := newAllEnv(b)
	reg := newBlobRegistry(b, 0)
	base := pushBenchBase(b, reg.addr+"/bench/clones:v1", imageMiB)
	reg.reset()
	const capacity = 1 << 30
	long, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()

	// newClone provisions, stages and publishes one clone, as for the first
	// pod of a PVC; the paths kubelet makes beforehand are not timed.
	newClone := func(ctx context.Context, name string) *benchClone {
		c := &benchClone{staging: e.stagingPath(name), target: e.target(name)}
		start := time.Now()
		resp, err := e.Controller.CreateVolume(ctx, createReq(name, base.ref, csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, capacity, "test-node"))
		if err != nil {
			b.Fatalf("CreateVolume %s: %v", name, err)
		}
		c.create, c.vol = time.Since(start), resp.Volume
		rwo := csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER
		if _, err := e.Node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{
			VolumeId: c.vol.VolumeId, StagingTargetPath: c.staging, VolumeCapability: mountCap(rwo), VolumeContext: c.vol.VolumeContext,
		}); err != nil {
			b.Fatalf("NodeStageVolume %s at %s: %v", c.vol.VolumeId, c.staging, err)
		}
		if _, err := e.Node.NodePublishVolume(ctx, clonePub(c.vol, c.staging, c.target, rwo, false)); err != nil {
			b.Fatalf("NodePublishVolume %s at %s: %v", c.vol.VolumeId, c.target, err)
		}
		c.total = time.Since(start)
		return c
	}

	first := newClone(long, "pvc-bench-first")
	for i, d := range base.layers {
		if got := reg.counts()[d.String()]; got != 1 {
			b.Errorf("the first stage downloaded base layer %d (%s) %d times, want once", i, d, got)
		}
	}
	if fi, err := os.Stat(filepath.Join(first.target, base.big[len(base.big)-1])); err != nil || fi.Size() == 0 {
		b.Fatalf("the first clone lacks the image's last file: %v", err)
	}
	reg.reset()

	all := make([]*benchClone, 0, n)
	b.StartTimer()
	start := time.Now()
	for i := range n {
		all = append(all, newClone(long, fmt.Sprintf("pvc-bench-%03d", i)))
	}
	wall := time.Since(start)
	b.StopTimer()

	if got := reg.counts(); len(got) > 0 {
		b.Errorf("the %d clones of a cached image downloaded blobs: %v", n, got)
	}
	last := all[len(all)-1]
	if err := os.WriteFile(filepath.Join(last.target, "written"), []byte("by the last clone\n"), 0o644); err != nil {
		b.Fatalf("write in the last clone: %v", err)
	}
	unix.Sync()
	var cloneDisk int64
	for _, c := range all {
		cloneDisk += diskBytes(b, e.cloneDir(c.vol.VolumeId))
	}
	layerDisk := diskBytes(b, filepath.Join(e.root, "layers"))

	var creates, totals []time.Duration
	for _, c := range all {
		creates = append(creates, c.create)
		totals = append(totals, c.total)
	}
	meanClone, p50, p99, worst := mean(totals), quantile(totals, 0.5), quantile(totals, 0.99), quantile(totals, 1)
	meanCreate := mean(creates)

	// Delete them all: kubelet's unpublish and unstage, then the
	// provisioner's DeleteVolume.
	var deletes []time.Duration
	for _, c := range append(all, first) {
		start := time.Now()
		e.unpublishAndUnstage(c.vol.VolumeId, c.staging, c.target)
		if _, err := e.Controller.DeleteVolume(long, &csi.DeleteVolumeRequest{VolumeId: c.vol.VolumeId}); err != nil {
			b.Fatalf("DeleteVolume %s: %v", c.vol.VolumeId, err)
		}
		deletes = append(deletes, time.Since(start))
	}
	meanDelete := mean(deletes[:n])
	e.assertClean()

	b.ReportMetric(millis(meanClone), "ms/clone")
	b.ReportMetric(millis(p99), "p99-ms/clone")
	b.ReportMetric(millis(worst), "max-ms/clone")
	b.ReportMetric(wall.Seconds(), "total-s")
	b.ReportMetric(millis(meanCreate), "create-ms/clone")
	b.ReportMetric(first.total.Seconds(), "pull-s")
	b.ReportMetric(float64(cloneDisk), "clones-disk-B")
	b.ReportMetric(float64(layerDisk), "layers-disk-B")
	b.ReportMetric(millis(meanDelete), "delete-ms/clone")

	var t strings.Builder
	row := func(what, value string) { fmt.Fprintf(&t, "  %-44s %s\n", what, value) }
	row("image", base.describe())
	row("first clone (pulls the image)", fmt.Sprintf("%.2f s", first.total.Seconds()))
	row(fmt.Sprintf("%d clones, create+stage+publish", n), fmt.Sprintf("%.2f s", wall.Seconds()))
	row("per clone: mean / p50 / p99 / max", fmt.Sprintf("%.1f / %.1f / %.1f / %.1f ms", millis(meanClone), millis(p50), millis(p99), millis(worst)))
	row("  of which CreateVolume (mean)", fmt.Sprintf("%.2f ms", millis(meanCreate)))
	row(fmt.Sprintf("disk of the %d clones (clones/*)", n), fmt.Sprintf("%d bytes (%.2f MiB, %.0f KiB/clone)", cloneDisk, mebi(cloneDisk), float64(cloneDisk)/1024/float64(n)))
	row("disk of the layer cache (layers/)", fmt.Sprintf("%d bytes (%.1f MiB)", layerDisk, mebi(layerDisk)))
	row("unpublish+unstage+DeleteVolume (mean)", fmt.Sprintf("%.1f ms/clone", millis(meanDelete)))
	b.Logf("BenchmarkClones:\n%s", t.String())
}
