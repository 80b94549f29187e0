package driver

import (
	"context"
	"fmt"
	"slices"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/strata-csi/strata/driver/engine"
	"github.com/strata-csi/strata/driver/state"
)

// cloneSource is the volume a new clone starts from (a CSI clone: the
// request's VolumeContentSource.Volume, a claim whose dataSource is another
// claim): what CreateVolume checks the request against.
type cloneSource struct {
	id string
	// clone: the source is a persistent clone; a volume that is the image
	// itself has no writes to copy.
	clone bool
	// images is the source's stack, bottom first, as its context names it.
	images []string
	// capacity is the source's size in bytes, grown sizes included where
	// known (0: unknown).
	capacity int64
	// node is the node the source clone lives on ("" if unknown).
	node string
	// from says where the source was found, for the log.
	from string
}

// findCloneSource finds the source volume id of a CSI clone: a volume this
// controller created; else, when the plugin serves the node too
// (--mode=all), a clone on this node (its clone.json); else, with API
// access, the PersistentVolume of this driver with that volumeHandle. A
// source found nowhere is NotFound naming it.
func (d *Driver) findCloneSource(ctx context.Context, name, id string) (*cloneSource, error) {
	if id == "" {
		return nil, invalid("CreateVolume %s: the volume content source names no volume id", name)
	}
	src, err := d.createdSource(id)
	if err != nil {
		return nil, err
	}
	if d.mode == ModeAll && d.cfg.Root != "" && state.CheckCloneID(id) == nil {
		c, err := state.ReadClone(d.cfg.Root, id)
		if err != nil {
			return nil, fmt.Errorf("CreateVolume %s: read the source clone %s on this node: %w", name, id, err)
		}
		switch {
		case c != nil && src == nil:
			src = &cloneSource{id: id, clone: true, images: c.Refs(), capacity: c.CapacityBytes, node: d.cfg.NodeID, from: "node"}
		case c != nil && src.node == d.cfg.NodeID:
			// The node's record holds the size the clone has grown to.
			src.capacity = max(src.capacity, c.CapacityBytes)
		}
	}
	if src == nil && d.cfg.Kube != nil {
		if src, err = d.persistentVolumeSource(ctx, id); err != nil {
			return nil, fmt.Errorf("CreateVolume %s: look up the source volume %s: %w", name, id, err)
		}
	}
	if src == nil {
		return nil, status.Errorf(codes.NotFound, "CreateVolume %s: the source volume %q does not exist: no volume of %s has that id "+
			"(is the source claim bound, and of the same StorageClass?)", name, id, d.name)
	}
	return src, nil
}

// createdSource is volume id if this controller created it, else nil.
func (d *Driver) createdSource(id string) (*cloneSource, error) {
	c := &d.controller
	c.mu.Lock()
	v := c.byID[id]
	c.mu.Unlock()
	if v == nil {
		return nil, nil
	}
	return sourceOf(id, v.params, v.capacity, topologyNode(v.topology), "controller")
}

// sourceOf describes a source from its volume context.
func sourceOf(id string, vctx map[string]string, capacity int64, node, from string) (*cloneSource, error) {
	attrs, err := engine.ParseAttributes(vctx)
	if err != nil {
		return nil, fmt.Errorf("the volume context of the source volume %s: %w", id, err)
	}
	return &cloneSource{id: id, clone: attrs.Clone, images: attrs.Images(), capacity: max(capacity, attrs.CloneCapacity), node: node, from: from}, nil
}

// topologyNode is the node of an accessible topology of one node.
func topologyNode(t []*csi.Topology) string {
	for _, top := range t {
		if n := top.GetSegments()[TopologyKey]; n != "" {
			return n
		}
	}
	return ""
}

// persistentVolumeSource finds the PersistentVolume of this driver whose
// volumeHandle is id (nil if there is none): its volume attributes, its
// capacity (grown by expansions) and the node of its node affinity.
func (d *Driver) persistentVolumeSource(ctx context.Context, id string) (*cloneSource, error) {
	pvs, err := d.cfg.Kube.CoreV1().PersistentVolumes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("list PersistentVolumes: %w", err)
	}
	for i := range pvs.Items {
		pv := &pvs.Items[i]
		if pv.Spec.CSI == nil || pv.Spec.CSI.Driver != d.name || pv.Spec.CSI.VolumeHandle != id {
			continue
		}
		var capacity int64
		if q, ok := pv.Spec.Capacity[v1.ResourceStorage]; ok {
			capacity = q.Value()
		}
		return sourceOf(id, pv.Spec.CSI.VolumeAttributes, capacity, affinityNode(pv), "PersistentVolume "+pv.Name)
	}
	return nil, nil
}

// affinityNode is the node a PersistentVolume's node affinity names by
// TopologyKey ("" if none).
func affinityNode(pv *v1.PersistentVolume) string {
	if pv.Spec.NodeAffinity == nil || pv.Spec.NodeAffinity.Required == nil {
		return ""
	}
	for _, term := range pv.Spec.NodeAffinity.Required.NodeSelectorTerms {
		for _, e := range term.MatchExpressions {
			if e.Key == TopologyKey && e.Operator == v1.NodeSelectorOpIn && len(e.Values) == 1 {
				return e.Values[0]
			}
		}
	}
	return ""
}

// checkCloneSource checks a new clone against its source: the source is a
// clone (InvalidArgument otherwise), of the same stack of images
// (InvalidArgument), no larger than the new clone (OutOfRange, as the CSI
// spec answers an unsupported capacity), on a node the request accepts
// (ResourceExhausted, the CSI spec's answer to a topology the volume
// cannot be provisioned in: the provisioner asks the scheduler for another
// node).
func (d *Driver) checkCloneSource(req *csi.CreateVolumeRequest, src *cloneSource, attrs engine.Attributes, capacity int64) error {
	name := req.GetName()
	if !src.clone {
		return invalid("CreateVolume %s: the source volume %s is the image itself (read-only), not a persistent clone: it has no writes to copy; "+
			"use a claim of the same image without a dataSource", name, src.id)
	}
	if want := attrs.Images(); !slices.Equal(src.images, want) {
		return invalid("CreateVolume %s: the source volume %s is a clone of %v, the request asks for %v: a clone of a claim must use the same image and stackImages "+
			"(the same StorageClass)", name, src.id, src.images, want)
	}
	if capacity < src.capacity {
		return outOfRange("CreateVolume %s: %d bytes are less than the %d bytes of the source volume %s: request at least the source's size",
			name, capacity, src.capacity, src.id)
	}
	if src.node == "" {
		return status.Errorf(codes.FailedPrecondition, "CreateVolume %s: the node of the source volume %s is unknown: its PersistentVolume has no %s node affinity",
			name, src.id, TopologyKey)
	}
	ar := req.GetAccessibilityRequirements()
	if len(ar.GetRequisite()) == 0 && len(ar.GetPreferred()) == 0 {
		return nil
	}
	onNode := func(t *csi.Topology) bool {
		n, ok := t.GetSegments()[TopologyKey]
		return !ok || n == src.node
	}
	accepted := ar.GetRequisite()
	if len(accepted) == 0 {
		accepted = ar.GetPreferred()
	}
	if !slices.ContainsFunc(accepted, onNode) {
		var nodes []string
		for _, t := range accepted {
			nodes = append(nodes, t.GetSegments()[TopologyKey])
		}
		return status.Errorf(codes.ResourceExhausted, "CreateVolume %s: the source volume %s lives on node %s, and the clone of it must too, "+
			"but the request accepts only node(s) %v: run the pod on node %s (%s=%s)", name, src.id, src.node, nodes, src.node, TopologyKey, src.node)
	}
	return nil
}

// checkSourceFree refuses (FailedPrecondition) to delete clone id from this
// node while a clone of it that this node has not made yet names it as its
// source: that clone's first stage copies id, and would otherwise find
// nothing. The clones are those this controller created and, with API
// access, the PersistentVolumes of this driver. The provisioner retries the
// deletion; it succeeds once the clone is staged or deleted.
func (d *Driver) checkSourceFree(ctx context.Context, id string) error {
	var clones []string
	c := &d.controller
	c.mu.Lock()
	for cid, v := range c.byID {
		if cid != id && v.params[engine.AttrCloneOf] == id {
			clones = append(clones, cid)
		}
	}
	c.mu.Unlock()
	if d.cfg.Kube != nil {
		pvs, err := d.cfg.Kube.CoreV1().PersistentVolumes().List(ctx, metav1.ListOptions{})
		if err != nil {
			return fmt.Errorf("DeleteVolume %s: list PersistentVolumes to find the clones that start from it: %w", id, err)
		}
		for i := range pvs.Items {
			pv := &pvs.Items[i]
			if s := pv.Spec.CSI; s != nil && s.Driver == d.name && s.VolumeAttributes[engine.AttrCloneOf] == id && s.VolumeHandle != id &&
				pv.DeletionTimestamp == nil && affinityNode(pv) == d.cfg.NodeID {
				clones = append(clones, s.VolumeHandle)
			}
		}
	}
	for _, cid := range clones {
		if state.CheckCloneID(cid) != nil {
			continue
		}
		made, err := state.ReadClone(d.cfg.Root, cid)
		if err != nil {
			return fmt.Errorf("DeleteVolume %s: read its clone %s: %w", id, cid, err)
		}
		if made == nil {
			return status.Errorf(codes.FailedPrecondition, "DeleteVolume %s: volume %s is a clone of it that node %s has not made yet "+
				"(its first stage copies %s): the deletion succeeds once %s is staged or deleted", id, cid, d.cfg.NodeID, id, cid)
		}
	}
	return nil
}
