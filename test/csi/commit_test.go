package csitest

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/strata-csi/strata/test/testimage"
)

// commitCLI runs `strata --root root commit args...` and returns its stdout.
func (e *env) commitCLI(args ...string) (string, error) {
	e.t.Helper()
	bin, err := cliBin()
	if err != nil {
		e.t.Fatal(err)
	}
	cmd := exec.Command(bin, append([]string{"--root", e.root, "commit"}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("strata commit %v: %v\nstdout:\n%s\nstderr:\n%s", args, err, stdout.String(), stderr.String())
	}
	return stdout.String(), nil
}

// podAttrs are the attributes of an inline volume of pod ns/name.
func podAttrs(image, ns, name string) map[string]string {
	return map[string]string{"image": image, "csi.storage.k8s.io/pod.name": name,
		"csi.storage.k8s.io/pod.namespace": ns, "csi.storage.k8s.io/pod.uid": ns + "-" + name + "-uid",
		"csi.storage.k8s.io/ephemeral": "true"}
}

// TestCommitRoundTrip: every kind of change a pod can make in a volume
// survives `strata commit`: the committed image, published in a fresh
// volume, shows the same tree as the volume did, file for file.
func TestCommitRoundTrip(t *testing.T) {
	e := newEnv(t)
	reg := newBlobRegistry(t, 0)
	owned := testimage.File("owned", "owned by 1000:2000")
	owned.UID, owned.GID, owned.Mode = 1000, 2000, 0o640
	setuid := testimage.File("bin/tool", "#!/bin/true\n")
	setuid.Mode = 0o4755
	sticky := testimage.Dir("sticky")
	sticky.Mode = 0o1777
	xattr := testimage.File("data/a.txt", "alpha")
	xattr.Xattrs = map[string]string{"user.origin": "base"}
	hard := testimage.Entry{Name: "data/h2", Link: "data/h1", Hard: true}
	layer := testimage.Layer(t, testimage.Tar(t,
		testimage.Dir("bin"), setuid, owned, sticky, testimage.File("sticky/s", "s"),
		testimage.Dir("data"), xattr, testimage.File("data/b.txt", "bravo"), testimage.File("data/h1", "linked"), hard,
		testimage.Dir("data/sub"), testimage.File("data/sub/x", "x"), testimage.File("data/sub/y", "y"),
		testimage.Symlink("link", "data/a.txt"),
		testimage.Dir("deldir"), testimage.File("deldir/f", "f"),
		testimage.Dir("redo"), testimage.File("redo/old1", "1"), testimage.File("redo/old2", "2"),
		testimage.Dir("mvdir"), testimage.File("mvdir/m1", "m1"), testimage.Dir("mvdir/inner"), testimage.File("mvdir/inner/m2", "m2"),
		testimage.File("chmodme", "chmod"), testimage.File("chownme", "chown"),
		testimage.File("renameme", "rename"), testimage.File("delme", "delete"), testimage.File("modme", "before"),
	), testimage.Gzip)
	base := reg.addr + "/commit/base:v1"
	testimage.Push(t, base, testimage.Image(t, layer))

	src := e.target("src")
	e.publish(pubReq("vol-src", src, podAttrs(base, "lab", "trainer-0")))
	changeEverything(t, src)
	want := snapshot(t, src)

	out, err := e.commitCLI("lab/trainer-0", reg.addr+"/commit/out:v1")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("strata commit:\n%s", out)

	dst := e.publishImage("vol-dst", reg.addr+"/commit/out:v1")
	got := snapshot(t, dst)
	compareTrees(t, want, got)
	for _, gone := range []string{"delme", "deldir", "redo/old1", "renameme", "mvdir", "data/sub/x"} {
		if exists(filepath.Join(dst, gone)) {
			t.Errorf("%s was deleted in the volume but is in the committed image", gone)
		}
	}
	// The same upper commits to the same layer: the walk is deterministic.
	out2, err := e.commitCLI("vol-src", reg.addr+"/commit/out:v2")
	if err != nil {
		t.Fatal(err)
	}
	if l1, l2 := strings.SplitN(out, "\n", 2)[0], strings.SplitN(out2, "\n", 2)[0]; l1 != l2 {
		t.Errorf("two commits of the same writes gave different layers:\n%s\n%s", l1, l2)
	}
}

// changeEverything makes, in the mounted volume at dir, one change of every
// kind a commit must carry.
func changeEverything(t *testing.T, dir string) {
	t.Helper()
	p := func(n string) string { return filepath.Join(dir, n) }
	must := func(what string, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
	must("modify", os.WriteFile(p("modme"), []byte("after, and longer"), 0o644))
	must("chmod only", os.Chmod(p("chmodme"), 0o600|os.ModeSetgid))
	must("chown only", os.Lchown(p("chownme"), 4242, 4343))
	must("delete", os.Remove(p("delme")))
	must("delete dir", os.RemoveAll(p("redo")))
	must("recreate dir", os.Mkdir(p("redo"), 0o750))
	must("recreate dir content", os.WriteFile(p("redo/new"), []byte("new"), 0o644))
	must("delete whole dir", os.RemoveAll(p("deldir")))
	must("rename file", os.Rename(p("renameme"), p("renamed")))
	// Strata mounts with redirect_dir off: the kernel refuses to rename a
	// lower directory (EXDEV), and mv falls back to copy and delete.
	if err := os.Rename(p("mvdir"), p("mvdir2")); !errors.Is(err, unix.EXDEV) {
		t.Fatalf("rename(2) of a lower directory: got %v, want EXDEV (is redirect_dir on?)", err)
	}
	if out, err := exec.Command("mv", p("mvdir"), p("moved")).CombinedOutput(); err != nil {
		t.Fatalf("mv mvdir moved: %v\n%s", err, out)
	}
	must("new file", os.WriteFile(p("pair1"), []byte("two names"), 0o644))
	must("hardlink", os.Link(p("pair1"), p("data/pair2")))
	must("user xattr", unix.Setxattr(p("data/b.txt"), "user.note", []byte("checked"), 0))
	must("symlink", os.Symlink("../renamed", p("data/to-renamed")))
	must("delete in subdir", os.Remove(p("data/sub/x")))
	must("new dir", os.MkdirAll(p("fresh/deep"), 0o755))
	must("setuid new", os.WriteFile(p("fresh/deep/suid"), []byte("s"), 0o755))
	must("setuid bit", os.Chmod(p("fresh/deep/suid"), 0o755|os.ModeSetuid|os.ModeSticky))
}

// node is what a tree comparison looks at for one path.
type node struct {
	typ      fs.FileMode
	mode     uint32 // permission and special bits
	uid, gid uint32
	size     int64
	mtime    int64 // ns; directories excluded (see snapshot)
	sum      string
	link     string
	xattrs   string // user.* only, sorted k=v
	ino      uint64
}

// snapshot records the merged tree at dir, the root itself excepted (its
// metadata is the volume's upper root, not the image's).
func snapshot(t *testing.T, dir string) map[string]node {
	t.Helper()
	out := map[string]node{}
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || path == dir {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		var st unix.Stat_t
		if err := unix.Lstat(path, &st); err != nil {
			return err
		}
		n := node{typ: d.Type(), mode: st.Mode & 0o7777, uid: st.Uid, gid: st.Gid, ino: st.Ino}
		switch d.Type() {
		case 0:
			data, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			s := sha256.Sum256(data)
			n.size, n.sum, n.mtime = int64(len(data)), hex.EncodeToString(s[:]), st.Mtim.Nano()
		case fs.ModeSymlink:
			n.link, _ = os.Readlink(path)
			n.mode, n.mtime = 0, st.Mtim.Nano()
		}
		if d.Type() != fs.ModeSymlink {
			n.xattrs = userXattrs(t, path)
		}
		out[rel] = n
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func userXattrs(t *testing.T, path string) string {
	t.Helper()
	buf := make([]byte, 64<<10)
	sz, err := unix.Llistxattr(path, buf)
	if err != nil {
		t.Fatalf("listxattr %s: %v", path, err)
	}
	var kv []string
	for _, k := range strings.Split(string(buf[:sz]), "\x00") {
		if !strings.HasPrefix(k, "user.") {
			continue
		}
		v := make([]byte, 64<<10)
		n, err := unix.Lgetxattr(path, k, v)
		if err != nil {
			t.Fatalf("getxattr %s %s: %v", path, k, err)
		}
		kv = append(kv, k+"="+string(v[:n]))
	}
	sort.Strings(kv)
	return strings.Join(kv, ",")
}

// compareTrees compares two snapshots path by path, and their hardlink
// groups (paths sharing an inode number in the merged view).
func compareTrees(t *testing.T, want, got map[string]node) {
	t.Helper()
	for p, w := range want {
		g, ok := got[p]
		if !ok {
			t.Errorf("%s: in the volume, missing from the committed image", p)
			continue
		}
		w.ino, g.ino = 0, 0
		if w != g {
			t.Errorf("%s:\n  volume:    %+v\n  committed: %+v", p, w, g)
		}
	}
	for p := range got {
		if _, ok := want[p]; !ok {
			t.Errorf("%s: in the committed image, not in the volume", p)
		}
	}
	if w, g := linkGroups(want), linkGroups(got); w != g {
		t.Errorf("hardlink groups differ:\n  volume:    %s\n  committed: %s", w, g)
	}
}

// linkGroups lists the sets of paths that share an inode, as a string.
func linkGroups(tree map[string]node) string {
	by := map[uint64][]string{}
	for p, n := range tree {
		if n.typ != fs.ModeDir {
			by[n.ino] = append(by[n.ino], p)
		}
	}
	var groups []string
	for _, ps := range by {
		if len(ps) > 1 {
			sort.Strings(ps)
			groups = append(groups, strings.Join(ps, "="))
		}
	}
	sort.Strings(groups)
	return strings.Join(groups, " ")
}

var uploadedLine = regexp.MustCompile(`(?m)^pushed (\S+)@(sha256:[0-9a-f]{64}), uploaded ([0-9]+) bytes$`)

// TestCommitUploadsOnlyTheDiff: committing 100 KB of writes over a 10 MB
// image uploads about 100 KB, and downloads none of the base's layers: the
// registry mounts them into the target repository.
func TestCommitUploadsOnlyTheDiff(t *testing.T) {
	e := newEnv(t)
	reg := newBlobRegistry(t, 0)
	big := make([]byte, 10<<20)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range big {
		big[i] = byte(rng.Uint32())
	}
	layer := testimage.Layer(t, testimage.Tar(t, testimage.Dir("data"), testimage.File("data/big.bin", string(big))), testimage.Gzip)
	baseDigest, err := layer.Digest()
	if err != nil {
		t.Fatal(err)
	}
	base := reg.addr + "/datasets/big:v1"
	testimage.Push(t, base, testimage.Image(t, layer))
	tgt := e.target("big")
	e.publish(pubReq("vol-big", tgt, map[string]string{"image": base}))

	small := make([]byte, 100<<10)
	for i := range small {
		small[i] = byte(rng.Uint32())
	}
	if err := os.WriteFile(filepath.Join(tgt, "data", "new.bin"), small, 0o644); err != nil {
		t.Fatal(err)
	}
	reg.reset()
	start := time.Now()
	// Another repository on the same registry: the base layer is mounted.
	out, err := e.commitCLI("vol-big", reg.addr+"/results/big-plus:v1")
	if err != nil {
		t.Fatal(err)
	}
	m := uploadedLine.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no 'pushed ... uploaded N bytes' line in:\n%s", out)
	}
	sent, _ := strconv.ParseInt(m[3], 10, 64)
	recv := reg.received()
	t.Logf("commit of %d bytes over a %d byte base took %v: the CLI sent %d bytes, the registry received %d body bytes",
		len(small), len(big), time.Since(start), sent, recv)
	if n := reg.counts()[baseDigest.Hex]; n > 0 {
		t.Errorf("the commit downloaded the base layer %d times", n)
	}
	if n := reg.counts()["sha256:"+baseDigest.Hex]; n > 0 {
		t.Errorf("the commit downloaded the base layer %d times", n)
	}
	limit := int64(len(small)) + 16<<10 // the gzip of random data, a config and a manifest
	if recv < int64(len(small)) || recv > limit {
		t.Errorf("the registry received %d bytes, want between %d and %d", recv, len(small), limit)
	}
	if sent != recv {
		t.Errorf("the CLI reports %d bytes uploaded, the registry received %d", sent, recv)
	}
	// The committed image carries both layers.
	dst := e.publishImage("vol-big-plus", m[1]+"@"+m[2])
	if got := readString(t, filepath.Join(dst, "data", "new.bin")); got != string(small) {
		t.Errorf("data/new.bin of the committed image differs from what the volume had")
	}
	if fi, err := os.Stat(filepath.Join(dst, "data", "big.bin")); err != nil || fi.Size() != int64(len(big)) {
		t.Errorf("data/big.bin of the committed image: %v, %v", fi, err)
	}
}

// TestCommitAmbiguousVolume: a volume published at several target paths
// needs the pod or --target-path.
func TestCommitAmbiguousVolume(t *testing.T) {
	e := newEnv(t)
	reg := newBlobRegistry(t, 0)
	base := reg.addr + "/commit/amb:v1"
	testimage.Push(t, base, testimage.Image(t, testimage.Layer(t, testimage.Tar(t, testimage.File("f", "f")), testimage.Gzip)))
	var targets []string
	for i := range 3 {
		tgt := e.target(fmt.Sprintf("pod-%d", i))
		e.publish(pubReq("pv-shared", tgt, podAttrs(base, "ns", fmt.Sprintf("pod-%d", i))))
		targets = append(targets, tgt)
	}
	if err := os.WriteFile(filepath.Join(targets[1], "mine"), []byte("1"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := e.commitCLI("pv-shared", reg.addr+"/commit/amb:v2")
	if err == nil || !strings.Contains(err.Error(), "published 3 times") || !strings.Contains(err.Error(), "exit status 2") {
		t.Fatalf("commit of a volume published 3 times: got %v, want exit 2 naming the 3 publishes", err)
	}
	for _, args := range [][]string{{"ns/pod-1"}, {"pv-shared", "--target-path", targets[1]}} {
		out, err := e.commitCLI(append(args, reg.addr+"/commit/amb:v2")...)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(out, "1 files") {
			t.Errorf("commit %v: want the one file pod-1 wrote, got:\n%s", args, out)
		}
	}
}
