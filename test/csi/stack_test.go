package csitest

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/google/go-containerregistry/pkg/authn"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"google.golang.org/grpc/codes"

	"github.com/strata-csi/strata/test/testimage"
)

// stackReq is a publish request of image with stack above it (the
// stackImages attribute, comma-separated, bottom first).
func stackReq(volID, target, image string, stack ...string) *csi.NodePublishVolumeRequest {
	return pubReq(volID, target, map[string]string{"image": image, "stackImages": strings.Join(stack, ",")})
}

// stackRecord is the part of volume.json that records a stack.
type stackRecord struct {
	Image  string `json:"image"`
	Digest string `json:"digest"`
	Stack  []struct {
		Image  string `json:"image"`
		Digest string `json:"digest"`
	} `json:"stack"`
	Layers []string `json:"layers"`
}

func (e *env) stackRecord(target string) stackRecord {
	e.t.Helper()
	data, err := os.ReadFile(filepath.Join(e.volumeDir(target), "volume.json"))
	if err != nil {
		e.t.Fatal(err)
	}
	var r stackRecord
	if err := json.Unmarshal(data, &r); err != nil {
		e.t.Fatal(err)
	}
	return r
}

// diffIDs returns the layers' diffIDs as strings, in the order given.
func diffIDs(t *testing.T, layers ...v1.Layer) []string {
	t.Helper()
	var out []string
	for _, l := range layers {
		d, err := l.DiffID()
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, d.String())
	}
	return out
}

// tree describes every entry below root, by relative path: type,
// permissions, owner, and the content of a file or the target of a link.
// Two mounts with equal trees show a pod the same files.
func tree(t *testing.T, root string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		info, err := d.Info()
		if err != nil {
			return err
		}
		st := info.Sys().(*syscall.Stat_t)
		desc := fmt.Sprintf("%v %d:%d", info.Mode(), st.Uid, st.Gid)
		switch {
		case info.Mode().IsRegular():
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			sum := sha256.Sum256(data)
			desc += " " + hex.EncodeToString(sum[:8])
		case info.Mode()&fs.ModeSymlink != 0:
			l, err := os.Readlink(p)
			if err != nil {
				return err
			}
			desc += " -> " + l
		}
		out[rel] = desc
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// sameTree reports every difference between two trees.
func sameTree(t *testing.T, what string, got, want map[string]string) {
	t.Helper()
	var paths []string
	for p := range want {
		paths = append(paths, p)
	}
	for p := range got {
		if _, ok := want[p]; !ok {
			paths = append(paths, p)
		}
	}
	slices.Sort(paths)
	for _, p := range slices.Compact(paths) {
		if got[p] != want[p] {
			t.Errorf("%s: %s is %q, want %q", what, p, got[p], want[p])
		}
	}
}

// layerGets is how often reg served layer l's blob.
func layerGets(t *testing.T, reg *blobRegistry, l v1.Layer) int {
	t.Helper()
	d, err := l.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return reg.counts()[d.String()]
}

// TestStackedImages stacks a toolchain image on a dataset image. The pod sees
// both; the toolchain's whiteout and opaque directory hide the dataset's
// files exactly as if the four layers were one image (the merged trees are
// equal file for file); a subPath may name a directory only the upper image
// has; a repeated publish of the same stack keeps the mount, another stack
// is AlreadyExists; and a restart keeps the stack's layer references.
func TestStackedImages(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	reg := testimage.Registry(t)
	dsRef, toolsRef, oneRef := reg+"/stack/dataset:v1", reg+"/stack/toolchain:v1", reg+"/stack/flat:v1"
	ds1 := testimage.Layer(t, testimage.Tar(t,
		testimage.Dir("data"),
		testimage.File("data/README", "dataset v1\n"),
		testimage.Dir("data/raw"),
		testimage.File("data/raw/a.txt", "alpha\n"),
		testimage.File("data/raw/b.txt", "beta\n"),
		testimage.Dir("data/cache"),
		testimage.File("data/cache/stale", "stale\n"),
		testimage.Entry{Name: "data/owned", Body: "owned\n", Mode: 0o640, UID: 1234, GID: 5678},
	), testimage.Gzip)
	ds2 := testimage.Layer(t, testimage.Tar(t,
		testimage.File("data/labels.txt", "labels\n"),
		testimage.File("data/cache/also-stale", "stale too\n"),
	), testimage.Zstd)
	tools1 := testimage.Layer(t, testimage.Tar(t,
		testimage.Dir("tools"),
		testimage.Dir("tools/bin"),
		testimage.Entry{Name: "tools/bin/prep", Body: "#!/bin/sh\necho prep\n", Mode: 0o755},
		testimage.Symlink("tools/data", "../data"),
	), testimage.Gzip)
	tools2 := testimage.Layer(t, testimage.Tar(t,
		testimage.Whiteout("data/raw/b.txt"), // the toolchain retracts one file
		testimage.Dir("data/cache"),
		testimage.Opaque("data/cache"), // and replaces a whole directory
		testimage.File("data/cache/fresh", "fresh\n"),
		testimage.File("data/README", "dataset v1, with tools\n"),
		testimage.File("tools/VERSION", "2\n"),
	), testimage.Gzip)
	testimage.Push(t, dsRef, testimage.Image(t, ds1, ds2))
	testimage.Push(t, toolsRef, testimage.Image(t, tools1, tools2))
	// The same layers in the same order, as one image: what the stack must
	// look like.
	testimage.Push(t, oneRef, testimage.Image(t, ds1, ds2, tools1, tools2))

	tgt := e.target("stack")
	req := stackReq("stack", tgt, dsRef, toolsRef)
	e.publish(req)
	flat := e.publishImage("flat", oneRef)

	for p, want := range map[string]string{
		"data/raw/a.txt":   "alpha\n",
		"data/labels.txt":  "labels\n",
		"data/README":      "dataset v1, with tools\n",
		"data/cache/fresh": "fresh\n",
		"tools/bin/prep":   "#!/bin/sh\necho prep\n",
		"tools/data/owned": "owned\n",
	} {
		if got := readString(t, filepath.Join(tgt, p)); got != want {
			t.Errorf("%s = %q, want %q", p, got, want)
		}
	}
	for _, p := range []string{"data/raw/b.txt", "data/cache/stale", "data/cache/also-stale", "data/raw/.wh.b.txt", "data/cache/.wh..wh..opq"} {
		if exists(filepath.Join(tgt, p)) {
			t.Errorf("%s is visible; the toolchain's whiteout or opaque directory should hide it", p)
		}
	}
	sameTree(t, "stack versus one image of the same layers", tree(t, tgt), tree(t, flat))

	rec := e.stackRecord(tgt)
	wantLayers := diffIDs(t, ds1, ds2, tools1, tools2)
	if !slices.Equal(rec.Layers, wantLayers) {
		t.Errorf("recorded layers %v, want %v (bottom first)", rec.Layers, wantLayers)
	}
	if rec.Image != dsRef || len(rec.Stack) != 2 || rec.Stack[0].Image != dsRef || rec.Stack[1].Image != toolsRef ||
		rec.Stack[0].Digest != rec.Digest || !strings.HasPrefix(rec.Stack[1].Digest, "sha256:") {
		t.Errorf("record %+v: want image %s and the stack [%s %s] with digests", rec, dsRef, dsRef, toolsRef)
	}
	if err := os.WriteFile(filepath.Join(tgt, "tools/out"), []byte("w"), 0o644); err != nil {
		t.Errorf("the stacked volume is not writable: %v", err)
	}

	// Idempotency compares the whole stack.
	e.publish(req)
	if n := mountCount(t, tgt); n != 1 {
		t.Errorf("%d mounts after a repeated publish, want 1", n)
	}
	for name, other := range map[string]*csi.NodePublishVolumeRequest{
		"the dataset alone": pubReq("stack", tgt, map[string]string{"image": dsRef}),
		"the order swapped": stackReq("stack", tgt, toolsRef, dsRef),
		"one more image":    stackReq("stack", tgt, dsRef, toolsRef, oneRef),
	} {
		t.Run("another stack: "+name, func(t *testing.T) {
			_, err := e.Node.NodePublishVolume(ctx(t), other)
			wantCode(t, err, codes.AlreadyExists, dsRef, toolsRef)
		})
	}
	// A restart rebuilds the stack's references from the record.
	e.Restart()
	e.publish(req)
	if refs := e.refFiles(); len(refs) != 2 {
		t.Errorf("%d reference files after a restart, want 2 (stack, flat)", len(refs))
	}
	if got := readString(t, filepath.Join(tgt, "tools/out")); got != "w" {
		t.Errorf("the volume's write after a restart = %q", got)
	}

	// subPath resolves inside the merged tree: here, a directory that only
	// the upper image has.
	sub := e.target("stack-sub")
	subReq := stackReq("stack-sub", sub, dsRef, toolsRef)
	subReq.VolumeContext["subPath"] = "tools/bin"
	e.publish(subReq)
	if got := readDirNames(sub); got != "prep" {
		t.Errorf("subPath tools/bin shows %q, want prep", got)
	}
	// And a directory both images fill.
	sub2 := e.target("stack-sub2")
	subReq2 := stackReq("stack-sub2", sub2, dsRef, toolsRef)
	subReq2.VolumeContext["subPath"] = "data/cache"
	e.publish(subReq2)
	if got := readDirNames(sub2); got != "fresh" {
		t.Errorf("subPath data/cache shows %q, want fresh (the toolchain's opaque directory)", got)
	}

	for _, p := range []struct{ id, tgt string }{{"stack", tgt}, {"flat", flat}, {"stack-sub", sub}, {"stack-sub2", sub2}} {
		if err := e.unpublish(p.id, p.tgt); err != nil {
			t.Fatal(err)
		}
	}
	e.assertClean()
}

// TestStackSharedBase: two images on one base layer, stacked. The base is
// downloaded and stored once, and mounted once, at its upper place: the
// kernel refuses a lower twice. The view is what applying the layers one
// after another gives, even with a whiteout and an opaque directory of the
// lower image between the two places of the base: the base, applied again,
// brings back what they hid. An image that repeats a layer itself mounts the
// same way, and shows the same tree.
func TestStackSharedBase(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	blobs := newBlobRegistry(t, 0)
	reg := blobs.addr
	lowerRef, upperRef, flatRef := reg+"/shared/lower:v1", reg+"/shared/upper:v1", reg+"/shared/flat:v1"
	base := testimage.Layer(t, testimage.Tar(t,
		testimage.File("etc/os", "base os\n"),
		testimage.File("x", "base x\n"),
		testimage.Dir("d"),
		testimage.File("d/p", "base p\n"),
	), testimage.Gzip)
	lower := testimage.Layer(t, testimage.Tar(t,
		testimage.Whiteout("x"),
		testimage.Dir("d"),
		testimage.Opaque("d"),
		testimage.File("d/q", "lower q\n"),
		testimage.File("lower.txt", "lower\n"),
	), testimage.Gzip)
	upper := testimage.Layer(t, testimage.Tar(t,
		testimage.File("upper.txt", "upper\n"),
	), testimage.Gzip)
	testimage.Push(t, lowerRef, testimage.Image(t, base, lower))
	testimage.Push(t, upperRef, testimage.Image(t, base, upper))
	testimage.Push(t, flatRef, testimage.Image(t, base, lower, base, upper))

	tgt := e.target("shared")
	e.publish(stackReq("shared", tgt, lowerRef, upperRef))
	for p, want := range map[string]string{
		"x": "base x\n", "d/p": "base p\n", "d/q": "lower q\n", "lower.txt": "lower\n", "upper.txt": "upper\n", "etc/os": "base os\n",
	} {
		if got := readString(t, filepath.Join(tgt, p)); got != want {
			t.Errorf("%s = %q, want %q (the layers applied in order)", p, got, want)
		}
	}
	if n := layerGets(t, blobs, base); n != 1 {
		t.Errorf("the shared base was downloaded %d times, want 1", n)
	}
	if got, _ := filepath.Glob(filepath.Join(e.root, "layers", "sha256", "*", "fs")); len(got) != 3 {
		t.Errorf("%d layers stored, want 3 (base, lower, upper): %v", len(got), got)
	}
	if got, want := e.stackRecord(tgt).Layers, diffIDs(t, lower, base, upper); !slices.Equal(got, want) {
		t.Errorf("recorded layers %v, want %v: the base once, at its upper place", got, want)
	}

	flat := e.publishImage("flat", flatRef)
	sameTree(t, "stack versus one image that repeats the base", tree(t, tgt), tree(t, flat))
	if n := layerGets(t, blobs, base); n != 1 {
		t.Errorf("the base was downloaded %d times, want 1", n)
	}

	for _, p := range []struct{ id, tgt string }{{"shared", tgt}, {"flat", flat}} {
		if err := e.unpublish(p.id, p.tgt); err != nil {
			t.Fatal(err)
		}
	}
	e.assertClean()
}

// TestStackTooDeep: 300 + 250 layers cannot be one overlay. The publish is
// refused before any layer is fetched, with a message that names the cap and
// the images.
func TestStackTooDeep(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	reg := testimage.Registry(t)
	deep := func(name string, n int) string {
		ref := reg + "/toodeep/" + name + ":v1"
		layers := make([]v1.Layer, 0, n)
		for i := range n {
			layers = append(layers, testimage.Layer(t, testimage.Tar(t, testimage.File(name, strconv.Itoa(i))), testimage.Gzip))
		}
		testimage.Push(t, ref, testimage.Image(t, layers...))
		return ref
	}
	a, b := deep("a", 300), deep("b", 250)
	tgt := e.target("toodeep")
	_, err := e.Node.NodePublishVolume(ctx(t), stackReq("toodeep", tgt, a, b))
	wantCode(t, err, codes.InvalidArgument, "the stack of 2 images has 550 layers; overlayfs stacks at most 500", a, b)
	if got, _ := filepath.Glob(filepath.Join(e.root, "layers", "sha256", "*")); len(got) != 0 {
		t.Errorf("%d layers cached for a stack that cannot be mounted", len(got))
	}
	e.assertClean()
}

// TestStackPrivateUpper: the upper image is in a private registry, the lower
// in a public one. The node-publish secret's entry serves the one registry
// that needs it; without it the publish is PermissionDenied, naming the
// private image, also once its layers are cached (each image keeps its own
// access rule). A secret may hold several registries, one per image.
func TestStackPrivateUpper(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	pub := testimage.Registry(t)
	dsRef := pub + "/public/dataset:v1"
	testimage.Push(t, dsRef, testimage.Image(t, testimage.Layer(t,
		testimage.Tar(t, testimage.File("dataset.txt", "public\n")), testimage.Gzip)))
	priv, privRef := privateImage(t)

	// Anonymous: the lower resolves, the upper is refused.
	none := stackReq("none", e.target("none"), dsRef, privRef)
	_, err := e.Node.NodePublishVolume(ctx(t), none)
	wantCode(t, err, codes.PermissionDenied, "registry refused access to "+privRef, "no credentials for "+priv)

	ok := stackReq("ok", e.target("ok"), dsRef, privRef)
	ok.Secrets = pullSecret(priv, privUser, privPass)
	e.publish(ok)
	for p, want := range map[string]string{"dataset.txt": "public\n", "data.txt": "private\n"} {
		if got := readString(t, filepath.Join(ok.TargetPath, p)); got != want {
			t.Errorf("%s = %q, want %q", p, got, want)
		}
	}
	// Cached now, and still no way around the registry's credentials.
	_, err = e.Node.NodePublishVolume(ctx(t), stackReq("again", e.target("again"), dsRef, privRef))
	wantCode(t, err, codes.PermissionDenied, privRef)

	// Two private registries, with other users, and one secret for both.
	const user2, pass2 = "reader", "0ther"
	priv2 := testimage.Server(t, testimage.BasicAuth(user2, pass2))
	tools := priv2 + "/private/tools:v1"
	testimage.Push(t, tools, testimage.Image(t, testimage.Layer(t,
		testimage.Tar(t, testimage.File("tools.txt", "tools\n")), testimage.Gzip)),
		remote.WithAuth(&authn.Basic{Username: user2, Password: pass2}))
	both := stackReq("both", e.target("both"), privRef, tools)
	both.Secrets = map[string]string{".dockerconfigjson": fmt.Sprintf(`{"auths":{%q:{"auth":%q},%q:{"auth":%q}}}`,
		priv, basicAuth(privUser, privPass), priv2, basicAuth(user2, pass2))}
	e.publish(both)
	if got := readDirNames(both.TargetPath); got != "data.txt,tools.txt" {
		t.Errorf("the two private images show %q", got)
	}

	for _, r := range []*csi.NodePublishVolumeRequest{ok, both} {
		if err := e.unpublish(r.VolumeId, r.TargetPath); err != nil {
			t.Fatal(err)
		}
	}
	e.assertClean()
	if data, _ := os.ReadFile(e.LogPath); strings.Contains(string(data), privPass) || strings.Contains(string(data), pass2) {
		t.Error("the plugin logged a password")
	}
}

// basicAuth is the auth field of a docker config entry.
func basicAuth(user, pass string) string {
	return base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
}

// TestStackValidation: a stackImages attribute that is empty, lists a
// reference that does not parse, or names an image the registry lacks is
// refused with a message naming the attribute and the reference, and leaves
// nothing behind.
func TestStackValidation(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	reg := testimage.Registry(t)
	ref := reg + "/stackvalid/img:v1"
	testimage.Push(t, ref, testimage.Image(t, testimage.Layer(t, testimage.Tar(t, testimage.File("f", "x")), testimage.Gzip)))
	tgt := e.target("sv")
	attrs := func(kv ...string) map[string]string {
		m := map[string]string{"image": ref}
		for i := 0; i+1 < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return m
	}
	for _, c := range []struct {
		name  string
		attrs map[string]string
		code  codes.Code
		words []string
	}{
		{"empty", attrs("stackImages", ""), codes.InvalidArgument, []string{"stackImages", "empty"}},
		{"only separators", attrs("stackImages", " ,\n, "), codes.InvalidArgument, []string{"stackImages", "empty"}},
		{"malformed reference", attrs("stackImages", ref+",UPPER/Case::x"), codes.InvalidArgument, []string{"stackImages", `"UPPER/Case::x"`}},
		{"misspelt attribute", attrs("stackimages", ref), codes.InvalidArgument, []string{`"stackimages"`, "stackImages"}},
		{"JSON list", attrs("stackImages", `["`+ref+`"]`), codes.InvalidArgument, []string{"stackImages", "invalid image reference"}},
		{"missing image", attrs("stackImages", reg+"/stackvalid/nope:v1"), codes.NotFound, []string{"nope"}},
		{"stack without image", map[string]string{"stackImages": ref}, codes.InvalidArgument, []string{`"image" is required`}},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := e.Node.NodePublishVolume(ctx(t), pubReq("sv", tgt, c.attrs))
			wantCode(t, err, c.code, c.words...)
			if exists(tgt) {
				t.Errorf("a refused publish left the target %s", tgt)
			}
		})
	}
	// A YAML block of one reference per line, with the trailing newline.
	e.publish(pubReq("sv", tgt, attrs("stackImages", ref+"\n")))
	if got := readDirNames(tgt); got != "f" {
		t.Errorf("the image stacked on itself shows %q, want f", got)
	}
	if err := e.unpublish("sv", tgt); err != nil {
		t.Fatal(err)
	}
	e.assertClean()
}
