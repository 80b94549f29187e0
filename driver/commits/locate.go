package commits

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/strata-csi/strata/driver/commits/source"
	"github.com/strata-csi/strata/driver/state"
	"github.com/strata-csi/strata/layercache/commit"
)

// verdict is what a node makes of the volume a VolumeCommit names.
type verdict int

const (
	// notHere: the volume is not on this node, or not yet anywhere (the pod
	// is not scheduled, the claim is not bound): leave the object alone.
	notHere verdict = iota
	// here: the volume is on this node; take the commit.
	here
	// refused: this node can tell that the commit cannot be done (the
	// pod's volume is not Strata's, the volume is read-only, ...): fail it
	// with the reason.
	refused
)

func (v verdict) String() string { return [...]string{"not here", "here", "refused"}[v] }

// located is the decision about one VolumeCommit on one node.
type located struct {
	verdict verdict
	// why explains notHere (logged) and refused (the status message).
	why string
	// src is what to commit, when here; what names it in messages.
	src  commit.Source
	what string
}

func notHereBecause(format string, args ...any) located {
	return located{verdict: notHere, why: fmt.Sprintf(format, args...)}
}

func refuse(format string, args ...any) located {
	return located{verdict: refused, why: fmt.Sprintf(format, args...)}
}

// locator finds the volume a VolumeCommit names among this node's volumes:
// its publish records and persistent clones under root. It reads pods,
// claims and volumes through kube; an error is an API error to retry.
type locator struct {
	kube   kubernetes.Interface
	root   string // node state root
	node   string // this node's name (the plugin's node id)
	driver string // the CSI driver name
}

func (l *locator) locate(ctx context.Context, vc *VolumeCommit) (located, error) {
	src := vc.Spec.Source
	switch {
	case src.Pod != nil && src.PersistentVolumeClaim == "":
		return l.podVolume(ctx, vc.Namespace, src.Pod.Name, src.Pod.Volume)
	case src.Pod == nil && src.PersistentVolumeClaim != "":
		return l.claim(ctx, vc.Namespace, src.PersistentVolumeClaim)
	}
	// The CRD's validation forbids this; an object written before it was
	// installed may still have it. Every node can tell.
	return refuse("spec.source must name exactly one of persistentVolumeClaim and pod"), nil
}

// podVolume locates volume of pod ns/name: only the pod's node acts.
func (l *locator) podVolume(ctx context.Context, ns, name, volume string) (located, error) {
	pod, err := l.kube.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return notHereBecause("pod %s/%s does not exist (yet)", ns, name), nil
	}
	if err != nil {
		return located{}, fmt.Errorf("get pod %s/%s: %w", ns, name, err)
	}
	if pod.Spec.NodeName != l.node {
		return notHereBecause("pod %s/%s is on node %q", ns, name, pod.Spec.NodeName), nil
	}
	// From here on this node is the only one that can tell.
	var vol *corev1.Volume
	var names []string
	for i := range pod.Spec.Volumes {
		names = append(names, pod.Spec.Volumes[i].Name)
		if pod.Spec.Volumes[i].Name == volume {
			vol = &pod.Spec.Volumes[i]
		}
	}
	if vol == nil {
		return refuse("pod %s/%s has no volume %q (it has: %s)", ns, name, volume, strings.Join(names, ", ")), nil
	}
	// kubelet mounts a CSI volume at pods/<uid>/volumes/kubernetes.io~csi/
	// <dir>/mount, where dir is the pod's volume name for an inline volume
	// and the PersistentVolume's name for one through a claim.
	dir, volumeID := volume, ""
	switch {
	case vol.CSI != nil:
		if vol.CSI.Driver != l.driver {
			return refuse("volume %q of pod %s/%s is of CSI driver %q, not %s", volume, ns, name, vol.CSI.Driver, l.driver), nil
		}
	case vol.PersistentVolumeClaim != nil || vol.Ephemeral != nil:
		claim := pod.Name + "-" + vol.Name // a generic ephemeral volume's claim
		if vol.PersistentVolumeClaim != nil {
			claim = vol.PersistentVolumeClaim.ClaimName
		}
		pv, why, err := l.boundVolume(ctx, ns, claim)
		if err != nil || pv == nil {
			// The pod runs here with this claim: it is bound, or the pod
			// has not started; or the claim names a PV that is not its.
			return why, err
		}
		if pv.Spec.CSI == nil || pv.Spec.CSI.Driver != l.driver {
			return refuse("volume %q of pod %s/%s is PersistentVolume %s, which is not a %s volume", volume, ns, name, pv.Name, l.driver), nil
		}
		dir, volumeID = pv.Name, pv.Spec.CSI.VolumeHandle
	default:
		return refuse("volume %q of pod %s/%s is not a %s volume (neither an inline CSI volume nor a claim)", volume, ns, name, l.driver), nil
	}

	all, err := state.List(l.root)
	if err != nil {
		return located{}, fmt.Errorf("list the volumes under %s: %w", l.root, err)
	}
	what := fmt.Sprintf("volume %q of pod %s/%s", volume, ns, name)
	for i := range all {
		v := &all[i]
		if !publishedFor(v, pod.UID, dir) || (volumeID != "" && v.VolumeID != volumeID) {
			continue
		}
		if v.ReadOnly {
			return refuse("%s is mounted read-only: it has no writes to commit", what), nil
		}
		s, err := source.OfPublish(l.root, v)
		if err != nil {
			return refuse("%s: %v", what, err), nil
		}
		return located{verdict: here, src: s, what: what}, nil
	}
	if pod.Status.Phase == corev1.PodPending {
		return notHereBecause("%s is not mounted yet (the pod is Pending)", what), nil
	}
	return refuse("%s is not published on node %s: the pod must run with the volume mounted (pod phase %s)",
		what, l.node, pod.Status.Phase), nil
}

// publishedFor reports whether v is the publish of the pod with uid at
// kubelet's directory dir: its target path ends in
// /<uid>/volumes/kubernetes.io~csi/<dir>/mount.
func publishedFor(v *state.Volume, uid types.UID, dir string) bool {
	if v.PodUID != "" && v.PodUID != string(uid) {
		return false
	}
	suffix := string(filepath.Separator) + filepath.Join(string(uid), "volumes", "kubernetes.io~csi", dir, "mount")
	return strings.HasSuffix(filepath.Clean(v.TargetPath), suffix)
}

// boundVolume returns the PersistentVolume that claim ns/name is bound to,
// or nil and why there is none: not yet (notHere), or never (refused).
//
// A claim's spec.volumeName is the user's to write: a claim of one
// namespace may name the PV of another's, and the API server accepts it
// (the claim stays Pending). So the claim counts as bound only when the
// PersistentVolume controller has bound both ways: the claim's phase is
// Bound and the PV's claimRef names this claim's namespace, name and UID.
// A PV whose claimRef names another claim (or an earlier claim of the same
// name) is refused: the VolumeCommit would publish another claim's data.
// Every node can tell, and the message does not name the other claim.
func (l *locator) boundVolume(ctx context.Context, ns, name string) (*corev1.PersistentVolume, located, error) {
	pvc, err := l.kube.CoreV1().PersistentVolumeClaims(ns).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, notHereBecause("claim %s/%s does not exist (yet)", ns, name), nil
	}
	if err != nil {
		return nil, located{}, fmt.Errorf("get claim %s/%s: %w", ns, name, err)
	}
	if pvc.Spec.VolumeName == "" {
		return nil, notHereBecause("claim %s/%s is not bound (yet)", ns, name), nil
	}
	pv, err := l.kube.CoreV1().PersistentVolumes().Get(ctx, pvc.Spec.VolumeName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, notHereBecause("PersistentVolume %s of claim %s/%s does not exist", pvc.Spec.VolumeName, ns, name), nil
	}
	if err != nil {
		return nil, located{}, fmt.Errorf("get PersistentVolume %s: %w", pvc.Spec.VolumeName, err)
	}
	ref := pv.Spec.ClaimRef
	switch {
	case ref == nil || ref.UID == "" && ref.Namespace == ns && ref.Name == name:
		// An available PV, or one pre-bound to this claim by name: the
		// controller has yet to bind them.
		return nil, notHereBecause("claim %s/%s is not bound (yet) to PersistentVolume %s", ns, name, pv.Name), nil
	case ref.Namespace != ns || ref.Name != name || ref.UID != pvc.UID:
		return nil, refuse("claim %s/%s names PersistentVolume %s, which is bound to another claim: "+
			"a VolumeCommit commits only a volume bound to a claim of its own namespace", ns, name, pv.Name), nil
	case pvc.Status.Phase != corev1.ClaimBound:
		return nil, notHereBecause("claim %s/%s is not bound (yet): its phase is %q", ns, name, pvc.Status.Phase), nil
	}
	return pv, located{}, nil
}

// claim locates the volume bound to claim ns/name: a persistent clone of
// this node, else the one read-write publish of the volume on this node.
func (l *locator) claim(ctx context.Context, ns, name string) (located, error) {
	pv, why, err := l.boundVolume(ctx, ns, name)
	if err != nil || pv == nil {
		return why, err
	}
	if pv.Spec.CSI == nil || pv.Spec.CSI.Driver != l.driver {
		// Every node can tell; the first to write wins.
		return refuse("claim %s/%s is bound to PersistentVolume %s, which is not a %s volume", ns, name, pv.Name, l.driver), nil
	}
	id := pv.Spec.CSI.VolumeHandle
	what := fmt.Sprintf("claim %s/%s (volume %s)", ns, name, id)
	if ok, err := source.HasClone(l.root, id); err != nil {
		return refuse("%s: %v", what, err), nil
	} else if ok {
		s, err := source.OfClone(l.root, id)
		if err != nil {
			return refuse("%s: %v", what, err), nil
		}
		return located{verdict: here, src: s, what: what}, nil
	}
	all, err := state.List(l.root)
	if err != nil {
		return located{}, fmt.Errorf("list the volumes under %s: %w", l.root, err)
	}
	var rw []*state.Volume
	readOnly := 0
	for i := range all {
		switch v := &all[i]; {
		case v.VolumeID != id:
		case v.ReadOnly:
			readOnly++
		default:
			rw = append(rw, v)
		}
	}
	switch {
	case len(rw) == 0 && readOnly > 0:
		return refuse("%s is mounted only read-only on node %s: it has no writes to commit", what, l.node), nil
	case len(rw) == 0:
		return notHereBecause("%s is not published on this node", what), nil
	case len(rw) > 1:
		var pods []string
		for _, v := range rw {
			pods = append(pods, v.Pod())
		}
		return refuse("%s is published read-write %d times on node %s (pods %s), each with its own writes: "+
			"name one with spec.source.pod", what, len(rw), l.node, strings.Join(pods, ", ")), nil
	}
	s, err := source.OfPublish(l.root, rw[0])
	if err != nil {
		return refuse("%s: %v", what, err), nil
	}
	return located{verdict: here, src: s, what: what}, nil
}
