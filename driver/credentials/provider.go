package credentials

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sync/singleflight"
	"k8s.io/klog/v2"
	configv1 "k8s.io/kubelet/config/v1"
	providerv1 "k8s.io/kubelet/pkg/apis/credentialprovider/v1"
	"sigs.k8s.io/yaml"

	"github.com/strata-csi/strata/driver/credentials/dockerconfig"
)

// DefaultProviderTimeout bounds one run of a credential provider plugin.
// kubelet allows a minute; so does Strata, so that a provider that works
// for kubelet (ECR, GCR, ACR) works here. A cold publish still has the rest
// of kubelet's call deadline, and a pull that outlives it continues in the
// background.
const DefaultProviderTimeout = time.Minute

// Kinds and versions of kubelet's credential provider files and messages.
const (
	configKind      = "CredentialProviderConfig"
	requestKind     = "CredentialProviderRequest"
	responseKind    = "CredentialProviderResponse"
	globalCacheKey  = "<global>"
	maxResponseSize = 1 << 20
	maxStderrShown  = 1 << 10
)

// configVersions are the CredentialProviderConfig versions accepted: v1 and
// its identical predecessor v1beta1.
var configVersions = map[string]bool{
	configv1.SchemeGroupVersion.String(): true,
	"kubelet.config.k8s.io/v1beta1":      true,
}

// provider is one kubelet credential provider exec plugin, with the cache of
// its answers.
type provider struct {
	name        string
	matchImages []string
	defaultTTL  time.Duration
	apiVersion  string
	bin         string
	args, env   []string
	timeout     time.Duration

	// tokens is the provider's tokenAttributes: it takes the pod's
	// ServiceAccount token for an audience (KEP-4412). nil: a plain provider.
	tokens *configv1.ServiceAccountTokenAttributes

	// exec runs the plugin (run; replaced in unit tests); now is the clock.
	exec func(ctx context.Context, im image, id podToken) (*providerv1.CredentialProviderResponse, error)
	now  func() time.Time

	mu    sync.Mutex
	cache map[string]cachedAuth
	group singleflight.Group
}

// cachedAuth is a plugin's answer, kept until expires.
type cachedAuth struct {
	ring    *keyring
	expires time.Time
}

// loadProviders reads a kubelet CredentialProviderConfig file (YAML or
// JSON) and checks it as kubelet does; every provider's executable must be
// in binDir. Providers with tokenAttributes are accepted only with
// podIdentity.
func loadProviders(path, binDir string, timeout time.Duration, podIdentity bool) ([]*provider, error) {
	if binDir == "" {
		return nil, fmt.Errorf("credential provider config %s needs the plugins' directory (--image-credential-provider-bin-dir)", path)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read credential provider config: %w", err)
	}
	var cfg configv1.CredentialProviderConfig
	if err := yaml.UnmarshalStrict(data, &cfg); err != nil {
		return nil, fmt.Errorf("credential provider config %s: %w", path, err)
	}
	if !configVersions[cfg.APIVersion] || cfg.Kind != configKind {
		return nil, fmt.Errorf("credential provider config %s is %s %s: want kind %s, apiVersion %s (kubelet's format)",
			path, cfg.APIVersion, cfg.Kind, configKind, configv1.SchemeGroupVersion)
	}
	if len(cfg.Providers) == 0 {
		return nil, fmt.Errorf("credential provider config %s lists no providers", path)
	}
	if timeout <= 0 {
		timeout = DefaultProviderTimeout
	}
	seen := map[string]bool{}
	var out []*provider
	for i, c := range cfg.Providers {
		if err := checkProvider(c, seen, podIdentity); err != nil {
			return nil, fmt.Errorf("credential provider config %s: providers[%d]: %w", path, i, err)
		}
		bin := filepath.Join(binDir, c.Name)
		if st, err := os.Stat(bin); err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
			return nil, fmt.Errorf("credential provider %s: no executable %s: put the plugin in --image-credential-provider-bin-dir", c.Name, bin)
		}
		p := &provider{
			name: c.Name, matchImages: c.MatchImages, defaultTTL: c.DefaultCacheDuration.Duration,
			apiVersion: c.APIVersion, bin: bin, args: c.Args, timeout: timeout, tokens: c.TokenAttributes,
			now: time.Now, cache: map[string]cachedAuth{},
		}
		for _, e := range c.Env {
			p.env = append(p.env, e.Name+"="+e.Value)
		}
		p.exec = p.run
		out = append(out, p)
	}
	return out, nil
}

// checkProvider applies kubelet's validation to one provider entry.
func checkProvider(c configv1.CredentialProvider, seen map[string]bool, podIdentity bool) error {
	switch {
	case c.Name == "" || c.Name == "." || c.Name == ".." || strings.ContainsAny(c.Name, "/ "):
		return fmt.Errorf("name %q: give the executable's file name", c.Name)
	case seen[c.Name]:
		return fmt.Errorf("name %q is listed twice", c.Name)
	case c.APIVersion != providerv1.SchemeGroupVersion.String():
		return fmt.Errorf("provider %s: apiVersion %q: Strata speaks %s", c.Name, c.APIVersion, providerv1.SchemeGroupVersion)
	case len(c.MatchImages) == 0:
		return fmt.Errorf("provider %s: matchImages is empty", c.Name)
	case c.DefaultCacheDuration == nil || c.DefaultCacheDuration.Duration < 0:
		return fmt.Errorf("provider %s: defaultCacheDuration is required and must not be negative", c.Name)
	case c.TokenAttributes != nil && !podIdentity:
		// The token is the pod's: kubelet passes it only when the CSIDriver
		// asks for it (tokenRequests), which pod identity turns on.
		return fmt.Errorf("provider %s: tokenAttributes (the pod's service account token) need pod identity: "+
			"start the plugin with --pod-identity (chart: podIdentity.enabled=true, with the provider's serviceAccountTokenAudience in podIdentity.audiences)", c.Name)
	}
	for _, m := range c.MatchImages {
		if err := dockerconfig.CheckPattern(m); err != nil {
			return fmt.Errorf("provider %s: matchImages %q: %v", c.Name, m, err)
		}
	}
	if c.TokenAttributes != nil {
		if err := checkTokenAttributes(*c.TokenAttributes); err != nil {
			return fmt.Errorf("provider %s: tokenAttributes: %w", c.Name, err)
		}
	}
	seen[c.Name] = true
	return nil
}

// matches reports whether the provider handles im (matchImages).
func (p *provider) matches(im image) bool {
	for _, m := range p.matchImages {
		if matchImage(m, im.repo) {
			return true
		}
	}
	return false
}

// keyring returns the provider's credentials for im: cached, or from a
// run of the plugin that concurrent callers for the same image share. The
// run is bounded by the provider's timeout, not by ctx, so that a caller
// that gives up does not fail the others; ctx only ends this caller's wait.
//
// For a provider that takes tokens, id is the pod's: the answer is cached
// under id.cacheKey too, so that it never serves another identity, and
// concurrent callers share a run only when they bring the same token.
func (p *provider) keyring(ctx context.Context, im image, id podToken) (*keyring, error) {
	if ring, ok := p.cached(im, id.cacheKey); ok {
		return ring, nil
	}
	ch := p.group.DoChan(im.repo+"\x00"+id.flightKey, func() (any, error) { return p.fetch(im, id) })
	select {
	case r := <-ch:
		if r.Err != nil {
			return nil, r.Err
		}
		return r.Val.(*keyring), nil
	case <-ctx.Done():
		return nil, fmt.Errorf("credential provider %s: %w", p.name, ctx.Err())
	}
}

// cacheKeys are the keys an answer for im may be cached under, most
// specific first, as kubelet looks them up.
func cacheKeys(im image) []string { return []string{im.repo, im.host, globalCacheKey} }

// withIdentity adds the identity dimension (podToken.cacheKey) to a cache
// key, as kubelet's generateCacheKey does.
func withIdentity(key, identity string) string {
	if identity == "" {
		return key
	}
	return key + "\x00" + identity
}

// cached returns an unexpired cached answer for im and the identity.
func (p *provider) cached(im image, identity string) (*keyring, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.now()
	for _, base := range cacheKeys(im) {
		k := withIdentity(base, identity)
		if e, ok := p.cache[k]; ok {
			if now.Before(e.expires) {
				return e.ring, true
			}
			delete(p.cache, k)
		}
	}
	return nil, false
}

// fetch runs the plugin for im and caches its answer as it asks.
func (p *provider) fetch(im image, id podToken) (*keyring, error) {
	ctx, cancel := context.WithTimeout(context.Background(), p.timeout)
	defer cancel()
	resp, err := p.exec(ctx, im, id)
	if err != nil {
		return nil, err
	}
	if err := p.checkEcho(resp, id); err != nil {
		return nil, err
	}
	var key string
	switch resp.CacheKeyType {
	case providerv1.ImagePluginCacheKeyType:
		key = im.repo
	case providerv1.RegistryPluginCacheKeyType:
		key = im.host
	case providerv1.GlobalPluginCacheKeyType:
		key = globalCacheKey
	default:
		// kubelet does not use such an answer either.
		return nil, fmt.Errorf("credential provider %s answered with cacheKeyType %q: want Image, Registry or Global", p.name, resp.CacheKeyType)
	}
	ring := &keyring{}
	for pattern, a := range resp.Auth {
		ring.add(pattern, auth{Username: a.Username, Password: a.Password, From: "credential provider " + p.name})
	}
	ttl := p.defaultTTL
	if resp.CacheDuration != nil {
		ttl = resp.CacheDuration.Duration
	}
	if ttl > 0 {
		p.mu.Lock()
		p.cache[withIdentity(key, id.cacheKey)] = cachedAuth{ring: ring, expires: p.now().Add(ttl)}
		p.mu.Unlock()
	}
	klog.V(4).InfoS("Credential provider answered", "provider", p.name, "image", im.repo, "keys", ring.len(),
		"cacheKeyType", resp.CacheKeyType, "cacheDuration", ttl, "withToken", id.token != "")
	return ring, nil
}

// run executes the plugin as kubelet does: a CredentialProviderRequest on
// stdin, a CredentialProviderResponse of the same apiVersion on stdout, the
// host's environment plus the configured env. The plugin runs in its own
// process group, all of which is killed at the timeout.
func (p *provider) run(ctx context.Context, im image, id podToken) (*providerv1.CredentialProviderResponse, error) {
	req, err := json.Marshal(providerv1.CredentialProviderRequest{
		TypeMeta: metaFor(p.apiVersion, requestKind), Image: im.repo,
		ServiceAccountToken: id.token, ServiceAccountAnnotations: id.annotations,
	})
	if err != nil {
		return nil, err
	}
	var stdout, stderr limitedBuffer
	stdout.max, stderr.max = maxResponseSize, maxStderrShown
	cmd := exec.CommandContext(ctx, p.bin, p.args...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = bytes.NewReader(req), &stdout, &stderr
	cmd.Env = append(os.Environ(), p.env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = time.Second // a grandchild holding stdout open does not hold us
	start := time.Now()
	err = cmd.Run()
	switch {
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		return nil, fmt.Errorf("credential provider %s did not answer within %s for %s", p.name, p.timeout, im.repo)
	case err != nil:
		// A plugin may quote its request: the token never reaches a message.
		return nil, fmt.Errorf("credential provider %s failed for %s: %v%s", p.name, im.repo, err, stderrNote(id.redact(stderr.String())))
	case stdout.overflow:
		return nil, fmt.Errorf("credential provider %s wrote more than %d bytes", p.name, maxResponseSize)
	}
	dec := json.NewDecoder(bytes.NewReader(stdout.Bytes()))
	dec.DisallowUnknownFields()
	var resp providerv1.CredentialProviderResponse
	if err := dec.Decode(&resp); err != nil {
		return nil, fmt.Errorf("credential provider %s wrote no valid %s: %v", p.name, responseKind, err)
	}
	if resp.APIVersion != p.apiVersion || resp.Kind != responseKind {
		return nil, fmt.Errorf("credential provider %s answered with %s %s: want kind %s, apiVersion %s",
			p.name, resp.APIVersion, resp.Kind, responseKind, p.apiVersion)
	}
	klog.V(5).InfoS("Ran credential provider", "provider", p.name, "image", im.repo, "duration", time.Since(start).Round(time.Millisecond))
	return &resp, nil
}

// stderrNote quotes what a failed plugin said, if anything.
func stderrNote(s string) string {
	s = strings.TrimSpace(s)
	if s == "" {
		return ""
	}
	return ": " + s
}

// limitedBuffer keeps the first max bytes written to it.
type limitedBuffer struct {
	bytes.Buffer
	max      int
	overflow bool
}

func (b *limitedBuffer) Write(p []byte) (int, error) {
	if room := b.max - b.Len(); len(p) > room {
		b.overflow = true
		if room > 0 {
			b.Buffer.Write(p[:room])
		}
		return len(p), nil
	}
	return b.Buffer.Write(p)
}

var _ io.Writer = (*limitedBuffer)(nil)
