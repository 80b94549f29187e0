package layercache

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"syscall"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"k8s.io/klog/v2"
)

// An image on registry R is fetched from R's mirrors, in the order the
// registry config lists them, then from R itself: each request (a manifest
// by tag or digest, a config, a layer) goes to the first mirror, and on to
// the next place when that one cannot be reached, sends no answer in time,
// refuses the credentials, lacks the content (404), fails (5xx), or sends
// content that does not match its digest. The registry's own error is the
// one returned. Mirrors are asked once each (a mirror that fails has a
// fallback); the registry with the store's retry policy.
//
// The mirror path costs what the direct path costs: the first mirror is
// pinged once per pull, as the registry would be, and when it answers nothing
// else is contacted.

// endpoint is one place an image's repository is served from: a mirror, or
// the registry itself.
type endpoint struct {
	repo   name.Repository // the same repository path, on this host
	mirror bool

	mu sync.Mutex
	c  *client // connected (pinged, token fetched), shared by the pull's requests
	// err is why a mirror could not be connected to: it is not asked again
	// during this pull, so a mirror that is down costs one failure, not one
	// per layer.
	err error
}

func (ep *endpoint) host() string { return ep.repo.RegistryStr() }

// attempts is how often one request is tried at this endpoint.
func (ep *endpoint) attempts(s *Store) int {
	if ep.mirror {
		return 1
	}
	return s.opts.retryAttempts
}

// authenticator picks the caller's credentials for this endpoint: what kc
// resolves for the endpoint's repository, on the endpoint's own host. A
// mirror thus gets only what the keychain holds for the mirror's host, never
// the registry's credentials. A nil keychain is anonymous.
func (ep *endpoint) authenticator(kc authn.Keychain) (authn.Authenticator, error) {
	if kc == nil {
		return authn.Anonymous, nil
	}
	auth, err := kc.Resolve(ep.repo)
	if err != nil {
		return nil, fmt.Errorf("%w: credentials for %s: %v", ErrUnauthorized, ep.repo.Name(), err)
	}
	return auth, nil
}

// accessKey is what an access record notes when this endpoint served an
// image to the credentials kc holds for it: a hash of those credentials and
// the host, or "anonymous" (the registry) or "anonymous:<mirror>" (a mirror)
// when there were none.
func (ep *endpoint) accessKey(kc authn.Keychain) (string, error) {
	auth, err := ep.authenticator(kc)
	if err != nil {
		return "", err
	}
	anon := anonymous
	if ep.mirror {
		anon = mirrorAnonymous(ep.host())
	}
	return authKey(auth, ep.host(), anon)
}

// mirrorAnonymous is the access key of an image that a mirror served
// without credentials.
func mirrorAnonymous(host string) string { return anonymous + ":" + host }

// authKey hashes the credentials auth holds for host, or returns anon. The
// fields hashed, and their order, are those of the access records already on
// disk: changing them would make every cached private image ask its registry
// again, and fail offline under the pull policy Never.
func authKey(auth authn.Authenticator, host, anon string) (string, error) {
	if auth == authn.Anonymous {
		return anon, nil
	}
	cfg, err := auth.Authorization()
	if err != nil {
		return "", fmt.Errorf("%w: %v", ErrUnauthorized, err)
	}
	if *cfg == (authn.AuthConfig{}) {
		return anon, nil
	}
	b, err := json.Marshal([]string{host, cfg.Username, cfg.Password, cfg.Auth, cfg.IdentityToken, cfg.RegistryToken})
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:]), nil
}

// source fetches from one repository through its registry's mirrors and
// then the registry. One source serves one pull (a Resolve or an Ensure).
type source struct {
	s     *Store
	hosts *hosts
	kc    authn.Keychain // nil: anonymous
	eps   []*endpoint    // the mirrors in order, then the registry
}

// newSource lists where repo can be fetched from under the view h.
func (s *Store) newSource(h *hosts, repo name.Repository, kc authn.Keychain) *source {
	src := &source{s: s, hosts: h, kc: kc}
	for _, m := range h.mirrors(repo.RegistryStr()) {
		reg, err := h.registry(m)
		if err != nil {
			// registryconf validated the host; this cannot happen.
			klog.ErrorS(err, "Skipping a malformed mirror", "registry", repo.RegistryStr(), "mirror", m)
			continue
		}
		src.eps = append(src.eps, &endpoint{repo: reg.Repo(repo.RepositoryStr()), mirror: true})
	}
	src.eps = append(src.eps, &endpoint{repo: repo})
	return src
}

// registry is the source's last endpoint, the registry itself.
func (src *source) registry() *endpoint { return src.eps[len(src.eps)-1] }

// client connects to ep once per source; later requests share the client.
func (src *source) client(ctx context.Context, ep *endpoint) (*client, error) {
	ep.mu.Lock()
	defer ep.mu.Unlock()
	if ep.c != nil {
		return ep.c, nil
	}
	if ep.err != nil {
		return nil, ep.err
	}
	var c *client
	err := src.s.retryN(ctx, "connect to "+ep.host(), ep.attempts(src.s), func() (err error) {
		c, err = src.s.clientFor(ctx, src.hosts, ep, src.kc)
		return err
	})
	if err != nil {
		if ep.mirror && ctx.Err() == nil {
			ep.err = err
		}
		return nil, err
	}
	ep.c = c
	return c, nil
}

// connect makes sure that some endpoint can be talked to, the first that
// answers, so that a registry refusing the credentials fails a pull once,
// before its layers are fetched.
func (src *source) connect(ctx context.Context) error {
	for _, ep := range src.eps {
		_, err := src.client(ctx, ep)
		if err == nil || !src.fallBack(ctx, ep, "connect", err) {
			return err
		}
	}
	return nil // not reached: the registry's error is returned above
}

// do runs op at each endpoint in turn until one succeeds, and returns that
// endpoint. op gets the number of attempts it may make at the endpoint.
func (src *source) do(ctx context.Context, what string, op func(c *client, attempts int) error) (*endpoint, error) {
	for _, ep := range src.eps {
		c, err := src.client(ctx, ep)
		if err == nil {
			if err = op(c, ep.attempts(src.s)); err == nil {
				return ep, nil
			}
		}
		if !src.fallBack(ctx, ep, what, err) {
			return nil, err
		}
	}
	return nil, errors.New("no registry to fetch from") // not reached
}

// fallBack reports whether the failure err at ep leaves another endpoint to
// try: ep is a mirror, the caller still waits, and the failure is not the
// node's own (a full disk fails at every endpoint alike).
func (src *source) fallBack(ctx context.Context, ep *endpoint, what string, err error) bool {
	if !ep.mirror || ctx.Err() != nil || nodeError(err) {
		return false
	}
	klog.V(2).InfoS("Mirror failed; trying the next one or the registry", "what", what, "mirror", ep.host(),
		"registry", src.registry().host(), "err", err)
	return true
}

// nodeErrors are failures of the node's disk or resources, not of the blob
// or of the registry.
var nodeErrors = []syscall.Errno{syscall.ENOSPC, syscall.EDQUOT, syscall.EIO, syscall.EROFS, syscall.ENOMEM, syscall.EMFILE, syscall.ENFILE}

func nodeError(err error) bool {
	for _, e := range nodeErrors {
		if errors.Is(err, e) {
			return true
		}
	}
	return errors.Is(err, ErrNoSpace)
}
