package engine

import (
	"context"
	"time"

	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/credentials"
	"github.com/strata-csi/strata/driver/state"
	"github.com/strata-csi/strata/layercache"
)

// Prepull pulls ref until it succeeds and holds its layers (as
// state.PrepullOwner), so that the first pod that uses it does not wait for
// the pull. A failed pull is retried with backoff until ctx ends. Recover
// releases the images no longer prepulled.
func (e *Engine) Prepull(ctx context.Context, ref string) {
	logger := klog.FromContext(ctx).WithValues("image", ref)
	backoff := time.Second
	for {
		start := time.Now()
		// No pod waits for a prepull: metrics only, no events.
		pull := newPullTracker(e.metrics, nil, credentials.Pod{}, []string{ref}, "")
		img, err := e.pullForPrepull(ctx, logger, ref, pull)
		layers := 0
		if img != nil {
			layers = len(img.Layers)
		}
		pull.finish(stepPull, layers, err)
		if err == nil {
			err = e.store.Acquire(state.PrepullOwner(ref), img.DiffIDs())
		}
		if err == nil {
			logger.Info("Prepulled image", "digest", img.Digest, "layers", len(img.Layers), "duration", time.Since(start).Round(time.Millisecond))
			return
		}
		logger.Error(err, "Prepull failed; retrying", "retryIn", backoff)
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
func (e *Engine) pullForPrepull(ctx context.Context, logger klog.Logger, ref string, pull *pullTracker) (*layercache.Image, error) {
	creds, err := e.creds.For(ctx, ref, nil, credentials.Pod{})
	if err != nil {
		return nil, err
	}
	if creds.From != "" {
		logger.V(4).Info("Prepull credentials chosen", "source", creds.From)
	}
	img, err := e.store.Pull(ctx, ref, layercache.PullOptions{Progress: pull.progress, Keychain: creds.Keychain})
	return img, creds.Explain(err)
}
