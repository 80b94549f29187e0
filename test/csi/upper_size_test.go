package csitest

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"

	"github.com/strata-csi/strata/test/testimage"
)

// The size cap on the writable upper of inline volumes and static
// PersistentVolumes (volume attribute size, plugin flag
// --default-upper-size): a publish that writes more than its cap gets ENOSPC
// in the pod, and the node's filesystem loses no more than the cap.

// pushSmall pushes a one-layer image and returns its reference.
func pushSmall(t *testing.T, repo string) string {
	t.Helper()
	ref := testimage.Registry(t) + "/" + repo + ":v1"
	testimage.Push(t, ref, testimage.Image(t,
		testimage.Layer(t, testimage.Tar(t, testimage.File("hello", "hello\n")), testimage.Gzip)))
	return ref
}

// fillUntilENOSPC writes 1 MiB chunks into path until ENOSPC or max bytes,
// and returns how many bytes it wrote. Any error but ENOSPC fails the test.
func fillUntilENOSPC(t *testing.T, path string, max int64) (int64, bool) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	chunk := make([]byte, 1<<20)
	for i := range chunk {
		chunk[i] = byte(i * 7)
	}
	var written int64
	for written < max {
		n, err := f.Write(chunk)
		written += int64(n)
		if err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("write %s after %d bytes: %v, want ENOSPC", path, written, err)
			}
			return written, true
		}
	}
	if err := f.Sync(); err != nil {
		if errors.Is(err, syscall.ENOSPC) {
			return written, true
		}
		t.Fatalf("fsync %s: %v", path, err)
	}
	return written, false
}

// bytesUsage returns the BYTES usage that NodeGetVolumeStats reports.
func (e *env) bytesUsage(volID, target string) *csi.VolumeUsage {
	e.t.Helper()
	st, err := e.Node.NodeGetVolumeStats(ctx(e.t), &csi.NodeGetVolumeStatsRequest{VolumeId: volID, VolumePath: target})
	if err != nil {
		e.t.Fatalf("NodeGetVolumeStats %s: %v", target, err)
	}
	for _, u := range st.GetUsage() {
		if u.GetUnit() == csi.VolumeUsage_BYTES {
			return u
		}
	}
	e.t.Fatalf("NodeGetVolumeStats %s: %v has no bytes usage", target, st)
	return nil
}

// freeBytes is the space an unprivileged writer has left on the
// filesystem of p.
func freeBytes(t *testing.T, p string) int64 {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(p, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Bavail) * st.Bsize
}

// loopsUnder lists the loop devices whose backing file is below dir.
func loopsUnder(dir string) []string {
	paths, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	var out []string
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			continue // released meanwhile
		}
		if f := strings.TrimSpace(string(b)); strings.HasPrefix(f, dir+"/") {
			out = append(out, filepath.Base(filepath.Dir(filepath.Dir(p)))+"="+f)
		}
	}
	return out
}

// assertNoLoops fails the test when a loop device still holds a file below
// the test's dir. The kernel releases an autoclear loop device with its
// last unmount; a second is plenty.
func (e *env) assertNoLoops() {
	e.t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for {
		ls := loopsUnder(e.dir)
		if len(ls) == 0 {
			return
		}
		if time.Now().After(deadline) {
			e.t.Errorf("loop devices left: %v", ls)
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// assertCapped checks that writing into target stops with ENOSPC at about
// capacity bytes (already holding have bytes), and that NodeGetVolumeStats
// reports a full filesystem of about that capacity.
func (e *env) assertCapped(t *testing.T, volID, target string, capacity, have int64) {
	t.Helper()
	written, full := fillUntilENOSPC(t, filepath.Join(target, "fill"), 4*capacity)
	t.Logf("an upper capped at %d MiB took %.1f MiB more (after %.1f MiB) before ENOSPC", capacity>>20, float64(written)/(1<<20), float64(have)/(1<<20))
	if !full {
		t.Fatalf("wrote %d bytes into an upper capped at %d without ENOSPC", written, capacity)
	}
	if total := written + have; total < capacity-(2<<20) || total > capacity+(2<<20) {
		t.Errorf("wrote %d bytes in all before ENOSPC, want about the cap %d", total, capacity)
	}
	if err := os.WriteFile(filepath.Join(target, "more"), make([]byte, 1<<20), 0o644); !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("write into a full upper: %v, want ENOSPC", err)
	}
	u := e.bytesUsage(volID, target)
	if u.GetTotal() < capacity || u.GetTotal() > capacity+(2<<20) || u.GetUsed() < capacity-(2<<20) || u.GetAvailable() > 1<<20 {
		t.Errorf("NodeGetVolumeStats: bytes %v, want a full filesystem of about %d", u, capacity)
	}
}

// newEnvOnOwnFS starts a node plugin whose state root is a filesystem of
// its own (a 512 MiB tmpfs), so that its free space tells what this plugin
// alone took: the node's disk is shared with other tests.
func newEnvOnOwnFS(t *testing.T) *env {
	t.Helper()
	RequireRoot(t)
	dir := t.TempDir()
	CleanupMounts(t, dir)
	root := filepath.Join(dir, "root")
	if err := os.Mkdir(root, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("strata-test-root", root, "tmpfs", 0, "size=512m,mode=0700"); err != nil {
		t.Fatalf("mount a tmpfs as the state root: %v", err)
	}
	return &env{t: t, dir: dir, root: root, Plugin: startPlugin(t, root)}
}

// assertCleanBut is assertClean with a mount at keep left out ("": none).
func (e *env) assertCleanBut(keep string) {
	e.t.Helper()
	if vs := e.volumeDirs(); len(vs) > 0 {
		e.t.Errorf("volumes left under %s: %v", e.root, vs)
	}
	if rs := e.refFiles(); len(rs) > 0 {
		e.t.Errorf("layer references left: %v", rs)
	}
	ms, err := MountsUnder(e.dir)
	if err != nil {
		e.t.Fatal(err)
	}
	for _, m := range ms {
		if m.MountPoint != keep {
			e.t.Errorf("still mounted: %s (%s)", m.MountPoint, m.FsType)
		}
	}
}

// TestUpperSizeCapsWrites: an inline volume with size 16Mi takes about 16
// MiB of writes, then ENOSPC; the state root's filesystem loses no more
// than the cap; deleting makes room again; unpublish leaves no mount, loop
// device or file.
func TestUpperSizeCapsWrites(t *testing.T) {
	t.Parallel()
	e := newEnvOnOwnFS(t)
	ref := pushSmall(t, "upper/cap")
	const capacity = 16 << 20
	tgt := e.target("cap")
	e.publish(pubReq("cap", tgt, map[string]string{"image": ref, "size": "16Mi"}))
	if got := readString(t, filepath.Join(tgt, "hello")); got != "hello\n" {
		t.Errorf("hello = %q", got)
	}
	if u := e.bytesUsage("cap", tgt); u.GetTotal() < capacity || u.GetTotal() > capacity+(2<<20) || u.GetAvailable() < capacity-(2<<20) {
		t.Errorf("NodeGetVolumeStats of a fresh upper of 16 MiB: bytes %v", u)
	}
	before := freeBytes(t, e.root)
	e.assertCapped(t, "cap", tgt, capacity, 0)
	syscall.Sync()
	// What the upper takes of the state root's filesystem: its image (the
	// cap and at most 1 MiB of ext4 metadata).
	vdir := e.volumeDir(tgt)
	var st unix.Stat_t
	if err := unix.Stat(filepath.Join(vdir, "disk.img"), &st); err != nil {
		t.Fatalf("the upper's filesystem image: %v", err)
	}
	lost := before - freeBytes(t, e.root)
	t.Logf("the upper's image holds %.2f MiB; the state root's filesystem lost %.2f MiB", float64(st.Blocks*512)/(1<<20), float64(lost)/(1<<20))
	if st.Blocks*512 > capacity+(1<<20) {
		t.Errorf("the upper's image holds %d bytes of the node's disk for a cap of %d", st.Blocks*512, capacity)
	}
	if lost > capacity+(1<<20) {
		t.Errorf("the state root's filesystem lost %d bytes to an upper capped at %d", lost, capacity)
	}
	if err := os.Remove(filepath.Join(tgt, "fill")); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(tgt, "more"), "room again\n")

	if err := e.unpublish("cap", tgt); err != nil {
		t.Fatal(err)
	}
	if exists(vdir) || exists(tgt) {
		t.Errorf("after unpublish: volume dir exists %v, target exists %v", exists(vdir), exists(tgt))
	}
	e.assertCleanBut(e.root) // the tmpfs the state root is on
	e.assertNoLoops()
	// Unpublish is idempotent.
	if err := e.unpublish("cap", tgt); err != nil {
		t.Errorf("second unpublish: %v", err)
	}
}

// TestUpperSizeDefault: a volume without size gets --default-upper-size
// (the chart's node.defaultUpperSize); 0 there leaves uppers uncapped, on
// the state root's filesystem.
func TestUpperSizeDefault(t *testing.T) {
	t.Parallel()
	RequireRoot(t)
	dir := t.TempDir()
	CleanupMounts(t, dir)
	root := filepath.Join(dir, "root")
	e := &env{t: t, dir: dir, root: root, Plugin: Start(t, Options{Bin: pluginBin, Root: root, Mode: "node", Args: []string{"--default-upper-size=24Mi"}})}
	ref := pushSmall(t, "upper/default")
	tgt := e.target("default")
	e.publish(pubReq("default", tgt, map[string]string{"image": ref}))
	e.assertCapped(t, "default", tgt, 24<<20, 0)
	// The attribute wins over the default.
	tgt2 := e.target("own")
	e.publish(pubReq("own", tgt2, map[string]string{"image": ref, "size": "8Mi"}))
	e.assertCapped(t, "own", tgt2, 8<<20, 0)
	for id, p := range map[string]string{"default": tgt, "own": tgt2} {
		if err := e.unpublish(id, p); err != nil {
			t.Fatal(err)
		}
	}
	e.assertClean()
	e.assertNoLoops()

	// --default-upper-size=0: no cap, the upper is a directory on the
	// state root's filesystem.
	e.Stop()
	e.opts.Args = []string{"--default-upper-size=0"}
	e.StartAgain()
	tgt3 := e.target("uncapped")
	e.publish(pubReq("uncapped", tgt3, map[string]string{"image": ref}))
	if u, free := e.bytesUsage("uncapped", tgt3), freeBytes(t, root); u.GetAvailable() < free-(64<<20) {
		t.Errorf("NodeGetVolumeStats of an uncapped upper: bytes %v, want the state filesystem's %d available", u, free)
	}
	if ls := loopsUnder(dir); len(ls) != 0 {
		t.Errorf("an uncapped upper uses loop devices %v", ls)
	}
	// A size still caps.
	tgt4 := e.target("capped")
	e.publish(pubReq("capped", tgt4, map[string]string{"image": ref, "size": "8Mi"}))
	e.assertCapped(t, "capped", tgt4, 8<<20, 0)
	for id, p := range map[string]string{"uncapped": tgt3, "capped": tgt4} {
		if err := e.unpublish(id, p); err != nil {
			t.Fatal(err)
		}
	}
	e.assertClean()
	e.assertNoLoops()
}

// TestUpperSizeInvalid: a size that is no quantity, or not positive, is
// InvalidArgument naming the attribute; size on a provisioned volume (a
// StorageClass parameter) or on a clone is refused, since a clone's cap is
// its claim's size; a read-only publish has no upper and ignores size.
func TestUpperSizeInvalid(t *testing.T) {
	t.Parallel()
	e := newAllEnv(t)
	ref := pushSmall(t, "upper/invalid")
	for _, size := range []string{"lots", "-1Gi", "0", "10Zi", ""} {
		tgt := e.target("bad")
		_, err := e.Node.NodePublishVolume(ctx(t), pubReq("bad", tgt, map[string]string{"image": ref, "size": size}))
		wantCode(t, err, codes.InvalidArgument, "volume attribute size", "e.g. 1Gi")
	}
	// Smaller than the smallest filesystem.
	_, err := e.Node.NodePublishVolume(ctx(t), pubReq("bad", e.target("bad"), map[string]string{"image": ref, "size": "100Ki"}))
	wantCode(t, err, codes.InvalidArgument, "volume attribute size", "at least 1Mi")

	// A StorageClass parameter.
	req := createReq("pvc-sized", ref, csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, 16<<20, "test-node")
	req.Parameters["size"] = "1Gi"
	_, err = e.Controller.CreateVolume(ctx(t), req)
	wantCode(t, err, codes.InvalidArgument, "size", "storage")
	req = createReq("pvc-sized-rox", ref, csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY, 0, "")
	req.Parameters["size"] = "1Gi"
	_, err = e.Controller.CreateVolume(ctx(t), req)
	wantCode(t, err, codes.InvalidArgument, "size", "storage")
	// A static PV naming a clone.
	staging := e.stagingPath("sized-clone")
	_, err = e.Node.NodeStageVolume(ctx(t), &csi.NodeStageVolumeRequest{
		VolumeId: "strata-0123456789abcdef0123456789abcdef", StagingTargetPath: staging,
		VolumeCapability: mountCap(csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER),
		VolumeContext:    map[string]string{"image": ref, attrClone: "true", attrCap: "16777216", "size": "1Gi"},
	})
	wantCode(t, err, codes.InvalidArgument, "size", attrCap)

	// Read-only: no upper, nothing to cap.
	tgt := e.target("ro")
	req2 := pubReq("ro", tgt, map[string]string{"image": ref, "size": "8Mi"})
	req2.Readonly = true
	e.publish(req2)
	if ls := loopsUnder(e.dir); len(ls) != 0 {
		t.Errorf("a read-only publish uses loop devices %v", ls)
	}
	if err := os.WriteFile(filepath.Join(tgt, "x"), nil, 0o644); !errors.Is(err, syscall.EROFS) {
		t.Errorf("write into a read-only publish: %v, want EROFS", err)
	}
	if err := e.unpublish("ro", tgt); err != nil {
		t.Fatal(err)
	}
	e.assertClean()
	e.assertNoLoops()
}

// TestUpperSizeSurvivesRestart: a killed plugin comes back with the capped
// volume still working and still capped; a repeated publish keeps the one
// mount; unpublish after the restart leaves nothing.
func TestUpperSizeSurvivesRestart(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ref := pushSmall(t, "upper/restart")
	const capacity = 16 << 20
	tgt := e.target("restart")
	req := pubReq("restart", tgt, map[string]string{"image": ref, "size": "16Mi"})
	e.publish(req)
	if err := os.WriteFile(filepath.Join(tgt, "before"), make([]byte, 4<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	e.Kill9()
	e.StartAgain()
	if got := readString(t, filepath.Join(tgt, "hello")); got != "hello\n" {
		t.Errorf("hello = %q after restart", got)
	}
	if fi, err := os.Stat(filepath.Join(tgt, "before")); err != nil || fi.Size() != 4<<20 {
		t.Errorf("the file written before the restart: %v, %v", fi, err)
	}
	e.publish(req)
	if n := mountCount(t, tgt); n != 1 {
		t.Errorf("%d mounts after a repeated publish following a restart, want 1", n)
	}
	// A repeated publish that asks for another size is not the same request.
	other := pubReq("restart", tgt, map[string]string{"image": ref, "size": "32Mi"})
	_, err := e.Node.NodePublishVolume(ctx(t), other)
	wantCode(t, err, codes.AlreadyExists)
	e.assertCapped(t, "restart", tgt, capacity, 4<<20)
	e.Restart()
	vdir := e.volumeDir(tgt)
	if err := e.unpublish("restart", tgt); err != nil {
		t.Fatal(err)
	}
	if exists(vdir) {
		t.Errorf("volume dir %s left after unpublish", vdir)
	}
	e.assertClean()
	e.assertNoLoops()
}

// TestUpperSizeRecoverReleases: the pod's mount went while the plugin was
// down (or the plugin died half-way through a publish, after the upper's
// filesystem was mounted and before the overlay was): the next start
// unmounts the upper's filesystem, releases its loop device and removes its
// files.
func TestUpperSizeRecoverReleases(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ref := pushSmall(t, "upper/recover")
	tgt := e.target("recover")
	e.publish(pubReq("recover", tgt, map[string]string{"image": ref, "size": "8Mi"}))
	vdir := e.volumeDir(tgt)
	e.Kill9()
	if err := unix.Unmount(tgt, 0); err != nil {
		t.Fatal(err)
	}
	if ms, _ := MountsUnder(vdir); len(ms) == 0 {
		t.Fatalf("no mount of the upper's filesystem under %s while the plugin is down", vdir)
	}
	e.StartAgain()
	if exists(vdir) {
		t.Errorf("volume dir %s left after the restart", vdir)
	}
	e.assertClean()
	e.assertNoLoops()
	if err := e.unpublish("recover", tgt); err != nil {
		t.Errorf("unpublish after the restart released the volume: %v", err)
	}
}

// TestUpperSizeConcurrentPublishes: many capped publishes at once each get
// a loop device of their own (LOOP_CTL_GET_FREE gives concurrent callers
// the same free device), and their unpublishes release them all.
func TestUpperSizeConcurrentPublishes(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ref := pushSmall(t, "upper/concurrent")
	const n = 100
	targets := make([]string, n)
	for i := range targets {
		targets[i] = e.target(fmt.Sprint("c", i))
	}
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i, tgt := range targets {
		wg.Go(func() {
			_, errs[i] = e.Node.NodePublishVolume(ctx(t), pubReq(fmt.Sprint("c", i), tgt, map[string]string{"image": ref, "size": "4Mi"}))
		})
	}
	wg.Wait()
	failed := 0
	for i, err := range errs {
		if err != nil {
			failed++
			t.Errorf("publish %d of %d at once: %v", i, n, err)
		}
	}
	if failed == 0 {
		if ls := loopsUnder(e.dir); len(ls) != n {
			t.Errorf("%d loop devices for %d capped publishes, want one each", len(ls), n)
		}
	}
	for i, tgt := range targets {
		wg.Go(func() { errs[i] = e.unpublish(fmt.Sprint("c", i), tgt) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("unpublish %d: %v", i, err)
		}
	}
	e.assertClean()
	e.assertNoLoops()
}
