package layercache

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	ti "github.com/strata-csi/strata/test/testimage"
)

// withRanged makes raw files from min bytes on fetched in chunks of chunk
// bytes, streams at a time.
func withRanged(minBytes, chunk int64, streams int) Option {
	return func(o *options) error {
		o.ranged = ranged{minBytes: minBytes, chunk: chunk, streams: streams}
		return nil
	}
}

// rangeSpy counts the blob requests that carry a Range header, and can drop
// that header (a registry or mirror that ignores Range).
type rangeSpy struct {
	mu     sync.Mutex
	ranged int
	ignore bool
}

func (r *rangeSpy) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.Header.Get("Range") != "" {
			r.mu.Lock()
			r.ranged++
			ignore := r.ignore
			r.mu.Unlock()
			if ignore {
				req.Header.Del("Range")
			}
		}
		next.ServeHTTP(w, req)
	})
}

func TestLargeRawFileFetchedInRanges(t *testing.T) {
	weights := make([]byte, 3<<20+12345)
	if _, err := rand.Read(weights); err != nil {
		t.Fatal(err)
	}
	model := ti.Artifact{ConfigMediaType: ti.ModelConfig, Layers: []ti.Blob{
		{MediaType: "application/vnd.cncf.model.weight.v1.raw", Data: weights, Annotations: map[string]string{ti.ModelFilepath: "model.safetensors"}},
		raw("application/vnd.cncf.model.weight.config.v1.raw", "{}", ti.ModelFilepath, "config.json"),
	}}
	check := func(t *testing.T, s *Store, img *Image) {
		t.Helper()
		got, err := os.ReadFile(filepath.Join(mountImage(t, s, img), "model.safetensors"))
		if err != nil || !bytes.Equal(got, weights) {
			t.Fatalf("model.safetensors: %d bytes, equal %v, %v", len(got), bytes.Equal(got, weights), err)
		}
		p, _ := s.rawPath(img.Files[1].Layer.DiffID)
		fi, err := os.Stat(p)
		if err != nil || fi.Mode().Perm() != 0o644 {
			t.Errorf("raw file mode %v, %v; want 0644", fi.Mode(), err)
		}
	}
	opt := withRanged(1<<20, 256<<10, 4)
	ctx := context.Background()

	t.Run("ranges", func(t *testing.T) {
		sp := &rangeSpy{}
		ref := ti.Server(t, sp.wrap) + "/model:v1"
		ti.PushArtifact(t, ref, model)
		s := openStore(t, t.TempDir(), opt)
		img, err := s.Pull(ctx, ref, PullOptions{})
		if err != nil {
			t.Fatal(err)
		}
		check(t, s, img)
		if sp.ranged < len(weights)/(256<<10) {
			t.Errorf("%d Range requests for %d bytes in chunks of 256 KiB", sp.ranged, len(weights))
		}
	})
	t.Run("a registry that ignores Range", func(t *testing.T) {
		sp := &rangeSpy{ignore: true}
		ref := ti.Server(t, sp.wrap) + "/model:v1"
		ti.PushArtifact(t, ref, model)
		s := openStore(t, t.TempDir(), opt)
		img, err := s.Pull(ctx, ref, PullOptions{})
		if err != nil {
			t.Fatal(err)
		}
		check(t, s, img)
	})
	t.Run("private", func(t *testing.T) {
		ref := ti.Server(t, ti.BasicAuth("bob", "hunter2")) + "/team/model:v1"
		ti.PushArtifact(t, ref, model, remote.WithAuth(&authn.Basic{Username: "bob", Password: "hunter2"}))
		s := openStore(t, t.TempDir(), opt)
		if _, err := s.Pull(ctx, ref, PullOptions{}); !errors.Is(err, ErrUnauthorized) {
			t.Fatalf("without the secret: want ErrUnauthorized, got %v", err)
		}
		r, _ := s.ParseReference(ref)
		img, err := s.Pull(ctx, ref, PullOptions{Keychain: basicFor(r.Context().RegistryStr(), "bob", "hunter2")})
		if err != nil {
			t.Fatal(err)
		}
		check(t, s, img)
	})
	t.Run("corrupt", func(t *testing.T) {
		sp := newSpy()
		ref := ti.Server(t, sp.wrap) + "/model:v1"
		ti.PushArtifact(t, ref, model)
		s := openStore(t, t.TempDir(), opt)
		img, err := s.Resolve(ctx, ref, PullOptions{})
		if err != nil {
			t.Fatal(err)
		}
		sp.set(func(sp *spy) { sp.corrupt[img.Files[1].Layer.Digest.String()] = true })
		if err := s.Ensure(ctx, img, PullOptions{}); !errors.Is(err, ErrDigestMismatch) {
			t.Fatalf("want ErrDigestMismatch, got %v", err)
		}
		if s.HasLayer(img.Files[1].Layer.DiffID) || s.HasLayer(img.Layers[0].DiffID) {
			t.Error("the corrupt file or the tree was kept")
		}
		if got := dirEntries(t, s.WorkDir()); len(got) != 0 {
			t.Errorf("debris in the work directory: %v", got)
		}
	})
}

// cutter cuts the connections of blob downloads once they have sent limit
// bytes in all (0: never), and records the Range of each blob request.
type cutter struct {
	mu     sync.Mutex
	limit  int64
	sent   int64
	ranges []string
}

func (c *cutter) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if !strings.Contains(req.URL.Path, "/blobs/") || req.Method != http.MethodGet {
			next.ServeHTTP(w, req)
			return
		}
		c.mu.Lock()
		c.ranges = append(c.ranges, req.Header.Get("Range"))
		c.mu.Unlock()
		next.ServeHTTP(&cutWriter{ResponseWriter: w, c: c}, req)
	})
}

func (c *cutter) set(limit int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.limit, c.sent, c.ranges = limit, 0, nil
}

type cutWriter struct {
	http.ResponseWriter
	c *cutter
}

func (w *cutWriter) Write(p []byte) (int, error) {
	w.c.mu.Lock()
	limit, sent := w.c.limit, w.c.sent
	if limit > 0 && sent+int64(len(p)) > limit {
		w.c.sent = limit
		w.c.mu.Unlock()
		w.ResponseWriter.Write(p[:max(0, limit-sent)])
		panic(http.ErrAbortHandler)
	}
	w.c.sent += int64(len(p))
	w.c.mu.Unlock()
	return w.ResponseWriter.Write(p)
}

// TestRawFileResumesAfterRestart: a large raw file whose download was cut
// resumes in the next process (a new Store on the same root) from the
// bytes already verified, and the finished file verifies.
func TestRawFileResumesAfterRestart(t *testing.T) {
	weights := make([]byte, 4<<20)
	if _, err := rand.Read(weights); err != nil {
		t.Fatal(err)
	}
	model := ti.Artifact{ConfigMediaType: ti.ModelConfig, Layers: []ti.Blob{
		{MediaType: "application/vnd.cncf.model.weight.v1.raw", Data: weights, Annotations: map[string]string{ti.ModelFilepath: "model.safetensors"}},
	}}
	cut := &cutter{}
	ref := ti.Server(t, cut.wrap) + "/model:v1"
	ti.PushArtifact(t, ref, model)
	root := t.TempDir()
	opt := withRanged(1<<20, 256<<10, 2)

	cut.set(2<<20 + 1000)
	first, err := Open(root, WithRetry(1, time.Millisecond), opt)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := first.Pull(context.Background(), ref, PullOptions{}); err == nil {
		t.Fatal("a pull whose connections are cut succeeded")
	}
	first.Close()
	partials, _ := filepath.Glob(filepath.Join(root, partialDir, "sha256-*.progress"))
	if len(partials) != 1 {
		t.Fatalf("progress of the cut download: %v, want one", partials)
	}

	cut.set(0)
	s := openStore(t, root, opt)
	img, err := s.Pull(context.Background(), ref, PullOptions{})
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(mountImage(t, s, img), "model.safetensors"))
	if err != nil || !bytes.Equal(got, weights) {
		t.Fatalf("model.safetensors after resuming: %d bytes, equal %v, %v", len(got), bytes.Equal(got, weights), err)
	}
	cut.mu.Lock()
	ranges := cut.ranges
	cut.mu.Unlock()
	var resumedAt int64 = -1
	for _, r := range ranges {
		var from, to int64
		if _, err := fmt.Sscanf(r, "bytes=%d-%d", &from, &to); err == nil && (resumedAt < 0 || from < resumedAt) {
			resumedAt = from
		}
	}
	if resumedAt < 256<<10 {
		t.Errorf("the second process asked for bytes from %d (ranges %q), want from the verified prefix of the first", resumedAt, ranges)
	}
	if left, _ := filepath.Glob(filepath.Join(root, partialDir, "*")); len(left) != 0 {
		t.Errorf("partial downloads left after the pull: %v", left)
	}
}

// TestStalePartialsRemoved: Open removes partial downloads older than a
// day, Prune every one no process holds.
func TestStalePartialsRemoved(t *testing.T) {
	root := t.TempDir()
	s := openStore(t, root)
	fresh, old := v1.Hash{Algorithm: "sha256", Hex: strings.Repeat("a", 64)}, v1.Hash{Algorithm: "sha256", Hex: strings.Repeat("b", 64)}
	for _, d := range []v1.Hash{fresh, old} {
		p, release, ok, err := s.claimPartial(d)
		if err != nil || !ok {
			t.Fatalf("claimPartial: %v, %v", ok, err)
		}
		if err := os.WriteFile(p, []byte("part"), 0o600); err != nil {
			t.Fatal(err)
		}
		if d == fresh {
			// Held: another process is downloading it.
			if _, _, ok, _ := s.claimPartial(d); ok {
				t.Error("a partial download held by one caller was claimed again")
			}
			t.Cleanup(func() { release(false) })
			continue
		}
		release(false)
		past := time.Now().Add(-2 * partialMaxAge)
		if err := os.Chtimes(p, past, past); err != nil {
			t.Fatal(err)
		}
	}
	s2 := openStore(t, root)
	if _, err := os.Stat(s2.partialPath(old)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a day-old partial download survived Open: %v", err)
	}
	if _, err := os.Stat(s2.partialPath(fresh)); err != nil {
		t.Errorf("a held partial download was removed: %v", err)
	}
	if _, err := s2.Prune(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(s2.partialPath(fresh)); err != nil {
		t.Errorf("Prune removed a partial download in progress: %v", err)
	}
}
