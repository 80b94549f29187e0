package commit

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"k8s.io/klog/v2"
)

// Push writes to target the image base (by digest) with layer appended and a
// config history entry that says createdBy. It returns the new manifest's
// digest. An artifact base (a model) gets a new version of itself
// (pushArtifact).
//
// The base's layers are never downloaded when target is on base's registry:
// go-containerregistry asks the target repository whether it has each blob
// (HEAD) and, when it does not, mounts it from base's repository. Only the new
// layer, the new config and the manifest are uploaded. A target on another
// registry gets the base's layers copied through this process.
//
// baseOpts read the base (its manifest and config, and its layers when they
// are copied); targetOpts write the target, and carry the only credentials
// the target's registry sees: a layer mounted from the base's repository is
// mounted with them, so the registry decides whether they may read it.
//
// wrapErr classifies registry errors (layercache.ClassifyRegistryError).
func Push(ctx context.Context, base name.Digest, target name.Tag, layer v1.Layer, createdBy string,
	wrapErr func(error, string) error, baseOpts, targetOpts []remote.Option) (v1.Hash, error) {
	desc, err := remote.Get(base, baseOpts...)
	if err != nil {
		return v1.Hash{}, wrapErr(err, "fetch base image "+base.String())
	}
	if m, err := parseArtifactManifest(desc.Manifest); err == nil && m.config.MediaType != "" && !isImageConfig(m.config.MediaType) {
		return pushArtifact(ctx, desc.Manifest, desc.MediaType, base, target, layer, wrapErr, baseOpts, targetOpts)
	}
	img, err := desc.Image()
	if err != nil {
		return v1.Hash{}, wrapErr(err, "read base image "+base.String())
	}
	mt, err := img.MediaType()
	if err != nil {
		return v1.Hash{}, fmt.Errorf("base image %s: %w", base, err)
	}
	layerType := types.OCILayer
	if mt == types.DockerManifestSchema2 {
		// A Docker manifest lists Docker media types only.
		layerType = types.DockerLayer
	}
	now := time.Now().UTC()
	out, err := mutate.Append(img, mutate.Addendum{
		Layer:     layer,
		MediaType: layerType,
		History:   v1.History{Created: v1.Time{Time: now}, CreatedBy: createdBy, Comment: "strata commit"},
	})
	if err != nil {
		return v1.Hash{}, wrapErr(err, "append the layer to "+base.String())
	}
	if out, err = mutate.CreatedAt(out, v1.Time{Time: now}); err != nil {
		return v1.Hash{}, wrapErr(err, "read the config of "+base.String())
	}
	digest, err := out.Digest()
	if err != nil {
		return v1.Hash{}, wrapErr(err, "read base image "+base.String())
	}
	klog.FromContext(ctx).V(2).Info("Pushing committed image", "image", target.String(), "base", base.String(), "digest", digest)
	if err := remote.Write(target, out, targetOpts...); err != nil {
		return v1.Hash{}, wrapErr(err, "push "+target.String())
	}
	return digest, nil
}

// Counter counts the request body bytes sent through a transport: what a
// push uploads.
type Counter struct{ n atomic.Int64 }

// Sent is the number of body bytes sent so far.
func (c *Counter) Sent() int64 { return c.n.Load() }

// Wrap returns next with every request body counted.
func (c *Counter) Wrap(next http.RoundTripper) http.RoundTripper {
	return roundTripFunc(func(req *http.Request) (*http.Response, error) {
		if req.Body != nil && req.Body != http.NoBody {
			req = req.Clone(req.Context())
			req.Body = &countingBody{ReadCloser: req.Body, n: &c.n}
		}
		return next.RoundTrip(req)
	})
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(req *http.Request) (*http.Response, error) { return f(req) }

type countingBody struct {
	io.ReadCloser
	n *atomic.Int64
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.n.Add(int64(n))
	return n, err
}
