package layercache

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"k8s.io/klog/v2"
)

// A cached image is no way around its registry's credentials (the rule
// kubelet follows for private images, KEP-2535). For each repository and
// digest the store records which credentials the registry accepted for it,
// by hash, or that it needed none. A resolution from the cache is allowed
// to a caller whose credentials are on record (so Never works offline), or
// whose credentials the registry confirms now; otherwise it is refused with
// ErrUnauthorized.

// anonymous stands for "no credentials" in an access record.
const anonymous = "anonymous"

// accessDir holds one access record per repository and digest.
const accessDir = "images/access"

// accessRecord lists the credentials (by hash) that the registry accepted
// for one image.
type accessRecord struct {
	Repository string   `json:"repository"`
	Digest     v1.Hash  `json:"digest"`
	Accepted   []string `json:"accepted"`
}

// WithoutCredentialCheck lets any publish use a cached image, whatever
// credentials pulled it: for clusters that accept that a pod without the
// secret can read a private image another pod pulled.
func WithoutCredentialCheck() Option {
	return func(o *options) error {
		o.noCredentialCheck = true
		return nil
	}
}

func (s *Store) accessPath(repo name.Repository, d v1.Hash) string {
	return filepath.Join(s.root, accessDir, keyHex(repo.Name()+"@"+d.String())+".json")
}

// recordAccess notes that the registry accepted key for repo@d.
func (s *Store) recordAccess(repo name.Repository, d v1.Hash, key string) error {
	p := s.accessPath(repo, d)
	var rec accessRecord
	if err := readJSON(p, &rec); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if slices.Contains(rec.Accepted, key) {
		return nil
	}
	rec.Repository, rec.Digest = repo.Name(), d
	rec.Accepted = append(rec.Accepted, key)
	data, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	return s.writeAtomic(p, data)
}

// checkAccess decides whether a caller with the credentials of kc may use the cached image
// repo@d: yes if the image needed no credentials or the caller's are on
// record; otherwise, unless the policy forbids asking (Never), the registry
// (through its mirrors, as a pull would) is asked whether it accepts the
// caller's credentials for the image.
//
// With mirrors, what is on record is the place that served the image and
// the credentials it took: "anonymous" from the registry, the hash of
// credentials and host from the registry or a mirror, or
// "anonymous:<mirror>" from a mirror that needed none. The latter serves any
// caller while that host is still a mirror of the registry: an image that a
// mirror gives to anyone is effectively public on this node, since any pull
// would get it from there too. An image that only the registry gave, to
// credentials, stays private: a caller without them is refused, unless a
// configured mirror or the registry serves it to the caller now.
func (s *Store) checkAccess(ctx context.Context, h *hosts, ref string, repo name.Repository, d v1.Hash, kc authn.Keychain, policy PullPolicy) error {
	if s.opts.noCredentialCheck {
		return nil
	}
	var rec accessRecord
	if err := readJSON(s.accessPath(repo, d), &rec); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	src := s.newSource(h, repo, kc)
	ok, err := onRecord(rec, src)
	if err != nil || ok {
		return err
	}
	public, err := s.isPublic(d)
	if err != nil {
		return err
	}
	if public {
		// Some registry gave this manifest to anyone: it is no secret, and
		// its layers have rules of their own (checkLayers).
		return nil
	}
	if policy == PullNever {
		return fmt.Errorf("%w: %s is cached, but it was pulled with credentials this volume does not have, "+
			"and the pull policy Never forbids asking the registry: give the volume the pull secret that pulled it", ErrUnauthorized, ref)
	}
	// A repository that served the manifest before is asked whether it
	// accepts the caller's credentials for it too. A repository that never
	// served it must serve its bytes now: a HEAD answer is no proof, since
	// anyone can run a registry that says yes to every HEAD.
	served := len(rec.Accepted) > 0
	ep, err := src.do(ctx, "verify access to "+ref, func(c *client, attempts int) error {
		return s.retryN(ctx, "verify access to "+ref, attempts, func() error {
			if served {
				_, err := c.headManifest(ctx, d.String())
				return err
			}
			_, _, _, err := c.manifest(ctx, d.String()) // verified against d
			return err
		})
	})
	if err != nil {
		if errors.Is(err, ErrUnauthorized) || errors.Is(err, ErrNotFound) {
			if !served {
				return fmt.Errorf("%w: %s is cached on this node for other repositories, but %s did not serve it to this "+
					"volume's credentials (%v): give the volume a pull secret that the registry accepts for it", ErrUnauthorized, ref, repo.Name(), err)
			}
			return fmt.Errorf("%w: %s is cached, but the registry does not accept this volume's credentials for it (%v): "+
				"give the volume a pull secret for %s", ErrUnauthorized, ref, err, repo.RegistryStr())
		}
		return fmt.Errorf("verify access to cached %s: %w", ref, err)
	}
	key, err := ep.accessKey(kc)
	if err != nil {
		return err
	}
	klog.V(2).InfoS("Registry confirmed access to a cached image", "image", ref, "host", ep.host(), "key", keyKind(key), "fetched", !served)
	return s.noteAccess(repo, d, ep, key)
}

// noteAccess records that ep served repo@d to the credentials with key, and
// that d is public if the registry served it to none.
func (s *Store) noteAccess(repo name.Repository, d v1.Hash, ep *endpoint, key string) error {
	if key == anonymous && !ep.mirror {
		if err := s.writeAtomic(s.publicPath(d), nil); err != nil {
			return err
		}
	}
	return s.recordAccess(repo, d, key)
}

// publicPath marks a manifest that a registry served without credentials.
func (s *Store) publicPath(d v1.Hash) string {
	return filepath.Join(s.root, accessDir, "public-"+d.Algorithm+"-"+d.Hex)
}

// isPublic reports whether a registry served the manifest d to a caller
// without credentials.
func (s *Store) isPublic(d v1.Hash) (bool, error) {
	if err := checkDigest(d); err != nil {
		return false, err
	}
	_, err := os.Stat(s.publicPath(d))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	return err == nil, err
}

// onRecord reports whether rec lets the caller of src use the image: it was
// served to anyone by the registry or by one of its current mirrors, or to
// the caller's credentials at one of the source's endpoints.
func onRecord(rec accessRecord, src *source) (bool, error) {
	if slices.Contains(rec.Accepted, anonymous) {
		return true, nil
	}
	for _, ep := range src.eps {
		if ep.mirror && slices.Contains(rec.Accepted, mirrorAnonymous(ep.host())) {
			return true, nil
		}
		key, err := ep.accessKey(src.kc)
		if err != nil {
			return false, err
		}
		if slices.Contains(rec.Accepted, key) {
			return true, nil
		}
	}
	return false, nil
}

// keyKind describes an access key for logs, without the hash.
func keyKind(key string) string {
	if strings.HasPrefix(key, anonymous) {
		return key
	}
	return "credentials"
}
