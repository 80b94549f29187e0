package csitest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
)

// BenchmarkCommit measures commit time and uploaded bytes for a
// STRATA_BENCH_CHANGE_MIB (default 100) MiB change over a
// STRATA_BENCH_IMAGE_MIB (default 1024) MiB base: an inline volume of the
// base image is published on the real plugin, a pod's writes are made in
// it (new random files, a few base files modified and deleted), and
// `strata commit` pushes it to a new tag on the same loopback registry, as
// on the node. The registry counts what it receives and serves: the upload
// must stay under twice the change, and no base layer may be uploaded or
// downloaded again.
//
// One iteration is the whole measurement: run it with -benchtime=1x.
//
//	sudo STRATA_BENCH_IMAGE_MIB=1024 STRATA_BENCH_CHANGE_MIB=100 \
//	    go test -run '^$' -bench BenchmarkCommit -benchtime 1x -timeout 30m ./test/csi/
func BenchmarkCommit(b *testing.B) {
	imageMiB := benchMiB(b, "STRATA_BENCH_IMAGE_MIB", 1024)
	changeMiB := benchMiB(b, "STRATA_BENCH_CHANGE_MIB", 100)
	for range b.N {
		benchCommit(b, imageMiB, changeMiB)
	}
}

// layerLine is the CLI's line about the layer it built.
var layerLine = regexp.MustCompile(`(?m)^layer (sha256:[0-9a-f]{64}) ([0-9]+) bytes: ([0-9]+) files \(([0-9]+) bytes\)`)

func benchCommit(b *testing.B, imageMiB, changeMiB int) {
	b.StopTimer()
	e := newEnv(b)
	reg := newBlobRegistry(b, 0)
	base := pushBenchBase(b, reg.addr+"/bench/commit-base:v1", imageMiB)
	long, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()

	tgt := e.target("commit")
	start := time.Now()
	if _, err := e.Node.NodePublishVolume(long, pubReq("vol-commit", tgt, podAttrs(base.ref, "lab", "trainer-0"))); err != nil {
		b.Fatalf("NodePublishVolume of %s: %v", base.ref, err)
	}
	pull := time.Since(start)

	// The pod's writes: new files of random data, a few small base files
	// modified, one deleted, and two of the large ones deleted.
	change := int64(changeMiB) << 20
	buf := make([]byte, benchFileMiB<<20)
	var newFiles []string
	for i, left := 0, change; left > 0; i++ {
		body := buf[:min(left, int64(len(buf)))]
		randomFill(chacha("strata-bench-change", i), body)
		p := fmt.Sprintf("results/out-%04d.bin", i)
		if err := os.MkdirAll(filepath.Join(tgt, "results"), 0o755); err != nil {
			b.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(tgt, p), body, 0o644); err != nil {
			b.Fatalf("write %s in the volume: %v", p, err)
		}
		newFiles = append(newFiles, p)
		left -= int64(len(body))
	}
	modified := base.small[:3]
	for _, p := range modified {
		if err := os.WriteFile(filepath.Join(tgt, p), []byte("setting = changed by the pod\n"), 0o644); err != nil {
			b.Fatalf("modify %s: %v", p, err)
		}
	}
	deleted := []string{base.small[len(base.small)-1], base.big[0], base.big[len(base.big)/2]}
	for _, p := range deleted {
		if err := os.Remove(filepath.Join(tgt, p)); err != nil {
			b.Fatalf("delete %s: %v", p, err)
		}
	}
	unix.Sync() // the commit's time is reading and pushing, not the pod's writeback

	reg.reset()
	b.StartTimer()
	start = time.Now()
	out, err := e.commitCLI("lab/trainer-0", reg.addr+"/bench/commit-out:v1")
	took := time.Since(start)
	b.StopTimer()
	if err != nil {
		b.Fatal(err)
	}
	lm, pm := layerLine.FindStringSubmatch(out), uploadedLine.FindStringSubmatch(out)
	if lm == nil || pm == nil {
		b.Fatalf("no 'layer ...' or 'pushed ... uploaded N bytes' line in the output of strata commit:\n%s", out)
	}
	layerBytes, _ := strconv.ParseInt(lm[2], 10, 64)
	sent, _ := strconv.ParseInt(pm[3], 10, 64)
	recv := reg.received()
	for i, d := range base.layers {
		if got := reg.counts()[d.String()]; got > 0 {
			b.Errorf("the commit downloaded base layer %d (%s) %d times", i, d, got)
		}
	}
	if recv < change || recv >= 2*change {
		b.Errorf("the registry received %d bytes for a change of %d: want at least the change and under twice it", recv, change)
	}
	// Even a change as big as a base layer leaves no room for one in the
	// upload: a re-uploaded base layer would show here.
	smallest := base.layerBytes[0]
	for _, n := range base.layerBytes {
		smallest = min(smallest, n)
	}
	if recv >= layerBytes+smallest {
		b.Errorf("the registry received %d bytes, the new layer is %d: a base layer of %d bytes or more was uploaded again", recv, layerBytes, smallest)
	}
	if sent != recv {
		b.Errorf("the CLI reports %d bytes uploaded, the registry received %d", sent, recv)
	}

	// The committed image has the pod's writes over the base.
	reg.reset()
	dst := e.target("committed")
	if _, err := e.Node.NodePublishVolume(long, pubReq("vol-committed", dst, map[string]string{"image": pm[1] + "@" + pm[2]})); err != nil {
		b.Fatalf("NodePublishVolume of the committed image: %v", err)
	}
	for _, d := range base.layers {
		if got := reg.counts()[d.String()]; got > 0 {
			b.Errorf("publishing the committed image downloaded base layer %s again", d)
		}
	}
	if fi, err := os.Stat(filepath.Join(dst, newFiles[len(newFiles)-1])); err != nil || fi.Size() == 0 {
		b.Errorf("the committed image lacks the volume's new file %s: %v", newFiles[len(newFiles)-1], err)
	}
	if got := readString(b, filepath.Join(dst, modified[0])); !strings.Contains(got, "changed by the pod") {
		b.Errorf("%s in the committed image: %q, want the pod's change", modified[0], got)
	}
	for _, p := range deleted {
		if exists(filepath.Join(dst, p)) {
			b.Errorf("%s was deleted in the volume but is in the committed image", p)
		}
	}
	for _, v := range []struct{ id, target string }{{"vol-committed", dst}, {"vol-commit", tgt}} {
		if _, err := e.Node.NodeUnpublishVolume(long, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target}); err != nil {
			b.Errorf("NodeUnpublishVolume %s: %v", v.target, err)
		}
	}

	b.ReportMetric(took.Seconds(), "commit-s")
	b.ReportMetric(float64(recv), "uploaded-B")
	b.ReportMetric(float64(layerBytes), "layer-B")
	b.ReportMetric(float64(change), "change-B")
	b.ReportMetric(float64(recv)/float64(change), "uploaded/change")

	var t strings.Builder
	row := func(what, value string) { fmt.Fprintf(&t, "  %-42s %s\n", what, value) }
	row("base image", base.describe())
	row("first publish (pulls the image)", fmt.Sprintf("%.2f s", pull.Seconds()))
	row("change", fmt.Sprintf("%d new files, %d bytes (%.1f MiB); %d base files modified, %d deleted",
		len(newFiles), change, mebi(change), len(modified), len(deleted)))
	row("strata commit", fmt.Sprintf("%.2f s (%.1f MiB/s of change)", took.Seconds(), mebi(change)/took.Seconds()))
	row("layer", fmt.Sprintf("%s, %d bytes (%.1f MiB), %s files", lm[1], layerBytes, mebi(layerBytes), lm[3]))
	row("uploaded (registry received)", fmt.Sprintf("%d bytes (%.1f MiB, %.3fx the change)", recv, mebi(recv), float64(recv)/float64(change)))
	again := "none"
	if b.Failed() {
		again = "see the errors above"
	}
	row("base layers downloaded or uploaded again", again)
	b.Logf("BenchmarkCommit:\n%s", t.String())
}
