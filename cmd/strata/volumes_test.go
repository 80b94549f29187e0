package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/strata-csi/strata/driver/state"
	"github.com/strata-csi/strata/layercache"
	"github.com/strata-csi/strata/test/testimage"
)

// publishRecord does what the CSI plugin does on a publish, as far as ls
// can see: volumes/<key>/volume.json, and the layer references of owner key.
func publishRecord(t *testing.T, root, key string, rec state.Record) {
	t.Helper()
	dir := filepath.Join(root, state.Dir, key)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := state.Write(filepath.Join(dir, state.RecordFile), &rec); err != nil {
		t.Fatal(err)
	}
	acquire(t, root, key, rec.Layers)
}

func acquire(t *testing.T, root, owner string, layers []v1.Hash) {
	t.Helper()
	s, err := layercache.Open(root)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Acquire(owner, layers); err != nil {
		t.Fatal(err)
	}
}

// TestListShowsVolumes: ls names the pods (and volume ids) whose publishes
// hold each layer, in the table and in --json, from the plugin's volume
// records; holders that are not publishes are named as recorded.
func TestListShowsVolumes(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	reg := testimage.Registry(t)
	root := t.TempDir()
	base := makeLayer(t, testimage.Gzip, testimage.File("a", "aaaa"))
	top := makeLayer(t, testimage.Gzip, testimage.File("b", "bbbbbbbb"))
	ref := reg + "/ls/volumes:v1"
	digest := push(t, ref, base, top)
	expectCode(t, "pull", strata(t, root, "pull", ref), 0)

	both := []v1.Hash{base.diffID(t), top.diffID(t)}
	published := time.Now().UTC().Truncate(time.Second)
	const keyWeb, keyBatch = "0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210"
	publishRecord(t, root, keyWeb, state.Record{VolumeID: "vol-web", TargetPath: "/pods/web/vol", Image: ref,
		Digest: digest, Layers: both, Published: published, PodNamespace: "shop", PodName: "web-0", PodUID: "uid-1"})
	// Written before the plugin recorded pods, or kubelet without podInfoOnMount.
	publishRecord(t, root, keyBatch, state.Record{VolumeID: "vol-batch", TargetPath: "/pods/batch/vol", Image: ref,
		Digest: digest, Layers: both[:1], Published: published})
	acquire(t, root, "prepull:"+ref, both[1:])

	r := strata(t, root, "ls")
	expectCode(t, "ls", r, 0)
	lines := strings.Split(r.stdout, "\n")
	line := func(prefix string) string {
		for _, l := range lines {
			if strings.HasPrefix(l, prefix) {
				return l
			}
		}
		t.Fatalf("ls: no line starting with %q:\n%s", prefix, r.stdout)
		return ""
	}
	// USED BY is the last column of the layer table.
	for _, tc := range []struct{ layer, want string }{
		{short(base.diffID(t)), "shop/web-0 (vol-web), volume vol-batch"},
		{short(top.diffID(t)), "prepull:" + ref + ", shop/web-0 (vol-web)"},
	} {
		if l := line(tc.layer); !strings.HasSuffix(strings.TrimRight(l, " "), tc.want) {
			t.Errorf("ls: layer %s: want USED BY %q, got %q", tc.layer, tc.want, l)
		}
	}
	// POD is the second column of the volume table.
	for _, tc := range []struct{ volume, want string }{{"vol-web", "shop/web-0"}, {"vol-batch", "-"}} {
		if f := strings.Fields(line(tc.volume + " ")); f[1] != tc.want {
			t.Errorf("ls: volume %s: want POD %q, got %q", tc.volume, tc.want, f)
		}
	}

	r = strata(t, root, "ls", "--json")
	expectCode(t, "ls --json", r, 0)
	var ls lsJSON
	if err := json.Unmarshal([]byte(r.stdout), &ls); err != nil {
		t.Fatalf("ls --json: %v\n%s", err, r.stdout)
	}
	web := volumeJSON{Key: keyWeb, VolumeID: "vol-web", TargetPath: "/pods/web/vol", Image: ref, Digest: digest.String(),
		Published: published, PodNamespace: "shop", PodName: "web-0", PodUID: "uid-1"}
	batch := volumeJSON{Key: keyBatch, VolumeID: "vol-batch", TargetPath: "/pods/batch/vol", Image: ref, Digest: digest.String(),
		Published: published}
	if len(ls.Volumes) != 2 || ls.Volumes[0] != web || ls.Volumes[1] != batch {
		t.Errorf("ls --json: volumes = %+v, want %+v and %+v", ls.Volumes, web, batch)
	}
	want := map[string][]volumeJSON{base.diffID(t).String(): {web, batch}, top.diffID(t).String(): {web}}
	for _, l := range ls.Layers {
		w := want[l.DiffID]
		if len(l.Volumes) != len(w) {
			t.Errorf("ls --json: layer %s: volumes = %+v, want %+v", l.DiffID, l.Volumes, w)
			continue
		}
		for i := range w {
			if l.Volumes[i] != w[i] {
				t.Errorf("ls --json: layer %s: volume %d = %+v, want %+v", l.DiffID, i, l.Volumes[i], w[i])
			}
		}
	}
}

func TestUsedBy(t *testing.T) {
	vols := map[string]state.Volume{
		"k1": {Key: "k1", Record: state.Record{VolumeID: "v1", PodNamespace: "a", PodName: "p1"}},
		"k2": {Key: "k2", Record: state.Record{VolumeID: "v2", PodNamespace: "a", PodName: "p2"}},
		"k3": {Key: "k3", Record: state.Record{VolumeID: "v3"}},
	}
	for _, tc := range []struct {
		name   string
		owners []string
		want   string
	}{
		{"nobody", nil, "-"},
		{"a pod", []string{"k1"}, "a/p1 (v1)"},
		{"no pod recorded", []string{"k3"}, "volume v3"},
		{"not a volume", []string{"prepull:r/x:v1"}, "prepull:r/x:v1"},
		{"many, sorted and capped", []string{"k3", "k2", "k1", "prepull:r/x"}, "a/p1 (v1), a/p2 (v2), prepull:r/x and 1 more"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := usedBy(tc.owners, vols); got != tc.want {
				t.Errorf("usedBy(%v) = %q, want %q", tc.owners, got, tc.want)
			}
		})
	}
}

// TestDuCountsImagesByDigestAndVolumes: an image pulled by tag and by
// digest is one image, whose layers nothing else shares; du tells how the
// volumes on the node share the cache: what their images would take as
// copies, and what the cache holds, each layer once (an artifact's tree
// standing for its files).
func TestDuCountsImagesByDigestAndVolumes(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	reg := testimage.Registry(t)
	root := t.TempDir()
	base := makeLayer(t, testimage.Gzip, testimage.File("a", strings.Repeat("a", 3000)))
	top := makeLayer(t, testimage.Gzip, testimage.File("b", strings.Repeat("b", 5000)))
	ref := reg + "/du/data:v1"
	digest := push(t, ref, base, top)
	byDigest := reg + "/du/data@" + digest.String()
	expectCode(t, "pull", strata(t, root, "pull", ref), 0)
	expectCode(t, "pull by digest", strata(t, root, "pull", byDigest), 0)

	modelRef := reg + "/du/model:v1"
	testimage.PushArtifact(t, modelRef, testimage.Artifact{ArtifactType: testimage.ModelManifest, ConfigMediaType: testimage.ModelConfig,
		Layers: []testimage.Blob{
			{MediaType: "application/vnd.cncf.model.weight.v1.raw", Data: []byte(strings.Repeat("w", 7000)),
				Annotations: map[string]string{testimage.ModelFilepath: "w.safetensors"}},
			{MediaType: "application/vnd.cncf.model.weight.v1.raw", Data: []byte(strings.Repeat("x", 11000)),
				Annotations: map[string]string{testimage.ModelFilepath: "x.safetensors"}},
		}})
	expectCode(t, "pull of a model", strata(t, root, "pull", modelRef), 0)

	both := []v1.Hash{base.diffID(t), top.diffID(t)}
	for i, layers := range [][]v1.Hash{both, both, both[:1]} {
		key := fmt.Sprintf("%032x", i+1)
		publishRecord(t, root, key, state.Record{VolumeID: fmt.Sprintf("vol-%d", i), TargetPath: "/pods/" + key, Image: ref,
			Digest: digest, Layers: layers, Published: time.Now()})
	}
	var model []v1.Hash
	var modelDigest v1.Hash
	r := strata(t, root, "ls", "--json")
	expectCode(t, "ls --json", r, 0)
	var ls lsJSON
	if err := json.Unmarshal([]byte(r.stdout), &ls); err != nil {
		t.Fatal(err)
	}
	for _, im := range ls.Images {
		if im.Ref == modelRef {
			modelDigest = v1.Hash{Algorithm: "sha256", Hex: strings.TrimPrefix(im.Digest, "sha256:")}
			for _, d := range im.Layers {
				model = append(model, v1.Hash{Algorithm: "sha256", Hex: strings.TrimPrefix(d, "sha256:")})
			}
		}
	}
	if len(model) != 1 {
		t.Fatalf("the model's layers are %v, want its tree alone", model)
	}
	for i := range 2 {
		key := fmt.Sprintf("%032x", 10+i)
		publishRecord(t, root, key, state.Record{VolumeID: fmt.Sprintf("model-%d", i), TargetPath: "/pods/" + key, Image: modelRef,
			Digest: modelDigest, Layers: model, Published: time.Now()})
	}

	r = strata(t, root, "du", "--bytes")
	expectCode(t, "du --bytes", r, 0)
	du := parseDu(t, r.stdout)
	const files = 7000 + 11000
	image := base.size + top.size
	for name, want := range map[string]int64{
		"images": 2, "shared": 0, "saved": 0, "unique": image + files,
		"volumes":   5,
		"as copies": 2*image + base.size + 2*files,
		"held":      image + files,
	} {
		if du[name] != want {
			t.Errorf("du --bytes: %s = %d, want %d\n%s", name, du[name], want, r.stdout)
		}
	}
}
