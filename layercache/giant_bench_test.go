package layercache

import (
	"archive/tar"
	"bytes"
	"context"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/klauspost/compress/gzip"

	"github.com/strata-csi/strata/layercache/rangefetch"
	"github.com/strata-csi/strata/test/testimage"
)

// giantCap is the per-connection cap of the bench registry: what S3- and
// CDN-backed registries often give one stream.
const giantCap = 100e6

// giantBytes is the size of the giant layer: STRATA_BENCH_GIANT_MIB MiB,
// 4 GiB by default (the data, the registry's copy and, for the gzip case,
// its compressed copy are held in memory).
func giantBytes(b *testing.B) int {
	mib := 4096
	if v := os.Getenv("STRATA_BENCH_GIANT_MIB"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			b.Fatalf("STRATA_BENCH_GIANT_MIB=%q", v)
		}
		mib = n
	}
	return mib << 20
}

// incompressible returns n bytes of random data, as model weights are.
func incompressible(n int) []byte {
	p := make([]byte, n)
	rng := rand.NewChaCha8([32]byte{1})
	rng.Read(p)
	return p
}

// BenchmarkGiantRawFile pulls a model whose one raw layer is a giant file
// (4 GiB) from a loopback registry that caps each connection at 100 MB/s,
// with 1, 4 and 8 Range streams, and from an uncapped one: N streams should
// approach N x the cap, up to what the disk and the hash allow. Compare
// with dd of the same bytes onto the same filesystem (hack/bench prints it).
func BenchmarkGiantRawFile(b *testing.B) {
	data := incompressible(giantBytes(b))
	model := testimage.Artifact{ConfigMediaType: testimage.ModelConfig, Layers: []testimage.Blob{
		{MediaType: "application/vnd.cncf.model.weight.v1.raw", Data: data, Annotations: map[string]string{testimage.ModelFilepath: "model.safetensors"}},
	}}
	capped := testimage.Server(b, testimage.CapEachAnswer(giantCap)) + "/giant/raw:v1"
	testimage.PushArtifact(b, capped, model)
	uncapped := testimage.Server(b, func(h http.Handler) http.Handler { return h }) + "/giant/raw:v1"
	testimage.PushArtifact(b, uncapped, model)
	size := int64(len(data))
	data, model = nil, testimage.Artifact{}
	runtime.GC()
	for _, bc := range []struct {
		name    string
		ref     string
		streams int
	}{
		{"capped/streams=1", capped, 1},
		{"capped/streams=4", capped, 4},
		{"capped/streams=8", capped, 8},
		{"uncapped/streams=4", uncapped, 4},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.SetBytes(size)
			for b.Loop() {
				b.StopTimer()
				root := b.TempDir()
				s := openStore(b, root, withRanged(DefaultRangedRawBytes, rangefetch.DefaultChunkSize, bc.streams))
				b.StartTimer()
				start := time.Now()
				if _, err := s.Pull(context.Background(), bc.ref, PullOptions{}); err != nil {
					b.Fatal(err)
				}
				b.Logf("%s: %d MiB in %.1f s", bc.name, size>>20, time.Since(start).Seconds())
				b.StopTimer()
				s.Close()
				os.RemoveAll(root)
				b.StartTimer()
			}
		})
	}
}

// BenchmarkGiantGzipLayer pulls the same giant file as a single-file gzip
// tar layer of an image, from the capped and the uncapped registry: a tar
// layer is one stream, and inflating it is CPU-bound (one core).
func BenchmarkGiantGzipLayer(b *testing.B) {
	data := incompressible(giantBytes(b))
	size := int64(len(data))
	var gz bytes.Buffer
	zw, err := gzip.NewWriterLevel(&gz, gzip.BestSpeed)
	if err != nil {
		b.Fatal(err)
	}
	tw := tar.NewWriter(zw)
	if err := tw.WriteHeader(&tar.Header{Name: "model.safetensors", Mode: 0o644, Size: size, Typeflag: tar.TypeReg}); err != nil {
		b.Fatal(err)
	}
	if _, err := tw.Write(data); err != nil {
		b.Fatal(err)
	}
	if err := tw.Close(); err != nil {
		b.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		b.Fatal(err)
	}
	data = nil
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(gz.Bytes())), nil })
	if err != nil {
		b.Fatal(err)
	}
	img := testimage.Image(b, layer)
	capped := testimage.Server(b, testimage.CapEachAnswer(giantCap)) + "/giant/gzip:v1"
	testimage.Push(b, capped, img)
	uncapped := testimage.Server(b, func(h http.Handler) http.Handler { return h }) + "/giant/gzip:v1"
	testimage.Push(b, uncapped, img)
	gz, img, layer = bytes.Buffer{}, nil, nil
	runtime.GC()
	for _, bc := range []struct{ name, ref string }{{"capped", capped}, {"uncapped", uncapped}} {
		b.Run(bc.name, func(b *testing.B) {
			b.SetBytes(size)
			for b.Loop() {
				b.StopTimer()
				root := b.TempDir()
				s := openStore(b, root)
				b.StartTimer()
				start := time.Now()
				if _, err := s.Pull(context.Background(), bc.ref, PullOptions{}); err != nil {
					b.Fatal(err)
				}
				b.Logf("%s: %d MiB in %.1f s", bc.name, size>>20, time.Since(start).Seconds())
				b.StopTimer()
				s.Close()
				os.RemoveAll(root)
				b.StartTimer()
			}
		})
	}
}
