package driver

import (
	"context"
	"strings"
	"time"

	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/credentials"
	"github.com/strata-csi/strata/layercache"
)

// prepullOwnerPrefix marks the cache references that keep prepulled images.
const prepullOwnerPrefix = "prepull:"

// Prepull pulls images in the background and keeps them referenced, so that
// the first pod that uses one does not wait for the pull; references to
// images that are no longer in the list are released first. A failed pull is
// retried with backoff until ctx ends. It returns at once; Close waits for
// the pulls, so cancel ctx first.
func (d *Driver) Prepull(ctx context.Context, images []string) error {
	if d.store == nil {
		return nil
	}
	want := map[string]bool{}
	for _, ref := range images {
		want[prepullOwnerPrefix+ref] = true
	}
	owners, err := d.store.Owners()
	if err != nil {
		return err
	}
	for owner := range owners {
		if strings.HasPrefix(owner, prepullOwnerPrefix) && !want[owner] {
			if err := d.store.Release(owner); err != nil {
				return err
			}
			klog.InfoS("No longer keeping a prepulled image", "image", strings.TrimPrefix(owner, prepullOwnerPrefix))
		}
	}
	for _, ref := range images {
		d.background.Go(func() { d.prepull(ctx, ref) })
	}
	return nil
}

// prepull pulls one image until it succeeds and holds its layers.
func (d *Driver) prepull(ctx context.Context, ref string) {
	backoff := time.Second
	for {
		start := time.Now()
		// No pod waits for a prepull: metrics only, no events.
		pull := newPullTracker(d.metrics, nil, podRef{}, []string{ref}, "")
		img, err := d.pullForPrepull(ctx, ref, pull)
		layers := 0
		if img != nil {
			layers = len(img.Layers)
		}
		pull.finish(stepPull, layers, err)
		if err == nil {
			err = d.store.Acquire(prepullOwnerPrefix+ref, img.DiffIDs())
		}
		if err == nil {
			klog.InfoS("Prepulled image", "image", ref, "digest", img.Digest, "layers", len(img.Layers), "duration", time.Since(start).Round(time.Millisecond))
			return
		}
		klog.ErrorS(err, "Prepull failed; retrying", "image", ref, "retryIn", backoff)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Minute)
	}
}

// pullForPrepull pulls ref with the credentials the chain has for a pull
// for no pod and without a volume secret: the driver's service account's
// pull secrets and the plain credential providers (and token providers
// that run without a service account). A refusal says what was tried.
func (d *Driver) pullForPrepull(ctx context.Context, ref string, pull *pullTracker) (*layercache.Image, error) {
	creds, err := d.creds.For(ctx, ref, nil, credentials.Pod{})
	if err != nil {
		return nil, err
	}
	if creds.From != "" {
		klog.V(4).InfoS("Prepull credentials chosen", "image", ref, "source", creds.From)
	}
	img, err := d.store.Pull(ctx, ref, layercache.PullOptions{Progress: pull.progress, Keychain: creds.Keychain})
	return img, creds.Explain(err)
}
