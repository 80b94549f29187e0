// Package provisioner turns PersistentVolumeClaims of Strata StorageClasses
// into PersistentVolumes without the upstream csi-provisioner sidecar. It
// implements sig-storage-lib-external-provisioner's Provisioner (the library
// the sidecar is built on) by calling the driver's CSI controller service in
// the same process: a claim and its class become a CreateVolumeRequest the
// way csi-provisioner builds one, and the response becomes the PV. Run starts
// the library's ProvisionController with leader election.
package provisioner

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"maps"
	"regexp"
	"slices"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/kubernetes-csi/csi-lib-utils/accessmodes"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	v1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"
	"sigs.k8s.io/sig-storage-lib-external-provisioner/v13/controller"
)

// Keys of StorageClass parameters under csi.storage.k8s.io/, the prefix
// csi-provisioner reserves. The provisioner consumes them: they never reach
// CreateVolume.
const (
	prefix            = "csi.storage.k8s.io/"
	paramFSType       = prefix + "fstype"
	paramSecretName   = prefix + "node-publish-secret-name"
	paramSecretNS     = prefix + "node-publish-secret-namespace"
	legacyFSType      = "fstype" // csi-provisioner's deprecated spelling
	paramPVCName      = prefix + "pvc/name"
	paramPVCNamespace = prefix + "pvc/namespace"
	paramPVName       = prefix + "pv/name"
)

// NodeGetter returns the Node the scheduler selected for a claim.
type NodeGetter func(ctx context.Context, name string) (*v1.Node, error)

// NodesFrom reads Nodes through kube (one GET per provisioning; the RBAC
// needs get on nodes).
func NodesFrom(kube kubernetes.Interface) NodeGetter {
	return func(ctx context.Context, name string) (*v1.Node, error) {
		return kube.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
	}
}

// DriverNodes returns the topology segments of the nodes where the node
// plugin runs, for a claim whose class binds at once (no node selected).
type DriverNodes func(ctx context.Context) ([]map[string]string, error)

// DriverNodesFrom lists, through kube, the nodes whose CSINode registers
// driver, each as its topology segment: the node's topologyKey label, or
// its name when the label is missing (the RBAC needs list on csinodes and
// nodes). This is the aggregate topology that external-provisioner builds
// for a class with Immediate binding.
func DriverNodesFrom(kube kubernetes.Interface, driver, topologyKey string) DriverNodes {
	return func(ctx context.Context) ([]map[string]string, error) {
		csiNodes, err := kube.StorageV1().CSINodes().List(ctx, metav1.ListOptions{})
		if err != nil {
			return nil, fmt.Errorf("list CSINodes: %w", err)
		}
		nodes, err := kube.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		if err != nil {
			return nil, fmt.Errorf("list nodes: %w", err)
		}
		labels := map[string]map[string]string{}
		for _, n := range nodes.Items {
			labels[n.Name] = n.Labels
		}
		var out []map[string]string
		for _, cn := range csiNodes.Items {
			if !slices.ContainsFunc(cn.Spec.Drivers, func(d storagev1.CSINodeDriver) bool { return d.Name == driver }) {
				continue
			}
			value := labels[cn.Name][topologyKey]
			if value == "" {
				value = cn.Name
			}
			out = append(out, map[string]string{topologyKey: value})
		}
		slices.SortFunc(out, func(a, b map[string]string) int { return strings.Compare(a[topologyKey], b[topologyKey]) })
		return out, nil
	}
}

// Option configures a Provisioner.
type Option func(*Provisioner) error

// WithDriverNodes places the clone of a claim whose class binds at once
// (Immediate) on one of the nodes list returns. Without it such a claim
// gets no node, and a writable one is refused: use WaitForFirstConsumer.
func WithDriverNodes(list DriverNodes) Option {
	return func(p *Provisioner) error { p.driverNodes = list; return nil }
}

// WithNodes reads the selected node's labels through get. Without it the
// topology value of a selected node is its name, which is what the node
// plugin reports unless --node-id differs from the Node's name.
func WithNodes(get NodeGetter) Option {
	return func(p *Provisioner) error { p.nodes = get; return nil }
}

// Provisioner provisions and deletes the PVs of one CSI driver by calling
// its controller service.
type Provisioner struct {
	driver      string
	cs          csi.ControllerServer
	nodes       NodeGetter           // nil: a selected node's topology value is its name
	driverNodes DriverNodes          // nil: a claim that binds at once gets no node
	kube        kubernetes.Interface // nil: a claim with a dataSource is refused (clone.go)
	topologyKey string
}

var (
	_ controller.Provisioner      = (*Provisioner)(nil)
	_ controller.BlockProvisioner = (*Provisioner)(nil)
)

// New returns a Provisioner for driver (the StorageClasses' provisioner
// name and the PVs' CSI driver) that calls cs, usually the *driver.Driver.
// topologyKey is the node label (and CSI topology segment key) whose value
// names the node a clone lives on: driver.TopologyKey, which the node
// plugin reports in NodeGetInfo and kubelet copies into the Node's labels.
func New(driver, topologyKey string, cs csi.ControllerServer, opts ...Option) (*Provisioner, error) {
	if driver == "" {
		return nil, errors.New("provisioner needs the CSI driver name")
	}
	if topologyKey == "" {
		return nil, errors.New("provisioner needs the topology key")
	}
	if cs == nil {
		return nil, errors.New("provisioner needs a CSI controller service")
	}
	p := &Provisioner{driver: driver, cs: cs, topologyKey: topologyKey}
	for _, o := range opts {
		if err := o(p); err != nil {
			return nil, err
		}
	}
	return p, nil
}

// Name is the provisioner name StorageClasses give: the driver name.
func (p *Provisioner) Name() string { return p.driver }

// SupportsBlock is false: a Strata volume is an overlay filesystem. The
// library then refuses a Block claim itself, with an event on the claim,
// and does not retry it.
func (p *Provisioner) SupportsBlock(context.Context) bool { return false }

// Provision creates the volume of a claim with CreateVolume and returns its
// PV. The state tells the library whether a failed call may still go on in
// the background (see provisioningState). A claim that clones another
// claim keeps that claim protected by CloningProtectionFinalizer until its
// provisioning is over (clone.go).
func (p *Provisioner) Provision(ctx context.Context, opts controller.ProvisionOptions) (_ *v1.PersistentVolume, state controller.ProvisioningState, _ error) {
	if opts.PVC == nil || opts.StorageClass == nil || opts.PVName == "" {
		return nil, controller.ProvisioningFinished, errors.New("provision: the claim, its StorageClass and the PV name are required")
	}
	claim := klog.KObj(opts.PVC)
	logger := klog.FromContext(ctx).WithValues("pvc", claim, "pv", opts.PVName, "storageClass", opts.StorageClass.Name)
	defer func() {
		// Over, for now or for good: the source claim may go, unless
		// another clone of it is pending. (In the background, the
		// library calls again.)
		if state == controller.ProvisioningFinished || state == controller.ProvisioningReschedule {
			if err := p.releaseSource(ctx, opts.PVC); err != nil {
				logger.Error(err, "Releasing the source claim failed: it keeps its finalizer until the next clone of it is provisioned or an operator removes it")
			}
		}
	}()
	req, secretRef, src, err := p.createVolumeRequest(ctx, opts)
	if err != nil {
		// Nothing was created: a refusal is final, a failed node lookup
		// leaves the state as it was.
		if st, ok := status.FromError(err); ok && st.Code() == codes.InvalidArgument {
			return nil, controller.ProvisioningFinished, err
		}
		if errors.Is(err, errNodeGone) || errors.Is(err, errWrongNode) {
			return nil, controller.ProvisioningReschedule, err
		}
		return nil, controller.ProvisioningNoChange, err
	}
	if src != nil {
		if err := p.protectSource(ctx, src); err != nil {
			return nil, controller.ProvisioningNoChange, err
		}
		logger = logger.WithValues("sourceClaim", klog.KObj(src.claim), "sourceVolumeID", src.pv.Spec.CSI.VolumeHandle)
	}
	logger = logger.WithValues("image", req.GetParameters()["image"])
	logger.V(2).Info("Creating volume", "accessibility", req.GetAccessibilityRequirements().String())
	resp, err := p.cs.CreateVolume(ctx, req)
	if err != nil {
		state := provisioningState(err, opts.SelectedNodeName != "")
		logger.Error(err, "CreateVolume failed", "state", state)
		return nil, state, fmt.Errorf("create volume %s for claim %s: %w", opts.PVName, claim, err)
	}
	vol := resp.GetVolume()
	if vol.GetVolumeId() == "" {
		return nil, controller.ProvisioningFinished, fmt.Errorf("create volume %s for claim %s: the driver returned no volume id", opts.PVName, claim)
	}
	required := req.GetCapacityRange().GetRequiredBytes()
	capacity := vol.GetCapacityBytes()
	if capacity == 0 {
		capacity = required // the driver makes no promise: the claim's size
	}
	if capacity < required {
		p.deleteQuietly(ctx, vol.GetVolumeId())
		return nil, controller.ProvisioningFinished, status.Errorf(codes.OutOfRange,
			"create volume %s for claim %s: the driver made %d bytes, the claim asks for %d", opts.PVName, claim, capacity, required)
	}
	pv := p.persistentVolume(opts, vol, capacity, secretRef)
	logger.V(2).Info("Created volume", "volumeID", vol.GetVolumeId(), "capacity", capacity, "nodeAffinity", pv.Spec.NodeAffinity != nil)
	return pv, controller.ProvisioningFinished, nil
}

// deleteQuietly deletes a volume that is not handed out after all.
func (p *Provisioner) deleteQuietly(ctx context.Context, id string) {
	if _, err := p.cs.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		klog.FromContext(ctx).Error(err, "Deleting an unused volume failed", "volumeID", id)
	}
}

// Delete deletes a PV's volume with DeleteVolume. PVs of other drivers are
// ignored (IgnoredError), so that the library leaves them to their own
// provisioner.
func (p *Provisioner) Delete(ctx context.Context, pv *v1.PersistentVolume) error {
	if pv == nil || pv.Spec.CSI == nil || pv.Spec.CSI.Driver != p.driver {
		name := ""
		if pv != nil {
			name = pv.Name
		}
		return &controller.IgnoredError{Reason: fmt.Sprintf("PersistentVolume %q is not a %s volume", name, p.driver)}
	}
	id := pv.Spec.CSI.VolumeHandle
	if id == "" {
		return fmt.Errorf("delete PersistentVolume %s: it has no volumeHandle", pv.Name)
	}
	if _, err := p.cs.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		return fmt.Errorf("delete volume %s of PersistentVolume %s: %w", id, pv.Name, err)
	}
	klog.FromContext(ctx).V(2).Info("Deleted volume", "volumeID", id, "pv", pv.Name)
	return nil
}

// provisioningState classifies a CreateVolume error as csi-provisioner
// does: codes that say the call may have gone on without us (a timeout, an
// abort, a busy or unreachable service) mean the volume may be created in
// the background, so the library must call again until it gets a final
// answer; everything else is final. ResourceExhausted on a selected node
// asks the scheduler for another node. An error that carries no gRPC code
// (the driver's own errors get theirs only at its gRPC boundary, which an
// in-process call does not cross) is final unless it is a context error.
func provisioningState(err error, selectedNode bool) controller.ProvisioningState {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return controller.ProvisioningInBackground
	}
	st, ok := status.FromError(err)
	if !ok {
		return controller.ProvisioningFinished
	}
	switch st.Code() {
	case codes.ResourceExhausted:
		if selectedNode {
			return controller.ProvisioningReschedule
		}
		return controller.ProvisioningInBackground
	case codes.Canceled, codes.DeadlineExceeded, codes.Unavailable, codes.Aborted:
		return controller.ProvisioningInBackground
	}
	return controller.ProvisioningFinished
}

// invalid is a final refusal of a claim, with the InvalidArgument code the
// library recognises (it delays retries of infeasible claims).
func invalid(format string, args ...any) error {
	return status.Errorf(codes.InvalidArgument, format, args...)
}

// errNodeGone: the selected node no longer exists; the scheduler must pick
// another.
var errNodeGone = errors.New("the selected node no longer exists")

// createVolumeRequest builds the CreateVolumeRequest of a claim as
// csi-provisioner does, the node-publish secret reference the class asks
// for, and the source of a claim that clones another claim (nil if none).
func (p *Provisioner) createVolumeRequest(ctx context.Context, opts controller.ProvisionOptions) (*csi.CreateVolumeRequest, *v1.SecretReference, *source, error) {
	pvc, sc := opts.PVC, opts.StorageClass
	if pvc.Spec.VolumeMode != nil && *pvc.Spec.VolumeMode == v1.PersistentVolumeBlock {
		return nil, nil, nil, invalid("claim %s asks for volumeMode Block: a Strata volume is a filesystem (an overlay of the image): use volumeMode: Filesystem", klog.KObj(pvc))
	}
	params, fsType, secretRef, err := p.parameters(opts)
	if err != nil {
		return nil, nil, nil, err
	}
	caps, err := p.capabilities(ctx, pvc, sc, fsType)
	if err != nil {
		return nil, nil, nil, err
	}
	capRange, err := capacityRange(pvc)
	if err != nil {
		return nil, nil, nil, err
	}
	src, err := p.cloneSource(ctx, opts)
	if err != nil {
		return nil, nil, nil, err
	}
	topo, err := p.accessibility(ctx, opts)
	if err != nil {
		return nil, nil, nil, err
	}
	req := &csi.CreateVolumeRequest{
		Name:                      opts.PVName,
		CapacityRange:             capRange,
		VolumeCapabilities:        caps,
		Parameters:                params,
		AccessibilityRequirements: topo,
	}
	if src != nil {
		if req.AccessibilityRequirements, err = p.onSourceNode(opts, src, topo); err != nil {
			return nil, nil, nil, err
		}
		req.VolumeContentSource = contentSource(src)
	}
	return req, secretRef, src, nil
}

// parameters returns the class's parameters less the keys reserved for the
// provisioner, plus the claim's and the PV's names (csi-provisioner's
// --extra-create-metadata), the fsType the class asks for and the
// node-publish secret.
func (p *Provisioner) parameters(opts controller.ProvisionOptions) (map[string]string, string, *v1.SecretReference, error) {
	params := map[string]string{}
	var fsType, secretName, secretNS string
	var hasName, hasNS bool
	for k, v := range opts.StorageClass.Parameters {
		switch {
		case k == paramFSType || strings.EqualFold(k, legacyFSType):
			fsType = v
		case k == paramSecretName:
			secretName, hasName = v, true
		case k == paramSecretNS:
			secretNS, hasNS = v, true
		case strings.HasPrefix(k, prefix):
			return nil, "", nil, invalid("StorageClass %s: parameter %q is reserved for csi-provisioner and not used by %s: of its keys Strata reads only %s, %s and %s",
				opts.StorageClass.Name, k, p.driver, paramFSType, paramSecretName, paramSecretNS)
		default:
			params[k] = v
		}
	}
	params[paramPVCName] = opts.PVC.Name
	params[paramPVCNamespace] = opts.PVC.Namespace
	params[paramPVName] = opts.PVName
	if hasName != hasNS {
		return nil, "", nil, invalid("StorageClass %s: give both %s and %s, or neither", opts.StorageClass.Name, paramSecretName, paramSecretNS)
	}
	var ref *v1.SecretReference
	if hasName {
		name, err := expand(secretName, opts, true)
		if err != nil {
			return nil, "", nil, invalid("StorageClass %s: %s: %v", opts.StorageClass.Name, paramSecretName, err)
		}
		ns, err := expand(secretNS, opts, false)
		if err != nil {
			return nil, "", nil, invalid("StorageClass %s: %s: %v", opts.StorageClass.Name, paramSecretNS, err)
		}
		ref = &v1.SecretReference{Name: name, Namespace: ns}
	}
	return params, fsType, ref, nil
}

// templateVar matches ${...} in a secret reference template.
var templateVar = regexp.MustCompile(`\$\{([^}]*)\}`)

// annotationVar matches pvc.annotations['KEY'].
var annotationVar = regexp.MustCompile(`^pvc\.annotations\['([^']+)'\]$`)

// expand resolves csi-provisioner's secret templates: ${pv.name} and
// ${pvc.namespace} everywhere; ${pvc.name} and ${pvc.annotations['KEY']}
// in the secret's name only (a claim's author must not pick the namespace).
func expand(tmpl string, opts controller.ProvisionOptions, isName bool) (string, error) {
	var bad []string
	out := templateVar.ReplaceAllStringFunc(tmpl, func(m string) string {
		v := m[2 : len(m)-1]
		switch {
		case v == "pv.name":
			return opts.PVName
		case v == "pvc.namespace":
			return opts.PVC.Namespace
		case v == "pvc.name" && isName:
			return opts.PVC.Name
		}
		if a := annotationVar.FindStringSubmatch(v); a != nil && isName {
			if val, ok := opts.PVC.Annotations[a[1]]; ok {
				return val
			}
			bad = append(bad, m+" (the claim has no such annotation)")
			return m
		}
		bad = append(bad, m)
		return m
	})
	if len(bad) > 0 {
		allowed := "${pv.name}, ${pvc.namespace}"
		if isName {
			allowed += ", ${pvc.name}, ${pvc.annotations['KEY']}"
		}
		return "", fmt.Errorf("cannot resolve %s in %q: it may use %s", strings.Join(bad, ", "), tmpl, allowed)
	}
	if out == "" {
		return "", fmt.Errorf("%q resolves to an empty name", tmpl)
	}
	return out, nil
}

// capabilities turns the claim's access modes into mount capabilities. A
// driver that advertises SINGLE_NODE_MULTI_WRITER gets one capability for
// all the modes (RWO becomes SINGLE_NODE_MULTI_WRITER, RWOP
// SINGLE_NODE_SINGLE_WRITER), otherwise one capability per mode, as
// csi-provisioner sends them.
func (p *Provisioner) capabilities(ctx context.Context, pvc *v1.PersistentVolumeClaim, sc *storagev1.StorageClass, fsType string) ([]*csi.VolumeCapability, error) {
	if len(pvc.Spec.AccessModes) == 0 {
		return nil, invalid("claim %s has no accessModes", klog.KObj(pvc))
	}
	mountCap := func(mode csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
		return &csi.VolumeCapability{
			AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fsType, MountFlags: slices.Clone(sc.MountOptions)}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode},
		}
	}
	multiWriter, err := p.supportsSingleNodeMultiWriter(ctx)
	if err != nil {
		return nil, err
	}
	if multiWriter {
		mode, err := accessmodes.ToCSIAccessMode(pvc.Spec.AccessModes, true)
		if err != nil {
			return nil, invalid("claim %s: %v", klog.KObj(pvc), err)
		}
		return []*csi.VolumeCapability{mountCap(mode)}, nil
	}
	if slices.Contains(pvc.Spec.AccessModes, v1.ReadWriteOncePod) && len(pvc.Spec.AccessModes) > 1 {
		return nil, invalid("claim %s: ReadWriteOncePod cannot be combined with other access modes", klog.KObj(pvc))
	}
	var caps []*csi.VolumeCapability
	for _, m := range pvc.Spec.AccessModes {
		mode, err := accessmodes.ToCSIAccessMode([]v1.PersistentVolumeAccessMode{m}, false)
		if err != nil {
			return nil, invalid("claim %s: %v", klog.KObj(pvc), err)
		}
		caps = append(caps, mountCap(mode))
	}
	return caps, nil
}

// supportsSingleNodeMultiWriter asks the controller service for the
// SINGLE_NODE_MULTI_WRITER capability.
func (p *Provisioner) supportsSingleNodeMultiWriter(ctx context.Context) (bool, error) {
	resp, err := p.cs.ControllerGetCapabilities(ctx, &csi.ControllerGetCapabilitiesRequest{})
	if err != nil {
		return false, fmt.Errorf("controller capabilities: %w", err)
	}
	for _, c := range resp.GetCapabilities() {
		if c.GetRpc().GetType() == csi.ControllerServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER {
			return true, nil
		}
	}
	return false, nil
}

// capacityRange is the claim's storage request, and its limit if it has one.
func capacityRange(pvc *v1.PersistentVolumeClaim) (*csi.CapacityRange, error) {
	req, ok := pvc.Spec.Resources.Requests[v1.ResourceStorage]
	if !ok {
		return nil, invalid("claim %s requests no storage: set resources.requests.storage (the room for the clone's writes)", klog.KObj(pvc))
	}
	r := &csi.CapacityRange{RequiredBytes: req.Value()}
	if lim, ok := pvc.Spec.Resources.Limits[v1.ResourceStorage]; ok {
		r.LimitBytes = lim.Value()
		if r.LimitBytes > 0 && r.LimitBytes < r.RequiredBytes {
			return nil, invalid("claim %s: storage limit %s is below its request %s", klog.KObj(pvc), lim.String(), req.String())
		}
	}
	return r, nil
}

// accessibility is the topology the volume must be reachable from: the
// node the scheduler selected (WaitForFirstConsumer), which must lie within
// the class's allowedTopologies; else (Immediate binding) the
// allowedTopologies themselves, or every node the driver runs on; nil when
// there is none of these. Among the driver's nodes the preferred order
// starts at a node chosen by the claim's UID, as external-provisioner does,
// so that the clones of a class that binds at once spread over the nodes.
func (p *Provisioner) accessibility(ctx context.Context, opts controller.ProvisionOptions) (*csi.TopologyRequirement, error) {
	allowed := allowedSegments(opts.StorageClass.AllowedTopologies)
	if opts.SelectedNodeName == "" {
		preferred := allowed
		if len(allowed) == 0 && p.driverNodes != nil {
			var err error
			if allowed, err = p.driverNodes(ctx); err != nil {
				return nil, err
			}
			if len(allowed) > 0 {
				preferred = rotate(allowed, string(opts.PVC.UID))
			}
		}
		if len(allowed) == 0 {
			return nil, nil
		}
		return &csi.TopologyRequirement{Requisite: topologies(allowed), Preferred: topologies(preferred)}, nil
	}
	seg, err := p.nodeSegment(ctx, opts.SelectedNodeName)
	if err != nil {
		return nil, err
	}
	if len(allowed) > 0 && !slices.ContainsFunc(allowed, func(a map[string]string) bool { return subset(a, seg) }) {
		return nil, invalid("the selected node %s (%s=%s) is outside the allowedTopologies of StorageClass %s",
			opts.SelectedNodeName, p.topologyKey, seg[p.topologyKey], opts.StorageClass.Name)
	}
	t := topologies([]map[string]string{seg})
	return &csi.TopologyRequirement{Requisite: t, Preferred: t}, nil
}

// nodeSegment is the topology segment of a node: the topology key's label,
// or the node's name when the label is missing (or there is no way to read
// labels).
func (p *Provisioner) nodeSegment(ctx context.Context, name string) (map[string]string, error) {
	seg := map[string]string{p.topologyKey: name}
	if p.nodes == nil {
		return seg, nil
	}
	node, err := p.nodes(ctx, name)
	switch {
	case apierrors.IsNotFound(err):
		return nil, fmt.Errorf("read node %s: %w", name, errNodeGone)
	case err != nil:
		return nil, fmt.Errorf("read the labels of the selected node %s: %w", name, err)
	}
	if v := node.Labels[p.topologyKey]; v != "" {
		seg[p.topologyKey] = v
	} else {
		klog.FromContext(ctx).V(2).Info("Selected node has no topology label: its name stands for it (is the node plugin running there?)",
			"node", name, "label", p.topologyKey)
	}
	return seg, nil
}

// allowedSegments expands allowedTopologies into topology segments: each
// term gives the cross product of its expressions' values.
func allowedSegments(terms []v1.TopologySelectorTerm) []map[string]string {
	var out []map[string]string
	for _, term := range terms {
		segs := []map[string]string{{}}
		for _, e := range term.MatchLabelExpressions {
			var next []map[string]string
			for _, s := range segs {
				for _, v := range e.Values {
					n := maps.Clone(s)
					n[e.Key] = v
					next = append(next, n)
				}
			}
			segs = next
		}
		if len(term.MatchLabelExpressions) > 0 {
			out = append(out, segs...)
		}
	}
	return out
}

// subset reports whether every key of a is in b with the same value.
func subset(a, b map[string]string) bool {
	for k, v := range a {
		if bv, ok := b[k]; ok && bv != v {
			return false
		}
	}
	return true
}

// rotate returns segs starting at the one that key's hash picks.
func rotate(segs []map[string]string, key string) []map[string]string {
	h := fnv.New32a()
	h.Write([]byte(key))
	i := int(h.Sum32() % uint32(len(segs)))
	return append(slices.Clone(segs[i:]), segs[:i]...)
}

func topologies(segs []map[string]string) []*csi.Topology {
	var out []*csi.Topology
	for _, s := range segs {
		out = append(out, &csi.Topology{Segments: maps.Clone(s)})
	}
	return out
}

// persistentVolume is the PV of a created volume. The library adds the claim
// reference, the StorageClass name and the provisioned-by annotation.
func (p *Provisioner) persistentVolume(opts controller.ProvisionOptions, vol *csi.Volume, capacity int64, secretRef *v1.SecretReference) *v1.PersistentVolume {
	reclaim := v1.PersistentVolumeReclaimDelete
	if opts.StorageClass.ReclaimPolicy != nil {
		reclaim = *opts.StorageClass.ReclaimPolicy
	}
	fs := v1.PersistentVolumeFilesystem
	pv := &v1.PersistentVolume{
		ObjectMeta: metav1.ObjectMeta{Name: opts.PVName},
		Spec: v1.PersistentVolumeSpec{
			AccessModes:                   slices.Clone(opts.PVC.Spec.AccessModes),
			Capacity:                      v1.ResourceList{v1.ResourceStorage: *resource.NewQuantity(capacity, resource.BinarySI)},
			PersistentVolumeReclaimPolicy: reclaim,
			MountOptions:                  slices.Clone(opts.StorageClass.MountOptions),
			VolumeMode:                    &fs,
			PersistentVolumeSource: v1.PersistentVolumeSource{CSI: &v1.CSIPersistentVolumeSource{
				Driver:               p.driver,
				VolumeHandle:         vol.GetVolumeId(),
				VolumeAttributes:     maps.Clone(vol.GetVolumeContext()),
				NodePublishSecretRef: secretRef,
				// A clone pulls its image when kubelet stages it, and
				// NodeStageVolume gets only the stage secret.
				NodeStageSecretRef: secretRef,
			}},
		},
	}
	if terms := nodeSelectorTerms(vol.GetAccessibleTopology()); len(terms) > 0 {
		pv.Spec.NodeAffinity = &v1.VolumeNodeAffinity{Required: &v1.NodeSelector{NodeSelectorTerms: terms}}
	}
	return pv
}

// nodeSelectorTerms turns accessible topology into node selector terms: the
// volume may be used on a node that matches any segment, and matches a
// segment when it has all of its labels.
func nodeSelectorTerms(topo []*csi.Topology) []v1.NodeSelectorTerm {
	var terms []v1.NodeSelectorTerm
	for _, t := range topo {
		segs := t.GetSegments()
		if len(segs) == 0 {
			continue
		}
		var term v1.NodeSelectorTerm
		for _, k := range slices.Sorted(maps.Keys(segs)) {
			term.MatchExpressions = append(term.MatchExpressions, v1.NodeSelectorRequirement{
				Key: k, Operator: v1.NodeSelectorOpIn, Values: []string{segs[k]},
			})
		}
		terms = append(terms, term)
	}
	return terms
}
