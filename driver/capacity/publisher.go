package capacity

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"
)

// Labels of the CSIStorageCapacity objects, as external-provisioner sets
// them.
const (
	LabelDriverName = "csi.storage.k8s.io/drivername"
	LabelManagedBy  = "csi.storage.k8s.io/managed-by"
)

// DefaultInterval is how often a node measures its room and brings its
// objects up to date without another cause (external-provisioner's
// --capacity-poll-interval default): the cache and the pods' writes change
// the room between stages.
const DefaultInterval = time.Minute

// Measurer measures the node's room (Measure, with the cache's reserve).
type Measurer func() (Room, error)

// Config configures a Publisher.
type Config struct {
	Kube       kubernetes.Interface
	DriverName string // the CSI driver name: the classes' provisioner
	NodeID     string // this node's name: the Node that owns the objects
	// TopologyKey is the node label that the objects' nodeTopology selects
	// on (the driver's topology segment, whose value is NodeID).
	TopologyKey string
	// Namespace holds the objects: the driver's own.
	Namespace string
	Measure   Measurer
	// Interval between measurements (DefaultInterval when 0).
	Interval time.Duration
}

// Publisher keeps one CSIStorageCapacity per Strata StorageClass for its
// node in the driver's namespace: created as classes appear, updated when
// the room changes, deleted when classes go, and owned by the Node so that
// they go with it.
type Publisher struct {
	cfg       Config
	managedBy string
	trigger   chan struct{}
	// full remembers that the last measurement found no room, so that
	// the log says so once, not every pass. Only Sync touches it.
	full bool
}

// NewPublisher checks cfg and returns a Publisher; Run runs it.
func NewPublisher(cfg Config) (*Publisher, error) {
	switch {
	case cfg.Kube == nil:
		return nil, errors.New("storage capacity: no Kubernetes API access")
	case cfg.DriverName == "", cfg.NodeID == "", cfg.TopologyKey == "":
		return nil, errors.New("storage capacity: the driver name, node id and topology key are required")
	case cfg.Namespace == "":
		return nil, errors.New("storage capacity: no namespace for the CSIStorageCapacity objects: pass --capacity-namespace (the driver's namespace)")
	case cfg.Measure == nil:
		return nil, errors.New("storage capacity: nothing measures the node's room")
	}
	if errs := validation.IsValidLabelValue(cfg.NodeID); len(errs) > 0 {
		return nil, fmt.Errorf("storage capacity: node id %q cannot be a label value of the node's topology: %v", cfg.NodeID, errs)
	}
	if cfg.Interval <= 0 {
		cfg.Interval = DefaultInterval
	}
	return &Publisher{cfg: cfg, managedBy: ManagedBy(cfg.NodeID), trigger: make(chan struct{}, 1)}, nil
}

// ManagedBy is the managed-by label of the objects of node nodeID:
// "strata-csi-<node>" (external-provisioner writes
// "external-provisioner-<node>"), or a hash of the node's name where that
// is no valid label value.
func ManagedBy(nodeID string) string {
	v := "strata-csi-" + nodeID
	if len(validation.IsValidLabelValue(v)) == 0 {
		return v
	}
	h := sha256.Sum256([]byte(nodeID))
	return "strata-csi-" + hex.EncodeToString(h[:12])
}

// objectName is the name of the object of class on node: fixed, so that a
// restarted plugin, or two passes racing, update one object, never make two.
func objectName(driverName, nodeID, class string) string {
	h := sha256.Sum256([]byte(driverName + "\x00" + nodeID + "\x00" + class))
	return "strata-" + hex.EncodeToString(h[:16])
}

// Refresh asks for a measurement and an update soon (after a clone was
// made or removed); it never blocks.
func (p *Publisher) Refresh() {
	select {
	case p.trigger <- struct{}{}:
	default:
	}
}

// Run watches StorageClasses and keeps the node's objects up to date until
// ctx ends: once the classes are listed, whenever a class of the driver
// appears or goes, after each Refresh, and every Interval.
func (p *Publisher) Run(ctx context.Context) {
	logger := klog.FromContext(ctx)
	factory := informers.NewSharedInformerFactory(p.cfg.Kube, 0)
	classes := factory.Storage().V1().StorageClasses()
	inf := classes.Informer()
	changed := func(obj any) {
		if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = t.Obj
		}
		if sc, ok := obj.(*storagev1.StorageClass); ok && sc.Provisioner == p.cfg.DriverName {
			p.Refresh()
		}
	}
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: changed, DeleteFunc: changed, UpdateFunc: func(_, obj any) { changed(obj) },
	}); err != nil {
		logger.Error(err, "Cannot watch StorageClasses; this node's storage capacity is not published")
		return
	}
	factory.Start(ctx.Done())
	defer factory.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
		return
	}
	logger.V(2).Info("Publishing this node's storage capacity", "namespace", p.cfg.Namespace, "interval", p.cfg.Interval)
	tick := time.NewTicker(p.cfg.Interval)
	defer tick.Stop()
	for {
		all, err := classes.Lister().List(labels.Everything())
		if err == nil {
			err = p.Sync(ctx, all)
		}
		if err != nil && ctx.Err() == nil {
			logger.Error(err, "Cannot publish this node's storage capacity; the scheduler sees the last published value", "node", p.cfg.NodeID)
		}
		select {
		case <-ctx.Done():
			return
		case <-p.trigger:
		case <-tick.C:
		}
	}
}

// Sync measures the room once and brings the node's objects in line with
// classes: one per class whose provisioner is the driver, none for any
// other.
func (p *Publisher) Sync(ctx context.Context, classes []*storagev1.StorageClass) error {
	logger := klog.FromContext(ctx)
	room, err := p.cfg.Measure()
	if err != nil {
		return err
	}
	if full := room.MaximumVolumeSize == 0; full != p.full {
		p.full = full
		if full {
			logger.Info("This node has no room for a new persistent clone: the scheduler places none here", "node", p.cfg.NodeID,
				"availableBytes", room.Available, "cacheReserveBytes", room.CacheReserve, "sparseReserveBytes", room.SparseReserve)
		} else {
			logger.Info("This node has room for new persistent clones again", "node", p.cfg.NodeID, "maximumVolumeSizeBytes", room.MaximumVolumeSize)
		}
	}
	node, err := p.cfg.Kube.CoreV1().Nodes().Get(ctx, p.cfg.NodeID, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("get node %s, the owner of its CSIStorageCapacity objects: %w", p.cfg.NodeID, err)
	}
	owner := metav1.OwnerReference{APIVersion: "v1", Kind: "Node", Name: node.Name, UID: node.UID}
	want := map[string]*storagev1.CSIStorageCapacity{}
	for _, sc := range classes {
		if sc.Provisioner == p.cfg.DriverName {
			want[sc.Name] = p.object(sc.Name, room, owner)
		}
	}
	api := p.cfg.Kube.StorageV1().CSIStorageCapacities(p.cfg.Namespace)
	have, err := api.List(ctx, metav1.ListOptions{LabelSelector: labels.SelectorFromSet(labels.Set{
		LabelDriverName: p.cfg.DriverName, LabelManagedBy: p.managedBy,
	}).String()})
	if err != nil {
		return fmt.Errorf("list the CSIStorageCapacity objects of node %s in %s: %w", p.cfg.NodeID, p.cfg.Namespace, err)
	}
	var errs []error
	for i := range have.Items {
		old := &have.Items[i]
		w, ok := want[old.StorageClassName]
		if !ok || old.Name != w.Name {
			// Its class is gone (or it is no object of ours by name).
			if err := api.Delete(ctx, old.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
				errs = append(errs, fmt.Errorf("delete CSIStorageCapacity %s/%s: %w", old.Namespace, old.Name, err))
			} else {
				logger.V(2).Info("Deleted the storage capacity of a class that is gone", "storageClass", old.StorageClassName, "object", old.Name)
			}
			continue
		}
		delete(want, old.StorageClassName)
		if same(old, w) {
			continue
		}
		upd := old.DeepCopy()
		upd.Labels, upd.OwnerReferences, upd.NodeTopology = w.Labels, w.OwnerReferences, w.NodeTopology
		upd.Capacity, upd.MaximumVolumeSize = w.Capacity, w.MaximumVolumeSize
		if _, err := api.Update(ctx, upd, metav1.UpdateOptions{}); err != nil {
			errs = append(errs, fmt.Errorf("update CSIStorageCapacity %s/%s: %w", old.Namespace, old.Name, err))
			continue
		}
		logger.V(4).Info("Updated the storage capacity", "storageClass", old.StorageClassName, "capacityBytes", room.Capacity,
			"maximumVolumeSizeBytes", room.MaximumVolumeSize, "availableBytes", room.Available,
			"cacheReserveBytes", room.CacheReserve, "sparseReserveBytes", room.SparseReserve)
	}
	for class, w := range want {
		if _, err := api.Create(ctx, w, metav1.CreateOptions{}); err != nil {
			errs = append(errs, fmt.Errorf("create CSIStorageCapacity %s/%s for class %s: %w", w.Namespace, w.Name, class, err))
			continue
		}
		logger.V(2).Info("Published the storage capacity of a class", "storageClass", class, "object", w.Name,
			"capacityBytes", room.Capacity, "maximumVolumeSizeBytes", room.MaximumVolumeSize, "availableBytes", room.Available,
			"cacheReserveBytes", room.CacheReserve, "sparseReserveBytes", room.SparseReserve)
	}
	return errors.Join(errs...)
}

// object is the wanted CSIStorageCapacity of class on this node.
func (p *Publisher) object(class string, room Room, owner metav1.OwnerReference) *storagev1.CSIStorageCapacity {
	return &storagev1.CSIStorageCapacity{
		ObjectMeta: metav1.ObjectMeta{
			Name:            objectName(p.cfg.DriverName, p.cfg.NodeID, class),
			Namespace:       p.cfg.Namespace,
			Labels:          map[string]string{LabelDriverName: p.cfg.DriverName, LabelManagedBy: p.managedBy},
			OwnerReferences: []metav1.OwnerReference{owner},
		},
		NodeTopology:      &metav1.LabelSelector{MatchLabels: map[string]string{p.cfg.TopologyKey: p.cfg.NodeID}},
		StorageClassName:  class,
		Capacity:          resource.NewQuantity(room.Capacity, resource.BinarySI),
		MaximumVolumeSize: resource.NewQuantity(room.MaximumVolumeSize, resource.BinarySI),
	}
}

// same reports whether old already says what w says.
func same(old, w *storagev1.CSIStorageCapacity) bool {
	eq := func(a, b *resource.Quantity) bool { return a != nil && b != nil && a.Cmp(*b) == 0 }
	ownerOK := len(old.OwnerReferences) == 1 && old.OwnerReferences[0].UID == w.OwnerReferences[0].UID &&
		old.OwnerReferences[0].Kind == "Node"
	topoOK := old.NodeTopology != nil && len(old.NodeTopology.MatchExpressions) == 0 &&
		len(old.NodeTopology.MatchLabels) == 1 && old.NodeTopology.MatchLabels[keyOf(w)] == w.NodeTopology.MatchLabels[keyOf(w)]
	return eq(old.Capacity, w.Capacity) && eq(old.MaximumVolumeSize, w.MaximumVolumeSize) && ownerOK && topoOK
}

// keyOf is the one key of w's node topology.
func keyOf(w *storagev1.CSIStorageCapacity) string {
	for k := range w.NodeTopology.MatchLabels {
		return k
	}
	return ""
}
