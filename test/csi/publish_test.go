package csitest

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"

	"github.com/strata-csi/strata/test/testimage"
)

// TestPublishMergesLayers checks what a pod sees: whiteouts and opaque
// directories applied, symlinks and hardlinks kept, ownership and modes
// kept, and setuid bits that cannot take effect (nosuid, nodev).
func TestPublishMergesLayers(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	reg := testimage.Registry(t)
	ref := reg + "/merge/img:v1"
	setuid := testimage.Entry{Name: "bin/tool", Body: "#!/bin/sh\n", Mode: 0o4755}
	owned := testimage.Entry{Name: "owned/file", Body: "mine\n", Mode: 0o640, UID: 1234, GID: 5678}
	ownedDir := testimage.Entry{Name: "owned/", Mode: 0o750, UID: 1234, GID: 5678}
	testimage.Push(t, ref, testimage.Image(t,
		testimage.Layer(t, testimage.Tar(t,
			testimage.Dir("etc"),
			testimage.File("etc/keep", "keep\n"),
			testimage.File("etc/gone", "gone\n"),
			testimage.Dir("olddir"),
			testimage.File("olddir/x", "x\n"),
			testimage.Dir("opq"),
			testimage.File("opq/below1", "b1\n"),
			testimage.Dir("opq/sub"),
			testimage.File("opq/sub/below2", "b2\n"),
			testimage.File("data/orig", "original\n"),
			testimage.Entry{Name: "data/hard", Link: "data/orig", Hard: true},
			testimage.Dir("bin"),
			setuid,
			ownedDir,
			owned,
			testimage.File("replaced", "bottom\n"),
		), testimage.Gzip),
		testimage.Layer(t, testimage.Tar(t,
			testimage.Whiteout("etc/gone"),
			testimage.Whiteout("olddir"),
			testimage.Dir("opq"),
			testimage.Opaque("opq"),
			testimage.File("opq/above", "above\n"),
			testimage.Symlink("rel-link", "data/orig"),
			testimage.Symlink("abs-link", "/data/orig"),
			testimage.File("replaced", "top\n"),
		), testimage.Zstd),
	))
	tgt := e.publishImage("merge", ref)

	// Whiteouts: a file and a whole directory.
	if got := readString(t, filepath.Join(tgt, "etc/keep")); got != "keep\n" {
		t.Errorf("etc/keep = %q", got)
	}
	for _, p := range []string{"etc/gone", "olddir", "etc/.wh.gone", ".wh.olddir"} {
		if exists(filepath.Join(tgt, p)) {
			t.Errorf("%s is visible; a whiteout should hide it", p)
		}
	}
	// An opaque directory shows only what its own layer put in it.
	ents, err := os.ReadDir(filepath.Join(tgt, "opq"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, d := range ents {
		names = append(names, d.Name())
	}
	if strings.Join(names, ",") != "above" {
		t.Errorf("opq holds %v, want only [above]", names)
	}
	if got := readString(t, filepath.Join(tgt, "replaced")); got != "top\n" {
		t.Errorf("replaced = %q, want the top layer's", got)
	}
	// Symlinks are kept as links, not resolved.
	for link, want := range map[string]string{"rel-link": "data/orig", "abs-link": "/data/orig"} {
		got, err := os.Readlink(filepath.Join(tgt, link))
		if err != nil || got != want {
			t.Errorf("readlink %s = %q, %v; want %q", link, got, err, want)
		}
	}
	if got := readString(t, filepath.Join(tgt, "rel-link")); got != "original\n" {
		t.Errorf("reading through rel-link = %q", got)
	}
	// Hardlinks: one inode, two names.
	var a, b unix.Stat_t
	if err := unix.Stat(filepath.Join(tgt, "data/orig"), &a); err != nil {
		t.Fatal(err)
	}
	if err := unix.Stat(filepath.Join(tgt, "data/hard"), &b); err != nil {
		t.Fatal(err)
	}
	if a.Ino != b.Ino || a.Dev != b.Dev {
		t.Errorf("data/orig (ino %d) and data/hard (ino %d) are not one inode", a.Ino, b.Ino)
	}
	if a.Nlink != 2 {
		t.Errorf("data/orig has %d links, want 2", a.Nlink)
	}
	// Ownership and modes.
	for _, c := range []struct {
		path     string
		uid, gid uint32
		mode     uint32
	}{
		{"owned", 1234, 5678, unix.S_IFDIR | 0o750},
		{"owned/file", 1234, 5678, unix.S_IFREG | 0o640},
		{"bin/tool", 0, 0, unix.S_IFREG | unix.S_ISUID | 0o755},
	} {
		var st unix.Stat_t
		if err := unix.Lstat(filepath.Join(tgt, c.path), &st); err != nil {
			t.Errorf("%s: %v", c.path, err)
			continue
		}
		if st.Uid != c.uid || st.Gid != c.gid || st.Mode != c.mode {
			t.Errorf("%s: uid %d gid %d mode %o; want %d %d %o", c.path, st.Uid, st.Gid, st.Mode, c.uid, c.gid, c.mode)
		}
	}
	// The mount is an overlay, nosuid and nodev, read-write.
	ms := MountsAt(t, tgt)
	if len(ms) != 1 {
		t.Fatalf("%d mounts at %s, want 1", len(ms), tgt)
	}
	m := ms[0]
	if m.FsType != "overlay" {
		t.Errorf("fs type %q, want overlay", m.FsType)
	}
	for _, o := range []string{"nosuid", "nodev", "rw"} {
		if !m.HasOption(o) {
			t.Errorf("mount options %v lack %s", m.Options, o)
		}
	}
	var sfs unix.Statfs_t
	if err := unix.Statfs(tgt, &sfs); err != nil {
		t.Fatal(err)
	}
	if sfs.Flags&unix.ST_NOSUID == 0 || sfs.Flags&unix.ST_NODEV == 0 {
		t.Errorf("statfs flags %#x lack ST_NOSUID|ST_NODEV", sfs.Flags)
	}

	if err := e.unpublish("merge", tgt); err != nil {
		t.Fatal(err)
	}
	e.assertClean()
}

// TestVolumesOfOneImageAreIsolated: a pod's write is visible neither to
// another pod of the same image nor in the shared layer cache.
func TestVolumesOfOneImageAreIsolated(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	reg := testimage.Registry(t)
	ref := reg + "/iso/img:v1"
	testimage.Push(t, ref, testimage.Image(t,
		testimage.Layer(t, testimage.Tar(t, testimage.File("shared.txt", "from the image\n")), testimage.Gzip),
		testimage.Layer(t, testimage.Tar(t, testimage.File("other.txt", "layer two\n")), testimage.Gzip),
	))
	ta := e.publishImage("vol-a", ref)
	tb := e.publishImage("vol-b", ref)

	if err := os.WriteFile(filepath.Join(ta, "new.txt"), []byte("only in A\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(ta, "shared.txt"), []byte("changed in A\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(ta, "other.txt")); err != nil {
		t.Fatal(err)
	}
	if exists(filepath.Join(tb, "new.txt")) {
		t.Error("B sees a file written in A")
	}
	if got := readString(t, filepath.Join(tb, "shared.txt")); got != "from the image\n" {
		t.Errorf("B sees shared.txt = %q", got)
	}
	if !exists(filepath.Join(tb, "other.txt")) {
		t.Error("B lost other.txt, deleted in A")
	}
	// A's upper holds A's writes; no layer of the cache does. The upper is
	// capped (--default-upper-size): it is in its own filesystem at fs/.
	up := filepath.Join(e.volumeDir(ta), "fs", "upper")
	if got := readString(t, filepath.Join(up, "new.txt")); got != "only in A\n" {
		t.Errorf("A's upper new.txt = %q", got)
	}
	layers, err := filepath.Glob(filepath.Join(e.root, "layers", "sha256", "*", "fs"))
	if err != nil || len(layers) != 2 {
		t.Fatalf("layer dirs %v, %v; want 2", layers, err)
	}
	for _, l := range layers {
		_ = filepath.WalkDir(l, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if d.Name() == "new.txt" {
				t.Errorf("A's write leaked into the cache: %s", p)
			}
			if d.Name() == "shared.txt" {
				if got := readString(t, p); got != "from the image\n" {
					t.Errorf("cached %s changed to %q", p, got)
				}
			}
			return nil
		})
		if names := readDirNames(l); names != "other.txt" && names != "shared.txt" {
			t.Errorf("layer %s holds %q", l, names)
		}
	}
	for _, tgt := range []string{ta, tb} {
		if err := e.unpublish(filepath.Base(filepath.Dir(filepath.Dir(tgt))), tgt); err != nil {
			t.Fatal(err)
		}
	}
	e.assertClean()
}

func readDirNames(dir string) string {
	ents, _ := os.ReadDir(dir)
	var n []string
	for _, e := range ents {
		n = append(n, e.Name())
	}
	sort.Strings(n)
	return strings.Join(n, ",")
}

// TestReadOnlyPublish: readonly or a read-only access mode gives a mount
// without an upper, where writes fail with EROFS.
func TestReadOnlyPublish(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	reg := testimage.Registry(t)
	ref1 := reg + "/ro/one:v1"
	testimage.Push(t, ref1, testimage.Image(t,
		testimage.Layer(t, testimage.Tar(t, testimage.File("f", "one\n")), testimage.Gzip),
	))
	ref2 := reg + "/ro/two:v1"
	testimage.Push(t, ref2, testimage.Image(t,
		testimage.Layer(t, testimage.Tar(t, testimage.File("f", "one\n")), testimage.Gzip),
		testimage.Layer(t, testimage.Tar(t, testimage.File("g", "two\n")), testimage.Gzip),
	))
	cases := []struct {
		name string
		ref  string
		req  func(*csi.NodePublishVolumeRequest)
	}{
		{"readonly-flag-1-layer", ref1, func(r *csi.NodePublishVolumeRequest) { r.Readonly = true }},
		{"readonly-flag-2-layers", ref2, func(r *csi.NodePublishVolumeRequest) { r.Readonly = true }},
		{"reader-only-mode", ref2, func(r *csi.NodePublishVolumeRequest) {
			r.VolumeCapability = mountCap(csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY)
		}},
		{"single-reader-1-layer", ref1, func(r *csi.NodePublishVolumeRequest) {
			r.VolumeCapability = mountCap(csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY)
		}},
	}
	for _, c := range cases {
		tgt := e.target(c.name)
		req := pubReq(c.name, tgt, map[string]string{"image": c.ref})
		c.req(req)
		e.publish(req)
		if got := readString(t, filepath.Join(tgt, "f")); got != "one\n" {
			t.Errorf("%s: f = %q", c.name, got)
		}
		err := os.WriteFile(filepath.Join(tgt, "new"), []byte("x"), 0o644)
		if !errors.Is(err, syscall.EROFS) {
			t.Errorf("%s: write gave %v, want EROFS", c.name, err)
		}
		err = os.WriteFile(filepath.Join(tgt, "f"), []byte("x"), 0o644)
		if !errors.Is(err, syscall.EROFS) {
			t.Errorf("%s: overwrite gave %v, want EROFS", c.name, err)
		}
		ms := MountsAt(t, tgt)
		if len(ms) != 1 || !ms[0].HasOption("ro") || !ms[0].HasOption("nosuid") || !ms[0].HasOption("nodev") {
			t.Errorf("%s: mounts at target %+v; want one ro,nosuid,nodev mount", c.name, ms)
		}
		for _, p := range []string{"upper", "fs", "disk.img"} {
			if up := filepath.Join(e.volumeDir(tgt), p); exists(up) {
				t.Errorf("%s: a read-only publish has an upper %s", c.name, up)
			}
			if ups, _ := filepath.Glob(filepath.Join(e.root, "volumes", "*", p)); len(ups) > 0 {
				t.Errorf("%s: uppers exist: %v", c.name, ups)
			}
		}
		if err := e.unpublish(c.name, tgt); err != nil {
			t.Fatal(err)
		}
	}
	e.assertClean()
}

// TestPublishIdempotency covers the CSI idempotency rules at one target.
func TestPublishIdempotency(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	reg := testimage.Registry(t)
	ref := reg + "/idem/one:v1"
	other := reg + "/idem/two:v1"
	testimage.Push(t, ref, testimage.Image(t, testimage.Layer(t, testimage.Tar(t, testimage.File("f", "one\n")), testimage.Gzip)))
	testimage.Push(t, other, testimage.Image(t, testimage.Layer(t, testimage.Tar(t, testimage.File("f", "two\n")), testimage.Gzip)))

	tgt := e.target("idem")
	req := pubReq("idem", tgt, map[string]string{"image": ref})
	e.publish(req)
	if err := os.WriteFile(filepath.Join(tgt, "written"), []byte("w"), 0o644); err != nil {
		t.Fatal(err)
	}
	e.publish(req)
	if n := mountCount(t, tgt); n != 1 {
		t.Errorf("%d mounts at the target after a repeated publish, want 1", n)
	}
	if !exists(filepath.Join(tgt, "written")) {
		t.Error("a repeated publish lost the volume's writes")
	}
	// Another image at the same target.
	_, err := e.Node.NodePublishVolume(ctx(t), pubReq("idem", tgt, map[string]string{"image": other}))
	wantCode(t, err, codes.AlreadyExists)
	// Same image, now read-only: other arguments too.
	ro := pubReq("idem", tgt, map[string]string{"image": ref})
	ro.Readonly = true
	_, err = e.Node.NodePublishVolume(ctx(t), ro)
	wantCode(t, err, codes.AlreadyExists)
	if n := mountCount(t, tgt); n != 1 {
		t.Errorf("%d mounts at the target after refused publishes, want 1", n)
	}
	if got := readString(t, filepath.Join(tgt, "f")); got != "one\n" {
		t.Errorf("f = %q after refused publishes", got)
	}

	vdir := e.volumeDir(tgt)
	if err := e.unpublish("idem", tgt); err != nil {
		t.Fatal(err)
	}
	if exists(tgt) {
		t.Error("unpublish left the target dir")
	}
	if exists(vdir) {
		t.Errorf("unpublish left %s", vdir)
	}
	if err := e.unpublish("idem", tgt); err != nil {
		t.Errorf("second unpublish: %v", err)
	}
	never := e.target("never")
	if err := e.unpublish("never", never); err != nil {
		t.Errorf("unpublish of a never published path: %v", err)
	}
	// An existing, empty, never published target dir is removed too.
	if err := os.Mkdir(never, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := e.unpublish("never", never); err != nil {
		t.Errorf("unpublish of an empty never published dir: %v", err)
	}
	e.assertClean()
}

// TestPublishValidation: every malformed request is refused with the right
// code and a message that names what is wrong, and leaves nothing behind.
func TestPublishValidation(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	reg := testimage.Registry(t)
	ref := reg + "/valid/img:v1"
	testimage.Push(t, ref, testimage.Image(t, testimage.Layer(t, testimage.Tar(t, testimage.File("f", "x")), testimage.Gzip)))
	uncached := reg + "/valid/other:v1"
	testimage.Push(t, uncached, testimage.Image(t, testimage.Layer(t, testimage.Tar(t, testimage.File("g", "y")), testimage.Gzip)))

	tgt := e.target("valid")
	block := pubReq("v", tgt, map[string]string{"image": ref})
	block.VolumeCapability = &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
	noCap := pubReq("v", tgt, map[string]string{"image": ref})
	noCap.VolumeCapability = nil
	cases := []struct {
		name  string
		req   *csi.NodePublishVolumeRequest
		code  codes.Code
		words []string
	}{
		{"missing image", pubReq("v", tgt, map[string]string{}), codes.InvalidArgument, []string{"image"}},
		{"blank image", pubReq("v", tgt, map[string]string{"image": "  "}), codes.InvalidArgument, []string{"image"}},
		{"unknown attribute", pubReq("v", tgt, map[string]string{"image": ref, "pullpolicy": "Always"}), codes.InvalidArgument, []string{"pullpolicy"}},
		{"bad pullPolicy", pubReq("v", tgt, map[string]string{"image": ref, "pullPolicy": "Sometimes"}), codes.InvalidArgument, []string{"pullPolicy"}},
		{"block", block, codes.InvalidArgument, []string{"block"}},
		{"no capability", noCap, codes.InvalidArgument, []string{"capability"}},
		{"relative target", pubReq("v", "pods/x/vol", map[string]string{"image": ref}), codes.InvalidArgument, []string{"target"}},
		{"no target", pubReq("v", "", map[string]string{"image": ref}), codes.InvalidArgument, []string{"target"}},
		{"no volume id", pubReq("", tgt, map[string]string{"image": ref}), codes.InvalidArgument, []string{"volume id"}},
		{"malformed reference", pubReq("v", tgt, map[string]string{"image": "UPPER/Case::x"}), codes.InvalidArgument, nil},
		{"missing repository", pubReq("v", tgt, map[string]string{"image": reg + "/valid/nope:v1"}), codes.NotFound, []string{"nope"}},
		{"missing tag", pubReq("v", tgt, map[string]string{"image": reg + "/valid/img:v2"}), codes.NotFound, []string{"v2"}},
		{"never and uncached", pubReq("v", tgt, map[string]string{"image": uncached, "pullPolicy": "Never"}), codes.NotFound, []string{"other"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := e.Node.NodePublishVolume(ctx(t), c.req)
			wantCode(t, err, c.code, c.words...)
			if exists(tgt) {
				t.Errorf("a refused publish left the target %s", tgt)
			}
		})
	}
	// kubelet's keys are accepted.
	ok := pubReq("v", tgt, map[string]string{
		"image":                                  ref,
		"csi.storage.k8s.io/pod.name":            "p",
		"csi.storage.k8s.io/pod.namespace":       "ns",
		"csi.storage.k8s.io/ephemeral":           "true",
		"csi.storage.k8s.io/serviceAccount.name": "default",
	})
	e.publish(ok)
	if err := e.unpublish("v", tgt); err != nil {
		t.Fatal(err)
	}
	e.assertClean()
}

// TestFailedPublishLeavesNothing: failures before and after the record is
// written are undone completely.
func TestFailedPublishLeavesNothing(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	reg := testimage.Registry(t)
	ref := reg + "/fail/img:v1"
	testimage.Push(t, ref, testimage.Image(t, testimage.Layer(t, testimage.Tar(t,
		testimage.File("file", "x"), testimage.Dir("dir")), testimage.Gzip)))

	tgt := e.target("fail")
	_, err := e.Node.NodePublishVolume(ctx(t), pubReq("fail", tgt, map[string]string{"image": reg + "/fail/img:missing"}))
	wantCode(t, err, codes.NotFound)
	if n := mountCount(t, tgt); n != 0 {
		t.Errorf("%d mounts at the target", n)
	}
	e.assertClean()

	// A failure after the layers are acquired and the overlay is mounted:
	// a subPath that is not there.
	_, err = e.Node.NodePublishVolume(ctx(t), pubReq("fail", tgt, map[string]string{"image": ref, "subPath": "nope"}))
	wantCode(t, err, codes.InvalidArgument, "subPath", "nope")
	e.assertClean()
	if exists(tgt) {
		t.Error("the failed publish left its target dir")
	}
	// The same request then succeeds with a valid subPath.
	e.publish(pubReq("fail", tgt, map[string]string{"image": ref, "subPath": "dir"}))
	if err := e.unpublish("fail", tgt); err != nil {
		t.Fatal(err)
	}
	e.assertClean()
}

// TestSubPath publishes one directory of the image, resolved inside it.
func TestSubPath(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	reg := testimage.Registry(t)
	ref := reg + "/sub/img:v1"
	testimage.Push(t, ref, testimage.Image(t,
		testimage.Layer(t, testimage.Tar(t,
			testimage.Dir("data/raw"),
			testimage.File("data/raw/r1", "raw one\n"),
			testimage.File("data/cooked", "cooked\n"),
			testimage.Dir("etc"),
			testimage.File("etc/image-marker", "image etc\n"),
		), testimage.Gzip),
		testimage.Layer(t, testimage.Tar(t,
			testimage.File("data/raw/r2", "raw two\n"),
			testimage.Symlink("abs-etc", "/etc"),
			testimage.Symlink("data/up-etc", "../../../../../../../etc"),
			testimage.Symlink("to-raw", "data/raw"),
			testimage.Symlink("host-only", "/proc/self"),
		), testimage.Gzip),
	))

	t.Run("directory", func(t *testing.T) {
		tgt := e.target("sub-dir")
		e.publish(pubReq("sub-dir", tgt, map[string]string{"image": ref, "subPath": "data/raw"}))
		if got := readDirNames(tgt); got != "r1,r2" {
			t.Errorf("subPath data/raw shows %q, want r1,r2", got)
		}
		if err := os.WriteFile(filepath.Join(tgt, "w"), []byte("w"), 0o644); err != nil {
			t.Errorf("subPath volume not writable: %v", err)
		}
		if ms := MountsAt(t, tgt); len(ms) != 1 || !ms[0].HasOption("nosuid") || !ms[0].HasOption("nodev") {
			t.Errorf("mounts at target: %+v; want one nosuid,nodev mount", ms)
		}
		// A repeated publish is a no-op.
		e.publish(pubReq("sub-dir", tgt, map[string]string{"image": ref, "subPath": "data/raw"}))
		if n := mountCount(t, tgt); n != 1 {
			t.Errorf("%d mounts after a repeated publish", n)
		}
		if err := e.unpublish("sub-dir", tgt); err != nil {
			t.Fatal(err)
		}
		e.assertClean()
	})
	t.Run("leading slash and dots are cleaned", func(t *testing.T) {
		tgt := e.target("sub-clean")
		e.publish(pubReq("sub-clean", tgt, map[string]string{"image": ref, "subPath": "/data/./raw/"}))
		if got := readDirNames(tgt); got != "r1,r2" {
			t.Errorf("shows %q", got)
		}
		if err := e.unpublish("sub-clean", tgt); err != nil {
			t.Fatal(err)
		}
		e.assertClean()
	})
	t.Run("symlink inside the image", func(t *testing.T) {
		tgt := e.target("sub-link")
		e.publish(pubReq("sub-link", tgt, map[string]string{"image": ref, "subPath": "to-raw"}))
		if got := readDirNames(tgt); got != "r1,r2" {
			t.Errorf("shows %q", got)
		}
		if err := e.unpublish("sub-link", tgt); err != nil {
			t.Fatal(err)
		}
	})
	for _, sub := range []string{"abs-etc", "data/up-etc", "abs-etc/", "../../etc"} {
		t.Run("escape "+sub, func(t *testing.T) {
			tgt := e.target("esc-" + strings.NewReplacer("/", "-", ".", "d").Replace(sub))
			e.publish(pubReq("esc", tgt, map[string]string{"image": ref, "subPath": sub}))
			if got := readDirNames(tgt); got != "image-marker" {
				t.Errorf("subPath %q shows %q; want the image's /etc (image-marker) and never the host's", sub, got)
			}
			if exists(filepath.Join(tgt, "passwd")) || exists(filepath.Join(tgt, "os-release")) {
				t.Errorf("subPath %q shows the host's /etc", sub)
			}
			if err := e.unpublish("esc", tgt); err != nil {
				t.Fatal(err)
			}
		})
	}
	for sub, word := range map[string]string{
		"data/cooked":  "data/cooked",
		"data/missing": "data/missing",
		"host-only":    "host-only",
	} {
		t.Run("invalid "+sub, func(t *testing.T) {
			tgt := e.target("bad-" + strings.ReplaceAll(sub, "/", "-"))
			_, err := e.Node.NodePublishVolume(ctx(t), pubReq("bad", tgt, map[string]string{"image": ref, "subPath": sub}))
			wantCode(t, err, codes.InvalidArgument, "subPath", word)
			if exists(tgt) {
				t.Errorf("target %s left", tgt)
			}
		})
	}
	e.assertClean()
}

// TestDeepImage publishes an image of 300 layers, far beyond what classic
// mount(2) options can hold.
func TestDeepImage(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	reg := testimage.Registry(t)
	ref := reg + "/deep/img:v1"
	const n = 300
	layers := make([]v1.Layer, 0, n)
	for i := range n {
		layers = append(layers, testimage.Layer(t, testimage.Tar(t,
			testimage.File("same", "layer "+strconv.Itoa(i)+"\n"),
			testimage.File("own/"+strconv.Itoa(i), strconv.Itoa(i)),
		), testimage.Gzip))
	}
	testimage.Push(t, ref, testimage.Image(t, layers...))
	tgt := e.publishImage("deep", ref)
	if got := readString(t, filepath.Join(tgt, "same")); got != "layer 299\n" {
		t.Errorf("same = %q, want the top layer's", got)
	}
	ents, err := os.ReadDir(filepath.Join(tgt, "own"))
	if err != nil || len(ents) != n {
		t.Errorf("own/ has %d entries (%v), want %d", len(ents), err, n)
	}
	if err := os.WriteFile(filepath.Join(tgt, "same"), []byte("mine"), 0o644); err != nil {
		t.Errorf("write: %v", err)
	}
	if err := e.unpublish("deep", tgt); err != nil {
		t.Fatal(err)
	}
	e.assertClean()
}
