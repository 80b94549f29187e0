package csitest

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/strata-csi/strata/test/testimage"
)

// TestRestartKeepsLiveMounts: a SIGKILLed plugin comes back, keeps the
// volumes whose mounts are alive, and still unpublishes them correctly.
func TestRestartKeepsLiveMounts(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	reg := testimage.Registry(t)
	ref := reg + "/restart/img:v1"
	testimage.Push(t, ref, testimage.Image(t,
		testimage.Layer(t, testimage.Tar(t, testimage.File("hello", "hello\n")), testimage.Gzip),
		testimage.Layer(t, testimage.Tar(t, testimage.File("top", "top\n")), testimage.Gzip),
	))
	tgt := e.target("live")
	req := pubReq("live", tgt, map[string]string{"image": ref})
	e.publish(req)
	if err := os.WriteFile(filepath.Join(tgt, "written"), []byte("before the crash\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	refsBefore := e.refFiles()
	if len(refsBefore) != 1 {
		t.Fatalf("refs after publish: %v, want 1", refsBefore)
	}

	e.Kill9()
	// The pod keeps working while the plugin is down.
	if got := readString(t, filepath.Join(tgt, "hello")); got != "hello\n" {
		t.Errorf("hello = %q while the plugin is down", got)
	}
	e.StartAgain()

	if got := readString(t, filepath.Join(tgt, "written")); got != "before the crash\n" {
		t.Errorf("written = %q after restart", got)
	}
	if got := e.refFiles(); len(got) != 1 {
		t.Errorf("refs after restart: %v, want the live volume's", got)
	}
	e.publish(req)
	if n := mountCount(t, tgt); n != 1 {
		t.Errorf("%d mounts after a repeated publish following a restart, want 1", n)
	}
	// A graceful restart keeps it too.
	e.Restart()
	if n := mountCount(t, tgt); n != 1 {
		t.Errorf("%d mounts after a graceful restart, want 1", n)
	}
	vdir := e.volumeDir(tgt)
	if err := e.unpublish("live", tgt); err != nil {
		t.Fatal(err)
	}
	if exists(vdir) || exists(tgt) {
		t.Errorf("after unpublish: volume dir exists %v, target exists %v", exists(vdir), exists(tgt))
	}
	e.assertClean()
}

// TestRestartReleasesVolumesWhosePodWent: the mount went while the plugin
// was down; the next start releases the volume before reporting ready.
func TestRestartReleasesVolumesWhosePodWent(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	reg := testimage.Registry(t)
	ref := reg + "/gone/img:v1"
	testimage.Push(t, ref, testimage.Image(t,
		testimage.Layer(t, testimage.Tar(t, testimage.File("a", "a\n"), testimage.File("d/b", "b\n")), testimage.Gzip),
	))
	gone := e.publishImage("gone", ref)
	kept := e.publishImage("kept", ref)
	// A subPath publish has a second, private overlay mount under the root.
	goneSub := e.target("gonesub")
	e.publish(pubReq("gonesub", goneSub, map[string]string{"image": ref, "subPath": "d"}))
	goneDir, goneSubDir := e.volumeDir(gone), e.volumeDir(goneSub)
	if n := len(e.refFiles()); n != 3 {
		t.Fatalf("%d ref files, want 3", n)
	}

	e.Kill9()
	for _, p := range []string{gone, goneSub} {
		if err := unix.Unmount(p, 0); err != nil {
			t.Fatal(err)
		}
	}
	e.StartAgain() // returns once Probe says ready

	for _, d := range []string{goneDir, goneSubDir} {
		if exists(d) {
			t.Errorf("%s survived the restart", d)
		}
	}
	// The live volume keeps the filesystem of its capped upper.
	keptDir := e.volumeDir(kept)
	ms, _ := MountsUnder(e.root)
	for _, m := range ms {
		if m.MountPoint != filepath.Join(keptDir, "fs") {
			t.Errorf("mount left under the root after restart: %+v", m)
		}
	}
	if n := len(e.refFiles()); n != 1 {
		t.Errorf("%d ref files after restart, want 1 (the live volume's)", n)
	}
	if exists(gone) {
		t.Errorf("target %s of the released volume still exists", gone)
	}
	if got := readString(t, filepath.Join(kept, "a")); got != "a\n" {
		t.Errorf("kept volume reads %q", got)
	}
	// Health of the live one is fine; unpublish of the released one is
	// still success.
	for id, p := range map[string]string{"gone": gone, "gonesub": goneSub} {
		if err := e.unpublish(id, p); err != nil {
			t.Errorf("unpublish of a released volume: %v", err)
		}
	}
	if err := e.unpublish("kept", kept); err != nil {
		t.Fatal(err)
	}
	e.assertClean()
}

// TestRepublishAfterMountWentAway: kubelet publishes again at a target whose
// mount vanished; the plugin starts over instead of claiming success.
func TestRepublishAfterMountWentAway(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	reg := testimage.Registry(t)
	ref := reg + "/again/img:v1"
	testimage.Push(t, ref, testimage.Image(t,
		testimage.Layer(t, testimage.Tar(t, testimage.File("a", "a\n")), testimage.Gzip),
	))
	tgt := e.target("again")
	req := pubReq("again", tgt, map[string]string{"image": ref})
	e.publish(req)
	if err := unix.Unmount(tgt, 0); err != nil {
		t.Fatal(err)
	}
	e.publish(req)
	if n := mountCount(t, tgt); n != 1 {
		t.Errorf("%d mounts, want 1", n)
	}
	if got := readString(t, filepath.Join(tgt, "a")); got != "a\n" {
		t.Errorf("a = %q", got)
	}
	if err := e.unpublish("again", tgt); err != nil {
		t.Fatal(err)
	}
	e.assertClean()
}

// TestConcurrentPublishesDownloadOnce: 16 pods of one uncached image start
// at once; every publish succeeds and every layer blob is fetched once.
func TestConcurrentPublishesDownloadOnce(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	blobs := newBlobRegistry(t, 0)
	reg := blobs.addr
	ref := reg + "/conc/img:v1"
	var body strings.Builder
	for range 64 << 10 {
		body.WriteString("0123456789abcdef")
	}
	img := testimage.Image(t,
		testimage.Layer(t, testimage.Tar(t, testimage.File("big1", body.String())), testimage.Gzip),
		testimage.Layer(t, testimage.Tar(t, testimage.File("big2", body.String()+"2")), testimage.Gzip),
		testimage.Layer(t, testimage.Tar(t, testimage.File("small", "s")), testimage.Zstd),
	)
	testimage.Push(t, ref, img)
	blobs.reset()

	const n = 16
	targets := make([]string, n)
	for i := range n {
		targets[i] = e.target(fmt.Sprintf("c%02d", i))
	}
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			_, errs[i] = e.Node.NodePublishVolume(ctx(t), pubReq(fmt.Sprintf("c%02d", i), targets[i], map[string]string{"image": ref}))
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("publish %d: %v", i, err)
			continue
		}
		if got := readString(t, filepath.Join(targets[i], "small")); got != "s" {
			t.Errorf("volume %d: small = %q", i, got)
		}
		if n := mountCount(t, targets[i]); n != 1 {
			t.Errorf("volume %d: %d mounts", i, n)
		}
	}
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	gets := blobs.counts()
	for _, l := range layers {
		d, err := l.Digest()
		if err != nil {
			t.Fatal(err)
		}
		if c := gets[d.String()]; c != 1 {
			t.Errorf("layer blob %s fetched %d times, want 1", d, c)
		}
	}
	cfg, _ := img.ConfigName()
	t.Logf("blob GETs: %v (config %s: %d)", gets, cfg, gets[cfg.String()])
	if refs := e.refFiles(); len(refs) != n {
		t.Errorf("%d ref files, want %d", len(refs), n)
	}
	for i := range n {
		if err := e.unpublish(fmt.Sprintf("c%02d", i), targets[i]); err != nil {
			t.Error(err)
		}
	}
	e.assertClean()
}

// TestVolumeStatsAndHealth: stats count the volume's own writes; health
// reports a mount that went away.
func TestVolumeStatsAndHealth(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	reg := testimage.Registry(t)
	ref := reg + "/stats/img:v1"
	testimage.Push(t, ref, testimage.Image(t,
		testimage.Layer(t, testimage.Tar(t, testimage.File("a", "a\n")), testimage.Gzip),
	))
	caps, err := e.Node.NodeGetCapabilities(ctx(t), &csi.NodeGetCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	have := map[csi.NodeServiceCapability_RPC_Type]bool{}
	for _, c := range caps.GetCapabilities() {
		have[c.GetRpc().GetType()] = true
	}
	if !have[csi.NodeServiceCapability_RPC_GET_VOLUME_STATS] || !have[csi.NodeServiceCapability_RPC_GET_VOLUME_HEALTH] {
		t.Fatalf("capabilities %v lack GET_VOLUME_STATS or GET_VOLUME_HEALTH", caps)
	}

	tgt := e.publishImage("stats", ref)
	f, err := os.Create(filepath.Join(tgt, "mib"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(make([]byte, 1<<20)); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	st, err := e.Node.NodeGetVolumeStats(ctx(t), &csi.NodeGetVolumeStatsRequest{VolumeId: "stats", VolumePath: tgt})
	if err != nil {
		t.Fatal(err)
	}
	var bytes, inodes *csi.VolumeUsage
	for _, u := range st.GetUsage() {
		switch u.GetUnit() {
		case csi.VolumeUsage_BYTES:
			bytes = u
		case csi.VolumeUsage_INODES:
			inodes = u
		}
	}
	if bytes == nil || bytes.GetUsed() < 1<<20 {
		t.Errorf("bytes usage %v; want used >= 1 MiB", bytes)
	}
	if bytes != nil && (bytes.GetAvailable() <= 0 || bytes.GetTotal() < bytes.GetUsed()+bytes.GetAvailable()) {
		t.Errorf("bytes usage %v inconsistent", bytes)
	}
	if inodes == nil || inodes.GetUsed() < 1 {
		t.Errorf("inode usage %v; want >= 1", inodes)
	}
	_, err = e.Node.NodeGetVolumeStats(ctx(t), &csi.NodeGetVolumeStatsRequest{VolumeId: "other", VolumePath: tgt})
	wantCode(t, err, codes.NotFound)

	h, err := e.Node.NodeGetVolumeHealth(ctx(t), &csi.NodeGetVolumeHealthRequest{VolumeId: "stats", VolumePublishPath: tgt})
	if err != nil {
		t.Fatal(err)
	}
	if h.GetVolumeHealth().GetVolumeId() != "stats" || len(h.GetVolumeHealth().GetHealthStatuses()) != 0 {
		t.Errorf("health of a mounted volume: %v; want no status", h)
	}
	if err := unix.Unmount(tgt, 0); err != nil {
		t.Fatal(err)
	}
	h, err = e.Node.NodeGetVolumeHealth(ctx(t), &csi.NodeGetVolumeHealthRequest{VolumeId: "stats", VolumePublishPath: tgt})
	if err != nil {
		t.Fatal(err)
	}
	ss := h.GetVolumeHealth().GetHealthStatuses()
	if len(ss) != 1 || ss[0].GetStatus() != csi.VolumeHealthErrorType_INACCESSIBLE || ss[0].GetReason() == "" {
		t.Errorf("health after the mount went: %v; want one INACCESSIBLE with a reason", h)
	}
	if err := e.unpublish("stats", tgt); err != nil {
		t.Fatal(err)
	}
	e.assertClean()
}

// TestVolumeHealthWithoutPublishPath: volume_publish_path is OPTIONAL in
// NodeGetVolumeHealthRequest (csi-sanity calls it with only the volume id).
func TestVolumeHealthWithoutPublishPath(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	reg := testimage.Registry(t)
	ref := reg + "/health/img:v1"
	testimage.Push(t, ref, testimage.Image(t,
		testimage.Layer(t, testimage.Tar(t, testimage.File("a", "a\n")), testimage.Gzip),
	))
	tgt := e.publishImage("health", ref)
	h, err := e.Node.NodeGetVolumeHealth(ctx(t), &csi.NodeGetVolumeHealthRequest{VolumeId: "health"})
	if err != nil {
		t.Errorf("NodeGetVolumeHealth without a publish path: %v", err)
	} else if h.GetVolumeHealth().GetVolumeId() != "health" {
		t.Errorf("health: %v", h)
	}
	if err := e.unpublish("health", tgt); err != nil {
		t.Fatal(err)
	}
	e.assertClean()
}

// TestPullAlwaysKeepsExistingMount: a repeated publish with pullPolicy
// Always keeps the mount even when the tag moved; a new publish gets the new
// digest.
func TestPullAlwaysKeepsExistingMount(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	reg := testimage.Registry(t)
	ref := reg + "/always/img:latest"
	push := func(body string) {
		testimage.Push(t, ref, testimage.Image(t,
			testimage.Layer(t, testimage.Tar(t, testimage.File("version", body)), testimage.Gzip)))
	}
	push("one")
	attrs := map[string]string{"image": ref, "pullPolicy": "Always"}
	tgt := e.target("always")
	e.publish(pubReq("always", tgt, attrs))
	push("two")
	e.publish(pubReq("always", tgt, attrs))
	if n := mountCount(t, tgt); n != 1 {
		t.Errorf("%d mounts after a repeated publish, want 1", n)
	}
	if got := readString(t, filepath.Join(tgt, "version")); got != "one" {
		t.Errorf("existing volume reads %q; want the digest it was published with", got)
	}
	tgt2 := e.target("always2")
	e.publish(pubReq("always2", tgt2, attrs))
	if got := readString(t, filepath.Join(tgt2, "version")); got != "two" {
		t.Errorf("new publish reads %q; want the tag's new digest", got)
	}
	for id, p := range map[string]string{"always": tgt, "always2": tgt2} {
		if err := e.unpublish(id, p); err != nil {
			t.Fatal(err)
		}
	}
	e.assertClean()
}

// TestConcurrentCallsOnOneVolume: kubelet retries while a publish runs;
// the calls never stack two mounts at the target.
func TestConcurrentCallsOnOneVolume(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	reg := testimage.Registry(t)
	ref := reg + "/same/img:v1"
	testimage.Push(t, ref, testimage.Image(t,
		testimage.Layer(t, testimage.Tar(t, testimage.File("a", strings.Repeat("a", 1<<20))), testimage.Gzip)))
	tgt := e.target("same")
	req := pubReq("same", tgt, map[string]string{"image": ref})
	const n = 8
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { _, errs[i] = e.Node.NodePublishVolume(ctx(t), req) })
	}
	wg.Wait()
	ok := 0
	for _, err := range errs {
		switch {
		case err == nil:
			ok++
		case codes.Aborted == statusCode(err):
		default:
			t.Errorf("concurrent publish: %v; want success or Aborted", err)
		}
	}
	if ok == 0 {
		t.Error("no concurrent publish succeeded")
	}
	e.publish(req) // kubelet's retry after an Aborted
	if c := mountCount(t, tgt); c != 1 {
		t.Errorf("%d mounts at the target, want 1", c)
	}
	if err := e.unpublish("same", tgt); err != nil {
		t.Fatal(err)
	}
	e.assertClean()
}

// TestTooDeepImage: 501 layers are refused before anything is fetched.
func TestTooDeepImage(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	reg := testimage.Registry(t)
	ref := reg + "/toodeep/img:v1"
	const n = 501
	layers := make([]v1.Layer, 0, n)
	for i := range n {
		layers = append(layers, testimage.Layer(t, testimage.Tar(t, testimage.File("f", strconv.Itoa(i))), testimage.Gzip))
	}
	testimage.Push(t, ref, testimage.Image(t, layers...))
	tgt := e.target("toodeep")
	_, err := e.Node.NodePublishVolume(ctx(t), pubReq("toodeep", tgt, map[string]string{"image": ref}))
	wantCode(t, err, codes.InvalidArgument, "501", "500")
	if got, _ := filepath.Glob(filepath.Join(e.root, "layers", "sha256", "*")); len(got) != 0 {
		t.Errorf("%d layers cached for an image that cannot be mounted", len(got))
	}
	e.assertClean()
}

func statusCode(err error) codes.Code {
	if s, ok := status.FromError(err); ok {
		return s.Code()
	}
	return codes.Unknown
}
