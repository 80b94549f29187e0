package layercache

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/strata-csi/strata/test/testimage"
)

// hits counts the requests a registry gets, by kind, and the user names
// that came with them.
type hits struct {
	mu     sync.Mutex
	byKind map[string]int // "ping", "manifest", "blob" (GETs of blobs)
	users  []string
	// fail, if set, answers the requests it returns a status for.
	fail func(r *http.Request) int
}

func newHits() *hits { return &hits{byKind: map[string]int{}} }

func (h *hits) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		kind := "other"
		switch {
		case r.URL.Path == "/v2/":
			kind = "ping"
		case strings.Contains(r.URL.Path, "/manifests/"):
			kind = "manifest"
		case strings.Contains(r.URL.Path, "/blobs/") && r.Method == http.MethodGet:
			kind = "blob"
		}
		h.mu.Lock()
		h.byKind[kind]++
		if u, _, ok := r.BasicAuth(); ok {
			h.users = append(h.users, u)
		}
		fail := h.fail
		h.mu.Unlock()
		if fail != nil {
			if code := fail(r); code != 0 {
				http.Error(w, "injected failure", code)
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

func (h *hits) count(kind string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.byKind[kind]
}

func (h *hits) total() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, c := range h.byKind {
		n += c
	}
	return n
}

func (h *hits) reset() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.byKind = map[string]int{}
	h.users = nil
}

func (h *hits) seenUsers() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.users)
}

// writeRegistryConfig writes a registry config file and returns its path.
func writeRegistryConfig(t testing.TB, path, doc string) string {
	t.Helper()
	if path == "" {
		path = filepath.Join(t.TempDir(), "registries.yaml")
	}
	if err := os.WriteFile(path, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// closedPort returns a loopback address where nothing listens.
func closedPort(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// pullAndCheck pulls ref and checks the mounted tree is the sample image's.
func pullAndCheck(t *testing.T, s *Store, ref string, o PullOptions) {
	t.Helper()
	img, err := s.Pull(context.Background(), ref, o)
	if err != nil {
		t.Fatalf("Pull %s: %v", ref, err)
	}
	if got := tree(t, mountImage(t, s, img)); !slices.Equal(got, sampleMerged) {
		t.Fatalf("pulled tree %q, want %q", got, sampleMerged)
	}
}

// A mirror that serves the image serves all of it: the registry is not
// contacted at all, not even pinged, so the mirror path costs what the direct
// path costs.
func TestMirrorServesFirst(t *testing.T) {
	up, mirror := newHits(), newHits()
	upReg := testimage.Server(t, up.wrap)
	mirrorReg := testimage.Server(t, mirror.wrap)
	img := sampleImage(t, testimage.Gzip)
	testimage.Push(t, upReg+"/data/set:v1", img)
	testimage.Push(t, mirrorReg+"/data/set:v1", img)
	up.reset()
	mirror.reset()

	conf := writeRegistryConfig(t, "", fmt.Sprintf("registries:\n  %q:\n    mirrors: [%q]\n", upReg, mirrorReg))
	s := openStore(t, t.TempDir(), WithRegistryConfig(conf))
	pullAndCheck(t, s, upReg+"/data/set:v1", PullOptions{})

	if n := up.total(); n != 0 {
		t.Errorf("the registry got %d requests (%v), want none: the mirror served everything", n, up.byKind)
	}
	if got, want := mirror.count("blob"), 1+len(layerDigests(t, img)); got != want {
		t.Errorf("the mirror served %d blobs, want %d (config and layers)", got, want)
	}
	// One ping for the resolution and one for the layers, as a direct pull
	// pings the registry twice.
	if got := mirror.count("ping"); got > 2 {
		t.Errorf("the mirror was pinged %d times, want at most 2", got)
	}

	// Under Always the tag is confirmed at the mirror, by HEAD: the
	// registry still gets nothing.
	mirror.reset()
	if _, err := s.Resolve(context.Background(), upReg+"/data/set:v1", PullOptions{Policy: PullAlways}); err != nil {
		t.Fatal(err)
	}
	if n := up.total(); n != 0 {
		t.Errorf("Always: the registry got %d requests (%v), want none", n, up.byKind)
	}
	if got := mirror.count("manifest"); got != 1 {
		t.Errorf("Always: the mirror got %d manifest requests, want one HEAD", got)
	}
}

// Every failure of a mirror falls back to the next place, and in the end
// to the registry; the pulled image is whole and right.
func TestMirrorFallback(t *testing.T) {
	img := sampleImage(t, testimage.Gzip)
	layers := layerDigests(t, img)
	for _, tc := range []struct {
		name string
		// mirror returns the mirror's host:port.
		mirror func(t *testing.T) string
		// fromRegistry is how many layer blobs the registry must serve.
		fromRegistry int
	}{
		{"mirror down", func(t *testing.T) string { return closedPort(t) }, len(layers)},
		{"mirror lacks the image (404)", func(t *testing.T) string { return testimage.Registry(t) }, len(layers)},
		{"mirror fails (500)", func(t *testing.T) string {
			h := newHits()
			reg := testimage.Server(t, h.wrap)
			testimage.Push(t, reg+"/data/set:v1", img)
			h.mu.Lock()
			h.fail = func(r *http.Request) int {
				if r.URL.Path == "/v2/" {
					return 0 // it answers pings, and fails the rest
				}
				return http.StatusInternalServerError
			}
			h.mu.Unlock()
			return reg
		}, len(layers)},
		{"mirror refuses anonymous access (401)", func(t *testing.T) string {
			reg := testimage.Server(t, testimage.BasicAuth("mirror-user", "pw"))
			testimage.Push(t, reg+"/data/set:v1", img, remote.WithAuth(&authn.Basic{Username: "mirror-user", Password: "pw"}))
			return reg
		}, len(layers)},
		{"mirror serves a wrong layer", func(t *testing.T) string {
			sp := newSpy()
			reg := testimage.Server(t, sp.wrap)
			testimage.Push(t, reg+"/data/set:v1", img)
			sp.set(func(sp *spy) { sp.corrupt[layers[1].String()] = true })
			return reg
		}, 1},
		{"mirror rate-limits (429 with Retry-After 30 s)", func(t *testing.T) string {
			lim := &testimage.RateLimit{RetryAfter: "30", Match: testimage.ManifestsAndBlobs, Window: time.Hour}
			reg := testimage.Server(t, lim.Wrap)
			testimage.Push(t, reg+"/data/set:v1", img)
			lim.Arm()
			return reg
		}, len(layers)},
		{"mirror hangs", func(t *testing.T) string {
			release := make(chan struct{})
			reg := testimage.Server(t, func(http.Handler) http.Handler {
				return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					select {
					case <-r.Context().Done():
					case <-release:
					}
				})
			})
			t.Cleanup(func() { close(release) }) // runs before the server's Close
			return reg
		}, len(layers)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			up := newSpy()
			upReg := testimage.Server(t, up.wrap)
			testimage.Push(t, upReg+"/data/set:v1", img)
			mirrorReg := tc.mirror(t)
			conf := writeRegistryConfig(t, "", fmt.Sprintf("registries:\n  %q:\n    mirrors: [%q]\n", upReg, mirrorReg))
			s := openStore(t, t.TempDir(), WithRegistryConfig(conf), withMirrorTimeout(300*time.Millisecond))
			start := time.Now()
			pullAndCheck(t, s, upReg+"/data/set:v1", PullOptions{})
			served := 0
			for _, d := range layers {
				served += up.count(d)
			}
			if served != tc.fromRegistry {
				t.Errorf("the registry served %d layer blobs, want %d", served, tc.fromRegistry)
			}
			if d := time.Since(start); d > 10*time.Second {
				t.Errorf("the fallback took %s", d)
			}
		})
	}
}

// The registry's own failure is the pull's error, after the mirrors.
func TestMirrorAndRegistryDown(t *testing.T) {
	up := closedPort(t)
	conf := writeRegistryConfig(t, "", fmt.Sprintf("registries:\n  %q:\n    mirrors: [%q]\n", up, testimage.Registry(t)))
	s := openStore(t, t.TempDir(), WithRegistryConfig(conf), WithRetry(2, time.Millisecond))
	_, err := s.Pull(context.Background(), up+"/data/set:v1", PullOptions{})
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), up) {
		t.Fatalf("Pull = %v, want ErrUnavailable naming %s", err, up)
	}
}

// A mirror gets the credentials that the keychain holds for the mirror's
// own host, never the registry's.
func TestMirrorCredentials(t *testing.T) {
	img := sampleImage(t, testimage.Gzip)
	up, mirror := newHits(), newHits()
	upReg := testimage.Server(t, func(next http.Handler) http.Handler { return up.wrap(testimage.BasicAuth("alice", "up-pw")(next)) })
	mirrorReg := testimage.Server(t, func(next http.Handler) http.Handler {
		return mirror.wrap(testimage.BasicAuth("bob", "mirror-pw")(next))
	})
	testimage.Push(t, upReg+"/private:v1", img, remote.WithAuth(&authn.Basic{Username: "alice", Password: "up-pw"}))
	testimage.Push(t, mirrorReg+"/private:v1", img, remote.WithAuth(&authn.Basic{Username: "bob", Password: "mirror-pw"}))
	conf := writeRegistryConfig(t, "", fmt.Sprintf("registries:\n  %q:\n    mirrors: [%q]\n", upReg, mirrorReg))

	t.Run("secret for both hosts: the mirror's entry goes to the mirror", func(t *testing.T) {
		up.reset()
		mirror.reset()
		both := hostKeychain{upReg: {Username: "alice", Password: "up-pw"}, mirrorReg: {Username: "bob", Password: "mirror-pw"}}
		s := openStore(t, t.TempDir(), WithRegistryConfig(conf))
		pullAndCheck(t, s, upReg+"/private:v1", PullOptions{Keychain: both})
		if n := up.total(); n != 0 {
			t.Errorf("the registry got %d requests, want none", n)
		}
		for _, u := range mirror.seenUsers() {
			if u != "bob" {
				t.Errorf("the mirror was sent user %q, want only bob", u)
			}
		}
	})
	t.Run("a keychain for the registry alone: the mirror is asked anonymously", func(t *testing.T) {
		up.reset()
		mirror.reset()
		s := openStore(t, t.TempDir(), WithRegistryConfig(conf))
		pullAndCheck(t, s, upReg+"/private:v1", PullOptions{Keychain: basicFor(upReg, "alice", "up-pw")})
		if users := mirror.seenUsers(); len(users) != 0 {
			t.Errorf("the mirror was sent users %q, want none", users)
		}
		if up.count("blob") == 0 {
			t.Error("the registry served no blob after the mirror refused")
		}
	})
}

// KEP-2535 with mirrors. An image that a mirror served anonymously is public
// on this node while that host is a mirror of the registry; an image that
// only the registry served, to credentials, stays private.
func TestMirrorAccessRecords(t *testing.T) {
	img := sampleImage(t, testimage.Gzip)
	alice := authn.Basic{Username: "alice", Password: "s3cret"}
	upReg := testimage.Server(t, testimage.BasicAuth(alice.Username, alice.Password))
	testimage.Push(t, upReg+"/private:v1", img, remote.WithAuth(&alice))
	creds := func() authn.Keychain { return basicFor(upReg, "alice", "s3cret") }

	t.Run("pulled from the registry with credentials: a mirror that lacks it grants nothing", func(t *testing.T) {
		emptyMirror := testimage.Registry(t)
		conf := writeRegistryConfig(t, "", fmt.Sprintf("registries:\n  %q:\n    mirrors: [%q]\n", upReg, emptyMirror))
		s := openStore(t, t.TempDir(), WithRegistryConfig(conf))
		pullAndCheck(t, s, upReg+"/private:v1", PullOptions{Keychain: creds()})
		for _, p := range []PullPolicy{PullNever, PullIfNotPresent} {
			if _, err := s.Pull(context.Background(), upReg+"/private:v1", PullOptions{Policy: p}); !errors.Is(err, ErrUnauthorized) {
				t.Errorf("%s without credentials = %v, want ErrUnauthorized", p, err)
			}
		}
		if _, err := s.Pull(context.Background(), upReg+"/private:v1", PullOptions{Policy: PullNever, Keychain: creds()}); err != nil {
			t.Errorf("Never with the credentials that pulled it: %v", err)
		}
	})

	t.Run("served anonymously by a mirror: public while the mirror is configured", func(t *testing.T) {
		openMirror := testimage.Registry(t)
		testimage.Push(t, openMirror+"/private:v1", img)
		path := writeRegistryConfig(t, "", fmt.Sprintf("registries:\n  %q:\n    mirrors: [%q]\n", upReg, openMirror))
		s := openStore(t, t.TempDir(), WithRegistryConfig(path))
		pullAndCheck(t, s, upReg+"/private:v1", PullOptions{Keychain: creds()})
		if _, err := s.Pull(context.Background(), upReg+"/private:v1", PullOptions{Policy: PullNever}); err != nil {
			t.Fatalf("Never without credentials, the mirror serving anyone: %v", err)
		}
		// The mirror is removed from the config: its anonymous record no
		// longer counts.
		writeRegistryConfig(t, path, "registries: {}\n")
		if _, err := s.Pull(context.Background(), upReg+"/private:v1", PullOptions{Policy: PullNever}); !errors.Is(err, ErrUnauthorized) {
			t.Fatalf("Never without credentials after the mirror was removed = %v, want ErrUnauthorized", err)
		}
		if _, err := s.Pull(context.Background(), upReg+"/private:v1", PullOptions{Policy: PullIfNotPresent}); !errors.Is(err, ErrUnauthorized) {
			t.Fatalf("IfNotPresent without credentials after the mirror was removed = %v, want ErrUnauthorized", err)
		}
		// The registry confirms the credentials, as without mirrors.
		if _, err := s.Pull(context.Background(), upReg+"/private:v1", PullOptions{Keychain: creds()}); err != nil {
			t.Fatalf("IfNotPresent with accepted credentials: %v", err)
		}
	})
}

// The config file is read again when it changes: the next pull of the same
// Store goes through a mirror added meanwhile, and an invalid rewrite keeps
// the last good config.
func TestRegistryConfigReload(t *testing.T) {
	up, mirror := newHits(), newHits()
	upReg := testimage.Server(t, up.wrap)
	mirrorReg := testimage.Server(t, mirror.wrap)
	for _, tag := range []string{"a", "b", "c", "d"} {
		img := testimage.Image(t, testimage.Layer(t, testimage.Tar(t, testimage.File("tag", tag)), testimage.Gzip))
		testimage.Push(t, upReg+"/set:"+tag, img)
		testimage.Push(t, mirrorReg+"/set:"+tag, img)
	}
	path := writeRegistryConfig(t, "", "registries: {}\n")
	s := openStore(t, t.TempDir(), WithRegistryConfig(path))
	pull := func(tag string) {
		t.Helper()
		up.reset()
		mirror.reset()
		if _, err := s.Pull(context.Background(), upReg+"/set:"+tag, PullOptions{}); err != nil {
			t.Fatalf("pull %s: %v", tag, err)
		}
	}

	pull("a")
	if up.count("blob") == 0 || mirror.total() != 0 {
		t.Fatalf("without mirrors: registry blobs %d, mirror requests %d", up.count("blob"), mirror.total())
	}

	writeRegistryConfig(t, path, fmt.Sprintf("registries:\n  %q:\n    mirrors: [%q]\n", upReg, mirrorReg))
	pull("b")
	if up.total() != 0 || mirror.count("blob") == 0 {
		t.Fatalf("after adding the mirror: registry requests %d, mirror blobs %d", up.total(), mirror.count("blob"))
	}

	writeRegistryConfig(t, path, fmt.Sprintf("registries:\n  %q:\n    mirrorz: [%q]\n", upReg, mirrorReg))
	pull("c")
	if up.total() != 0 || mirror.count("blob") == 0 {
		t.Fatalf("after an invalid rewrite: registry requests %d, mirror blobs %d; want the last good config kept", up.total(), mirror.count("blob"))
	}

	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	pull("d")
	if up.total() != 0 || mirror.count("blob") == 0 {
		t.Fatalf("after the file was removed: registry requests %d, mirror blobs %d; want the last good config kept", up.total(), mirror.count("blob"))
	}
}

// The config is checked when the store opens: a missing or invalid file is
// an error that names it.
func TestRegistryConfigAtOpen(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	for _, tc := range []struct {
		name, doc, mention string
	}{
		{"missing", "", "no such file"},
		{"unknown key", "registries:\n  example.com:\n    mirror: [m.example.com]\n", "mirror"},
		{"CA file missing", "registries:\n  example.com:\n    ca: [/nonexistent/ca.pem]\n", "/nonexistent/ca.pem"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-")+".yaml")
			if tc.doc != "" {
				writeRegistryConfig(t, path, tc.doc)
			}
			s, err := Open(t.TempDir(), WithRegistryConfig(path))
			if err == nil {
				s.Close()
				t.Fatal("Open accepted the config")
			}
			if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), tc.mention) {
				t.Errorf("Open = %v, want an error naming %s and %q", err, path, tc.mention)
			}
		})
	}
}
