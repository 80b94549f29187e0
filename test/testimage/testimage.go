// Package testimage builds OCI images from files that a test describes, and
// serves them from a real registry on loopback, so that tests never need an
// image from outside the machine.
package testimage

import (
	"archive/tar"
	"bytes"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/compression"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Epoch is the modification time of entries that do not set one.
var Epoch = time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)

// Entry is one tar entry. A name ending in "/" is a directory; Link makes a
// symlink (or, with Hard, a hardlink); otherwise it is a regular file with
// Body.
type Entry struct {
	Name     string
	Body     string
	Mode     int64
	Link     string
	Hard     bool
	UID, GID int
	ModTime  time.Time
	Xattrs   map[string]string
	// Type overrides the entry type (for device nodes and other oddities).
	Type byte
}

// File is a regular file entry with mode 0644.
func File(name, body string) Entry { return Entry{Name: name, Body: body, Mode: 0o644} }

// Dir is a directory entry with mode 0755.
func Dir(name string) Entry { return Entry{Name: strings.TrimSuffix(name, "/") + "/", Mode: 0o755} }

// Symlink is a symlink entry.
func Symlink(name, target string) Entry { return Entry{Name: name, Link: target, Mode: 0o777} }

// Whiteout deletes path (in the layers below) in OCI form.
func Whiteout(path string) Entry {
	dir, base := "", path
	if i := strings.LastIndex(path, "/"); i >= 0 {
		dir, base = path[:i+1], path[i+1:]
	}
	return File(dir+".wh."+base, "")
}

// Opaque hides what the layers below have in dir.
func Opaque(dir string) Entry { return File(strings.TrimSuffix(dir, "/")+"/.wh..wh..opq", "") }

// Tar writes entries as an uncompressed tar stream.
func Tar(t testing.TB, entries ...Entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := &tar.Header{Name: e.Name, Mode: e.Mode, Uid: e.UID, Gid: e.GID, ModTime: e.ModTime, Format: tar.FormatPAX}
		if h.ModTime.IsZero() {
			h.ModTime = Epoch
		}
		switch {
		case e.Type != 0:
			h.Typeflag = e.Type
			h.Linkname = e.Link
		case strings.HasSuffix(e.Name, "/"):
			h.Typeflag = tar.TypeDir
		case e.Link != "" && e.Hard:
			h.Typeflag = tar.TypeLink
			h.Linkname = e.Link
		case e.Link != "":
			h.Typeflag = tar.TypeSymlink
			h.Linkname = e.Link
		default:
			h.Typeflag = tar.TypeReg
			h.Size = int64(len(e.Body))
		}
		if len(e.Xattrs) > 0 {
			h.PAXRecords = map[string]string{}
			for k, v := range e.Xattrs {
				h.PAXRecords["SCHILY.xattr."+k] = v
			}
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatalf("tar header %s: %v", e.Name, err)
		}
		if h.Typeflag == tar.TypeReg {
			if _, err := io.WriteString(tw, e.Body); err != nil {
				t.Fatalf("tar body %s: %v", e.Name, err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// Compression of a test layer.
type Compression string

// Layer compressions.
const (
	Gzip Compression = "gzip"
	Zstd Compression = "zstd"
	None Compression = "none"
)

// Layer makes a layer from an uncompressed tar stream.
func Layer(t testing.TB, tarBytes []byte, c Compression) v1.Layer {
	t.Helper()
	if c == None {
		return static.NewLayer(tarBytes, types.OCIUncompressedLayer)
	}
	opts := []tarball.LayerOption{tarball.WithCompressedCaching}
	if c == Zstd {
		opts = append(opts, tarball.WithCompression(compression.ZStd))
	}
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(tarBytes)), nil
	}, opts...)
	if err != nil {
		t.Fatalf("make %s layer: %v", c, err)
	}
	return l
}

// Image stacks layers, bottom first, into an OCI image.
func Image(t testing.TB, layers ...v1.Layer) v1.Image {
	t.Helper()
	img, err := mutate.AppendLayers(mutate.MediaType(empty.Image, types.OCIManifestSchema1), layers...)
	if err != nil {
		t.Fatalf("build image: %v", err)
	}
	return mutate.ConfigMediaType(img, types.OCIConfigJSON)
}

// Registry starts an in-memory registry on loopback for the test's lifetime
// and returns its host:port.
func Registry(t testing.TB) string {
	t.Helper()
	srv := httptest.NewServer(registry.New(registry.Logger(discardLogger())))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// BasicAuth wraps a registry so that it demands HTTP basic auth with user
// and password, as a private registry with htpasswd auth does.
func BasicAuth(user, password string) func(http.Handler) http.Handler {
	return BasicAuthUsers(map[string]string{user: password})
}

// BasicAuthUsers is BasicAuth with several users (name to password).
func BasicAuthUsers(users map[string]string) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if u, p, ok := r.BasicAuth(); !ok || users[u] != p || p == "" {
				w.Header().Set("WWW-Authenticate", `Basic realm="strata-test"`)
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(http.StatusUnauthorized)
				_, _ = io.WriteString(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`)
				return
			}
			next.ServeHTTP(w, r)
		})
	}
}

// Server starts a registry behind a handler wrapper (for fault injection)
// and returns its host:port.
func Server(t testing.TB, wrap func(http.Handler) http.Handler) string {
	t.Helper()
	srv := httptest.NewServer(wrap(registry.New(registry.Logger(discardLogger()))))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// Push writes img to ref and returns its digest.
func Push(t testing.TB, ref string, img v1.Image, opts ...remote.Option) v1.Hash {
	t.Helper()
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img, opts...); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// PushIndex writes an index to ref and returns its digest.
func PushIndex(t testing.TB, ref string, idx v1.ImageIndex) v1.Hash {
	t.Helper()
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.WriteIndex(r, idx); err != nil {
		t.Fatalf("push index %s: %v", ref, err)
	}
	d, err := idx.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func discardLogger() *log.Logger { return log.New(io.Discard, "", 0) }
