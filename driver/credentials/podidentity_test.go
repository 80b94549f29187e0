package credentials

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	configv1 "k8s.io/kubelet/config/v1"
	providerv1 "k8s.io/kubelet/pkg/apis/credentialprovider/v1"

	"github.com/strata-csi/strata/layercache"
)

const privateImg = "registry.io/team/app:v1"

// tokenProvider is a provider with tokenAttributes whose plugin answers
// with the token it was given as the user name, and records the tokens
// and annotations of its runs.
type tokenProvider struct {
	*provider
	mu   sync.Mutex
	runs []podToken
}

func newTokenProvider(cacheType configv1.ServiceAccountTokenCacheType, require bool, required, optional []string) *tokenProvider {
	tp := &tokenProvider{provider: &provider{
		name: "tokens", matchImages: []string{"registry.io"}, defaultTTL: time.Hour,
		apiVersion: providerv1.SchemeGroupVersion.String(), timeout: time.Minute, now: time.Now, cache: map[string]cachedAuth{},
		tokens: &configv1.ServiceAccountTokenAttributes{
			ServiceAccountTokenAudience: "registry.io", CacheType: cacheType, RequireServiceAccount: &require,
			RequiredServiceAccountAnnotationKeys: required, OptionalServiceAccountAnnotationKeys: optional,
		},
	}}
	tp.exec = func(_ context.Context, _ image, id podToken) (*providerv1.CredentialProviderResponse, error) {
		tp.mu.Lock()
		tp.runs = append(tp.runs, id)
		tp.mu.Unlock()
		user := "anonymous-run"
		if id.token != "" {
			user = "for-" + id.token
		}
		return &providerv1.CredentialProviderResponse{
			CacheKeyType: providerv1.RegistryPluginCacheKeyType,
			Auth:         map[string]providerv1.AuthConfig{"registry.io": {Username: user, Password: "pw"}},
		}, nil
	}
	return tp
}

// account is a ServiceAccount object for the fake API server.
func account(ns, name, uid string, annotations map[string]string, pullSecrets ...string) *corev1.ServiceAccount {
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID(uid), Annotations: annotations}}
	for _, s := range pullSecrets {
		sa.ImagePullSecrets = append(sa.ImagePullSecrets, corev1.LocalObjectReference{Name: s})
	}
	return sa
}

func podWith(ns, sa string, tokens map[string]string) Pod {
	return Pod{Namespace: ns, Name: "pod-" + sa, UID: "uid-" + sa, ServiceAccount: sa, Tokens: tokens}
}

// TestTokenProviderCache: a provider that takes tokens is given the pod's
// token for its audience and the annotations it asks for, and its answers
// are cached per identity as kubelet keys them: per token for cacheType
// Token; per account (namespace, name, UID, annotations) for
// ServiceAccount. One pod's answer never serves another account.
func TestTokenProviderCache(t *testing.T) {
	t.Parallel()
	kube := fake.NewClientset(
		account("a", "puller", "uid-a", map[string]string{"registry.io/role": "reader", "other": "x"}),
		account("b", "puller", "uid-b", map[string]string{"registry.io/role": "reader"}),
	)
	for _, tc := range []struct {
		name      string
		cacheType configv1.ServiceAccountTokenCacheType
		pods      []Pod
		users     []string // the credentials each pod gets
		runs      int
	}{
		{"Token: one run per token", configv1.TokenServiceAccountTokenCacheType,
			[]Pod{podWith("a", "puller", map[string]string{"registry.io": "t1"}), podWith("a", "puller", map[string]string{"registry.io": "t2"}),
				podWith("a", "puller", map[string]string{"registry.io": "t1"})},
			[]string{"for-t1", "for-t2", "for-t1"}, 2},
		{"ServiceAccount: one run per account", configv1.ServiceAccountServiceAccountTokenCacheType,
			[]Pod{podWith("a", "puller", map[string]string{"registry.io": "t1"}), podWith("a", "puller", map[string]string{"registry.io": "t2"}),
				podWith("b", "puller", map[string]string{"registry.io": "t3"})},
			[]string{"for-t1", "for-t1", "for-t3"}, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tp := newTokenProvider(tc.cacheType, true, []string{"registry.io/role"}, []string{"absent"})
			c := &Chain{kube: kube, podIdentity: true, saOff: "off", tokenProviders: []*provider{tp.provider}}
			for i, pod := range tc.pods {
				p, err := c.For(context.Background(), privateImg, nil, pod)
				if err != nil {
					t.Fatal(err)
				}
				if got := userOf(t, p); got != tc.users[i] {
					t.Errorf("pod %d (%s): credentials of %q, want %q", i, pod, got, tc.users[i])
				}
			}
			if len(tp.runs) != tc.runs {
				t.Errorf("%d runs, want %d", len(tp.runs), tc.runs)
			}
			for _, r := range tp.runs {
				if len(r.annotations) != 1 || r.annotations["registry.io/role"] != "reader" {
					t.Errorf("annotations %v, want only the required registry.io/role=reader", r.annotations)
				}
			}
		})
	}
}

// TestTokenProviderWithoutToken: a provider that requires a service
// account, for a pod whose volume context lacks its audience, is not run
// and the reason names the audience and the chart value; one that does
// not is run without a token, as kubelet does; a required annotation that
// the account lacks skips the provider.
func TestTokenProviderWithoutToken(t *testing.T) {
	t.Parallel()
	kube := fake.NewClientset(account("a", "puller", "uid-a", nil))
	pod := podWith("a", "puller", map[string]string{"other-audience": "t1"})

	required := newTokenProvider(configv1.TokenServiceAccountTokenCacheType, true, nil, nil)
	c := &Chain{kube: kube, podIdentity: true, saOff: "off", tokenProviders: []*provider{required.provider}}
	p, err := c.For(context.Background(), privateImg, nil, pod)
	if err != nil {
		t.Fatal(err)
	}
	msg := p.Explain(fmt.Errorf("%w: denied", layercache.ErrUnauthorized)).Error()
	for _, want := range []string{`token for audience "registry.io"`, "podIdentity.audiences"} {
		if !strings.Contains(msg, want) {
			t.Errorf("message %q does not contain %q", msg, want)
		}
	}
	if len(required.runs) != 0 {
		t.Errorf("the provider ran %d times without its token", len(required.runs))
	}

	optional := newTokenProvider(configv1.TokenServiceAccountTokenCacheType, false, nil, nil)
	c.tokenProviders = []*provider{optional.provider}
	if p, err = c.For(context.Background(), privateImg, nil, pod); err != nil {
		t.Fatal(err)
	}
	if got := userOf(t, p); got != "anonymous-run" || len(optional.runs) != 1 || optional.runs[0].token != "" {
		t.Errorf("credentials of %q after runs %+v, want one run without a token", got, optional.runs)
	}

	annotated := newTokenProvider(configv1.TokenServiceAccountTokenCacheType, true, []string{"registry.io/role"}, nil)
	c.tokenProviders = []*provider{annotated.provider}
	if p, err = c.For(context.Background(), privateImg, nil, podWith("a", "puller", map[string]string{"registry.io": "t1"})); err != nil {
		t.Fatal(err)
	}
	if len(annotated.runs) != 0 || !strings.Contains(listing(p.tried), "needs annotation registry.io/role") {
		t.Errorf("runs %d, tried %q: want no run, for want of the annotation", len(annotated.runs), p.tried)
	}
}

// TestTokenNotEchoed: a provider must not answer with the token as the
// password unless its cacheType is Token, as in kubelet.
func TestTokenNotEchoed(t *testing.T) {
	t.Parallel()
	tp := newTokenProvider(configv1.ServiceAccountServiceAccountTokenCacheType, true, nil, nil)
	tp.exec = func(_ context.Context, _ image, id podToken) (*providerv1.CredentialProviderResponse, error) {
		return &providerv1.CredentialProviderResponse{CacheKeyType: providerv1.ImagePluginCacheKeyType,
			Auth: map[string]providerv1.AuthConfig{"registry.io": {Username: "x", Password: id.token}}}, nil
	}
	c := &Chain{kube: fake.NewClientset(account("a", "puller", "u", nil)), podIdentity: true, tokenProviders: []*provider{tp.provider}}
	p, err := c.For(context.Background(), privateImg, nil, podWith("a", "puller", map[string]string{"registry.io": "s3cret-token"}))
	if err != nil {
		t.Fatal(err)
	}
	if p.Keychain != nil || !strings.Contains(listing(p.tried), "cacheType: Token") {
		t.Errorf("credentials %v, tried %q: want the echo refused", p.Keychain, p.tried)
	}
}

// sarServer is a fake API server whose SubjectAccessReviews allow exactly
// the listed (user, namespace, secret) triples, and which records the
// reviews and the secrets read.
type sarServer struct {
	kube    *fake.Clientset
	mu      sync.Mutex
	reviews []authorizationv1.SubjectAccessReviewSpec
	reads   []string
}

func newSARServer(allowed map[string]bool, objs ...runtime.Object) *sarServer {
	s := &sarServer{kube: fake.NewClientset(objs...)}
	s.kube.PrependReactor("create", "subjectaccessreviews", func(a k8stesting.Action) (bool, runtime.Object, error) {
		sar := a.(k8stesting.CreateAction).GetObject().(*authorizationv1.SubjectAccessReview)
		s.mu.Lock()
		s.reviews = append(s.reviews, sar.Spec)
		s.mu.Unlock()
		ra := sar.Spec.ResourceAttributes
		out := sar.DeepCopy()
		out.Status.Allowed = allowed[sar.Spec.User+" "+ra.Namespace+"/"+ra.Name] && ra.Verb == "get" && ra.Resource == "secrets"
		return true, out, nil
	})
	s.kube.PrependReactor("get", "secrets", func(a k8stesting.Action) (bool, runtime.Object, error) {
		s.mu.Lock()
		s.reads = append(s.reads, a.GetNamespace()+"/"+a.(k8stesting.GetAction).GetName())
		s.mu.Unlock()
		return false, nil, nil // the tracker answers
	})
	return s
}

func pullSecretObject(ns, name, host, user string) *corev1.Secret {
	return &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Type:       corev1.SecretTypeDockerConfigJson,
		Data:       map[string][]byte{corev1.DockerConfigJsonKey: []byte(dockerConfig(host, user, "pw"))},
	}
}

// TestPodSecrets: the pod's ServiceAccount's imagePullSecrets are used only
// when a SubjectAccessReview, made as that account in its namespace, allows
// get on them; a denied secret is never read, and is named when the
// registry refuses; answers are reused for the TTL only.
func TestPodSecrets(t *testing.T) {
	t.Parallel()
	s := newSARServer(map[string]bool{"system:serviceaccount:a:puller a/allowed": true},
		account("a", "puller", "u", nil, "forbidden", "allowed"),
		pullSecretObject("a", "allowed", "registry.io", "allowed-user"),
		pullSecretObject("a", "forbidden", "registry.io", "forbidden-user"),
	)
	clock := &fakeClock{t: time.Unix(1e9, 0)}
	access := newAccessCache(10 * time.Second)
	access.now = clock.now
	c := &Chain{kube: s.kube, podIdentity: true, saOff: "off", podSecrets: &podSecrets{kube: s.kube, access: access}}
	pod := podWith("a", "puller", nil)

	p, err := c.For(context.Background(), privateImg, nil, pod)
	if err != nil {
		t.Fatal(err)
	}
	if got := userOf(t, p); got != "allowed-user" || p.From != "secret allowed of the pod's service account a/puller" {
		t.Errorf("credentials of %q from %q, want the allowed secret's", got, p.From)
	}
	if !slices.Equal(s.reads, []string{"a/allowed"}) {
		t.Errorf("secrets read: %q, want only a/allowed (never one the account may not get)", s.reads)
	}
	if len(s.reviews) != 2 {
		t.Fatalf("%d reviews, want one per pull secret", len(s.reviews))
	}
	r := s.reviews[0]
	if r.User != "system:serviceaccount:a:puller" || !slices.Equal(r.Groups, []string{"system:serviceaccounts", "system:serviceaccounts:a"}) ||
		r.ResourceAttributes == nil || *r.ResourceAttributes != (authorizationv1.ResourceAttributes{Namespace: "a", Verb: "get", Resource: "secrets", Name: "forbidden"}) {
		t.Errorf("review %+v (%+v): want the account's user and groups, get on secret a/forbidden", r, r.ResourceAttributes)
	}
	refused := p.Explain(fmt.Errorf("%w: denied", layercache.ErrUnauthorized)).Error()
	if !strings.Contains(refused, "may not get its pull secret forbidden") {
		t.Errorf("refusal %q does not name the denied secret", refused)
	}

	// Cached for the TTL, asked again after it.
	clock.add(9 * time.Second)
	if _, err := c.For(context.Background(), privateImg, nil, pod); err != nil || len(s.reviews) != 2 {
		t.Errorf("within the TTL: %d reviews (%v), want still 2", len(s.reviews), err)
	}
	clock.add(2 * time.Second)
	if _, err := c.For(context.Background(), privateImg, nil, pod); err != nil || len(s.reviews) != 4 {
		t.Errorf("after the TTL: %d reviews (%v), want 4", len(s.reviews), err)
	}
}

// TestPodSecretsDenied: a ServiceAccount that names a secret of its
// namespace it may not get (another tenant's, or one it only knows the name
// of) gets nothing from it, and the message names the secret.
func TestPodSecretsDenied(t *testing.T) {
	t.Parallel()
	s := newSARServer(nil,
		account("b", "borrower", "u", nil, "pull-a"),
		pullSecretObject("b", "pull-a", "registry.io", "not-yours"),
	)
	c := &Chain{kube: s.kube, podIdentity: true, saOff: "off", podSecrets: &podSecrets{kube: s.kube, access: newAccessCache(0)}}
	p, err := c.For(context.Background(), privateImg, nil, podWith("b", "borrower", nil))
	if err != nil {
		t.Fatal(err)
	}
	if p.Keychain != nil || len(s.reads) != 0 {
		t.Fatalf("credentials %v from %q, secrets read %q: want none", p.Keychain, p.From, s.reads)
	}
	msg := p.Explain(fmt.Errorf("%w: denied", layercache.ErrUnauthorized)).Error()
	for _, want := range []string{"the pod's service account b/borrower has no imagePullSecret for it that it may read", "secret pull-a", "may not get it"} {
		if !strings.Contains(msg, want) {
			t.Errorf("message %q does not contain %q", msg, want)
		}
	}
}

// TestPodIdentityOrder: the volume's secret, then the pod's secrets, then
// the token providers, then the driver's account (here off), then the
// plain providers; pod identity off, the pod sources are silent.
func TestPodIdentityOrder(t *testing.T) {
	t.Parallel()
	s := newSARServer(map[string]bool{"system:serviceaccount:a:puller a/mine": true},
		account("a", "puller", "u", nil, "mine"),
		account("a", "nosecrets", "u2", nil),
		pullSecretObject("a", "mine", "registry.io", "pod-secret"),
	)
	var plainRuns int
	tp := newTokenProvider(configv1.TokenServiceAccountTokenCacheType, false, nil, nil)
	c := &Chain{kube: s.kube, podIdentity: true, saOff: "no service account is configured",
		podSecrets:     &podSecrets{kube: s.kube, access: newAccessCache(0)},
		tokenProviders: []*provider{tp.provider},
		providers:      []*provider{staticProvider("plain", "registry.io", "plain", &plainRuns)},
	}
	tokens := map[string]string{"registry.io": "t1"}
	for _, tc := range []struct {
		name    string
		secrets map[string]string
		pod     Pod
		user    string
	}{
		{"volume secret first", map[string]string{".dockerconfigjson": dockerConfig("registry.io", "volume", "pw")}, podWith("a", "puller", tokens), "volume"},
		{"then the pod's secrets", nil, podWith("a", "puller", tokens), "pod-secret"},
		{"then the token provider", nil, podWith("a", "nosecrets", tokens), "for-t1"},
	} {
		p, err := c.For(context.Background(), privateImg, tc.secrets, tc.pod)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if got := userOf(t, p); got != tc.user {
			t.Errorf("%s: credentials of %q from %q, want %q", tc.name, got, p.From, tc.user)
		}
	}
	c.tokenProviders = nil
	p, err := c.For(context.Background(), privateImg, nil, podWith("a", "nosecrets", tokens))
	if err != nil || userOf(t, p) != "plain" {
		t.Errorf("last: credentials of %q (%v), want the plain provider's", userOf(t, p), err)
	}

	off := &Chain{saOff: "no service account is configured"}
	p, err = off.For(context.Background(), privateImg, nil, podWith("a", "puller", tokens))
	if err != nil {
		t.Fatal(err)
	}
	if msg := listing(p.tried); strings.Contains(msg, "pod") {
		t.Errorf("pod identity off, yet the message mentions the pod: %s", msg)
	}
}

// TestLoadTokenProviders: tokenAttributes are refused without pod identity,
// with a message that says how to turn it on, and checked as kubelet does
// with it.
func TestLoadTokenProviders(t *testing.T) {
	t.Parallel()
	bin := t.TempDir()
	script(t, bin, "p", "exit 0\n")
	entry := func(attrs string) string {
		return configHead + "  - {name: p, matchImages: [r.io], defaultCacheDuration: 1m, apiVersion: credentialprovider.kubelet.k8s.io/v1, tokenAttributes: {" + attrs + "}}"
	}
	const good = "serviceAccountTokenAudience: r.io, cacheType: Token, requireServiceAccount: true"
	if _, err := loadProviders(writeConfig(t, t.TempDir(), entry(good)), bin, 0, false); err == nil ||
		!strings.Contains(err.Error(), "--pod-identity") || !strings.Contains(err.Error(), "podIdentity.enabled") {
		t.Errorf("without pod identity: %v, want an error that says to turn it on", err)
	}
	ps, err := loadProviders(writeConfig(t, t.TempDir(), entry(good+", optionalServiceAccountAnnotationKeys: [r.io/role]")), bin, 0, true)
	if err != nil || len(ps) != 1 || ps[0].tokens == nil || ps[0].tokens.ServiceAccountTokenAudience != "r.io" {
		t.Fatalf("with pod identity: %v, %+v", err, ps)
	}
	for _, tc := range []struct{ name, attrs, want string }{
		{"no audience", "cacheType: Token, requireServiceAccount: true", "serviceAccountTokenAudience"},
		{"no requireServiceAccount", "serviceAccountTokenAudience: r.io, cacheType: Token", "requireServiceAccount"},
		{"bad cacheType", "serviceAccountTokenAudience: r.io, cacheType: Pod, requireServiceAccount: true", "cacheType"},
		{"required keys without requireServiceAccount", "serviceAccountTokenAudience: r.io, cacheType: Token, requireServiceAccount: false, requiredServiceAccountAnnotationKeys: [a]", "requiredServiceAccountAnnotationKeys"},
		{"key both required and optional", good + ", requiredServiceAccountAnnotationKeys: [a], optionalServiceAccountAnnotationKeys: [a]", "twice"},
		{"bad key", good + ", optionalServiceAccountAnnotationKeys: ['not a key']", "optionalServiceAccountAnnotationKeys"},
	} {
		if _, err := loadProviders(writeConfig(t, t.TempDir(), entry(tc.attrs)), bin, 0, true); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want an error containing %q", tc.name, err, tc.want)
		}
	}
}
