package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"

	"github.com/strata-csi/strata/driver/clones"
	"github.com/strata-csi/strata/layercache/commit"
	csitest "github.com/strata-csi/strata/test/csi"
	"github.com/strata-csi/strata/test/testimage"
)

var (
	pluginOnce sync.Once
	pluginBin  string
	pluginErr  error
)

// startPlugin starts the real node plugin (built once, next to the strata
// binary) on root.
func startPlugin(t *testing.T, root, mode string) *csitest.Plugin {
	t.Helper()
	pluginOnce.Do(func() { pluginBin, pluginErr = csitest.BuildPlugin(filepath.Dir(binary)) })
	if pluginErr != nil {
		t.Fatal(pluginErr)
	}
	return csitest.Start(t, csitest.Options{Bin: pluginBin, Root: root, Mode: mode})
}

// mountCap is a filesystem volume capability, single-node writer.
func mountCap() *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
}

// publishPod publishes image for pod ns/name at a fresh target below dir,
// as kubelet does for an inline volume, and returns the target.
func publishPod(t *testing.T, p *csitest.Plugin, dir, volID, image, ns, name string, readOnly bool) string {
	t.Helper()
	parent := filepath.Join(dir, "pods", name)
	if err := os.MkdirAll(parent, 0o750); err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(parent, "vol")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	_, err := p.Node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{
		VolumeId: volID, TargetPath: target, Readonly: readOnly, VolumeCapability: mountCap(),
		VolumeContext: map[string]string{"image": image, "csi.storage.k8s.io/pod.name": name,
			"csi.storage.k8s.io/pod.namespace": ns, "csi.storage.k8s.io/ephemeral": "true"},
	})
	if err != nil {
		t.Fatalf("NodePublishVolume %s for %s/%s: %v", volID, ns, name, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if _, err := p.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: volID, TargetPath: target}); err != nil {
			t.Errorf("NodeUnpublishVolume %s: %v", volID, err)
		}
	})
	return target
}

// strataWithin runs strata like strata does, but fails the test if it has
// not finished within limit: a diff that opened a FIFO would block forever.
func strataWithin(t *testing.T, limit time.Duration, root string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, append([]string{"--root", root}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("strata %v did not finish within %v (blocked on a special file?)\nstdout:\n%s\nstderr:\n%s", args, limit, stdout.String(), stderr.String())
	}
	if _, ok := err.(*exec.ExitError); err != nil && !ok {
		t.Fatalf("run strata %v: %v", args, err)
	}
	return result{stdout: stdout.String(), stderr: stderr.String(), code: cmd.ProcessState.ExitCode()}
}

// TestDiff: strata diff of a real overlay volume, published by the real
// plugin over a two-layer image that itself deletes a file (whiteout) and
// hides a directory (opaque), tells every change a pod made, as docker diff
// does, with sizes, in text and in JSON; a volume without writes, and a
// read-only one, show nothing changed.
func TestDiff(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	reg := testimage.Registry(t)
	dir := t.TempDir()
	csitest.CleanupMounts(t, dir)
	root := filepath.Join(dir, "root")

	base := makeLayer(t, testimage.Gzip,
		testimage.Dir("etc"), testimage.File("etc/app.conf", "v1"), testimage.File("etc/keep", "keep"),
		testimage.Dir("data"), testimage.File("data/a.txt", "aaaa"), testimage.File("data/gone.txt", "gone"),
		testimage.Dir("old"), testimage.File("old/x", "x"), testimage.Dir("old/sub"), testimage.File("old/sub/y", "y"),
		testimage.Dir("del"), testimage.File("del/f1", "f1"), testimage.Dir("del/deep"), testimage.File("del/deep/f2", "f2"),
		testimage.Dir("redo"), testimage.File("redo/r1", "r1"), testimage.File("redo/r2", "r2"),
		testimage.Dir("redo/sub"), testimage.File("redo/sub/s1", "s1"),
		testimage.File("rmme", "remove me"), testimage.File("over.txt", "short"))
	// The image itself deletes data/gone.txt and replaces old/ wholesale.
	top := makeLayer(t, testimage.Zstd,
		testimage.Dir("data"), testimage.Whiteout("data/gone.txt"), testimage.File("data/c.txt", "cc"),
		testimage.Dir("old"), testimage.Opaque("old"), testimage.File("old/new", "new"),
		testimage.Dir("etc"), testimage.File("etc/app.conf", "v2"))
	ref := reg + "/diff/app:v1"
	push(t, ref, base, top)

	p := startPlugin(t, root, "node")
	vol := publishPod(t, p, dir, "vol-diff", ref, "lab", "writer-0", false)
	clean := publishPod(t, p, dir, "vol-clean", ref, "lab", "reader-0", false)
	publishPod(t, p, dir, "vol-ro", ref, "lab", "viewer-0", true)

	at := func(n string) string { return filepath.Join(vol, n) }
	must := func(what string, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
	must("add a file", os.WriteFile(at("data/new.txt"), []byte("hello"), 0o644))
	must("overwrite a file", os.WriteFile(at("over.txt"), []byte("overwritten!"), 0o644))
	must("change a file the top layer changed", os.WriteFile(at("etc/app.conf"), []byte("v3"), 0o644))
	must("chmod only", os.Chmod(at("etc/keep"), 0o600))
	must("delete a file", os.Remove(at("rmme")))
	must("delete a directory", os.RemoveAll(at("del")))
	must("rm -rf a directory", os.RemoveAll(at("redo")))
	must("recreate it", os.MkdirAll(at("redo/sub"), 0o755))
	must("recreate one of its files", os.WriteFile(at("redo/r1"), []byte("again"), 0o644))
	must("a new file in a recreated subdirectory", os.WriteFile(at("redo/sub/t"), []byte("t"), 0o644))
	must("make a FIFO", unix.Mkfifo(at("data/pipe"), 0o644))
	must("make a symlink", os.Symlink("a.txt", at("data/link")))
	must("bring back what the image deleted", os.WriteFile(at("data/gone.txt"), []byte("back"), 0o644))
	must("bring back what the image hid", os.WriteFile(at("old/x"), []byte("xx"), 0o644))
	must("change what the image added over the hidden dir", os.WriteFile(at("old/new"), []byte("newer"), 0o644))

	const want = `KIND  TYPE          SIZE  PATH
C     dir              -  /data
A     file           4 B  /data/gone.txt
A     symlink        5 B  /data/link
A     file           5 B  /data/new.txt
A     fifo             -  /data/pipe
D     dir              -  /del
C     dir              -  /etc
C     file           2 B  /etc/app.conf
C     file           4 B  /etc/keep
C     dir              -  /old
C     file           5 B  /old/new
A     file           2 B  /old/x
C     file          12 B  /over.txt
C     dir              -  /redo
C     file           5 B  /redo/r1
D     file             -  /redo/r2
C     dir              -  /redo/sub
D     file             -  /redo/sub/s1
A     file           1 B  /redo/sub/t
D     file             -  /rmme
6 added, 10 changed, 4 deleted, 40 B written
`
	for _, name := range []string{"vol-diff", "lab/writer-0"} {
		r := strataWithin(t, time.Minute, root, "diff", name)
		expectCode(t, "diff "+name, r, 0)
		if r.stdout != want {
			t.Errorf("strata diff %s:\n%s\nwant:\n%s", name, r.stdout, want)
		}
	}

	r := strataWithin(t, time.Minute, root, "diff", "--json", "lab/writer-0")
	expectCode(t, "diff --json", r, 0)
	var got diffJSON
	if err := json.Unmarshal([]byte(r.stdout), &got); err != nil {
		t.Fatalf("diff --json: %v\n%s", err, r.stdout)
	}
	wantChanges := []changeJSON{
		{"/data", "C", "dir", 0}, {"/data/gone.txt", "A", "file", 4}, {"/data/link", "A", "symlink", 5},
		{"/data/new.txt", "A", "file", 5}, {"/data/pipe", "A", "fifo", 0}, {"/del", "D", "dir", 0},
		{"/etc", "C", "dir", 0}, {"/etc/app.conf", "C", "file", 2}, {"/etc/keep", "C", "file", 4},
		{"/old", "C", "dir", 0}, {"/old/new", "C", "file", 5}, {"/old/x", "A", "file", 2},
		{"/over.txt", "C", "file", 12}, {"/redo", "C", "dir", 0}, {"/redo/r1", "C", "file", 5},
		{"/redo/r2", "D", "file", 0}, {"/redo/sub", "C", "dir", 0}, {"/redo/sub/s1", "D", "file", 0},
		{"/redo/sub/t", "A", "file", 1}, {"/rmme", "D", "file", 0},
	}
	if len(got.Changes) != len(wantChanges) {
		t.Errorf("diff --json: %d changes, want %d:\n%s", len(got.Changes), len(wantChanges), r.stdout)
	}
	for i := range min(len(got.Changes), len(wantChanges)) {
		if got.Changes[i] != wantChanges[i] {
			t.Errorf("diff --json: change %d = %+v, want %+v", i, got.Changes[i], wantChanges[i])
		}
	}
	wantSummary := diffSummaryJSON{Added: 6, Changed: 10, Deleted: 4, Bytes: 40}
	if got.Summary != wantSummary || got.VolumeID != "vol-diff" || got.Pod != "lab/writer-0" || got.TargetPath != vol || got.ReadOnly {
		t.Errorf("diff --json: volume %q pod %q target %q readOnly %v summary %+v, want vol-diff, lab/writer-0, %s, false, %+v",
			got.VolumeID, got.Pod, got.TargetPath, got.ReadOnly, got.Summary, vol, wantSummary)
	}

	// The FIFO is still there, unopened: nothing wrote to it, and the
	// other volume of the same image sees none of the changes.
	if _, err := os.Stat(filepath.Join(clean, "rmme")); err != nil {
		t.Errorf("the writer's deletion shows in another volume of the image: %v", err)
	}
	const none = "0 added, 0 changed, 0 deleted, 0 B written\n"
	r = strataWithin(t, time.Minute, root, "diff", "lab/reader-0")
	expectCode(t, "diff of a volume without writes", r, 0)
	if r.stdout != none {
		t.Errorf("diff of a volume without writes:\n%s\nwant:\n%s", r.stdout, none)
	}
	r = strataWithin(t, time.Minute, root, "diff", "--json", "vol-clean")
	expectCode(t, "diff --json of a volume without writes", r, 0)
	got = diffJSON{}
	if err := json.Unmarshal([]byte(r.stdout), &got); err != nil || got.Changes == nil || len(got.Changes) != 0 || got.Summary != (diffSummaryJSON{}) {
		t.Errorf("diff --json of a volume without writes: want \"changes\": [] and a zero summary, got %v:\n%s", err, r.stdout)
	}
	r = strataWithin(t, time.Minute, root, "diff", "lab/viewer-0")
	expectCode(t, "diff of a read-only volume", r, 0)
	if r.stdout != none || !strings.Contains(r.stderr, "read-only") {
		t.Errorf("diff of a read-only volume: want the empty summary and a note that it is read-only, got %s", r)
	}
}

// TestDiffUsage: diff says which volume it cannot find, and how to list
// them, with the usage exit code.
func TestDiffUsage(t *testing.T) {
	root := t.TempDir()
	for _, tc := range []struct {
		name  string
		args  []string
		words []string
	}{
		{"no argument", nil, []string{"needs a volume"}},
		{"two arguments", []string{"a", "b"}, []string{"needs a volume"}},
		{"unknown volume", []string{"nope"}, []string{`"nope"`, "strata ls"}},
		{"unknown pod", []string{"ns/nope"}, []string{`"ns/nope"`, "strata ls"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := strata(t, root, append([]string{"diff"}, tc.args...)...)
			expectCode(t, "diff "+strings.Join(tc.args, " "), r, exitUsage)
			for _, w := range tc.words {
				if !strings.Contains(r.stderr, w) {
					t.Errorf("stderr %q does not say %q", r.stderr, w)
				}
			}
		})
	}
}

// TestDiffClone: diff of a persistent clone's publish reads the clone's
// upper (in the clone's own filesystem); when that filesystem is not
// mounted (after a reboot, before kubelet stages the clone again), diff
// says so and what to do.
func TestDiffClone(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	reg := testimage.Registry(t)
	dir := t.TempDir()
	csitest.CleanupMounts(t, dir)
	root := filepath.Join(dir, "root")
	ref := reg + "/diff/clone:v1"
	push(t, ref, makeLayer(t, testimage.Gzip, testimage.Dir("data"), testimage.File("data/a", "a")))

	p := startPlugin(t, root, "all")
	c, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	top := &csi.Topology{Segments: map[string]string{clones.TopologyKey: "test-node"}}
	created, err := p.Controller.CreateVolume(c, &csi.CreateVolumeRequest{
		Name: "pvc-diff", Parameters: map[string]string{"image": ref}, VolumeCapabilities: []*csi.VolumeCapability{mountCap()},
		CapacityRange:             &csi.CapacityRange{RequiredBytes: 64 << 20},
		AccessibilityRequirements: &csi.TopologyRequirement{Requisite: []*csi.Topology{top}, Preferred: []*csi.Topology{top}},
	})
	if err != nil {
		t.Fatalf("CreateVolume: %v", err)
	}
	vol := created.Volume
	staging := filepath.Join(dir, "staging", "globalmount")
	target := filepath.Join(dir, "pods", "trainer-0", "vol")
	for _, d := range []string{filepath.Dir(staging), filepath.Dir(target)} {
		if err := os.MkdirAll(d, 0o750); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := p.Node.NodeStageVolume(c, &csi.NodeStageVolumeRequest{VolumeId: vol.VolumeId, StagingTargetPath: staging,
		VolumeCapability: mountCap(), VolumeContext: vol.VolumeContext}); err != nil {
		t.Fatalf("NodeStageVolume: %v", err)
	}
	vctx := map[string]string{"csi.storage.k8s.io/pod.name": "trainer-0", "csi.storage.k8s.io/pod.namespace": "lab"}
	for k, v := range vol.VolumeContext {
		vctx[k] = v
	}
	if _, err := p.Node.NodePublishVolume(c, &csi.NodePublishVolumeRequest{VolumeId: vol.VolumeId, StagingTargetPath: staging,
		TargetPath: target, VolumeCapability: mountCap(), VolumeContext: vctx}); err != nil {
		t.Fatalf("NodePublishVolume: %v", err)
	}
	if err := os.WriteFile(filepath.Join(target, "data", "a"), []byte("changed"), 0o644); err != nil {
		t.Fatal(err)
	}
	r := strataWithin(t, time.Minute, root, "diff", "lab/trainer-0")
	expectCode(t, "diff of a clone", r, 0)
	const want = "KIND  TYPE          SIZE  PATH\nC     dir              -  /data\nC     file           7 B  /data/a\n0 added, 2 changed, 0 deleted, 7 B written\n"
	if r.stdout != want {
		t.Errorf("diff of a clone:\n%s\nwant:\n%s", r.stdout, want)
	}

	// A reboot: every mount is gone, the records stay.
	if err := csitest.UnmountAll(dir); err != nil {
		t.Fatal(err)
	}
	r = strataWithin(t, time.Minute, root, "diff", "lab/trainer-0")
	expectCode(t, "diff of a clone that is not mounted", r, exitFailure)
	for _, w := range []string{"persistent clone", "not mounted", "disk.img", "while a pod that uses it runs"} {
		if !strings.Contains(r.stderr, w) {
			t.Errorf("diff of a clone that is not mounted: stderr does not say %q:\n%s", w, r.stderr)
		}
	}
	if _, err := p.Node.NodeUnpublishVolume(c, &csi.NodeUnpublishVolumeRequest{VolumeId: vol.VolumeId, TargetPath: target}); err != nil {
		t.Errorf("NodeUnpublishVolume: %v", err)
	}
	if _, err := p.Node.NodeUnstageVolume(c, &csi.NodeUnstageVolumeRequest{VolumeId: vol.VolumeId, StagingTargetPath: staging}); err != nil {
		t.Errorf("NodeUnstageVolume: %v", err)
	}
}

// TestDiffHelp: the example table in diff --help is what diff prints.
func TestDiffHelp(t *testing.T) {
	var b strings.Builder
	out := &tableDiff{w: &b}
	for _, c := range []commit.Change{
		{Path: "/data", Kind: commit.Changed, Type: "dir"},
		{Path: "/data/new.bin", Kind: commit.Added, Type: "file", Size: 1_200_000},
		{Path: "/data/old.txt", Kind: commit.Deleted, Type: "file"},
	} {
		if err := out.change(c); err != nil {
			t.Fatal(err)
		}
	}
	if err := out.end(diffSummaryJSON{Added: 1, Changed: 1, Deleted: 1, Bytes: 1_200_000}); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSuffix(b.String(), "\n"), "\n")
	for _, l := range lines[:len(lines)-1] {
		if !strings.Contains(diffHelp, "\n    "+l+"\n") {
			t.Errorf("diff --help does not show the line %q that diff prints:\n%s", l, diffHelp)
		}
	}
	r := strata(t, t.TempDir(), "diff", "--help")
	expectCode(t, "diff --help", r, 0)
	if !strings.Contains(r.stdout, diffHelp) || !strings.Contains(r.stdout, "--json") {
		t.Errorf("diff --help does not print the output's description and flags:\n%s", r.stdout)
	}
}

// TestDiffJSONStream: the JSON that diff writes a change at a time is the
// document encoding/json writes for the whole diffJSON, byte for byte.
func TestDiffJSONStream(t *testing.T) {
	head := diffHeadJSON{VolumeID: "v", Pod: "ns/p", TargetPath: "/t"}
	for _, changes := range [][]commit.Change{nil, {
		{Path: "/a", Kind: commit.Changed, Type: "dir"},
		{Path: "/a/\"q\"\n", Kind: commit.Added, Type: "file", Size: 3},
	}} {
		var b strings.Builder
		out, err := newJSONDiff(&b, head)
		if err != nil {
			t.Fatal(err)
		}
		want := diffJSON{diffHeadJSON: head, Changes: []changeJSON{}, Summary: diffSummaryJSON{Added: 1, Bytes: 3}}
		for _, c := range changes {
			if err := out.change(c); err != nil {
				t.Fatal(err)
			}
			want.Changes = append(want.Changes, changeJSON{Path: c.Path, Kind: string(c.Kind), Type: c.Type, Size: c.Size})
		}
		if err := out.end(want.Summary); err != nil {
			t.Fatal(err)
		}
		w, err := json.MarshalIndent(want, "", "  ")
		if err != nil {
			t.Fatal(err)
		}
		if b.String() != string(w)+"\n" {
			t.Errorf("streamed JSON:\n%s\nwant:\n%s", b.String(), w)
		}
	}
}
