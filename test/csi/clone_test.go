package csitest

import (
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"

	"github.com/strata-csi/strata/test/testimage"
)

// The persistent clones of a PVC provisioned through a StorageClass: the
// controller's CreateVolume, the node's stage, publish, unstage and the
// deletion, driven over gRPC against the real plugin, with real mounts and
// a real loopback registry.

const (
	topologyKey = "topology.strata.csi.dev/node"
	attrClone   = "strata.csi.dev/clone"
	attrCap     = "strata.csi.dev/capacity"
)

// newAllEnv starts `strata-csi --mode=all` (controller and node on one
// socket, as on a single machine) on a fresh root.
func newAllEnv(t testing.TB) *env {
	t.Helper()
	RequireRoot(t)
	dir := t.TempDir()
	CleanupMounts(t, dir)
	root := filepath.Join(dir, "root")
	return &env{t: t, dir: dir, root: root, Plugin: Start(t, Options{Bin: pluginBin, Root: root, Mode: "all"})}
}

// createReq is CreateVolume as the provisioner sends it for a PVC of the
// access mode, on node (no requirement if node is "").
func createReq(name, image string, mode csi.VolumeCapability_AccessMode_Mode, size int64, node string) *csi.CreateVolumeRequest {
	req := &csi.CreateVolumeRequest{
		Name:               name,
		Parameters:         map[string]string{"image": image, "csi.storage.k8s.io/pvc/name": name, "csi.storage.k8s.io/pvc/namespace": "lab"},
		VolumeCapabilities: []*csi.VolumeCapability{mountCap(mode)},
		CapacityRange:      &csi.CapacityRange{RequiredBytes: size},
	}
	if node != "" {
		top := &csi.Topology{Segments: map[string]string{topologyKey: node}}
		req.AccessibilityRequirements = &csi.TopologyRequirement{Requisite: []*csi.Topology{top}, Preferred: []*csi.Topology{top}}
	}
	return req
}

// createClone provisions a ReadWriteOnce clone of image on the test node.
func (e *env) createClone(name, image string, size int64) *csi.Volume {
	e.t.Helper()
	resp, err := e.Controller.CreateVolume(ctx(e.t), createReq(name, image, csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, size, "test-node"))
	if err != nil {
		e.t.Fatalf("CreateVolume %s: %v", name, err)
	}
	return resp.Volume
}

// stagingPath returns a fresh staging path (kubelet's globalmount) whose
// parent exists.
func (e *env) stagingPath(name string) string {
	e.t.Helper()
	parent := filepath.Join(e.dir, "plugins", "pv", name)
	if err := os.MkdirAll(parent, 0o750); err != nil {
		e.t.Fatal(err)
	}
	return filepath.Join(parent, "globalmount")
}

func (e *env) stage(vol *csi.Volume, staging string, mode csi.VolumeCapability_AccessMode_Mode) error {
	_, err := e.Node.NodeStageVolume(ctx(e.t), &csi.NodeStageVolumeRequest{
		VolumeId: vol.VolumeId, StagingTargetPath: staging, VolumeCapability: mountCap(mode), VolumeContext: vol.VolumeContext,
	})
	return err
}

func (e *env) mustStage(vol *csi.Volume, staging string) {
	e.t.Helper()
	if err := e.stage(vol, staging, csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER); err != nil {
		e.t.Fatalf("NodeStageVolume %s at %s: %v", vol.VolumeId, staging, err)
	}
}

func (e *env) unstage(volID, staging string) error {
	_, err := e.Node.NodeUnstageVolume(ctx(e.t), &csi.NodeUnstageVolumeRequest{VolumeId: volID, StagingTargetPath: staging})
	return err
}

func (e *env) mustUnstage(volID, staging string) {
	e.t.Helper()
	if err := e.unstage(volID, staging); err != nil {
		e.t.Fatalf("NodeUnstageVolume %s at %s: %v", volID, staging, err)
	}
}

// clonePub is NodePublishVolume of a staged volume, as kubelet sends it
// for a pod of a PVC.
func clonePub(vol *csi.Volume, staging, target string, mode csi.VolumeCapability_AccessMode_Mode, readOnly bool) *csi.NodePublishVolumeRequest {
	vctx := map[string]string{}
	for k, v := range vol.VolumeContext {
		vctx[k] = v
	}
	vctx["csi.storage.k8s.io/pod.name"] = "trainer-0"
	vctx["csi.storage.k8s.io/pod.namespace"] = "lab"
	vctx["csi.storage.k8s.io/ephemeral"] = "false"
	return &csi.NodePublishVolumeRequest{
		VolumeId: vol.VolumeId, StagingTargetPath: staging, TargetPath: target, Readonly: readOnly,
		VolumeCapability: mountCap(mode), VolumeContext: vctx,
	}
}

// stageAndPublish stages vol at a new staging path and publishes it at a
// new target, both named after name; it returns both.
func (e *env) stageAndPublish(vol *csi.Volume, name string) (staging, target string) {
	e.t.Helper()
	staging, target = e.stagingPath(name), e.target(name)
	e.mustStage(vol, staging)
	e.publish(clonePub(vol, staging, target, csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, false))
	return staging, target
}

// unpublishAndUnstage undoes stageAndPublish.
func (e *env) unpublishAndUnstage(volID, staging, target string) {
	e.t.Helper()
	if err := e.unpublish(volID, target); err != nil {
		e.t.Fatalf("NodeUnpublishVolume %s: %v", target, err)
	}
	e.mustUnstage(volID, staging)
	if exists(target) {
		e.t.Errorf("target %s still exists after unpublish", target)
	}
	for _, p := range []string{staging, target, filepath.Join(e.cloneDir(volID), "fs")} {
		if n := mountCount(e.t, p); n != 0 {
			e.t.Errorf("%s still has %d mounts after unpublish and unstage", p, n)
		}
	}
}

func (e *env) cloneDir(volID string) string { return filepath.Join(e.root, "clones", volID) }

func writeFile(t *testing.T, p, body string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
}

// pushBase pushes a two-layer image whose base.txt says version, and
// returns its digest.
func pushBase(t *testing.T, ref, version string) string {
	t.Helper()
	return testimage.Push(t, ref, testimage.Image(t,
		testimage.Layer(t, testimage.Tar(t, testimage.Dir("data"), testimage.File("data/base.txt", version+"\n"),
			testimage.File("data/gone.txt", "to be deleted\n")), testimage.Gzip),
		testimage.Layer(t, testimage.Tar(t, testimage.File("version", version+"\n")), testimage.Gzip),
	)).String()
}

// TestCloneCreateVolume: a writable volume is a clone on the requested
// node; a read-only one is the image, anywhere; a writable one without a
// node is refused by a controller that cannot guess one.
func TestCloneCreateVolume(t *testing.T) {
	t.Parallel()
	RequireRoot(t)
	// The CSI controller service alone: no API server here for the
	// in-process provisioner.
	p := Start(t, Options{Bin: pluginBin, Mode: "controller", Args: []string{"--provisioner=false"}})
	caps, err := p.Identity.GetPluginCapabilities(ctx(t), &csi.GetPluginCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(caps.String(), "VOLUME_ACCESSIBILITY_CONSTRAINTS") {
		t.Errorf("plugin capabilities %v lack VOLUME_ACCESSIBILITY_CONSTRAINTS", caps)
	}
	const image = "127.0.0.1:5000/ds/img:v1" // never pulled: creating copies nothing
	rwo, err := p.Controller.CreateVolume(ctx(t), createReq("pvc-rwo", image, csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, 3<<30, "node-7"))
	if err != nil {
		t.Fatal(err)
	}
	v := rwo.Volume
	if len(v.AccessibleTopology) != 1 || v.AccessibleTopology[0].Segments[topologyKey] != "node-7" {
		t.Errorf("RWO topology %v, want exactly %s=node-7", v.AccessibleTopology, topologyKey)
	}
	if v.VolumeContext[attrClone] != "true" || v.VolumeContext[attrCap] != strconv.Itoa(3<<30) || v.VolumeContext["image"] != image || v.CapacityBytes != 3<<30 {
		t.Errorf("RWO volume context %v, capacity %d: want a clone of %s of 3 GiB", v.VolumeContext, v.CapacityBytes, image)
	}
	again, err := p.Controller.CreateVolume(ctx(t), createReq("pvc-rwo", image, csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, 3<<30, "node-7"))
	if err != nil || again.Volume.VolumeId != v.VolumeId {
		t.Errorf("repeated CreateVolume: %v, %v; want volume %s again", again, err, v.VolumeId)
	}
	_, err = p.Controller.CreateVolume(ctx(t), createReq("pvc-rwo", image, csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, 1<<30, "node-7"))
	wantCode(t, err, codes.AlreadyExists)

	rox, err := p.Controller.CreateVolume(ctx(t), createReq("pvc-rox", image, csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY, 0, "node-7"))
	if err != nil {
		t.Fatal(err)
	}
	if len(rox.Volume.AccessibleTopology) != 0 || rox.Volume.VolumeContext[attrClone] != "" || rox.Volume.VolumeContext[attrCap] != "" {
		t.Errorf("ROX volume: topology %v, context %v; want no node and no clone", rox.Volume.AccessibleTopology, rox.Volume.VolumeContext)
	}

	_, err = p.Controller.CreateVolume(ctx(t), createReq("pvc-nowhere", image, csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, 0, ""))
	wantCode(t, err, codes.InvalidArgument, "WaitForFirstConsumer")

	// Deleting a clone that no node of this process holds: success.
	if _, err := p.Controller.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: v.VolumeId}); err != nil {
		t.Errorf("DeleteVolume of a clone in controller mode: %v", err)
	}
}

// TestCloneNodeInfo: the node reports its topology and stages.
func TestCloneNodeInfo(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	info, err := e.Node.NodeGetInfo(ctx(t), &csi.NodeGetInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if got := info.GetAccessibleTopology().GetSegments(); len(got) != 1 || got[topologyKey] != "test-node" {
		t.Errorf("NodeGetInfo topology %v, want %s=test-node", got, topologyKey)
	}
	caps, err := e.Node.NodeGetCapabilities(ctx(t), &csi.NodeGetCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(caps.String(), "STAGE_UNSTAGE_VOLUME") {
		t.Errorf("node capabilities %v lack STAGE_UNSTAGE_VOLUME", caps)
	}
}

// TestClonePersists: a clone's writes survive unpublish and unstage, a
// restart of the plugin under a running pod, and a reboot (every mount
// gone behind the plugin's back); its base stays what the tag pointed to
// at the first stage, even after the tag moves.
func TestClonePersists(t *testing.T) {
	t.Parallel()
	e := newAllEnv(t)
	reg := testimage.Registry(t)
	ref := reg + "/clone/persist:v1"
	pushBase(t, ref, "v1")
	vol := e.createClone("pvc-persist", ref, 64<<20)
	if exists(e.cloneDir(vol.VolumeId)) {
		t.Errorf("CreateVolume made %s: creating a clone must copy nothing", e.cloneDir(vol.VolumeId))
	}

	staging, target := e.stageAndPublish(vol, "first")
	if got := readString(t, filepath.Join(target, "data/base.txt")); got != "v1\n" {
		t.Fatalf("base.txt = %q, want the image's v1", got)
	}
	writeFile(t, filepath.Join(target, "data/new.txt"), "written by pod 1\n")
	writeFile(t, filepath.Join(target, "data/base.txt"), "changed by pod 1\n")
	if err := os.Remove(filepath.Join(target, "data/gone.txt")); err != nil {
		t.Fatal(err)
	}
	// A repeated stage and publish with the same arguments are no-ops.
	e.mustStage(vol, staging)
	e.publish(clonePub(vol, staging, target, csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, false))
	if n := mountCount(t, staging); n != 1 {
		t.Errorf("%d mounts at the staging path after a repeated stage, want 1", n)
	}
	if n := mountCount(t, target); n != 1 {
		t.Errorf("%d mounts at the target after a repeated publish, want 1", n)
	}
	// The staged overlay keeps its upper: not volatile, with the upper
	// options of every writable publish.
	ms := MountsAt(t, staging)
	if len(ms) != 1 || ms[0].FsType != "overlay" {
		t.Fatalf("staging path mounts %+v, want one overlay", ms)
	}
	// (index=off and metacopy=off are the kernel's defaults here, which
	// mountinfo does not show.)
	if !strings.Contains(ms[0].SuperOpts, "redirect_dir=nofollow") {
		t.Errorf("staged overlay options %q lack redirect_dir=nofollow", ms[0].SuperOpts)
	}
	for _, bad := range []string{"volatile", "index=on", "metacopy=on"} {
		if strings.Contains(ms[0].SuperOpts, bad) {
			t.Errorf("staged overlay options %q: a clone's upper must not be %s", ms[0].SuperOpts, bad)
		}
	}
	e.unpublishAndUnstage(vol.VolumeId, staging, target)

	check := func(when string, target string, extra ...string) {
		t.Helper()
		for p, want := range map[string]string{"data/new.txt": "written by pod 1\n", "data/base.txt": "changed by pod 1\n", "version": "v1\n"} {
			if got := readString(t, filepath.Join(target, p)); got != want {
				t.Errorf("%s: %s = %q, want %q", when, p, got, want)
			}
		}
		for _, p := range extra {
			if got := readString(t, filepath.Join(target, p)); got != "later\n" {
				t.Errorf("%s: %s = %q, want %q", when, p, got, "later\n")
			}
		}
		if exists(filepath.Join(target, "data/gone.txt")) {
			t.Errorf("%s: data/gone.txt, deleted in the clone, is back", when)
		}
	}

	// The tag moves: the clone's base does not.
	v2 := pushBase(t, ref, "v2")
	other := e.publishImage("fresh-image", ref+"@"+v2)
	if got := readString(t, filepath.Join(other, "version")); got != "v2\n" {
		t.Fatalf("the tag did not move: version = %q", got)
	}
	if err := e.unpublish("fresh-image", other); err != nil {
		t.Fatal(err)
	}

	staging, target = e.stageAndPublish(vol, "second")
	check("after unstage and a new stage", target)
	writeFile(t, filepath.Join(target, "later.txt"), "later\n")

	// The plugin restarts under the running pod: nothing is disturbed.
	e.Restart()
	check("after a plugin restart", target, "later.txt")
	if n := mountCount(t, staging); n != 1 {
		t.Errorf("%d mounts at the staging path after a restart, want 1", n)
	}
	e.mustStage(vol, staging) // kubelet may repeat it after the restart
	e.unpublishAndUnstage(vol.VolumeId, staging, target)

	// A reboot: the plugin dies and every mount goes with the node, the
	// staging mount too, so nothing unstages it.
	_, target = e.stageAndPublish(vol, "third")
	writeFile(t, filepath.Join(target, "boot.txt"), "later\n")
	e.Kill9()
	if err := UnmountAll(e.dir); err != nil {
		t.Fatal(err)
	}
	e.StartAgain()
	if !exists(filepath.Join(e.cloneDir(vol.VolumeId), "disk.img")) {
		t.Fatal("the clone's disk is gone after the reboot")
	}
	staging, target = e.stageAndPublish(vol, "after-boot")
	check("after a reboot", target, "later.txt", "boot.txt")
	if got := readString(t, filepath.Join(target, "version")); got != "v1\n" {
		t.Errorf("after the tag moved, the clone's base is %q, want the pinned v1", got)
	}
	e.unpublishAndUnstage(vol.VolumeId, staging, target)
	if _, err := e.Controller.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: vol.VolumeId}); err != nil {
		t.Fatal(err)
	}
	e.assertClean()
}

// TestCloneCapacity: a clone's writes stop at its capacity with ENOSPC in
// the pod, the node's filesystem keeps its room, and NodeGetVolumeStats
// reports the clone's own filesystem.
func TestCloneCapacity(t *testing.T) {
	t.Parallel()
	e := newAllEnv(t)
	reg := testimage.Registry(t)
	ref := reg + "/clone/capacity:v1"
	pushBase(t, ref, "v1")
	const capacity = 32 << 20
	vol := e.createClone("pvc-small", ref, capacity)
	staging, target := e.stageAndPublish(vol, "small")

	var before unix.Statfs_t
	if err := unix.Statfs(e.root, &before); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(filepath.Join(target, "fill"))
	if err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 1<<20)
	for i := range chunk {
		chunk[i] = byte(i)
	}
	var written int64
	for written < 4*capacity {
		n, err := f.Write(chunk)
		written += int64(n)
		if err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("write after %d bytes: %v, want ENOSPC", written, err)
			}
			break
		}
	}
	if err := f.Sync(); err != nil && !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("fsync: %v", err)
	}
	f.Close()
	t.Logf("a clone of %d MiB took %d bytes (%.1f MiB) before ENOSPC", capacity>>20, written, float64(written)/(1<<20))
	if written >= 4*capacity {
		t.Fatalf("wrote %d bytes into a clone of %d without ENOSPC", written, capacity)
	}
	if written < capacity-(2<<20) || written > capacity+(8<<20) {
		t.Errorf("wrote %d bytes before ENOSPC, want about the capacity %d", written, capacity)
	}
	var after unix.Statfs_t
	if err := unix.Statfs(e.root, &after); err != nil {
		t.Fatal(err)
	}
	used := (int64(before.Bavail) - int64(after.Bavail)) * before.Bsize
	t.Logf("the node's filesystem lost %.1f MiB", float64(used)/(1<<20))
	if used > capacity+(24<<20) {
		t.Errorf("the node's filesystem lost %d bytes for a clone of %d", used, capacity)
	}
	// Another file cannot be written either, but deleting makes room.
	if err := os.WriteFile(filepath.Join(target, "more"), chunk, 0o644); !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("write into a full clone: %v, want ENOSPC", err)
	}

	for _, p := range []string{target, staging} {
		st, err := e.Node.NodeGetVolumeStats(ctx(t), &csi.NodeGetVolumeStatsRequest{VolumeId: vol.VolumeId, VolumePath: p})
		if err != nil {
			t.Fatalf("NodeGetVolumeStats at %s: %v", p, err)
		}
		var bytes, inodes *csi.VolumeUsage
		for _, u := range st.Usage {
			switch u.Unit {
			case csi.VolumeUsage_BYTES:
				bytes = u
			case csi.VolumeUsage_INODES:
				inodes = u
			}
		}
		if bytes == nil || inodes == nil {
			t.Fatalf("NodeGetVolumeStats at %s: %v, want bytes and inodes", p, st)
		}
		if bytes.Total < capacity || bytes.Total > capacity+(16<<20) || bytes.Used < capacity-(2<<20) || bytes.Available > 1<<20 {
			t.Errorf("NodeGetVolumeStats at %s: bytes %v, want the full clone's filesystem of about %d", p, bytes, capacity)
		}
		if inodes.Total <= 0 || inodes.Used <= 0 || inodes.Used+inodes.Available != inodes.Total {
			t.Errorf("NodeGetVolumeStats at %s: inodes %v", p, inodes)
		}
	}
	if err := os.Remove(filepath.Join(target, "fill")); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(target, "more"), "room again\n")
	e.unpublishAndUnstage(vol.VolumeId, staging, target)
}

// TestCloneSharedAndReadOnly: the publishes of one staged clone share it
// (each sees the other's writes); a read-only publish, or a read-only
// stage, sees the clone's data and cannot write.
func TestCloneSharedAndReadOnly(t *testing.T) {
	t.Parallel()
	e := newAllEnv(t)
	reg := testimage.Registry(t)
	ref := reg + "/clone/shared:v1"
	pushBase(t, ref, "v1")
	vol := e.createClone("pvc-shared", ref, 16<<20)
	rwo := csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER
	staging, a := e.stageAndPublish(vol, "pod-a")
	b, ro := e.target("pod-b"), e.target("pod-ro")
	e.publish(clonePub(vol, staging, b, rwo, false))
	e.publish(clonePub(vol, staging, ro, rwo, true))

	writeFile(t, filepath.Join(a, "from-a"), "a\n")
	writeFile(t, filepath.Join(b, "from-b"), "b\n")
	if got := readString(t, filepath.Join(b, "from-a")); got != "a\n" {
		t.Errorf("pod b reads %q from pod a's write", got)
	}
	if got := readString(t, filepath.Join(a, "from-b")); got != "b\n" {
		t.Errorf("pod a reads %q from pod b's write", got)
	}
	if got := readString(t, filepath.Join(ro, "from-a")); got != "a\n" {
		t.Errorf("the read-only pod reads %q from pod a's write", got)
	}
	if err := os.WriteFile(filepath.Join(ro, "nope"), []byte("x"), 0o644); !errors.Is(err, syscall.EROFS) {
		t.Errorf("write in a read-only publish: %v, want EROFS", err)
	}
	// The same target again, read-write this time: another request.
	_, err := e.Node.NodePublishVolume(ctx(t), clonePub(vol, staging, ro, rwo, false))
	wantCode(t, err, codes.AlreadyExists)
	// Unstaging while pods still use it fails and keeps their mounts.
	err = e.unstage(vol.VolumeId, staging)
	wantCode(t, err, codes.FailedPrecondition, "unpublish")
	if got := readString(t, filepath.Join(a, "from-b")); got != "b\n" {
		t.Errorf("after a refused unstage, pod a reads %q", got)
	}
	e.mustStage(vol, staging) // kubelet's next attempt stages again
	for _, tgt := range []string{a, b, ro} {
		if err := e.unpublish(vol.VolumeId, tgt); err != nil {
			t.Fatal(err)
		}
	}
	e.mustUnstage(vol.VolumeId, staging)

	// A read-only stage (a ReadOnlyMany PV naming the clone).
	rox := csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY
	staging = e.stagingPath("ro-stage")
	if err := e.stage(vol, staging, rox); err != nil {
		t.Fatal(err)
	}
	tgt := e.target("ro-stage")
	e.publish(clonePub(vol, staging, tgt, rox, false))
	for p, want := range map[string]string{"from-a": "a\n", "from-b": "b\n", "version": "v1\n"} {
		if got := readString(t, filepath.Join(tgt, p)); got != want {
			t.Errorf("read-only stage: %s = %q, want %q", p, got, want)
		}
	}
	if err := os.WriteFile(filepath.Join(tgt, "nope"), []byte("x"), 0o644); !errors.Is(err, syscall.EROFS) {
		t.Errorf("write in a read-only stage: %v, want EROFS", err)
	}
	e.unpublishAndUnstage(vol.VolumeId, staging, tgt)

	// A publish without a stage is refused.
	_, err = e.Node.NodePublishVolume(ctx(t), clonePub(vol, staging, e.target("unstaged"), rwo, false))
	wantCode(t, err, codes.FailedPrecondition, "not staged")
}

// TestCloneKeepsItsLayersAndDelete: an unstaged clone's base survives a
// prune; DeleteVolume refuses a staged clone, removes an unstaged one
// (disk, references), and succeeds again after that.
func TestCloneKeepsItsLayersAndDelete(t *testing.T) {
	t.Parallel()
	e := newAllEnv(t)
	reg := testimage.Registry(t)
	ref := reg + "/clone/prune:v1"
	pushBase(t, ref, "v1")
	vol := e.createClone("pvc-prune", ref, 16<<20)
	staging, target := e.stageAndPublish(vol, "prune")
	writeFile(t, filepath.Join(target, "kept"), strings.Repeat("k", 4<<20))
	e.unpublishAndUnstage(vol.VolumeId, staging, target)

	layers := func() []string {
		m, err := filepath.Glob(filepath.Join(e.root, "layers", "sha256", "*"))
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	if n := len(layers()); n != 2 {
		t.Fatalf("%d layers cached, want 2", n)
	}
	bin, err := cliBin()
	if err != nil {
		t.Fatal(err)
	}
	prune := func() string {
		out, err := exec.Command(bin, "--root", e.root, "prune").CombinedOutput()
		if err != nil {
			t.Fatalf("strata prune: %v\n%s", err, out)
		}
		return string(out)
	}
	out := prune()
	if n := len(layers()); n != 2 {
		t.Fatalf("strata prune removed a clone's base while it was unstaged (%d layers left):\n%s", n, out)
	}
	staging, target = e.stageAndPublish(vol, "prune-again")
	if got := readString(t, filepath.Join(target, "version")); got != "v1\n" {
		t.Errorf("after a prune, version = %q", got)
	}

	_, err = e.Controller.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: vol.VolumeId})
	wantCode(t, err, codes.FailedPrecondition, "still staged on node test-node")
	if !exists(filepath.Join(target, "kept")) {
		t.Fatal("a refused DeleteVolume touched the clone")
	}
	e.unpublishAndUnstage(vol.VolumeId, staging, target)

	img := filepath.Join(e.cloneDir(vol.VolumeId), "disk.img")
	var st unix.Stat_t
	if err := unix.Stat(img, &st); err != nil {
		t.Fatal(err)
	}
	var before, after unix.Statfs_t
	if err := unix.Statfs(e.root, &before); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		if _, err := e.Controller.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: vol.VolumeId}); err != nil {
			t.Fatalf("DeleteVolume #%d: %v", i+1, err)
		}
	}
	if err := unix.Statfs(e.root, &after); err != nil {
		t.Fatal(err)
	}
	freed := (int64(after.Bavail) - int64(before.Bavail)) * after.Bsize
	t.Logf("DeleteVolume freed %.1f MiB (the image took %.1f MiB)", float64(freed)/(1<<20), float64(st.Blocks*512)/(1<<20))
	// (Other tests run beside this one: the free space is only logged.)
	if st.Blocks*512 < 4<<20 {
		t.Errorf("the clone's image took %d bytes on disk, want the 4 MiB written and more", st.Blocks*512)
	}
	if exists(img) {
		t.Errorf("%s is still there after DeleteVolume", img)
	}
	if _, err := os.Stat(e.cloneDir(vol.VolumeId)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("clone directory after DeleteVolume: %v, want it gone", err)
	}
	if refs := e.refFiles(); len(refs) != 0 {
		t.Errorf("layer references left after DeleteVolume: %v", refs)
	}
	prune()
	if n := len(layers()); n != 0 {
		t.Errorf("%d layers left after the clone was deleted and the cache pruned", n)
	}
	// Staging a deleted clone's volume again makes a new, empty clone.
	e.assertClean()
}
