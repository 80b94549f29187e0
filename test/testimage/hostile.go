package testimage

import (
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Liar wraps a registry so that it answers 200 to every HEAD request by
// digest, as a hostile registry may: it claims to hold every manifest and
// every blob, whatever its GETs can serve. A push to it skips every blob,
// since the pusher asks first.
func Liar(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ref := r.URL.Path[strings.LastIndex(r.URL.Path, "/")+1:]
		if r.Method != http.MethodHead || !strings.HasPrefix(r.URL.Path, "/v2/") || !strings.HasPrefix(ref, "sha256:") {
			next.ServeHTTP(w, r)
			return
		}
		w.Header().Set("Docker-Content-Digest", ref)
		if strings.Contains(r.URL.Path, "/manifests/") {
			w.Header().Set("Content-Type", string(types.OCIManifestSchema1))
		}
		w.Header().Set("Content-Length", "1024")
		w.WriteHeader(http.StatusOK)
	})
}

// phantomLayer claims a digest and a diffID without having any bytes.
type phantomLayer struct {
	digest, diffID v1.Hash
	size           int64
}

var errPhantom = errors.New("a phantom layer has no bytes")

func (l phantomLayer) Digest() (v1.Hash, error)             { return l.digest, nil }
func (l phantomLayer) DiffID() (v1.Hash, error)             { return l.diffID, nil }
func (l phantomLayer) Compressed() (io.ReadCloser, error)   { return nil, errPhantom }
func (l phantomLayer) Uncompressed() (io.ReadCloser, error) { return nil, errPhantom }
func (l phantomLayer) Size() (int64, error)                 { return l.size, nil }
func (l phantomLayer) MediaType() (types.MediaType, error)  { return types.OCILayer, nil }

// ForgedImage is an image whose config lists diffIDs (bottom first) with
// the given blob digests, none of which its author has the bytes of: what
// an attacker writes to claim another tenant's cached layers. Push it to a
// Liar registry, which accepts it without the blobs.
func ForgedImage(t testing.TB, digests, diffIDs []v1.Hash) v1.Image {
	t.Helper()
	if len(digests) != len(diffIDs) {
		t.Fatalf("ForgedImage: %d digests for %d diffIDs", len(digests), len(diffIDs))
	}
	layers := make([]v1.Layer, len(digests))
	for i := range digests {
		layers[i] = phantomLayer{digest: digests[i], diffID: diffIDs[i], size: 1024}
	}
	img, err := mutate.AppendLayers(mutate.MediaType(empty.Image, types.OCIManifestSchema1), layers...)
	if err != nil {
		t.Fatalf("forge image: %v", err)
	}
	return mutate.ConfigMediaType(img, types.OCIConfigJSON)
}

// MadeUpDigest is a well-formed digest that no blob has.
func MadeUpDigest(t testing.TB, seed string) v1.Hash {
	t.Helper()
	h, _, err := v1.SHA256(strings.NewReader("made up: " + seed))
	if err != nil {
		t.Fatal(err)
	}
	return h
}
