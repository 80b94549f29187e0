package layercache

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"k8s.io/klog/v2"
)

// A cached layer is content, and the cache shares it between tenants only as
// far as each has shown that it may have it. The manifest's access record
// (access.go) says whether a caller may use an image of a repository; this
// file says whether that repository may hand out a cached layer:
//
//   - a diffID is trusted only together with a blob digest that was seen to
//     produce it, so that a manifest cannot claim a cached layer by listing
//     its diffID beside a made-up digest;
//   - a layer first obtained anonymously from a registry is public: any
//     repository that names it (with a digest seen to produce it) gets it;
//   - otherwise a repository gets the layer only after it has served the
//     layer's blob to this node and the bytes verified: a registry that
//     answers yes to every HEAD, and names another tenant's digests, gets
//     nothing.
//
// The record lives in the layer's own directory, so that it goes when the
// layer is evicted.

// accessFile is a layer's access record, beside meta.json.
const accessFile = "access.json"

// layerAccess records who has shown that they hold a layer's content.
type layerAccess struct {
	// Digests are the blob digests seen to produce the layer's diffID.
	Digests []v1.Hash `json:"digests"`
	// Public is set once a registry (not a mirror) served a blob of the
	// layer to a caller without credentials.
	Public bool `json:"public,omitempty"`
	// Repositories (registry/path) served a blob of the layer that verified.
	Repositories []string `json:"repositories,omitempty"`
}

// clone returns a copy of a that its caller may change.
func (a *layerAccess) clone() *layerAccess {
	return &layerAccess{Digests: slices.Clone(a.Digests), Public: a.Public, Repositories: slices.Clone(a.Repositories)}
}

// cachedAccess is a layer's access record as read from one version of its
// file.
type cachedAccess struct {
	version fileKey
	access  *layerAccess
}

// fileKey tells one version of a file from another: a file replaced by
// rename has another inode.
type fileKey struct {
	ino, size int64
	mtime     int64
}

func fileVersion(fi os.FileInfo) fileKey {
	k := fileKey{size: fi.Size(), mtime: fi.ModTime().UnixNano()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		k.ino = int64(st.Ino)
	}
	return k
}

// allows reports whether the record lets repo hand out the layer named by
// the blob digest d.
func (a *layerAccess) allows(d v1.Hash, repo string) bool {
	return slices.Contains(a.Digests, d) && (a.Public || slices.Contains(a.Repositories, repo))
}

// add merges what one verified fetch showed; it reports whether anything
// changed.
func (a *layerAccess) add(d v1.Hash, repo string, public bool) bool {
	changed := false
	if !slices.Contains(a.Digests, d) {
		a.Digests, changed = append(a.Digests, d), true
	}
	if !slices.Contains(a.Repositories, repo) {
		a.Repositories, changed = append(a.Repositories, repo), true
	}
	if public && !a.Public {
		a.Public, changed = true, true
	}
	return changed
}

// readLayerAccess reads the access record of a committed layer. A layer
// committed before records existed has none: its meta's digest is the one
// blob digest known to produce it, and no repository is on record.
func (s *Store) readLayerAccess(diffID v1.Hash) (*layerAccess, error) {
	dir, err := s.layerPath(diffID)
	if err != nil {
		return nil, err
	}
	// A record is replaced by rename, never written in place: the same
	// file (inode, size, mtime) holds the same record, which a publish of a
	// model of a thousand files then reads from memory, not from disk.
	p := filepath.Join(dir, accessFile)
	if st, err := os.Stat(p); err == nil {
		key := fileVersion(st)
		if c, ok := s.accessCache.Load(diffID); ok && c.(cachedAccess).version == key {
			return c.(cachedAccess).access.clone(), nil
		}
		var a layerAccess
		err := readJSON(p, &a)
		if err == nil {
			s.accessCache.Store(diffID, cachedAccess{version: key, access: a.clone()})
			return &a, nil
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return &a, err
		}
		// Pruned since the stat: as if there were no record.
	}
	var a layerAccess
	err = readJSON(p, &a)
	if err == nil || !errors.Is(err, fs.ErrNotExist) {
		return &a, err
	}
	var meta LayerMeta
	if err := readJSON(filepath.Join(dir, metaFile), &meta); err != nil {
		return nil, fmt.Errorf("%w: layer %s: %v", ErrLayerMissing, diffID, err)
	}
	return &layerAccess{Digests: []v1.Hash{meta.Digest}}, nil
}

// noteLayerAccess records that repo served blob d of the committed layer
// diffID, and it verified.
func (s *Store) noteLayerAccess(diffID, d v1.Hash, repo string, public bool) error {
	s.accessMu.Lock()
	defer s.accessMu.Unlock()
	a, err := s.readLayerAccess(diffID)
	if errors.Is(err, ErrLayerMissing) {
		return nil // pruned meanwhile: nothing left to record about
	}
	if err != nil {
		return err
	}
	if !a.add(d, repo, public) {
		return nil
	}
	if err := s.writeLayerAccess(diffID, a); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err // (a layer pruned meanwhile has nothing left to record about)
	}
	return nil
}

func (s *Store) writeLayerAccess(diffID v1.Hash, a *layerAccess) error {
	dir, err := s.layerPath(diffID)
	if err != nil {
		return err
	}
	data, err := json.Marshal(a)
	if err != nil {
		return err
	}
	return s.writeAtomic(filepath.Join(dir, accessFile), data)
}

// servedPublicly reports whether ep serving to the credentials of kc makes a
// layer public: the registry itself served it without credentials.
func servedPublicly(ep *endpoint, kc authn.Keychain) (bool, error) {
	if ep.mirror {
		return false, nil
	}
	key, err := ep.accessKey(kc)
	return key == anonymous, err
}

// checkLayers makes sure that every layer of img, all in the store, may be
// handed to this request: each layer's blob digest was seen to produce it,
// and the layer is public or img's repository has served it. A layer that
// is not yet on record for the repository is proven by fetching its blob
// from there once (not unpacked: only hashed); the pull policy Never
// forbids that, and the request is refused.
func (s *Store) checkLayers(ctx context.Context, img *Image, o PullOptions, repo name.Repository, src func() (*source, error)) error {
	type proof struct {
		l         Layer
		knownBlob bool
	}
	var need []proof
	for _, l := range img.fetchLayers() {
		a, err := s.readLayerAccess(l.DiffID)
		if errors.Is(err, ErrLayerMissing) {
			// Pruned since it was ensured: the caller's Acquire finds it
			// missing and ensures it again.
			continue
		}
		if err != nil {
			return err
		}
		if s.opts.noCredentialCheck && slices.Contains(a.Digests, l.Digest) {
			continue
		}
		if !a.allows(l.Digest, repo.Name()) {
			need = append(need, proof{l, slices.Contains(a.Digests, l.Digest)})
		}
	}
	if len(need) == 0 {
		return nil
	}
	if o.Policy == PullNever {
		return fmt.Errorf("%w: layer %s of %s is in the node's cache, but %s has never served it to this node, "+
			"and the pull policy Never forbids asking: pull the image with IfNotPresent once", ErrUnauthorized, need[0].l.DiffID, img.Ref, repo.Name())
	}
	sr, err := src()
	if err != nil {
		return err
	}
	errs := make([]error, len(need))
	var wg sync.WaitGroup
	for i, p := range need {
		// An artifact entry's key derives from its blob digest: the digest
		// proves it.
		wg.Go(func() { errs[i] = s.proveLayer(ctx, sr, img.Ref, p.l, !p.knownBlob && p.l.kind == imageLayer) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

// proveLayer fetches l's blob from src and checks that it has l's digest
// and, unless that digest is already known to produce the layer, that it
// decompresses to l's diffID; then it records the repository's access.
func (s *Store) proveLayer(ctx context.Context, src *source, ref string, l Layer, checkDiffID bool) error {
	select {
	case s.sem <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-s.sem }()
	what := fmt.Sprintf("layer %s (blob %s) of %s", l.DiffID, l.Digest, ref)
	ep, err := src.do(ctx, "verify "+what, func(c *client, attempts int) error {
		return s.verifyBlob(ctx, c, attempts, what, l, checkDiffID)
	})
	if err != nil {
		if errors.Is(err, ErrNotFound) || errors.Is(err, ErrUnauthorized) {
			return fmt.Errorf("%w: %s is in the node's cache for other repositories, and %s did not serve its blob "+
				"to this volume's credentials (%v): the cache serves a private layer only to a repository that holds it",
				ErrUnauthorized, what, src.registry().repo.Name(), err)
		}
		return err
	}
	public, err := servedPublicly(ep, src.kc)
	if err != nil {
		return err
	}
	klog.V(2).InfoS("Repository proved it holds a cached layer", "image", ref, "layer", l.DiffID, "blob", l.Digest,
		"host", ep.host(), "public", public)
	return s.noteLayerAccess(l.DiffID, l.Digest, src.registry().repo.Name(), public)
}

// verifyBlob reads l's blob from c to its end, checking its size and
// digest and, with checkDiffID, the digest of its decompressed tar stream.
// Nothing is written.
func (s *Store) verifyBlob(ctx context.Context, c *client, attempts int, what string, l Layer, checkDiffID bool) error {
	body := &resumingReader{ctx: ctx, s: s, c: c, attempts: attempts, d: l.Digest, size: l.Size, what: what}
	n, err := body.open()
	if err != nil {
		return err
	}
	defer body.Close()
	if n >= 0 && l.Size > 0 && n != l.Size {
		return fmt.Errorf("%w: %s: %s sends %d bytes, manifest says %d", ErrDigestMismatch, what, c.repo.RegistryStr(), n, l.Size)
	}
	vr := &verifyReader{r: body, limit: l.Size, h: sha256.New(), what: what, layer: l}
	if !checkDiffID {
		if _, err := io.Copy(io.Discard, vr); err != nil {
			return vr.failure(err, what)
		}
		return vr.verify(l.Digest)
	}
	br := bufio.NewReaderSize(vr, 256<<10)
	tarStream, closeStream, err := decompressed(br)
	if err != nil {
		return vr.failure(err, what)
	}
	defer closeStream()
	dh := sha256.New()
	// Nothing is written, but the layer's limits bound what a hostile blob
	// makes the node decompress.
	meter := s.newLayerMeter(ctx, &pullMeter{ref: what}, l)
	defer meter.done(false)
	if _, err := io.Copy(dh, &limitedReader{r: tarStream, m: meter}); err != nil {
		if errors.Is(err, ErrNoSpace) {
			return fmt.Errorf("%s: %w", what, err)
		}
		return vr.failure(err, what)
	}
	// Read the compressed stream to its end, so its digest covers it all.
	if _, err := io.Copy(io.Discard, br); err != nil {
		return vr.failure(err, what)
	}
	if err := vr.verify(l.Digest); err != nil {
		return err
	}
	if got := "sha256:" + hex.EncodeToString(dh.Sum(nil)); got != l.DiffID.String() {
		return fmt.Errorf("%w: %s: uncompressed content has digest %s, not the diffID its manifest claims", ErrDigestMismatch, what, got)
	}
	return nil
}
