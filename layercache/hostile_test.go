package layercache

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"golang.org/x/sys/unix"

	"github.com/strata-csi/strata/test/peak"
	"github.com/strata-csi/strata/test/testfs"
	"github.com/strata-csi/strata/test/testimage"
)

// Tests of section 4a of issue 12: a pod cannot fill the node's disk
// through the layer cache. Every byte of a layer is untrusted, so the budget
// is enforced while a layer is written, not from what its manifest claims.

const (
	// bombSize is what the bomb layer unpacks to: 1 GiB of one non-zero
	// byte, so that every block would really be written (zeros would make a
	// sparse file).
	bombSize = 1 << 30
	// bombBudget is the cache budget the bomb meets.
	bombBudget = 64 << 20
)

var (
	bombOnce  sync.Once
	bombLayer v1.Layer
)

// pushBomb pushes a one-layer image that is about 1 MiB compressed and
// unpacks to 1 GiB.
func pushBomb(t *testing.T, ref string) {
	t.Helper()
	bombOnce.Do(func() { bombLayer = testimage.Bomb(t, testimage.Gzip, "data/weights.bin", bombSize, 'A') })
	testimage.Push(t, ref, testimage.Image(t, bombLayer))
}

// watchDisk samples the disk use under root until the returned function is
// called, which returns the largest use seen (and a last sample).
func watchDisk(t *testing.T, root string) func() int64 {
	t.Helper()
	f := peak.Watch(10*time.Millisecond, func() int64 {
		var total int64
		// Files come and go while a pull runs: count what can be seen.
		_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return nil
			}
			if info, err := d.Info(); err == nil {
				total += info.Sys().(*syscall.Stat_t).Blocks * 512
			}
			return nil
		})
		return total
	})
	t.Cleanup(func() { f() })
	return f
}

// assertNothingLeft checks that no layer and no temporary file remains.
func assertNothingLeft(t *testing.T, s *Store) {
	t.Helper()
	if e := dirEntries(t, s.work); len(e) != 0 {
		t.Errorf("left in tmp/: %v", e)
	}
	if e := dirEntries(t, filepath.Join(s.root, layersDir)); len(e) != 0 {
		t.Errorf("left in layers/: %v", e)
	}
}

// wantNoSpace checks that err is ErrNoSpace with a message naming each of
// words.
func wantNoSpace(t *testing.T, err error, words ...string) {
	t.Helper()
	if !errors.Is(err, ErrNoSpace) {
		t.Fatalf("pull = %v, want ErrNoSpace", err)
	}
	for _, w := range words {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not say %q", err, w)
		}
	}
}

// TestBudgetStopsDecompressionBomb: a 1 MiB gzip layer that unpacks to
// 1 GiB, under a 64 MiB budget, stops once the budget is used, names the
// image, the size unpacked so far and the budget, and leaves nothing.
func TestBudgetStopsDecompressionBomb(t *testing.T) {
	reg := testimage.Registry(t)
	ref := reg + "/bomb:v1"
	pushBomb(t, ref)
	s := openStore(t, t.TempDir(), WithBudget(Budget{MaxBytes: bombBudget}))
	peak := watchDisk(t, s.root)
	_, err := s.Pull(context.Background(), ref, PullOptions{})
	wantNoSpace(t, err, ref, "unpacked so far", fmt.Sprint(bombBudget))
	t.Log(err)
	if p := peak(); p > bombBudget+8<<20 {
		t.Errorf("the store took up to %d bytes on disk, over the budget of %d", p, bombBudget)
	}
	assertNothingLeft(t, s)
}

// bombImage pushes an image of one layer per fill byte, each a file of size
// bytes of that byte, and returns its reference.
func bombImage(t *testing.T, ref string, c testimage.Compression, size int64, fills ...byte) string {
	t.Helper()
	var layers []v1.Layer
	for _, f := range fills {
		layers = append(layers, testimage.Bomb(t, c, fmt.Sprintf("data/%02x.bin", f), size, f))
	}
	testimage.Push(t, ref, testimage.Image(t, layers...))
	return ref
}

// TestBudgetStack: two images that fit the budget one by one but not
// together, pulled as a stack: the second fails and its layer leaves
// nothing; the first stays.
func TestBudgetStack(t *testing.T) {
	reg := testimage.Registry(t)
	base := bombImage(t, reg+"/base:v1", testimage.Gzip, 40<<20, 'a')
	top := bombImage(t, reg+"/top:v1", testimage.Gzip, 40<<20, 'b')
	s := openStore(t, t.TempDir(), WithBudget(Budget{MaxBytes: bombBudget}))
	peak := watchDisk(t, s.root)
	imgs := pullAll(t, s, base)
	_, err := s.Pull(context.Background(), top, PullOptions{})
	wantNoSpace(t, err, top, "unpacked so far", fmt.Sprint(bombBudget))
	if p := peak(); p > bombBudget+8<<20 {
		t.Errorf("the store took up to %d bytes on disk, over the budget of %d", p, bombBudget)
	}
	if e := dirEntries(t, s.work); len(e) != 0 {
		t.Errorf("left in tmp/: %v", e)
	}
	layers, err := s.Layers()
	if err != nil {
		t.Fatal(err)
	}
	if len(layers) != 1 || layers[0].DiffID != imgs[0].Layers[0].DiffID {
		t.Errorf("cached layers %v, want only the base image's %s", layers, imgs[0].Layers[0].DiffID)
	}
}

// TestBudgetSharedByConcurrentPulls: layers unpacked at the same time, of
// one image or of several, share one budget: together they cannot pass it.
func TestBudgetSharedByConcurrentPulls(t *testing.T) {
	reg := testimage.Registry(t)
	// One image of three layers, unpacked in parallel by one Ensure.
	wide := bombImage(t, reg+"/wide:v1", testimage.Gzip, 40<<20, 'c', 'd', 'e')
	// Three images of one layer, pulled at once.
	var refs []string
	for _, f := range []byte{'f', 'g', 'h'} {
		refs = append(refs, bombImage(t, fmt.Sprintf("%s/single-%c:v1", reg, f), testimage.Gzip, 40<<20, f))
	}
	t.Run("layers of one image", func(t *testing.T) {
		s := openStore(t, t.TempDir(), WithBudget(Budget{MaxBytes: bombBudget}), WithConcurrency(3))
		peak := watchDisk(t, s.root)
		_, err := s.Pull(context.Background(), wide, PullOptions{})
		wantNoSpace(t, err, wide)
		if p := peak(); p > bombBudget+8<<20 {
			t.Errorf("the store took up to %d bytes on disk, over the budget of %d", p, bombBudget)
		}
		if e := dirEntries(t, s.work); len(e) != 0 {
			t.Errorf("left in tmp/: %v", e)
		}
		if s.res.inflight != 0 {
			t.Errorf("%d bytes still reserved after the pull", s.res.inflight)
		}
	})
	t.Run("several images", func(t *testing.T) {
		s := openStore(t, t.TempDir(), WithBudget(Budget{MaxBytes: bombBudget}), WithConcurrency(3))
		peak := watchDisk(t, s.root)
		errs := make([]error, len(refs))
		var wg sync.WaitGroup
		for i, r := range refs {
			wg.Go(func() { _, errs[i] = s.Pull(context.Background(), r, PullOptions{}) })
		}
		wg.Wait()
		failed := 0
		for i, err := range errs {
			if err != nil {
				wantNoSpace(t, err, refs[i])
				failed++
			}
		}
		// 40 MiB each in 64 MiB: at most one fits.
		if failed < 2 {
			t.Errorf("%d of 3 pulls of 40 MiB into a 64 MiB budget failed, want at least 2: %v", failed, errs)
		}
		if p := peak(); p > bombBudget+8<<20 {
			t.Errorf("the store took up to %d bytes on disk, over the budget of %d", p, bombBudget)
		}
		if e := dirEntries(t, s.work); len(e) != 0 {
			t.Errorf("left in tmp/: %v", e)
		}
		if s.res.inflight != 0 {
			t.Errorf("%d bytes still reserved after the pulls", s.res.inflight)
		}
	})
}

// TestBudgetManyEmptyFiles: a layer of 100,000 empty files costs
// EntryBytes each, and stops at the budget like a big file.
func TestBudgetManyEmptyFiles(t *testing.T) {
	reg := testimage.Registry(t)
	ref := reg + "/files:v1"
	testimage.Push(t, ref, testimage.Image(t, testimage.ManyFiles(t, testimage.Gzip, 100000)))
	s := openStore(t, t.TempDir(), WithBudget(Budget{MaxBytes: bombBudget}), WithLayerLimits(Limits{}))
	_, err := s.Pull(context.Background(), ref, PullOptions{})
	wantNoSpace(t, err, ref, fmt.Sprint(bombBudget))
	assertNothingLeft(t, s)
}

// TestLayerExpansionCeiling: without any budget, a layer that unpacks to
// more than 100 times its compressed size (and more than the floor) stops,
// with gzip and with zstd; a tiny layer of a highly compressible file, far
// over 100x but under the floor, pulls.
func TestLayerExpansionCeiling(t *testing.T) {
	reg := testimage.Registry(t)
	for _, c := range []testimage.Compression{testimage.Gzip, testimage.Zstd} {
		t.Run(string(c), func(t *testing.T) {
			ref := bombImage(t, fmt.Sprintf("%s/expand-%s:v1", reg, c), c, 256<<20, 'x')
			s := openStore(t, t.TempDir())
			peak := watchDisk(t, s.root)
			_, err := s.Pull(context.Background(), ref, PullOptions{})
			wantNoSpace(t, err, ref, "100 times its compressed size", "--layer-max-expansion")
			if !errors.Is(err, ErrLayerTooLarge) {
				t.Errorf("error %v is not ErrLayerTooLarge", err)
			}
			if p := peak(); p > DefaultExpansionFloor+8<<20 {
				t.Errorf("the store took up to %d bytes on disk, over the ceiling of %d", p, DefaultExpansionFloor)
			}
			assertNothingLeft(t, s)
		})
	}
	t.Run("bytes read but not written", func(t *testing.T) {
		// A whiteout entry's content is never written, only decompressed
		// and hashed: it counts against the ceiling all the same.
		ref := reg + "/whiteout-bomb:v1"
		testimage.Push(t, ref, testimage.Image(t, testimage.Bomb(t, testimage.Gzip, "data/.wh.big", 256<<20, 'w')))
		s := openStore(t, t.TempDir())
		_, err := s.Pull(context.Background(), ref, PullOptions{})
		wantNoSpace(t, err, ref, "--layer-max-expansion")
		assertNothingLeft(t, s)
	})
	t.Run("small layer under the floor", func(t *testing.T) {
		ref := bombImage(t, reg+"/zeros:v1", testimage.Gzip, 1<<20, 0)
		s := openStore(t, t.TempDir())
		img := pullAll(t, s, ref)[0]
		if img.Layers[0].Size > 2000 {
			t.Fatalf("layer is %d bytes compressed, want a tiny one", img.Layers[0].Size)
		}
		if !s.HasLayer(img.Layers[0].DiffID) {
			t.Error("the small layer was not cached")
		}
	})
}

// TestLayerMaxBytes: a layer bigger than the absolute limit stops, with or
// without a budget.
func TestLayerMaxBytes(t *testing.T) {
	reg := testimage.Registry(t)
	ref := bombImage(t, reg+"/big:v1", testimage.Gzip, 32<<20, 'y')
	s := openStore(t, t.TempDir(), WithLayerLimits(Limits{MaxLayerBytes: 8 << 20}))
	_, err := s.Pull(context.Background(), ref, PullOptions{})
	wantNoSpace(t, err, ref, "8388608 bytes", "--layer-max-bytes")
	if !errors.Is(err, ErrLayerTooLarge) {
		t.Errorf("error %v is not ErrLayerTooLarge", err)
	}
	assertNothingLeft(t, s)
}

// TestBudgetLegitImagePulls: an ordinary image under the budget pulls, and
// counts in the budget exactly what its unpack charged.
func TestBudgetLegitImagePulls(t *testing.T) {
	reg := testimage.Registry(t)
	ref := reg + "/legit:v1"
	weights := make([]byte, 8<<20)
	if _, err := rand.Read(weights); err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(sampleImage(t, testimage.Gzip),
		testimage.Layer(t, testimage.Tar(t, testimage.Dir("model"), testimage.File("model/weights.bin", string(weights))), testimage.Gzip))
	if err != nil {
		t.Fatal(err)
	}
	testimage.Push(t, ref, img)
	s := openStore(t, t.TempDir(), WithBudget(Budget{MaxBytes: bombBudget}))
	pulled := pullAll(t, s, ref)[0]
	layers, err := s.Layers()
	if err != nil {
		t.Fatal(err)
	}
	if len(layers) != len(pulled.Layers) {
		t.Fatalf("%d layers cached, want %d", len(layers), len(pulled.Layers))
	}
	var sum int64
	for _, l := range layers {
		if l.Entries == 0 {
			t.Errorf("layer %s: entries not recorded", l.DiffID)
		}
		sum += l.BudgetSize()
	}
	if s.res.inflight != 0 || s.res.committed != sum {
		t.Errorf("reservation after the pull: %d in flight, %d committed; want 0 and %d", s.res.inflight, s.res.committed, sum)
	}
}

// TestUnpackKeepsInodesFree: a layer of more empty files than its
// filesystem has inodes stops while MinFreeInodes of them are still free
// (the byte budget does not bound inodes), and leaves nothing.
func TestUnpackKeepsInodesFree(t *testing.T) {
	requireRoot(t)
	mnt := testfs.LoopExt4(t, 128, "-N", "16384")

	reg := testimage.Registry(t)
	ref := reg + "/inodes:v1"
	testimage.Push(t, ref, testimage.Image(t, testimage.ManyFiles(t, testimage.Gzip, 20000)))
	s := openStore(t, filepath.Join(mnt, "root"), WithLayerLimits(Limits{}))
	var st unix.Statfs_t
	if err := unix.Statfs(mnt, &st); err != nil {
		t.Fatal(err)
	}
	total := int64(st.Files)
	// The fewest free inodes: the most of their negation.
	fewestFree := peak.Watch(5*time.Millisecond, func() int64 {
		var st unix.Statfs_t
		if unix.Statfs(mnt, &st) != nil {
			return -int64(^uint64(0) >> 1)
		}
		return -int64(st.Ffree)
	})
	_, err := s.Pull(context.Background(), ref, PullOptions{})
	minFree := -fewestFree()
	wantNoSpace(t, err, ref, "inodes free")
	t.Log(err)
	if want := int64(MinFreeInodes*float64(total)) - inodeCheckEvery - 64; minFree < want {
		t.Errorf("free inodes fell to %d of %d during the pull, want at least about %d", minFree, total, want)
	}
	assertNothingLeft(t, s)
}
