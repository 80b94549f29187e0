package rangefetch

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/strata-csi/strata/test/testimage"
)

// blobServer serves one blob on 127.0.0.1, with http.ServeContent (which
// honours Range as registries and object stores do), and the faults a test
// asks for.
type blobServer struct {
	*httptest.Server
	blob []byte
	// ignoreRange answers every request with the whole blob (200).
	ignoreRange bool
	// abortAfter, if > 0, cuts every connection once the server has sent
	// that many bytes in all (then it serves normally again when reset).
	abortAfter atomic.Int64
	sent       atomic.Int64
	// badRange answers a Range request with a range other than the one
	// asked for.
	badRange bool
	// perStream caps each answer's rate, in bytes per second (0: none).
	perStream int64

	mu                sync.Mutex
	ranges            []string
	inFlight, maxSeen int
}

func newBlobServer(t testing.TB, blob []byte) *blobServer {
	s := &blobServer{blob: blob}
	s.Server = httptest.NewServer(http.HandlerFunc(s.serve))
	t.Cleanup(s.Close)
	return s
}

// requests returns the Range headers received, and how many requests were
// in flight at most.
func (s *blobServer) requests() ([]string, int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.ranges...), s.maxSeen
}

func (s *blobServer) reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ranges, s.maxSeen = nil, 0
}

func (s *blobServer) serve(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	s.ranges = append(s.ranges, r.Header.Get("Range"))
	s.inFlight++
	s.maxSeen = max(s.maxSeen, s.inFlight)
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.inFlight--
		s.mu.Unlock()
	}()
	if s.ignoreRange {
		r.Header.Del("Range")
	}
	if s.badRange && r.Header.Get("Range") != "" {
		w.Header().Set("Content-Range", fmt.Sprintf("bytes 0-0/%d", len(s.blob)))
		w.WriteHeader(http.StatusPartialContent)
		w.Write(s.blob[:1])
		return
	}
	var h http.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.ServeContent(&cutWriter{ResponseWriter: w, s: s}, r, "", time.Time{}, bytes.NewReader(s.blob))
	})
	if s.perStream > 0 {
		h = testimage.CapEachAnswer(s.perStream)(h)
	}
	h.ServeHTTP(w, r)
}

// cutWriter applies the server's cut, and counts what it sent.
type cutWriter struct {
	http.ResponseWriter
	s *blobServer
}

func (w *cutWriter) Write(p []byte) (int, error) {
	if limit := w.s.abortAfter.Load(); limit > 0 && w.s.sent.Load()+int64(len(p)) > limit {
		n := max(0, limit-w.s.sent.Load())
		w.ResponseWriter.Write(p[:n])
		w.s.sent.Add(n)
		panic(http.ErrAbortHandler) // the connection is cut
	}
	n, err := w.ResponseWriter.Write(p)
	w.s.sent.Add(int64(n))
	return n, err
}

func randomBlob(t testing.TB, n int) ([]byte, v1.Hash) {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b, v1.Hash{Algorithm: "sha256", Hex: fmt.Sprintf("%x", sha256.Sum256(b))}
}

func assertFile(t *testing.T, path string, want []byte) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s: %d bytes, not the blob's %d (or other bytes)", path, len(got), len(want))
	}
	if _, err := os.Stat(statePath(path)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("progress file of a finished fetch: %v, want it gone", err)
	}
}

func TestFetchRanged(t *testing.T) {
	blob, d := randomBlob(t, 10<<20+123)
	s := newBlobServer(t, blob)
	s.perStream = 40 << 20 // slow enough for the streams to overlap
	path := filepath.Join(t.TempDir(), "blob")
	var progress []int64
	res, err := Fetch(context.Background(), s.Client(), s.URL, int64(len(blob)), d, path,
		Options{Streams: 4, ChunkSize: 1 << 20, Progress: func(n int64) { progress = append(progress, n) }})
	if err != nil {
		t.Fatal(err)
	}
	assertFile(t, path, blob)
	if !res.Ranged || res.Resumed != 0 || res.Fetched != int64(len(blob)) {
		t.Errorf("result %+v, want ranged, fetched %d bytes from 0", res, len(blob))
	}
	ranges, maxSeen := s.requests()
	if len(ranges) != 11 || ranges[0] != "bytes=0-1048575" {
		t.Errorf("requests %q, want 11 ranges of 1 MiB from 0", ranges)
	}
	if maxSeen < 2 || maxSeen > 4 {
		t.Errorf("%d requests were in flight at most, want 2 to 4 (streams 4)", maxSeen)
	}
	if len(progress) == 0 || progress[len(progress)-1] != int64(len(blob)) {
		t.Errorf("progress ends at %v, want %d", progress[max(0, len(progress)-1):], len(blob))
	}
}

func TestFetchOneStream(t *testing.T) {
	blob, d := randomBlob(t, 3<<20)
	s := newBlobServer(t, blob)
	path := filepath.Join(t.TempDir(), "blob")
	if _, err := Fetch(context.Background(), s.Client(), s.URL, int64(len(blob)), d, path, Options{Streams: 1, ChunkSize: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	assertFile(t, path, blob)
	if ranges, maxSeen := s.requests(); maxSeen != 1 || len(ranges) != 3 {
		t.Errorf("%d requests, %d in flight at most; want 3, one at a time", len(ranges), maxSeen)
	}
}

// A server (a registry, a mirror) that ignores Range is read as one
// stream.
func TestFetchRangeIgnored(t *testing.T) {
	blob, d := randomBlob(t, 5<<20)
	s := newBlobServer(t, blob)
	s.ignoreRange = true
	path := filepath.Join(t.TempDir(), "blob")
	res, err := Fetch(context.Background(), s.Client(), s.URL, int64(len(blob)), d, path, Options{ChunkSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	assertFile(t, path, blob)
	if ranges, _ := s.requests(); res.Ranged || len(ranges) != 1 || res.Fetched != int64(len(blob)) {
		t.Errorf("result %+v after %d requests; want one stream of the whole blob", res, len(ranges))
	}
}

// A cut transfer resumes from the verified prefix, ranged or not, and the
// resumed file verifies.
func TestFetchResumes(t *testing.T) {
	old := checkpointBytes
	checkpointBytes = 1 << 20
	t.Cleanup(func() { checkpointBytes = old })
	for _, ignoreRange := range []bool{false, true} {
		t.Run(fmt.Sprintf("ignoreRange=%v", ignoreRange), func(t *testing.T) {
			blob, d := randomBlob(t, 8<<20)
			s := newBlobServer(t, blob)
			s.ignoreRange = ignoreRange
			s.abortAfter.Store(5<<20 + 4321)
			path := filepath.Join(t.TempDir(), "blob")
			opt := Options{Streams: 2, ChunkSize: 1 << 20}
			if _, err := Fetch(context.Background(), s.Client(), s.URL, int64(len(blob)), d, path, opt); err == nil {
				t.Fatal("a fetch whose connections are cut succeeded")
			}
			if _, err := os.Stat(statePath(path)); err != nil {
				t.Fatalf("a cut fetch left no progress: %v", err)
			}
			s.abortAfter.Store(0)
			s.reset()
			res, err := Fetch(context.Background(), s.Client(), s.URL, int64(len(blob)), d, path, opt)
			if err != nil {
				t.Fatal(err)
			}
			assertFile(t, path, blob)
			if res.Resumed < 2<<20 || res.Resumed > 5<<20+4321 {
				t.Errorf("resumed at %d, want the verified prefix (2 MiB to the cut at 5 MiB)", res.Resumed)
			}
			if !ignoreRange && res.Fetched != int64(len(blob))-res.Resumed {
				t.Errorf("fetched %d bytes after resuming at %d, want only the %d missing", res.Fetched, res.Resumed, int64(len(blob))-res.Resumed)
			}
			if ranges, _ := s.requests(); !ignoreRange && (len(ranges) == 0 || !strings.HasPrefix(ranges[0], fmt.Sprintf("bytes=%d-", res.Resumed))) {
				t.Errorf("the resumed fetch asked for %q, want the bytes from %d first", ranges, res.Resumed)
			}
		})
	}
}

// Bytes that do not have the digest are not kept, nor is the progress: the
// next fetch starts over.
func TestFetchDigestMismatch(t *testing.T) {
	blob, _ := randomBlob(t, 2<<20)
	_, other := randomBlob(t, 2<<20)
	s := newBlobServer(t, blob)
	path := filepath.Join(t.TempDir(), "blob")
	_, err := Fetch(context.Background(), s.Client(), s.URL, int64(len(blob)), other, path, Options{ChunkSize: 1 << 20})
	if !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("fetch of the wrong bytes: %v, want ErrDigestMismatch", err)
	}
	for _, p := range []string{path, statePath(path)} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s after a mismatch: %v, want it gone", p, err)
		}
	}
}

// A checkpoint of another blob, or a corrupt one, is not resumed from.
func TestFetchIgnoresForeignProgress(t *testing.T) {
	blob, d := randomBlob(t, 2<<20)
	s := newBlobServer(t, blob)
	path := filepath.Join(t.TempDir(), "blob")
	for _, progress := range []string{`{"digest":"sha256:00","size":2097152,"verified":1048576,"hasher":""}`, `{torn`} {
		if err := os.WriteFile(statePath(path), []byte(progress), 0o600); err != nil {
			t.Fatal(err)
		}
		res, err := Fetch(context.Background(), s.Client(), s.URL, int64(len(blob)), d, path, Options{ChunkSize: 1 << 20})
		if err != nil {
			t.Fatal(err)
		}
		assertFile(t, path, blob)
		if res.Resumed != 0 {
			t.Errorf("resumed at %d from progress %s", res.Resumed, progress)
		}
	}
}

func TestFetchWrongContentRange(t *testing.T) {
	blob, d := randomBlob(t, 2<<20)
	s := newBlobServer(t, blob)
	s.badRange = true
	_, err := Fetch(context.Background(), s.Client(), s.URL, int64(len(blob)), d, filepath.Join(t.TempDir(), "blob"), Options{ChunkSize: 1 << 20})
	if err == nil || !strings.Contains(err.Error(), "Content-Range") {
		t.Fatalf("a server answering another range: %v, want an error naming Content-Range", err)
	}
}

func TestFetchEmpty(t *testing.T) {
	_, d := randomBlob(t, 0)
	s := newBlobServer(t, nil)
	path := filepath.Join(t.TempDir(), "blob")
	if _, err := Fetch(context.Background(), s.Client(), s.URL, 0, d, path, Options{}); err != nil {
		t.Fatal(err)
	}
	assertFile(t, path, nil)
}

// BenchmarkFetchCapped fetches 256 MiB from a server that caps each
// connection at 100 MB/s, as object stores behind registries do, with 1, 4
// and 8 streams: N streams should approach N × the cap, up to the link.
func BenchmarkFetchCapped(b *testing.B) {
	blob, d := randomBlob(b, 256<<20)
	s := newBlobServer(b, blob)
	s.perStream = 100e6
	for _, streams := range []int{1, 4, 8} {
		b.Run(fmt.Sprintf("streams=%d", streams), func(b *testing.B) {
			b.SetBytes(int64(len(blob)))
			for range b.N {
				path := filepath.Join(b.TempDir(), "blob")
				if _, err := Fetch(context.Background(), s.Client(), s.URL, int64(len(blob)), d, path, Options{Streams: streams, ChunkSize: 16 << 20}); err != nil {
					b.Fatal(err)
				}
				os.Remove(path)
			}
		})
	}
}
