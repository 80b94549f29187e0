package csitest

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"google.golang.org/grpc/codes"

	ti "github.com/strata-csi/strata/test/testimage"
)

// rawFile is one file of a model: a layer whose blob is the file, at the
// path its annotation names.
func rawFile(mediaType, data, annotation, path string) ti.Blob {
	return ti.Blob{MediaType: mediaType, Data: []byte(data), Annotations: map[string]string{annotation: path}}
}

// modelPack is a CNCF ModelPack model: two weight shards and a README as
// raw files, a config tar.
func modelPack(t *testing.T, shard2 string) ti.Artifact {
	return ti.Artifact{ArtifactType: ti.ModelManifest, ConfigMediaType: ti.ModelConfig, Config: []byte(`{"descriptor":{"name":"m"}}`),
		Layers: []ti.Blob{
			rawFile("application/vnd.cncf.model.weight.v1.raw", "shard-one", ti.ModelFilepath, "weights/model-00001-of-00002.safetensors"),
			rawFile("application/vnd.cncf.model.weight.v1.raw", shard2, ti.ModelFilepath, "weights/model-00002-of-00002.safetensors"),
			{MediaType: "application/vnd.cncf.model.weight.config.v1.tar", Data: ti.Tar(t, ti.File("config.json", "{}"))},
			rawFile("application/vnd.cncf.model.doc.v1.raw", "# M", ti.ModelFilepath, "README.md"),
		}}
}

func inode(t *testing.T, p string) uint64 {
	t.Helper()
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return st.Sys().(*syscall.Stat_t).Ino
}

// TestModelVolumes: a model (an OCI artifact, not an image) mounts over
// CSI as a tree of its files: copy-on-write for one pod, read-only,
// subPath, and stacked over a toolchain image; a shard two model versions
// share is the same file in the cache; a Helm chart is refused, naming
// its type.
func TestModelVolumes(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	reg := ti.Registry(t)
	v1, v2, tools := reg+"/models/m:v1", reg+"/models/m:v2", reg+"/tools/py:v1"
	ti.PushArtifact(t, v1, modelPack(t, "shard-two"))
	ti.PushArtifact(t, v2, modelPack(t, "shard-two-tuned"))
	pushBase(t, tools, "tools")

	want := map[string]string{
		"weights/model-00001-of-00002.safetensors": "shard-one",
		"weights/model-00002-of-00002.safetensors": "shard-two",
		"config.json": "{}", "README.md": "# M",
	}
	check := func(t *testing.T, dir string, files map[string]string) {
		t.Helper()
		for p, body := range files {
			if got := readString(t, filepath.Join(dir, p)); got != body {
				t.Errorf("%s = %q, want %q", p, got, body)
			}
		}
	}

	t.Run("copy-on-write", func(t *testing.T) {
		tgt := e.publishImage("model-rw", v1)
		check(t, tgt, want)
		writeFile(t, filepath.Join(tgt, "weights/model-00001-of-00002.safetensors"), "fine-tuned")
		other := e.publishImage("model-rw-2", v1)
		check(t, other, want) // the other pod still sees the original
		for _, p := range [][2]string{{"model-rw", tgt}, {"model-rw-2", other}} {
			if err := e.unpublish(p[0], p[1]); err != nil {
				t.Fatal(err)
			}
		}
	})
	t.Run("read-only and subPath", func(t *testing.T) {
		tgt := e.target("model-ro")
		req := pubReq("model-ro", tgt, map[string]string{"image": v1, "subPath": "weights"})
		req.Readonly = true
		e.publish(req)
		check(t, tgt, map[string]string{"model-00002-of-00002.safetensors": "shard-two"})
		if err := os.WriteFile(filepath.Join(tgt, "x"), nil, 0o644); !errors.Is(err, syscall.EROFS) {
			t.Errorf("write to a read-only model volume: %v, want EROFS", err)
		}
		if err := e.unpublish("model-ro", tgt); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("stacked over a toolchain", func(t *testing.T) {
		tgt := e.target("model-stack")
		e.publish(pubReq("model-stack", tgt, map[string]string{"image": tools, "stackImages": v1}))
		check(t, tgt, want)
		check(t, tgt, map[string]string{"data/base.txt": "tools\n", "version": "tools\n"})
		if err := e.unpublish("model-stack", tgt); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("versions share shards", func(t *testing.T) {
		a, b := e.target("model-v1"), e.target("model-v2")
		ra, rb := pubReq("model-v1", a, map[string]string{"image": v1}), pubReq("model-v2", b, map[string]string{"image": v2})
		ra.Readonly, rb.Readonly = true, true
		e.publish(ra)
		e.publish(rb)
		shard1 := "weights/model-00001-of-00002.safetensors"
		if inode(t, filepath.Join(a, shard1)) != inode(t, filepath.Join(b, shard1)) {
			t.Errorf("the shard both versions share is two files in the cache")
		}
		check(t, b, map[string]string{"weights/model-00002-of-00002.safetensors": "shard-two-tuned"})
		for _, p := range [][2]string{{"model-v1", a}, {"model-v2", b}} {
			if err := e.unpublish(p[0], p[1]); err != nil {
				t.Fatal(err)
			}
		}
	})
	t.Run("a Helm chart is refused", func(t *testing.T) {
		chart := reg + "/charts/c:1.0.0"
		ti.PushArtifact(t, chart, ti.Artifact{ConfigMediaType: "application/vnd.cncf.helm.config.v1+json",
			Layers: []ti.Blob{{MediaType: "application/vnd.cncf.helm.chart.content.v1.tar+gzip", Data: ti.Compress(t, ti.Tar(t, ti.File("Chart.yaml", "name: c")), ti.Gzip)}}})
		tgt := e.target("chart")
		_, err := e.Node.NodePublishVolume(ctx(t), pubReq("chart", tgt, map[string]string{"image": chart}))
		wantCode(t, err, codes.InvalidArgument, "application/vnd.cncf.helm.config.v1+json")
		if n := mountCount(t, tgt); n != 0 {
			t.Errorf("a refused artifact left %d mounts", n)
		}
	})
}

// BenchmarkModelPublish publishes a model of 1,000 files, one layer per
// file, once cached: the tree of its files is one lower. It reports the
// median publish time, writable (with the capped upper's own filesystem)
// and read-only (the overlay alone); the first publish pulls.
func BenchmarkModelPublish(b *testing.B) {
	RequireRoot(b)
	e := newEnv(b)
	ref := ti.Registry(b) + "/models/many:v1"
	a := ti.Artifact{ConfigMediaType: ti.EmptyConfig, ArtifactType: "application/vnd.example.model.v1"}
	for i := range 1000 {
		a.Layers = append(a.Layers, rawFile("application/octet-stream", fmt.Sprintf("file %d", i), ti.Title, fmt.Sprintf("shards/%03d/part-%04d.bin", i%10, i)))
	}
	ti.PushArtifact(b, ref, a)
	first := e.target("warm")
	start := time.Now()
	e.publish(pubReq("warm", first, map[string]string{"image": ref}))
	b.Logf("first publish (pull of 1,000 files): %v", time.Since(start).Round(time.Millisecond))
	if got := readString(b, filepath.Join(first, "shards/007/part-0997.bin")); got != "file 997" {
		b.Fatalf("part-0997.bin = %q", got)
	}
	for _, readOnly := range []bool{false, true} {
		b.Run(fmt.Sprintf("readOnly=%v", readOnly), func(b *testing.B) {
			var times []time.Duration
			for i := range b.N {
				id := fmt.Sprintf("p-%v-%d", readOnly, i)
				tgt := e.target(id)
				req := pubReq(id, tgt, map[string]string{"image": ref})
				req.Readonly = readOnly
				start := time.Now()
				e.publish(req)
				times = append(times, time.Since(start))
				b.StopTimer()
				if err := e.unpublish(id, tgt); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
			b.ReportMetric(float64(median(times).Microseconds()), "p50-µs")
		})
	}
}

// median returns the middle of ds (sorted in place).
func median(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	slices.Sort(ds)
	return ds[len(ds)/2]
}

// TestArtifactKindsOverCSI: each kind of artifact the tools write mounts
// over CSI with the tree they mean: a KitOps ModelKit (tar+gzip and
// tar+zstd layers), a Docker model-runner model (a layer per file), an ORAS
// push (files, and a directory marked for unpacking), an artifactType
// manifest with the empty config.
func TestArtifactKindsOverCSI(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	reg := ti.Registry(t)
	tarOf := func(mt string, c ti.Compression, entries ...ti.Entry) ti.Blob {
		return ti.Blob{MediaType: mt, Data: ti.Compress(t, ti.Tar(t, entries...), c)}
	}
	for _, tc := range []struct {
		name string
		a    ti.Artifact
		want map[string]string
	}{
		{"modelkit", ti.Artifact{ConfigMediaType: ti.ModelKitConfig, Config: []byte(`{"manifestVersion":"1.0"}`), Layers: []ti.Blob{
			tarOf("application/vnd.kitops.modelkit.model.v1.tar+gzip", ti.Gzip, ti.Dir("models"), ti.File("models/llama.gguf", "gguf")),
			tarOf("application/vnd.kitops.modelkit.code.v1.tar+zstd", ti.Zstd, ti.Dir("src"), ti.File("src/train.py", "print()")),
		}}, map[string]string{"models/llama.gguf": "gguf", "src/train.py": "print()"}},
		{"docker-model", ti.Artifact{ConfigMediaType: ti.DockerAIConfig, Config: []byte(`{"config":{"format":"gguf"}}`), Layers: []ti.Blob{
			rawFile("application/vnd.docker.ai.gguf.v3", "gguf-1", ti.ModelFilepath, "model-00001-of-00002.gguf"),
			rawFile("application/vnd.docker.ai.license", "MIT", ti.ModelFilepath, "LICENSE"),
		}}, map[string]string{"model-00001-of-00002.gguf": "gguf-1", "LICENSE": "MIT"}},
		{"oras", ti.Artifact{ArtifactType: ti.ORASUnknown, ConfigMediaType: ti.EmptyConfig, Layers: []ti.Blob{
			rawFile("application/vnd.oci.image.layer.v1.tar", "hello", ti.Title, "hello.txt"),
			{MediaType: "application/vnd.oci.image.layer.v1.tar+gzip", Data: ti.Compress(t, ti.Tar(t, ti.Dir("docs"), ti.File("docs/a.md", "A")), ti.Gzip),
				Annotations: map[string]string{ti.Title: "docs", ti.ORASUnpack: "true"}},
		}}, map[string]string{"hello.txt": "hello", "docs/a.md": "A"}},
		{"artifact-type", ti.Artifact{ArtifactType: "application/vnd.example.dataset.v1", ConfigMediaType: ti.EmptyConfig, Layers: []ti.Blob{
			rawFile("text/csv", "1,2", ti.Title, "rows.csv"),
		}}, map[string]string{"rows.csv": "1,2"}},
	} {
		ref := reg + "/kinds/" + tc.name + ":v1"
		ti.PushArtifact(t, ref, tc.a)
		tgt := e.publishImage("kind-"+tc.name, ref)
		for p, body := range tc.want {
			if got := readString(t, filepath.Join(tgt, p)); got != body {
				t.Errorf("%s: %s = %q, want %q", tc.name, p, got, body)
			}
		}
		if err := e.unpublish("kind-"+tc.name, tgt); err != nil {
			t.Fatal(err)
		}
	}
}

// TestModelClone: a persistent clone of a model keeps a fine-tune's writes
// across its stages, over the model's files.
func TestModelClone(t *testing.T) {
	t.Parallel()
	e := newAllEnv(t)
	ref := ti.Registry(t) + "/models/clone:v1"
	ti.PushArtifact(t, ref, modelPack(t, "shard-two"))
	vol := e.createClone("model-clone", ref, 64<<20)
	staging, target := e.stageAndPublish(vol, "model-clone")
	shard := filepath.Join(target, "weights/model-00002-of-00002.safetensors")
	if got := readString(t, shard); got != "shard-two" {
		t.Fatalf("the clone's shard = %q", got)
	}
	writeFile(t, shard, "fine-tuned")
	e.unpublishAndUnstage(vol.VolumeId, staging, target)
	staging, target = e.stageAndPublish(vol, "model-clone-2")
	if got := readString(t, filepath.Join(target, "weights/model-00002-of-00002.safetensors")); got != "fine-tuned" {
		t.Errorf("after a new stage the clone's shard = %q, want the fine-tune's write", got)
	}
	if got := readString(t, filepath.Join(target, "README.md")); got != "# M" {
		t.Errorf("README.md = %q", got)
	}
	e.unpublishAndUnstage(vol.VolumeId, staging, target)
}

// TestCommitModel: a fine-tune's writes to a model's volume commit as a new
// version of the model, an artifact still (its artifactType and config
// media type kept, the ModelPack config's diffIDs extended by the new
// layer's), which mounts with the writes: a shard replaced, a file added,
// one deleted.
func TestCommitModel(t *testing.T) {
	e := newEnv(t)
	reg := ti.Registry(t)
	base, out := reg+"/models/tune:v1", reg+"/models/tune:v2"
	m := modelPack(t, "shard-two")
	m.Config = []byte(`{"descriptor":{"name":"m"},"modelfs":{"type":"layers","diffIds":["sha256:` + strings.Repeat("0", 64) + `"]}}`)
	ti.PushArtifact(t, base, m)
	src := e.target("tune")
	e.publish(pubReq("vol-tune", src, podAttrs(base, "ml", "tune-0")))
	writeFile(t, filepath.Join(src, "weights/model-00002-of-00002.safetensors"), "shard-two-tuned")
	writeFile(t, filepath.Join(src, "weights/adapter.safetensors"), "lora")
	if err := os.Remove(filepath.Join(src, "README.md")); err != nil {
		t.Fatal(err)
	}
	if _, err := e.commitCLI("ml/tune-0", out); err != nil {
		t.Fatal(err)
	}

	ref, err := name.ParseReference(out)
	if err != nil {
		t.Fatal(err)
	}
	desc, err := remote.Get(ref)
	if err != nil {
		t.Fatal(err)
	}
	var man struct {
		ArtifactType string          `json:"artifactType"`
		Config       v1.Descriptor   `json:"config"`
		Layers       []v1.Descriptor `json:"layers"`
	}
	if err := json.Unmarshal(desc.Manifest, &man); err != nil {
		t.Fatal(err)
	}
	if man.ArtifactType != ti.ModelManifest || man.Config.MediaType != ti.ModelConfig || len(man.Layers) != 5 ||
		man.Layers[4].MediaType != "application/vnd.cncf.model.weight.v1.tar+gzip" {
		t.Fatalf("committed manifest: %s", desc.Manifest)
	}
	cfg, err := remote.Layer(ref.Context().Digest(man.Config.Digest.String()))
	if err != nil {
		t.Fatal(err)
	}
	rc, err := cfg.Compressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	var c struct {
		Descriptor struct{ Name string } `json:"descriptor"`
		ModelFS    struct {
			DiffIDs []string `json:"diffIds"`
		} `json:"modelfs"`
	}
	if err := json.NewDecoder(rc).Decode(&c); err != nil {
		t.Fatal(err)
	}
	if c.Descriptor.Name != "m" || len(c.ModelFS.DiffIDs) != 2 || !strings.HasPrefix(c.ModelFS.DiffIDs[1], "sha256:") {
		t.Errorf("committed config: name %q, diffIds %v: want the base's, with the new layer's diffID added", c.Descriptor.Name, c.ModelFS.DiffIDs)
	}

	dst := e.publishImage("vol-tuned", out)
	for p, body := range map[string]string{
		"weights/model-00001-of-00002.safetensors": "shard-one",
		"weights/model-00002-of-00002.safetensors": "shard-two-tuned",
		"weights/adapter.safetensors":              "lora",
		"config.json":                              "{}",
	} {
		if got := readString(t, filepath.Join(dst, p)); got != body {
			t.Errorf("the committed model's %s = %q, want %q", p, got, body)
		}
	}
	if exists(filepath.Join(dst, "README.md")) {
		t.Error("README.md, deleted before the commit, is in the committed model")
	}
}
