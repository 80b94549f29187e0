package dockerconfig

import (
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
)

// TestKeyringResolve: a Keyring is asked, as a keychain, about repositories
// as go-containerregistry names them (Docker Hub as index.docker.io), and
// matches them as kubelet does; anything unmatched is anonymous.
func TestKeyringResolve(t *testing.T) {
	t.Parallel()
	var k Keyring
	cfg := `{"auths": {
		"docker.io": {"username": "hub"},
		"127.0.0.1:5000/team": {"username": "team", "password": "pw", "identitytoken": "tok"},
		"*.registry.io": {"username": "wild"}
	}}`
	if err := k.AddDockerConfig([]byte(cfg), false, "test"); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ repo, user string }{
		{"busybox", "hub"},
		{"index.docker.io/someone/app", "hub"},
		{"127.0.0.1:5000/team/app", "team"},
		{"127.0.0.1:5000/other", ""},
		{"127.0.0.1:5001/team/app", ""},
		{"eu.registry.io/app", "wild"},
		{"registry.io/app", ""},
	} {
		r, err := name.NewRepository(tc.repo)
		if err != nil {
			t.Fatal(err)
		}
		a, err := k.Resolve(r)
		if err != nil {
			t.Fatal(err)
		}
		if tc.user == "" {
			if a != authn.Anonymous {
				t.Errorf("%s: got credentials, want anonymous", tc.repo)
			}
			continue
		}
		cfg, err := a.Authorization()
		if err != nil {
			t.Fatal(err)
		}
		if cfg.Username != tc.user {
			t.Errorf("%s: user %q, want %q", tc.repo, cfg.Username, tc.user)
		}
		if tc.user == "team" && (*cfg != authn.AuthConfig{Username: "team", Password: "pw", IdentityToken: "tok"}) {
			t.Errorf("%s: %+v, want the entry's user, password and identity token alone", tc.repo, *cfg)
		}
	}
}

// TestForRegistries: credentials for named registries reach no other host.
func TestForRegistries(t *testing.T) {
	t.Parallel()
	kc := ForRegistries(Auth{Username: "u", Password: "p"}, "127.0.0.1:5000", name.DefaultRegistry)
	for _, tc := range []struct {
		repo string
		want bool
	}{
		{"127.0.0.1:5000/a/b", true},
		{"busybox", true},
		{"127.0.0.1:5001/a/b", false},
		{"quay.io/a", false},
	} {
		r, err := name.NewRepository(tc.repo)
		if err != nil {
			t.Fatal(err)
		}
		a, err := kc.Resolve(r)
		if err != nil {
			t.Fatal(err)
		}
		if got := a != authn.Anonymous; got != tc.want {
			t.Errorf("%s: credentials %v, want %v", tc.repo, got, tc.want)
		}
	}
}
