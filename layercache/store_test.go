package layercache

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"golang.org/x/sys/unix"

	"github.com/strata-csi/strata/test/testimage"
)

func TestPullStacksWhiteoutsAndOpaqueDirs(t *testing.T) {
	for _, c := range []testimage.Compression{testimage.Gzip, testimage.Zstd, testimage.None} {
		t.Run(string(c), func(t *testing.T) {
			t.Parallel()
			reg := testimage.Registry(t)
			ref := reg + "/dataset:v1"
			testimage.Push(t, ref, sampleImage(t, c))
			s := openStore(t, t.TempDir())

			img, err := s.Pull(context.Background(), ref, PullOptions{})
			if err != nil {
				t.Fatalf("Pull: %v", err)
			}
			if got := tree(t, mountImage(t, s, img)); !reflect.DeepEqual(got, sampleMerged) {
				t.Errorf("merged view:\n got %q\nwant %q", got, sampleMerged)
			}
			upper, _ := s.LayerDir(img.Layers[1].DiffID)
			var st unix.Stat_t
			if err := unix.Lstat(filepath.Join(upper, "data/old.csv"), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFCHR || st.Rdev != 0 {
				t.Errorf("data/old.csv in the upper layer: want a 0/0 char device, got mode %o rdev %d err %v", st.Mode, st.Rdev, err)
			}
			buf := make([]byte, 8)
			if n, err := unix.Lgetxattr(filepath.Join(upper, "data/raw"), "trusted.overlay.opaque", buf); err != nil || string(buf[:n]) != "y" {
				t.Errorf("data/raw: want trusted.overlay.opaque=y, got %q, %v", buf[:n], err)
			}
			for _, l := range img.Layers {
				d, _ := s.LayerDir(l.DiffID)
				_ = filepath.Walk(d, func(p string, _ os.FileInfo, _ error) error {
					if strings.HasPrefix(filepath.Base(p), ".wh.") {
						t.Errorf("OCI whiteout file left in layer: %s", p)
					}
					return nil
				})
			}
		})
	}
}

func TestSecondPullIsACacheHit(t *testing.T) {
	sp := newSpy()
	reg := testimage.Server(t, sp.wrap)
	ref := reg + "/dataset:v1"
	src := sampleImage(t, testimage.Gzip)
	testimage.Push(t, ref, src)
	s := openStore(t, t.TempDir())

	var cached []ProgressEvent
	var mu sync.Mutex
	o := PullOptions{Progress: func(e ProgressEvent) {
		mu.Lock()
		defer mu.Unlock()
		if e.State == LayerCached {
			cached = append(cached, e)
		}
	}}
	if _, err := s.Pull(context.Background(), ref, o); err != nil {
		t.Fatal(err)
	}
	if len(cached) != 0 {
		t.Errorf("first pull: %d layers reported cached, want 0", len(cached))
	}
	if _, err := s.Pull(context.Background(), ref, o); err != nil {
		t.Fatal(err)
	}
	if len(cached) != 2 {
		t.Errorf("second pull: %d layers reported cached, want 2", len(cached))
	}
	for _, d := range layerDigests(t, src) {
		if n := sp.count(d); n != 1 {
			t.Errorf("blob %s downloaded %d times, want 1", d, n)
		}
	}
}

func TestSameLayerCompressedTwoWaysIsStoredOnce(t *testing.T) {
	reg := testimage.Registry(t)
	content := testimage.Tar(t, testimage.Dir("w"), testimage.File("w/model.bin", strings.Repeat("weights", 1000)))
	refs := map[testimage.Compression]string{}
	for _, c := range []testimage.Compression{testimage.Gzip, testimage.Zstd, testimage.None} {
		refs[c] = reg + "/model:" + string(c)
		testimage.Push(t, refs[c], testimage.Image(t, testimage.Layer(t, content, c)))
	}
	s := openStore(t, t.TempDir())
	var diffIDs []v1.Hash
	for _, ref := range refs {
		img, err := s.Pull(context.Background(), ref, PullOptions{})
		if err != nil {
			t.Fatal(err)
		}
		diffIDs = append(diffIDs, img.Layers[0].DiffID)
	}
	if diffIDs[0] != diffIDs[1] || diffIDs[1] != diffIDs[2] {
		t.Fatalf("diffIDs differ: %v", diffIDs)
	}
	layers, err := s.Layers()
	if err != nil {
		t.Fatal(err)
	}
	if len(layers) != 1 {
		t.Fatalf("store holds %d layers, want 1", len(layers))
	}
	u, err := s.Usage()
	if err != nil {
		t.Fatal(err)
	}
	if u.SharedBytes != 7000 || u.SavedBytes != 14000 || u.Bytes != 7000 {
		t.Errorf("usage %+v: want 7000 bytes, all shared, 14000 saved", u)
	}
}

func TestResolveWorksOfflineFromTheCache(t *testing.T) {
	sp := newSpy()
	reg := testimage.Server(t, sp.wrap)
	ref := reg + "/dataset:v1"
	dig := testimage.Push(t, ref, sampleImage(t, testimage.Gzip))
	s := openStore(t, t.TempDir())
	if _, err := s.Pull(context.Background(), ref, PullOptions{}); err != nil {
		t.Fatal(err)
	}
	sp.set(func(s *spy) { s.down = true })
	for _, tc := range []struct {
		name    string
		ref     string
		policy  PullPolicy
		wantErr error
	}{
		{"tag IfNotPresent", ref, PullIfNotPresent, nil},
		{"tag Never", ref, PullNever, nil},
		{"digest Always", reg + "/dataset@" + dig.String(), PullAlways, nil},
		{"tag Always needs the registry", ref, PullAlways, ErrUnavailable},
		{"unknown tag Never", reg + "/dataset:v2", PullNever, ErrNotCached},
		{"unknown tag IfNotPresent", reg + "/dataset:v2", PullIfNotPresent, ErrUnavailable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img, err := s.Pull(context.Background(), tc.ref, PullOptions{Policy: tc.policy})
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil && err != nil) {
				t.Fatalf("Pull(%s, %s) = %v, want %v", tc.ref, tc.policy, err, tc.wantErr)
			}
			if err == nil && img.Digest != dig {
				t.Errorf("resolved to %s, want %s", img.Digest, dig)
			}
		})
	}
}

func TestNeverPolicyDoesNotContactTheRegistry(t *testing.T) {
	sp := newSpy()
	reg := testimage.Server(t, sp.wrap)
	ref := reg + "/dataset:v1"
	testimage.Push(t, ref, sampleImage(t, testimage.Gzip))
	s := openStore(t, t.TempDir())
	_, err := s.Pull(context.Background(), ref, PullOptions{Policy: PullNever})
	if !errors.Is(err, ErrNotCached) {
		t.Fatalf("Pull Never of an uncached image = %v, want ErrNotCached", err)
	}
	if !strings.Contains(err.Error(), "pull policy is Never") {
		t.Errorf("error %q does not explain the policy", err)
	}
}

func TestIndexPicksThePlatform(t *testing.T) {
	reg := testimage.Registry(t)
	mk := func(tag string) v1.Image {
		return testimage.Image(t, testimage.Layer(t, testimage.Tar(t, testimage.File("arch", tag)), testimage.Gzip))
	}
	amd, arm := mk("amd64"), mk("arm64")
	idx := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: arm, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "arm64"}}},
		mutate.IndexAddendum{Add: amd, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}}},
	)
	ref := reg + "/multi:v1"
	idxDigest := testimage.PushIndex(t, ref, idx)
	armOnly := reg + "/armonly:v1"
	testimage.PushIndex(t, armOnly, mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: arm, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "arm64"}}}))

	for _, tc := range []struct {
		name     string
		ref      string
		platform v1.Platform
		want     v1.Image
		wantErr  error
	}{
		{"node platform", ref, v1.Platform{OS: "linux", Architecture: "arm64"}, arm, nil},
		{"fallback to linux/amd64", ref, v1.Platform{OS: "linux", Architecture: "s390x"}, amd, nil},
		{"no usable platform", armOnly, v1.Platform{OS: "linux", Architecture: "s390x"}, nil, ErrUnsupported},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := openStore(t, t.TempDir(), WithPlatform(tc.platform))
			img, err := s.Pull(context.Background(), tc.ref, PullOptions{})
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil && err != nil) {
				t.Fatalf("Pull = %v, want %v", err, tc.wantErr)
			}
			if err != nil {
				return
			}
			want, _ := tc.want.Digest()
			if img.Digest != want || img.IndexDigest == nil || *img.IndexDigest != idxDigest {
				t.Errorf("resolved to %s (index %v), want %s (index %s)", img.Digest, img.IndexDigest, want, idxDigest)
			}
		})
	}
}

func TestCorruptBlobStoresNothing(t *testing.T) {
	sp := newSpy()
	reg := testimage.Server(t, sp.wrap)
	ref := reg + "/dataset:v1"
	src := sampleImage(t, testimage.Gzip)
	testimage.Push(t, ref, src)
	d := layerDigests(t, src)[1]
	sp.set(func(s *spy) { s.corrupt[d.String()] = true })
	s := openStore(t, t.TempDir())

	_, err := s.Pull(context.Background(), ref, PullOptions{})
	if !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("Pull of a corrupted blob = %v, want ErrDigestMismatch", err)
	}
	if !strings.Contains(err.Error(), d.String()) {
		t.Errorf("error %q does not name the blob %s", err, d)
	}
	layers, _ := s.Layers()
	for _, l := range layers {
		if l.Digest == d {
			t.Errorf("corrupted layer %s was stored", d)
		}
	}
	if work := dirEntries(t, s.work); len(work) != 0 {
		t.Errorf("work dir not cleaned: %v", work)
	}
	// The registry heals: the next pull succeeds.
	sp.set(func(s *spy) { delete(s.corrupt, d.String()) })
	if _, err := s.Pull(context.Background(), ref, PullOptions{}); err != nil {
		t.Fatalf("Pull after the registry healed: %v", err)
	}
}

func TestWrongDiffIDStoresNothing(t *testing.T) {
	reg := testimage.Registry(t)
	src := sampleImage(t, testimage.Gzip)
	cfg, err := src.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cfg = cfg.DeepCopy()
	cfg.RootFS.DiffIDs[0] = cfg.RootFS.DiffIDs[1] // lie about the first layer
	bad, err := mutate.ConfigFile(src, cfg)
	if err != nil {
		t.Fatal(err)
	}
	ref := reg + "/liar:v1"
	testimage.Push(t, ref, bad)
	s := openStore(t, t.TempDir())
	if _, err := s.Pull(context.Background(), ref, PullOptions{}); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("Pull of an image with a wrong diffID = %v, want ErrDigestMismatch", err)
	}
	if l, _ := s.Layers(); len(l) > 1 {
		t.Errorf("store holds %d layers, want at most the one honest layer", len(l))
	}
}

func TestRegistryErrorsAreClassified(t *testing.T) {
	reg := testimage.Registry(t)
	testimage.Push(t, reg+"/dataset:v1", sampleImage(t, testimage.Gzip))
	s := openStore(t, t.TempDir())
	for _, tc := range []struct {
		ref  string
		want error
	}{
		{reg + "/dataset:nope", ErrNotFound},
		{reg + "/nothing:v1", ErrNotFound},
		{"127.0.0.1:1/dataset:v1", ErrUnavailable},
		{"UPPER/case:v1", ErrInvalidReference},
	} {
		if _, err := s.Pull(context.Background(), tc.ref, PullOptions{}); !errors.Is(err, tc.want) {
			t.Errorf("Pull(%s) = %v, want %v", tc.ref, err, tc.want)
		}
	}
}

func TestUnsafeLayerIsRefused(t *testing.T) {
	reg := testimage.Registry(t)
	ref := reg + "/evil:v1"
	evil := testimage.Tar(t, testimage.File("ok", "fine"), testimage.File("../../escaped", "gotcha"))
	testimage.Push(t, ref, testimage.Image(t, testimage.Layer(t, evil, testimage.Gzip)))
	base := t.TempDir()
	s := openStore(t, filepath.Join(base, "root"))
	_, err := s.Pull(context.Background(), ref, PullOptions{})
	if !errors.Is(err, ErrUnsafeLayer) {
		t.Fatalf("Pull = %v, want ErrUnsafeLayer", err)
	}
	if !strings.Contains(err.Error(), "../../escaped") {
		t.Errorf("error %q does not name the entry", err)
	}
	if l, _ := s.Layers(); len(l) != 0 {
		t.Errorf("unsafe layer stored: %v", l)
	}
	if got := dirEntries(t, base); !reflect.DeepEqual(got, []string{"root"}) {
		t.Errorf("something was written beside the store: %v", got)
	}
}

func TestConcurrentPullsFetchEachLayerOnce(t *testing.T) {
	sp := newSpy()
	sp.delay = time.Millisecond
	reg := testimage.Server(t, sp.wrap)
	shared := testimage.Layer(t, testimage.Tar(t, testimage.File("shared", strings.Repeat("s", 1<<20))), testimage.Gzip)
	var srcs []v1.Image
	for i := 0; i < 3; i++ {
		own := testimage.Layer(t, testimage.Tar(t, testimage.File("own", fmt.Sprint(i))), testimage.Gzip)
		img := testimage.Image(t, shared, own)
		testimage.Push(t, fmt.Sprintf("%s/img%d:v1", reg, i), img)
		srcs = append(srcs, img)
	}
	s := openStore(t, t.TempDir(), WithConcurrency(2))
	var wg sync.WaitGroup
	errs := make(chan error, 12)
	for i := 0; i < 12; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := s.Pull(context.Background(), fmt.Sprintf("%s/img%d:v1", reg, i%3), PullOptions{})
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, img := range srcs {
		for _, d := range layerDigests(t, img) {
			if n := sp.count(d); n != 1 {
				t.Errorf("blob %s downloaded %d times, want 1", d, n)
			}
		}
	}
}

func TestCancelledCallerDoesNotCancelTheSharedPull(t *testing.T) {
	sp := newSpy()
	reg := testimage.Server(t, sp.wrap)
	big := testimage.Layer(t, testimage.Tar(t, testimage.File("weights", strings.Repeat("w", 4<<20))), testimage.None)
	src := testimage.Image(t, big)
	ref := reg + "/slow:v1"
	testimage.Push(t, ref, src)
	sp.set(func(s *spy) { s.delay = 15 * time.Millisecond }) // 64 chunks: about a second
	s := openStore(t, t.TempDir())

	short, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err := s.Pull(short, ref, PullOptions{})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Pull with a short deadline = %v, want DeadlineExceeded", err)
	}
	// The retry joins the pull in flight rather than starting over.
	img, err := s.Pull(context.Background(), ref, PullOptions{})
	if err != nil {
		t.Fatalf("retry: %v", err)
	}
	if !s.HasLayer(img.Layers[0].DiffID) {
		t.Fatal("layer missing after the retry")
	}
	if n := sp.count(layerDigests(t, src)[0]); n != 1 {
		t.Errorf("blob downloaded %d times, want 1", n)
	}
}

func TestReferencesSurviveRestartAndGuardPrune(t *testing.T) {
	reg := testimage.Registry(t)
	a := testimage.Image(t, testimage.Layer(t, testimage.Tar(t, testimage.File("a", "a")), testimage.Gzip))
	b := testimage.Image(t, testimage.Layer(t, testimage.Tar(t, testimage.File("b", "b")), testimage.Gzip))
	testimage.Push(t, reg+"/a:v1", a)
	testimage.Push(t, reg+"/b:v1", b)
	root := t.TempDir()
	s, err := Open(root)
	if err != nil {
		t.Fatal(err)
	}
	imgA, err := s.Pull(context.Background(), reg+"/a:v1", PullOptions{})
	if err != nil {
		t.Fatal(err)
	}
	imgB, err := s.Pull(context.Background(), reg+"/b:v1", PullOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Acquire("volume-1", imgA.DiffIDs()); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s = openStore(t, root)
	owners, err := s.Owners()
	if err != nil {
		t.Fatal(err)
	}
	if want := map[string][]v1.Hash{"volume-1": imgA.DiffIDs()}; !reflect.DeepEqual(owners, want) {
		t.Fatalf("owners after reopen = %v, want %v", owners, want)
	}
	res, err := s.Prune(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(res.Layers, imgB.DiffIDs()) {
		t.Errorf("pruned %v, want %v", res.Layers, imgB.DiffIDs())
	}
	if !s.HasLayer(imgA.Layers[0].DiffID) || s.HasLayer(imgB.Layers[0].DiffID) {
		t.Error("prune removed a layer in use or kept an unused one")
	}
	imgs, _ := s.Images()
	if len(imgs) != 1 || imgs[0].Ref != reg+"/a:v1" {
		t.Errorf("images after prune = %+v, want only a", imgs)
	}
	if err := s.Release("volume-1"); err != nil {
		t.Fatal(err)
	}
	if err := s.Release("volume-1"); err != nil {
		t.Fatalf("second release: %v", err)
	}
	if res, err := s.Prune(context.Background()); err != nil || len(res.Layers) != 1 {
		t.Fatalf("prune after release = %+v, %v; want one layer removed", res, err)
	}
	if err := s.Acquire("volume-2", imgA.DiffIDs()); !errors.Is(err, ErrLayerMissing) {
		t.Errorf("Acquire of a pruned layer = %v, want ErrLayerMissing", err)
	}
}

// A prune racing with acquires never removes a layer that an Acquire has
// reported as held.
func TestPruneRacingAcquire(t *testing.T) {
	reg := testimage.Registry(t)
	ref := reg + "/a:v1"
	testimage.Push(t, ref, sampleImage(t, testimage.Gzip))
	s := openStore(t, t.TempDir())
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	// The pruner must be done before the test returns: the cleanup closes
	// the store, and a prune still running would fail on its work dir.
	pruned := make(chan struct{})
	defer func() { cancel(); <-pruned }()
	go func() {
		defer close(pruned)
		for ctx.Err() == nil {
			if _, err := s.Prune(context.Background()); err != nil {
				t.Errorf("prune: %v", err)
				return
			}
		}
	}()
	held := 0
	for i := 0; ctx.Err() == nil && i < 200; i++ {
		img, err := s.Pull(context.Background(), ref, PullOptions{})
		if err != nil {
			t.Fatal(err)
		}
		switch err := s.Acquire("vol", img.DiffIDs()); {
		case errors.Is(err, ErrLayerMissing):
			continue // pruned between Ensure and Acquire: ensure again
		case err != nil:
			t.Fatal(err)
		}
		held++
		time.Sleep(time.Millisecond) // let a prune run while we hold
		for _, d := range img.DiffIDs() {
			if !s.HasLayer(d) {
				t.Fatalf("held layer %s was pruned", d)
			}
		}
		if err := s.Release("vol"); err != nil {
			t.Fatal(err)
		}
	}
	if held == 0 {
		t.Fatal("no acquire succeeded")
	}
}
