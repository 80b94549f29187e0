package provisioner

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/container-storage-interface/spec/lib/go/csi"
	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"
	"sigs.k8s.io/sig-storage-lib-external-provisioner/v13/controller"
)

// A claim whose dataSource (or dataSourceRef) is another claim of its
// namespace is a clone of that claim ("PVC cloning"): the new volume starts
// with the source volume's writes. The provisioner checks the source claim
// as csi-provisioner does, passes its volume as the CreateVolume request's
// content source, and asks for the node the source clone lives on. The
// driver's node copies the source at the new clone's first stage.

// CloningProtectionFinalizer keeps a claim from being deleted while a
// clone of it is being provisioned: csi-provisioner's name for it, so that
// tools that know it (and operators) recognise it.
const CloningProtectionFinalizer = "provisioner.storage.kubernetes.io/cloning-protection"

// pvcKind is the kind of a dataSource that is another claim.
const pvcKind = "PersistentVolumeClaim"

// WithKube reads the source claims of clones and their PersistentVolumes
// through kube, and protects a source claim with
// CloningProtectionFinalizer while a clone of it is being provisioned (the
// RBAC needs get, list and update on persistentvolumeclaims and get on
// persistentvolumes). Without it a claim with a dataSource is refused.
func WithKube(kube kubernetes.Interface) Option {
	return func(p *Provisioner) error { p.kube = kube; return nil }
}

// errWrongNode: the scheduler selected a node other than the source
// clone's; another node may be selected after a reschedule.
var errWrongNode = errors.New("the selected node is not the source volume's")

// errSourceNotReady: the source claim cannot be cloned yet (not bound, not
// found, being deleted); the library retries.
var errSourceNotReady = errors.New("the source claim is not ready to be cloned")

// source is the claim a new claim clones, and its volume.
type source struct {
	claim *v1.PersistentVolumeClaim
	pv    *v1.PersistentVolume
	// node is the topology value of the node the source clone lives on
	// ("" if its PV has no node affinity: it is no clone, which
	// CreateVolume refuses).
	node string
}

// dataSource is the claim's data source: its dataSourceRef, else its
// dataSource (the API server mirrors one into the other); nil if none.
func dataSource(pvc *v1.PersistentVolumeClaim) *v1.TypedObjectReference {
	if ref := pvc.Spec.DataSourceRef; ref != nil {
		return ref
	}
	if ds := pvc.Spec.DataSource; ds != nil {
		return &v1.TypedObjectReference{APIGroup: ds.APIGroup, Kind: ds.Kind, Name: ds.Name}
	}
	return nil
}

// sourceClaimName is the name of the claim pvc clones ("" if it clones
// none).
func sourceClaimName(pvc *v1.PersistentVolumeClaim) string {
	ds := dataSource(pvc)
	if ds == nil || ds.Kind != pvcKind || (ds.APIGroup != nil && *ds.APIGroup != "") ||
		(ds.Namespace != nil && *ds.Namespace != "" && *ds.Namespace != pvc.Namespace) {
		return ""
	}
	return ds.Name
}

// cloneSource returns the source of a claim that clones another claim
// (nil, nil for a claim without a dataSource), with the checks
// csi-provisioner applies: the source claim is in the claim's namespace,
// Bound to a PersistentVolume of this driver, of the same StorageClass,
// not being deleted, and no larger than the new claim's request. Other
// kinds of dataSource are refused.
func (p *Provisioner) cloneSource(ctx context.Context, opts controller.ProvisionOptions) (*source, error) {
	pvc := opts.PVC
	ds := dataSource(pvc)
	if ds == nil {
		return nil, nil
	}
	group := ""
	if ds.APIGroup != nil {
		group = *ds.APIGroup
	}
	if ds.Kind != pvcKind || group != "" {
		return nil, invalid("claim %s has a dataSource %s %q (apiGroup %q): %s makes a claim from another claim of the same StorageClass only; "+
			"snapshots and volume populators are not supported, the StorageClass's image is the content", klog.KObj(pvc), ds.Kind, ds.Name, group, p.driver)
	}
	if ds.Namespace != nil && *ds.Namespace != "" && *ds.Namespace != pvc.Namespace {
		return nil, invalid("claim %s clones claim %s/%s of another namespace: a clone's source must be a claim of its own namespace", klog.KObj(pvc), *ds.Namespace, ds.Name)
	}
	if p.kube == nil {
		return nil, invalid("claim %s clones claim %s, but this provisioner has no API access to read it", klog.KObj(pvc), ds.Name)
	}
	srcName := klog.KRef(pvc.Namespace, ds.Name)
	claim, err := p.kube.CoreV1().PersistentVolumeClaims(pvc.Namespace).Get(ctx, ds.Name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return nil, fmt.Errorf("claim %s clones claim %s, which does not exist: create it, or fix the dataSource: %w", klog.KObj(pvc), srcName, errSourceNotReady)
	case err != nil:
		return nil, fmt.Errorf("read the source claim %s of claim %s: %w", srcName, klog.KObj(pvc), err)
	}
	if claim.DeletionTimestamp != nil {
		return nil, fmt.Errorf("claim %s clones claim %s, which is being deleted: %w", klog.KObj(pvc), srcName, errSourceNotReady)
	}
	if srcClass := ptrValue(claim.Spec.StorageClassName); srcClass != opts.StorageClass.Name {
		return nil, invalid("claim %s of StorageClass %s clones claim %s of StorageClass %q: a clone's source must be of the same StorageClass",
			klog.KObj(pvc), opts.StorageClass.Name, srcName, srcClass)
	}
	if claim.Status.Phase != v1.ClaimBound || claim.Spec.VolumeName == "" {
		return nil, fmt.Errorf("claim %s clones claim %s, which is not bound yet (%s): it is cloned once it is: %w", klog.KObj(pvc), srcName, claim.Status.Phase, errSourceNotReady)
	}
	pv, err := p.kube.CoreV1().PersistentVolumes().Get(ctx, claim.Spec.VolumeName, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return nil, fmt.Errorf("claim %s clones claim %s, whose PersistentVolume %s does not exist: %w", klog.KObj(pvc), srcName, claim.Spec.VolumeName, errSourceNotReady)
	case err != nil:
		return nil, fmt.Errorf("read the PersistentVolume %s of the source claim %s: %w", claim.Spec.VolumeName, srcName, err)
	}
	if pv.Spec.CSI == nil || pv.Spec.CSI.Driver != p.driver || pv.Spec.CSI.VolumeHandle == "" {
		return nil, invalid("claim %s clones claim %s, whose PersistentVolume %s is not a %s volume", klog.KObj(pvc), srcName, pv.Name, p.driver)
	}
	if ref := pv.Spec.ClaimRef; ref == nil || ref.UID != claim.UID {
		return nil, fmt.Errorf("claim %s clones claim %s, whose PersistentVolume %s is bound to another claim: %w", klog.KObj(pvc), srcName, pv.Name, errSourceNotReady)
	}
	var size resource.Quantity
	for _, q := range []resource.Quantity{claim.Status.Capacity[v1.ResourceStorage], pv.Spec.Capacity[v1.ResourceStorage]} {
		if q.Cmp(size) > 0 {
			size = q
		}
	}
	if req, ok := pvc.Spec.Resources.Requests[v1.ResourceStorage]; ok && req.Cmp(size) < 0 {
		return nil, invalid("claim %s requests %s, less than the %s of claim %s it clones: request at least %s", klog.KObj(pvc), req.String(), size.String(), srcName, size.String())
	}
	return &source{claim: claim, pv: pv, node: p.affinityNode(pv)}, nil
}

// affinityNode is the node a PV's node affinity names by the topology key
// ("" if none).
func (p *Provisioner) affinityNode(pv *v1.PersistentVolume) string {
	if pv.Spec.NodeAffinity == nil || pv.Spec.NodeAffinity.Required == nil {
		return ""
	}
	for _, term := range pv.Spec.NodeAffinity.Required.NodeSelectorTerms {
		for _, e := range term.MatchExpressions {
			if e.Key == p.topologyKey && e.Operator == v1.NodeSelectorOpIn && len(e.Values) == 1 {
				return e.Values[0]
			}
		}
	}
	return ""
}

// onSourceNode narrows a clone's accessibility requirement to its source's
// node, which must be the selected node (errWrongNode otherwise: a retry
// after the scheduler picks again may succeed) and within the class's
// allowedTopologies.
func (p *Provisioner) onSourceNode(opts controller.ProvisionOptions, src *source, topo *csi.TopologyRequirement) (*csi.TopologyRequirement, error) {
	if src.node == "" {
		return topo, nil
	}
	seg := map[string]string{p.topologyKey: src.node}
	if opts.SelectedNodeName != "" {
		selected := ""
		if r := topo.GetRequisite(); len(r) > 0 {
			selected = r[0].GetSegments()[p.topologyKey]
		}
		if selected != src.node {
			return nil, fmt.Errorf("claim %s clones claim %s, whose volume lives on node %s (%s=%s), but the scheduler selected node %s (%s=%s): "+
				"a clone lives on its source's node; run the claim's pod on node %s (e.g. a nodeSelector %s: %s): %w",
				klog.KObj(opts.PVC), klog.KObj(src.claim), src.node, p.topologyKey, src.node, opts.SelectedNodeName, p.topologyKey, selected,
				src.node, p.topologyKey, src.node, errWrongNode)
		}
		return topo, nil
	}
	if allowed := allowedSegments(opts.StorageClass.AllowedTopologies); len(allowed) > 0 &&
		!slices.ContainsFunc(allowed, func(a map[string]string) bool { return subset(a, seg) }) {
		return nil, invalid("claim %s clones claim %s, whose volume lives on node %s, outside the allowedTopologies of StorageClass %s",
			klog.KObj(opts.PVC), klog.KObj(src.claim), src.node, opts.StorageClass.Name)
	}
	t := topologies([]map[string]string{seg})
	return &csi.TopologyRequirement{Requisite: t, Preferred: t}, nil
}

// protectSource adds CloningProtectionFinalizer to the source claim, so
// that it is not deleted while its clone is provisioned.
func (p *Provisioner) protectSource(ctx context.Context, src *source) error {
	claim := src.claim
	if slices.Contains(claim.Finalizers, CloningProtectionFinalizer) {
		return nil
	}
	claim = claim.DeepCopy()
	claim.Finalizers = append(claim.Finalizers, CloningProtectionFinalizer)
	updated, err := p.kube.CoreV1().PersistentVolumeClaims(claim.Namespace).Update(ctx, claim, metav1.UpdateOptions{})
	if err != nil {
		return fmt.Errorf("protect the source claim %s from deletion while it is cloned (finalizer %s): %w", klog.KObj(claim), CloningProtectionFinalizer, err)
	}
	src.claim = updated
	klog.FromContext(ctx).V(2).Info("Protecting the source claim while it is cloned", "sourceClaim", klog.KObj(claim), "finalizer", CloningProtectionFinalizer)
	return nil
}

// releaseSource removes CloningProtectionFinalizer from the claim that pvc
// clones once no other claim that clones it is still pending: pvc's own
// provisioning is over (its PV is made, or it failed for good, or it waits
// for another node).
func (p *Provisioner) releaseSource(ctx context.Context, pvc *v1.PersistentVolumeClaim) error {
	name := sourceClaimName(pvc)
	if name == "" || p.kube == nil {
		return nil
	}
	claims := p.kube.CoreV1().PersistentVolumeClaims(pvc.Namespace)
	claim, err := claims.Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read the source claim %s to remove its finalizer %s: %w", klog.KRef(pvc.Namespace, name), CloningProtectionFinalizer, err)
	}
	if !slices.Contains(claim.Finalizers, CloningProtectionFinalizer) {
		return nil
	}
	all, err := claims.List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("list the claims of namespace %s to find other clones of claim %s: %w", pvc.Namespace, name, err)
	}
	for i := range all.Items {
		other := &all.Items[i]
		if other.UID != pvc.UID && other.DeletionTimestamp == nil && other.Status.Phase != v1.ClaimBound && other.Status.Phase != v1.ClaimLost &&
			other.Spec.VolumeName == "" && sourceClaimName(other) == name {
			klog.FromContext(ctx).V(2).Info("The source claim stays protected: another clone of it is pending", "sourceClaim", klog.KObj(claim), "pvc", klog.KObj(other))
			return nil
		}
	}
	claim.Finalizers = slices.DeleteFunc(claim.Finalizers, func(f string) bool { return f == CloningProtectionFinalizer })
	if _, err := claims.Update(ctx, claim, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("remove the finalizer %s of the source claim %s: %w", CloningProtectionFinalizer, klog.KObj(claim), err)
	}
	klog.FromContext(ctx).V(2).Info("Released the source claim: no clone of it is pending", "sourceClaim", klog.KObj(claim))
	return nil
}

// contentSource is the CreateVolume content source of a clone of src.
func contentSource(src *source) *csi.VolumeContentSource {
	return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
		Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: src.pv.Spec.CSI.VolumeHandle}}}
}

func ptrValue[T any](p *T) T {
	var zero T
	if p == nil {
		return zero
	}
	return *p
}
