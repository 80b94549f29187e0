package layercache

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"k8s.io/klog/v2"
)

// A registry counts every manifest GET as a pull, and some allow an
// address only so many (Docker Hub's anonymous limit): a node is one
// address, and a Deployment of a hundred replicas of one dataset must not
// spend them a hundred times. So the resolutions of a reference that are at
// the registry at the same time, with the same credentials, are one
// request; and a tag that the cache knows is confirmed by HEAD, which
// registries do not count, under PullAlways.

// resolving is one resolution at the registry in flight.
type resolving struct {
	done chan struct{}
	img  *Image
	err  error
}

// tagGather is how long a confirmation of a tag (PullAlways) waits before
// it asks, for the other publishes of its wave to join it: a Deployment's
// replicas arrive over some milliseconds. Every caller that joins asked
// before the registry answered, so the answer is as fresh as its own
// request would have been.
const tagGather = 50 * time.Millisecond

// resolveShared resolves ref at the registry (or its mirrors) once for the
// callers that ask for it at the same time with the same credentials. A
// caller with other credentials asks on its own: what a registry answers
// one tenant proves nothing for another. A caller whose wait outlives the
// call that asked (kubelet's deadline) asks again itself.
func (s *Store) resolveShared(ctx context.Context, h *hosts, ref string, r name.Reference, kc authn.Keychain, policy PullPolicy) (*Image, error) {
	key, err := s.resolveKey(h, r, kc, policy)
	if err != nil {
		return nil, err
	}
	for {
		s.mu.Lock()
		f, ok := s.resolving[key]
		if !ok {
			f = &resolving{done: make(chan struct{})}
			s.resolving[key] = f
			s.mu.Unlock()
			return s.resolveFor(ctx, f, key, h, ref, r, kc, policy)
		}
		s.mu.Unlock()
		select {
		case <-f.done:
		case <-ctx.Done():
			return nil, fmt.Errorf("resolve %s: %w", ref, ctx.Err())
		}
		if askAgain(ctx, f.err) {
			continue
		}
		if f.err != nil {
			return nil, f.err
		}
		img := *f.img // the Ref as this caller gave it; Layers and Files are shared, never modified
		img.Ref = ref
		return &img, nil
	}
}

// resolveFor resolves for the flight f, and ends it.
func (s *Store) resolveFor(ctx context.Context, f *resolving, key string, h *hosts, ref string, r name.Reference, kc authn.Keychain, policy PullPolicy) (img *Image, err error) {
	defer func() {
		s.mu.Lock()
		delete(s.resolving, key)
		f.img, f.err = img, err
		s.mu.Unlock()
		close(f.done)
	}()
	if policy == PullAlways && !isDigest(r) {
		select {
		case <-time.After(tagGather):
		case <-ctx.Done():
			return nil, fmt.Errorf("resolve %s: %w", ref, ctx.Err())
		}
		img, err := s.confirmTag(ctx, h, ref, r, kc)
		if err != nil || img != nil {
			return img, err
		}
	}
	return s.resolveRemote(ctx, h, ref, r, kc)
}

// resolveKey identifies the resolutions that one request can answer: of
// the same reference, under the same policy, with the same credentials at
// each of its endpoints (the registry and its mirrors).
func (s *Store) resolveKey(h *hosts, r name.Reference, kc authn.Keychain, policy PullPolicy) (string, error) {
	parts := []string{r.Name(), string(policy)}
	for _, ep := range s.newSource(h, r.Context(), kc).eps {
		key, err := ep.accessKey(kc)
		if err != nil {
			return "", err
		}
		parts = append(parts, key)
	}
	return strings.Join(parts, " "), nil
}

// confirmTag checks a tag whose resolution is cached with a HEAD of its
// manifest: if the registry names the digest the tag resolved to before,
// the cached image is used (its access checked as any cached image's), and
// nothing is downloaded. It returns nil, nil when the tag moved, is not
// cached, or the registry's HEAD gives no digest: then the manifest is
// fetched. The answer is trusted only to say "unchanged": the image used is
// what this same repository served for the tag before.
func (s *Store) confirmTag(ctx context.Context, h *hosts, ref string, r name.Reference, kc authn.Keychain) (*Image, error) {
	var rec imageRecord
	if err := readJSON(s.imageRefPath(r.Name()), &rec); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nil
		}
		return nil, err
	}
	var d v1.Hash
	src := s.newSource(h, r.Context(), kc)
	_, err := src.do(ctx, "check tag "+ref, func(c *client, attempts int) error {
		return s.retryN(ctx, "check tag "+ref, attempts, func() (err error) {
			d, err = c.headManifest(ctx, r.Identifier())
			return err
		})
	})
	switch {
	case err != nil && (errors.Is(err, ErrUnavailable) || ctx.Err() != nil):
		return nil, err
	case err != nil:
		// A registry that refuses HEAD, or its answer: the GET tells.
		klog.V(2).InfoS("Tag check by HEAD failed; fetching the manifest", "image", ref, "err", err)
		return nil, nil
	case d != rec.Digest:
		klog.V(2).InfoS("Tag moved", "image", ref, "was", rec.Digest, "now", d)
		return nil, nil
	}
	img, err := s.resolveCached(ref, r)
	if errors.Is(err, ErrNotCached) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if err := s.checkAccess(ctx, h, ref, r.Context(), img.Digest, kc, PullAlways); err != nil {
		return nil, err
	}
	if err := s.recordRef(r.Name(), rec.Digest); err != nil {
		return nil, err
	}
	klog.V(2).InfoS("Tag unchanged at the registry", "image", ref, "digest", rec.Digest)
	return img, nil
}

// headManifest asks the registry for the manifest ref (a tag or a digest)
// by HEAD, which registries do not count as a pull: whether it exists for
// this client's credentials, and the digest it names (the zero hash when
// the answer has none).
func (c *client) headManifest(ctx context.Context, ref string) (v1.Hash, error) {
	what := "check tag " + c.repo.String() + ":" + ref
	if strings.Contains(ref, ":") { // a digest
		what = "check manifest " + c.repo.String() + "@" + ref
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodHead, c.url("manifests", ref), nil)
	if err != nil {
		return v1.Hash{}, err
	}
	req.Header.Set("Accept", manifestAccept)
	resp, err := c.http.Do(req)
	if err != nil {
		return v1.Hash{}, classify(err, what)
	}
	resp.Body.Close()
	if err := transport.CheckError(resp, http.StatusOK); err != nil {
		return v1.Hash{}, classify(err, what)
	}
	d, err := v1.NewHash(resp.Header.Get("Docker-Content-Digest"))
	if err != nil {
		return v1.Hash{}, nil
	}
	return d, nil
}
