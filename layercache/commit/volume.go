package commit

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/layercache"
)

// ErrTargetNotTag: the target reference of a commit names a digest. A commit
// pushes to a tag; the digest is its result.
var ErrTargetNotTag = errors.New("the target names a digest: give a tag (the digest is the result)")

// Source is what a commit starts from: the writable upper directory of an
// overlay mount and the image stack it was mounted over. The caller (the
// strata CLI, the node plugin's VolumeCommit watcher) finds them in a
// volume's record.
type Source struct {
	// VolumeID names the volume in messages and logs.
	VolumeID string
	// Upper is the overlay upper directory: the volume's writes.
	Upper string
	// Images are the references of the volume's stack, bottom first, and
	// Digest the manifest digest the (single) image was published with: the
	// base is that digest, never what the tag says now.
	Images []string
	Digest v1.Hash
	// CreatedBy is the history entry of the new layer.
	CreatedBy string
}

// Result is what a commit pushed.
type Result struct {
	// Target is the tag pushed, and Digest the manifest digest it now names.
	Target name.Tag
	Digest v1.Hash
	// Layer is the new layer's (compressed) digest and LayerBytes its size.
	Layer      v1.Hash
	LayerBytes int64
	// Uploaded counts the request body bytes sent to the registry: the new
	// layer, config and manifest when the base is on the target's registry.
	Uploaded int64
	// Stats tells what the layer holds.
	Stats Stats
}

// Ref is the pushed image by digest: REPOSITORY@sha256:...
func (r Result) Ref() string { return r.Target.Context().String() + "@" + r.Digest.String() }

// ParseTarget parses ref, the tag a commit pushes to, as the store parses
// references (its registry config decides which hosts are plain HTTP).
func ParseTarget(s *layercache.Store, ref string) (name.Tag, error) {
	r, err := s.ParseReference(ref)
	if err != nil {
		return name.Tag{}, err
	}
	t, ok := r.(name.Tag)
	if !ok {
		return name.Tag{}, fmt.Errorf("%q: %w", ref, ErrTargetNotTag)
	}
	return t, nil
}

// Base returns the image src was published with, by digest. A stacked
// volume is refused (layercache.ErrUnsupported): its images span
// repositories, and their layers would have to be copied into the target's.
func Base(s *layercache.Store, src Source) (name.Digest, error) {
	switch n := len(src.Images); {
	case n == 0:
		return name.Digest{}, fmt.Errorf("volume %q: its record names no image", src.VolumeID)
	case n > 1:
		return name.Digest{}, fmt.Errorf("%w: volume %q stacks %d images; commit supports single-image volumes only "+
			"(a stacked image spans repositories, and its layers would have to be copied)", layercache.ErrUnsupported, src.VolumeID, n)
	}
	img, err := s.ParseReference(src.Images[0])
	if err != nil {
		return name.Digest{}, fmt.Errorf("volume %q: its image %q: %w", src.VolumeID, src.Images[0], err)
	}
	// The digest the volume was published with, not what the tag says now.
	br, err := s.ParseReference(img.Context().String() + "@" + src.Digest.String())
	if err != nil {
		return name.Digest{}, fmt.Errorf("volume %q: its image digest %q: %w", src.VolumeID, src.Digest, err)
	}
	return br.(name.Digest), nil
}

// Volume commits src: it builds one layer of the upper directory's changes
// in the store's work directory and pushes the base image (by digest) with
// that layer appended to target, with what kc resolves for each repository
// (nil: anonymous). Only the new layer, config and manifest are uploaded when the
// base is on the target's registry (see Push). Registry errors are wrapped
// with layercache's sentinels (ErrUnauthorized, ErrNotFound, ...).
//
// built, if not nil, is called once the layer is built, before the push,
// with the layer's part of the result.
func Volume(ctx context.Context, s *layercache.Store, src Source, target name.Tag, kc authn.Keychain, built func(Result)) (Result, error) {
	return VolumeAuth(ctx, s, src, target, Auth{Base: kc, Target: kc}, built)
}

// Auth is what a commit reaches registries with; nil is anonymous.
type Auth struct {
	// Base reads the base image: its manifest and config, and its layers
	// when the target is on another registry.
	Base authn.Keychain
	// Target pushes, and is all that the target's registry sees: the base's
	// layers are mounted into the target's repository with it.
	Target authn.Keychain
}

// VolumeAuth is Volume with separate credentials for reading the base and
// pushing the target: a commit that another party asks for (a VolumeCommit)
// may read the base with the node's credentials but must push with its
// own alone.
func VolumeAuth(ctx context.Context, s *layercache.Store, src Source, target name.Tag, auth Auth, built func(Result)) (Result, error) {
	base, err := Base(s, src)
	if err != nil {
		return Result{}, err
	}
	if _, err := os.Stat(src.Upper); errors.Is(err, fs.ErrNotExist) {
		return Result{}, fmt.Errorf("volume %q: its upper directory %s is gone: was it unpublished?", src.VolumeID, src.Upper)
	}
	log := klog.FromContext(ctx).WithValues("volumeID", src.VolumeID, "image", base.String())
	log.V(2).Info("Building the layer of the volume's writes", "upper", src.Upper)
	layer, err := Build(ctx, src.Upper, s.WorkDir())
	if err != nil {
		return Result{}, fmt.Errorf("volume %q: %w", src.VolumeID, err)
	}
	defer layer.Close()
	res := Result{Target: target, Stats: layer.Stats}
	res.LayerBytes, _ = layer.Size()
	res.Layer, _ = layer.Digest()
	if built != nil {
		built(res)
	}
	var sent Counter
	res.Digest, err = Push(ctx, base, target, layer, src.CreatedBy, layercache.ClassifyRegistryError,
		s.RemoteOptions(ctx, auth.Base, sent.Wrap), s.RemoteOptions(ctx, auth.Target, sent.Wrap))
	res.Uploaded = sent.Sent()
	if err != nil {
		return res, err
	}
	log.V(1).Info("Committed volume", "target", target.String(), "digest", res.Digest, "uploadedBytes", res.Uploaded)
	return res, nil
}
