// Package credentials decides which pull credentials an image gets. It has
// one job: given the image of a publish, the volume's node-publish secret
// and the pod it is for, walk the chain of sources in order and return the
// first credentials that match the image's registry:
//
//  1. the volume's node-publish secret (kubernetes.io/dockerconfigjson,
//     passed by kubelet in the request's secrets);
//  2. with pod identity, the pod's own identity: the imagePullSecrets of the
//     pod's ServiceAccount that a SubjectAccessReview shows the account may
//     read, then the credential providers with tokenAttributes, given the
//     pod's ServiceAccount token for their audience (KEP-4412);
//  3. the imagePullSecrets of a configured ServiceAccount, read through
//     informers (so a publish reads memory, and a changed or newly attached
//     secret applies without a restart);
//  4. kubelet credential provider exec plugins, configured with kubelet's own
//     CredentialProviderConfig file and protocol, so that the ECR, GCR and
//     ACR providers work unchanged.
//
// What the volume or the pod brings comes before what the driver holds for
// every volume, so that a pod's own credentials are never shadowed by the
// cluster-wide ones; the more specific of two sources wins.
//
// When none matches, the pull is anonymous. When the registry refuses the
// pull, Pull.Explain turns the error into one that says what was tried and
// what is missing, or which source supplied the refused credentials.
package credentials

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/credentials/dockerconfig"
	"github.com/strata-csi/strata/layercache"
)

// Keys of a kubernetes.io/dockerconfigjson secret and of the legacy
// kubernetes.io/dockercfg one.
const (
	dockerConfigJSONKey = ".dockerconfigjson"
	dockerCfgKey        = ".dockercfg"
)

// Config configures a Chain. The zero value uses only the volume's
// node-publish secret.
type Config struct {
	// Kube reaches the API server for the service account source; nil turns
	// that source off.
	Kube kubernetes.Interface
	// ServiceAccount is NAMESPACE/NAME of the account whose imagePullSecrets
	// are the second source; empty turns it off.
	ServiceAccount string
	// ProviderConfig is a kubelet CredentialProviderConfig file; empty turns
	// credential providers off. ProviderBinDir holds their executables.
	ProviderConfig, ProviderBinDir string
	// ProviderTimeout bounds one run of a plugin (DefaultProviderTimeout if
	// zero).
	ProviderTimeout time.Duration
	// PodIdentity turns on the pod identity sources: the pod's
	// ServiceAccount's imagePullSecrets (through Kube, after a
	// SubjectAccessReview) and providers with tokenAttributes, which are
	// refused without it.
	PodIdentity bool
	// AccessReviewTTL is how long a SubjectAccessReview answer is reused
	// (DefaultAccessReviewTTL if zero).
	AccessReviewTTL time.Duration
}

// Chain finds the credentials for an image. It is safe for concurrent use.
type Chain struct {
	kube      kubernetes.Interface
	sa        *serviceAccount // nil: off
	saOff     string          // why the service account source is off
	providers []*provider     // plain providers

	podIdentity    bool
	podSecrets     *podSecrets // nil: off (pod identity off, or no API access)
	tokenProviders []*provider // providers with tokenAttributes
}

// New checks cfg, loads the credential providers and starts watching the
// service account. Close stops the watches.
func New(cfg Config) (*Chain, error) {
	c := &Chain{kube: cfg.Kube, podIdentity: cfg.PodIdentity}
	if cfg.PodIdentity && cfg.Kube != nil {
		c.podSecrets = &podSecrets{kube: cfg.Kube, access: newAccessCache(cfg.AccessReviewTTL)}
	}
	if cfg.PodIdentity {
		klog.InfoS("Pod identity is on: pods' service account pull secrets and tokens are used", "apiAccess", cfg.Kube != nil)
	}
	switch {
	case cfg.ServiceAccount == "":
		c.saOff = "no service account is configured for pull secrets (--pull-secrets-service-account)"
	case cfg.Kube == nil:
		// Validate anyway: a typo should not wait for the plugin to move into
		// a cluster to show up.
		if _, _, err := parseServiceAccount(cfg.ServiceAccount); err != nil {
			return nil, fmt.Errorf("--pull-secrets-service-account: %w", err)
		}
		c.saOff = fmt.Sprintf("service account %s cannot be read: the plugin has no Kubernetes API access", cfg.ServiceAccount)
		klog.InfoS("No Kubernetes API access: the service account pull secrets source is off", "serviceAccount", cfg.ServiceAccount)
	default:
		sa, err := newServiceAccount(cfg.Kube, cfg.ServiceAccount)
		if err != nil {
			return nil, fmt.Errorf("--pull-secrets-service-account: %w", err)
		}
		c.sa = sa
	}
	if cfg.ProviderConfig != "" {
		ps, err := loadProviders(cfg.ProviderConfig, cfg.ProviderBinDir, cfg.ProviderTimeout, cfg.PodIdentity)
		if err != nil {
			c.Close()
			return nil, err
		}
		for _, p := range ps {
			if p.tokens != nil {
				c.tokenProviders = append(c.tokenProviders, p)
				klog.InfoS("Credential provider configured", "provider", p.name, "matchImages", p.matchImages, "timeout", p.timeout,
					"serviceAccountTokenAudience", p.tokens.ServiceAccountTokenAudience, "cacheType", p.tokens.CacheType)
				continue
			}
			c.providers = append(c.providers, p)
			klog.InfoS("Credential provider configured", "provider", p.name, "matchImages", p.matchImages, "timeout", p.timeout)
		}
	} else if cfg.ProviderBinDir != "" {
		return nil, errors.New("--image-credential-provider-bin-dir without --image-credential-provider-config: give the config file too")
	}
	return c, nil
}

// Close stops watching the service account.
func (c *Chain) Close() {
	if c != nil && c.sa != nil {
		c.sa.close()
	}
}

// Pull is what one publish pulls with.
type Pull struct {
	// Keychain holds the credentials found for the image's registry, and
	// nothing for any other host (a mirror of it, another registry): the
	// layer cache asks it for each place it fetches from. Nil pulls
	// anonymously.
	Keychain authn.Keychain
	// From names the source of the credentials ("the volume's node-publish
	// secret", "service account secret NAME", "credential provider NAME");
	// empty when anonymous. It never holds a secret.
	From string

	image image
	// tried says, for each source, why it gave nothing.
	tried []string
	// denied names the pull secrets of the pod's ServiceAccount that the
	// account may not read, and so were not used.
	denied []string
}

// For returns the credentials for the image ref, from the first source that
// has an entry matching its registry. secrets are the request's secrets
// (the volume's node-publish secret), possibly none; pod is the pod the
// publish is for (the zero Pod for none). An error means a source is
// unusable in a way the operator must fix (a node-publish secret that is
// not a docker config), not that nothing matched.
func (c *Chain) For(ctx context.Context, ref string, secrets map[string]string, pod Pod) (Pull, error) {
	im, err := parseImage(ref)
	if err != nil {
		return Pull{}, fmt.Errorf("%w %v", layercache.ErrInvalidReference, err)
	}
	p := Pull{image: im}
	a, ok, why, err := volumeSecret(im, secrets)
	if err != nil {
		return Pull{}, err
	}
	if ok {
		return p.with(a)
	}
	p.tried = append(p.tried, why)

	acct := &podAccount{kube: c.kube, pod: pod}
	ran := 0 // providers whose matchImages matched
	sources := []func() (auth, bool, string){
		func() (auth, bool, string) { return c.fromPodSecrets(ctx, im, acct, &p) },
		func() (auth, bool, string) { return c.fromProviders(ctx, im, c.tokenProviders, acct, &ran) },
		func() (auth, bool, string) { return c.fromDriverAccount(ctx, im) },
		func() (auth, bool, string) {
			a, ok, why := c.fromProviders(ctx, im, c.providers, nil, &ran)
			if !ok && ran == 0 {
				why = "no credential provider matches it"
				if len(c.providers)+len(c.tokenProviders) == 0 {
					why = "no credential provider is configured"
				}
			}
			return a, ok, why
		},
	}
	for _, source := range sources {
		a, ok, why := source()
		if ok {
			return p.with(a)
		}
		if why != "" {
			p.tried = append(p.tried, why)
		}
	}
	return p, nil
}

// fromPodSecrets is the pod's ServiceAccount's imagePullSecrets source;
// silent when pod identity is off.
func (c *Chain) fromPodSecrets(ctx context.Context, im image, acct *podAccount, p *Pull) (auth, bool, string) {
	switch {
	case !c.podIdentity:
		return auth{}, false, ""
	case !acct.pod.known():
		return auth{}, false, "no pod service account is known for this pull (kubelet names it when the CSIDriver sets podInfoOnMount)"
	case c.podSecrets == nil:
		return auth{}, false, fmt.Sprintf("the pod's service account %s cannot be read: %v", acct.pod.account(), errNoAPI)
	}
	a, ok, why, denied := c.podSecrets.lookup(ctx, im, acct)
	p.denied = append(p.denied, denied...)
	return a, ok, why
}

// fromDriverAccount is the configured ServiceAccount's source.
func (c *Chain) fromDriverAccount(ctx context.Context, im image) (auth, bool, string) {
	if c.sa == nil {
		return auth{}, false, c.saOff
	}
	return c.sa.lookup(ctx, im)
}

// volumeSecret looks for im's registry in the node-publish secret.
func volumeSecret(im image, secrets map[string]string) (auth, bool, string, error) {
	if len(secrets) == 0 {
		return auth{}, false, "the volume has no nodePublishSecretRef", nil
	}
	const from = "the volume's node-publish secret"
	ring := &keyring{}
	var err error
	switch {
	case secrets[dockerConfigJSONKey] != "":
		err = ring.addDockerConfig([]byte(secrets[dockerConfigJSONKey]), false, from)
	case secrets[dockerCfgKey] != "":
		err = ring.addDockerConfig([]byte(secrets[dockerCfgKey]), true, from)
	default:
		return auth{}, false, fmt.Sprintf("%s has no %s key (it must be of type kubernetes.io/dockerconfigjson)", from, dockerConfigJSONKey), nil
	}
	if err != nil {
		// Refused, as the registry would refuse garbage: PermissionDenied.
		return auth{}, false, "", fmt.Errorf("%w: %s is not usable: %v", layercache.ErrUnauthorized, from, err)
	}
	if a, ok := ring.lookup(im); ok {
		return a, true, "", nil
	}
	return auth{}, false, fmt.Sprintf("%s has no entry for %s", from, im.host), nil
}

// fromProviders asks, in the config's order, each of ps whose matchImages
// match im; ran counts them. Providers with tokenAttributes are given the
// pod's token (acct). A provider that fails is logged and skipped, as
// kubelet does, so that a public image still pulls; its error is kept for
// the message should the registry refuse. The reason is empty when no
// provider of ps matches.
func (c *Chain) fromProviders(ctx context.Context, im image, ps []*provider, acct *podAccount, ran *int) (auth, bool, string) {
	var notes []string
	for _, p := range ps {
		if !p.matches(im) {
			continue
		}
		*ran++
		var id podToken
		if p.tokens != nil {
			var skip string
			var err error
			if id, skip, err = tokenFor(ctx, p, acct); err != nil {
				klog.FromContext(ctx).Error(err, "Credential provider not run", "provider", p.name, "image", im.ref)
				notes = append(notes, err.Error())
				continue
			} else if skip != "" {
				klog.FromContext(ctx).V(4).Info("Credential provider not run", "provider", p.name, "image", im.ref, "reason", skip)
				notes = append(notes, skip)
				continue
			}
		}
		ring, err := p.keyring(ctx, im, id)
		if err != nil {
			klog.FromContext(ctx).Error(err, "Credential provider failed", "provider", p.name, "image", im.ref)
			notes = append(notes, err.Error())
			continue
		}
		if a, ok := ring.lookup(im); ok {
			return a, true, ""
		}
		notes = append(notes, fmt.Sprintf("credential provider %s returned no credentials for it", p.name))
	}
	return auth{}, false, strings.Join(notes, ", ")
}

// with sets p's credentials to a, for the image's registry alone.
func (p Pull) with(a auth) (Pull, error) {
	// denied stays: a secret the pod may not read explains a refusal of
	// the credentials that came after it.
	p.Keychain, p.From, p.tried = dockerconfig.ForRegistries(a, p.image.registry), a.From, nil
	return p, nil
}

// Explain returns err, and when the registry refused access
// (layercache.ErrUnauthorized), an error that also says which source
// supplied the refused credentials, or which sources were tried and had
// none. The result still wraps err, so the gRPC code is chosen where it
// always is.
func (p Pull) Explain(err error) error {
	if err == nil || !errors.Is(err, layercache.ErrUnauthorized) {
		return err
	}
	var detail string
	if p.From != "" {
		detail = fmt.Sprintf("it refused the credentials from %s: check them", p.From)
	} else {
		detail = fmt.Sprintf("no credentials for %s: %s", p.image.host, listing(p.tried))
	}
	if p.From != "" && len(p.denied) > 0 {
		// Without credentials, tried names the denied secrets already.
		detail += fmt.Sprintf("; not used: the pod's service account may not get its pull secret %s: "+
			"grant it get on the secret with a Role and RoleBinding", strings.Join(p.denied, ", "))
	}
	return &refusedError{image: p.image.ref, detail: detail, err: err}
}

// refusedError is a refusal by the registry, with what the chain knows.
type refusedError struct {
	image, detail string
	err           error
}

func (e *refusedError) Error() string {
	// What to do first, then what the registry or the cache said.
	cause := strings.TrimPrefix(e.err.Error(), layercache.ErrUnauthorized.Error()+": ")
	return fmt.Sprintf("registry refused access to %s: %s; details: %s", e.image, e.detail, cause)
}

func (e *refusedError) Unwrap() error { return e.err }

// listing joins reasons as "a, b, and c".
func listing(items []string) string {
	switch len(items) {
	case 0:
		return "no source of credentials"
	case 1:
		return items[0]
	case 2:
		return items[0] + ", and " + items[1]
	}
	return strings.Join(items[:len(items)-1], ", ") + ", and " + items[len(items)-1]
}

// metaFor is the TypeMeta of a kubelet credential provider message.
func metaFor(apiVersion, kind string) metav1.TypeMeta {
	return metav1.TypeMeta{APIVersion: apiVersion, Kind: kind}
}
