package main

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/strata-csi/strata/test/testimage"
)

// TestLsArtifact: strata ls shows a cached model's artifact type and its
// files (the table the first ones, --json all, with their sizes).
func TestLsArtifact(t *testing.T) {
	root := t.TempDir()
	ref := testimage.Registry(t) + "/models/m:v1"
	a := testimage.Artifact{ArtifactType: testimage.ModelManifest, ConfigMediaType: testimage.ModelConfig,
		Layers: []testimage.Blob{{MediaType: "application/vnd.cncf.model.weight.config.v1.tar", Data: testimage.Tar(t, testimage.File("config.json", "{}"))}}}
	for i := range 25 {
		a.Layers = append(a.Layers, testimage.Blob{MediaType: "application/vnd.cncf.model.weight.v1.raw", Data: []byte(fmt.Sprintf("shard %02d", i)),
			Annotations: map[string]string{testimage.ModelFilepath: fmt.Sprintf("weights/shard-%02d.safetensors", i)}})
	}
	testimage.PushArtifact(t, ref, a)
	expectCode(t, "pull of a model", strata(t, root, "pull", ref), 0)

	r := strata(t, root, "ls")
	expectCode(t, "ls", r, 0)
	for _, want := range []string{"ARTIFACT " + ref + " (" + testimage.ModelManifest + "): 25 files (mounted as one tree), 1 tar layers",
		"weights/shard-00.safetensors", "weights/shard-19.safetensors", "and 5 more files"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("ls: want %q in the output, got:\n%s", want, r.stdout)
		}
	}
	if strings.Contains(r.stdout, "shard-20") {
		t.Errorf("ls lists more files than it says:\n%s", r.stdout)
	}

	r = strata(t, root, "ls", "--json")
	expectCode(t, "ls --json", r, 0)
	var ls lsJSON
	if err := json.Unmarshal([]byte(r.stdout), &ls); err != nil {
		t.Fatalf("ls --json: %v\n%s", err, r.stdout)
	}
	if len(ls.Images) != 1 {
		t.Fatalf("ls --json: %d images, want 1", len(ls.Images))
	}
	im := ls.Images[0]
	if im.ArtifactType != testimage.ModelManifest || len(im.Files) != 25 || len(im.Layers) != 2 {
		t.Fatalf("ls --json: artifact %q, %d files, %d layers; want the model's type, 25 files, 2 layers (the tar, the tree)", im.ArtifactType, len(im.Files), len(im.Layers))
	}
	if f := im.Files[24]; f.Path != "weights/shard-24.safetensors" || f.Size != int64(len("shard 24")) || !strings.HasPrefix(f.DiffID, "sha256:") {
		t.Errorf("ls --json: last file %+v", f)
	}
	// Each file is a layer of the store, held for the image.
	held := map[string]bool{}
	for _, l := range ls.Layers {
		held[l.DiffID] = len(l.Images) == 1 && l.Images[0] == ref
	}
	for _, f := range im.Files {
		if !held[f.DiffID] {
			t.Errorf("ls --json: file %s (%s) is not a layer of %s", f.Path, f.DiffID, ref)
		}
	}
}
