package layercache

import (
	"context"
	"net/http"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// This file lends the store's registry rules to code that talks to
// registries with go-containerregistry's remote package directly, such as a
// push (package commit): the store itself only pulls.

// ParseReference parses ref as the store reaches it: loopback registries
// and the registries configured as insecure are reached over plain HTTP,
// every other one over HTTPS. An unparsable ref wraps ErrInvalidReference.
func (s *Store) ParseReference(ref string) (name.Reference, error) {
	return parseReference(s.reg.refresh(), ref)
}

// RemoteOptions returns the remote.Options that reach registries as the
// store does: plain HTTP only for loopback and insecure registries (never
// go-containerregistry's default of plain HTTP for private-range addresses),
// the per-host TLS settings of the registry config, the store's user agent,
// and what kc resolves for each repository (nil: anonymous). Mirrors are not used: they
// serve pulls, and a push goes to the registry itself.
//
// wrap, if not nil, wraps the HTTP transport, for example to count the bytes
// sent.
func (s *Store) RemoteOptions(ctx context.Context, kc authn.Keychain, wrap func(http.RoundTripper) http.RoundTripper) []remote.Option {
	h := s.reg.refresh()
	var rt http.RoundTripper = &httpsOnly{next: h, insecure: h.insecure, tlsHosts: h.tlsHosts}
	if wrap != nil {
		rt = wrap(rt)
	}
	auth := remote.WithAuth(authn.Anonymous)
	if kc != nil {
		auth = remote.WithAuthFromKeychain(kc)
	}
	return []remote.Option{
		remote.WithContext(ctx),
		remote.WithTransport(rt),
		remote.WithUserAgent(s.opts.userAgent),
		auth,
	}
}

// ClassifyRegistryError wraps an error from a registry request with the
// sentinel (ErrNotFound, ErrUnauthorized, ErrUnavailable, ...) that tells
// the caller what to do, and with what, a description of the request.
func ClassifyRegistryError(err error, what string) error { return classify(err, what) }

// WorkDir returns this process's private directory under the store's tmp/:
// files there are on the store's filesystem, and are removed by Close or,
// after a crash, by the next Open.
func (s *Store) WorkDir() string { return s.work }
