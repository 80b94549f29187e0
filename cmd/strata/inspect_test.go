package main

import (
	"archive/tar"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	"golang.org/x/sys/unix"

	"github.com/strata-csi/strata/test/testimage"
)

// The JSON document of `strata inspect --json`, as scripts read it. The test
// decodes into its own copy, so that a renamed field fails here.
type (
	inspectDoc struct {
		Ref          string          `json:"ref"`
		Digest       string          `json:"digest"`
		ArtifactType string          `json:"artifactType"`
		Layers       []inspectLayer  `json:"layers"`
		TotalBytes   int64           `json:"totalBytes"`
		WastedBytes  int64           `json:"wastedBytes"`
		Efficiency   float64         `json:"efficiency"`
		Wasted       []inspectWasted `json:"wasted"`
	}
	inspectLayer struct {
		Index       int             `json:"index"`
		DiffID      string          `json:"diffID"`
		Kind        string          `json:"kind"`
		Size        int64           `json:"size"`
		Files       int64           `json:"files"`
		Added       inspectCount    `json:"added"`
		Changed     inspectCount    `json:"changed"`
		Deleted     inspectCount    `json:"deleted"`
		HiddenBytes int64           `json:"hiddenBytes"`
		Changes     []inspectChange `json:"changes"`
	}
	inspectCount struct {
		Paths int64 `json:"paths"`
		Bytes int64 `json:"bytes"`
	}
	inspectChange struct {
		Kind string `json:"kind"`
		Path string `json:"path"`
		Size int64  `json:"size"`
	}
	inspectWasted struct {
		Path   string `json:"path"`
		Copies int64  `json:"copies"`
		Bytes  int64  `json:"bytes"`
	}
)

// inspectFixture is an image of three layers whose answers are known:
//
//	layer 1 adds 15 paths (8 regular files, 1705 bytes; bin/tool-link is a
//	hardlink of bin/tool and counts no bytes of its own; link is a symlink);
//	layer 2 overwrites etc/config (100 -> 200 bytes), adds etc/new.txt and
//	app/c.txt, deletes data/old.bin (a whiteout), and makes app/ opaque: it
//	changes app and app/a.txt, and deletes app/b.txt and app/sub (with
//	app/sub/deep.txt);
//	layer 3 overwrites etc/config again (300 bytes), points the symlink
//	elsewhere, deletes bin/ (tool and its hardlink: 500 bytes) and adds
//	data/new.txt.
//
// Wasted: 100+200 (etc/config) + 1000 (old.bin) + 20 (app/a.txt) + 30
// (app/b.txt) + 40 (deep.txt) + 500 (bin/tool) = 1890 of 2249 bytes; what
// stays visible is 359 bytes.
func inspectFixture(t *testing.T) []testLayer {
	l1 := makeLayer(t, testimage.Gzip,
		testimage.Dir("etc/"), testimage.File("etc/config", strings.Repeat("1", 100)), testimage.File("etc/passwd", strings.Repeat("p", 10)),
		testimage.Dir("app/"), testimage.File("app/a.txt", strings.Repeat("a", 20)), testimage.File("app/b.txt", strings.Repeat("b", 30)),
		testimage.Dir("app/sub/"), testimage.File("app/sub/deep.txt", strings.Repeat("d", 40)),
		testimage.Dir("data/"), testimage.File("data/old.bin", strings.Repeat("o", 1000)), testimage.File("data/keep.txt", "kkkkk"),
		testimage.Dir("bin/"), testimage.File("bin/tool", strings.Repeat("t", 500)),
		testimage.Entry{Name: "bin/tool-link", Link: "bin/tool", Hard: true, Mode: 0o644},
		testimage.Symlink("link", "etc/config"))
	l2 := makeLayer(t, testimage.Zstd,
		testimage.Dir("etc/"), testimage.File("etc/config", strings.Repeat("2", 200)), testimage.File("etc/new.txt", "nnnnnnn"),
		testimage.Dir("data/"), testimage.Whiteout("data/old.bin"),
		testimage.Dir("app/"), testimage.Opaque("app"), testimage.File("app/a.txt", strings.Repeat("A", 25)), testimage.File("app/c.txt", "ccc"))
	l3 := makeLayer(t, testimage.None,
		testimage.Dir("etc/"), testimage.File("etc/config", strings.Repeat("3", 300)),
		testimage.Symlink("link", "etc/new.txt"),
		testimage.Whiteout("bin"),
		testimage.Dir("data/"), testimage.File("data/new.txt", strings.Repeat("9", 9)))
	return []testLayer{l1, l2, l3}
}

// wantLayer is what inspect must report for one layer of the fixture.
type wantLayer struct {
	size, files             int64
	added, changed, deleted inspectCount
	hidden                  int64
	changes                 []inspectChange
}

var inspectWant = []wantLayer{
	{size: 1705, files: 8, added: inspectCount{15, 1705}, changes: []inspectChange{
		{"A", "/app", 0}, {"A", "/app/a.txt", 20}, {"A", "/app/b.txt", 30}, {"A", "/app/sub", 0}, {"A", "/app/sub/deep.txt", 40},
		{"A", "/bin", 0}, {"A", "/bin/tool", 500}, {"A", "/bin/tool-link", 0},
		{"A", "/data", 0}, {"A", "/data/keep.txt", 5}, {"A", "/data/old.bin", 1000},
		{"A", "/etc", 0}, {"A", "/etc/config", 100}, {"A", "/etc/passwd", 10}, {"A", "/link", 0},
	}},
	{size: 235, files: 4, added: inspectCount{2, 10}, changed: inspectCount{3, 225}, deleted: inspectCount{3, 1070}, hidden: 1190, changes: []inspectChange{
		{"C", "/app", 0}, {"C", "/app/a.txt", 25}, {"D", "/app/b.txt", 30}, {"A", "/app/c.txt", 3}, {"D", "/app/sub", 40},
		{"D", "/data/old.bin", 1000}, {"C", "/etc/config", 200}, {"A", "/etc/new.txt", 7},
	}},
	{size: 309, files: 2, added: inspectCount{1, 9}, changed: inspectCount{2, 300}, deleted: inspectCount{1, 500}, hidden: 700, changes: []inspectChange{
		{"D", "/bin", 500}, {"A", "/data/new.txt", 9}, {"C", "/etc/config", 300}, {"C", "/link", 0},
	}},
}

var inspectWantWasted = []inspectWasted{
	{"/data/old.bin", 1, 1000}, {"/bin/tool", 1, 500}, {"/etc/config", 2, 300},
	{"/app/sub/deep.txt", 1, 40}, {"/app/b.txt", 1, 30}, {"/app/a.txt", 1, 20},
}

// TestInspect: strata inspect reports, for a cached image with overwrites,
// whiteouts, an opaque directory, a hardlink and a symlink, each layer's
// adds, changes and deletes with their bytes, the wasted bytes and the
// efficiency score, in text and in JSON, from the cache alone: the registry
// is stopped, and a listener on its address sees no connection.
func TestInspect(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	srv := httptest.NewServer(registry.New(registry.Logger(discardLog())))
	reg := strings.TrimPrefix(srv.URL, "http://")
	root := t.TempDir()
	layers := inspectFixture(t)
	ref := reg + "/inspect/app:v1"
	digest := push(t, ref, layers...)
	expectCode(t, "pull", strata(t, root, "pull", ref), 0)

	// Offline: the registry is gone, and anything that dials its address
	// is counted.
	srv.Close()
	var dialed atomic.Int64
	ln, err := net.Listen("tcp", reg)
	if err != nil {
		t.Fatalf("listen on the stopped registry's address %s: %v", reg, err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			dialed.Add(1)
			c.Close()
		}
	}()

	const wantTotal, wantWasted = 2249, 1890
	wantEff := float64(wantTotal-wantWasted) / wantTotal

	// By the reference as pulled, by a digest reference that was never
	// pulled as such, by the digest and by prefixes of it.
	for _, arg := range []string{ref, reg + "/inspect/app@" + digest.String(), digest.String(), digest.Hex[:12], "sha256:" + digest.Hex[:16]} {
		r := strata(t, root, "inspect", "--json", "--files", "--top", "10", arg)
		expectCode(t, "inspect --json "+arg, r, 0)
		var doc inspectDoc
		if err := json.Unmarshal([]byte(r.stdout), &doc); err != nil {
			t.Fatalf("inspect --json %s: %v\n%s", arg, err, r.stdout)
		}
		if doc.Ref != ref || doc.Digest != digest.String() || doc.ArtifactType != "" {
			t.Errorf("inspect --json %s: ref %q digest %q artifactType %q, want %q %q and none", arg, doc.Ref, doc.Digest, doc.ArtifactType, ref, digest)
		}
		if len(doc.Layers) != 3 {
			t.Fatalf("inspect --json %s: %d layers, want 3\n%s", arg, len(doc.Layers), r.stdout)
		}
		for i, w := range inspectWant {
			got := doc.Layers[i]
			if got.Index != i+1 || got.DiffID != layers[i].diffID(t).String() || got.Kind != "layer" {
				t.Errorf("layer %d: index %d diffID %s kind %q, want %d %s layer", i+1, got.Index, got.DiffID, got.Kind, i+1, layers[i].diffID(t))
			}
			if got.Size != w.size || got.Files != w.files || got.Added != w.added || got.Changed != w.changed || got.Deleted != w.deleted || got.HiddenBytes != w.hidden {
				t.Errorf("layer %d: size %d files %d added %+v changed %+v deleted %+v hidden %d;\nwant size %d files %d added %+v changed %+v deleted %+v hidden %d",
					i+1, got.Size, got.Files, got.Added, got.Changed, got.Deleted, got.HiddenBytes,
					w.size, w.files, w.added, w.changed, w.deleted, w.hidden)
			}
			if fmt.Sprint(got.Changes) != fmt.Sprint(w.changes) {
				t.Errorf("layer %d changes:\n got %v\nwant %v", i+1, got.Changes, w.changes)
			}
			// The cache's own count of the layer agrees with the walk.
			if got.Size != layers[i].size && i == 0 {
				t.Errorf("layer 1: size %d, the fixture has %d bytes of regular files", got.Size, layers[i].size)
			}
		}
		if doc.TotalBytes != wantTotal || doc.WastedBytes != wantWasted || doc.Efficiency != wantEff {
			t.Errorf("inspect --json %s: total %d wasted %d efficiency %v, want %d %d %v", arg, doc.TotalBytes, doc.WastedBytes, doc.Efficiency, wantTotal, wantWasted, wantEff)
		}
		if fmt.Sprint(doc.Wasted) != fmt.Sprint(inspectWantWasted) {
			t.Errorf("inspect --json %s: wasted paths\n got %v\nwant %v", arg, doc.Wasted, inspectWantWasted)
		}
	}

	// --top limits the list; without --files there are no change lists.
	r := strata(t, root, "inspect", ref, "--json", "--top", "2")
	expectCode(t, "inspect --json --top 2", r, 0)
	var doc inspectDoc
	if err := json.Unmarshal([]byte(r.stdout), &doc); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(doc.Wasted) != fmt.Sprint(inspectWantWasted[:2]) || doc.Layers[1].Changes != nil {
		t.Errorf("inspect --json --top 2: wasted %v changes %v, want %v and no changes", doc.Wasted, doc.Layers[1].Changes, inspectWantWasted[:2])
	}

	// The text view, with exact bytes.
	r = strata(t, root, "inspect", "--bytes", "--files", ref)
	expectCode(t, "inspect --bytes --files", r, 0)
	lines := map[string]bool{}
	for _, l := range strings.Split(r.stdout, "\n") {
		lines[strings.Join(strings.Fields(l), " ")] = true
	}
	want := []string{
		"image " + ref,
		"digest " + digest.String(),
		"LAYER DIFFID SIZE FILES ADDED CHANGED DELETED HIDES",
		fmt.Sprintf("1 %s 1705 8 15 (1705) 0 (0) 0 (0) 0", shortDigest(layers[0].diffID(t))),
		fmt.Sprintf("2 %s 235 4 2 (10) 3 (225) 3 (1070) 1190", shortDigest(layers[1].diffID(t))),
		fmt.Sprintf("3 %s 309 2 1 (9) 2 (300) 1 (500) 700", shortDigest(layers[2].diffID(t))),
		"total 2249 file content in 3 layers, every copy counted",
		"wasted 1890 copies that a higher layer overwrites or deletes",
		"efficiency 15.96 % 1 - wasted/total",
		"WASTED PATH COPIES BYTES",
		"/data/old.bin 1 1000", "/etc/config 2 300", "/app/a.txt 1 20",
		"layer 2 " + layers[1].diffID(t).String(),
		"C 25 /app/a.txt", "D 40 /app/sub", "D 1000 /data/old.bin", "A 3 /app/c.txt",
		"D 500 /bin", "C 0 /link",
	}
	for _, w := range want {
		if !lines[w] {
			t.Errorf("inspect --bytes --files: want a line %q, got:\n%s", w, r.stdout)
		}
	}
	// Human units by default.
	r = strata(t, root, "inspect", ref)
	expectCode(t, "inspect", r, 0)
	if !regexp.MustCompile(`(?m)^wasted\s+1\.9 kB\s`).MatchString(r.stdout) || strings.Contains(r.stdout, "/app/c.txt") {
		t.Errorf("inspect: want wasted 1.9 kB and no file lists, got:\n%s", r.stdout)
	}

	if n := dialed.Load(); n != 0 {
		t.Errorf("inspect connected %d times to the registry's address; it must work from the cache alone", n)
	}
}

// TestInspectErrors: an image that is not cached, or a digest prefix that
// names two images, is a clear error; a missing argument is a usage error.
func TestInspectErrors(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	reg := testimage.Registry(t)
	root := t.TempDir()
	// A fifo: inspect must lstat it, never open it (an open would block).
	a := makeLayer(t, testimage.Gzip, testimage.File("a", "a"), testimage.Entry{Name: "pipe", Type: tar.TypeFifo, Mode: 0o644})
	b := makeLayer(t, testimage.Gzip, testimage.File("b", "b"))
	push(t, reg+"/e/a:v1", a)
	push(t, reg+"/e/b:v1", b)
	expectCode(t, "pull a", strata(t, root, "pull", reg+"/e/a:v1"), 0)
	expectCode(t, "pull b", strata(t, root, "pull", reg+"/e/b:v1"), 0)

	r := strata(t, root, "inspect", "--json", "--files", reg+"/e/a:v1")
	expectCode(t, "inspect of an image with a fifo", r, 0)
	var doc inspectDoc
	if err := json.Unmarshal([]byte(r.stdout), &doc); err != nil {
		t.Fatal(err)
	}
	if want := []inspectChange{{"A", "/a", 1}, {"A", "/pipe", 0}}; len(doc.Layers) != 1 || fmt.Sprint(doc.Layers[0].Changes) != fmt.Sprint(want) {
		t.Errorf("inspect of an image with a fifo: want one layer adding %v, got %s", want, r.stdout)
	}

	for _, tc := range []struct {
		name string
		args []string
		code int
		want []string
	}{
		{"not cached", []string{"inspect", reg + "/e/c:v1"}, exitNotCached, []string{reg + "/e/c:v1", "is not in the cache", "strata pull", "strata ls"}},
		{"unknown digest", []string{"inspect", "sha256:" + strings.Repeat("0", 64)}, exitNotCached, []string{"is not in the cache", "strata ls"}},
		{"short prefix", []string{"inspect", "sha256:abc"}, exitUsage, []string{"at least 12"}},
		{"no argument", []string{"inspect"}, exitUsage, []string{"usage: strata inspect"}},
		{"two arguments", []string{"inspect", "a", "b"}, exitUsage, []string{"one image"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := strata(t, root, tc.args...)
			expectCode(t, strings.Join(tc.args, " "), r, tc.code)
			for _, w := range tc.want {
				if !strings.Contains(r.stderr, w) {
					t.Errorf("want %q in stderr, got %s", w, r)
				}
			}
		})
	}

	// An image whose layer is gone from the cache (removed by hand here) is
	// not inspected half.
	if err := os.RemoveAll(filepath.Join(root, "layers", "sha256", b.diffID(t).Hex)); err != nil {
		t.Fatal(err)
	}
	r = strata(t, root, "inspect", reg+"/e/b:v1")
	expectCode(t, "inspect of an image with a layer gone", r, exitNotCached)
	if !strings.Contains(r.stderr, "only partly in the cache") || !strings.Contains(r.stderr, "strata pull "+reg+"/e/b:v1") {
		t.Errorf("inspect of an image with a layer gone: want a message naming strata pull, got %s", r)
	}

	// A pruned image is not in the cache any more.
	expectCode(t, "prune", strata(t, root, "prune"), 0)
	r = strata(t, root, "inspect", reg+"/e/a:v1")
	expectCode(t, "inspect after prune", r, exitNotCached)
	if !strings.Contains(r.stderr, "strata pull "+reg+"/e/a:v1") {
		t.Errorf("inspect after prune: want the error to name strata pull, got %s", r)
	}
}

// TestInspectArtifact: a cached model shows its tar layer and its raw files
// as one layer (the tree) that adds them, with their sizes.
func TestInspectArtifact(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	root := t.TempDir()
	ref := testimage.Registry(t) + "/models/m:v1"
	a := testimage.Artifact{ArtifactType: testimage.ModelManifest, ConfigMediaType: testimage.ModelConfig,
		Layers: []testimage.Blob{{MediaType: "application/vnd.cncf.model.weight.config.v1.tar", Data: testimage.Tar(t, testimage.File("config.json", "{}"))}}}
	for i := range 3 {
		a.Layers = append(a.Layers, testimage.Blob{MediaType: "application/vnd.cncf.model.weight.v1.raw", Data: []byte(strings.Repeat("w", 1000*(i+1))),
			Annotations: map[string]string{testimage.ModelFilepath: fmt.Sprintf("weights/shard-%d.safetensors", i)}})
	}
	testimage.PushArtifact(t, ref, a)
	expectCode(t, "pull of a model", strata(t, root, "pull", ref), 0)

	r := strata(t, root, "inspect", "--json", "--files", ref)
	expectCode(t, "inspect --json of a model", r, 0)
	var doc inspectDoc
	if err := json.Unmarshal([]byte(r.stdout), &doc); err != nil {
		t.Fatalf("inspect --json: %v\n%s", err, r.stdout)
	}
	if doc.ArtifactType != testimage.ModelManifest || len(doc.Layers) != 2 {
		t.Fatalf("inspect --json: artifactType %q, %d layers; want %q and 2 (the tar, the tree of files)\n%s", doc.ArtifactType, len(doc.Layers), testimage.ModelManifest, r.stdout)
	}
	tarLayer, tree := doc.Layers[0], doc.Layers[1]
	if tarLayer.Kind != "artifact-tar" || tarLayer.Files != 1 || tarLayer.Added != (inspectCount{1, 2}) {
		t.Errorf("tar layer: kind %q files %d added %+v, want artifact-tar, 1, {1 2}", tarLayer.Kind, tarLayer.Files, tarLayer.Added)
	}
	wantChanges := []inspectChange{{"A", "/weights", 0}, {"A", "/weights/shard-0.safetensors", 1000},
		{"A", "/weights/shard-1.safetensors", 2000}, {"A", "/weights/shard-2.safetensors", 3000}}
	if tree.Kind != "files" || tree.Files != 3 || tree.Size != 6000 || tree.Added != (inspectCount{4, 6000}) ||
		fmt.Sprint(tree.Changes) != fmt.Sprint(wantChanges) {
		t.Errorf("tree: kind %q files %d size %d added %+v changes %v;\nwant files, 3, 6000, {4 6000}, %v", tree.Kind, tree.Files, tree.Size, tree.Added, tree.Changes, wantChanges)
	}
	if doc.TotalBytes != 6002 || doc.WastedBytes != 0 || doc.Efficiency != 1 || len(doc.Wasted) != 0 {
		t.Errorf("model: total %d wasted %d efficiency %v wasted paths %v, want 6002, 0, 1, none", doc.TotalBytes, doc.WastedBytes, doc.Efficiency, doc.Wasted)
	}

	r = strata(t, root, "inspect", ref)
	expectCode(t, "inspect of a model", r, 0)
	text := strings.Join(strings.Fields(r.stdout), " ")
	if !strings.Contains(text, "artifact "+testimage.ModelManifest) || !strings.Contains(text, "efficiency 100.00 %") {
		t.Errorf("inspect of a model: want its artifact type and efficiency 100.00 %%, got:\n%s", r.stdout)
	}
}

func discardLog() *log.Logger { return log.New(io.Discard, "", 0) }

// TestInspectTreeCost measures what the merged view costs per path, and
// holds it to the bound docs/layercache.md states: a layer of 50,000
// files in 500 directories, merged twice (the second time every file is a
// change).
func TestInspectTreeCost(t *testing.T) {
	const dirs, perDir = 500, 100
	layer := t.TempDir()
	for d := range dirs {
		dir := filepath.Join(layer, fmt.Sprintf("dir-%04d", d))
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for f := range perDir {
			if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("file-%06d.txt", f)), nil, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	paths := dirs * (perDir + 1)
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	start := time.Now()
	m := &merger{ctx: context.Background(), root: &node{kind: dirNode}}
	for i := range 2 {
		m.st, m.layer = &layerStats{}, int32(i+1)
		if err := m.mergeLayer(layer); err != nil {
			t.Fatal(err)
		}
	}
	took := time.Since(start)
	if m.st.changed.Paths != int64(dirs*perDir) {
		t.Fatalf("second merge: %d changes, want %d", m.st.changed.Paths, dirs*perDir)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	per := float64(after.HeapAlloc-before.HeapAlloc) / float64(paths)
	runtime.KeepAlive(m)
	t.Logf("merged view: %.0f bytes per path (names of 8 to 15 bytes), %d paths, two merges in %v", per, paths, took)
	if per > 150 {
		t.Errorf("merged view: %.0f bytes per path, want at most 150", per)
	}
}

// TestInspectMergeRules: the merge of unpacked layer directories (real
// whiteout devices and trusted.overlay.opaque xattrs) in the cases the
// fixture image does not reach.
func TestInspectMergeRules(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	// A layer is written from specs: "d/" a directory, "d/!" an opaque
	// directory, "x=N" a file of N bytes, "x@" a symlink, "x-" a whiteout.
	mk := func(t *testing.T, specs ...string) string {
		dir := t.TempDir()
		for _, s := range specs {
			var err error
			switch {
			case strings.HasSuffix(s, "/!"):
				p := filepath.Join(dir, strings.TrimSuffix(s, "/!"))
				if err = os.MkdirAll(p, 0o755); err == nil {
					err = unix.Setxattr(p, "trusted.overlay.opaque", []byte("y"), 0)
				}
			case strings.HasSuffix(s, "/"):
				err = os.MkdirAll(filepath.Join(dir, s), 0o755)
			case strings.HasSuffix(s, "@"):
				err = os.Symlink("target", filepath.Join(dir, strings.TrimSuffix(s, "@")))
			case strings.HasSuffix(s, "-"):
				err = unix.Mknod(filepath.Join(dir, strings.TrimSuffix(s, "-")), unix.S_IFCHR, 0)
			default:
				p, n, _ := strings.Cut(s, "=")
				size, _ := strconv.Atoi(n)
				err = os.WriteFile(filepath.Join(dir, p), []byte(strings.Repeat("x", size)), 0o644)
			}
			if err != nil {
				t.Fatalf("make %s: %v", s, err)
			}
		}
		return dir
	}
	tests := []struct {
		name   string
		layers [][]string
		want   string // the top layer's changes
		hidden int64  // by the top layer
		wasted string // every wasted path
	}{
		{"directory replaced by a file", [][]string{{"d/", "d/a=10", "d/e/", "d/e/b=20"}, {"d=5"}},
			"[{C /d 5}]", 30, "[{/d/e/b 1 20} {/d/a 1 10}]"},
		{"file replaced by a directory", [][]string{{"d=5"}, {"d/", "d/a=1"}},
			"[{C /d 0} {A /d/a 1}]", 5, "[{/d 1 5}]"},
		{"whiteout of nothing", [][]string{{"a=1"}, {"b-"}}, "[]", 0, "[]"},
		{"deleted and added again", [][]string{{"a=3"}, {"a-"}, {"a=4"}}, "[{A /a 4}]", 0, "[{/a 1 3}]"},
		{"opaque hides below a re-added directory", [][]string{{"o/", "o/s/", "o/s/x=7", "o/s/y=8"}, {"o/!", "o/s/", "o/s/x=1"}},
			"[{C /o 0} {C /o/s 0} {C /o/s/x 1} {D /o/s/y 8}]", 15, "[{/o/s/y 1 8} {/o/s/x 1 7}]"},
		{"opaque over nothing", [][]string{{"a=1"}, {"n/!", "n/f=2"}}, "[{A /n 0} {A /n/f 2}]", 0, "[]"},
		{"merged directory is no change", [][]string{{"d/", "d/a=1"}, {"d/", "d/b=2"}}, "[{A /d/b 2}]", 0, "[]"},
		{"symlink over a file", [][]string{{"l=9"}, {"l@"}}, "[{C /l 0}]", 9, "[{/l 1 9}]"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := &merger{ctx: context.Background(), root: &node{kind: dirNode}, files: true}
			for i, specs := range tc.layers {
				m.st, m.layer = &layerStats{}, int32(i+1)
				if err := m.mergeLayer(mk(t, specs...)); err != nil {
					t.Fatal(err)
				}
			}
			slices.SortFunc(m.st.changes, func(a, b layerChangeJSON) int { return strings.Compare(a.Path, b.Path) })
			got := fmt.Sprint(m.st.changes)
			if m.st.changes == nil {
				got = "[]"
			}
			if wasted := fmt.Sprint(topWasted(m.root, 10)); got != tc.want || m.st.hidden != tc.hidden || wasted != tc.wasted {
				t.Errorf("top layer: changes %s hidden %d wasted %s;\nwant %s hidden %d wasted %s", got, m.st.hidden, wasted, tc.want, tc.hidden, tc.wasted)
			}
		})
	}
}
