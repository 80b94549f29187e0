// Package credentials decides which pull credentials an image gets. It has
// one job: given the image of a publish and the volume's node-publish
// secret, walk the chain of sources in order and return the first
// credentials that match the image's registry:
//
//  1. the volume's node-publish secret (kubernetes.io/dockerconfigjson,
//     passed by kubelet in the request's secrets);
//  2. the imagePullSecrets of a configured ServiceAccount, read through
//     informers (so a publish reads memory, and a changed or newly attached
//     secret applies without a restart);
//  3. kubelet credential provider exec plugins, configured with kubelet's own
//     CredentialProviderConfig file and protocol, so that the ECR, GCR and
//     ACR providers work unchanged.
//
// When none matches, the pull is anonymous. When the registry refuses the
// pull, Pull.Explain turns the error into one that says what was tried and
// what is missing, or which source supplied the refused credentials.
package credentials

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"

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
}

// Chain finds the credentials for an image. It is safe for concurrent use.
type Chain struct {
	sa        *serviceAccount // nil: off
	saOff     string          // why the service account source is off
	providers []*provider
}

// New checks cfg, loads the credential providers and starts watching the
// service account. Close stops the watches.
func New(cfg Config) (*Chain, error) {
	c := &Chain{}
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
		ps, err := loadProviders(cfg.ProviderConfig, cfg.ProviderBinDir, cfg.ProviderTimeout)
		if err != nil {
			c.Close()
			return nil, err
		}
		c.providers = ps
		for _, p := range ps {
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
	// Credentials for the layer cache; nil pulls anonymously.
	Credentials *layercache.Credentials
	// From names the source of the credentials ("the volume's node-publish
	// secret", "service account secret NAME", "credential provider NAME");
	// empty when anonymous. It never holds a secret.
	From string

	image image
	// tried says, for each source, why it gave nothing.
	tried []string
}

// For returns the credentials for the image ref, from the first source that
// has an entry matching its registry. secrets are the request's secrets
// (the volume's node-publish secret), possibly none. An error means a
// source is unusable in a way the operator must fix (a node-publish secret
// that is not a docker config), not that nothing matched.
func (c *Chain) For(ctx context.Context, ref string, secrets map[string]string) (Pull, error) {
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

	if c.sa == nil {
		p.tried = append(p.tried, c.saOff)
	} else if a, ok, why := c.sa.lookup(ctx, im); ok {
		return p.with(a)
	} else {
		p.tried = append(p.tried, why)
	}

	a, ok, why = c.fromProviders(ctx, im)
	if ok {
		return p.with(a)
	}
	p.tried = append(p.tried, why)
	return p, nil
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

// fromProviders asks, in the config's order, each provider whose
// matchImages match im. A provider that fails is logged and skipped, as
// kubelet does, so that a public image still pulls; its error is kept for
// the message should the registry refuse.
func (c *Chain) fromProviders(ctx context.Context, im image) (auth, bool, string) {
	if len(c.providers) == 0 {
		return auth{}, false, "no credential provider is configured"
	}
	var notes []string
	for _, p := range c.providers {
		if !p.matches(im) {
			continue
		}
		ring, err := p.keyring(ctx, im)
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
	if len(notes) == 0 {
		return auth{}, false, "no credential provider matches it"
	}
	return auth{}, false, strings.Join(notes, ", ")
}

// with sets p's credentials to a, as a docker config of one entry for the
// image's registry (the form that carries an identity token too).
func (p Pull) with(a auth) (Pull, error) {
	cfg := map[string]map[string]dockerConfigEntry{"auths": {p.image.registry: {
		Username: a.Username, Password: a.Password, IdentityToken: a.IdentityToken,
	}}}
	data, err := json.Marshal(cfg)
	if err != nil {
		return Pull{}, err
	}
	p.Credentials, p.From, p.tried = &layercache.Credentials{DockerConfigJSON: data}, a.from, nil
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
	return &refusedError{image: p.image.ref, detail: detail, err: err}
}

// refusedError is a refusal by the registry, with what the chain knows.
type refusedError struct {
	image, detail string
	err           error
}

func (e *refusedError) Error() string {
	cause := strings.TrimPrefix(e.err.Error(), layercache.ErrUnauthorized.Error()+": ")
	return fmt.Sprintf("registry refused access to %s (%s): %s", e.image, cause, e.detail)
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
