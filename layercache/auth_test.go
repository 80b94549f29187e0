package layercache

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
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
