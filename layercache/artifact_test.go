package layercache

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"golang.org/x/sys/unix"

	ti "github.com/strata-csi/strata/test/testimage"
)

func TestClassifyManifest(t *testing.T) {
	desc := func(mt string, ann ...string) v1.Descriptor {
		d := v1.Descriptor{MediaType: types.MediaType(mt)}
		if len(ann) > 0 {
			d.Annotations = map[string]string{}
			for i := 0; i+1 < len(ann); i += 2 {
				d.Annotations[ann[i]] = ann[i+1]
			}
		}
		return d
	}
	cfg := func(mt string) *v1.Descriptor { d := desc(mt); return &d }
	for _, tc := range []struct {
		name    string
		doc     manifestDoc
		want    manifestKind
		refused string // part of the error, if refused
	}{
		{"image", manifestDoc{Config: cfg(string(types.OCIConfigJSON)), Layers: []v1.Descriptor{desc(string(types.OCILayer))}}, kindImage, ""},
		{"docker image", manifestDoc{Config: cfg(string(types.DockerConfigJSON)), Layers: []v1.Descriptor{desc(string(types.DockerLayer))}}, kindImage, ""},
		{"modelpack", manifestDoc{ArtifactType: ti.ModelManifest, Config: cfg(ti.ModelConfig), Layers: []v1.Descriptor{desc("application/vnd.cncf.model.weight.v1.raw")}}, kindArtifact, ""},
		{"cnai", manifestDoc{Config: cfg("application/vnd.cnai.model.config.v1+json"), Layers: []v1.Descriptor{desc("application/vnd.cnai.model.weight.v1.tar")}}, kindArtifact, ""},
		{"modelkit", manifestDoc{Config: cfg(ti.ModelKitConfig), Layers: []v1.Descriptor{desc("application/vnd.kitops.modelkit.model.v1.tar+gzip")}}, kindArtifact, ""},
		{"docker model", manifestDoc{Config: cfg(ti.DockerAIConfig), Layers: []v1.Descriptor{desc("application/vnd.docker.ai.gguf.v3")}}, kindArtifact, ""},
		{"oras", manifestDoc{ArtifactType: ti.ORASUnknown, Config: cfg(ti.EmptyConfig), Layers: []v1.Descriptor{desc(string(types.OCIUncompressedLayer), ti.Title, "a.txt")}}, kindArtifact, ""},
		{"oras 0.x", manifestDoc{Config: cfg("application/vnd.unknown.config.v1+json"), Layers: []v1.Descriptor{desc("text/plain", ti.Title, "a.txt")}}, kindArtifact, ""},
		{"helm", manifestDoc{Config: cfg("application/vnd.cncf.helm.config.v1+json"), Layers: []v1.Descriptor{desc("application/vnd.cncf.helm.chart.content.v1.tar+gzip")}}, 0, "a Helm chart"},
		{"cosign", manifestDoc{Config: cfg(string(types.OCIConfigJSON)), Layers: []v1.Descriptor{desc("application/vnd.dev.cosign.simplesigning.v1+json")}}, 0, "a cosign signature"},
		{"notation", manifestDoc{ArtifactType: "application/vnd.cncf.notary.signature", Config: cfg(ti.EmptyConfig), Layers: []v1.Descriptor{desc("application/jose+json")}}, 0, "a Notary signature"},
		{"spdx", manifestDoc{ArtifactType: "application/spdx+json", Config: cfg(ti.EmptyConfig), Layers: []v1.Descriptor{desc("application/spdx+json")}}, 0, "an SPDX SBOM"},
		{"cyclonedx", manifestDoc{ArtifactType: "application/vnd.cyclonedx+json", Config: cfg(ti.EmptyConfig), Layers: []v1.Descriptor{desc("application/vnd.cyclonedx+json")}}, 0, "a CycloneDX SBOM"},
		{"in-toto", manifestDoc{Config: cfg(ti.EmptyConfig), Layers: []v1.Descriptor{desc("application/vnd.in-toto+json")}}, 0, "an in-toto attestation"},
		{"unknown config", manifestDoc{Config: cfg("application/vnd.example.config+json"), Layers: []v1.Descriptor{desc("text/plain")}}, 0, "config application/vnd.example.config+json"},
		{"no config", manifestDoc{Layers: []v1.Descriptor{desc(string(types.OCILayer))}}, 0, "without a config"},
		{"no layers", manifestDoc{Config: cfg(ti.EmptyConfig)}, 0, "without layers"},
		{"image with a blob", manifestDoc{Config: cfg(string(types.OCIConfigJSON)), Layers: []v1.Descriptor{desc("text/plain")}}, 0, `"text/plain", not an image layer`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := classifyManifest(&tc.doc)
			if tc.refused != "" {
				if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), tc.refused) {
					t.Fatalf("want ErrUnsupported naming %q, got %v", tc.refused, err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %v, %v; want %v", got, err, tc.want)
			}
		})
	}
}

func TestCheckArtifactPath(t *testing.T) {
	for p, want := range map[string]string{
		"model.safetensors": "model.safetensors", "a/b/c.bin": "a/b/c.bin", "./a//b/": "a/b",
		"../x": "", "a/../../x": "", "a/../x": "", "/etc/x": "", "a\x00b": "", "": "", ".": "",
		strings.Repeat("a/", 2500): "", strings.Repeat("x", 256): "",
	} {
		got, err := checkArtifactPath(p)
		if (err == nil) != (want != "") || got != want {
			t.Errorf("checkArtifactPath(%.40q) = %q, %v; want %q", p, got, err, want)
		}
	}
}

// pullArtifact pushes a, pulls it into a new store, and returns the store,
// the image and its merged view.
func pullArtifact(t testing.TB, a ti.Artifact) (*Store, *Image, []string) {
	t.Helper()
	ref := ti.Registry(t) + "/model:v1"
	ti.PushArtifact(t, ref, a)
	s := openStore(t, t.TempDir())
	img, err := s.Pull(context.Background(), ref, PullOptions{})
	if err != nil {
		t.Fatalf("Pull: %v", err)
	}
	return s, img, tree(t, mountImage(t, s, img))
}

func raw(mt, data string, ann ...string) ti.Blob {
	b := ti.Blob{MediaType: mt, Data: []byte(data), Annotations: map[string]string{}}
	for i := 0; i+1 < len(ann); i += 2 {
		b.Annotations[ann[i]] = ann[i+1]
	}
	return b
}

func tarBlob(t *testing.T, mt string, c ti.Compression, entries ...ti.Entry) ti.Blob {
	return ti.Blob{MediaType: mt, Data: ti.Compress(t, ti.Tar(t, entries...), c)}
}

func modelPack(t *testing.T, shard2 string) ti.Artifact {
	return ti.Artifact{ArtifactType: ti.ModelManifest, ConfigMediaType: ti.ModelConfig, Config: []byte(`{"descriptor":{"name":"m"}}`),
		Layers: []ti.Blob{
			raw("application/vnd.cncf.model.weight.v1.raw", "shard-one", ti.ModelFilepath, "weights/model-00001-of-00002.safetensors"),
			raw("application/vnd.cncf.model.weight.v1.raw", shard2, ti.ModelFilepath, "weights/model-00002-of-00002.safetensors"),
			tarBlob(t, "application/vnd.cncf.model.weight.config.v1.tar", ti.None,
				ti.File("config.json", "{}"), ti.Dir("tokenizer"), ti.File("tokenizer/tokenizer.json", "tok")),
			raw("application/vnd.cncf.model.doc.v1.raw", "# M", "org.cnai.model.filepath", "README.md"),
		}}
}

func TestPullArtifacts(t *testing.T) {
	for _, tc := range []struct {
		name   string
		a      func(t *testing.T) ti.Artifact
		lowers int
		want   []string
	}{
		{"modelpack", func(t *testing.T) ti.Artifact { return modelPack(t, "shard-two") }, 2, []string{
			"README.md = # M", "config.json = {}", "tokenizer/", "tokenizer/tokenizer.json = tok", "weights/",
			"weights/model-00001-of-00002.safetensors = shard-one", "weights/model-00002-of-00002.safetensors = shard-two"}},
		{"modelkit", func(t *testing.T) ti.Artifact {
			return ti.Artifact{ConfigMediaType: ti.ModelKitConfig, Config: []byte(`{"manifestVersion":"1.0"}`), Layers: []ti.Blob{
				tarBlob(t, "application/vnd.kitops.modelkit.model.v1.tar+gzip", ti.Gzip, ti.Dir("models"), ti.File("models/llama.gguf", "gguf")),
				tarBlob(t, "application/vnd.kitops.modelkit.dataset.v1.tar+gzip", ti.Gzip, ti.Dir("data"), ti.File("data/train.csv", "a,b")),
				tarBlob(t, "application/vnd.kitops.modelkit.code.v1.tar+zstd", ti.Zstd, ti.Dir("src"), ti.File("src/train.py", "print()")),
			}}
		}, 3, []string{"data/", "data/train.csv = a,b", "models/", "models/llama.gguf = gguf", "src/", "src/train.py = print()"}},
		{"docker model", func(t *testing.T) ti.Artifact {
			return ti.Artifact{ConfigMediaType: ti.DockerAIConfig, Config: []byte(`{"config":{"format":"gguf"}}`), Layers: []ti.Blob{
				raw("application/vnd.docker.ai.gguf.v3", "gguf-1", ti.ModelFilepath, "model-00001-of-00002.gguf"),
				raw("application/vnd.docker.ai.gguf.v3", "gguf-2", ti.ModelFilepath, "model-00002-of-00002.gguf"),
				raw("application/vnd.docker.ai.license", "MIT", ti.ModelFilepath, "LICENSE"),
			}}
		}, 1, []string{"LICENSE = MIT", "model-00001-of-00002.gguf = gguf-1", "model-00002-of-00002.gguf = gguf-2"}},
		{"oras", func(t *testing.T) ti.Artifact {
			bundle := string(ti.Tar(t, ti.File("inner", "x")))
			return ti.Artifact{ArtifactType: ti.ORASUnknown, ConfigMediaType: ti.EmptyConfig, Layers: []ti.Blob{
				raw(string(types.OCIUncompressedLayer), "hello", ti.Title, "hello.txt"),
				// A pushed file that is a tar stays a file.
				raw(string(types.OCIUncompressedLayer), bundle, ti.Title, "bundle.tar"),
				{MediaType: string(types.OCILayer), Data: ti.Compress(t, ti.Tar(t, ti.Dir("docs"), ti.File("docs/a.md", "A"), ti.Dir("docs/sub"), ti.File("docs/sub/b.md", "B")), ti.Gzip),
					Annotations: map[string]string{ti.Title: "docs", ti.ORASUnpack: "true"}},
			}}
		}, 2, []string{"bundle.tar = " + string(ti.Tar(t, ti.File("inner", "x"))), "docs/", "docs/a.md = A", "docs/sub/", "docs/sub/b.md = B", "hello.txt = hello"}},
		{"artifactType with the empty config", func(t *testing.T) ti.Artifact {
			return ti.Artifact{ArtifactType: "application/vnd.example.dataset.v1", ConfigMediaType: ti.EmptyConfig, Layers: []ti.Blob{
				raw("text/csv", "1,2", ti.Title, "rows.csv"),
				raw("application/octet-stream", "anon"),
			}}
		}, 1, []string{"rows.csv = 1,2", "sha256:" + sha("anon") + " = anon"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, img, got := pullArtifact(t, tc.a(t))
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("merged view:\n got %q\nwant %q", got, tc.want)
			}
			if len(img.Layers) != tc.lowers {
				t.Errorf("%d lowers, want %d", len(img.Layers), tc.lowers)
			}
			if img.ArtifactType == "" {
				t.Error("ArtifactType is empty")
			}
		})
	}
}

func sha(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

func TestModelVersionsShareShards(t *testing.T) {
	reg := ti.Registry(t)
	ti.PushArtifact(t, reg+"/model:v1", modelPack(t, "shard-two"))
	ti.PushArtifact(t, reg+"/model:v2", modelPack(t, "shard-two-tuned"))
	s := openStore(t, t.TempDir())
	ino := func(img *Image, p string) uint64 {
		d, err := s.LayerDir(img.Layers[len(img.Layers)-1].DiffID)
		if err != nil {
			t.Fatal(err)
		}
		var st unix.Stat_t
		if err := unix.Stat(filepath.Join(d, p), &st); err != nil {
			t.Fatal(err)
		}
		return st.Ino
	}
	var imgs []*Image
	for _, tag := range []string{"v1", "v2"} {
		img, err := s.Pull(context.Background(), reg+"/model:"+tag, PullOptions{})
		if err != nil {
			t.Fatal(err)
		}
		imgs = append(imgs, img)
	}
	shard1, shard2 := "weights/model-00001-of-00002.safetensors", "weights/model-00002-of-00002.safetensors"
	if a, b := ino(imgs[0], shard1), ino(imgs[1], shard1); a != b {
		t.Errorf("the shared shard has inodes %d and %d: stored twice", a, b)
	}
	if a, b := ino(imgs[0], shard2), ino(imgs[1], shard2); a == b {
		t.Errorf("different shards share inode %d", a)
	}
	// Both versions share the tar layer too: 1 tar + 4 raw files + 2 trees.
	ls, err := s.Layers()
	if err != nil {
		t.Fatal(err)
	}
	kinds := map[string]int{}
	for _, l := range ls {
		kinds[l.Kind]++
	}
	if want := map[string]int{kindArtifactTar: 1, kindRaw: 4, kindTree: 2}; !reflect.DeepEqual(kinds, want) {
		t.Errorf("entries by kind: %v, want %v", kinds, want)
	}
	u, err := s.Usage()
	if err != nil {
		t.Fatal(err)
	}
	want := int64(len("shard-one") + len("shard-two") + len("shard-two-tuned") + len("# M") + len("{}") + len("tok"))
	if u.Bytes != want {
		t.Errorf("usage %d bytes, want %d (each file once)", u.Bytes, want)
	}
	if shared := int64(len("shard-one") + len("# M") + len("{}") + len("tok")); u.SharedBytes != shared || u.SavedBytes != shared {
		t.Errorf("shared %d bytes, saved %d; want %d both", u.SharedBytes, u.SavedBytes, shared)
	}
	t.Logf("two versions: %d bytes in %d entries, %d shared", u.Bytes, u.Layers, u.SharedBytes)
	infos, err := s.Images()
	if err != nil {
		t.Fatal(err)
	}
	for _, im := range infos {
		if im.ArtifactType != ti.ModelManifest || len(im.Files) != 3 || len(im.Layers) != 2 || !im.Complete {
			t.Errorf("image %s: artifactType %q, %d files, %d layers, complete %v", im.Ref, im.ArtifactType, len(im.Files), len(im.Layers), im.Complete)
		}
	}
	// Offline: the cached model resolves and ensures with the policy Never.
	if _, err := s.Pull(context.Background(), reg+"/model:v2", PullOptions{Policy: PullNever}); err != nil {
		t.Errorf("Pull with Never: %v", err)
	}
}

func manyFiles(n int) ti.Artifact {
	a := ti.Artifact{ConfigMediaType: ti.DockerAIConfig}
	for i := range n {
		a.Layers = append(a.Layers, raw("application/vnd.docker.ai.safetensors", fmt.Sprintf("part %d", i),
			ti.ModelFilepath, fmt.Sprintf("shards/%02d/part-%04d.safetensors", i%10, i)))
	}
	return a
}

func TestThousandFilesOneLower(t *testing.T) {
	s, img, got := pullArtifact(t, manyFiles(1000))
	if len(img.Layers) != 1 {
		t.Fatalf("%d lowers, want 1", len(img.Layers))
	}
	files := 0
	for _, e := range got {
		if !strings.HasSuffix(e, "/") {
			files++
		}
	}
	if files != 1000 || got[len(got)-1] != "shards/09/part-0999.safetensors = part 999" {
		t.Errorf("%d files in the merged view, last %q", files, got[len(got)-1])
	}
	// The raw entries outlive no tree: a prune with no owner removes the
	// tree, then its files.
	res, err := s.Prune(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Layers) != 1001 {
		t.Errorf("prune removed %d entries, want 1001", len(res.Layers))
	}
}

func TestPruneKeepsFilesOfACachedTree(t *testing.T) {
	s, img, _ := pullArtifact(t, modelPack(t, "shard-two"))
	if err := s.Acquire("pod", img.DiffIDs()); err != nil {
		t.Fatal(err)
	}
	res, err := s.Prune(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Layers) != 0 {
		t.Errorf("prune removed %v while the tree is held", res.Layers)
	}
	for _, f := range img.Files {
		if !s.HasLayer(f.Layer.DiffID) {
			t.Errorf("raw file %s was removed", f.Path)
		}
	}
}

// BenchmarkThousandFileArtifact measures a model of 1,000 one-file layers:
// building its tree from cached files, a cold pull from a loopback
// registry (fetch, verify, store, tree), and a pull of the cached model.
func BenchmarkThousandFileArtifact(b *testing.B) {
	ref := ti.Registry(b) + "/model:v1"
	ti.PushArtifact(b, ref, manyFiles(1000))
	b.Run("tree", func(b *testing.B) {
		s := openStore(b, b.TempDir())
		img, err := s.Pull(context.Background(), ref, PullOptions{})
		if err != nil {
			b.Fatal(err)
		}
		tree, err := s.layerPath(img.Layers[0].DiffID)
		if err != nil {
			b.Fatal(err)
		}
		for b.Loop() {
			b.StopTimer()
			if err := os.RemoveAll(tree); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
			if err := s.ensureTree(img); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("cold", func(b *testing.B) {
		for b.Loop() {
			b.StopTimer()
			s, err := Open(b.TempDir())
			if err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
			if _, err := s.Pull(context.Background(), ref, PullOptions{}); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			_ = s.Close()
			b.StartTimer()
		}
	})
	b.Run("cached", func(b *testing.B) {
		s := openStore(b, b.TempDir())
		if _, err := s.Pull(context.Background(), ref, PullOptions{}); err != nil {
			b.Fatal(err)
		}
		for b.Loop() {
			if _, err := s.Pull(context.Background(), ref, PullOptions{}); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// diskUse is what the files under dir take on disk, each inode once (as du
// counts).
func diskUse(t *testing.T, dir string) int64 {
	t.Helper()
	seen := map[uint64]bool{}
	var n int64
	err := filepath.Walk(dir, func(p string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		if !seen[st.Ino] {
			seen[st.Ino] = true
			n += st.Blocks * 512
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestTwoModelVersionsDiskUse(t *testing.T) {
	const shard = 4 << 20
	shards := make([][]byte, 4)
	for i := range shards {
		shards[i] = make([]byte, shard)
		if _, err := rand.Read(shards[i]); err != nil {
			t.Fatal(err)
		}
	}
	version := func(last int) ti.Artifact {
		a := ti.Artifact{ArtifactType: ti.ModelManifest, ConfigMediaType: ti.ModelConfig}
		for i, s := range [][]byte{shards[0], shards[1], shards[last]} {
			a.Layers = append(a.Layers, ti.Blob{MediaType: "application/vnd.cncf.model.weight.v1.raw", Data: s,
				Annotations: map[string]string{ti.ModelFilepath: fmt.Sprintf("model-%d.safetensors", i)}})
		}
		return a
	}
	reg := ti.Registry(t)
	ti.PushArtifact(t, reg+"/model:v1", version(2))
	ti.PushArtifact(t, reg+"/model:v2", version(3))
	root := t.TempDir()
	s := openStore(t, root)
	for _, tag := range []string{"v1", "v2"} {
		if _, err := s.Pull(context.Background(), reg+"/model:"+tag, PullOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	used := diskUse(t, filepath.Join(root, layersDir))
	// Four distinct shards, plus directories and small files.
	if used < 4*shard || used > 4*shard+256<<10 {
		t.Errorf("two versions of 3 shards of 4 MiB, 2 shared, take %d bytes on disk; want 16 MiB and a little", used)
	}
	t.Logf("two model versions (3 shards of 4 MiB each, 2 shared): %d bytes on disk (%.2f MiB), %.2f MiB without sharing",
		used, float64(used)/(1<<20), float64(6*shard)/(1<<20))
}
