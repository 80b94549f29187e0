package layercache

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"k8s.io/klog/v2"
)

// PullPolicy says when the registry is contacted, as for container images.
type PullPolicy string

// Pull policies.
const (
	// PullIfNotPresent uses the cached resolution of a reference when there
	// is one, and contacts the registry otherwise.
	PullIfNotPresent PullPolicy = "IfNotPresent"
	// PullAlways re-resolves a tag at the registry every time.
	PullAlways PullPolicy = "Always"
	// PullNever uses the cache only.
	PullNever PullPolicy = "Never"
)

// ParsePullPolicy parses a policy name; empty means PullIfNotPresent.
func ParsePullPolicy(s string) (PullPolicy, error) {
	switch p := PullPolicy(s); p {
	case "":
		return PullIfNotPresent, nil
	case PullIfNotPresent, PullAlways, PullNever:
		return p, nil
	}
	return "", fmt.Errorf("unknown pull policy %q: use IfNotPresent, Always or Never", s)
}

// PullOptions qualify one Resolve, Ensure or Pull.
type PullOptions struct {
	Policy PullPolicy
	// Keychain supplies the credentials: it is asked for each repository a
	// request goes to, on the host it goes to (a mirror's, or the
	// registry's), and must answer only for the hosts its credentials are
	// meant for: a keychain that answers every host alike gives the
	// registry's credentials to its mirrors. Nil pulls anonymously. The
	// node's own docker config is never read.
	Keychain authn.Keychain
	// Progress, if set, is called (from several goroutines) as layers are
	// fetched. A layer's completion may be reported after Ensure returned
	// early because ctx ended: the fetch goes on.
	Progress func(ProgressEvent)
}

// Image is a reference resolved to one platform's manifest.
type Image struct {
	// Ref is the reference as given.
	Ref string
	// Digest is the platform-specific manifest's digest.
	Digest v1.Hash
	// IndexDigest is the digest of the index the manifest was picked from,
	// if the reference named an index.
	IndexDigest *v1.Hash
	// Layers lists the layers bottom first. It may be shared with other
	// Images of the same digest: do not modify it. For an artifact: its
	// tar layers, then (if it has raw files) the tree of its Files on top.
	Layers []Layer
	// ArtifactType is set for an OCI artifact (an ORAS push, a model): its
	// artifactType, or its config's media type when it has none.
	ArtifactType string
	// Files are an artifact's raw layers, each a file at its path, sorted
	// by path; they are mounted through the tree, not each as a lower. Do
	// not modify it.
	Files []RawFile
}

// Layer is one layer of an image.
type Layer struct {
	DiffID    v1.Hash         // digest of the uncompressed tar: the cache key
	Digest    v1.Hash         // digest of the blob as stored in the registry
	Size      int64           // blob size
	MediaType types.MediaType // blob media type

	kind layerKind // how the store keeps it
}

// DiffIDs returns the layers' diffIDs, bottom first.
func (img *Image) DiffIDs() []v1.Hash {
	ids := make([]v1.Hash, len(img.Layers))
	for i, l := range img.Layers {
		ids[i] = l.DiffID
	}
	return ids
}

// imageRecord is what images/refs/<key>.json holds: the digest a reference
// string resolved to when it was last contacted.
type imageRecord struct {
	Ref      string    `json:"ref"`
	Digest   v1.Hash   `json:"digest"`
	Resolved time.Time `json:"resolved"`
}

// Resolve turns a reference into an Image for this store's platform,
// according to the pull policy. Manifests and configs are cached by digest,
// so that a reference resolved once resolves again with the registry down
// (IfNotPresent) or unreachable by policy (Never).
func (s *Store) Resolve(ctx context.Context, ref string, o PullOptions) (*Image, error) {
	policy := o.Policy
	if policy == "" {
		policy = PullIfNotPresent
	}
	// One view of the registry config serves the whole resolution.
	h := s.reg.refresh()
	r, err := parseReference(h, ref)
	if err != nil {
		return nil, err
	}
	if policy != PullAlways || isDigest(r) {
		img, err := s.resolveCached(ref, r)
		if err == nil {
			if err := s.checkAccess(ctx, h, ref, r.Context(), img.Digest, o.Keychain, policy); err != nil {
				return nil, err
			}
			return img, nil
		}
		if !errors.Is(err, ErrNotCached) {
			return nil, err
		}
		if policy == PullNever {
			return nil, fmt.Errorf("%w: %s is not in the node's cache and the pull policy is Never", ErrNotCached, ref)
		}
	}
	return s.resolveShared(ctx, h, ref, r, o.Keychain, policy)
}

func isDigest(r name.Reference) bool {
	_, ok := r.(name.Digest)
	return ok
}

// resolveCached resolves ref from the cache alone; ErrNotCached if anything
// needed is missing.
func (s *Store) resolveCached(ref string, r name.Reference) (*Image, error) {
	var top v1.Hash
	if d, ok := r.(name.Digest); ok {
		h, err := v1.NewHash(d.DigestStr())
		if err != nil {
			return nil, fmt.Errorf("%w %q: %v", ErrInvalidReference, ref, err)
		}
		top = h
	} else {
		var rec imageRecord
		if err := readJSON(s.imageRefPath(r.Name()), &rec); err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil, ErrNotCached
			}
			return nil, err
		}
		top = rec.Digest
	}
	img, err := s.build(ref, top, func(d v1.Hash, _ blobKind) ([]byte, error) {
		data, err := s.readBlob(d)
		if errors.Is(err, fs.ErrNotExist) {
			return nil, ErrNotCached
		}
		return data, err
	})
	if err != nil {
		return nil, err
	}
	if isDigest(r) {
		// Record digest references too, so that `strata ls` lists them;
		// once is enough, since a digest never moves.
		if _, err := os.Stat(s.imageRefPath(r.Name())); errors.Is(err, fs.ErrNotExist) {
			if err := s.recordRef(r.Name(), top); err != nil {
				return nil, err
			}
		}
	}
	return img, nil
}

// resolveRemote resolves ref at the registry (or its mirrors), caching what
// it fetches.
func (s *Store) resolveRemote(ctx context.Context, h *hosts, ref string, r name.Reference, kc authn.Keychain) (*Image, error) {
	src := s.newSource(h, r.Context(), kc)
	var data []byte
	var top v1.Hash
	fetchedPlatform := false
	servedBy, err := src.do(ctx, "resolve "+ref, func(c *client, attempts int) error {
		return s.retryN(ctx, "resolve "+ref, attempts, func() (err error) {
			data, _, top, err = c.manifest(ctx, r.Identifier())
			return err
		})
	})
	if err != nil {
		return nil, err
	}
	if err := s.writeBlob(top, data); err != nil {
		return nil, err
	}
	img, err := s.build(ref, top, func(d v1.Hash, kind blobKind) ([]byte, error) {
		if data, err := s.readBlob(d); err == nil {
			return data, nil
		}
		var data []byte
		ep, err := src.do(ctx, "fetch "+d.String(), func(c *client, attempts int) error {
			return s.retryN(ctx, "fetch "+d.String(), attempts, func() (err error) {
				if kind == configBlob {
					data, err = c.configBlob(ctx, d)
				} else {
					data, _, _, err = c.manifest(ctx, d.String())
				}
				if err == nil {
					// Verify here, so that a mirror's wrong blob falls back.
					err = checkBlob(d, data)
				}
				return err
			})
		})
		if err != nil {
			return nil, err
		}
		if kind == manifestBlob {
			// The platform's manifest, picked from an index: the access
			// record is about it.
			servedBy, fetchedPlatform = ep, true
		}
		return data, s.writeBlob(d, data)
	})
	if err != nil {
		return nil, err
	}
	if img.Digest != top && !fetchedPlatform {
		// The index came from the registry, but the platform's manifest
		// it names from the cache: the repository has shown nothing about
		// that manifest yet.
		if err := s.checkAccess(ctx, h, ref, r.Context(), img.Digest, kc, PullIfNotPresent); err != nil {
			return nil, err
		}
	} else {
		// The registry, or a mirror, served the manifest to these credentials.
		key, err := servedBy.accessKey(kc)
		if err != nil {
			return nil, err
		}
		if err := s.noteAccess(r.Context(), img.Digest, servedBy, key); err != nil {
			return nil, err
		}
	}
	if err := s.recordRef(r.Name(), top); err != nil {
		return nil, err
	}
	klog.V(2).InfoS("Resolved image", "image", ref, "digest", img.Digest, "layers", len(img.Layers), "from", servedBy.host())
	return img, nil
}

// recordRef durably records that ref resolved to top.
func (s *Store) recordRef(ref string, top v1.Hash) error {
	data, err := json.Marshal(imageRecord{Ref: ref, Digest: top, Resolved: time.Now().UTC()})
	if err != nil {
		return err
	}
	return s.writeAtomic(s.imageRefPath(ref), data)
}

// readBlob reads a cached manifest, index or config.
func (s *Store) readBlob(d v1.Hash) ([]byte, error) {
	p, err := s.blobPath(d)
	if err != nil {
		return nil, err
	}
	return os.ReadFile(p)
}

// writeBlob caches a manifest, index or config, after checking its digest.
func (s *Store) writeBlob(d v1.Hash, data []byte) error {
	p, err := s.blobPath(d)
	if err != nil {
		return err
	}
	if err := checkBlob(d, data); err != nil {
		return err
	}
	if _, err := os.Stat(p); err == nil {
		return nil
	}
	return s.writeAtomic(p, data)
}

// checkBlob checks that data has digest d.
func checkBlob(d v1.Hash, data []byte) error {
	got, _, err := v1.SHA256(bytes.NewReader(data))
	if err != nil {
		return err
	}
	if got != d {
		return fmt.Errorf("%w: blob %s has digest %s", ErrDigestMismatch, d, got)
	}
	return nil
}

// configBlob fetches an image config blob and verifies it.
func (c *client) configBlob(ctx context.Context, d v1.Hash) ([]byte, error) {
	rc, _, err := c.blobFrom(ctx, d, 0, 0)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	data, err := io.ReadAll(io.LimitReader(rc, maxManifestSize+1))
	if err != nil {
		return nil, classify(err, "read config "+c.repo.String()+"@"+d.String())
	}
	if len(data) > maxManifestSize {
		return nil, fmt.Errorf("%w: config %s is larger than %d bytes", ErrUnsupported, d, maxManifestSize)
	}
	return data, nil
}
