package engine

import (
	"context"
	"errors"
	"slices"
	"strconv"
	"strings"
	"sync"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/credentials"
	"github.com/strata-csi/strata/driver/mount"
	"github.com/strata-csi/strata/driver/state"
	"github.com/strata-csi/strata/layercache"
)

// Stack is a volume's images, resolved, ready to fetch: what Resolve
// returns and Fetch takes. A publish and a clone's stage both go through
// it.
type Stack struct {
	images []stackedImage // bottom first
	// Layers are the layers to mount, bottom first, each once at its
	// topmost place in the stack.
	Layers []v1.Hash
	pull   *pullTracker
}

// Digests returns the digest each image of the stack resolved to, bottom
// first.
func (s *Stack) Digests() []v1.Hash {
	out := make([]v1.Hash, len(s.images))
	for i, im := range s.images {
		out[i] = im.img.Digest
	}
	return out
}

// stackedImage is one image of a stack, resolved, with the pull options
// (credentials) that resolved it and that fetch its layers.
type stackedImage struct {
	img  *layercache.Image
	opts layercache.PullOptions
	// explain adds what the credential chain knows to a registry's
	// refusal: a registry may authorize the manifest and refuse a blob.
	explain func(error) error
}

// Resolve resolves the images of a stack (refs, bottom first), each with
// its own credentials: the images of one volume may live in different
// registries, and the node-publish secret may hold an entry for each. The
// layer cache checks each image's access rule (KEP-2535) as it resolves it.
// A stack deeper than overlayfs mounts is refused before anything is
// fetched. The pull is reported in the metrics and, when pod names one, as
// events on the pod.
func (e *Engine) Resolve(ctx context.Context, logger klog.Logger, refs []string, policy layercache.PullPolicy,
	secrets map[string]string, pod credentials.Pod, volumeID string) (*Stack, error) {
	pull := newPullTracker(e.metrics, e.events, pod, refs, volumeID)
	o := layercache.PullOptions{Policy: policy, Progress: pull.progress}
	images := make([]stackedImage, 0, len(refs))
	for _, ref := range refs {
		// The first of the volume's secret, the pod's identity (with
		// --pod-identity), the driver's service account's pull secrets and
		// the credential providers that has credentials for the registry.
		creds, err := e.creds.For(ctx, ref, secrets, pod)
		if err != nil {
			return nil, err
		}
		opts := o
		opts.Keychain = creds.Keychain
		if creds.From != "" {
			logger.V(4).Info("Pull credentials chosen", "stackImage", ref, "source", creds.From)
		}
		img, err := e.store.Resolve(ctx, ref, opts)
		if err != nil {
			err = creds.Explain(err) // what was tried, should the registry refuse
			pull.finish(stepResolve, 0, err)
			return nil, err
		}
		images = append(images, stackedImage{img: img, opts: opts, explain: creds.Explain})
	}
	layers := stackLayers(images)
	if err := checkDepth(refs, len(layers)); err != nil {
		return nil, err
	}
	return &Stack{images: images, Layers: layers, pull: pull}, nil
}

// Fetch fetches the stack's missing layers and records that owner (package
// state's owners) holds them. A prune may remove a layer between the two
// steps; then the layers are ensured again. The pull is reported once,
// when it fails or when all the layers were there for Acquire.
func (e *Engine) Fetch(ctx context.Context, owner string, s *Stack) error {
	plan := fetchPlan(s.images)
	for attempt := 0; ; attempt++ {
		if err := e.ensureStack(ctx, plan); err != nil {
			s.pull.finish(stepPull, len(s.Layers), err)
			return err
		}
		err := e.store.Acquire(owner, s.Layers)
		if !errors.Is(err, layercache.ErrLayerMissing) || attempt == 2 {
			s.pull.finish(stepPull, len(s.Layers), nil)
			return err
		}
	}
}

// LowerDirs returns the cache directories of layers (bottom first) in
// overlayfs order, top first.
func (e *Engine) LowerDirs(layers []v1.Hash) ([]string, error) {
	lowers := make([]string, 0, len(layers))
	for i := len(layers) - 1; i >= 0; i-- {
		dir, err := e.store.LayerDir(layers[i])
		if err != nil {
			return nil, err
		}
		lowers = append(lowers, dir)
	}
	return lowers, nil
}

// stackLayers returns the layers to mount for a stack of images: bottom
// first, each layer once, at its topmost place in the stack.
//
// Overlayfs refuses a directory given twice as a lower: the mount fails with
// ELOOP and "overlayfs: conflicting lowerdir path" in the kernel log, on the
// new mount API and on mount(2) alike (see TestOverlayRefusesRepeatedLower in
// package mount). Two images with a common base bring that about, and so
// does one image that repeats a layer (the empty layer some build tools
// write). Dropping the lower occurrences leaves the merged view what
// applying the layers one after another gives: every name the lower
// occurrence could show is met first in the identical occurrence above it,
// and a whiteout or an opaque directory between the two hides nothing of the
// upper one.
func stackLayers(stack []stackedImage) []v1.Hash {
	seen := map[v1.Hash]bool{}
	var ids []v1.Hash // top first
	for i := len(stack) - 1; i >= 0; i-- {
		ls := stack[i].img.Layers
		for j := len(ls) - 1; j >= 0; j-- {
			if id := ls[j].DiffID; !seen[id] {
				seen[id] = true
				ids = append(ids, id)
			}
		}
	}
	slices.Reverse(ids)
	return ids
}

// checkDepth refuses a stack of more layers than overlayfs mounts, before
// anything is fetched.
func checkDepth(refs []string, layers int) error {
	switch {
	case layers <= mount.MaxLowers:
		return nil
	case len(refs) == 1:
		return invalid("image %s has %d layers; overlayfs stacks at most %d", refs[0], layers, mount.MaxLowers)
	}
	return invalid("the stack of %d images has %d layers; overlayfs stacks at most %d (images, bottom first: %s): squash some of them, or stack fewer",
		len(refs), layers, mount.MaxLowers, strings.Join(refs, ", "))
}

// fetchPlan splits the stack's layers among its images for fetching: each
// layer once, from the lowest image that has it, so that a layer two images
// share is fetched once and counted once in the pull's metrics and events.
func fetchPlan(stack []stackedImage) []stackedImage {
	seen := map[v1.Hash]bool{}
	plan := make([]stackedImage, 0, len(stack))
	for _, s := range stack {
		var own []layercache.Layer
		for _, l := range s.img.Layers {
			if !seen[l.DiffID] {
				seen[l.DiffID] = true
				own = append(own, l)
			}
		}
		if len(own) == 0 {
			continue
		}
		part := *s.img // img.Layers may be shared with other publishes: never modified
		part.Layers = own
		s.img = &part
		plan = append(plan, s)
	}
	return plan
}

// ensureStack ensures the layers of every image of the plan at the same
// time: the images may come from different registries, and a small
// toolchain need not wait behind a large dataset. The plan holds each layer
// once, so no two of these fetch the same layer.
func (e *Engine) ensureStack(ctx context.Context, plan []stackedImage) error {
	errs := make([]error, len(plan))
	var wg sync.WaitGroup
	for i, s := range plan {
		wg.Go(func() { errs[i] = s.explain(e.store.Ensure(ctx, s.img, s.opts)) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

// DescribeStack names a volume's images in a message: `image "A"`, or
// `images "A", "B"` (bottom first) for a stack.
func DescribeStack(refs []string) string {
	q := make([]string, len(refs))
	for i, ref := range refs {
		q[i] = strconv.Quote(ref)
	}
	if len(q) == 1 {
		return "image " + q[0]
	}
	return "images " + strings.Join(q, ", ")
}

// describeSize is a size attribute for a message.
func describeSize(n int64) string {
	if n == 0 {
		return "not set"
	}
	return strconv.FormatInt(n, 10) + " bytes"
}

// StackDigests lists the digests of a stack's images, bottom first, for
// the log.
func StackDigests(images []state.StackImage) []string {
	out := make([]string, 0, len(images))
	for _, im := range images {
		out = append(out, im.Digest.String())
	}
	return out
}
