package layercache

import (
	"bytes"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"

	"github.com/strata-csi/strata/test/testimage"
)

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("these tests need root: they create whiteout devices, chown files and mount overlays")
	}
}

func openStore(t testing.TB, root string, opts ...Option) *Store {
	t.Helper()
	requireRoot(t)
	// Retries stay on, with short backoffs so that failing registries do
	// not slow the suite down; tests may override.
	s, err := Open(root, append([]Option{WithRetry(3, 10*time.Millisecond)}, opts...)...)
	if err != nil {
		t.Fatalf("Open(%s): %v", root, err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// spy wraps a registry handler: it counts blob downloads per digest, and can
// corrupt or slow down chosen blobs.
type spy struct {
	mu      sync.Mutex
	blobs   map[string]int
	corrupt map[string]bool
	delay   time.Duration // per 64 KiB of blob
	down    bool
}

func newSpy() *spy { return &spy{blobs: map[string]int{}, corrupt: map[string]bool{}} }

func (s *spy) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		down, delay := s.down, s.delay
		s.mu.Unlock()
		if down {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		i := strings.Index(r.URL.Path, "/blobs/sha256:")
		if r.Method != http.MethodGet || i < 0 {
			next.ServeHTTP(w, r)
			return
		}
		d := r.URL.Path[i+len("/blobs/"):]
		s.mu.Lock()
		s.blobs[d]++
		corrupt := s.corrupt[d]
		s.mu.Unlock()
		if !corrupt && delay == 0 {
			next.ServeHTTP(w, r)
			return
		}
		rec := &recorder{header: http.Header{}, code: http.StatusOK}
		next.ServeHTTP(rec, r)
		body := rec.buf.Bytes()
		if corrupt && len(body) > 0 {
			body[len(body)/2] ^= 0xff
		}
		for k, v := range rec.header {
			w.Header()[k] = v
		}
		w.WriteHeader(rec.code)
		for len(body) > 0 {
			n := min(len(body), 64<<10)
			if _, err := w.Write(body[:n]); err != nil {
				return
			}
			body = body[n:]
			if f, ok := w.(http.Flusher); ok {
				f.Flush()
			}
			time.Sleep(delay)
		}
	})
}

func (s *spy) set(f func(*spy)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f(s)
}

func (s *spy) count(d v1.Hash) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.blobs[d.String()]
}

type recorder struct {
	header http.Header
	code   int
	buf    bytes.Buffer
}

func (r *recorder) Header() http.Header         { return r.header }
func (r *recorder) Write(b []byte) (int, error) { return r.buf.Write(b) }
func (r *recorder) WriteHeader(code int)        { r.code = code }

// layerDigests returns the compressed digests of img's layers.
func layerDigests(t testing.TB, img v1.Image) []v1.Hash {
	t.Helper()
	ls, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	var out []v1.Hash
	for _, l := range ls {
		d, err := l.Digest()
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, d)
	}
	return out
}

// mountImage overlay-mounts img's layers read-only and returns the merged
// directory. This is the real consumer of the cache: it proves the layers
// are valid overlayfs lowers.
func mountImage(t testing.TB, s *Store, img *Image) string {
	t.Helper()
	var lowers []string
	for i := len(img.Layers) - 1; i >= 0; i-- {
		d, err := s.LayerDir(img.Layers[i].DiffID)
		if err != nil {
			t.Fatal(err)
		}
		lowers = append(lowers, d)
	}
	mnt := t.TempDir()
	if len(lowers) == 1 {
		lowers = append(lowers, t.TempDir()) // overlay needs two lowers without an upper
	}
	if err := unix.Mount("overlay", mnt, "overlay", unix.MS_RDONLY, "lowerdir="+strings.Join(lowers, ":")); err != nil {
		t.Fatalf("mount overlay of %s: %v", img.Ref, err)
	}
	t.Cleanup(func() { _ = unix.Unmount(mnt, unix.MNT_DETACH) })
	return mnt
}

// tree lists the files under dir as "path" or "path -> target" or
// "path = content", sorted, for comparison.
func tree(t testing.TB, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		if rel == "." {
			return nil
		}
		switch {
		case fi.Mode()&os.ModeSymlink != 0:
			target, _ := os.Readlink(p)
			out = append(out, rel+" -> "+target)
		case fi.IsDir():
			out = append(out, rel+"/")
		case fi.Mode().IsRegular():
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			out = append(out, rel+" = "+string(b))
		default:
			out = append(out, rel+" ("+fi.Mode().Type().String()+")")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// dirEntries lists the names in dir (empty if it does not exist).
func dirEntries(t testing.TB, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var out []string
	for _, e := range es {
		out = append(out, e.Name())
	}
	return out
}

// sampleImage is a two-layer dataset: the upper layer deletes a file,
// replaces a directory's content (opaque) and adds a file.
func sampleImage(t testing.TB, c testimage.Compression) v1.Image {
	lower := testimage.Tar(t,
		testimage.Dir("data"), testimage.File("data/a.csv", "a"), testimage.File("data/old.csv", "old"),
		testimage.Dir("data/raw"), testimage.File("data/raw/1", "one"), testimage.File("data/raw/2", "two"),
		testimage.Symlink("data/latest", "a.csv"))
	upper := testimage.Tar(t,
		testimage.Dir("data"), testimage.Whiteout("data/old.csv"), testimage.File("data/b.csv", "b"),
		testimage.Dir("data/raw"), testimage.Opaque("data/raw"), testimage.File("data/raw/3", "three"))
	return testimage.Image(t, testimage.Layer(t, lower, c), testimage.Layer(t, upper, c))
}

var sampleMerged = []string{
	"data/", "data/a.csv = a", "data/b.csv = b", "data/latest -> a.csv", "data/raw/", "data/raw/3 = three",
}
