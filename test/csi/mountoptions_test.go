package csitest

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"github.com/strata-csi/strata/test/testimage"
)

// withFlags returns req with the capability's mount flags set, as kubelet
// sends a PersistentVolume's mountOptions.
func withFlags(req *csi.NodePublishVolumeRequest, flags ...string) *csi.NodePublishVolumeRequest {
	c := proto.Clone(req.VolumeCapability).(*csi.VolumeCapability)
	c.GetMount().MountFlags = flags
	req.VolumeCapability = c
	return req
}

// assertMountOptions checks that the one mount at target has every option
// of want (as `mount` in the pod shows it) and none of notWant.
func assertMountOptions(t *testing.T, target string, want, notWant []string) {
	t.Helper()
	ms := MountsAt(t, target)
	if len(ms) != 1 {
		t.Fatalf("mounts at %s: %+v; want one", target, ms)
	}
	for _, o := range append([]string{"nosuid", "nodev"}, want...) {
		if !ms[0].HasOption(o) {
			t.Errorf("mount at %s has options %v, lacking %s", target, ms[0].Options, o)
		}
	}
	for _, o := range notWant {
		if ms[0].HasOption(o) {
			t.Errorf("mount at %s has options %v, with %s", target, ms[0].Options, o)
		}
	}
}

// TestMountOptions: a volume's mountOptions (the capability's mount flags)
// apply to the mount the pod sees, for an image's overlay, a subPath bind
// and a clone's bind; "ro" makes the publish read-only; options that would
// reach overlayfs's own or undo nosuid/nodev are refused, mounting nothing;
// a repeated publish must ask for the same options.
func TestMountOptions(t *testing.T) {
	t.Parallel()
	e := newAllEnv(t)
	ref := testimage.Registry(t) + "/opts/img:v1"
	pushBase(t, ref, "v1")
	attrs := map[string]string{"image": ref}

	t.Run("overlay", func(t *testing.T) {
		tgt := e.target("opts-overlay")
		e.publish(withFlags(pubReq("opts-overlay", tgt, attrs), "noexec", "noatime,nodiratime"))
		assertMountOptions(t, tgt, []string{"noexec", "noatime", "nodiratime"}, []string{"relatime", "ro"})
		writeFile(t, filepath.Join(tgt, "w"), "writable\n")
		// Same options: a no-op; others: the existing mount stays.
		e.publish(withFlags(pubReq("opts-overlay", tgt, attrs), "noexec", "noatime,nodiratime"))
		_, err := e.Node.NodePublishVolume(ctx(t), withFlags(pubReq("opts-overlay", tgt, attrs), "noatime"))
		wantCode(t, err, codes.AlreadyExists, "mount options", "noexec")
		assertMountOptions(t, tgt, []string{"noexec", "noatime"}, nil)
		if err := e.unpublish("opts-overlay", tgt); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("ro", func(t *testing.T) {
		tgt := e.target("opts-ro")
		e.publish(withFlags(pubReq("opts-ro", tgt, attrs), "ro", "strictatime"))
		assertMountOptions(t, tgt, []string{"ro"}, []string{"relatime", "noatime"})
		if err := os.WriteFile(filepath.Join(tgt, "w"), []byte("x"), 0o644); !errors.Is(err, unix.EROFS) {
			t.Errorf("write to a publish with mount option ro: %v, want EROFS", err)
		}
		if err := e.unpublish("opts-ro", tgt); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("subPath", func(t *testing.T) {
		tgt := e.target("opts-sub")
		e.publish(withFlags(pubReq("opts-sub", tgt, map[string]string{"image": ref, "subPath": "data"}), "noexec"))
		assertMountOptions(t, tgt, []string{"noexec"}, nil)
		if got := readString(t, filepath.Join(tgt, "base.txt")); got != "v1\n" {
			t.Errorf("subPath data: base.txt = %q", got)
		}
		if err := e.unpublish("opts-sub", tgt); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("refused", func(t *testing.T) {
		for _, flags := range [][]string{{"lowerdir=/etc"}, {"upperdir=/tmp,workdir=/tmp"}, {"suid"}, {"noexec", "dev"}} {
			tgt := e.target("opts-bad")
			_, err := e.Node.NodePublishVolume(ctx(t), withFlags(pubReq("opts-bad", tgt, attrs), flags...))
			wantCode(t, err, codes.InvalidArgument, "mountOptions")
			if n := mountCount(t, tgt); n != 0 {
				t.Errorf("mount options %q refused, but %d mounts at the target", flags, n)
			}
		}
	})
	t.Run("clone", func(t *testing.T) {
		vol := e.createClone("opts-clone", ref, 64<<20)
		staging, tgt := e.stagingPath("opts-clone"), e.target("opts-clone")
		_, err := e.Node.NodeStageVolume(ctx(t), &csi.NodeStageVolumeRequest{
			VolumeId: vol.VolumeId, StagingTargetPath: staging, VolumeContext: vol.VolumeContext,
			VolumeCapability: withFlags(&csi.NodePublishVolumeRequest{VolumeCapability: mountCap(csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)}, "noexec", "noatime").VolumeCapability,
		})
		if err != nil {
			t.Fatalf("NodeStageVolume with mount options: %v", err)
		}
		e.publish(withFlags(clonePub(vol, staging, tgt, csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, false), "noexec", "noatime"))
		assertMountOptions(t, tgt, []string{"noexec", "noatime"}, []string{"ro"})
		writeFile(t, filepath.Join(tgt, "kept"), "kept\n")
		e.unpublishAndUnstage(vol.VolumeId, staging, tgt)
	})
}
