package layercache

import (
	"context"
	"crypto/rand"
	"errors"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/strata-csi/strata/test/testimage"
)

// faults injects failures into blob downloads of a registry.
type faults struct {
	mu sync.Mutex
	// status5xx answers this many blob GETs with 503 before serving.
	status5xx int
	// cutAfter, if > 0, makes the first full (non-range) GET of each blob
	// break off after that many bytes.
	cutAfter int
	cut      map[string]bool
	// ranges records the Range headers of blob GETs.
	ranges []string
	gets   int
}

func (f *faults) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet || !strings.Contains(r.URL.Path, "/blobs/") {
			next.ServeHTTP(w, r)
			return
		}
		f.mu.Lock()
		f.gets++
		f.ranges = append(f.ranges, r.Header.Get("Range"))
		if f.status5xx > 0 {
			f.status5xx--
			f.mu.Unlock()
			http.Error(w, "try later", http.StatusServiceUnavailable)
			return
		}
		blob := r.URL.Path
		cut := f.cutAfter > 0 && r.Header.Get("Range") == "" && !f.cut[blob]
		if cut {
			f.cut[blob] = true
		}
		f.mu.Unlock()
		if !cut {
			next.ServeHTTP(w, r)
			return
		}
		// Serve the headers and the first bytes, then drop the connection.
		rec := &recorder{header: http.Header{}, code: http.StatusOK}
		next.ServeHTTP(rec, r)
		if rec.buf.Len() <= f.cutAfter {
			f.mu.Lock()
			delete(f.cut, blob) // too small to cut: the config
			f.mu.Unlock()
			for k, v := range rec.header {
				w.Header()[k] = v
			}
			w.WriteHeader(rec.code)
			_, _ = w.Write(rec.buf.Bytes())
			return
		}
		for k, v := range rec.header {
			w.Header()[k] = v
		}
		w.WriteHeader(rec.code)
		_, _ = w.Write(rec.buf.Bytes()[:f.cutAfter])
		w.(http.Flusher).Flush()
		conn, _, err := http.NewResponseController(w).Hijack()
		if err == nil {
			conn.Close()
		}
	})
}

func randomImage(t *testing.T, size int) (string, []byte) {
	t.Helper()
	b := make([]byte, size)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return string(b), b
}

func TestRetriesServerErrors(t *testing.T) {
	f := &faults{status5xx: 2, cut: map[string]bool{}}
	reg := testimage.Server(t, f.wrap)
	body, _ := randomImage(t, 64<<10)
	testimage.Push(t, reg+"/flaky:v1", testimage.Image(t, testimage.Layer(t, testimage.Tar(t, testimage.File("f", body)), testimage.Gzip)))
	s := openStore(t, t.TempDir(), WithRetry(3, time.Millisecond))
	if _, err := s.Pull(context.Background(), reg+"/flaky:v1", PullOptions{}); err != nil {
		t.Fatalf("pull through two 503s with 3 attempts: %v", err)
	}

	f.mu.Lock()
	f.status5xx = 100
	f.mu.Unlock()
	body2, _ := randomImage(t, 1<<10)
	testimage.Push(t, reg+"/down:v1", testimage.Image(t, testimage.Layer(t, testimage.Tar(t, testimage.File("g", body2)), testimage.Gzip)))
	f.mu.Lock()
	f.gets = 0
	f.mu.Unlock()
	_, err := s.Pull(context.Background(), reg+"/down:v1", PullOptions{})
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "after 3 attempts") {
		t.Fatalf("pull from a registry that keeps failing = %v, want ErrUnavailable after 3 attempts", err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.gets > 3*2 { // config and layer
		t.Errorf("%d blob requests, want the retries bounded", f.gets)
	}
}

func TestResumesABrokenDownload(t *testing.T) {
	f := &faults{cutAfter: 100 << 10, cut: map[string]bool{}}
	reg := testimage.Server(t, f.wrap)
	body, _ := randomImage(t, 1<<20)
	testimage.Push(t, reg+"/big:v1", testimage.Image(t, testimage.Layer(t, testimage.Tar(t, testimage.File("weights", body)), testimage.None)))
	f.mu.Lock()
	f.ranges = nil
	f.mu.Unlock()
	s := openStore(t, t.TempDir())
	img, err := s.Pull(context.Background(), reg+"/big:v1", PullOptions{})
	if err != nil {
		t.Fatalf("pull through a dropped connection: %v", err)
	}
	if got := readString(t, mountImage(t, s, img)+"/weights"); got != body {
		t.Fatal("resumed layer content differs from the image's")
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	resumed := false
	for _, r := range f.ranges {
		if strings.HasPrefix(r, "bytes=102400-") {
			resumed = true
		}
	}
	if !resumed {
		t.Errorf("blob requests had ranges %q, want a resume from byte 102400", f.ranges)
	}
}

func readString(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
