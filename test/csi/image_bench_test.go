package csitest

import (
	"archive/tar"
	"compress/gzip"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"golang.org/x/sys/unix"

	"github.com/strata-csi/strata/test/testimage"
)

// The base image the benchmarks of this directory share (BenchmarkClones,
// BenchmarkCommit): STRATA_BENCH_IMAGE_MIB MiB (default 1 GiB) of random,
// incompressible file content in benchLayers gzip (BestSpeed) layers of
// files of benchFileMiB MiB each, plus a few small text files in the top
// layer for a benchmark to modify or delete. The layers are generated
// straight to disk, so a 1 GiB image costs the test process no 1 GiB of
// memory (the in-memory loopback registry still holds its copy).

const (
	benchLayers     = 4
	benchFileMiB    = 4
	benchSmallFiles = 8
)

// benchBase is a pushed benchmark base image.
type benchBase struct {
	ref        string    // the tag it was pushed to
	digest     string    // the manifest digest
	layers     []v1.Hash // compressed digests, bottom first
	layerBytes []int64   // compressed sizes, bottom first
	content    int64     // bytes of file content in all layers
	big        []string  // paths of the random files
	small      []string  // paths of the small text files (top layer)
	built      time.Duration
	pushed     time.Duration
}

// benchMiB reads a size or count from the environment, def if unset.
func benchMiB(tb testing.TB, name string, def int) int {
	tb.Helper()
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil || n <= 0 {
		tb.Fatalf("%s=%q: want a positive integer", name, s)
	}
	return n
}

// randomFill fills buf with ChaCha8 bytes: fast, and incompressible.
func randomFill(rng *rand.ChaCha8, buf []byte) {
	_, _ = rng.Read(buf) // never fails
}

// chacha is a ChaCha8 generator seeded from a name and a number, so that
// every file of every run is different from every other and reproducible.
func chacha(name string, n int) *rand.ChaCha8 {
	var seed [32]byte
	copy(seed[:24], name)
	binary.LittleEndian.PutUint64(seed[24:], uint64(n))
	return rand.NewChaCha8(seed)
}

// pushBenchBase builds the base image of mib MiB and pushes it to ref.
func pushBenchBase(tb testing.TB, ref string, mib int) benchBase {
	tb.Helper()
	start := time.Now()
	dir := tb.TempDir()
	base := benchBase{ref: ref}
	// Spread the files evenly over the layers, bottom layers first.
	files := (mib + benchFileMiB - 1) / benchFileMiB
	perLayer := make([][]string, benchLayers)
	sizes := map[string]int64{}
	left := int64(mib) << 20
	for i := range files {
		l := i * benchLayers / files
		p := fmt.Sprintf("data/part%d/f%04d.bin", l, i)
		sizes[p] = min(left, benchFileMiB<<20)
		left -= sizes[p]
		perLayer[l] = append(perLayer[l], p)
		base.big = append(base.big, p)
	}
	base.content = int64(mib) << 20
	var small []testimage.Entry
	for i := range benchSmallFiles {
		p := fmt.Sprintf("etc/conf-%d.txt", i)
		small = append(small, testimage.File(p, fmt.Sprintf("setting %d = base\n", i)))
		base.small = append(base.small, p)
	}

	layers := make([]*fileLayer, benchLayers)
	errs := make([]error, benchLayers)
	var wg sync.WaitGroup
	for l := range benchLayers {
		wg.Go(func() {
			var extra []testimage.Entry
			if l == benchLayers-1 {
				extra = small
			}
			layers[l], errs[l] = writeBenchLayer(filepath.Join(dir, fmt.Sprintf("layer%d.tar.gz", l)), l, perLayer[l], sizes, extra)
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		tb.Fatal(err)
	}
	base.built = time.Since(start)
	var vl []v1.Layer
	for _, l := range layers {
		vl = append(vl, l)
		base.layers = append(base.layers, l.digest)
		base.layerBytes = append(base.layerBytes, l.size)
	}
	base.digest = testimage.Push(tb, ref, testimage.Image(tb, vl...)).String()
	base.pushed = time.Since(start) - base.built
	return base
}

// writeBenchLayer writes one layer, tar then gzip (BestSpeed), to path,
// hashing both streams on the way.
func writeBenchLayer(path string, l int, files []string, sizes map[string]int64, extra []testimage.Entry) (*fileLayer, error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	digest, diffID := sha256.New(), sha256.New()
	compressed := &countWriter{w: io.MultiWriter(f, digest)}
	gz, err := gzip.NewWriterLevel(compressed, gzip.BestSpeed)
	if err != nil {
		return nil, err
	}
	tw := tar.NewWriter(io.MultiWriter(gz, diffID))
	hdr := func(h *tar.Header) error {
		h.ModTime, h.Format = testimage.Epoch, tar.FormatPAX
		return tw.WriteHeader(h)
	}
	dirs := []string{"data/", fmt.Sprintf("data/part%d/", l)}
	if len(extra) > 0 {
		dirs = append(dirs, "etc/")
	}
	for _, d := range dirs {
		if err := hdr(&tar.Header{Name: d, Typeflag: tar.TypeDir, Mode: 0o755}); err != nil {
			return nil, err
		}
	}
	buf := make([]byte, benchFileMiB<<20)
	for i, p := range files {
		body := buf[:sizes[p]]
		randomFill(chacha("strata-bench-base", l<<20|i), body)
		if err := hdr(&tar.Header{Name: p, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(body))}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(body); err != nil {
			return nil, err
		}
	}
	for _, e := range extra {
		if err := hdr(&tar.Header{Name: e.Name, Typeflag: tar.TypeReg, Mode: e.Mode, Size: int64(len(e.Body))}); err != nil {
			return nil, err
		}
		if _, err := io.WriteString(tw, e.Body); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	if err := gz.Close(); err != nil {
		return nil, err
	}
	if err := f.Close(); err != nil {
		return nil, err
	}
	return &fileLayer{path: path, size: compressed.n, digest: hashOf(digest), diffID: hashOf(diffID)}, nil
}

func hashOf(h hash.Hash) v1.Hash {
	return v1.Hash{Algorithm: "sha256", Hex: fmt.Sprintf("%x", h.Sum(nil))}
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

// fileLayer is a gzip layer in a file whose digests are known: pushing it
// reads the file once, and nothing of it is held in memory.
type fileLayer struct {
	path           string
	size           int64
	digest, diffID v1.Hash
}

func (l *fileLayer) Digest() (v1.Hash, error)            { return l.digest, nil }
func (l *fileLayer) DiffID() (v1.Hash, error)            { return l.diffID, nil }
func (l *fileLayer) Size() (int64, error)                { return l.size, nil }
func (l *fileLayer) MediaType() (types.MediaType, error) { return types.OCILayer, nil }
func (l *fileLayer) Compressed() (io.ReadCloser, error)  { return os.Open(l.path) }

func (l *fileLayer) Uncompressed() (io.ReadCloser, error) {
	f, err := os.Open(l.path)
	if err != nil {
		return nil, err
	}
	gz, err := gzip.NewReader(f)
	if err != nil {
		f.Close()
		return nil, err
	}
	return struct {
		io.Reader
		io.Closer
	}{gz, f}, nil
}

// diskBytes is the disk space (st_blocks*512) of every file at or below
// dir, on dir's own filesystem: mounts below dir (a clone's ext4 at fs/)
// are not entered.
func diskBytes(tb testing.TB, dir string) int64 {
	tb.Helper()
	var root unix.Stat_t
	if err := unix.Lstat(dir, &root); err != nil {
		tb.Fatal(err)
	}
	var total int64
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		if st.Dev != root.Dev {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		total += st.Blocks * 512
		return nil
	})
	if err != nil {
		tb.Fatalf("disk usage of %s: %v", dir, err)
	}
	return total
}

// describe tells what the image is and how long it took to make, for the
// benchmarks' tables.
func (b benchBase) describe() string {
	return fmt.Sprintf("%d MiB in %d gzip layers, %d files (built in %.1f s, pushed in %.1f s)",
		b.content>>20, len(b.layers), len(b.big)+len(b.small), b.built.Seconds(), b.pushed.Seconds())
}

// quantile is the q-quantile (nearest rank) of ds, which it sorts.
func quantile(ds []time.Duration, q float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	i := int(float64(len(ds))*q+0.999999) - 1
	return ds[max(0, min(i, len(ds)-1))]
}

// mean is the mean of ds.
func mean(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	var s time.Duration
	for _, d := range ds {
		s += d
	}
	return s / time.Duration(len(ds))
}

// millis and mebi format for the benchmark tables.
func millis(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
func mebi(n int64) float64           { return float64(n) / (1 << 20) }
