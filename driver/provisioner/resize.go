package provisioner

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/kubernetes-csi/csi-lib-utils/accessmodes"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/strategicpatch"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"
)

// Event reasons on a claim, external-resizer's (pkg/util).
const (
	reasonResizing        = "Resizing"
	reasonResizeFailed    = "VolumeResizeFailed"
	reasonFSResizeNeeded  = "FileSystemResizeRequired"
	reasonResizeSucceeded = "VolumeResizeSuccessful"
)

// resyncPeriod re-lists claims and volumes, so that a failed expansion is
// tried again even without a change of the claim.
const resyncPeriod = 10 * time.Minute

// ResizerOption configures a Resizer.
type ResizerOption func(*Resizer) error

// WithRecorder records the claims' events with rec instead of posting them
// to the API server (tests).
func WithRecorder(rec record.EventRecorder) ResizerOption {
	return func(r *Resizer) error { r.recorder = rec; return nil }
}

// Resizer grows the PersistentVolumes of a CSI driver when their claims ask
// for more, in-process, without the external-resizer sidecar: it calls the
// driver's ControllerExpandVolume, sets the PV's capacity and leaves the
// claim's status as external-resizer does with RecoverVolumeExpansionFailure
// (GA in Kubernetes 1.34): allocatedResources, allocatedResourceStatuses
// NodeResizePending and the FileSystemResizePending condition, after which
// kubelet calls NodeExpandVolume on the volume's node and finishes the
// claim's status.
type Resizer struct {
	driver   string
	cs       csi.ControllerServer
	kube     kubernetes.Interface
	recorder record.EventRecorder // WithRecorder's; nil: the API server's, per Run
	events   record.EventRecorder // the one in use
	pvcs     corelisters.PersistentVolumeClaimLister
	pvs      corelisters.PersistentVolumeLister
	queue    workqueue.TypedRateLimitingInterface[string]
}

// NewResizer returns a Resizer of the PVs of driver that calls cs (usually
// the *driver.Driver) and watches claims and volumes through kube.
func NewResizer(driver string, cs csi.ControllerServer, kube kubernetes.Interface, opts ...ResizerOption) (*Resizer, error) {
	if driver == "" {
		return nil, errors.New("resizer needs the CSI driver name")
	}
	if cs == nil {
		return nil, errors.New("resizer needs a CSI controller service")
	}
	if kube == nil {
		return nil, errors.New("the resizer needs the Kubernetes API: run it in a pod or give --kubeconfig")
	}
	r := &Resizer{driver: driver, cs: cs, kube: kube}
	for _, o := range opts {
		if err := o(r); err != nil {
			return nil, err
		}
	}
	return r, nil
}

// Run watches claims and volumes and resizes until ctx ends.
func (r *Resizer) Run(ctx context.Context) {
	logger := klog.FromContext(ctx).WithValues("resizer", r.driver)
	ctx = klog.NewContext(ctx, logger)
	r.events = r.recorder
	if r.events == nil {
		b := record.NewBroadcaster(record.WithContext(ctx))
		b.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: r.kube.CoreV1().Events("")})
		defer b.Shutdown()
		r.events = b.NewRecorder(scheme.Scheme, v1.EventSource{Component: "external-resizer " + r.driver})
	}
	r.queue = workqueue.NewTypedRateLimitingQueueWithConfig(workqueue.DefaultTypedControllerRateLimiter[string](),
		workqueue.TypedRateLimitingQueueConfig[string]{Name: "strata-resizer"})
	defer r.queue.ShutDown()

	factory := informers.NewSharedInformerFactory(r.kube, resyncPeriod)
	pvcInformer := factory.Core().V1().PersistentVolumeClaims()
	pvInformer := factory.Core().V1().PersistentVolumes()
	r.pvcs, r.pvs = pvcInformer.Lister(), pvInformer.Lister()
	enqueue := func(obj any) {
		if key, err := cache.MetaNamespaceKeyFunc(obj); err == nil {
			r.queue.Add(key)
		}
	}
	if _, err := pvcInformer.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: enqueue, UpdateFunc: func(_, obj any) { enqueue(obj) },
	}); err != nil {
		logger.Error(err, "Could not watch PersistentVolumeClaims")
		return
	}
	// A PV's change (its capacity, its claim) brings its claim back.
	claimOf := func(obj any) {
		if pv, ok := obj.(*v1.PersistentVolume); ok && pv.Spec.ClaimRef != nil && r.ours(pv) {
			r.queue.Add(pv.Spec.ClaimRef.Namespace + "/" + pv.Spec.ClaimRef.Name)
		}
	}
	if _, err := pvInformer.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: claimOf, UpdateFunc: func(_, obj any) { claimOf(obj) },
	}); err != nil {
		logger.Error(err, "Could not watch PersistentVolumes")
		return
	}
	factory.Start(ctx.Done())
	defer factory.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), pvcInformer.Informer().HasSynced, pvInformer.Informer().HasSynced) {
		return
	}
	logger.Info("Resizing PersistentVolumes of this driver whose claims ask for more")
	go wait.UntilWithContext(ctx, r.worker, time.Second)
	<-ctx.Done()
	logger.Info("Resizer stopped")
}

// worker processes claims until the queue shuts down.
func (r *Resizer) worker(ctx context.Context) {
	for {
		key, quit := r.queue.Get()
		if quit {
			return
		}
		if err := r.sync(ctx, key); err != nil {
			klog.FromContext(ctx).Error(err, "Resize failed; retrying", "claim", key)
			r.queue.AddRateLimited(key)
		} else {
			r.queue.Forget(key)
		}
		r.queue.Done(key)
	}
}

// ours reports whether pv is a CSI volume of this driver.
func (r *Resizer) ours(pv *v1.PersistentVolume) bool {
	return pv.Spec.CSI != nil && pv.Spec.CSI.Driver == r.driver
}

// sync resizes the volume of claim key if its claim asks for more than the
// volume has, following external-resizer's expandAndRecover.
func (r *Resizer) sync(ctx context.Context, key string) error {
	ns, name, err := cache.SplitMetaNamespaceKey(key)
	if err != nil {
		return nil
	}
	pvc, err := r.pvcs.PersistentVolumeClaims(ns).Get(name)
	if apierrors.IsNotFound(err) {
		return nil
	} else if err != nil {
		return err
	}
	if pvc.Status.Phase != v1.ClaimBound || pvc.Spec.VolumeName == "" {
		return nil
	}
	pv, err := r.pvs.Get(pvc.Spec.VolumeName)
	if apierrors.IsNotFound(err) {
		return nil
	} else if err != nil {
		return err
	}
	if !r.ours(pv) || pv.Spec.ClaimRef == nil || pv.Spec.ClaimRef.Namespace != pvc.Namespace || pv.Spec.ClaimRef.UID != pvc.UID {
		return nil
	}
	if _, act := r.plan(pvc, pv, true); !act {
		return nil
	}
	// The informers' copies may lag behind this resizer's own last
	// writes: decide again on the API server's.
	if pvc, err = r.kube.CoreV1().PersistentVolumeClaims(ns).Get(ctx, name, metav1.GetOptions{}); err != nil {
		return ignoreNotFound(err)
	}
	if pv, err = r.kube.CoreV1().PersistentVolumes().Get(ctx, pv.Name, metav1.GetOptions{}); err != nil {
		return ignoreNotFound(err)
	}
	newSize, act := r.plan(pvc, pv, false)
	if !act {
		return nil
	}
	logger := klog.FromContext(ctx).WithValues("claim", key, "pv", pv.Name, "volumeID", pv.Spec.CSI.VolumeHandle)
	pvSize := pv.Spec.Capacity[v1.ResourceStorage]
	resizeStatus := pvc.Status.AllocatedResourceStatuses[v1.ResourceStorage]
	var allocated *resource.Quantity
	if q, ok := pvc.Status.AllocatedResources[v1.ResourceStorage]; ok {
		allocated = &q
	}

	// Mark the claim: Resizing, ControllerResizeInProgress, allocated.
	if allocated == nil || allocated.Cmp(newSize) != 0 || resizeStatus != v1.PersistentVolumeClaimControllerResizeInProgress {
		next := pvc.DeepCopy()
		next.Status.Conditions = mergeResizeConditions(next.Status.Conditions, v1.PersistentVolumeClaimCondition{
			Type: v1.PersistentVolumeClaimResizing, Status: v1.ConditionTrue, LastTransitionTime: metav1.Now(),
		})
		setResizeStatus(next, v1.PersistentVolumeClaimControllerResizeInProgress)
		if next.Status.AllocatedResources == nil {
			next.Status.AllocatedResources = v1.ResourceList{}
		}
		next.Status.AllocatedResources[v1.ResourceStorage] = newSize
		if pvc, err = r.patchClaimStatus(ctx, pvc, next); err != nil {
			return fmt.Errorf("mark claim %s as resizing: %w", key, err)
		}
	}
	r.events.Eventf(pvc, v1.EventTypeNormal, reasonResizing, "External resizer is resizing volume %s", pv.Name)

	resp, err := r.cs.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{
		VolumeId:         pv.Spec.CSI.VolumeHandle,
		CapacityRange:    &csi.CapacityRange{RequiredBytes: newSize.Value()},
		VolumeCapability: volumeCapability(pv),
	})
	if err != nil {
		err = fmt.Errorf("resize volume %q by resizer %q failed: %w", pv.Name, r.driver, err)
		r.events.Event(pvc, v1.EventTypeWarning, reasonResizeFailed, err.Error())
		if infeasible(err) {
			next := pvc.DeepCopy()
			setResizeStatus(next, v1.PersistentVolumeClaimControllerResizeInfeasible)
			next.Status.Conditions = mergeResizeConditions(next.Status.Conditions, v1.PersistentVolumeClaimCondition{
				Type: v1.PersistentVolumeClaimControllerResizeError, Status: v1.ConditionTrue, LastTransitionTime: metav1.Now(), Message: err.Error(),
			})
			if _, perr := r.patchClaimStatus(ctx, pvc, next); perr != nil {
				return fmt.Errorf("%w; and marking the claim failed: %v", err, perr)
			}
			logger.Error(err, "Volume cannot be resized to the requested size")
			return nil // final until the claim changes
		}
		return err
	}
	got := *resource.NewQuantity(resp.GetCapacityBytes(), resource.BinarySI)
	if resp.GetCapacityBytes() < newSize.Value() {
		got = newSize
	}
	if got.Cmp(pvSize) > 0 {
		if err := r.patchPVCapacity(ctx, pv, got); err != nil {
			err = fmt.Errorf("update capacity of PV %q to %s: %w", pv.Name, got.String(), err)
			r.events.Event(pvc, v1.EventTypeWarning, reasonResizeFailed, err.Error())
			return err
		}
	}
	next := pvc.DeepCopy()
	if resp.GetNodeExpansionRequired() {
		next.Status.Conditions = mergeResizeConditions(next.Status.Conditions, v1.PersistentVolumeClaimCondition{
			Type: v1.PersistentVolumeClaimFileSystemResizePending, Status: v1.ConditionTrue, LastTransitionTime: metav1.Now(),
			Message: "Waiting for user to (re-)start a pod to finish file system resize of volume on node.",
		})
		setResizeStatus(next, v1.PersistentVolumeClaimNodeResizePending)
		if _, err := r.patchClaimStatus(ctx, pvc, next); err != nil {
			return fmt.Errorf("mark claim %s as waiting for its node's expansion: %w", key, err)
		}
		r.events.Event(pvc, v1.EventTypeNormal, reasonFSResizeNeeded, "Require file system resize of volume on node")
		logger.Info("Volume resized; its node grows it next", "capacity", got.String())
		return nil
	}
	if next.Status.Capacity == nil {
		next.Status.Capacity = v1.ResourceList{}
	}
	next.Status.Capacity[v1.ResourceStorage] = got
	next.Status.Conditions = mergeResizeConditions(next.Status.Conditions)
	delete(next.Status.AllocatedResourceStatuses, v1.ResourceStorage)
	if len(next.Status.AllocatedResourceStatuses) == 0 {
		next.Status.AllocatedResourceStatuses = nil
	}
	if _, err := r.patchClaimStatus(ctx, pvc, next); err != nil {
		return fmt.Errorf("mark claim %s as resized: %w", key, err)
	}
	r.events.Event(pvc, v1.EventTypeNormal, reasonResizeSucceeded, "Resize volume succeeded")
	logger.Info("Volume resized", "capacity", got.String())
	return nil
}

// plan decides, as external-resizer's expandAndRecover does, whether the
// volume of pvc is to be expanded, and to which size. tell: a claim that
// asks for less than its volume gets an event.
func (r *Resizer) plan(pvc *v1.PersistentVolumeClaim, pv *v1.PersistentVolume, tell bool) (resource.Quantity, bool) {
	spec := pvc.Spec.Resources.Requests[v1.ResourceStorage]
	pvSize := pv.Spec.Capacity[v1.ResourceStorage]
	statusSize := pvc.Status.Capacity[v1.ResourceStorage]
	resizeStatus := pvc.Status.AllocatedResourceStatuses[v1.ResourceStorage]
	var allocated *resource.Quantity
	if q, ok := pvc.Status.AllocatedResources[v1.ResourceStorage]; ok {
		allocated = &q
	}
	newSize := spec
	if spec.Cmp(statusSize) <= 0 {
		if spec.Cmp(pvSize) < 0 && resizeStatus == "" && tell {
			// The API server refuses a request below the claim's
			// capacity; a claim that still asks for less than its volume
			// (a PV grown by hand, or an edit the API let through) gets
			// told once per change, and nothing shrinks.
			r.events.Eventf(pvc, v1.EventTypeWarning, reasonResizeFailed,
				"resize volume %s: the claim asks for %s, less than the volume's %s: a %s volume cannot shrink", pv.Name, spec.String(), pvSize.String(), r.driver)
		}
		return newSize, false
	}

	if pvSize.Cmp(spec) < 0 {
		switch resizeStatus {
		case v1.PersistentVolumeClaimNodeResizeInfeasible:
			if allocated != nil {
				newSize = *allocated
			}
		case v1.PersistentVolumeClaimNodeResizePending, v1.PersistentVolumeClaimNodeResizeInProgress:
			// Let the node finish the expansion under way first.
			if allocated != nil {
				newSize = *allocated
			}
			if pvSize.Cmp(newSize) >= 0 {
				return newSize, false
			}
		case v1.PersistentVolumeClaimControllerResizeInProgress:
			if allocated != nil {
				newSize = *allocated
			}
		}
	} else {
		// The PV is grown already.
		switch resizeStatus {
		case v1.PersistentVolumeClaimNodeResizeInProgress, v1.PersistentVolumeClaimNodeResizePending:
			return newSize, false // kubelet's turn
		case v1.PersistentVolumeClaimNodeResizeInfeasible:
			if allocated != nil {
				newSize = *allocated
			}
		case v1.PersistentVolumeClaimControllerResizeInProgress, v1.PersistentVolumeClaimControllerResizeInfeasible:
			if allocated != nil {
				newSize = *allocated
			}
		default:
			if allocated != nil {
				newSize = *allocated
			} else if hasResizeCondition(pvc, v1.PersistentVolumeClaimFileSystemResizePending) {
				return newSize, false
			}
		}
	}
	if resizeStatus == v1.PersistentVolumeClaimControllerResizeInfeasible && allocated != nil && allocated.Cmp(newSize) == 0 {
		// The same size failed for good before; a new request retries.
		return newSize, false
	}

	return newSize, true
}

// ignoreNotFound is nil for an object that is gone, else err.
func ignoreNotFound(err error) error {
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}

// infeasible reports whether the controller service refused the size for
// good (external-resizer's IsInfeasibleError): retrying the same request
// will not help.
func infeasible(err error) bool {
	st, ok := status.FromError(errors.Unwrap(err))
	if !ok {
		return false
	}
	switch st.Code() {
	case codes.InvalidArgument, codes.OutOfRange, codes.NotFound:
		return true
	}
	return false
}

// volumeCapability is the capability of pv's access modes, as the
// provisioner builds it for CreateVolume: a ReadOnlyMany volume is the image
// itself.
func volumeCapability(pv *v1.PersistentVolume) *csi.VolumeCapability {
	c := &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}}}
	if mode, err := accessmodes.ToCSIAccessMode(pv.Spec.AccessModes, true); err == nil {
		c.AccessMode = &csi.VolumeCapability_AccessMode{Mode: mode}
	}
	return c
}

// resizeConditions are the claim conditions a resize owns; the others stay.
var resizeConditions = map[v1.PersistentVolumeClaimConditionType]bool{
	v1.PersistentVolumeClaimResizing:                true,
	v1.PersistentVolumeClaimFileSystemResizePending: true,
	v1.PersistentVolumeClaimControllerResizeError:   true,
	v1.PersistentVolumeClaimNodeResizeError:         true,
}

// mergeResizeConditions replaces the resize conditions of old by set,
// keeping the others.
func mergeResizeConditions(old []v1.PersistentVolumeClaimCondition, set ...v1.PersistentVolumeClaimCondition) []v1.PersistentVolumeClaimCondition {
	var out []v1.PersistentVolumeClaimCondition
	for _, c := range old {
		if !resizeConditions[c.Type] {
			out = append(out, c)
		}
	}
	return append(out, set...)
}

func hasResizeCondition(pvc *v1.PersistentVolumeClaim, t v1.PersistentVolumeClaimConditionType) bool {
	for _, c := range pvc.Status.Conditions {
		if c.Type == t && c.Status == v1.ConditionTrue {
			return true
		}
	}
	return false
}

func setResizeStatus(pvc *v1.PersistentVolumeClaim, s v1.ClaimResourceStatus) {
	if pvc.Status.AllocatedResourceStatuses == nil {
		pvc.Status.AllocatedResourceStatuses = map[v1.ResourceName]v1.ClaimResourceStatus{}
	}
	pvc.Status.AllocatedResourceStatuses[v1.ResourceStorage] = s
}

// patchClaimStatus patches the status of old to that of next, with
// old's resourceVersion as a precondition (external-resizer's
// PatchPVCStatus).
func (r *Resizer) patchClaimStatus(ctx context.Context, old, next *v1.PersistentVolumeClaim) (*v1.PersistentVolumeClaim, error) {
	patch, err := twoWayPatch(old, next, &v1.PersistentVolumeClaim{})
	if err != nil {
		return nil, err
	}
	return r.kube.CoreV1().PersistentVolumeClaims(old.Namespace).Patch(ctx, old.Name, types.StrategicMergePatchType, patch, metav1.PatchOptions{}, "status")
}

// patchPVCapacity sets pv's capacity to size.
func (r *Resizer) patchPVCapacity(ctx context.Context, pv *v1.PersistentVolume, size resource.Quantity) error {
	next := pv.DeepCopy()
	next.Spec.Capacity[v1.ResourceStorage] = size
	patch, err := twoWayPatch(pv, next, &v1.PersistentVolume{})
	if err != nil {
		return err
	}
	_, err = r.kube.CoreV1().PersistentVolumes().Patch(ctx, pv.Name, types.StrategicMergePatchType, patch, metav1.PatchOptions{})
	return err
}

// twoWayPatch is the strategic merge patch from old to next, with old's
// resourceVersion, so that a change in between makes the patch fail.
func twoWayPatch(old, next, kind any) ([]byte, error) {
	a, err := json.Marshal(old)
	if err != nil {
		return nil, err
	}
	b, err := json.Marshal(next)
	if err != nil {
		return nil, err
	}
	patch, err := strategicpatch.CreateTwoWayMergePatch(a, b, kind)
	if err != nil {
		return nil, err
	}
	var m map[string]any
	if err := json.Unmarshal(patch, &m); err != nil {
		return nil, err
	}
	meta, _ := m["metadata"].(map[string]any)
	if meta == nil {
		meta = map[string]any{}
	}
	if o, ok := old.(metav1.Object); ok {
		meta["resourceVersion"] = o.GetResourceVersion()
	}
	m["metadata"] = meta
	return json.Marshal(m)
}
