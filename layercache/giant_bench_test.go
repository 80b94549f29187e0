package layercache

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"hash"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/gzip"

	"github.com/strata-csi/strata/layercache/rangefetch"
	"github.com/strata-csi/strata/test/testimage"
)

// giantCap is the per-connection cap of the bench registry: what S3- and
// CDN-backed registries often give one stream.
const giantCap = 100e6

// giantBytes is the size of the giant file: STRATA_BENCH_GIANT_MIB MiB,
// 4 GiB by default.
func giantBytes(b *testing.B) int64 {
	mib := 4096
	if v := os.Getenv("STRATA_BENCH_GIANT_MIB"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			b.Fatalf("STRATA_BENCH_GIANT_MIB=%q", v)
		}
		mib = n
	}
	return int64(mib) << 20
}

// fileRegistry serves one manifest and its blobs from files on disk with
// http.ServeContent (Range, no copy in memory), as a registry in front of
// an object store does. go-containerregistry's registry reads a whole blob
// into memory for each request, which a 4 GiB blob cannot afford.
type fileRegistry struct {
	manifest     []byte
	manifestType string
	blobs        map[string]string // digest to file
}

func (r *fileRegistry) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	switch p := req.URL.Path; {
	case p == "/v2/":
		w.WriteHeader(http.StatusOK)
	case strings.Contains(p, "/manifests/"):
		sum := sha256.Sum256(r.manifest)
		w.Header().Set("Content-Type", r.manifestType)
		w.Header().Set("Docker-Content-Digest", "sha256:"+hex.EncodeToString(sum[:]))
		w.Header().Set("Content-Length", strconv.Itoa(len(r.manifest)))
		if req.Method != http.MethodHead {
			w.Write(r.manifest)
		}
	case strings.Contains(p, "/blobs/"):
		file, ok := r.blobs[p[strings.LastIndex(p, "/")+1:]]
		if !ok {
			http.NotFound(w, req)
			return
		}
		f, err := os.Open(file)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		defer f.Close()
		http.ServeContent(w, req, "", time.Time{}, f)
	default:
		http.NotFound(w, req)
	}
}

// serve starts r on loopback, each answer capped at rate bytes/s (0: no
// cap), and returns REF of repository giant.
func (r *fileRegistry) serve(b *testing.B, rate int64) string {
	var h http.Handler = r
	if rate > 0 {
		h = testimage.CapEachAnswer(rate)(h)
	}
	srv := httptest.NewServer(h)
	b.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://") + "/giant/model:v1"
}

// blob writes n bytes to a file in dir through w (which may transform them)
// and returns the file, its digest and size.
func writeBlob(b *testing.B, dir, name string, fill func(io.Writer) error) (string, v1.Descriptor) {
	path := filepath.Join(dir, name)
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	h := sha256.New()
	cw := &countWriter{w: io.MultiWriter(f, h)}
	if err := fill(cw); err != nil {
		b.Fatal(err)
	}
	if err := f.Close(); err != nil {
		b.Fatal(err)
	}
	return path, v1.Descriptor{Digest: v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(h.Sum(nil))}, Size: cw.n}
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// random writes n incompressible bytes (as model weights are) to w.
func random(w io.Writer, n int64) error {
	_, err := io.CopyN(w, rand.NewChaCha8([32]byte{1}), n)
	return err
}

func (r *fileRegistry) add(path string, d v1.Descriptor) {
	if r.blobs == nil {
		r.blobs = map[string]string{}
	}
	r.blobs[d.Digest.String()] = path
}

func (r *fileRegistry) setManifest(b *testing.B, m any, mediaType string) {
	var err error
	if r.manifest, err = json.Marshal(m); err != nil {
		b.Fatal(err)
	}
	r.manifestType = mediaType
}

// pullGiant pulls ref into a new store per iteration and logs the time.
func pullGiant(b *testing.B, name, ref string, size int64, opts ...Option) {
	b.Run(name, func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			b.StopTimer()
			root := b.TempDir()
			s := openStore(b, root, opts...)
			b.StartTimer()
			start := time.Now()
			if _, err := s.Pull(context.Background(), ref, PullOptions{}); err != nil {
				b.Fatal(err)
			}
			b.Logf("%s: %d MiB in %.1f s", name, size>>20, time.Since(start).Seconds())
			b.StopTimer()
			s.Close()
			os.RemoveAll(root)
			b.StartTimer()
		}
	})
}

// BenchmarkGiantRawFile pulls a model whose one raw layer is a giant file
// (4 GiB) from a loopback registry that caps each connection at 100 MB/s,
// with 1, 4 and 8 Range streams, and from an uncapped one: N streams should
// approach N x the cap, up to what the disk and the hash allow. Compare with
// dd of the same bytes onto the same filesystem.
func BenchmarkGiantRawFile(b *testing.B) {
	size := giantBytes(b)
	dir := b.TempDir()
	r := &fileRegistry{}
	file, layer := writeBlob(b, dir, "weights", func(w io.Writer) error { return random(w, size) })
	r.add(file, layer)
	cfgFile, cfg := writeBlob(b, dir, "config", func(w io.Writer) error { _, err := io.WriteString(w, "{}"); return err })
	r.add(cfgFile, cfg)
	cfg.MediaType, layer.MediaType = testimage.ModelConfig, "application/vnd.cncf.model.weight.v1.raw"
	layer.Annotations = map[string]string{testimage.ModelFilepath: "model.safetensors"}
	r.setManifest(b, map[string]any{"schemaVersion": 2, "mediaType": types.OCIManifestSchema1, "artifactType": testimage.ModelManifest,
		"config": cfg, "layers": []v1.Descriptor{layer}}, string(types.OCIManifestSchema1))
	capped, uncapped := r.serve(b, giantCap), r.serve(b, 0)
	for _, streams := range []int{1, 4, 8} {
		pullGiant(b, fmt.Sprintf("capped/streams=%d", streams), capped, size, withRanged(DefaultRangedRawBytes, rangefetch.DefaultChunkSize, streams))
	}
	pullGiant(b, "uncapped/streams=4", uncapped, size, withRanged(DefaultRangedRawBytes, rangefetch.DefaultChunkSize, 4))
}

// BenchmarkGiantGzipLayer pulls the same giant file as a single-file gzip
// tar layer of an image, from the capped and the uncapped registry: a tar
// layer is one stream, and inflating it is CPU-bound (one core).
func BenchmarkGiantGzipLayer(b *testing.B) {
	size := giantBytes(b)
	dir := b.TempDir()
	r := &fileRegistry{}
	var diffID hash.Hash = sha256.New()
	file, layer := writeBlob(b, dir, "layer", func(w io.Writer) error {
		zw, err := gzip.NewWriterLevel(w, gzip.BestSpeed)
		if err != nil {
			return err
		}
		tw := tar.NewWriter(io.MultiWriter(zw, diffID))
		if err := tw.WriteHeader(&tar.Header{Name: "model.safetensors", Mode: 0o644, Size: size, Typeflag: tar.TypeReg}); err != nil {
			return err
		}
		if err := random(tw, size); err != nil {
			return err
		}
		if err := tw.Close(); err != nil {
			return err
		}
		return zw.Close()
	})
	r.add(file, layer)
	layer.MediaType = types.OCILayer
	config := v1.ConfigFile{Architecture: "amd64", OS: "linux", RootFS: v1.RootFS{Type: "layers",
		DiffIDs: []v1.Hash{{Algorithm: "sha256", Hex: hex.EncodeToString(diffID.Sum(nil))}}}}
	cfgFile, cfg := writeBlob(b, dir, "config", func(w io.Writer) error { return json.NewEncoder(w).Encode(config) })
	r.add(cfgFile, cfg)
	cfg.MediaType = types.OCIConfigJSON
	r.setManifest(b, map[string]any{"schemaVersion": 2, "mediaType": types.OCIManifestSchema1, "config": cfg, "layers": []v1.Descriptor{layer}},
		string(types.OCIManifestSchema1))
	pullGiant(b, "capped", r.serve(b, giantCap), size)
	pullGiant(b, "uncapped", r.serve(b, 0), size)
}
