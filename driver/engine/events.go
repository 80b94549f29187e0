package engine

import (
	"context"
	"fmt"
	"time"
	"unicode/utf8"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/driver/credentials"
)

// Event reasons on the pod whose volume is published. They read like
// kubelet's for container images (Pulling, Pulled), so that `kubectl
// describe pod` tells the volume's image pull alongside the containers'.
const (
	reasonPulling    = "Pulling"
	reasonPulled     = "Pulled"
	reasonPullFailed = "PullFailed"
)

// Steps of a publish that an event can name.
const (
	stepResolve = "resolve"
	stepPull    = "pull"
)

// podEvent is one event to record on a pod.
type podEvent struct {
	Type, Reason, Message string
}

// pullOutcome is what a publish's resolve and pull of its images came to.
type pullOutcome struct {
	Images   []string // the volume's stack, bottom first
	VolumeID string
	// Step is the step that failed (stepResolve, stepPull), with Err.
	Step string
	Err  error
	// Layers counts the stack's layers. Of those the cache lacked, this
	// publish downloaded Downloaded, of Bytes compressed, and waited for
	// Joined that a pull already in flight was downloading (another
	// volume's, or an earlier attempt of this one whose call ended).
	Layers, Downloaded, Joined int
	Bytes                      int64
	Duration                   time.Duration
}

// missing counts the layers the cache lacked when the publish began.
func (o pullOutcome) missing() int { return o.Downloaded + o.Joined }

// pullingEvent announces a pull that has layers to download.
func pullingEvent(images []string, volumeID string) podEvent {
	return podEvent{corev1.EventTypeNormal, reasonPulling, fmt.Sprintf("Pulling %s for volume %q", DescribeStack(images), volumeID)}
}

// progressEvent tells how far a pull got: received of total compressed
// bytes after elapsed, the rate so far and, at that rate, the time left.
func progressEvent(images []string, volumeID string, received, total int64, elapsed time.Duration) podEvent {
	msg := fmt.Sprintf("Pulling %s for volume %q: %s of %s", DescribeStack(images), volumeID, humanBytes(received), humanBytes(total))
	if total > 0 {
		msg += fmt.Sprintf(" (%d%%)", received*100/total)
	}
	msg += " in " + humanDuration(elapsed)
	if secs := elapsed.Seconds(); secs > 0 && received > 0 {
		rate := float64(received) / secs
		msg += fmt.Sprintf(", %s/s", humanBytes(int64(rate)))
		if eta := time.Duration(float64(total-received) / rate * float64(time.Second)).Round(time.Second); eta > 0 {
			msg += ", about " + eta.String() + " left"
		}
	}
	return podEvent{corev1.EventTypeNormal, reasonPulling, msg}
}

// outcomeEvent chooses the event that reports o; none when the call's
// context ended during the pull, which goes on in the background: kubelet's
// retry joins it and reports how it ends.
func outcomeEvent(o pullOutcome) (podEvent, bool) {
	switch {
	case o.Err != nil && o.Step == stepPull && callEnded(o.Err):
		return podEvent{}, false
	case o.Err != nil:
		verb := "pull"
		if o.Step == stepResolve {
			verb = "resolve"
		}
		return podEvent{corev1.EventTypeWarning, reasonPullFailed,
			fmt.Sprintf("Failed to %s %s for volume %q: %v", verb, DescribeStack(o.Images), o.VolumeID, o.Err)}, true
	case o.missing() == 0:
		cached := "is already cached on the node"
		if len(o.Images) > 1 {
			cached = "are already cached on the node"
		}
		return podEvent{corev1.EventTypeNormal, reasonPulled,
			fmt.Sprintf("%s for volume %q %s", capitalize(DescribeStack(o.Images)), o.VolumeID, cached)}, true
	case o.Downloaded == 0:
		// Each layer is downloaded once per node: this publish waited.
		return podEvent{corev1.EventTypeNormal, reasonPulled,
			fmt.Sprintf("%s for volume %q is ready in %s: it joined a pull in flight for %d of %d layers and downloaded none itself",
				capitalize(DescribeStack(o.Images)), o.VolumeID, humanDuration(o.Duration), o.Joined, o.Layers)}, true
	}
	joined := ""
	if o.Joined > 0 {
		joined = fmt.Sprintf(", %d more by a pull in flight that it joined", o.Joined)
	}
	return podEvent{corev1.EventTypeNormal, reasonPulled,
		fmt.Sprintf("Pulled %s for volume %q in %s (%s, %d of %d layers downloaded%s)",
			DescribeStack(o.Images), o.VolumeID, humanDuration(o.Duration), humanBytes(o.Bytes), o.Downloaded, o.Layers, joined)}, true
}

// capitalize upper-cases the first letter of an ASCII phrase.
func capitalize(s string) string {
	if s == "" || s[0] < 'a' || s[0] > 'z' {
		return s
	}
	return string(s[0]-'a'+'A') + s[1:]
}

// humanBytes formats n in decimal units (kB, MB, GB, TB), as registries and
// kubelet's image sizes are usually read.
func humanBytes(n int64) string {
	if n < 1000 {
		return fmt.Sprintf("%d B", n)
	}
	f := float64(n)
	for _, unit := range []string{"kB", "MB", "GB"} {
		if f /= 1000; f < 999.95 {
			return fmt.Sprintf("%.1f %s", f, unit)
		}
	}
	return fmt.Sprintf("%.1f TB", f/1000)
}

// humanDuration rounds d to what a person reads: milliseconds below a
// second, tenths of a second above.
func humanDuration(d time.Duration) string {
	if d < time.Second {
		return d.Round(time.Millisecond).String()
	}
	return d.Round(100 * time.Millisecond).String()
}

// maxEventMessage bounds a message: events.k8s.io caps notes at 1 kB, and
// an error that quotes a registry's answer can be longer.
const maxEventMessage = 1024

func truncateMessage(s string) string {
	if len(s) <= maxEventMessage {
		return s
	}
	s = s[:maxEventMessage-len("…")]
	for !utf8.ValidString(s) {
		s = s[:len(s)-1]
	}
	return s + "…"
}

// podReference is the event's involvedObject. The pod is not read from the
// API: kubelet's word is enough, and the plugin needs no get on pods.
func podReference(p credentials.Pod) *corev1.ObjectReference {
	return &corev1.ObjectReference{Kind: "Pod", APIVersion: "v1", Namespace: p.Namespace, Name: p.Name, UID: types.UID(p.UID)}
}

// podEvents records events on pods through client-go's broadcaster, which
// queues them (at most 1000, then drops) and writes them to the API server
// from a goroutine of its own, retrying, aggregating repeats and limiting
// spam as kubelet's do. A nil *podEvents records nothing (no API access).
type podEvents struct {
	broadcaster record.EventBroadcaster
	recorder    record.EventRecorder
	cancel      context.CancelFunc
}

// eventRequestTimeout bounds one write to the API server, so that a hung
// server costs queued events, never a stuck goroutine after shutdown.
const eventRequestTimeout = 10 * time.Second

// newPodEvents starts the broadcaster; component and host are the events'
// source (the driver name and the node name). nil without an API client.
func newPodEvents(kube kubernetes.Interface, component, host string) *podEvents {
	if kube == nil {
		return nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	b := record.NewBroadcaster(record.WithContext(ctx))
	b.StartRecordingToSink(&eventSink{ctx: ctx, events: kube.CoreV1().Events("")})
	return &podEvents{
		broadcaster: b,
		recorder:    b.NewRecorder(scheme.Scheme, corev1.EventSource{Component: component, Host: host}),
		cancel:      cancel,
	}
}

// emit queues e on pod; it never blocks. Without a pod name (kubelet was
// not asked for podInfoOnMount), there is nothing to record it on.
func (p *podEvents) emit(pod credentials.Pod, e podEvent) {
	if p == nil || pod.Name == "" || pod.Namespace == "" {
		return
	}
	klog.V(4).InfoS("Event on pod", "pod", klog.KRef(pod.Namespace, pod.Name), "type", e.Type, "reason", e.Reason, "message", e.Message)
	p.recorder.Event(podReference(pod), e.Type, e.Reason, truncateMessage(e.Message))
}

// shutdown stops the broadcaster: queued events not yet written are lost,
// and a write in progress is cancelled.
func (p *podEvents) shutdown() {
	if p == nil {
		return
	}
	p.broadcaster.Shutdown()
	p.cancel()
}

// eventSink writes events to the API server with a timeout per request,
// under a context that shutdown cancels.
type eventSink struct {
	ctx    context.Context
	events typedcorev1.EventInterface
}

var _ record.EventSink = (*eventSink)(nil)

func (s *eventSink) Create(e *corev1.Event) (*corev1.Event, error) {
	ctx, cancel := context.WithTimeout(s.ctx, eventRequestTimeout)
	defer cancel()
	return s.events.CreateWithEventNamespaceWithContext(ctx, e)
}

func (s *eventSink) Update(e *corev1.Event) (*corev1.Event, error) {
	ctx, cancel := context.WithTimeout(s.ctx, eventRequestTimeout)
	defer cancel()
	return s.events.UpdateWithEventNamespaceWithContext(ctx, e)
}

func (s *eventSink) Patch(e *corev1.Event, data []byte) (*corev1.Event, error) {
	ctx, cancel := context.WithTimeout(s.ctx, eventRequestTimeout)
	defer cancel()
	return s.events.PatchWithEventNamespaceWithContext(ctx, e, data)
}
