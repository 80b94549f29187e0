package layercache

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
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
