package layercache

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"sync/atomic"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/strata-csi/strata/test/testimage"
)

func dockerConfig(host, user, pass string) []byte {
	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	return fmt.Appendf(nil, `{"auths":{%q:{"auth":%q}}}`, host, auth)
}

func TestPullWithCredentials(t *testing.T) {
	reg := testimage.Server(t, testimage.BasicAuth("alice", "s3cret"))
	ref := reg + "/private:v1"
	testimage.Push(t, ref, sampleImage(t, testimage.Gzip), remote.WithAuth(&authn.Basic{Username: "alice", Password: "s3cret"}))

	for _, tc := range []struct {
		name    string
		creds   *Credentials
		wantErr error
	}{
		{"dockerconfigjson", &Credentials{DockerConfigJSON: dockerConfig(reg, "alice", "s3cret")}, nil},
		{"dockerconfigjson with URL key", &Credentials{DockerConfigJSON: dockerConfig("http://"+reg+"/v1/", "alice", "s3cret")}, nil},
		{"username and password", &Credentials{Username: "alice", Password: "s3cret"}, nil},
		{"wrong password", &Credentials{Username: "alice", Password: "guess"}, ErrUnauthorized},
		{"secret for another registry", &Credentials{DockerConfigJSON: dockerConfig("example.com", "alice", "s3cret")}, ErrUnauthorized},
		{"no credentials", nil, ErrUnauthorized},
		{"malformed secret", &Credentials{DockerConfigJSON: []byte("{")}, ErrUnauthorized},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := openStore(t, t.TempDir())
			img, err := s.Pull(context.Background(), ref, PullOptions{Credentials: tc.creds})
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil && err != nil) {
				t.Fatalf("Pull = %v, want %v", err, tc.wantErr)
			}
			if err == nil && len(img.Layers) != 2 {
				t.Errorf("got %d layers, want 2", len(img.Layers))
			}
		})
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

func TestDockerConfigMatchesRegistryHost(t *testing.T) {
	hub, _ := name.NewRegistry("docker.io")
	local, _ := name.NewRegistry("127.0.0.1:5000")
	for _, tc := range []struct {
		name string
		key  string
		reg  name.Registry
		want bool
	}{
		{"docker hub URL key", "https://index.docker.io/v1/", hub, true},
		{"docker.io key", "docker.io", hub, true},
		{"host:port", "127.0.0.1:5000", local, true},
		{"URL with path", "http://127.0.0.1:5000/v2/", local, true},
		{"other port", "127.0.0.1:5001", local, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, err := dockerConfigAuth(dockerConfig(tc.key, "u", "p"), tc.reg)
			if err != nil {
				t.Fatal(err)
			}
			cfg, err := a.Authorization()
			if err != nil {
				t.Fatal(err)
			}
			if got := cfg.Username == "u"; got != tc.want {
				t.Errorf("key %q for %s: matched=%v, want %v", tc.key, tc.reg, got, tc.want)
			}
		})
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
	alice := &Credentials{DockerConfigJSON: dockerConfig(reg, "alice", "s3cret")}
	bob := &Credentials{Username: "bob", Password: "hunter2"}
	eve := &Credentials{Username: "eve", Password: "guess"}
	tag := reg + "/private:v1"
	dig := testimage.Push(t, tag, sampleImage(t, testimage.Gzip), remote.WithAuth(&authn.Basic{Username: "alice", Password: "s3cret"}))
	byDigest := reg + "/private@" + dig.String()

	s := openStore(t, t.TempDir())
	if _, err := s.Pull(context.Background(), tag, PullOptions{Credentials: alice}); err != nil {
		t.Fatalf("pod A with the right secret: %v", err)
	}
	for _, tc := range []struct {
		name   string
		ref    string
		creds  *Credentials
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
			_, err := s.Pull(context.Background(), tc.ref, PullOptions{Credentials: tc.creds, Policy: tc.policy})
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
	for _, creds := range []*Credentials{nil, {Username: "someone", Password: "x"}} {
		if _, err := s.Pull(context.Background(), ref, PullOptions{Credentials: creds, Policy: PullNever}); err != nil {
			t.Errorf("cached public image with credentials %v, registry down: %v", creds, err)
		}
	}
}

// WithoutCredentialCheck is the policy for clusters that accept the risk.
func TestCredentialCheckCanBeTurnedOff(t *testing.T) {
	reg := testimage.Server(t, testimage.BasicAuth("alice", "s3cret"))
	ref := reg + "/private:v1"
	testimage.Push(t, ref, sampleImage(t, testimage.Gzip), remote.WithAuth(&authn.Basic{Username: "alice", Password: "s3cret"}))
	s := openStore(t, t.TempDir(), WithoutCredentialCheck())
	if _, err := s.Pull(context.Background(), ref, PullOptions{Credentials: &Credentials{Username: "alice", Password: "s3cret"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Pull(context.Background(), ref, PullOptions{Policy: PullNever}); err != nil {
		t.Fatalf("without the credential check, a cached private image serves anyone: %v", err)
	}
}
