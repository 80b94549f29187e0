package capacity

import (
	"context"

	storagev1 "k8s.io/api/storage/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"

	"github.com/strata-csi/strata/internal/fault"
)

// ErrNotSynced: the Reader has not listed the objects yet (Unavailable: a
// retry soon succeeds).
var ErrNotSynced = fault.New(fault.Unavailable, "the nodes' CSIStorageCapacity objects are not listed yet: retry in a moment")

// Reader answers, in the controller, how much room the nodes have, from
// the CSIStorageCapacity objects that their node plugins publish (an
// informer on the driver's objects in its namespace).
type Reader struct {
	driverName, topologyKey string
	factory                 informers.SharedInformerFactory
	inf                     cache.SharedIndexInformer
}

// NewReader returns a Reader of the objects of driverName in namespace,
// whose node topology selects on topologyKey. Run starts it.
func NewReader(kube kubernetes.Interface, namespace, driverName, topologyKey string) *Reader {
	sel := labels.SelectorFromSet(labels.Set{LabelDriverName: driverName}).String()
	factory := informers.NewSharedInformerFactoryWithOptions(kube, 0, informers.WithNamespace(namespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = sel }))
	return &Reader{driverName: driverName, topologyKey: topologyKey, factory: factory,
		inf: factory.Storage().V1().CSIStorageCapacities().Informer()}
}

// Run keeps the Reader's view until ctx ends.
func (r *Reader) Run(ctx context.Context) {
	r.factory.Start(ctx.Done())
	if cache.WaitForCacheSync(ctx.Done(), r.inf.HasSynced) {
		klog.FromContext(ctx).V(2).Info("Reading the nodes' storage capacity")
	}
	<-ctx.Done()
	r.factory.Shutdown()
}

// Node returns the room of node as its plugin last published it; ok is
// false when it published none (an unknown node, or one without the
// plugin). Its classes all carry the same measurement; should they differ
// (a pass under way), the smallest wins.
func (r *Reader) Node(node string) (room Room, ok bool, err error) {
	if !r.inf.HasSynced() {
		return Room{}, false, ErrNotSynced
	}
	for _, obj := range r.inf.GetStore().List() {
		c, _ := obj.(*storagev1.CSIStorageCapacity)
		if n, isNode := r.nodeOf(c); !isNode || n != node {
			continue
		}
		got := roomOf(c)
		if !ok || got.Capacity < room.Capacity {
			room = got
		}
		ok = true
	}
	return room, ok, nil
}

// Nodes returns the room of every node that published one, by node.
func (r *Reader) Nodes() (map[string]Room, error) {
	if !r.inf.HasSynced() {
		return nil, ErrNotSynced
	}
	out := map[string]Room{}
	for _, obj := range r.inf.GetStore().List() {
		c, _ := obj.(*storagev1.CSIStorageCapacity)
		n, isNode := r.nodeOf(c)
		if !isNode {
			continue
		}
		got := roomOf(c)
		if old, seen := out[n]; !seen || got.Capacity < old.Capacity {
			out[n] = got
		}
	}
	return out, nil
}

// nodeOf returns the node an object of the driver describes.
func (r *Reader) nodeOf(c *storagev1.CSIStorageCapacity) (string, bool) {
	if c == nil || c.Labels[LabelDriverName] != r.driverName || c.NodeTopology == nil {
		return "", false
	}
	n, ok := c.NodeTopology.MatchLabels[r.topologyKey]
	return n, ok && len(c.NodeTopology.MatchLabels) == 1 && len(c.NodeTopology.MatchExpressions) == 0
}

// roomOf reads the published room of an object.
func roomOf(c *storagev1.CSIStorageCapacity) Room {
	var r Room
	if c.Capacity != nil {
		r.Capacity = c.Capacity.Value()
	}
	if c.MaximumVolumeSize != nil {
		r.MaximumVolumeSize = c.MaximumVolumeSize.Value()
	}
	return r
}
