package layercache

import (
	"context"
	"errors"
	"net/http"
	"sync/atomic"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/strata-csi/strata/test/testimage"
)

// hostKeychain holds credentials by registry host, or by repository
// (host/path), and is anonymous for anything else, as the keychains of the
// driver's credential chain are.
type hostKeychain map[string]authn.AuthConfig

func (k hostKeychain) Resolve(r authn.Resource) (authn.Authenticator, error) {
	if c, ok := k[r.String()]; ok {
		return authn.FromConfig(c), nil
	}
	if c, ok := k[r.RegistryStr()]; ok {
		return authn.FromConfig(c), nil
	}
	return authn.Anonymous, nil
}

// basicFor is a keychain with user:pass for key (a host or a repository)
// alone.
func basicFor(key, user, pass string) hostKeychain {
	return hostKeychain{key: {Username: user, Password: pass}}
}

// brokenKeychain fails, as a credential helper that cannot run does.
type brokenKeychain struct{}

func (brokenKeychain) Resolve(authn.Resource) (authn.Authenticator, error) {
	return nil, errors.New("credential helper failed")
}

func TestPullWithCredentials(t *testing.T) {
	reg := testimage.Server(t, testimage.BasicAuth("alice", "s3cret"))
	ref := reg + "/private:v1"
	testimage.Push(t, ref, sampleImage(t, testimage.Gzip), remote.WithAuth(&authn.Basic{Username: "alice", Password: "s3cret"}))

	for _, tc := range []struct {
		name    string
		kc      authn.Keychain
		wantErr error
	}{
		{"keychain for the registry", basicFor(reg, "alice", "s3cret"), nil},
		{"keychain for the repository", basicFor(reg+"/private", "alice", "s3cret"), nil},
		{"wrong password", basicFor(reg, "alice", "guess"), ErrUnauthorized},
		{"keychain for another registry", basicFor("example.com", "alice", "s3cret"), ErrUnauthorized},
		{"keychain for another repository", basicFor(reg+"/other", "alice", "s3cret"), ErrUnauthorized},
		{"no keychain", nil, ErrUnauthorized},
		{"anonymous keychain", authn.NewMultiKeychain(), ErrUnauthorized},
		{"keychain that fails", brokenKeychain{}, ErrUnauthorized},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := openStore(t, t.TempDir())
			img, err := s.Pull(context.Background(), ref, PullOptions{Keychain: tc.kc})
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil && err != nil) {
				t.Fatalf("Pull = %v, want %v", err, tc.wantErr)
			}
			if err == nil && len(img.Layers) != 2 {
				t.Errorf("got %d layers, want 2", len(img.Layers))
			}
		})
	}
}

// TestAccessKeyStable: the access key of credentials a keychain resolves is
// the hash that access records on disk already hold for the same
// credentials (the values were computed by the store before keychains,
// from a username and password, and from a dockerconfigjson entry with an
// identity token), so a cached private image still serves the pull secret
// that pulled it, offline, after an upgrade.
func TestAccessKeyStable(t *testing.T) {
	t.Parallel()
	reg, err := name.NewRegistry("127.0.0.1:5000")
	if err != nil {
		t.Fatal(err)
	}
	const alice = "sha256:25d9f88d9cf6a3c654d712fa056111f4ba97a55d14e526041e4e8f8addc247b3"
	const token = "sha256:ea950083ffe672cc26f492cc0f0509b6248d5c5235a1d691acde5be4e17a0400"
	for _, tc := range []struct {
		name   string
		kc     authn.Keychain
		mirror bool
		want   string
	}{
		{"username and password", basicFor("127.0.0.1:5000", "alice", "s3cret"), false, alice},
		{"username and password, at a mirror", basicFor("127.0.0.1:5000", "alice", "s3cret"), true, alice},
		{"identity token", hostKeychain{"127.0.0.1:5000": {IdentityToken: "tok"}}, false, token},
		{"no keychain", nil, false, anonymous},
		{"no keychain, at a mirror", nil, true, "anonymous:127.0.0.1:5000"},
		{"anonymous keychain", authn.NewMultiKeychain(), false, anonymous},
		{"empty credentials", hostKeychain{"127.0.0.1:5000": {}}, false, anonymous},
		{"keychain for another host", basicFor("example.com", "alice", "s3cret"), false, anonymous},
	} {
		ep := &endpoint{repo: reg.Repo("private/data"), mirror: tc.mirror}
		got, err := ep.accessKey(tc.kc)
		if err != nil || got != tc.want {
			t.Errorf("%s: access key %q (%v), want %q", tc.name, got, err, tc.want)
		}
	}
	if _, err := (&endpoint{repo: reg.Repo("private/data")}).accessKey(brokenKeychain{}); !errors.Is(err, ErrUnauthorized) {
		t.Errorf("a keychain that fails: %v, want ErrUnauthorized", err)
	}
}

// recordingTransport records the URLs it is asked for and answers nothing:
// it stands for the network, which this test must not touch.
type recordingTransport struct{ urls []string }

func (r *recordingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	r.urls = append(r.urls, req.URL.String())
	return nil, errors.New("not sent")
}

// go-containerregistry speaks plain HTTP to private-range addresses by
// default; the store must not.
func TestPlainHTTPOnlyForLoopbackAndInsecureRegistries(t *testing.T) {
	rec := &recordingTransport{}
	tr := &httpsOnly{next: rec, insecure: map[string]bool{"registry.lan:5000": true}}
	for _, tc := range []struct{ in, want string }{
		{"http://10.1.2.3:5000/v2/", "https://10.1.2.3:5000/v2/"},
		{"http://192.168.0.9/v2/", "https://192.168.0.9/v2/"},
		{"http://printer.local/v2/", "https://printer.local/v2/"},
		{"http://127.0.0.1:5000/v2/", "http://127.0.0.1:5000/v2/"},
		{"http://localhost:5000/v2/", "http://localhost:5000/v2/"},
		{"http://[::1]:5000/v2/", "http://[::1]:5000/v2/"},
		{"http://registry.lan:5000/v2/", "http://registry.lan:5000/v2/"},
		{"https://ghcr.io/v2/", "https://ghcr.io/v2/"},
	} {
		rec.urls = nil
		req, _ := http.NewRequest(http.MethodGet, tc.in, nil)
		_, _ = tr.RoundTrip(req)
		if len(rec.urls) != 1 || rec.urls[0] != tc.want {
			t.Errorf("%s was sent as %v, want %s", tc.in, rec.urls, tc.want)
		}
	}
}

// A cached image is no way around its registry's credentials (KEP-2535):
// pod A pulls a private image with the right secret; pod B, with no secret
// or a secret the registry refuses, is refused under IfNotPresent and Never,
// by tag and by digest; the same secret works offline; another secret that
// the registry accepts is confirmed with the registry.
func TestCachedPrivateImageNeedsCredentials(t *testing.T) {
	var down atomic.Bool
	auth := testimage.BasicAuthUsers(map[string]string{"alice": "s3cret", "bob": "hunter2"})
	reg := testimage.Server(t, func(next http.Handler) http.Handler {
		h := auth(next)
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if down.Load() {
				http.Error(w, "down", http.StatusServiceUnavailable)
				return
			}
			h.ServeHTTP(w, r)
		})
	})
	alice := basicFor(reg, "alice", "s3cret")
	bob := basicFor(reg, "bob", "hunter2")
	eve := basicFor(reg, "eve", "guess")
	tag := reg + "/private:v1"
	dig := testimage.Push(t, tag, sampleImage(t, testimage.Gzip), remote.WithAuth(&authn.Basic{Username: "alice", Password: "s3cret"}))
	byDigest := reg + "/private@" + dig.String()

	s := openStore(t, t.TempDir())
	if _, err := s.Pull(context.Background(), tag, PullOptions{Keychain: alice}); err != nil {
		t.Fatalf("pod A with the right secret: %v", err)
	}
	for _, tc := range []struct {
		name   string
		ref    string
		kc     authn.Keychain
		policy PullPolicy
		down   bool
		want   error
	}{
		{"no secret, IfNotPresent", tag, nil, PullIfNotPresent, false, ErrUnauthorized},
		{"no secret, Never", tag, nil, PullNever, false, ErrUnauthorized},
		{"no secret, by digest", byDigest, nil, PullIfNotPresent, false, ErrUnauthorized},
		{"no secret, by digest, Never", byDigest, nil, PullNever, false, ErrUnauthorized},
		{"refused secret", tag, eve, PullIfNotPresent, false, ErrUnauthorized},
		{"same secret, Never, registry down", tag, alice, PullNever, true, nil},
		{"same secret, IfNotPresent, registry down", byDigest, alice, PullIfNotPresent, true, nil},
		{"other accepted secret, Never", tag, bob, PullNever, false, ErrUnauthorized},
		{"other accepted secret, confirmed by the registry", tag, bob, PullIfNotPresent, false, nil},
		{"that secret is now on record: Never, registry down", tag, bob, PullNever, true, nil},
		{"no secret, registry down", tag, nil, PullIfNotPresent, true, ErrUnavailable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			down.Store(tc.down)
			defer down.Store(false)
			_, err := s.Pull(context.Background(), tc.ref, PullOptions{Keychain: tc.kc, Policy: tc.policy})
			if !errors.Is(err, tc.want) || (tc.want == nil && err != nil) {
				t.Fatalf("Pull = %v, want %v", err, tc.want)
			}
		})
	}
}

// An image that needed no credentials serves any publish from the cache,
// offline too.
func TestCachedPublicImageServesAnyone(t *testing.T) {
	var down atomic.Bool
	reg := testimage.Server(t, func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if down.Load() {
				http.Error(w, "down", http.StatusServiceUnavailable)
				return
			}
			next.ServeHTTP(w, r)
		})
	})
	ref := reg + "/public:v1"
	testimage.Push(t, ref, sampleImage(t, testimage.Gzip))
	s := openStore(t, t.TempDir())
	if _, err := s.Pull(context.Background(), ref, PullOptions{}); err != nil {
		t.Fatal(err)
	}
	down.Store(true)
	for _, kc := range []authn.Keychain{nil, basicFor(reg, "someone", "x")} {
		if _, err := s.Pull(context.Background(), ref, PullOptions{Keychain: kc, Policy: PullNever}); err != nil {
			t.Errorf("cached public image with keychain %v, registry down: %v", kc, err)
		}
	}
}

// WithoutCredentialCheck is the policy for clusters that accept the risk.
func TestCredentialCheckCanBeTurnedOff(t *testing.T) {
	reg := testimage.Server(t, testimage.BasicAuth("alice", "s3cret"))
	ref := reg + "/private:v1"
	testimage.Push(t, ref, sampleImage(t, testimage.Gzip), remote.WithAuth(&authn.Basic{Username: "alice", Password: "s3cret"}))
	s := openStore(t, t.TempDir(), WithoutCredentialCheck())
	if _, err := s.Pull(context.Background(), ref, PullOptions{Keychain: basicFor(reg, "alice", "s3cret")}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Pull(context.Background(), ref, PullOptions{Policy: PullNever}); err != nil {
		t.Fatalf("without the credential check, a cached private image serves anyone: %v", err)
	}
}
