package credentials

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	providerv1 "k8s.io/kubelet/pkg/apis/credentialprovider/v1"

	"github.com/strata-csi/strata/layercache"
)

// dockerConfig is a .dockerconfigjson with user:password for host.
func dockerConfig(host, user, password string) string {
	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + password))
	return fmt.Sprintf(`{"auths": {%q: {"auth": %q}}}`, host, auth)
}

// userOf is the user name that p's keychain gives the image's registry.
func userOf(t *testing.T, p Pull) string {
	t.Helper()
	if p.Keychain == nil {
		return ""
	}
	reg, err := name.NewRegistry(p.image.registry)
	if err != nil {
		t.Fatal(err)
	}
	a, err := p.Keychain.Resolve(reg.Repo("some/repo"))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := a.Authorization()
	if err != nil {
		t.Fatal(err)
	}
	return cfg.Username
}

// staticProvider answers with user for every image under pattern.
func staticProvider(name, pattern, user string, runs *int) *provider {
	p := &provider{
		name: name, matchImages: []string{pattern}, apiVersion: providerv1.SchemeGroupVersion.String(),
		defaultTTL: time.Hour, timeout: time.Minute, now: time.Now, cache: map[string]cachedAuth{},
	}
	p.exec = func(context.Context, image, podToken) (*providerv1.CredentialProviderResponse, error) {
		*runs++
		return &providerv1.CredentialProviderResponse{
			CacheKeyType: providerv1.GlobalPluginCacheKeyType,
			Auth:         map[string]providerv1.AuthConfig{pattern: {Username: user, Password: "pw"}},
		}, nil
	}
	return p
}

// TestChainOrder: the first source with an entry for the registry wins; a
// source without one passes to the next; a provider whose matchImages do
// not match is never run.
func TestChainOrder(t *testing.T) {
	t.Parallel()
	const img = "127.0.0.1:5000/private/data:v1"
	var provRuns, otherRuns int
	c := &Chain{saOff: "no service account is configured", providers: []*provider{
		staticProvider("other", "*.example.com", "other", &otherRuns),
		staticProvider("local", "127.0.0.1:5000", "provider", &provRuns),
	}}
	for _, tc := range []struct {
		name    string
		secrets map[string]string
		user    string
		from    string
	}{
		{"the volume's secret wins", map[string]string{".dockerconfigjson": dockerConfig("127.0.0.1:5000", "secret", "pw")}, "secret", "the volume's node-publish secret"},
		{"a secret for another registry passes", map[string]string{".dockerconfigjson": dockerConfig("quay.io", "quay", "pw")}, "provider", "credential provider local"},
		{"no secret", nil, "provider", "credential provider local"},
		{"legacy dockercfg", map[string]string{".dockercfg": `{"127.0.0.1:5000": {"username": "legacy", "password": "pw"}}`}, "legacy", "the volume's node-publish secret"},
	} {
		p, err := c.For(context.Background(), img, tc.secrets, Pod{})
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if got := userOf(t, p); got != tc.user || p.From != tc.from {
			t.Errorf("%s: credentials of %q from %q, want %q from %q", tc.name, got, p.From, tc.user, tc.from)
		}
	}
	if otherRuns != 0 {
		t.Errorf("the provider for *.example.com ran %d times for %s", otherRuns, img)
	}
	if provRuns != 1 {
		t.Errorf("the matching provider ran %d times, want once (then cached)", provRuns)
	}
}

// TestExplain: a refusal says what was tried, or where the refused
// credentials came from; other errors pass unchanged; the sentinel stays.
func TestExplain(t *testing.T) {
	t.Parallel()
	refused := fmt.Errorf("%w: fetch manifest 127.0.0.1:5000/private/data:v1: UNAUTHORIZED: check the pull secret", layercache.ErrUnauthorized)
	const img = "127.0.0.1:5000/private/data:v1"

	c := &Chain{saOff: "service account strata-system/strata-node has no imagePullSecret for it"}
	p, err := c.For(context.Background(), img, nil, Pod{})
	if err != nil {
		t.Fatal(err)
	}
	got := p.Explain(refused)
	if !errors.Is(got, layercache.ErrUnauthorized) {
		t.Errorf("Explain lost the sentinel: %v", got)
	}
	want := "registry refused access to 127.0.0.1:5000/private/data:v1: " +
		"no credentials for 127.0.0.1:5000: the volume has no nodePublishSecretRef, service account strata-system/strata-node has no imagePullSecret for it, " +
		"and no credential provider is configured; details: fetch manifest 127.0.0.1:5000/private/data:v1: UNAUTHORIZED: check the pull secret"
	if got.Error() != want {
		t.Errorf("message\n%s\nwant\n%s", got, want)
	}

	p, err = c.For(context.Background(), img, map[string]string{".dockerconfigjson": dockerConfig("127.0.0.1:5000", "u", "wrong")}, Pod{})
	if err != nil {
		t.Fatal(err)
	}
	if got := p.Explain(refused).Error(); !strings.Contains(got, ": it refused the credentials from the volume's node-publish secret: check them; details: ") {
		t.Errorf("refused secret: %s", got)
	}
	if strings.Contains(p.Explain(refused).Error(), "wrong") {
		t.Error("the message shows the password")
	}
	other := fmt.Errorf("%w: no route", layercache.ErrUnavailable)
	if p.Explain(other) != other || p.Explain(nil) != nil {
		t.Error("Explain changed an error that is no refusal")
	}
}

// TestVolumeSecret: what the node-publish secret gives, and why not.
func TestVolumeSecret(t *testing.T) {
	t.Parallel()
	im := mustImage(t, "127.0.0.1:5000/private/data:v1")
	for _, tc := range []struct {
		name    string
		secrets map[string]string
		found   bool
		why     string
		err     bool
	}{
		{"none", nil, false, "the volume has no nodePublishSecretRef", false},
		{"opaque secret", map[string]string{"token": "x"}, false, "has no .dockerconfigjson key", false},
		{"other registry", map[string]string{".dockerconfigjson": dockerConfig("quay.io", "u", "p")}, false, "has no entry for 127.0.0.1:5000", false},
		{"match", map[string]string{".dockerconfigjson": dockerConfig("http://127.0.0.1:5000/v2/", "u", "p")}, true, "", false},
		{"garbage", map[string]string{".dockerconfigjson": "{"}, false, "", true},
	} {
		_, ok, why, err := volumeSecret(im, tc.secrets)
		if (err != nil) != tc.err || ok != tc.found || !strings.Contains(why, tc.why) {
			t.Errorf("%s: found %v, why %q, err %v; want found %v, why containing %q, error %v", tc.name, ok, why, err, tc.found, tc.why, tc.err)
		}
		if err != nil && !errors.Is(err, layercache.ErrUnauthorized) {
			t.Errorf("%s: %v is not ErrUnauthorized", tc.name, err)
		}
	}
}

// TestPullSecretsKeyring: the service account's imagePullSecrets, in order,
// merged; missing and mistyped secrets are reported, not fatal.
func TestPullSecretsKeyring(t *testing.T) {
	t.Parallel()
	secrets := map[string]*corev1.Secret{
		"team": {Type: corev1.SecretTypeDockerConfigJson, Data: map[string][]byte{
			corev1.DockerConfigJsonKey: []byte(dockerConfig("registry.io/team", "team", "pw"))}},
		"all": {Type: corev1.SecretTypeDockerConfigJson, Data: map[string][]byte{
			corev1.DockerConfigJsonKey: []byte(dockerConfig("registry.io", "all", "pw"))}},
		"opaque": {Type: corev1.SecretTypeOpaque, Data: map[string][]byte{"x": []byte("y")}},
	}
	get := func(name string) (*corev1.Secret, error) {
		if s, ok := secrets[name]; ok {
			return s, nil
		}
		return nil, apierrors.NewNotFound(corev1.Resource("secrets"), name)
	}
	sa := &corev1.ServiceAccount{
		ObjectMeta:       metav1.ObjectMeta{Namespace: "strata-system", Name: "strata-node"},
		ImagePullSecrets: []corev1.LocalObjectReference{{Name: "gone"}, {Name: "all"}, {Name: "opaque"}, {Name: "team"}},
	}
	ring, problems := pullSecretsKeyring(sa, get, func(name string) string { return "service account secret " + name })
	for ref, want := range map[string]string{"registry.io/team/app": "service account secret team", "registry.io/other/app": "service account secret all"} {
		a, ok := ring.lookup(mustImage(t, ref))
		if !ok || a.From != want {
			t.Errorf("%s: from %q (found %v), want %q", ref, a.From, ok, want)
		}
	}
	if len(problems) != 2 || !strings.Contains(problems[0], "gone does not exist") || !strings.Contains(problems[1], "opaque is not a kubernetes.io/dockerconfigjson secret") {
		t.Errorf("problems %q, want the missing and the opaque secret", problems)
	}
}

// TestNewRejects: configuration mistakes fail at start with a message that
// says what to fix.
func TestNewRejects(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"service account without namespace", Config{ServiceAccount: "strata-node"}, "NAMESPACE/NAME"},
		{"bin dir without config", Config{ProviderBinDir: "/usr/libexec"}, "--image-credential-provider-config"},
		{"missing config", Config{ProviderConfig: "/nonexistent/config.yaml", ProviderBinDir: "/"}, "/nonexistent/config.yaml"},
	} {
		if _, err := New(tc.cfg); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want an error containing %q", tc.name, err, tc.want)
		}
	}
	c, err := New(Config{ServiceAccount: "strata-system/strata-node"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if !strings.Contains(c.saOff, "no Kubernetes API access") {
		t.Errorf("without API access the source says %q", c.saOff)
	}
}

// TestPullKeychain: the keychain of a Pull answers for the image's registry
// (any of its repositories) and for no other host, so that a mirror of the
// registry never sees its credentials; Docker Hub is index.docker.io to the
// layer cache and docker.io to pull secrets.
func TestPullKeychain(t *testing.T) {
	t.Parallel()
	c := &Chain{}
	for _, tc := range []struct {
		name, ref, key string
		resource       func(t *testing.T) authn.Resource
		want           string
	}{
		{"the image's repository", "127.0.0.1:5000/private/data:v1", "127.0.0.1:5000", repoOf("127.0.0.1:5000/private/data"), "u"},
		{"another repository of the registry", "127.0.0.1:5000/private/data:v1", "127.0.0.1:5000", repoOf("127.0.0.1:5000/other"), "u"},
		{"a mirror", "127.0.0.1:5000/private/data:v1", "127.0.0.1:5000", repoOf("127.0.0.1:5001/private/data"), ""},
		{"another registry", "127.0.0.1:5000/private/data:v1", "127.0.0.1:5000", repoOf("quay.io/private/data"), ""},
		{"Docker Hub, docker.io key", "busybox", "docker.io", repoOf("index.docker.io/library/busybox"), "u"},
		{"Docker Hub, legacy key", "someone/app", "https://index.docker.io/v1/", repoOf("docker.io/someone/app"), "u"},
	} {
		p, err := c.For(context.Background(), tc.ref, map[string]string{".dockerconfigjson": dockerConfig(tc.key, "u", "p")}, Pod{})
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if p.Keychain == nil {
			t.Fatalf("%s: no keychain", tc.name)
		}
		a, err := p.Keychain.Resolve(tc.resource(t))
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		cfg, err := a.Authorization()
		if err != nil {
			t.Fatal(err)
		}
		if cfg.Username != tc.want || (tc.want == "" && a != authn.Anonymous) {
			t.Errorf("%s: user %q, want %q", tc.name, cfg.Username, tc.want)
		}
	}
}

func repoOf(s string) func(t *testing.T) authn.Resource {
	return func(t *testing.T) authn.Resource {
		r, err := name.NewRepository(s)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
}
