package engine

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/strata-csi/strata/driver/credentials"
	"github.com/strata-csi/strata/driver/metrics"
	"github.com/strata-csi/strata/internal/fault"
	"github.com/strata-csi/strata/layercache"
)

// pullTracker follows one publish's resolve and pull of its images. Its
// progress method is the pull's Progress function: it counts cache hits and
// misses and announces the pull on the pod at the first missing layer. At
// the end, finish reports the outcome in the metrics and as an event on the
// pod.
type pullTracker struct {
	metrics  *metrics.Metrics // nil: metrics off
	events   *podEvents       // nil: no API access
	pod      credentials.Pod
	images   []string // the volume's stack, bottom first
	volumeID string
	start    time.Time

	// progressEvery is how often a pull that is downloading reports its
	// progress on the pod (ProgressEvery).
	progressEvery time.Duration

	mu       sync.Mutex
	joined   map[string]bool  // layers another caller was fetching
	missing  map[string]int64 // compressed sizes of the layers the cache lacked
	received map[string]int64 // compressed bytes received per fetched layer
	reported time.Time        // when progress was last reported (or the pull began)
}

// ProgressEvery is how often a pull that downloads reports on the pod how far
// it got, so that `kubectl describe pod` answers "is it stuck?" while a
// large layer comes: about as often as kubelet retries a publish.
const ProgressEvery = 30 * time.Second

func newPullTracker(m *metrics.Metrics, events *podEvents, pod credentials.Pod, images []string, volumeID string) *pullTracker {
	return &pullTracker{
		metrics: m, events: events, pod: pod, images: images, volumeID: volumeID, start: time.Now(),
		progressEvery: ProgressEvery, reported: time.Now(),
		joined: map[string]bool{}, missing: map[string]int64{}, received: map[string]int64{},
	}
}

// progress is called by the layer cache, from several goroutines; a layer's
// completion may come after the publish returned (the fetch goes on).
func (t *pullTracker) progress(e layercache.ProgressEvent) {
	t.mu.Lock()
	first := false
	var report *podEvent
	switch e.State {
	case layercache.LayerCached:
		t.metrics.LayerHit()
	case layercache.LayerMissing:
		// An ensure that a prune forced to run again reports the layer
		// again: it is still one miss of this publish.
		if _, ok := t.missing[e.Layer.DiffID.Hex]; !ok {
			first = len(t.missing) == 0
			t.missing[e.Layer.DiffID.Hex] = e.Layer.Size
			t.metrics.LayerMissed()
		}
	case layercache.LayerJoined:
		t.joined[e.Layer.DiffID.Hex] = true
	case layercache.LayerFetching:
		t.received[e.Layer.DiffID.Hex] = e.Done
		if now := time.Now(); now.Sub(t.reported) >= t.progressEvery {
			t.reported = now
			ev := t.progressLocked(now)
			report = &ev
		}
	case layercache.LayerDone:
		// A layer another publish fetched is counted there.
		if !t.joined[e.Layer.DiffID.Hex] {
			t.metrics.LayerPulled(e.Layer.Size)
			t.received[e.Layer.DiffID.Hex] = e.Layer.Size
		}
	}
	t.mu.Unlock()
	if first {
		t.events.emit(t.pod, pullingEvent(t.images, t.volumeID))
	}
	if report != nil {
		t.events.emit(t.pod, *report)
	}
}

// progressLocked is the progress event of the pull at now: the bytes this
// publish received of the layers it downloads, and the rate so far. The
// caller holds mu.
func (t *pullTracker) progressLocked(now time.Time) podEvent {
	var total, received int64
	for d, n := range t.missing {
		if !t.joined[d] {
			total += n
			received += min(t.received[d], n)
		}
	}
	return progressEvent(t.images, t.volumeID, received, total, now.Sub(t.start))
}

// outcome sums up the pull so far; layers is the stack's layer count (0 if
// it did not resolve).
func (t *pullTracker) outcome(step string, layers int, err error) pullOutcome {
	t.mu.Lock()
	defer t.mu.Unlock()
	o := pullOutcome{Images: t.images, VolumeID: t.volumeID, Layers: layers, Duration: time.Since(t.start)}
	for d, n := range t.missing {
		if t.joined[d] {
			o.Joined++
			continue
		}
		o.Downloaded++
		o.Bytes += n
	}
	if err != nil {
		o.Step, o.Err = step, err
	}
	return o
}

// finish reports how the step ended (err nil: the images are all in the
// cache): the event on the pod, and the pull's duration and registry error
// in the metrics.
func (t *pullTracker) finish(step string, layers int, err error) {
	o := t.outcome(step, layers, err)
	if e, ok := outcomeEvent(o); ok {
		t.events.emit(t.pod, e)
	}
	observePull(t.metrics, o)
}

// observePull records o in the metrics: a registry error by kind, and the
// duration of a pull that had layers to download. A pull whose caller gave
// up goes on in the background; the retry that joins it records the end.
func observePull(m *metrics.Metrics, o pullOutcome) {
	if o.Err != nil && o.Step == stepPull && callEnded(o.Err) {
		return
	}
	result := metrics.Success
	if o.Err != nil {
		kind, registry := registryErrorKind(o.Err)
		if registry {
			m.RegistryError(kind)
		}
		result = kind
	}
	if o.missing() > 0 {
		m.ObservePull(result, o.Duration)
	}
}

// callEnded reports whether err is the end of the call's context (kubelet's
// deadline, or a cancelled call) rather than a failure of the work.
func callEnded(err error) bool {
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled)
}

// registryErrorKind classifies a resolve or pull error for
// strata_registry_errors_total. registry is false for failures that are
// neither the registry's nor its image's (a reference that does not parse,
// pull policy Never, a full cache, a full or failing disk, a cancelled call): those have
// kind other.
func registryErrorKind(err error) (kind string, registry bool) {
	switch fault.Of(err) {
	case fault.Invalid:
		// A reference that does not parse is the user's; an image this
		// node cannot use (ErrUnsupported) is the registry's.
		return metrics.KindOther, !errors.Is(err, layercache.ErrInvalidReference)
	case fault.NotCached, fault.NoSpace, fault.IO, fault.Canceled:
		// Pull policy Never; the cache budget, a layer limit
		// (ErrLayerTooLarge) or a full disk; a failing disk; a cancelled call.
		return metrics.KindOther, false
	case fault.NotFound:
		return metrics.KindNotFound, true
	case fault.Denied:
		return metrics.KindUnauthorized, true
	case fault.Unavailable:
		if errors.As(err, new(*layercache.RateLimitError)) {
			return metrics.KindRateLimited, true
		}
		return metrics.KindUnavailable, true
	case fault.Deadline:
		return metrics.KindDeadline, true
	case fault.Corrupt:
		return metrics.KindBadBlob, true
	case fault.Unsafe:
		return metrics.KindUnsafeLayer, true
	}
	return metrics.KindOther, true
}
